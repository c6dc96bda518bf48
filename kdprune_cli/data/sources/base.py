"""What a dataset is to kdprune: a :class:`Source` that reads its files into ``uint8`` tensors."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Protocol

import torch

Splits = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class DataError(RuntimeError):
    """A dataset that cannot be found or read; the message says how to fix it."""


class Source(Protocol):
    """A dataset: its shape, its ``dataset=<name>`` option (``config``: the ``data`` node less ``name``) and
    how to read it. ``uses_root`` is False for a dataset that ships with a library (its cache ignores data.root).
    A source may subclass this class for the defaults of ``uses_root`` and ``check``."""

    name: str
    classes: int
    channels: int
    size: int  # images are size×size
    train_images: int  # the training split's images (before data.val_split holds some out)
    uses_root: bool = True
    config: dict  # root, download, crop_padding, flip

    def read(self, root: Path, download: bool, verify: bool) -> Splits:
        """``((x_train, y_train), (x_test, y_test))``: uint8 N×C×H×W and int64 CPU tensors."""

    def signature(self, root: Path) -> Optional[dict]:
        """What a cache built from ``root`` depends on; None when the source is not (all) there."""

    def check(self, root: Path) -> None:
        """Raise :class:`DataError` when the files fail their published checksums (none published: nothing)."""


def not_found(name: str, root: Path) -> str:
    return (f"{name} not found under {root}: set data.root to the folder that holds it, allow the download "
            f"with data.download=true, or try the offline demo with experiment=quickstart")


def files_signature(root: Path, files: Optional[list]) -> Optional[dict]:
    """Count, bytes and a hash of the sorted (relative path, size, mtime_ns) of ``files``; None for None."""
    if files is None:
        return None
    h = hashlib.sha256()
    total = 0
    for rel, p in sorted((p.relative_to(root).as_posix(), p) for p in files):
        st = p.stat()
        total += st.st_size
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"files": len(files), "bytes": total, "sha256": h.hexdigest()}
