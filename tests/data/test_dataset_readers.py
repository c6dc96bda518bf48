"""The readers: tiny files in the real on-disk formats (CIFAR python batches, the tiny-imagenet-200 layout)
come back as uint8 tensors, bit for bit; missing or corrupt files say how to fix them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from fakedata import write_cifar, write_tiny_imagenet

from kdprune_cli.data import DataError, read_raw
from kdprune_cli.data.sources import tinyimagenet


@pytest.mark.parametrize("classes,name", [(10, "cifar10"), (100, "cifar100")])
def test_cifar_python_batches(tmp_path, classes, name):
    raw = write_cifar(tmp_path, classes=classes)
    (xtr, ytr), (xte, yte) = read_raw(name, tmp_path, download=False, verify=False)
    assert xtr.dtype == torch.uint8 and xtr.shape == (100, 3, 32, 32) and xte.shape == (30, 3, 32, 32)
    first = raw["data_batch_1" if classes == 10 else "train"]
    label_key = "labels" if classes == 10 else "fine_labels"
    # CIFAR rows are 1024 R, 1024 G, 1024 B values: channel-first after our conversion.
    np.testing.assert_array_equal(xtr[0].numpy().reshape(-1), first["data"][0])
    assert ytr[:20].tolist() == first[label_key][:20]


def test_cifar_checksums_are_checked_by_default(tmp_path):
    write_cifar(tmp_path)  # not the official files: the md5 sums differ
    with pytest.raises(DataError, match="corrupt or modified.*data.verify_checksums=false"):
        read_raw("cifar10", tmp_path, download=False, verify=True)


def test_missing_dataset_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="data.download=true.*experiment=quickstart"):
        read_raw("cifar100", tmp_path / "nowhere", download=False)
    with pytest.raises(DataError, match="tiny-imagenet-200"):
        read_raw("tinyimagenet", tmp_path / "nowhere", download=False)


def test_tiny_imagenet_layout(tmp_path):
    base = write_tiny_imagenet(tmp_path)
    (xtr, ytr), (xte, yte) = read_raw("tinyimagenet", base, download=False)
    assert xtr.shape == (12, 3, 64, 64) and xte.shape == (6, 3, 64, 64)
    assert ytr.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # class index = line of wnids.txt
    assert yte.tolist() == [i % 3 for i in range(6)]  # from val_annotations.txt


def _pil_reference(paths):
    """The reference decoding: PIL, one file at a time, converted to RGB."""
    from PIL import Image
    return torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8) for p in paths])
                            ).permute(0, 3, 1, 2).contiguous()


def test_tiny_imagenet_parallel_decode_is_pil_bit_for_bit(tmp_path, monkeypatch):
    from PIL import Image
    monkeypatch.setattr(tinyimagenet, "DECODE_CHUNK", 3)  # several chunks on the pool, and a ragged last one
    base = write_tiny_imagenet(tmp_path, per_class=5, val=7)
    rng = np.random.default_rng(1)
    extra = base / "train" / "n01443537" / "images"
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L").save(extra / "z_gray.JPEG", quality=90)
    Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), "CMYK").save(extra / "z_cmyk.JPEG")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(extra / "z_png.JPEG", format="PNG")
    (xtr, ytr), (xte, yte) = read_raw("tinyimagenet", base, download=False)
    train = [p for w in ("n01443537", "n01629819", "n01641577") for p in sorted((base / "train" / w / "images").glob("*"))]
    val = [base / "val" / "images" / f"val_{i}.JPEG" for i in range(7)]
    assert len(train) == 18 and ytr.tolist() == [0] * 8 + [1] * 5 + [2] * 5
    for got, ref in ((xtr, _pil_reference(train)), (xte, _pil_reference(val))):
        assert got.dtype == torch.uint8 and got.is_contiguous() and torch.equal(got, ref)  # exact, no tolerance
    gray = xtr[train.index(extra / "z_gray.JPEG")]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])  # grayscale comes out 3-channel


@pytest.mark.parametrize("bad", ["small", "empty", "truncated"])
def test_tiny_imagenet_bad_image_is_an_error_naming_the_file(tmp_path, bad):
    from PIL import Image
    base = write_tiny_imagenet(tmp_path)
    f = base / "train" / "n01629819" / "images" / "n01629819_2.JPEG"
    if bad == "small":
        Image.fromarray(np.zeros((48, 64, 3), dtype=np.uint8)).save(f)
        match = "n01629819_2.JPEG is 64×48 pixels, not 64×64"
    else:
        f.write_bytes(b"" if bad == "empty" else f.read_bytes()[:300])
        match = "n01629819_2.JPEG could not be read as an image"
    with pytest.raises(DataError, match=match):
        read_raw("tinyimagenet", base, download=False)


def test_md5_mismatch_says_corrupt_and_missing_says_not_found(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import calculate_md5

    write_cifar(tmp_path)
    with pytest.raises(DataError, match="data_batch_1 is corrupt or modified \\(md5 mismatch") as info:
        read_raw("cifar10", tmp_path, download=False, verify=True)
    assert "not found" not in str(info.value) and "data.verify_checksums=false" in str(info.value)
    # the official sums come from torchvision's class: with the fake files' sums, verification passes
    base = tmp_path / "cifar-10-batches-py"
    sums = {f: calculate_md5(base / f) for f, _ in [*CIFAR10.train_list, *CIFAR10.test_list]}
    monkeypatch.setattr(CIFAR10, "train_list", [[f, sums[f]] for f, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[f, sums[f]] for f, _ in CIFAR10.test_list])
    (xtr, _), (xte, _) = read_raw("cifar10", tmp_path, download=False, verify=True)
    assert xtr.shape == (100, 3, 32, 32) and xte.shape == (30, 3, 32, 32)
    (base / "test_batch").unlink()
    with pytest.raises(DataError, match="not found under"):
        read_raw("cifar10", tmp_path, download=False, verify=True)
