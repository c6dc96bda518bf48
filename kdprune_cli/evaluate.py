"""Evaluation (docs/methods.md §6): top-1, top-5, NLL, ECE (torchmetrics), FLOPs, latency."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

from .matmuls import MatmulCounter
from .pruning.masks import prunable_modules


@torch.no_grad()
def predict(model: nn.Module, data, split: str = "test", batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    was_training = model.training
    model.eval()
    logits, ys = [], []
    for x, y, _ in data.batches(split, batch_size):
        logits.append(model(x).float())
        ys.append(y)
    model.train(was_training)
    return torch.cat(logits), torch.cat(ys)


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> dict:
    """Accuracy in percent; NLL in nats; ECE with ``n_bins`` equal-width confidence bins (L1)."""
    c = logits.shape[1]
    probs = F.softmax(logits, dim=1)
    return {
        "top1": 100.0 * float(multiclass_accuracy(logits, y, num_classes=c, top_k=1, average="micro")),
        "top5": 100.0 * float(multiclass_accuracy(logits, y, num_classes=c, top_k=min(5, c), average="micro")),
        "nll": float(F.cross_entropy(logits, y)),
        "ece": float(multiclass_calibration_error(probs, y, num_classes=c, n_bins=n_bins, norm="l1")),
    }


def evaluate(model: nn.Module, data, split: str = "test", batch_size: int = 1000, n_bins: int = 15) -> dict:
    logits, y = predict(model, data, split, batch_size)
    return classification_metrics(logits, y, n_bins)


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: tuple, exclude=()) -> dict:
    """Multiply–accumulates for one input, dense and with the zeros skipped: every Conv2d and Linear, plus
    the products between activations (attention's Q·Kᵀ and A·V, :class:`~.matmuls.MatmulCounter`).

    Sparse FLOPs scale each layer's count by its weight density (what a sparse kernel would execute).
    Convolutions and linear layers outside the prunable set, and the activation products (no weights),
    count densely in both.
    """
    dense, sparse = 0, 0
    prunable = set(id(m) for m in prunable_modules(model, exclude).values())
    hooks = []

    def hook(m, inp, out):
        nonlocal dense, sparse
        if isinstance(m, nn.Conv2d):
            macs = out.numel() // out.shape[0] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            macs = out.numel() // out.shape[0] * m.in_features
        density = float((m.weight != 0).float().mean()) if id(m) in prunable else 1.0
        dense += macs
        sparse += macs * density

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    try:
        with MatmulCounter() as products:
            model(torch.zeros(1, *input_shape, device=dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {"dense": int(dense + products.macs), "sparse": int(round(sparse + products.macs))}


@torch.no_grad()
def measure_latency(model: nn.Module, input_shape: tuple, *, batches=(1, 256), iters: int = 100, warmup: int = 20,
                    compiled: bool = False) -> list[dict]:
    """Time forward passes of ``model`` on its device: per batch size and mode (eager, and ``torch.compile``d
    when ``compiled``; compile time is reported apart, not timed), ``warmup`` untimed passes, then ``iters``
    timed ones (CUDA events on CUDA, ``perf_counter`` on CPU): median, 10th and 90th percentile and images/s.

    On CUDA the model runs in bf16 with channels_last (the fast inference path), on CPU in fp32; a copy is
    timed, ``model`` is left as it was."""
    import copy

    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    m = copy.deepcopy(model).eval()
    if cuda:
        m = m.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    rows = []
    for mode in ("eager", "compiled") if compiled else ("eager",):
        fn = m if mode == "eager" else torch.compile(m, mode="reduce-overhead" if cuda else None, dynamic=False)
        for b in batches:
            x = torch.randn(b, *input_shape, device=dev)
            if cuda:
                x = x.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
            row = {"batch": int(b), "mode": mode}
            if mode == "compiled":
                t = time.perf_counter()
                fn(x)
                _sync(dev)
                row["compile_seconds"] = time.perf_counter() - t
            for _ in range(warmup):
                fn(x)
            _sync(dev)
            times = []
            for _ in range(iters):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn(x)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                else:
                    t = time.perf_counter()
                    fn(x)
                    times.append((time.perf_counter() - t) * 1000)
            q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
            row.update(median_ms=float(q[1]), p10_ms=float(q[0]), p90_ms=float(q[2]),
                       images_per_s=float(b * 1000.0 / q[1]))
            rows.append(row)
    return rows


def latency_record(models: dict, input_shape: tuple, batch: int, iters: int, compile_setting="auto") -> dict:
    """Each of ``models`` (on one device) timed by :func:`measure_latency` at batch 1 and ``batch``, eager and
    compiled where ``compile_setting`` (auto | true | false; auto: on CUDA) says, with the device, dtype and
    torch version (docs/methods.md §6)."""
    from .compiling import wanted

    dev = next(next(iter(models.values())).parameters()).device
    cuda = dev.type == "cuda"
    out = {"device": f"{dev} ({torch.cuda.get_device_name(dev)})" if cuda else str(dev),
           "dtype": "bfloat16" if cuda else "float32", "channels_last": cuda, "torch": torch.__version__,
           "iters": int(iters), "warmup": 20}
    for name, m in models.items():
        out[name] = measure_latency(m, input_shape, batches=(1, int(batch)), iters=int(iters), warmup=20,
                                    compiled=wanted(compile_setting, dev))
    return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
