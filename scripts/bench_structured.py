"""Structured pruning benchmark: is the physically smaller model really faster, and does our
export add anything over a network built by hand at the same widths?

For ResNet-56 (CIFAR) and ResNet-18 (CIFAR stem) on 32×32 inputs, channel groups are removed by magnitude
(L1 group norm) at 30/50/70% of the MACs (``prune.target=macs``, widths rounded to ``--round-to``), the model
is saved as kdprune's model file and reloaded with ``kdprune_cli.load_pruned`` (the exported model), and a
hand-built ResNet of the same widths (this file, random weights) is timed beside it and the dense model, in
one process: CPU fp32, or CUDA bf16 + channels_last, eager and ``torch.compile(mode="reduce-overhead")``.

    python scripts/bench_structured.py                        # CPU: batch 1, eager
    python scripts/bench_structured.py --device cuda --batches 1,1024 --compile-at 0.5

Prints one markdown table: MACs ratio (dense / pruned), measured speed-up of the exported model over the
dense one, and the hand-built model's time over the exported model's (1.00 = our export adds nothing).
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kdprune_cli.models import build_model  # noqa: E402
from kdprune_cli.models.masks import prunable_params  # noqa: E402
from kdprune_cli.models.modelfile import load_pruned, model_file  # noqa: E402
from kdprune_cli.pruning.structure.channels import ChannelGroups  # noqa: E402
from kdprune_cli.training.evaluate import count_flops, measure_latency  # noqa: E402

warnings.filterwarnings("ignore")


class HandBlock(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int, proj: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if proj \
            else nn.Identity()

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.short(x))


class HandResNet(nn.Module):
    """A basic-block ResNet built directly at given widths: what a user would write by hand."""

    def __init__(self, stem: int, blocks: list, classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU())
        self.blocks = nn.Sequential(*[HandBlock(*b) for b in blocks])
        self.fc = nn.Linear(blocks[-1][2], classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def widths(model: nn.Module) -> tuple[int, list]:
    """Stem width and (cin, mid, cout, stride, projection) of every basic block of a (pruned) ResNet."""
    blocks = []
    for m in model.modules():
        if hasattr(m, "conv1") and hasattr(m, "conv2") and hasattr(m, "bn2"):
            proj = getattr(m, "shortcut", None) or getattr(m, "downsample", None)
            blocks.append((m.conv1.in_channels, m.conv1.out_channels, m.conv2.out_channels, m.conv1.stride[0],
                           proj is not None and len(proj) > 0))
    return model.conv1.out_channels, blocks


def prune(dense: nn.Module, arch: str, ratio: float, round_to: int, folder: Path) -> nn.Module:
    """Magnitude channel pruning to ``ratio`` of the MACs removed, saved and reloaded (the exported model)."""
    model = copy.deepcopy(dense)
    groups = ChannelGroups(model, torch.zeros(1, 3, 32, 32))
    scores = {n: p.detach().abs() for n, p in prunable_params(model).items()}
    groups.remove(groups.plan(scores, ratio, target="macs", round_to=round_to))
    path = folder / f"m{ratio}.pt"
    torch.save(model_file(model, {"name": arch, "num_classes": 10, "in_channels": 3, "image_size": 32}), path)
    return load_pruned(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--archs", default="resnet56,resnet18")
    p.add_argument("--ratios", default="0.3,0.5,0.7")
    p.add_argument("--batches", default="1")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--compile-at", default="", help="ratios at which compiled models are timed too (CUDA)")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    batches = tuple(int(b) for b in a.batches.split(","))
    compile_at = {float(r) for r in a.compile_at.split(",") if r}
    torch.manual_seed(0)
    dtype = "bf16, channels_last" if dev.type == "cuda" else "fp32"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    print(f"device {dev} ({name}), {dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{a.iters} timed iterations, widths rounded to {a.round_to}\n")
    print("| model | MACs removed | MACs ratio | batch | mode | dense ms | exported ms | speed-up | "
          "hand-built ms | hand / exported |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in a.archs.split(","):
            dense = build_model(arch, 10, 3, 32).eval()
            macs0 = count_flops(dense, (3, 32, 32))["dense"]
            base = {}
            for ratio in (float(r) for r in a.ratios.split(",")):
                exported = prune(dense, arch, ratio, a.round_to, Path(tmp)).eval()
                stem, blocks = widths(exported)
                hand = HandResNet(stem, blocks, 10).eval()
                macs = count_flops(exported, (3, 32, 32))["dense"]
                assert count_flops(hand, (3, 32, 32))["dense"] == macs, "hand-built widths differ"
                compiled = dev.type == "cuda" and ratio in compile_at
                rows = {}
                for label, m in (("dense", dense), ("exported", exported), ("hand", hand)):
                    key = (label, compiled) if label == "dense" else None
                    if key in base:
                        rows[label] = base[key]
                        continue
                    res = measure_latency(copy.deepcopy(m).to(dev), (3, 32, 32), batches=batches, iters=a.iters,
                                          warmup=20, compiled=compiled)
                    rows[label] = {(r["batch"], r["mode"]): r["median_ms"] for r in res}
                    if key is not None:
                        base[key] = rows[label]
                for (b, mode), ms in rows["exported"].items():
                    d, h = rows["dense"][(b, mode)], rows["hand"][(b, mode)]
                    print(f"| {arch} | {1 - macs / macs0:.0%} | {macs0 / macs:.2f}× | {b} | {mode} | {d:.3f} | "
                          f"{ms:.3f} | {d / ms:.2f}× | {h:.3f} | {h / ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
