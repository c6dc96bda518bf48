"""TinyImageNet: ``data.root`` is the tiny-imagenet-200 folder (train/<wnid>/images, val/images,
val/val_annotations.txt); ``data.download=true`` fetches the official archive into its parent folder. The
validation split is the test split. The JPEGs decode in parallel on a thread pool.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torchvision.datasets.utils import download_and_extract_archive

from kdprune_cli.data.sources.base import DataError, Source, Splits, files_signature, not_found

TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
DECODE_CHUNK = 256  # files per task of the decoding pool


def _jpeg_decoder():
    """torchvision's libjpeg decoder of one JPEG to RGB, or None where its image ops are missing."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.io.image import _has_image_ops
    except ImportError:
        return None
    return partial(decode_jpeg, mode=ImageReadMode.RGB) if _has_image_ops() else None


def _decode_one(path: Path, data: torch.Tensor, decoder) -> torch.Tensor:
    """One image, 3×H×W uint8: a JPEG through ``decoder``, any other file as PIL's
    ``Image.open(path).convert("RGB")`` gives it."""
    from PIL import Image

    if decoder is not None:
        try:  # grayscale and CMYK JPEGs come out RGB (ImageReadMode.RGB), as PIL's convert("RGB") makes them
            return decoder(data)
        except Exception:  # not a JPEG (a PNG, say): PIL reads it, or says why not
            pass
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # OSError, PIL.UnidentifiedImageError, a truncated file
        raise DataError(f"{path} could not be read as an image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _decode_chunk(paths: list, out: torch.Tensor, size: int, decoder) -> int:
    """Decode ``paths`` into ``out`` (len(paths)×3×size×size uint8); the number of images."""
    raw = []
    for p in paths:
        try:
            data = bytearray(Path(p).read_bytes())
        except OSError as e:
            raise DataError(f"{p} could not be read ({e.strerror or e})") from None
        raw.append(torch.frombuffer(data or bytearray(1), dtype=torch.uint8))  # empty: fails in the decoders
    imgs = [_decode_one(p, data, decoder) for p, data in zip(paths, raw)]
    for i, (p, img) in enumerate(zip(paths, imgs)):
        if tuple(img.shape) != (3, size, size):
            raise DataError(f"{p} is {img.shape[-1]}×{img.shape[-2]} pixels, not {size}×{size}: every "
                            f"tinyimagenet image must be {size}×{size} (tiny-imagenet-200 as published)")
        out[i].copy_(img)
    return len(paths)


def decode_images(groups: list, size: int, desc: str = "tinyimagenet") -> list:
    """Each list of image paths in ``groups`` as one uint8 tensor N×3×size×size, decoded in parallel.

    Bit for bit what ``np.asarray(Image.open(p).convert("RGB"))`` gives (a test checks it): JPEGs go through
    torchvision's libjpeg decoder in chunks on a thread pool (the decoder lets go of the GIL, so the chunks
    decode on all cores), grayscale and CMYK ones come out RGB; any other file goes through PIL. An image of
    another size is a :class:`DataError` naming the file. A progress bar (on a terminal) counts images.
    """
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    decoder = _jpeg_decoder()
    try:
        workers = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        workers = os.cpu_count() or 1
    outs = [torch.empty((len(paths), 3, size, size), dtype=torch.uint8) for paths in groups]
    chunks = [(paths[i:i + DECODE_CHUNK], out[i:i + DECODE_CHUNK]) for paths, out in zip(groups, outs)
              for i in range(0, len(paths), DECODE_CHUNK)]
    with warnings.catch_warnings(), tqdm(total=sum(map(len, groups)), desc=desc, unit="img", leave=False,
                                         disable=None, mininterval=0.5) as bar:
        # torchvision 0.29 marks its image codecs deprecated (in favour of torchcodec); they still decode
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        with ThreadPoolExecutor(max_workers=max(1, min(32, workers)), thread_name_prefix="kdprune-decode") as ex:
            # in order; an error cancels the chunks not yet started (map's results) and waits for the running ones
            for n in ex.map(lambda chunk: _decode_chunk(*chunk, size, decoder), chunks):
                bar.update(n)
    return outs


def _present(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "val" / "val_annotations.txt").is_file()


class TinyImageNet(Source):
    name, classes, channels, size, train_images = "tinyimagenet", 200, 3, 64, 100000
    config = {"root": "${paths.data_dir}/tiny-imagenet-200", "download": False, "crop_padding": 8, "flip": True}

    def read(self, root: Path, download: bool, verify: bool) -> Splits:
        if not (root / "train").is_dir() and download:
            try:
                download_and_extract_archive(TINY_URL, download_root=str(root.parent))
            except Exception as e:
                raise DataError(f"tinyimagenet download from {TINY_URL} failed: {e}") from e
            if not (root / "train").is_dir():
                raise DataError(f"the archive did not create {root}/train: point data.root at tiny-imagenet-200")
        if not _present(root):
            raise DataError(not_found("tinyimagenet (tiny-imagenet-200 layout: train/<wnid>/images, "
                                      "val/images + val/val_annotations.txt)", root))
        wnids_file = root / "wnids.txt"
        wnids = (wnids_file.read_text().split() if wnids_file.is_file()
                 else sorted(p.name for p in (root / "train").iterdir() if p.is_dir()))
        index = {w: i for i, w in enumerate(wnids)}  # a class is its line of wnids.txt
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
        x_train, x_val = decode_images([train_paths, val_paths], self.size)
        return (x_train, torch.tensor(train_y)), (x_val, torch.tensor(val_y))

    def signature(self, root: Path) -> Optional[dict]:
        if not _present(root):
            return None
        files = [root / "wnids.txt"] if (root / "wnids.txt").is_file() else []
        for sub in ("train", "val"):
            for d, _, names in os.walk(root / sub):
                files += [Path(d) / n for n in names]
        return files_signature(root, files)


SOURCES = [TinyImageNet()]
