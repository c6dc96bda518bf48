"""Loaders read tiny files in the real formats; on-device augmentation and splits behave."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from kdprune_cli.data.loading import DataError, DeviceData, load_cached, read_raw

from fakedata import _blob, write_cifar, write_tiny_imagenet


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
    """What the reader gave before it decoded in parallel: PIL, one file at a time, converted to RGB."""
    from PIL import Image
    return torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8) for p in paths])
                            ).permute(0, 3, 1, 2).contiguous()


def test_tiny_imagenet_parallel_decode_is_pil_bit_for_bit(tmp_path, monkeypatch):
    import kdprune_cli.data.loading as data_mod
    from PIL import Image
    monkeypatch.setattr(data_mod, "_DECODE_CHUNK", 3)  # several chunks on the pool, and a ragged last one
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


def test_cache_is_written_once_and_reused(tmp_path):
    base = write_tiny_imagenet(tmp_path)
    a = load_cached("tinyimagenet", base, False, tmp_path / "cache")
    files = list((tmp_path / "cache").glob("*.pt"))
    assert len(files) == 1
    import shutil
    shutil.rmtree(base)  # the source is gone: the cache answers
    b = load_cached("tinyimagenet", base, False, tmp_path / "cache")
    assert torch.equal(a["x_train"], b["x_train"])


def test_crop_is_a_window_of_the_padded_image_and_flip_mirrors():
    d = DeviceData("cifar10", _blob(s=32), torch.device("cpu"), crop_padding=4, flip=False)
    x = d.train.x
    g = torch.Generator().manual_seed(1)
    out = d.augment(x, g)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(x.shape[0]):
        found = any(torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32]) for dy in range(9) for dx in range(9))
        assert found
    d2 = DeviceData("cifar10", _blob(s=32), torch.device("cpu"), crop_padding=0, flip=True)
    out2 = d2.augment(x, torch.Generator().manual_seed(2))
    for i in range(x.shape[0]):
        assert torch.equal(out2[i], x[i]) or torch.equal(out2[i], x[i].flip(2))
    assert not torch.equal(out2, x)  # some flipped with 10 images


def test_batches_normalise_and_cover_the_split():
    d = DeviceData("cifar10", _blob(n=10, s=32), torch.device("cpu"))
    seen = []
    for x, y, idx in d.batches("train", 4, shuffle=True, gen=torch.Generator().manual_seed(0)):
        assert x.dtype == torch.float32
        assert torch.allclose(x, d.normalise(d.train.x[idx]))
        seen += idx.tolist()
    assert sorted(seen) == list(range(10))
    # normalisation uses the training set's own statistics
    all_x = torch.cat([x for x, _, _ in d.batches("train", 10)])
    assert torch.allclose(all_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)


def test_validation_split_is_held_out_of_training():
    d = DeviceData("cifar10", _blob(n=10, s=32), torch.device("cpu"), val_split=0.3, split_seed=0)
    assert len(d.train) == 7 and len(d.val) == 3
    flat = lambda s: {tuple(v.flatten().tolist()) for v in s.x}
    assert not (flat(d.train) & flat(d.val))
    with pytest.raises(ValueError, match="val_split"):
        DeviceData("cifar10", _blob(s=32), torch.device("cpu")).split("val")
