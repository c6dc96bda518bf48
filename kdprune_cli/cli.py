"""Hydra entry point ``kdprune``.

``conf/`` sits at the repository root (editable installs read it there) and is shipped in the wheel as
``kdprune_cli/conf``. Bad input ends with one line on stderr and exit status 2; the run folder keeps a
``results.json`` with ``status: failed`` and the reason.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .config import ConfigError, register


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


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    """Run one job; returns the final top-1 (the objective a sweeper such as Optuna maximises)."""
    from .data import DataError
    from .runner import CheckpointError, run_job

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode is not None and hc.mode.name == "MULTIRUN"
    try:
        record = run_job(cfg, run_dir, group=_group(cfg))
        return record["metrics"]["final"]["top1"]
    except (ConfigError, DataError, CheckpointError) as e:
        if multirun and not cfg.fail_fast:  # the record says failed; the sweep goes on
            print(f"kdprune: job {hc.job.num} failed: {e}", file=sys.stderr)
            return None
        print(f"kdprune: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if multirun and not cfg.fail_fast:
            print(f"kdprune: job {hc.job.num} failed: {type(e).__name__}: {e}", file=sys.stderr)
            return None
        raise


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main()
