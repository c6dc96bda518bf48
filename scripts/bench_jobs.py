"""Many jobs on one GPU: aggregate training throughput of N kdprune jobs running at once on one GPU through Ray.

For each N in ``--jobs`` (default 1, 2, 4, 8) the script runs one sweep of N jobs that differ only in their seed
(``seed=a,...,a+N-1``, below) through kdprune's Ray launcher preset (``hydra/launcher=kdprune_ray``,
docs/sweeps.md) on a local Ray instance that has one GPU (``ray.init.num_gpus=1``), each job asking for ``ray.remote.num_gpus=1/N``,
so Ray starts all N at once on that GPU. With ``--mps`` it runs the same sweeps again under CUDA MPS, whose
daemon the script starts (``nvidia-cuda-mps-control -d``, pipe and log folders in its temp folder) and stops at
the end; when MPS cannot start or a CUDA client cannot connect to it, the table says so and the script goes on.

The jobs: ``experiment=quickstart`` (CA-KLD at quickstart scale, ``budget=quick``: 3 fine-tuning and 15 KD
retraining epochs at batch 64) on ``dataset=cifar10`` with the ResNet-32 teacher and ResNet-20 student of the
CIFAR zoo, ``amp=true compile=true`` on CUDA. The machine needs no internet: the script writes a synthetic
CIFAR-10 (random images and labels, ``--images`` training and ``--images``/5 test images) in the real on-disk
format (``cifar-10-batches-py``: five pickled data batches, ``test_batch``, ``batches.meta``) to a temp folder,
read with ``data.verify_checksums=false``. Random data trains at the same speed as real data.

What is timed: the teacher and dense student are shared by every job (``seed`` is the method's seed, not
theirs), so one warm-up job (not timed) trains them (``--dense-epochs`` each: their accuracy does not matter
here), builds the data cache and fills torch.compile's cache, all in one store that every sweep then reads.
Every job of every sweep has a seed no other job had, so none finds its own stages in the store (CA-KLD's
fine-tuned student is a store artifact per seed): each job scores, fine-tunes, prunes, retrains and evaluates.
A sweep's time is its wall time, from starting kdprune to its exit: Ray's start, the jobs' start-up,
compilation (from the warm cache) and evaluation are in it, as in any real sweep.

Columns: **wall s** the sweep's wall time; **aggregate img/s** the images every job's stages trained or scored
(the records' ``cost.stages.*.samples``, docs/record.md; the teacher's forward passes in distillation are not
counted) summed over the jobs, over the wall time; **× one job** that over the aggregate of the one-job sweep
without MPS; **per-job img/s** the mean over the jobs of a job's samples over its own ``cost.total_seconds``;
**peak GPU memory** the most ``nvidia-smi`` saw used on the GPU during the sweep (sampled every 0.5 s; the whole
device), or, without nvidia-smi, the sum over the jobs of their stages' largest torch allocation.

    python scripts/bench_jobs.py                          # CUDA + Ray: N = 1, 2, 4, 8 (jobs of about a minute alone
                                                          # on an H100: an estimate, not yet measured)
    python scripts/bench_jobs.py --mps --out jobs.md      # and the same under CUDA MPS; the table also to jobs.md
    python scripts/bench_jobs.py --device cpu --quick     # any machine with Ray: N = 1, 2, tiny jobs, minutes

Needs the Ray extra (``pip install -c constraints.txt -e '.[ray]'``); with ``--device cuda`` (the default) it
refuses to start without a visible GPU.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

KDPRUNE = [sys.executable, "-m", "kdprune_cli.cli.main"]
MPS_CONTROL = "nvidia-cuda-mps-control"


def write_cifar10(root: Path, train: int, test: int, seed: int = 0) -> None:
    """Random images and labels in CIFAR-10's python format under ``root/cifar-10-batches-py``."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(n: int, label: str) -> dict:
        return {"batch_label": label, "labels": rng.integers(0, 10, n).tolist(),
                "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                "filenames": [f"{label}_{i}.png" for i in range(n)]}

    files = {f"data_batch_{i + 1}": batch(len(part), f"training batch {i + 1} of 5")
             for i, part in enumerate(np.array_split(np.arange(train), 5))}
    files["test_batch"] = batch(test, "testing batch 1 of 1")
    files["batches.meta"] = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": train // 5,
                             "num_vis": 3072}
    for name, obj in files.items():
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f)


