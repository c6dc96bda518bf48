"""Evaluation (docs/methods.md §6): top-1, top-5, NLL, ECE (torchmetrics), FLOPs, latency."""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

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
    """Multiply–accumulates of every Conv2d and Linear for one input, dense and with the zeros skipped.

    Sparse FLOPs scale each layer's count by its weight density (what a sparse kernel would execute).
    Convolutions and linear layers outside the prunable set count densely in both.
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
        model(torch.zeros(1, *input_shape, device=dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {"dense": int(dense), "sparse": int(round(sparse))}


@torch.no_grad()
def latency_ms(model: nn.Module, input_shape: tuple, batch_size: int = 1, warmup: int = 5, repeats: int = 20,
               device: Optional[torch.device] = None) -> float:
    """Median wall-clock milliseconds of one forward pass (synchronised on CUDA)."""
    dev = device or next(model.parameters()).device
    model.eval()
    x = torch.randn(batch_size, *input_shape, device=dev)
    times = []
    for i in range(warmup + repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        model(x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= warmup:
            times.append((time.perf_counter() - t) * 1000)
    return float(sorted(times)[len(times) // 2])
