"""Content-addressed artifacts (the open_lth idea), atomic writes and file locks.

A stage's artifact lives under ``<root>/<stage>/<key>/`` where ``key`` is a hash of exactly the config
that determines it. A stage whose artifact exists is loaded, not recomputed; two jobs that need the
same artifact at once serialise on a file lock, so it is computed once.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from filelock import FileLock


def config_hash(obj: Any, n: int = 16) -> str:
    """A stable hash of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    _atomic(Path(path), lambda tmp: torch.save(obj, tmp))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")

    _atomic(Path(path), write)


def file_lock(path: str | os.PathLike, timeout: float = -1) -> FileLock:
    return FileLock(str(path) + ".lock", timeout=timeout)


class Store:
    """``root/<stage>/<key>/{artifact.pt, meta.json}``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get_or_create(self, stage: str, spec: dict, create: Callable[[], tuple[dict, dict]],
                      enabled: bool = True) -> tuple[dict, dict, bool]:
        """Return ``(state, meta, cached)``; ``create()`` returns ``(state, meta)`` and runs at most once.

        ``spec`` is the config subset that determines the artifact; its hash is the key.
        """
        key = config_hash(spec)
        d = self.dir(stage, key)
        art, meta_path = d / "artifact.pt", d / "meta.json"
        if not enabled:
            state, meta = create()
            return state, meta, False
        d.mkdir(parents=True, exist_ok=True)
        with file_lock(d / "stage"):
            if art.exists() and meta_path.exists():
                loaded = self._load(art, meta_path)
                if loaded is not None:
                    return loaded[0], loaded[1], True
            state, meta = create()
            meta = {**meta, "stage": stage, "key": key, "spec": spec}
            atomic_save(state, art)
            atomic_write_json(meta, meta_path)
            (d / "partial.pt").unlink(missing_ok=True)  # training checkpoint of an interrupted attempt
            return state, meta, False

    @staticmethod
    def _load(art: Path, meta_path: Path) -> Optional[tuple[dict, dict]]:
        try:
            return torch.load(art, map_location="cpu", weights_only=True), json.loads(meta_path.read_text())
        except Exception:
            return None  # a damaged artifact is recomputed