def job_overrides(args, data_root: Path, store: Path) -> list[str]:
    """The kdprune overrides every job shares (the warm-up job and the sweeps' jobs)."""
    o = ["experiment=quickstart", "dataset=cifar10", f"data.root={data_root}", "data.verify_checksums=false",
         f"teacher={args.teacher}", f"student={args.student}", f"device={args.device}", f"amp={args.amp}",
         f"compile={args.compile}", f"store.root={store}", "logger=none", "progress=false", "print_config=false",
         f"teacher.train.epochs={args.dense_epochs}", f"student.train.epochs={args.dense_epochs}"]
    if args.retrain_epochs is not None:
        o.append(f"method.retrain.epochs={args.retrain_epochs}")
    if args.max_batches is not None:
        o.append(f"max_batches={args.max_batches}")
    return o


def run(cmd: list[str], env: dict, timeout: float) -> tuple[int, str, float]:
    """Run ``cmd`` in its own process group (killed whole on timeout): (exit status, output tail, seconds)."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        out += f"\n(killed after {timeout:.0f} s)"
    return p.returncode, out[-3000:], time.perf_counter() - t


class PeakMemory(threading.Thread):
    """The most memory ``nvidia-smi`` reports used on GPU ``index`` (MiB), sampled every 0.5 s until stopped."""

    def __init__(self, index: str):
        super().__init__(daemon=True)
        self.index, self.peak, self.done = index, None, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            try:
                r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                    "-i", self.index], capture_output=True, text=True, timeout=10)
                self.peak = max(self.peak or 0, int(r.stdout.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass

    def stop(self):
        self.done.set()
        self.join()
        return self.peak


def sweep(args, n: int, seed: int, common: list[str], tmp: Path, env: dict, tag: str) -> dict:
    """One sweep of ``n`` jobs at once, seeds ``seed``...; its wall time, records and peak GPU memory."""
    out = tmp / f"sweep{tag}_{n}"
    on_gpu = args.device == "cuda"
    cmd = [*KDPRUNE, "-m", "hydra/launcher=kdprune_ray", f"hydra.launcher.ray.remote.num_gpus={1 / n if on_gpu else 0}",
           f"hydra.launcher.ray.init.num_gpus={1 if on_gpu else 0}", "+hydra.launcher.ray.init.include_dashboard=false",
           f"hydra.sweep.dir={out}", "seed=" + ",".join(str(s) for s in range(seed, seed + n)), *common]
    if args.ray_cpus is not None:
        cmd.append(f"hydra.launcher.ray.init.num_cpus={args.ray_cpus}")
    poll = None
    if on_gpu and shutil.which("nvidia-smi"):
        poll = PeakMemory(env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0")
        poll.start()
    rc, tail, wall = run(cmd, env, args.timeout)
    peak = poll.stop() if poll else None
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/results.json"))]
    return {"n": n, "tag": tag, "rc": rc, "tail": tail, "wall": wall, "peak_mib": peak,
            "ok": [r for r in records if r.get("status") == "ok"]}


def job_samples(rec: dict) -> int:
    """Images the job's stages trained or scored (a stored artifact it read adds none)."""
    return sum(int(s.get("samples") or 0) for s in rec["cost"]["stages"].values())


