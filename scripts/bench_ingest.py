"""Benchmark: reading tiny-imagenet-200 JPEGs into uint8 tensors, the old single-threaded PIL loop vs kdprune's reader.

Writes N random 64×64 JPEGs (plus a few grayscale ones, as TinyImageNet has) in a temporary tiny-imagenet-200
layout, then times, side by side and on warm file caches, (a) the loop the reader used before (PIL
``Image.open(p).convert("RGB")`` one file at a time, ``np.stack``) and (b) ``read_raw("tinyimagenet", ...)``
(torchvision's libjpeg decoder on chunks of files in a thread pool). Checks that both give the same bytes and
reports images/s and the ratio.

    python scripts/bench_ingest.py [--images 2000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kdprune_cli.data import read_raw  # noqa: E402


def write_layout(root: Path, n: int, classes: int = 20) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = root / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(classes)]
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    n_val = max(classes, n // 11)  # TinyImageNet: 100k train, 10k val
    n_train = n - n_val
    for c, w in enumerate(wnids):
        (base / "train" / w / "images").mkdir(parents=True)
    # smooth-ish images (noise on a gradient), JPEG quality 75 like the published files; 2% grayscale
    grad = np.linspace(0, 200, 64, dtype=np.float32)[None, :, None] + np.linspace(0, 55, 64, dtype=np.float32)[:, None, None]
    def image(i):
        arr = np.clip(grad + rng.normal(0, 25, (64, 64, 3)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("L") if i % 50 == 0 else Image.fromarray(arr)
    for i in range(n_train):
        w = wnids[i % classes]
        image(i).save(base / "train" / w / "images" / f"{w}_{i}.JPEG", quality=75)
    lines = []
    for i in range(n_val):
        image(i).save(base / "val" / "images" / f"val_{i}.JPEG", quality=75)
        lines.append(f"val_{i}.JPEG\t{wnids[i % classes]}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def old_reader(base: Path):
    """The reader's decoding before parallel ingestion (kdprune_cli/data/sources/tinyimagenet.py before its decode pool)."""
    from PIL import Image

    def load(paths):
        arr = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8) for p in paths])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

    wnids = (base / "wnids.txt").read_text().split()
    train = [p for w in wnids for p in sorted((base / "train" / w / "images").glob("*"))]
    val = [base / "val" / "images" / line.split("\t")[0]
           for line in (base / "val" / "val_annotations.txt").read_text().splitlines() if line]
    return load(train), load(val)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        base = write_layout(Path(tmp), args.images)
        for p in base.rglob("*.JPEG"):  # warm the file cache for both
            p.read_bytes()
        best = {"old": float("inf"), "new": float("inf")}
        for _ in range(args.repeats):
            t = time.perf_counter()
            old_tr, old_te = old_reader(base)
            best["old"] = min(best["old"], time.perf_counter() - t)
            t = time.perf_counter()
            (new_tr, _), (new_te, _) = read_raw("tinyimagenet", base, download=False)
            best["new"] = min(best["new"], time.perf_counter() - t)
        same = torch.equal(old_tr, new_tr) and torch.equal(old_te, new_te)
    n = args.images
    import PIL
    import torchvision
    print(f"{n} 64x64 JPEGs, {cores} cores; PIL {PIL.__version__}, torchvision {torchvision.__version__}; "
          f"best of {args.repeats}")
    print(f"old: PIL, one thread       : {n / best['old']:9.0f} img/s ({best['old']:.3f} s)")
    print(f"new: decode_jpeg, {cores:2d} threads: {n / best['new']:9.0f} img/s ({best['new']:.3f} s)")
    print(f"ratio (new / old): {best['old'] / best['new']:.2f}x; identical tensors: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
