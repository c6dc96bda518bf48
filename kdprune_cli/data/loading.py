"""Datasets as uint8 tensors on the training device, augmented there in batch.

Each dataset is read once (CIFAR python batches with a restricted unpickler that builds nothing but
dicts, lists and numpy arrays, checked against torchvision's md5 sums unless ``data.verify_checksums=false``;
the tiny-imagenet-200 folder layout; scikit-learn's digits), turned into ``uint8`` tensors ``N×C×H×W`` and
cached on disk with a content fingerprint beside it; the cache is rebuilt when its source files change. At
run time the tensors sit on the training device; a batch is cropped (zero padding), flipped and
normalised there, with no per-image Python work (the airbench idea).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from kdprune_cli.log import warn
from kdprune_cli.store.atomic import atomic_save, atomic_write_json, writing
from kdprune_cli.store.locks import acquire, file_lock

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


# --- CIFAR: our reader, never an unrestricted unpickler -------------------------------------------------------
def _numpy_global(candidates):
    import importlib

    for module, name in candidates:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as protocol-2 pickles of bytes use it, limited to latin-1 text."""
    if not isinstance(obj, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError("only latin-1 text may be encoded")
    return obj.encode("latin-1")


def _allowed_globals() -> dict:
    reconstruct = _numpy_global([("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct")])
    frombuffer = _numpy_global([("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer")])
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # pickled by numpy 1.x and 2.x
        if reconstruct is not None:
            allowed[(mod, "_reconstruct")] = reconstruct
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        if frombuffer is not None:
            allowed[(mod, "_frombuffer")] = frombuffer
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
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, path).load()
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"{path} could not be read ({e.strerror or e})") from None
    except Exception as e:  # truncated or not a pickle at all
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{path} is not a CIFAR batch (unreadable pickle: {type(e).__name__}: {first})") from None
    bad = f"{path} is not a CIFAR batch"
    if not isinstance(obj, dict):
        raise DataError(f"{bad} (a pickled {type(obj).__name__}, not a dict)")
    obj = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    data = obj.get("data")
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


def _cifar_class(name: str):
    from torchvision.datasets import CIFAR10, CIFAR100

    return CIFAR10 if name == "cifar10" else CIFAR100


def _cifar_files(name: str, root: Path) -> list:
    """``[(path, md5), ...]``: the train batches, then the test batches (torchvision's lists)."""
    cls = _cifar_class(name)
    return [(root / cls.base_folder / f, md5) for f, md5 in [*cls.train_list, *cls.test_list]]


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cifar_problem(name: str, root: Path, verify: bool) -> Optional[DataError]:
    for path, md5 in _cifar_files(name, root):
        if not path.is_file():
            return DataError(_hint(name, root))
    if verify:
        for path, md5 in _cifar_files(name, root):
            got = _md5(path)
            if got != md5:
                return DataError(
                    f"{name} file {path} is corrupt or modified (md5 mismatch: {got}, expected {md5}): restore "
                    f"the official file (remove it and set data.download=true), or set "
                    f"data.verify_checksums=false for a re-packed copy")
    return None


def _read_cifar(name: str, root: Path, download: bool, verify: bool = True):
    problem = _cifar_problem(name, root, verify)
    if problem is not None and download:
        from torchvision.datasets.utils import download_and_extract_archive

        cls = _cifar_class(name)
        try:
            download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
        except Exception as e:  # network failures, a corrupt archive
            raise DataError(f"{name} download from {cls.url} into {root} failed: {e}") from e
        problem = _cifar_problem(name, root, verify)
    if problem is not None:
        raise problem
    classes = DATASETS[name][0]
    files = _cifar_files(name, root)
    n_train = len(_cifar_class(name).train_list)

    def conv(paths):
        parts = [read_cifar_batch(p, classes) for p in paths]
        x = np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32)
        y = [v for _, labels in parts for v in labels]
        return torch.from_numpy(np.ascontiguousarray(x)), torch.tensor(y, dtype=torch.long)

    return conv([p for p, _ in files[:n_train]]), conv([p for p, _ in files[n_train:]])


_DECODE_CHUNK = 256  # files per task of the decoding pool


