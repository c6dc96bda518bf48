"""Hydra entry point ``kdprune``.

``conf/`` sits at the repository root (editable installs read it there) and is shipped in the wheel as
``kdprune_cli/conf``. Bad input ends with one line on stderr and exit status 2; the run folder keeps a
``results.json`` with ``status: failed`` and the reason.
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .config import ConfigError, register
from .search import is_search, objective


def config_dir() -> str:
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "config.yaml").is_file():
            return str(cand)
    raise RuntimeError("kdprune: config folder not found (conf/config.yaml); reinstall the package")


def _group(cfg: DictConfig) -> str:
    if cfg.logger.group:
        return cfg.logger.group
    hc = HydraConfig.get()
    if hc.mode is not None and hc.mode.name == "MULTIRUN":
        p = Path(hc.sweep.dir)
        return f"{cfg.experiment or 'sweep'}-{p.parent.name}_{p.name}"
    return cfg.experiment or "single"


register()
from . import pruning  # noqa: E402,F401  each method registers its typed config (method/<name>_schema)


STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR,
                  errno.EEXIST, errno.EISDIR}


def storage_error(e: BaseException) -> Optional[str]:
    """One line for a folder or disk that cannot take our files (full, read-only, not a folder), else None."""
    if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
        where = f" {e.filename}" if e.filename else ""
        return f"cannot write{where}: {e.strerror or os.strerror(e.errno)}"
    return None


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    """Run one job; returns the record's ``optimized_metric`` (default: the final top-1 on the validation split),
    the objective a search such as Optuna's optimises, or None (a failed trial) when the job failed or the
    record has no such number."""
    from .data import DataError
    from .runner import CheckpointError, Interrupted, run_job

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode is not None and hc.mode.name == "MULTIRUN"
    try:
        if cfg.print_config:
            from .printing import print_config
            print_config(cfg)
        if cfg.detect_anomaly:
            import torch
            torch.autograd.set_detect_anomaly(True)
            print("kdprune: autograd anomaly detection is on (slower; a NaN in backward names its forward op)",
                  file=sys.stderr)
        record = run_job(cfg, run_dir, group=_group(cfg), overrides=list(hc.overrides.task))
        value = objective(record, cfg.optimized_metric)
        if value is None and multirun and is_search(hc.sweeper):
            print(f"kdprune: job {hc.job.num}: the record has no number at optimized_metric={cfg.optimized_metric}; "
                  "the trial counts as failed", file=sys.stderr)
        return value
    except Interrupted as e:  # the record says failed, the last checkpoint is kept; rerun to resume
        print(f"kdprune: {e}; rerun the same command to resume", file=sys.stderr)
        sys.exit(128 + e.signum)
    except Exception as e:
        line = str(e) if isinstance(e, (ConfigError, DataError, CheckpointError)) else storage_error(e)
        if multirun and not cfg.fail_fast:  # the record says failed; the sweep goes on
            print(f"kdprune: job {hc.job.num} failed: {line or f'{type(e).__name__}: {e}'}", file=sys.stderr)
            return None
        if line is not None:
            print(f"kdprune: error: {line}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main()
