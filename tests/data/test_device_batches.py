"""On-device batches: crop with zero padding and flip for a whole batch, normalisation with the training
set's statistics, a held-out validation split."""
from __future__ import annotations

import pytest
import torch
from fakedata import _blob

from kdprune_cli.data import DeviceData


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
