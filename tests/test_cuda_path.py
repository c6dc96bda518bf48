"""The CUDA path (skipped without a GPU; CI has none): on-device augmentation, masked training under bf16
autocast, and a whole tiny job with device=cuda amp=true."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_augmentation_on_gpu_is_a_crop_of_the_padded_batch():
    from kdprune_cli.data import DeviceData
    dev = torch.device("cuda")
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    blob = {"x_train": x, "y_train": torch.arange(16) % 10, "x_test": x[:4], "y_test": torch.arange(4)}
    d = DeviceData("cifar10", blob, dev, crop_padding=4, flip=True)
    g = d.device_generator(torch.Generator().manual_seed(0))
    assert g.device.type == "cuda"
    out = d.augment(d.train.x, g).cpu()
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(16):
        cands = [padded[i, :, a:a + 32, b:b + 32] for a in range(9) for b in range(9)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(2)) for c in cands)


def test_tiny_job_on_cuda_with_amp(tiny_cfg, tmp_path):
    from kdprune_cli.experiment.job import run_job
    cfg = tiny_cfg("device=cuda", "amp=true", "method.finetune.epochs=1", "method.retrain.epochs=2")
    rec = run_job(cfg, tmp_path / "r", summary=False)
    assert rec["status"] == "ok" and rec["device"].startswith("cuda")
    assert abs(rec["sparsity_actual"] - 0.9) < 1e-4
    for name, st in rec["cost"]["stages"].items():  # each stage's own peak of CUDA allocated bytes
        assert st["memory_kind"] == "cuda_allocated" and "peak_rss_bytes" not in st, name
        assert isinstance(st["peak_memory_bytes"], int) and st["peak_memory_bytes"] > 0, name
    ck = torch.load(tmp_path / "r" / "model.pt", weights_only=True)
    for n, m in ck["masks"].items():
        assert (ck["state_dict"][n][~m.cpu()] == 0).all()