def row(res: dict, base) -> str:
    """The table's row of one sweep; ``base``: the one-job sweep's aggregate img/s (None before it has one)."""
    label = f"{res['n']}{' (MPS)' if res['tag'] else ''}"
    agg = aggregate(res)
    if agg is None:
        return (f"| {label} | {res['wall']:.1f} | failed: {len(res['ok'])} of {res['n']} jobs ok "
                f"(exit {res['rc']}) | | | |")
    per_job = sum(job_samples(r) / r["cost"]["total_seconds"] for r in res["ok"]) / res["n"]
    if res["peak_mib"] is not None:
        mem = f"{res['peak_mib'] / 1024:.1f} GiB"
    else:
        torch_peaks = [max([s.get("peak_memory_bytes") or 0 for s in r["cost"]["stages"].values()] or [0])
                       for r in res["ok"]]
        mem = f"{sum(torch_peaks) / 2 ** 30:.1f} GiB (Σ torch)" if any(torch_peaks) else "-"
    times = f"{agg / base:.2f}" if base else "-"
    return f"| {label} | {res['wall']:.1f} | {agg:,.0f} | {times} | {per_job:,.0f} | {mem} |"


def aggregate(res: dict):
    """Images per second of wall time over all the sweep's jobs; None when some job did not finish ok."""
    return sum(job_samples(r) for r in res["ok"]) / res["wall"] if len(res["ok"]) == res["n"] else None


def start_mps(tmp: Path, env: dict) -> tuple[dict | None, str]:
    """Start an MPS daemon with its own pipe/log folders; the environment its clients need, or why not."""
    if not shutil.which(MPS_CONTROL):
        return None, f"{MPS_CONTROL} not found"
    mps_env = {**env, "CUDA_MPS_PIPE_DIRECTORY": str(tmp / "mps-pipe"), "CUDA_MPS_LOG_DIRECTORY": str(tmp / "mps-log")}
    for key in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
        Path(mps_env[key]).mkdir(parents=True, exist_ok=True)
    r = subprocess.run([MPS_CONTROL, "-d"], env=mps_env, capture_output=True, text=True, timeout=60)
    if r.returncode:
        return None, f"{MPS_CONTROL} -d failed: {(r.stderr or r.stdout).strip()[:200]}"
    probe = [sys.executable, "-c", "import torch; torch.ones(1, device='cuda').sum().item()"]
    rc, tail, _ = run(probe, mps_env, 300)
    if rc:
        stop_mps(mps_env)
        return None, f"a CUDA client could not use MPS: {tail.strip().splitlines()[-1][:200] if tail.strip() else rc}"
    return mps_env, ""


def stop_mps(mps_env: dict) -> None:
    subprocess.run([MPS_CONTROL], input="quit\n", env=mps_env, capture_output=True, text=True, timeout=60)


def gpu_name(env: dict) -> str:
    rc, out, _ = run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0))"], env, 300)
    return out.strip().splitlines()[-1] if rc == 0 and out.strip() else "CUDA GPU"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--jobs", default=None, help="comma list of jobs per GPU (default 1,2,4,8; --quick: 1,2)")
    ap.add_argument("--mps", action="store_true", help="also run every N under CUDA MPS (started and stopped here)")
    ap.add_argument("--images", type=int, default=None, help="synthetic CIFAR-10 training images (default 10000)")
    ap.add_argument("--teacher", default="resnet32")
    ap.add_argument("--student", default="resnet20")
    ap.add_argument("--dense-epochs", type=int, default=None,
                    help="epochs of the shared teacher and dense student (warm-up, not timed; default 3)")
    ap.add_argument("--retrain-epochs", type=int, default=None,
                    help="the method's retraining epochs (default: the quickstart budget's, 15)")
    ap.add_argument("--max-batches", type=int, default=None, help="at most this many batches per training epoch")
    ap.add_argument("--amp", choices=["true", "false"], default=None, help="bf16 autocast (default: true on CUDA)")
    ap.add_argument("--compile", choices=["true", "false", "auto", "step"], default=None,
                    help="the jobs' compile setting (default: true on CUDA, false on CPU)")
    ap.add_argument("--ray-cpus", type=int, default=None,
                    help="CPUs of the local Ray instance (default: all; CPU: 2)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds after which a sweep is killed")
    ap.add_argument("--quick", action="store_true",
                    help="prove it runs: 320 images, 1-epoch dense models and retraining, 2 batches an epoch")
    ap.add_argument("--out", metavar="FILE", help="also write the table to FILE")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (data, store, sweeps)")
    args = ap.parse_args()
    cpu = args.device == "cpu"
    args.jobs = [int(n) for n in (args.jobs or ("1,2" if args.quick else "1,2,4,8")).split(",")]
    args.images = args.images or (320 if args.quick else 10000)
    args.dense_epochs = args.dense_epochs or (1 if args.quick else 3)
    if args.quick:
        args.retrain_epochs = args.retrain_epochs or 1
        args.max_batches = args.max_batches or 2
    args.amp = args.amp or ("false" if cpu else "true")
    args.compile = args.compile or ("false" if cpu else "true")
    if cpu and args.ray_cpus is None:
        args.ray_cpus = 2
    return args


