"""CIFAR-10 and CIFAR-100: torchvision's python batches (``cifar-*-batches-py`` / ``cifar-100-python``) under
``data.root``, read with our restricted unpickler and checked against torchvision's md5 sums unless
``data.verify_checksums=false``. ``data.download=true`` fetches the official archive.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torchvision import datasets
from torchvision.datasets.utils import calculate_md5, download_and_extract_archive

from kdprune_cli.data.sources.base import DataError, Source, Splits, files_signature, not_found


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as protocol-2 pickles of bytes use it, limited to latin-1 text."""
    if not isinstance(obj, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError("only latin-1 text may be encoded")
    return obj.encode("latin-1")


def _allowed_globals() -> dict:
    """ndarray, dtype and the two functions that rebuild a pickled array (taken from numpy's own reduce); a pickle
    names them in numpy.core (numpy 1.x) or numpy._core (2.x), and either is allowed."""
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}
    for fn in (np.ndarray(0).__reduce__()[0], np.zeros(1).__reduce_ex__(5)[0]):  # _reconstruct, _frombuffer
        sub = fn.__module__.rsplit(".", 1)[1]
        allowed[(f"numpy.core.{sub}", fn.__name__)] = allowed[(f"numpy._core.{sub}", fn.__name__)] = fn
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only dicts, lists, strings, numbers, bytes and numpy arrays: no other global is looked up."""

    def __init__(self, f, path: Path):
        super().__init__(f, encoding="latin1")  # the CIFAR files are Python 2 pickles, as torchvision reads them
        self.path = path
        self.allowed = _allowed_globals()

    def find_class(self, module, name):
        obj = self.allowed.get((module, name))
        if obj is None:
            raise DataError(f"{self.path} is not a CIFAR batch (refused pickle global {module}.{name})")
        return obj

    def persistent_load(self, pid):
        raise DataError(f"{self.path} is not a CIFAR batch (refused pickle persistent id)")


def read_cifar_batch(path: Path, classes: int) -> tuple[np.ndarray, list]:
    """``(data N×3072 uint8, labels)`` of one CIFAR python batch, read with a restricted unpickler."""
    path = Path(path)
    obj = _unpickle(path)
    bad = f"{path} is not a CIFAR batch"
    if not isinstance(obj, dict):
        raise DataError(f"{bad} (a pickled {type(obj).__name__}, not a dict)")
    obj = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    data = _batch_data(obj.get("data"), bad)
    labels = obj["labels"] if "labels" in obj else obj.get("fine_labels")
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        labels = labels.tolist()
    if not isinstance(labels, (list, tuple)) or not all(type(v) is int for v in labels):
        raise DataError(f"{bad} (labels / fine_labels is not a list of integers)")
    if len(labels) != data.shape[0]:
        raise DataError(f"{bad} ({data.shape[0]} images but {len(labels)} labels)")
    if labels and not (0 <= min(labels) and max(labels) < classes):
        raise DataError(f"{bad} (labels outside 0..{classes - 1})")
    return data, list(labels)


def _unpickle(path: Path):
    """The object pickled in ``path``, through the restricted unpickler; DataError when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return _BatchUnpickler(f, path).load()
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"{path} could not be read ({e.strerror or e})") from None
    except Exception as e:  # truncated or not a pickle at all
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{path} is not a CIFAR batch (unreadable pickle: {type(e).__name__}: {first})") from None


def _batch_data(data, bad: str) -> np.ndarray:
    """A batch's ``data`` as the uint8 array N×3072 it must be (raw bytes accepted); DataError otherwise."""
    if isinstance(data, str):  # a Python 2 str read as latin-1
        data = data.encode("latin-1")
    if isinstance(data, (bytes, bytearray)):
        if len(data) % 3072:
            raise DataError(f"{bad} (data holds {len(data)} bytes, not N×3072)")
        data = np.frombuffer(bytes(data), dtype=np.uint8).reshape(-1, 3072)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise DataError(f"{bad} (data is a {what}, not a uint8 array N×3072)")
    return data


class Cifar(Source):
    """CIFAR-10 or CIFAR-100; torchvision's class (``CIFAR10``/``CIFAR100``) names its files, md5 sums and URL."""
    channels, size, train_images = 3, 32, 50000
    config = {"root": "${paths.data_dir}", "download": False, "crop_padding": 4, "flip": True}

    def __init__(self, name: str, classes: int, tv: type):
        self.name, self.classes, self.tv = name, classes, tv

    def files(self, root: Path) -> list:
        """``[(path, md5), ...]``: the train batches, then the test batches (torchvision's lists)."""
        return [(root / self.tv.base_folder / f, digest) for f, digest in [*self.tv.train_list, *self.tv.test_list]]

    def check(self, root: Path, verify: bool = True) -> None:
        """:class:`DataError` when a file is missing or, with ``verify``, fails its md5 sum."""
        files = self.files(root)
        if not all(path.is_file() for path, _ in files):
            raise DataError(not_found(self.name, root))
        for path, want in files if verify else ():
            got = calculate_md5(path)
            if got != want:
                raise DataError(
                    f"{self.name} file {path} is corrupt or modified (md5 mismatch: {got}, expected {want}): restore "
                    f"the official file (remove it and set data.download=true), or set "
                    f"data.verify_checksums=false for a re-packed copy")

    def signature(self, root: Path) -> Optional[dict]:
        files = [p for p, _ in self.files(root)]
        return files_signature(root, files if all(p.is_file() for p in files) else None)

    def read(self, root: Path, download: bool, verify: bool) -> Splits:
        try:
            self.check(root, verify)
        except DataError:
            if not download:
                raise
            try:
                download_and_extract_archive(self.tv.url, str(root), filename=self.tv.filename, md5=self.tv.tgz_md5)
            except Exception as e:  # network failures, a corrupt archive
                raise DataError(f"{self.name} download from {self.tv.url} into {root} failed: {e}") from e
            self.check(root, verify)
        paths = [p for p, _ in self.files(root)]
        n_train = len(self.tv.train_list)

        def tensors(paths):
            parts = [read_cifar_batch(p, self.classes) for p in paths]
            x = np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32)
            y = [v for _, labels in parts for v in labels]
            return torch.from_numpy(np.ascontiguousarray(x)), torch.tensor(y, dtype=torch.long)

        return tensors(paths[:n_train]), tensors(paths[n_train:])


SOURCES = [Cifar("cifar10", 10, datasets.CIFAR10), Cifar("cifar100", 100, datasets.CIFAR100)]
