"""The uint8 cache of a dataset (read once from its source files) and its content fingerprint."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch

from kdprune_cli.data import sources
from kdprune_cli.log import warn
from kdprune_cli.store.atomic import atomic_save, atomic_write_json, writing
from kdprune_cli.store.locks import acquire, file_lock

CACHE_VERSION = 2  # bump when a reader changes what it returns
TENSORS = ("x_train", "y_train", "x_test", "y_test")


def fingerprint(name: str, blob: dict) -> str:
    """sha256 of the dataset's content: name, then dtype, shape and bytes of each tensor."""
    h = hashlib.sha256(f"kdprune-data\0{name}\n".encode())
    for k in TENSORS:
        t = blob[k].detach().cpu().contiguous()
        h.update(f"{k}\0{str(t.dtype)}\0{tuple(t.shape)}\n".encode())
        h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


def _cache_path(name: str, root: Path, cache_dir) -> Path:
    key = hashlib.sha1(f"{name}|{root if sources.get_source(name).uses_root else ''}".encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / f"{name}-{key}.pt"


def _stat(path: Path) -> Optional[list]:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _read_sidecar(path: Path) -> Optional[dict]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = (isinstance(meta, dict) and meta.get("version") == CACHE_VERSION and isinstance(meta.get("fingerprint"), str))
    return meta if ok else None


def _load_blob(path: Path) -> tuple[Optional[dict], str]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return None, f"{type(e).__name__}: {first}"
    if not isinstance(blob, dict) or not all(isinstance(blob.get(k), torch.Tensor) for k in TENSORS):
        return None, "not a dict of the four tensors"
    return blob, ""


def _write_cache(name: str, root: Path, path: Path, blob: dict, source: Optional[dict], verified: bool) -> dict:
    blob = {k: blob[k] for k in TENSORS}
    blob["fingerprint"] = fingerprint(name, blob)
    with writing():  # the cache and its side file land together, whatever signal comes
        atomic_save(blob, path)
        atomic_write_json({"version": CACHE_VERSION, "name": name, "root": str(root),
                           "fingerprint": blob["fingerprint"], "source": source, "verified": verified,
                           "cache": _stat(path)}, path.with_suffix(".json"))
    return blob


def ensure_cache(name: str, root: str | os.PathLike, download: bool, cache_dir: str | os.PathLike,
                 verify: bool = True, load: bool = True) -> tuple[str, Optional[dict], float]:
    """Make the uint8 cache of a dataset current; return ``(fingerprint, blob or None, seconds waited)``.

    The cache ``<cache_dir>/<name>-<key>.pt`` (key: name and resolved root) has a sidecar ``.json`` with
    the content fingerprint (computed once, when the cache is built) and the signature of the source files
    it was built from. It is rebuilt when the source files changed (size, mtime or set of files), when
    it is damaged, or when it has no valid sidecar and the source is there; when the source is gone, the
    cache answers. ``load=False`` returns the fingerprint from the sidecar without reading the tensors
    when the cache is current (the blob is then None).
    """
    root = Path(root).expanduser().resolve()
    path, src = _cache_path(name, root, cache_dir), sources.get_source(name)
    side = path.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = file_lock(path)
    waited = acquire(lock)
    try:
        source = src.signature(root)
        meta = _read_sidecar(side)
        current = meta is not None and _stat(path) is not None and meta.get("cache") == _stat(path)
        if meta is not None and not current and source is not None:
            warn(f"data cache {path} changed or vanished since it was built; rebuilding it from the source")
        if current and source is not None and meta.get("source") != source:
            warn(f"the {name} files under {root} differ from those the data cache {path} was built from "
                 f"(size, mtime or files); rebuilding it")
            current = False
        if current and verify and source is not None and not meta.get("verified"):
            src.check(root)  # built from files that were not checked (data.verify_checksums=false): check them now
            meta["verified"] = True
            atomic_write_json(meta, side)
        if current and not load:
            return meta["fingerprint"], None, waited
        if path.exists() and (current or source is None):
            blob, err = _load_blob(path)
            if blob is not None and current and blob.get("fingerprint") == meta["fingerprint"]:
                return meta["fingerprint"], blob, waited
            if blob is not None and not current:  # no (valid) sidecar and no source to rebuild from
                blob = _write_cache(name, root, path, blob, None, False)
                return blob["fingerprint"], blob, waited
            warn(f"data cache {path} " + (f"cannot be read ({err})" if blob is None else "does not match its "
                 "sidecar") + "; rebuilding it from the source")
        (xtr, ytr), (xte, yte) = sources.read_raw(name, root, download, verify)
        blob = _write_cache(name, root, path, {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte},
                            source or src.signature(root), verify)  # no signature before: just downloaded
        return blob["fingerprint"], blob, waited
    finally:
        lock.release()


def load_cached(name: str, root: str | os.PathLike, download: bool, cache_dir: str | os.PathLike,
                verify: bool = True) -> dict:
    """Read a dataset once and keep it as a ``.pt`` of uint8 tensors (keyed by name and resolved root).

    The returned dict holds ``x_train, y_train, x_test, y_test`` and the content ``fingerprint``.
    """
    return ensure_cache(name, root, download, cache_dir, verify, load=True)[1]


def dataset_fingerprint(cfg_data) -> str:
    """The content fingerprint of the dataset the ``data`` config node names (builds the cache if needed).

    Cheap when the cache is current: the sidecar is read, not the tensors. Two roots with the same bytes
    have the same fingerprint; any change of the images or labels changes it.
    """
    return ensure_cache(cfg_data.name, cfg_data.root, bool(cfg_data.download), cfg_data.cache_dir,
                        bool(getattr(cfg_data, "verify_checksums", True)), load=False)[0]
