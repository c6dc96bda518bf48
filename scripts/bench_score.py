"""The CA-KLD scoring pass against one fine-tuning epoch, side by side in one process.

CA-KLD scores every prunable weight by ``Σ_b |θ ⊙ ∇θ L_total|`` over one pass of the training set
(``summed_saliency``: bf16 forwards with ``--amp`` on CUDA, float32 sums fused over the tensors), after a
fine-tuning of the dense student with the same loss. This script times both on the same synthetic uint8 data
held on the device, with the method's defaults (conf/method/cakld.yaml: batch 128, T=2, α=0.9, logit
standardisation): the second of two fine-tuning epochs (``kdprune_cli.training.loop.train`` with ``Distill``,
in the trainer mode ``--compile``) and the second of two scoring passes. The pairs are the paper presets':
CIFAR-shaped ResNet-56 → ResNet-20 (32×32, 10 classes) and TinyImageNet-shaped ResNet-50 → ResNet-18 (64×64,
200 classes). Prints a markdown table with the ratio scoring / epoch (the target: at most 1.3).

    python scripts/bench_score.py                  # CUDA: both pairs, 50 batches each (a few minutes)
    python scripts/bench_score.py --quick          # any machine: ResNet-20 → ResNet-20, 2 batches of 16
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import time

import torch

from kdprune_cli.config.schema import TrainRecipe
from kdprune_cli.data import DeviceData
from kdprune_cli.distill.objectives import Distill
from kdprune_cli.models import build_model
from kdprune_cli.models.masks import prunable_params
from kdprune_cli.pruning.scores.saliency import scoring_copy, summed_saliency
from kdprune_cli.training import compiling
from kdprune_cli.training.loop import train

PAIRS = {"cifar": ("resnet56", "resnet20", 10, 32, "cifar10"),
         "tinyimagenet": ("resnet50", "resnet18", 200, 64, "tinyimagenet")}


def synthetic(n: int, classes: int, size: int, dataset: str, device: torch.device) -> DeviceData:
    g = torch.Generator().manual_seed(0)
    blob = {"x_train": torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
            "y_train": torch.randint(0, classes, (n,), generator=g),
            "x_test": torch.randint(0, 256, (16, 3, size, size), generator=g, dtype=torch.uint8),
            "y_test": torch.randint(0, classes, (16,), generator=g)}
    return DeviceData(dataset, blob, device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_seconds(student, teacher, data, args) -> float:
    """The second of two fine-tuning epochs with L_total (each epoch ends in a loss read-back: the device is
    idle when ``log`` runs)."""
    ends = []
    recipe = TrainRecipe(epochs=2, batch_size=args.batch, lr=0.01, eval_every=0)
    objective = Distill(teacher, alpha=0.9, gamma=0.9, temperature=2.0, logit_norm=True)
    train(student, data, recipe, objective, gen=torch.Generator().manual_seed(0), progress=False, amp=args.amp,
          compile=args.compile, log=lambda rec: ends.append(time.perf_counter()))
    return ends[1] - ends[0]


def score_seconds(student, teacher, data, args) -> float:
    """The second of two scoring passes over the same batches (the first warms up the kernels)."""
    model = scoring_copy(student, "eval")
    objective = Distill(teacher, alpha=0.9, gamma=0.9, temperature=2.0, logit_norm=True)
    on = args.amp and args.device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if on else contextlib.nullcontext()

    for _ in range(2):
        sync(args.device)
        t = time.perf_counter()
        summed_saliency(model, prunable_params(model), data.batches("train", args.batch), objective,
                        autocast=autocast)
        sync(args.device)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=50, help="batches per epoch and per scoring pass")
    ap.add_argument("--batch", type=int, default=128, help="the method's finetune and score batch size")
    ap.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", default=None, help="the fine-tuning's trainer mode (default: step on CUDA, "
                                                    "false on CPU)")
    ap.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 (default: bf16 autocast on CUDA)")
    ap.add_argument("--quick", action="store_true", help="prove it runs: ResNet-20 → ResNet-20, 2 batches of 16")
    ap.add_argument("--backend", default="inductor", help="dynamo backend (--quick on CPU: aot_eager)")
    args = ap.parse_args()
    args.device = torch.device(args.device)
    args.compile = args.compile or ("step" if args.device.type == "cuda" else "false")
    pairs = {k: PAIRS[k] for k in args.pairs}
    if args.quick:
        args.batches, args.batch = 2, 16
        pairs = {"cifar": ("resnet20", "resnet20", 10, 32, "cifar10")}
        if args.device.type == "cpu" and args.backend == "inductor":
            args.backend = "aot_eager"
    compiling.BACKEND.name = args.backend
    gpu = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    print(f"CA-KLD scoring vs fine-tuning, {gpu}, torch {torch.__version__}, {datetime.date.today()}, batch "
          f"{args.batch}, {args.batches} batches, fine-tuning compile={args.compile}, amp={args.amp}\n")
    print("| data | teacher → student | fine-tuning epoch s | scoring pass s | scoring / epoch |")
    print("|---|---|---:|---:|---:|")
    for label, (t_name, s_name, classes, size, dataset) in pairs.items():
        data = synthetic(args.batches * args.batch, classes, size, dataset, args.device)
        torch.manual_seed(0)
        teacher = build_model(t_name, classes, 3, size).to(args.device).eval()
        student = build_model(s_name, classes, 3, size).to(args.device)
        epoch = epoch_seconds(student, teacher, data, args)
        score = score_seconds(student, teacher, data, args)
        print(f"| {label} | {t_name} → {s_name} | {epoch:.2f} | {score:.2f} | {score / epoch:.2f} |", flush=True)


if __name__ == "__main__":
    main()