def refuse(msg: str) -> None:
    print(f"bench_jobs: error: {msg}", file=sys.stderr)
    sys.exit(2)


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def check(args) -> None:
    """One line and exit 2 when the benchmark cannot run here."""
    missing = [m for m in ("ray", "hydra_plugins.hydra_ray_launcher") if not installed(m)]
    if missing:
        refuse(f"{', '.join(missing)} not installed: pip install -c constraints.txt -e '.[ray]'")
    if args.device == "cuda" and not torch.cuda.is_available():
        refuse("no GPU visible (--device cpu --quick runs it on the CPU)")
    if args.mps and args.device != "cuda":
        refuse("--mps needs --device cuda")


def measure(args, common: list[str], tmp: Path, env: dict) -> list[str]:
    """Every sweep (and, with --mps, every sweep again under MPS); the table's rows and notes, printed as they come."""
    results, lines = [], []
    modes = [("", env)]
    if args.mps:
        mps_env, why = start_mps(tmp, env)
        if mps_env is None:
            lines.append(f"| MPS | not measured: {why} | | | | |")
            print(lines[-1], flush=True)
        else:
            modes.append(("mps", mps_env))
    try:
        for tag, mode_env in modes:
            for n in args.jobs:
                res = sweep(args, n, sum(r["n"] for r in results), common, tmp, mode_env, tag)
                results.append(res)
                base = next((aggregate(r) for r in results if r["n"] == 1 and not r["tag"]), None)
                lines.append(row(res, base))
                print(lines[-1], flush=True)
                if len(res["ok"]) != n:
                    print(res["tail"], file=sys.stderr)
    finally:
        if len(modes) > 1:
            stop_mps(modes[1][1])
    return lines


def main() -> None:
    args = parse_args()
    check(args)
    tmp = Path(tempfile.mkdtemp(prefix="kdprune-bench-jobs-"))
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}  # a local instance, no telemetry
    try:
        write_cifar10(tmp / "data", args.images, max(64, args.images // 5))
        common = job_overrides(args, tmp / "data", tmp / "store")
        rc, tail, warm = run([*KDPRUNE, *common, "seed=1000000", f"hydra.run.dir={tmp / 'warmup'}"], env, args.timeout)
        if rc:
            print(f"bench_jobs: the warm-up job failed (exit {rc}):\n{tail}", file=sys.stderr)
            sys.exit(1)
        device = gpu_name(env) if args.device == "cuda" else "cpu"
        lines = [f"kdprune jobs per GPU through Ray, {device}, torch {torch.__version__}, "
                 f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {args.images} synthetic "
                 f"CIFAR-10 images, {args.teacher} → {args.student} CA-KLD quickstart jobs, amp={args.amp} "
                 f"compile={args.compile}; warm-up job (shared teacher and dense student, data cache, compile "
                 f"cache; not timed) {warm:.0f} s", "",
                 "| jobs per GPU | wall s | aggregate img/s | × one job | per-job img/s | peak GPU memory |",
                 "|---:|---:|---:|---:|---:|---:|"]
        print("\n".join(lines), flush=True)
        lines += measure(args, common, tmp, env)
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
