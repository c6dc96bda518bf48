"""Hydra callback: before a run, check that its output folder can be written (one line and exit 2 if not), that
a local Ray instance can start the jobs it is given, and that a search selects on what it may
(:mod:`kdprune_cli.experiment.search`); after a multirun, say which jobs failed (exit non-zero if any did) and,
after a search, write the best trial's ``best.yaml``."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kdprune_cli.errors import storage_error
from kdprune_cli.experiment.search import is_search, search_problem, write_best
from kdprune_cli.store.atomic import check_writable


def sweep_status(sweep_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """``(ok job folders, [(failed or unfinished job folder, reason)])`` under a sweep folder."""
    ok, bad = [], []
    for job in sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir() and (p / ".hydra").is_dir()),
                      key=lambda p: (len(p.name), p.name)):
        rec = job / "results.json"
        if not rec.is_file():
            bad.append((job, "no results.json (killed or still running)"))
            continue
        r = json.loads(rec.read_text())
        if r.get("status") == "ok":
            ok.append(job)
        else:
            bad.append((job, r.get("error") or r.get("status")))
    return ok, bad


def check_output_folder(folder: str) -> None:
    """Create ``folder`` and write a probe file; an unwritable, full or impossible folder ends the program
    with one line and exit status 2 before Hydra or any job writes there."""
    try:
        check_writable(folder)
    except OSError as e:
        print(f"kdprune: error: {storage_error(e) or e}", file=sys.stderr)
        sys.exit(2)


def ray_gpu_problem(launcher: DictConfig) -> str | None:
    """Why a Ray launcher config could start no job (a local instance without the GPUs a job asks for), or None.

    Ray would otherwise wait for ever for a GPU that never comes. Only a local instance is checked
    (``ray.init.address`` null and no ``RAY_ADDRESS``): a cluster's GPUs are the cluster's business.
    """
    if "hydra_ray_launcher" not in str(launcher.get("_target_", "")):
        return None
    ray = launcher.get("ray") or {}
    init, remote = ray.get("init") or {}, ray.get("remote") or {}
    want = float(remote.get("num_gpus") or 0)
    if want <= 0 or init.get("address") not in (None, "", "local") or os.environ.get("RAY_ADDRESS"):
        return None
    have = init.get("num_gpus")
    if have is None:
        have = torch.cuda.device_count()
    if float(have) >= want:
        return None
    return (f"hydra.launcher.ray.remote.num_gpus={remote.get('num_gpus')} but the local Ray instance has "
            f"{have} GPU(s), so no job could start: set hydra.launcher.ray.remote.num_gpus=0 for CPU jobs, or "
            f"hydra.launcher.ray.init.address=auto (or ray://HOST:10001) for a cluster with GPUs")


class SweepSummary(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_output_folder(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        problem = search_problem(config)  # before anything is written
        if problem is None:
            check_output_folder(config.hydra.sweep.dir)
            problem = ray_gpu_problem(config.hydra.launcher)
        if problem is not None:
            print(f"kdprune: error: {problem}", file=sys.stderr)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        ok, bad = sweep_status(sweep_dir)
        print(f"kdprune: sweep {sweep_dir}: {len(ok)} ok, {len(bad)} failed")
        for job, why in bad:
            print(f"  failed: {job}: {why}", file=sys.stderr)
        if is_search(config.hydra.sweeper):
            try:
                write_best(sweep_dir, config, ok, len(bad))
            except Exception as e:  # the failed jobs above still decide the exit status
                print(f"kdprune: warning: best.yaml not written: {type(e).__name__}: {e}", file=sys.stderr)
        if bad:
            sys.exit(1)
