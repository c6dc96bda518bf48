"""NutePrune benchmark: the memory of training with one frozen copy of the weights (``lora=true``:
the student and every snapshot teacher are adapters on one base) against keeping a full copy of the weights per
snapshot teacher (``lora=false``), and the latency of the exported model against the dense one.

Which comparison, and why it is the fair one: both variants are NutePrune itself, ``NutePrune.run`` on a real
runner ``Context``, same student weights, same synthetic data, seed, steps, gates, Lagrangian, teacher schedule
and loss; the one switch is ``method.lora``. With ``lora=true`` the base is frozen, the optimizer and the
snapshots hold adapter tensors only, and a snapshot teaches by swapping its adapters in; with ``lora=false``
the weights train and each snapshot is a copy of every trained weight (what "one full teacher per snapshot"
costs, minus the BatchNorm statistics, which are frozen and shared in both). Deep-copying whole models per
snapshot in a loop of our own would measure a design NutePrune does not run, so we do not. What the switch
changes besides the snapshots is part of each design and is in the numbers: the AdamW state of the trained
tensors, and with LoRA the adapters' extra activations in every forward.

Measured for each variant, each in its own subprocess (so the process-wide figures belong to one variant):

- snapshots taken, bytes they hold, full copies of each prunable weight alive at the end of training (distinct
  storages, by ``untyped_storage().data_ptr()``, over the model, the snapshots and the objective's intact copy,
  which only ``lora=false`` keeps: with adapters the frozen base is the intact teacher) and all bytes of weight
  storage the method holds then (distinct storages);
- the ``prune`` stage's peak memory as the runner books it: on CUDA peak allocated bytes (``torch.cuda``
  statistics, reset at the stage's start), and that peak above the bytes allocated before ``NutePrune.run``;
  on CPU torch tracks no allocations, so the process's peak resident set (``ru_maxrss``) at the stage's end and
  its rise above the resident set before ``NutePrune.run`` (the stage's training is the process's peak: the
  steps hold all activations for the backward pass, far above anything before);
- seconds per prune step; the exported models' MACs, and their latency beside the dense student's
  (``evaluate.measure_latency``), all three reloaded and timed in this process in ``--rounds`` interleaved
  rounds, the median of the rounds' medians (a busy machine drifts between rounds).

The student is ResNet-56 at 32×32 built directly (``build_model``), its BatchNorm statistics set by a few
forward passes; the data are random CIFAR-shaped uint8 images, so accuracy means nothing and the sparsity
reached depends on the steps (the table says which). The recipe is the quick budget's (gate and λ rates,
``teacher_ahead`` 3) with two epochs, the target ramped over the first; the adapters (or weights) train with
the recipe's AdamW at 1e-3 (``--lr`` overrides; the lr changes no tensor that memory holds).

    python scripts/bench_nuteprune.py                              # CPU: 40 steps at batch 32, a few minutes on 2 cores
    python scripts/bench_nuteprune.py --device cuda --steps 200 --batch 128
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

MB = 1e6


def rss_now() -> int:
    """The resident set of this process now, bytes (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def config(args, lora: bool):
    from hydra import compose, initialize_config_dir

    from kdprune_cli.cli.main import config_dir
    from kdprune_cli.config.schema import register

    register()
    importlib.import_module("kdprune_cli.pruning")  # the methods' typed configs (method/<name>_schema)

    half = max(1, args.steps // 2)
    overrides = ["experiment=quickstart", "method=nuteprune", f"method.lora={str(lora).lower()}",  # quick budget
                 f"student={args.arch}", f"teacher={args.arch}", f"device={args.device}", "progress=false",
                 "store.enabled=false", "resume=false", "prune.granularity=channel", f"sparsity={args.sparsity}",
                 f"method.prune.batch_size={args.batch}", "method.prune.epochs=2", "method.ramp_epochs=1",
                 "method.retrain.epochs=0", f"max_batches={half}", f"seed={args.seed}"]
    if args.lr is not None:
        overrides.append(f"method.prune.lr={args.lr}")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", overrides=overrides)


def synthetic_data(n_train: int, n_test: int, device: torch.device, seed: int):
    from kdprune_cli.data import DeviceData

    g = torch.Generator().manual_seed(seed)
    blob = {"x_train": torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g),
            "y_train": torch.randint(0, 10, (n_train,), generator=g),
            "x_test": torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g),
            "y_test": torch.randint(0, 10, (n_test,), generator=g)}
    return DeviceData("cifar10", blob, device, crop_padding=4, flip=True)


