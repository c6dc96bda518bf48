"""A dataset resident on the training device as uint8 tensors; a batch is cropped (zero padding), flipped and
normalised there, with no per-image Python work (the airbench idea)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from kdprune_cli.data.cache import ensure_cache
from kdprune_cli.data.sources import DataError, get_source


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
        self.name = name
        self.fingerprint: Optional[str] = blob.get("fingerprint")  # content identity (see load_cached)
        self.waited = 0.0  # seconds load_data waited for another job building the same cache
        source = get_source(name)
        self.num_classes, self.channels, self.image_size = source.classes, source.channels, source.size
        self.device = device
        self.crop_padding, self.flip = int(crop_padding), bool(flip)
        xtr, ytr = blob["x_train"], blob["y_train"]
        self.val: Optional[Split] = None
        if val_split > 0:
            g = torch.Generator().manual_seed(split_seed)
            perm = torch.randperm(len(ytr), generator=g)
            n_val = int(round(val_split * len(ytr)))
            if not 0 < n_val < len(ytr):
                raise DataError(f"data.val_split={val_split} leaves {len(ytr) - n_val} of the {len(ytr)} {name} "
                                f"training images for training and {n_val} for validation; both need at least one")
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
        for start in range(0, n, batch_size)[:batch_count(n, batch_size, drop_last)][:max_batches]:
            idx = order[start:start + batch_size]
            x = s.x[idx]
            if augment:
                x = self.augment(x, gen)
            yield self.normalise(x), s.y[idx], idx

    def num_batches(self, which: str, batch_size: int, drop_last: bool = False) -> int:
        return batch_count(len(self.split(which)), batch_size, drop_last)


def batch_count(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches of one pass over ``n`` samples: with ``drop_last`` full batches only (one short batch when ``n`` is
    below ``batch_size``)."""
    return n // batch_size if (drop_last and n >= batch_size) else -(-n // batch_size)


def load_data(cfg, device: torch.device) -> DeviceData:
    """Build :class:`DeviceData` from the ``data`` config node."""
    fp, blob, waited = ensure_cache(cfg.name, cfg.root, cfg.download, cfg.cache_dir, cfg.verify_checksums)
    data = DeviceData(cfg.name, blob, device, crop_padding=cfg.crop_padding, flip=cfg.flip,
                      val_split=cfg.val_split, split_seed=cfg.split_seed)
    data.fingerprint, data.waited = fp, waited
    return data
