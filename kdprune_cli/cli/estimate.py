"""``kdprune-estimate``: what a sweep will cost before it runs.

    kdprune-estimate experiment=paper_cifar10
    kdprune-estimate experiment=quickstart_sweep --jobs
    kdprune-estimate experiment=paper_cifar10 --rates rates_h100.json     # + GPU-hours at measured rates

The overrides are ``kdprune``'s (a sweep as ``kdprune -m`` takes it, or a preset's grid). Every job is composed
and validated as ``kdprune`` would (bad input: one line, exit 2) and its samples counted by stage without
running anything; see docs/estimate.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from kdprune_cli.cli.main import composition_error_line, config_dir, missing_config_line
from kdprune_cli.config.schema import ConfigError
from kdprune_cli.experiment.estimate import count_sweep, gpu_seconds, needed_rates, read_rates

DENSE = ("teacher", "student")  # the dense models' stages: a row of their own, shared by the sweep's jobs


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="kdprune-estimate",
        description="What a sweep will cost before it runs: its jobs' samples by stage, and GPU-hours from a "
                    "rates file.",
        epilog="Samples are those the records' cost.stages book (forward and backward through the trained or "
               "scored network; teacher samples: forward only). GPU-hours cover training and scoring, not "
               "evaluation. Details: docs/estimate.md.")
    ap.add_argument("overrides", nargs="*", help="kdprune overrides, e.g. experiment=paper_cifar10 seed=0,1")
    ap.add_argument("--rates", type=Path, metavar="FILE",
                    help="rates file of scripts/bench_train.py --rates (images/s by model), for GPU-hours")
    ap.add_argument("--jobs", action="store_true", help="also list every job's stages")
    return ap.parse_args(argv)


def rows(jobs: list, rates: Optional[dict]) -> list:
    """``(label, jobs, samples, teacher samples, seconds or None)``: the shared dense models, each method, the
    total. A method's row holds its jobs' own stages."""
    def row(label, n, js, keep=lambda stage: True):
        """The row of the stages ``keep`` picks (dense, the method's own, all); seconds None without a rate."""
        picked = [dataclasses.replace(j, stages={k: c for k, c in j.stages.items() if keep(k)}) for j in js]
        parts = [None] if rates is None else [gpu_seconds(j, rates) for j in picked]
        return (label, n, sum(j.total("samples") for j in picked), sum(j.total("teacher_samples") for j in picked),
                None if any(p is None for p in parts) else sum(parts))

    by_method: dict = defaultdict(list)
    for j in jobs:
        by_method[j.method].append(j)
    out = [row("dense teacher and student (shared)", "", jobs, lambda k: k in DENSE)]
    for method, js in by_method.items():
        label = method if all(j.counted for j in js) else f"{method} (not counted: dense models only)"
        out.append(row(label, len(js), js, lambda k: k not in DENSE))
    return out + [row("total", len(jobs), jobs)]


def report(jobs: list, rates: Optional[dict], list_jobs: bool, out=sys.stdout) -> None:
    pairs = ", ".join(sorted({f"{j.teacher} → {j.student}" for j in jobs}))
    print(f"kdprune-estimate: {len(jobs)} job{'s' if len(jobs) != 1 else ''} ({pairs}); samples as the records "
          "will book them, the store empty at the start", file=out)
    hours = f"hours ({rates.get('device', 'the rates file')})" if rates else "GPU-hours"
    print(f"\n| what | jobs | samples | teacher samples | {hours} |\n|---|---:|---:|---:|---:|", file=out)
    for label, n, s, t, sec in rows(jobs, rates):
        spent = "—" if sec is None else f"{sec / 3600:.2f}"
        print(f"| {label} | {n} | {s:,.0f} | {t:,.0f} | {spent} |", file=out)
    notes = sorted({f"{j.method}, stage {k}: {c.note}" for j in jobs for k, c in j.stages.items() if not c.exact})
    for line in notes:
        print(f"approximate: {line}", file=out)
    missing = sorted({f"{m} ({kind})" for j in jobs for kind, m in needed_rates(j) if not (rates or {}).get(kind, {}).get(m)})
    if rates is not None and missing:
        print(f"hours: the rates file has no rate for {', '.join(missing)}", file=out)
    if rates is None:
        print("GPU-hours: no rates file; measure one on the target GPU with "
              "`python scripts/bench_train.py --rates rates.json` and pass --rates rates.json", file=out)
    if list_jobs:
        print(file=out)
        for i, j in enumerate(jobs):
            stages = ", ".join(f"{k} {c.samples}+{c.teacher_samples}t" for k, c in j.stages.items())
            print(f"#{i} {' '.join(j.overrides)}: {stages or 'nothing to train'}", file=out)


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    try:
        rates = read_rates(args.rates) if args.rates else None
        report(count_sweep(config_dir(), args.overrides), rates, args.jobs)
        return 0
    except ConfigError as e:
        line = str(e)
    except (HydraException, OmegaConfBaseException) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        line = missing_config_line(e) or composition_error_line(e)
    print(f"kdprune-estimate: error: {line}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
