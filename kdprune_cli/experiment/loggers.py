"""Per-epoch metrics: ``metrics.jsonl`` always, ``metrics.csv`` with ``logger=csv``, W&B with ``logger=wandb``.

W&B (DESIGN.md): one run per job, ``group`` = the sweep or experiment, ``job_type`` = the method, the
deterministic job id as run id with ``resume="allow"``, the resolved config, per-epoch curves, the record
as summary, and ``finish(exit_code=1)`` when the job failed. ``logger.mode=offline`` needs no network.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from kdprune_cli.log import note, say


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def start_wandb(cfg: DictConfig, run_dir: Path, job_id: str, group: str, run_id: Optional[str] = None):
    """``wandb.init`` without W&B's banner lines (``WANDB_SILENT``, ``Settings(silent=True)``; set
    ``WANDB_SILENT=false`` to see them); kdprune prints one line naming the run instead."""
    if not os.environ.get("WANDB_SILENT"):
        os.environ["WANDB_SILENT"] = "true"
    import wandb

    lc = cfg.logger
    quiet = os.environ["WANDB_SILENT"].lower() in ("true", "1", "yes", "on")
    run = wandb.init(
        project=lc.project, entity=lc.entity, group=lc.group or group, job_type=cfg.method.name,
        id=run_id or job_id, resume="allow", mode=lc.mode, dir=str(run_dir), tags=list(lc.tags),
        name=f"{cfg.method.name}-s{cfg.sparsity}-seed{cfg.seed}-{job_id[:6]}",
        config=OmegaConf.to_container(cfg, resolve=True), settings=wandb.Settings(silent=quiet))
    if run is not None:
        where = getattr(run, "url", None) or str(Path(run.dir).parent)
        say(f"kdprune: W&B run {run.name} ({lc.mode}, project {lc.project}, group {lc.group or group}): {where}")
    return run


class RunLogger:
    def __init__(self, cfg: DictConfig, run_dir: Path, job_id: str, group: str, run_id: Optional[str] = None):
        """``run_id``: the W&B run id (default ``job_id``; a reused job has its own, see ``reuse.wandb_run_id``)."""
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.jsonl.write_text("")
        self.rows: list[dict] = []
        self.csv = cfg.logger.name == "csv"
        self.wandb_run = None
        self.wandb_info = None
        if cfg.logger.name == "wandb":
            self.wandb_run = start_wandb(cfg, run_dir, job_id, group, run_id)
            lc = cfg.logger
            self.wandb_info = {"project": lc.project, "group": lc.group or group, "id": run_id or job_id,
                               "mode": lc.mode}

    def log(self, rec: dict) -> None:
        note(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.rows.append(rec)
        if self.csv:
            keys = list(dict.fromkeys(k for r in self.rows for k in r))
            with open(self.run_dir / "metrics.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(self.rows)
        if self.wandb_run is not None:
            stage = rec.get("stage", "run")
            # no explicit step: a resumed run (same id, resume="allow") continues after its last step
            self.wandb_run.log({f"{stage}/{k}": v for k, v in rec.items() if k != "stage"})

    def finish(self, record: dict) -> None:
        if self.wandb_run is None:
            return
        flat = {k: v for k, v in _flatten({kk: vv for kk, vv in record.items() if kk != "config"}).items()
                if isinstance(v, (int, float, str, bool)) or v is None}
        self.wandb_run.summary.update(flat)
        self.wandb_run.finish(exit_code=0 if record["status"] == "ok" else 1)
        self.wandb_run = None
