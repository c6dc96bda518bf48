"""Tiny datasets written in the real on-disk formats (CIFAR python batches, tiny-imagenet-200 layout)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch


def write_cifar(root: Path, classes: int = 10, per_batch: int = 20, test: int = 30, seed: int = 0) -> dict:
    """CIFAR-10 (5 data batches + test_batch + batches.meta) or CIFAR-100 (train, test, meta)."""
    rng = np.random.default_rng(seed)
    label_key = "labels" if classes == 10 else "fine_labels"

    def batch(n):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                label_key: rng.integers(0, classes, n).tolist(), "filenames": [f"{i}.png" for i in range(n)]}

    out = {}
    if classes == 10:
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        for i in range(1, 6):
            out[f"data_batch_{i}"] = batch(per_batch)
        out["test_batch"] = batch(test)
        out["batches.meta"] = {"label_names": [f"c{i}" for i in range(10)]}
    else:
        d = root / "cifar-100-python"
        d.mkdir(parents=True)
        out["train"] = batch(per_batch * 5)
        out["test"] = batch(test)
        out["meta"] = {"fine_label_names": [f"c{i}" for i in range(100)]}
    for name, obj in out.items():
        with open(d / name, "wb") as f:
            pickle.dump(obj, f)
    return out


def write_tiny_imagenet(root: Path, wnids=("n01443537", "n01629819", "n01641577"), per_class: int = 4,
                        val: int = 6, seed: int = 0) -> Path:
    """tiny-imagenet-200: wnids.txt, train/<wnid>/images/*.JPEG (+ boxes file), val/images + annotations."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        img_dir = base / "train" / w / "images"
        img_dir.mkdir(parents=True)
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(per_class):
            arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(arr).save(img_dir / f"{w}_{i}.JPEG", quality=95)
    lines = []
    for i in range(val):
        arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(base / "val" / "images" / f"val_{i}.JPEG", quality=95)
        lines.append(f"val_{i}.JPEG\t{wnids[i % len(wnids)]}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def _blob(n=10, c=3, s=8):
    x = torch.randint(0, 256, (n, c, s, s), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    return {"x_train": x, "y_train": torch.arange(n) % 3, "x_test": x[:4], "y_test": torch.arange(4) % 3}
