"""The job's record: its fields before the job runs, what the services booked once it ends, and the summary the
command line prints."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from kdprune_cli.experiment.services import Context
from kdprune_cli.log import say, warn


def base_record(cfg: DictConfig) -> dict:
    """The record of a job that has not run yet: what the config names, the rest empty."""
    method = cfg.method
    retrain = method.get("retrain") or {}
    return {
        "status": "running", "error": None, "job_id": None,
        "dataset": cfg.data.name, "teacher": cfg.teacher.name, "student": cfg.student.name,
        "method": method.get("name"), "method_variant": None, "seed": cfg.seed, "sparsity_target": cfg.sparsity,
        "sparsity_actual": None, "retrain_kd": retrain.get("kd") if isinstance(retrain, DictConfig) else None,
        "metrics": {}, "params": {}, "flops": {}, "cost": {"stages": {}, "total_seconds": None},
        "versions": {}, "device": None,
    }


def complete_record(record: dict, cfg: DictConfig, ctx: Optional[Context], t_start: float) -> None:
    """Metrics and per-stage cost (from ``ctx``, when the job ran), total time and the config into ``record``."""
    if ctx is not None:
        record["metrics"] = ctx.evaluator.metrics
        if ctx.evaluator.metrics_val:
            record["metrics_val"] = ctx.evaluator.metrics_val
        optional = ("lock_wait_seconds", "compile_seconds", "recompiles", "fallbacks")  # shown when not 0
        record["cost"]["stages"] = {k: {kk: vv for kk, vv in asdict(v).items()
                                        if vv is not None and not (kk in optional and vv == 0)}
                                    for k, v in ctx.costs.stages.items()}
    record["cost"]["total_seconds"] = time.perf_counter() - t_start
    record["config"] = OmegaConf.to_container(cfg, resolve=False)


DEFAULT_TOLERANCE = 0.01  # how far the achieved fraction may miss the target where the record states no tolerance


def _frac(x) -> str:
    return "?" if not isinstance(x, (int, float)) else f"{x:.4f}"


def pruned_amount(record: dict) -> tuple[str, Optional[str]]:
    """The headline's account of what was pruned, in the unit that was asked for (``prune.target``: params or
    MACs; achieved vs target, the other unit beside it), and a warning line when the achieved fraction misses
    the target by more than the plan's ``tolerance`` (``structure.tolerance``; 0.01 where none is recorded)."""
    target = record.get("sparsity_target")
    st = record.get("structure") if isinstance(record.get("structure"), dict) else None
    if st is not None and st.get("target") in ("params", "macs") and isinstance(st.get("achieved"), (int, float)):
        kind, other = st["target"], "macs" if st["target"] == "params" else "params"
        asked = st.get("requested", target)
        unit = {"params": "params", "macs": "MACs"}
        text = (f"{unit[kind]} removed {_frac(st['achieved'])} (target {asked:g}), "
                f"{unit[other]} removed {_frac(st.get(f'{other}_removed'))}")
        got, tol = st["achieved"], st.get("tolerance", DEFAULT_TOLERANCE)
    else:  # weight granularity: the fraction of prunable weights that are zero
        kind, asked, got, tol = "params", target, record.get("sparsity_actual"), DEFAULT_TOLERANCE
        text = f"params pruned {_frac(got)} (target {asked:g})"
    warning = None
    if isinstance(got, (int, float)) and isinstance(asked, (int, float)) and abs(got - asked) > tol + 1e-9:
        warning = (f"asked for {asked:g} of the {kind} removed, got {got:.4f} ({got - asked:+.4f}, more than the "
                   f"tolerance {tol:.4f}); see `structure` in the record")
    return text, warning


def _cell(x, nd: int) -> str:
    """A summary cell: fixed decimals for ordinary values, 3 significant digits past 1e5 (never wider than 9)."""
    if not isinstance(x, (int, float)):
        return "—"
    return f"{x:.{nd}f}" if abs(x) < 1e5 else f"{x:.3g}"


def print_summary(record: dict, run_dir: Path) -> None:
    method = record["method"] + (f" [{record['method_variant']}]" if record.get("method_variant") else "")
    amount, warning = pruned_amount(record)
    lines = [f"kdprune: {method} on {record['dataset']} "
             f"({record['teacher']} → {record['student']}), {amount}, seed {record['seed']}"]
    lines.append(f"  {'':<14}{'top1':>9}{'top5':>10}{'nll':>10}{'ece':>10}")
    for k in ("teacher", "dense_student", "pruned", "final"):
        m = record["metrics"].get(k)
        if m:
            lines.append(f"  {k:<14}" + "".join(f" {_cell(m.get(c), nd):>{w - 1}}" for c, nd, w in
                                                (("top1", 2, 9), ("top5", 2, 10), ("nll", 3, 10), ("ece", 3, 10))))
    p, f = record["params"], record["flops"]
    line = f"  params {p['nonzero']:,}/{p['prunable']:,} non-zero · MACs {f['sparse']:,}/{f['dense']:,}"
    if record.get("granularity") == "channel":  # physically smaller: what it has and runs
        line += f" · {p['total']:,}/{p['total_dense']:,} parameters and {f['executed']:,} MACs as run"
    lines.append(line)
    cost = record["cost"]
    if cost.get("reused"):
        before = (cost.get("original") or {}).get("total_seconds")
        lines.append(f"  time {cost['total_seconds']:.1f}s (reused"
                     + (f"; the run that made it took {before:.1f}s)" if isinstance(before, (int, float)) else ")"))
    else:
        stages = ", ".join(f"{k} {v['seconds']:.1f}s{' (cached)' if v.get('cached') else ''}"
                           for k, v in cost["stages"].items())
        lines.append(f"  time {cost['total_seconds']:.1f}s: {stages}")
    if record.get("reused_from"):
        mf = record.get("model_file") or {}
        how = "linked" if mf.get("linked") else "copied"
        lines.append(f"  finished earlier with the same config ({record['reused_from']}); not run again: "
                     f"model.pt {how} from {mf.get('source')} (resume=false runs it anew)")
    lines.append(f"  record: {run_dir / 'results.json'}")
    say("\n".join(lines))
    if warning:
        warn(warning)
