"""Benchmark: one masked retraining step (grad masking + re-masking) against a dense step.

    python scripts/bench_mask.py [--device cuda] [--model resnet56] [--batch-size 256] [--steps 50]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kdprune_cli.models import build_model  # noqa: E402
from kdprune_cli.models.masks import apply_masks, mask_grads, prunable_params, select  # noqa: E402


def run(model, x, y, steps, masks, dev):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    times = []
    for i in range(steps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if masks is not None:
            mask_grads(model, masks)
        opt.step()
        if masks is not None:
            apply_masks(model, masks)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t)
    times = sorted(times[steps // 5:])  # drop warm-up
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.batch_size,), device=dev)
    dense_t, masked_t = [], []
    for _ in range(args.rounds):  # interleave to cancel drift
        torch.manual_seed(0)
        m = build_model(args.model, 10).to(dev)
        dense_t.append(run(m, x, y, args.steps, None, dev))
        torch.manual_seed(0)
        m = build_model(args.model, 10).to(dev)
        masks = select({n: p.abs() for n, p in prunable_params(m).items()}, 0.9)
        apply_masks(m, masks)
        masked_t.append(run(m, x, y, args.steps, masks, dev))
    d, mk = min(dense_t), min(masked_t)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; {args.model}, batch {args.batch_size}, sparsity 0.9")
    print(f"dense step : {d * 1e3:8.2f} ms")
    print(f"masked step: {mk * 1e3:8.2f} ms")
    print(f"overhead   : {100 * (mk / d - 1):+.1f}%")


if __name__ == "__main__":
    main()