def dense_student(arch: str, data, seed: int) -> torch.nn.Module:
    """ResNet at 32×32, random weights, BatchNorm statistics from a few no-grad passes over the data."""
    from kdprune_cli.models import build_model

    torch.manual_seed(seed)
    model = build_model(arch, 10, 3, 32).to(data.device)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:  # the statistics of these batches, not a running average from (0, 1)
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        model.train()
        for x, _, _ in data.batches("train", 32, max_batches=4):
            model(x)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def storages(tensors) -> dict:
    """Distinct storages among ``tensors``: data pointer -> bytes."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def child(args, lora: bool) -> dict:
    """One variant, in this process: NutePrune.run on a runner Context; what it held and cost."""
    from kdprune_cli.experiment.services import Context
    from kdprune_cli.models.masks import prunable_params
    from kdprune_cli.models.modelfile import model_file
    from kdprune_cli.pruning.methods import nuteprune as N
    from kdprune_cli.pruning.procedures import gates as G
    from kdprune_cli.store.atomic import atomic_save
    from kdprune_cli.training.evaluate import count_flops

    dev = torch.device(args.device)
    cfg = config(args, lora)
    half = max(1, args.steps // 2)
    data = synthetic_data(half * args.batch, 256, dev, args.seed)
    dense = dense_student(args.arch, data, args.seed)
    weights = list(prunable_params(dense))  # names of the prunable weights (conv and linear)
    ctx = Context(cfg, data, dev)
    ctx.artifacts.dense_student = lambda: copy.deepcopy(dense)  # no dense training: the model built above

    held: dict = {}
    step = G.NuteObjective.step

    def spy(self):  # after the last step of training: what the method holds
        step(self)
        if self.steps != self.total:
            return
        params = dict(self.model.named_parameters())
        snap = [t for z, p in self.snapshots.taken for t in [*z, *p.values()]]
        copies = []
        for w in weights:  # the base weight (peft: ``<module>.base_layer.weight``), snapshot and intact copies
            base = params.get(w) if w in params else params.get(w.replace(".weight", ".base_layer.weight"))
            found = [base] + [p[w] for _, p in self.snapshots.taken if w in p] + \
                    ([self.intact[w]] if w in self.intact else [])
            copies.append(len(storages([t for t in found if t is not None])))
        everything = storages([*params.values(), *snap, *self.intact.values()])
        held.update(snapshots=len(self.snapshots.taken), snapshot_bytes=sum(t.nbytes for t in snap),
                    weight_copies_min=min(copies), weight_copies_max=max(copies),
                    storages=len(everything), storage_bytes=sum(everything.values()),
                    expected_sparsity=float(self.expected_sparsity().detach()))

    G.NuteObjective.step = spy
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        before = rss_now()
    t = time.perf_counter()
    result = N.NutePrune(cfg.method).run(ctx)
    seconds = time.perf_counter() - t
    prune = ctx.costs.stages["prune"]
    peak = prune.peak_memory_bytes if dev.type == "cuda" else prune.peak_rss_bytes
    model = result.model.eval()
    assert not any("lora" in n for n, _ in model.named_modules()), "adapters left in the exported model"
    macs = count_flops(model, (3, 32, 32))["dense"] / count_flops(dense, (3, 32, 32))["dense"]
    atomic_save(model_file(model, {"name": args.arch, "num_classes": 10, "in_channels": 3, "image_size": 32}),
                Path(args.save))
    return {"lora": lora, **held, "memory_kind": prune.memory_kind, "peak_bytes": peak, "before_bytes": before,
            "prune_seconds": prune.seconds, "run_seconds": seconds, "steps": 2 * half,
            "params_removed": result.facts["structure"].get("params_removed"), "macs_ratio": macs}


def latencies(args, files: dict) -> dict:
    """Median ms per model and batch, the dense model and each exported one timed in this process, in
    ``--rounds`` interleaved rounds (the median of the rounds' medians: a busy machine drifts)."""
    from kdprune_cli.models import build_model
    from kdprune_cli.models.modelfile import load_pruned
    from kdprune_cli.training.evaluate import measure_latency

    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    models = {"dense": build_model(args.arch, 10, 3, 32).to(dev).eval()}
    models.update({k: load_pruned(f).to(dev).eval() for k, f in files.items()})
    times: dict = {k: {} for k in models}
    for _ in range(args.rounds):
        for k, m in models.items():
            for r in measure_latency(m, (3, 32, 32), batches=(1, args.batch), iters=args.iters, warmup=10):
                times[k].setdefault(r["batch"], []).append(r["median_ms"])
    return {k: {b: float(torch.tensor(v).median()) for b, v in t.items()} for k, t in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="resnet56")
    p.add_argument("--steps", type=int, default=40, help="prune steps (two epochs, the target ramped over one)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=None,
                   help="lr of the adapters / weights (default: the recipe's, AdamW 1e-3; it changes no tensor that "
                        "memory holds)")
    p.add_argument("--iters", type=int, default=30, help="timed forward passes per latency setting and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds (median of their medians)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=("lora", "full"), help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(a, a.child == "lora")), flush=True)
        return
    dev = torch.device(a.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    print(f"device {dev} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads; {a.arch} 32×32, "
          f"{a.steps} prune steps at batch {a.batch}, target {a.sparsity} of the prunable weights, synthetic data\n")
    res, files = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("lora", "full"):
            files[variant] = str(Path(tmp) / f"{variant}.pt")
            cmd = [sys.executable, __file__, "--child", variant, "--save", files[variant],
                   *(argv if argv is not None else sys.argv[1:])]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                sys.exit(f"the {variant} run failed:\n{out.stderr[-3000:]}")
            res[variant] = json.loads(line[0][len("RESULT "):])
        lat = latencies(a, files)
    cuda = dev.type == "cuda"
    peak = "peak CUDA allocated, MB" if cuda else "peak RSS of the process, MB"
    rise = "above the allocation before the run, MB" if cuda else "rise above the RSS before the run, MB"
    rows = [("snapshots taken", "snapshots", "{:d}"),
            ("bytes held by the snapshots, MB", "snapshot_bytes", "mb"),
            ("bytes per snapshot, MB", "per_snapshot", "mb"),
            ("copies of each prunable weight at the end (distinct storages)", "copies", ""),
            ("weight storage held by the method at the end, MB (distinct storages)", "storage_bytes", "mb"),
            (f"prune stage: {peak}", "peak_bytes", "mb"),
            (f"prune stage: {rise}", "rise", "mb"),
            ("seconds per prune step", "per_step", "{:.3f}"),
            ("expected sparsity at the end of training", "expected_sparsity", "{:.3f}"),
            ("prunable weights removed by the export", "params_removed", "{:.3f}"),
            ("exported / dense MACs", "macs_ratio", "{:.3f}")]
    print("| | one frozen copy + adapters (`lora=true`) | full weight copy per snapshot (`lora=false`) |")
    print("|---|---|---|")
    for label, key, f in rows:
        cells = []
        for v in ("lora", "full"):
            r = res[v]
            if key == "copies":
                cells.append(str(r["weight_copies_min"]) if r["weight_copies_min"] == r["weight_copies_max"]
                             else f"{r['weight_copies_min']}–{r['weight_copies_max']}")
                continue
            x = {"rise": r["peak_bytes"] - r["before_bytes"], "per_step": r["prune_seconds"] / r["steps"],
                 "per_snapshot": r["snapshot_bytes"] / r["snapshots"] if r["snapshots"] else None}.get(key, r.get(key))
            cells.append("—" if x is None else f"{x / MB:,.1f}" if f == "mb" else f.format(x))
        print(f"| {label} | " + " | ".join(cells) + " |")
    mode = "bf16, channels_last" if cuda else "fp32"
    print(f"\nLatency, median ms, eager, {mode}: {a.rounds} interleaved rounds of {a.iters} timed passes after 10 "
          "warm-up, the median of the rounds' medians, one process:\n")
    print(f"| model | MACs | batch 1 ms | speed-up | batch {a.batch} ms | speed-up |")
    print("|---|---|---|---|---|---|")
    d = lat["dense"]
    print(f"| dense {a.arch} | 1.00× | {d[1]:.2f} | 1.00× | {d[a.batch]:.2f} | 1.00× |")
    for v, label in (("lora", "exported, lora=true"), ("full", "exported, lora=false")):
        e = lat[v]
        print(f"| {label} | {res[v]['macs_ratio']:.2f}× | {e[1]:.2f} | {d[1] / e[1]:.2f}× | {e[a.batch]:.2f} | "
              f"{d[a.batch] / e[a.batch]:.2f}× |")

if __name__ == "__main__":
    main()
