"""Hyper-parameter searches (a sweeper that optimises what each job returns, e.g. ``hparams_search=*_optuna``).

Each job returns the value of ``optimized_metric``, a dotted path into its record (default
``metrics_val.final.top1``: the final model's top-1 on the validation split held out of the training set).
A search refuses, in one line before any job runs, to select on a test-split metric (``metrics.*``) unless
``optimized_metric`` was set on the command line, and to select on ``metrics_val.*`` without a validation split.
At the end :func:`write_best` writes ``best.yaml`` beside the jobs: the best trial's overrides and its final
metrics on validation and test side by side.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf

from kdprune_cli.store.atomic import atomic_write, write_all

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
SPLITS = {"metrics": "test", "metrics_val": "val"}
STAGES = ("teacher", "dense_student", "pruned", "final")
BEST = "best.yaml"


def is_search(sweeper: Any) -> bool:
    """Whether a multirun's sweeper optimises the jobs' return values (any sweeper but Hydra's basic grid)."""
    return str((sweeper or {}).get("_target_") or BASIC_SWEEPER) != BASIC_SWEEPER


def objective(record: dict, path: str) -> Optional[float]:
    """What a job returns to the sweeper: the number at the record's dotted ``path`` (None, a failed trial, when
    there is none)."""
    v: Any = record
    for key in str(path).split("."):
        if not isinstance(v, dict) or key not in v:
            return None
        v = v[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def task_overrides(hydra: DictConfig) -> list:
    """The command line's overrides as written, from the ``hydra`` node (``teacher.checkpoint=${oc.env:X}`` stays
    a string; iterating Hydra's node would resolve it)."""
    return list(OmegaConf.to_container(hydra.overrides.task, resolve=False) or [])


def _key(override: str) -> str:
    return str(override).lstrip("+~").split("=", 1)[0]


def search_problem(config: DictConfig) -> Optional[str]:
    """Why a multirun's config must not start (one line), or None; checks only searches (see :func:`is_search`)."""
    hydra = config.hydra
    if not is_search(hydra.sweeper):
        return None
    metric = str(config.get("optimized_metric") or "")
    parts = metric.split(".")
    if len(parts) < 2 or not all(parts):
        return f"optimized_metric must be a dotted path into the record such as metrics_val.final.top1, got {metric!r}"
    if parts[0] in SPLITS and (len(parts) != 3 or parts[1] not in STAGES):
        return (f"optimized_metric={metric}: expected {parts[0]}.<stage>.<metric> with stage one of "
                f"{', '.join(STAGES)}")
    if parts[0] == "metrics" and "optimized_metric" not in map(_key, task_overrides(hydra)):
        return (f"optimized_metric={metric} is measured on the test split: a search selects on validation "
                f"(metrics_val.*, with data.val_split > 0); to select on the test split anyway, set "
                f"optimized_metric={metric} on the command line")
    if parts[0] == "metrics_val" and not float(config.data.val_split) > 0:
        return (f"optimized_metric={metric} needs data.val_split > 0 (a validation split held out of the "
                f"training set), got data.val_split={config.data.val_split}")
    direction = hydra.sweeper.get("direction")
    if direction is not None and not isinstance(direction, str):
        return f"optimized_metric is one number: hydra.sweeper.direction must be maximize or minimize, got {direction}"
    return None


def _pair(rec: dict, stage: str) -> dict:
    """``{metric: {val: x, test: y}}`` of one stage's numbers (only the splits the record has; the reliability
    bins stay in the records)."""
    out: dict = {}
    for key, split in (("metrics_val", "val"), ("metrics", "test")):
        for name, v in ((rec.get(key) or {}).get(stage) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(name, {})[split] = v
    return out


def _overrides(job: Path) -> list:
    f = job / ".hydra" / "overrides.yaml"
    try:
        return list(yaml.safe_load(f.read_text()) or [])
    except (OSError, yaml.YAMLError):
        return []


def best_trial(ok_jobs: list, metric: str, direction: str = "maximize") -> Optional[tuple]:
    """``(job folder, value, record)`` of the best ok job by ``metric`` (first in job order on ties), or None."""
    best = None
    for job in ok_jobs:
        rec = json.loads((Path(job) / "results.json").read_text())
        v = objective(rec, metric)
        if v is None or v != v:
            continue
        if best is None or (v > best[1] if direction == "maximize" else v < best[1]):
            best = (Path(job), v, rec)
    return best


def write_best(sweep_dir: Path, config: DictConfig, ok_jobs: list, n_failed: int) -> Optional[Path]:
    """Print the best trial of a search and write ``<sweep_dir>/best.yaml``; None when no trial has the metric."""
    metric = str(config.optimized_metric)
    direction = str(config.hydra.sweeper.get("direction") or "maximize")
    found = best_trial(ok_jobs, metric, direction)
    if found is None:
        print(f"kdprune: no trial recorded {metric}: no best trial")
        return None
    job, value, rec = found
    final, typed = _pair(rec, "final"), {_key(t) for t in task_overrides(config.hydra)}
    doc = {
        "optimized_metric": metric,
        "split": SPLITS.get(metric.split(".")[0], "record"),
        "direction": direction,
        "value": value,
        "job": job.name,
        "run_dir": str(job),
        "params": [o for o in _overrides(job) if _key(o) not in typed],  # the sampled ones
        "overrides": _overrides(job),  # all of the trial's overrides, the command line's included
        "final": final,  # metric: {val: ..., test: ...}
        "trials": {"ok": len(ok_jobs), "failed": n_failed},
    }
    path = Path(sweep_dir) / BEST
    data = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).encode("utf-8")
    atomic_write(path, lambda fd: write_all(fd, data))
    print(f"kdprune: best trial: job {job.name}, {metric} = {value:g} ({direction}, "
          f"{len(ok_jobs)} ok, {n_failed} failed)")
    print(f"  params: {' '.join(doc['params'])}")
    for name, both in final.items():
        print(f"  final {name}: " + " · ".join(f"{s} {both[s]:.4g}" for s in ("val", "test") if s in both))
    print(f"  {path}")
    return path