def _jpeg_decoder():
    """torchvision's libjpeg decoder ``(decode_jpeg, ImageReadMode.RGB)``, or None where its image ops are missing."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.io.image import _has_image_ops
    except ImportError:
        return None
    return (decode_jpeg, ImageReadMode.RGB) if _has_image_ops() else None


def _decode_pil(path: Path) -> torch.Tensor:
    """One image as PIL's ``Image.open(path).convert("RGB")`` gives it, 3×H×W uint8 (the path for non-JPEGs)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # OSError, PIL.UnidentifiedImageError, a truncated file
        raise DataError(f"{path} could not be read as an image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _decode_one(path: Path, data: torch.Tensor, decoder) -> torch.Tensor:
    if decoder is not None:
        try:
            return decoder[0](data, mode=decoder[1])
        except Exception:  # not a JPEG (a PNG, say): PIL reads it, or says why not
            pass
    return _decode_pil(path)


def _decode_chunk(paths: list, out: torch.Tensor, size: int, decoder) -> int:
    """Decode ``paths`` into ``out`` (len(paths)×3×size×size uint8); the number of images."""
    raw = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                data = bytearray(f.read())
        except OSError as e:
            raise DataError(f"{p} could not be read ({e.strerror or e})") from None
        raw.append(torch.frombuffer(data or bytearray(1), dtype=torch.uint8))  # empty: fails in the decoders
    imgs = None
    if decoder is not None:
        try:  # grayscale and CMYK JPEGs come out RGB (ImageReadMode.RGB), as PIL's convert("RGB") makes them
            imgs = decoder[0](raw, mode=decoder[1])
        except Exception:  # one file is not a JPEG, or is broken: one by one, to find it
            imgs = None
    if imgs is None:
        imgs = [_decode_one(p, data, decoder) for p, data in zip(paths, raw)]
    for i, (p, img) in enumerate(zip(paths, imgs)):
        if tuple(img.shape) != (3, size, size):
            raise DataError(f"{p} is {img.shape[-1]}×{img.shape[-2]} pixels, not {size}×{size}: every "
                            f"tinyimagenet image must be {size}×{size} (tiny-imagenet-200 as published)")
        out[i].copy_(img)
    return len(paths)


def decode_images(groups: list, size: int, desc: str = "tinyimagenet") -> list:
    """Each list of image paths in ``groups`` as one uint8 tensor N×3×size×size, decoded in parallel.

    Bit for bit what ``np.asarray(Image.open(p).convert("RGB"))`` gives (tests/test_data.py checks it): JPEGs
    go through torchvision's libjpeg decoder in chunks on a thread pool (the decoder lets go of the GIL, so the
    chunks decode on all cores), grayscale and CMYK ones come out RGB; any other file goes through PIL. An
    image of another size is a :class:`DataError` naming the file. A progress bar (on a terminal) counts images.
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
    total = sum(len(paths) for paths in groups)
    with warnings.catch_warnings(), tqdm(total=total, desc=desc, unit="img", leave=False, disable=None,
                                         mininterval=0.5) as bar:
        # torchvision 0.29 marks its image codecs deprecated (in favour of torchcodec); they still decode
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        ex = ThreadPoolExecutor(max_workers=max(1, min(32, workers)), thread_name_prefix="kdprune-decode")
        try:
            futures = [ex.submit(_decode_chunk, paths[i:i + _DECODE_CHUNK], out[i:i + _DECODE_CHUNK], size, decoder)
                       for paths, out in zip(groups, outs) for i in range(0, len(paths), _DECODE_CHUNK)]
            for fut in futures:
                bar.update(fut.result())
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
    return outs


def _read_tiny(root: Path, download: bool):
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
    size = DATASETS["tinyimagenet"][2]
    x_train, x_val = decode_images([train_paths, val_paths], size)
    return ((x_train, torch.tensor(train_y)), (x_val, torch.tensor(val_y)))


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


# --- the uint8 cache and its content fingerprint ---------------------------------------------------------------
CACHE_VERSION = 2  # bump when a reader changes what it returns


def _source_files(name: str, root: Path) -> Optional[list]:
    """The files the reader of ``name`` uses, or None when the source is not (all) there."""
    if name in ("cifar10", "cifar100"):
        files = [p for p, _ in _cifar_files(name, root)]
        return files if all(p.is_file() for p in files) else None
    if name == "tinyimagenet":
        if not (root / "train").is_dir() or not (root / "val" / "val_annotations.txt").is_file():
            return None
        files = [root / "wnids.txt"] if (root / "wnids.txt").is_file() else []
        for sub in ("train", "val"):
            for d, _, names in os.walk(root / sub):
                files += [Path(d) / n for n in names]
        return files
    return None


def source_signature(name: str, root: str | os.PathLike) -> Optional[dict]:
    """What the cache of ``name`` was built from: count, bytes and a hash of the sorted (relative path, size,
    mtime_ns) of its source files (the scikit-learn version for digits); None when the source is absent."""
    if name == "digits":
        import sklearn

        return {"sklearn": sklearn.__version__}
    root = Path(root).expanduser().resolve()
    files = _source_files(name, root)
    if files is None:
        return None
    h = hashlib.sha256()
    total = 0
    for rel, p in sorted((p.relative_to(root).as_posix(), p) for p in files):
        st = p.stat()
        total += st.st_size
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"files": len(files), "bytes": total, "sha256": h.hexdigest()}


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
    key = hashlib.sha1(f"{name}|{root if name != 'digits' else ''}".encode()).hexdigest()[:12]
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


def _write_cache(name: str, root: Path, path: Path, side: Path, blob: dict, source: Optional[dict],
                 verified: bool) -> dict:
    blob = {k: blob[k] for k in TENSORS}
    blob["fingerprint"] = fingerprint(name, blob)
    with writing():  # the cache and its side file land together, whatever signal comes
        atomic_save(blob, path)
        atomic_write_json({"version": CACHE_VERSION, "name": name, "root": str(root),
                           "fingerprint": blob["fingerprint"], "source": source, "verified": verified,
                           "cache": _stat(path)}, side)
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
    path = _cache_path(name, root, cache_dir)
    side = path.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = file_lock(path)
    waited = acquire(lock)
    try:
        source = source_signature(name, root)
        meta = _read_sidecar(side)
        current = meta is not None and _stat(path) is not None and meta.get("cache") == _stat(path)
        if meta is not None and not current and source is not None:
            warn(f"data cache {path} changed or vanished since it was built; rebuilding it from the source")
        if current and source is not None and meta.get("source") != source:
            warn(f"the {name} files under {root} differ from those the data cache {path} was built from "
                 f"(size, mtime or files); rebuilding it")
            current = False
        if current and verify and source is not None and name in ("cifar10", "cifar100") and not meta.get("verified"):
            # built from files that were not checked (data.verify_checksums=false): check them now
            problem = _cifar_problem(name, root, True)
            if problem is not None:
                raise problem
            meta["verified"] = True
            atomic_write_json(meta, side)
        if current and not load:
            return meta["fingerprint"], None, waited
        if path.exists() and (current or source is None):
            blob, err = _load_blob(path)
            if blob is not None and current and blob.get("fingerprint") == meta["fingerprint"]:
                return meta["fingerprint"], blob, waited
            if blob is not None and not current:  # no (valid) sidecar and no source to rebuild from
                blob = _write_cache(name, root, path, side, blob, None, False)
                return blob["fingerprint"], blob, waited
            warn(f"data cache {path} " + (f"cannot be read ({err})" if blob is None else "does not match its "
                 "sidecar") + "; rebuilding it from the source")
        (xtr, ytr), (xte, yte) = read_raw(name, root, download, verify)
        if source is None:  # just downloaded
            source = source_signature(name, root)
        blob = _write_cache(name, root, path, side, {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte},
                            source, verify)
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
        self.fingerprint: Optional[str] = blob.get("fingerprint")  # content identity (see load_cached)
        self.waited = 0.0  # seconds load_data waited for another job building the same cache
        self.num_classes, self.channels, self.image_size = DATASETS[name]
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
    fp, blob, waited = ensure_cache(cfg.name, cfg.root, cfg.download, cfg.cache_dir, cfg.verify_checksums)
    data = DeviceData(cfg.name, blob, device, crop_padding=cfg.crop_padding, flip=cfg.flip,
                      val_split=cfg.val_split, split_seed=cfg.split_seed)
    data.fingerprint, data.waited = fp, waited
    return data
