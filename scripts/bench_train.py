"""Training throughput of the kdprune trainer, eager vs compiled, side by side in one process.

For ResNet-56, ResNet-20 and ResNet-18 (CIFAR stem) at batch 128 on CIFAR-shaped synthetic uint8 data held
on the device (kdprune's DeviceData, with its on-device augmentation), and for distillation (ResNet-56
teacher → ResNet-20 student, objectives.Distill), train two epochs of ``--steps`` steps with
``kdprune_cli.training.loop.train`` and time the second: eager fp32, eager with bf16 autocast, compiled
forwards (``compile=true``: bf16, channels_last, CUDA graphs) and the whole step in one graph (``compile=step``:
forward, loss, backward, SGD update and masking). The students carry a ``--sparsity`` magnitude mask, so the per-step
mask enforcement of retraining is in the measured step. Prints a markdown table.

    python scripts/bench_train.py                 # CUDA: the full table (a few minutes, mostly compiling)
    python scripts/bench_train.py --quick         # any machine: ResNet-20 and a tiny KD row, 2 steps
    python scripts/bench_train.py --rates rates.json   # + images/s of each model's training step (``--rates-mode``)
                                                       # and forward pass, for ``kdprune-estimate --rates``
"""
from __future__ import annotations

import argparse
import datetime
import json
import time

import torch

from kdprune_cli.config.schema import TrainRecipe
from kdprune_cli.data import DeviceData
from kdprune_cli.distill.objectives import CrossEntropy, Distill
from kdprune_cli.models import build_model
from kdprune_cli.models.masks import prunable_params, select
from kdprune_cli.training import compiling
from kdprune_cli.training.loop import train

MODES = {"eager": dict(amp=False, compile="false"), "eager+bf16": dict(amp=True, compile="false"),
         "compiled": dict(amp=True, compile="true"), "step": dict(amp=True, compile="step")}


def synthetic(n: int, device: torch.device) -> DeviceData:
    g = torch.Generator().manual_seed(0)
    blob = {"x_train": torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
            "y_train": torch.randint(0, 10, (n,), generator=g),
            "x_test": torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8),
            "y_test": torch.randint(0, 10, (16,), generator=g)}
    return DeviceData("cifar10", blob, device)


def one(student: str, mode: str, data, args, teacher=None) -> dict:
    torch.manual_seed(0)
    model = build_model(student, 10, 3, 32).to(args.device)
    masks = None
    if args.sparsity > 0:
        masks = select({n: p.detach().abs() for n, p in prunable_params(model).items()}, args.sparsity)
    objective = (Distill(teacher, alpha=0.5, gamma=1.0, temperature=4.0, logit_norm=True) if teacher is not None
                 else CrossEntropy())
    recipe = TrainRecipe(epochs=2, batch_size=args.batch, lr=0.05, eval_every=0)
    ends = []

    def log(rec):  # called after each epoch, once its loss has been read back (the device is idle)
        ends.append(time.perf_counter())

    stats = train(model, data, recipe, objective, gen=torch.Generator().manual_seed(0), masks=masks, log=log,
                  progress=False, **MODES[mode])
    return {"img_s": args.steps * args.batch / (ends[1] - ends[0]), **stats}


@torch.no_grad()
def forward_rate(name: str, data, args, amp: bool) -> float:
    """Images/s of ``name``'s forward pass in eval mode (a teacher's, or a network as its own teacher)."""
    model = build_model(name, 10, 3, 32).to(args.device).eval()
    on = amp and args.device.type == "cuda"
    for _ in range(2):  # the first pass warms up; the second is timed
        t = time.perf_counter()
        for x, _, _ in data.batches("train", args.batch):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on):
                model(x)
        if args.device.type == "cuda":
            torch.cuda.synchronize(args.device)
    return args.steps * args.batch / (time.perf_counter() - t)


def write_rates(path: str, models: list, data, args, gpu: str) -> None:
    """The rates file of ``kdprune-estimate --rates``: training-step and forward images/s by model."""
    mode = args.rates_mode
    train_rates = {m: one(m, mode, data, args)["img_s"] for m in models}
    fwd = {m: forward_rate(m, data, args, MODES[mode]["amp"]) for m in models}
    rates = {"device": f"{gpu}, torch {torch.__version__}, {datetime.date.today()}, batch {args.batch}, {mode}",
             "train": train_rates, "forward": fwd}
    with open(path, "w") as f:
        json.dump(rates, f, indent=1)
    print(f"\nrates ({mode}) written to {path}: {json.dumps(rates)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per epoch (the second is timed)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.9, help="magnitude mask on the students (0: dense)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true",
                    help="prove it runs: 2 steps of batch 16, ResNet-20 and a ResNet-20 → ResNet-20 KD row")
    ap.add_argument("--backend", default="inductor", help="dynamo backend (--quick on CPU: aot_eager)")
    ap.add_argument("--models", nargs="+", default=["resnet56", "resnet20", "resnet18"],
                    help="students trained alone (each also in the KD row's place: --kd TEACHER STUDENT)")
    ap.add_argument("--kd", nargs=2, metavar=("TEACHER", "STUDENT"), default=["resnet56", "resnet20"],
                    help="the distillation row")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                    help="trainer modes to time (the first is the × column's base)")
    ap.add_argument("--rates", metavar="FILE", help="also write the rates file of kdprune-estimate --rates")
    ap.add_argument("--rates-mode", choices=list(MODES), default="compiled",
                    help="the trainer mode the rates are measured in (the sweep's: compile=true amp=true is "
                         "'compiled', compile=step amp=true 'step')")
    args = ap.parse_args()
    args.device = torch.device(args.device)
    if args.quick:
        args.steps, args.batch = 2, 16
        if args.device.type == "cpu" and args.backend == "inductor":
            args.backend = "aot_eager"  # inductor on CPU spends minutes in the C++ compiler
    compiling.BACKEND.name = args.backend
    data = synthetic(args.steps * args.batch, args.device)
    rows = [(s, None) for s in (["resnet20"] if args.quick else args.models)]
    rows.append(("resnet20", "resnet20") if args.quick else (args.kd[1], args.kd[0]))
    gpu = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    print(f"kdprune trainer, {gpu}, torch {torch.__version__}, batch {args.batch}, {args.steps} timed steps, "
          f"sparsity {args.sparsity}, backend {args.backend}\n")
    print(f"| model | mode | img/s | × {args.modes[0]} | compile s | recompiles | graph breaks | fallbacks |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for student, teacher_name in rows:
        teacher = None
        if teacher_name is not None:
            torch.manual_seed(1)
            teacher = build_model(teacher_name, 10, 3, 32).to(args.device)
        label = student if teacher is None else f"KD {teacher_name} → {student}"
        base = None
        for mode in args.modes:
            r = one(student, mode, data, args, teacher)
            base = base or r["img_s"]
            print(f"| {label} | {mode} | {r['img_s']:,.0f} | {r['img_s'] / base:.2f} | {r['compile_seconds']:.1f} "
                  f"| {r['recompiles']} | {r['graph_breaks']} | {r['fallbacks']} |", flush=True)
    if args.rates:
        write_rates(args.rates, sorted({m for pair in rows for m in pair if m}), data, args, gpu)


if __name__ == "__main__":
    main()
