"""Datasets as uint8 tensors on the training device, augmented there in batch.

Each dataset is read once through its real loader (torchvision's CIFAR classes, the tiny-imagenet-200
folder layout, scikit-learn's digits), turned into ``uint8`` tensors ``N×C×H×W`` and cached on disk. At
run time the tensors sit on the training device; a batch is cropped (zero padding), flipped and
normalised there, with no per-image Python work (the airbench idea).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .store import atomic_save, file_lock

TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

# name -> (num_classes, channels, image_size)
DATASETS = {
    "cifar10": (10, 3, 32),
    "cifar100": (100, 3, 32),
    "tinyimagenet": (200, 3, 64),
    "digits": (10, 1, 8),
}


class DataError(RuntimeError):
    """A dataset that cannot be found or read; the message says how to fix it."""


def _hint(name: str, root: Path) -> str:
    return (f"{name} not found under {root}: set data.root to the folder that holds it, allow the download "
            f"with data.download=true, or try the offline demo with experiment=quickstart")


def _read_cifar(name: str, root: Path, download: bool, verify: bool = True):
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    if not verify:  # same loader, files checked for presence only (subsets, re-packed copies)
        cls = type(cls.__name__, (cls,), {
            "train_list": [[f, None] for f, _ in cls.train_list],
            "test_list": [[f, None] for f, _ in cls.test_list],
            "meta": {**cls.meta, "md5": None}})
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DataError(_hint(name, root)) from e
    except Exception as e:  # network failures, unreadable batches
        raise DataError(f"{name} under {root} could not be read or downloaded: {e}") from e

    def conv(ds):
        return (torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous(),
                torch.tensor(ds.targets, dtype=torch.long))

    return conv(train), conv(test)


def _read_tiny(root: Path, download: bool):
    from PIL import Image

    if not (root / "train").is_dir() and download:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(TINY_URL, download_root=str(root.parent))
        except Exception as e:
            raise DataError(f"tinyimagenet download from {TINY_URL} failed: {e}") from e
        if not (root / "train").is_dir():
            raise DataError(f"the archive did not create {root}/train: point data.root at tiny-imagenet-200")
    if not (root / "train").is_dir() or not (root / "val" / "val_annotations.txt").is_file():
        raise DataError(_hint("tinyimagenet (tiny-imagenet-200 layout: train/<wnid>/images, "
                              "val/images + val/val_annotations.txt)", root))
    wnids_file = root / "wnids.txt"
    if wnids_file.is_file():
        wnids = [w.strip() for w in wnids_file.read_text().split() if w.strip()]
    else:
        wnids = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    index = {w: i for i, w in enumerate(wnids)}

    def load(paths):
        arr = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8) for p in paths])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

    train_paths, train_y = [], []
    for w in wnids:
        imgs = sorted((root / "train" / w / "images").glob("*"))
        train_paths += imgs
        train_y += [index[w]] * len(imgs)
    val_paths, val_y = [], []
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            if parts[1] not in index:
                raise DataError(f"val_annotations.txt names class {parts[1]} that train/ lacks")
            val_paths.append(root / "val" / "images" / parts[0])
            val_y.append(index[parts[1]])
    if not train_paths or not val_paths:
        raise DataError(f"tinyimagenet under {root} has no images")
    return ((load(train_paths), torch.tensor(train_y)), (load(val_paths), torch.tensor(val_y)))


def _read_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=d.target)
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    return (x[tr], y[tr]), (x[te], y[te])


def read_raw(name: str, root: Path, download: bool, verify: bool = True):
    """``((x_train, y_train), (x_test, y_test))`` as uint8 / int64 CPU tensors, through the real loaders."""
    if name in ("cifar10", "cifar100"):
        return _read_cifar(name, root, download, verify)
    if name == "tinyimagenet":
        return _read_tiny(root, download)
    if name == "digits":
        return _read_digits()
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def load_cached(name: str, root: str | os.PathLike, download: bool, cache_dir: str | os.PathLike,
                verify: bool = True) -> dict:
    """Read a dataset once and keep it as a ``.pt`` of uint8 tensors (keyed by name and resolved root)."""
    root = Path(root).expanduser().resolve()
    key = hashlib.sha1(f"{name}|{root if name != 'digits' else ''}".encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"{name}-{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path):
        if path.exists():
            try:
                return torch.load(path, weights_only=True)
            except Exception:
                path.unlink()  # a damaged cache is rebuilt from the source files
        (xtr, ytr), (xte, yte) = read_raw(name, root, download, verify)
        blob = {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}
        atomic_save(blob, path)
        return blob


@dataclass
class Split:
    x: torch.Tensor  # uint8 N×C×H×W on the device
    y: torch.Tensor  # int64 N on the device

    def __len__(self) -> int:
        return self.y.shape[0]


class DeviceData:
    """A dataset resident on ``device`` with batched, on-device augmentation."""

    def __init__(self, name: str, blob: dict, device: torch.device, crop_padding: int = 4, flip: bool = True,
                 val_split: float = 0.0, split_seed: int = 0):
        if name not in DATASETS:
            raise DataError(f"unknown dataset {name!r}")
        self.name = name
        self.num_classes, self.channels, self.image_size = DATASETS[name]
        self.device = device
        self.crop_padding, self.flip = int(crop_padding), bool(flip)
        xtr, ytr = blob["x_train"], blob["y_train"]
        self.val: Optional[Split] = None
        if val_split > 0:
            g = torch.Generator().manual_seed(split_seed)
            perm = torch.randperm(len(ytr), generator=g)
            n_val = int(round(val_split * len(ytr)))
            vi, ti = perm[:n_val].sort().values, perm[n_val:].sort().values
            self.val = Split(xtr[vi].to(device), ytr[vi].to(device))
            xtr, ytr = xtr[ti], ytr[ti]
        self.train = Split(xtr.to(device), ytr.to(device))
        self.test = Split(blob["x_test"].to(device), blob["y_test"].to(device))
        xf = xtr.float() / 255.0
        self.mean = xf.mean(dim=(0, 2, 3)).to(device).view(1, -1, 1, 1)
        self.std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3).to(device).view(1, -1, 1, 1)

    def split(self, which: str) -> Split:
        s = getattr(self, which, None)
        if s is None:
            raise ValueError(f"no {which!r} split (set data.val_split > 0 for a validation split)")
        return s

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - self.mean) / self.std

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random crop with zero padding and horizontal flip, for a whole uint8 batch at once.

        ``gen`` should live on ``x``'s device (see :meth:`device_generator`): random numbers drawn on the
        host would be copied over every batch, which stalls the GPU queue.
        """
        n, _, h, w = x.shape
        p = self.crop_padding
        dev = x.device
        if p > 0:
            padded = F.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (n,), generator=gen, device=gen.device).to(dev)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=gen, device=gen.device).to(dev)
            rows = dy[:, None] + torch.arange(h, device=dev)[None, :]  # n×h
            cols = dx[:, None] + torch.arange(w, device=dev)[None, :]  # n×w
            idx_n = torch.arange(n, device=dev)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        if self.flip:
            flip = (torch.rand(n, generator=gen, device=gen.device) < 0.5).to(dev)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x

    def device_generator(self, gen: torch.Generator) -> torch.Generator:
        """A generator on the data's device, seeded from one draw of the (CPU) generator ``gen``."""
        if gen.device == self.device:
            return gen
        g = torch.Generator(device=self.device)
        g.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
        return g

    def batches(self, which: str = "train", batch_size: int = 128, *, shuffle: bool = False,
                augment: bool = False, gen: Optional[torch.Generator] = None, drop_last: bool = False,
                max_batches: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(x_normalised, y, index)`` batches of split ``which``."""
        s = self.split(which)
        n = len(s)
        gen = self.device_generator(gen if gen is not None else torch.Generator().manual_seed(0))
        order = torch.randperm(n, generator=gen, device=self.device) if shuffle else torch.arange(n, device=self.device)
        stop = n - (n % batch_size) if (drop_last and n >= batch_size) else n
        for b, start in enumerate(range(0, stop, batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            idx = order[start:start + batch_size]
            x = s.x[idx]
            if augment:
                x = self.augment(x, gen)
            yield self.normalise(x), s.y[idx], idx

    def num_batches(self, which: str, batch_size: int, drop_last: bool = False) -> int:
        n = len(self.split(which))
        return n // batch_size if (drop_last and n >= batch_size) else -(-n // batch_size)


def load_data(cfg, device: torch.device) -> DeviceData:
    """Build :class:`DeviceData` from the ``data`` config node."""
    blob = load_cached(cfg.name, cfg.root, cfg.download, cfg.cache_dir, cfg.verify_checksums)
    return DeviceData(cfg.name, blob, device, crop_padding=cfg.crop_padding, flip=cfg.flip,
                      val_split=cfg.val_split, split_seed=cfg.split_seed)
