"""Digests: a stable hash of a JSON-able spec (the key of a job or an artifact), and the sha256 of a file's bytes,
hashed once per (path, size, mtime, inode) and remembered in memory and in a cache file."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from filelock import Timeout

from kdprune_cli.store.atomic import atomic_write_json
from kdprune_cli.store.locks import file_lock


def config_hash(obj: Any, n: int = 16) -> str:
    """A stable hash of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


_DIGESTS: dict = {}  # (resolved path, size, mtime_ns, inode) -> sha256 hex (one dict operation at a time)
DIGESTS_FILE = "digests.json"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/kdprune``, else ``~/.cache/kdprune`` (a folder under the temp dir without a home)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = Path.home() / ".cache"
        except (RuntimeError, KeyError):
            base = Path(tempfile.gettempdir()) / f"kdprune-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    return Path(base) / "kdprune"


def sha256_file(path: Path) -> str:
    """The sha256 (hex) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> list:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _read_digests(file: Path) -> dict:
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # absent or damaged: ignored
    entries = obj.get("entries") if isinstance(obj, dict) else None
    return entries if isinstance(entries, dict) else {}


def file_digest(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """sha256 (hex) of the bytes of ``path``, hashed once per (path, size, mtime, inode).

    The digest is remembered in memory and in ``<cache_dir>/digests.json`` (default
    ``$XDG_CACHE_HOME/kdprune`` or ``~/.cache/kdprune``), so a big checkpoint is read once, not at every
    start; a file replaced at the same path (other size, mtime or inode) is hashed anew. A damaged or
    unwritable cache file is ignored.
    """
    p = Path(path).expanduser().resolve()
    stat = _stat_key(p.stat())
    digest = _DIGESTS.get((str(p), *stat))
    if digest is not None:
        return digest
    cfile = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / DIGESTS_FILE
    e = _read_digests(cfile).get(str(p))
    if isinstance(e, dict) and e.get("stat") == stat and isinstance(e.get("sha256"), str):
        digest = e["sha256"]
    else:
        for _ in range(3):  # a file written while it is read is read again
            before = stat
            digest = sha256_file(p)
            stat = _stat_key(p.stat())
            if stat == before:
                break
        else:
            return digest  # still changing: not remembered
        _remember(cfile, str(p), stat, digest)
    _DIGESTS[(str(p), *stat)] = digest
    return digest


def _remember(cfile: Path, path: str, stat: list, digest: str) -> None:
    try:
        cfile.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(cfile, timeout=10):
            entries = _read_digests(cfile)
            entries[path] = {"stat": stat, "sha256": digest}
            atomic_write_json({"version": 1, "entries": entries}, cfile)
    except (OSError, Timeout):
        pass  # a read-only or busy cache only costs a second hashing
