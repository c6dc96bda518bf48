"""One job: config → data → teacher → dense student → method (score, prune, retrain) → evaluate → record.

A method sees a :class:`~kdprune_cli.experiment.services.Context` and returns a
:class:`~kdprune_cli.pruning.methods.base.Result`. :func:`run_job` validates everything first, then writes
``results.json`` atomically, last (``status: failed`` with the error when anything raises).
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from kdprune_cli.config.schema import model_kwargs
from kdprune_cli.data import load_data
from kdprune_cli.errors import DivergedError, non_finite_metrics
from kdprune_cli.experiment.identity import content_ids, job_id, versions
from kdprune_cli.experiment.loggers import RunLogger
from kdprune_cli.experiment.record import base_record, complete_record, print_summary
from kdprune_cli.experiment.reuse import describe_model_file, reuse
from kdprune_cli.experiment.services import Context, Costs
from kdprune_cli.experiment.signals import signals_interrupt
from kdprune_cli.experiment.threads import apply_threads
from kdprune_cli.experiment.validate import check_overrides, error_line, resolve_device, validate
from kdprune_cli.log import warn
from kdprune_cli.models.masks import assert_masked, sparsity_report
from kdprune_cli.models.modelfile import model_file
from kdprune_cli.pruning.methods import get_method
from kdprune_cli.store.atomic import atomic_save, atomic_write_json, check_writable, clean_orphans
from kdprune_cli.training.evaluate import count_flops, latency_record


def job_dir(cfg: DictConfig, job_id: str) -> Path:
    """Where a job keeps its training checkpoints and, once finished, a copy of its record."""
    return Path(cfg.store.root) / "jobs" / job_id


def _finished_record(cfg: DictConfig, jid: str) -> Optional[dict]:
    """The stored record of a finished job with this identity, if any (a damaged one is discarded), with
    ``reused_from``: where it was read."""
    done = job_dir(cfg, jid) / "results.json"
    if not (cfg.resume and cfg.store.enabled and done.is_file()):
        return None
    try:
        previous = json.loads(done.read_text())
        if not isinstance(previous, dict) or "status" not in previous:
            raise ValueError("not a record")
    except (ValueError, OSError) as e:
        warn(f"{done} is damaged ({type(e).__name__}); discarded, the job runs again")
        done.unlink(missing_ok=True)
        return None
    return {**previous, "reused_from": str(done)} if previous["status"] == "ok" else None


def run_job(cfg: DictConfig, run_dir: Path, group: str = "single", summary: bool = True,
            overrides=(), on_valid: Optional[Callable[[], None]] = None) -> dict:
    """Run one job and write ``results.json`` into ``run_dir`` (also on failure). Returns the record.

    The run folder's record is written last, after the store copy, the checkpoint clean-up and the logger
    have finished, so ``status: ok`` on disk means everything succeeded. Bad input (``overrides`` are the
    command-line overrides) raises :class:`~kdprune_cli.config.schema.ConfigError` before any data is read or
    any training runs; ``on_valid()`` is called once the config has passed validation (the CLI prints the
    config tree there).
    """
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    record = base_record(cfg)
    running = SimpleNamespace(logger=None, ctx=None)  # what the job has opened, for the record of a failure
    with signals_interrupt():
        try:
            method, device = _prepare(cfg, run_dir, record, overrides, on_valid)
            previous = _finished_record(cfg, record["job_id"])
            # a finished job is not run again: its model and results are reused
            reused = previous and reuse(cfg, previous, Path(previous["reused_from"]), run_dir, group, t_start)
            if reused:
                record = reused
            else:
                _execute(cfg, method, device, record, run_dir, group, t_start, running)
        except BaseException as e:  # also KeyboardInterrupt and signals: the record says the job did not finish
            record["status"] = "failed"
            record["error"] = error_line(e)
            complete_record(record, cfg, running.ctx, t_start)
            if running.logger is not None:
                with contextlib.suppress(Exception):
                    running.logger.finish(record)
            with contextlib.suppress(OSError):  # an unwritable run folder cannot take the record either
                atomic_write_json(record, run_dir / "results.json")
            raise
        atomic_write_json(record, run_dir / "results.json")
    if summary:
        print_summary(record, run_dir)
    return record


def _prepare(cfg: DictConfig, run_dir: Path, record: dict, overrides, on_valid) -> tuple:
    """Validate the config and the method, check the folders, name the job; returns ``(method, device)``."""
    check_overrides(overrides)
    validate(cfg)
    method = get_method(cfg.method.name)(cfg.method)
    record["method_variant"] = method.variant()
    device = resolve_device(cfg.device)
    if on_valid is not None:
        on_valid()
    check_writable(run_dir)
    if cfg.store.enabled:
        check_writable(Path(cfg.store.root))
        clean_orphans(cfg.store.root)
    record["job_id"] = job_id(cfg, content_ids(cfg))
    return method, device


def _execute(cfg: DictConfig, method, device: torch.device, record: dict, run_dir: Path, group: str,
             t_start: float, running: SimpleNamespace) -> None:
    """Run the job itself; its record (``status: ok``) goes to the store too, its training checkpoints go."""
    running.logger = _start(cfg, run_dir, group, device, record)
    jd = job_dir(cfg, record["job_id"]) if cfg.store.enabled and cfg.resume else None  # its training checkpoints
    costs = Costs(device=device)
    with costs.stage("data"):
        data = load_data(cfg.data, device)
    running.ctx = Context(cfg, data, device, log=running.logger.log, costs=costs, checkpoints=jd)
    _run(running.ctx, method, record, run_dir)
    complete_record(record, cfg, running.ctx, t_start)
    if jd is not None:
        atomic_write_json(record, jd / "results.json")
        for ck in jd.glob("*.pt"):  # the record is kept; the training checkpoints are not needed
            ck.unlink()
    running.logger.finish(record)
    running.logger = None


def _start(cfg: DictConfig, run_dir: Path, group: str, device: torch.device, record: dict) -> RunLogger:
    record["versions"] = versions()
    record["threads"] = apply_threads(cfg.get("threads", "auto"))
    record["device"] = str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})"
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    logger = RunLogger(cfg, run_dir, record["job_id"], group)
    if logger.wandb_info:
        record["wandb"] = logger.wandb_info
    return logger


def _run(ctx: Context, method, record: dict, run_dir: Path) -> None:
    """Teacher → dense student → the method → evaluate; fills ``record`` (status ``ok`` at the end)."""
    cfg, data = ctx.cfg, ctx.data
    record["retrain_kd"] = method.retrain_kd
    art, ev, exclude = ctx.artifacts, ctx.evaluator, ctx.pruner.exclude
    art.teacher()
    art.dense_student()
    for role in ("teacher", "student"):
        ev.record_metrics("teacher" if role == "teacher" else "dense_student", None, cached=art.metrics[role])

    result = method.run(ctx)
    model, masks = result.model, result.masks
    assert_masked(model, masks)
    ev.record_metrics("final", model)
    bad = non_finite_metrics({**ev.metrics, **{f"{k} (val)": v for k, v in ev.metrics_val.items()}})
    if bad:  # never an ok record (or a saved model) with NaN metrics
        raise DivergedError(f"training diverged: the evaluation gave {', '.join(bad)}; lower the learning rate")
    dense = art.dense_student()
    sp = sparsity_report(model, exclude, reference=dense)
    shape = (data.channels, data.image_size, data.image_size)
    final_flops = count_flops(model, shape, exclude)
    record.update({
        "granularity": method.prunes or cfg.prune.granularity,
        "sparsity_actual": sp["global"],
        "sparsity_per_layer": sp["per_layer"],
        "params": {"prunable": sp["prunable"], "nonzero": sp["nonzero"],
                   "total": sum(p.numel() for p in model.parameters()),
                   "total_dense": sum(p.numel() for p in dense.parameters())},
        # MACs for one input (Conv2d/Linear and attention's products): the dense student's, the final model's
        # with zero weights skipped, and the final model's as it runs (fewer only when channels were removed)
        "flops": {"dense": count_flops(dense, shape, exclude)["dense"], "sparse": final_flops["sparse"],
                  "executed": final_flops["dense"]},
    })
    if cfg.eval.latency:
        with ctx.costs.stage("latency"):
            record["latency"] = latency_record({"dense_student": dense, "final": model}, shape,
                                               int(cfg.eval.latency_batch), int(cfg.eval.latency_iters),
                                               cfg.eval.latency_compile)
    record.update(result.facts)
    _save_model(ctx, model, masks, run_dir)
    record["checkpoint"] = str(run_dir / "model.pt")
    record["model_file"] = describe_model_file(run_dir / "model.pt")  # path, bytes, sha256 (checked on reuse)
    record["status"] = "ok"


def _save_model(ctx: Context, model, masks: dict, run_dir: Path) -> None:
    """The final model as ``run_dir/model.pt``: weights, masks and what rebuilds it (architecture, data, widths)."""
    cfg, data = ctx.cfg, ctx.data
    arch = {"name": cfg.student.name, "num_classes": data.num_classes, "in_channels": data.channels,
            "image_size": data.image_size, "kwargs": model_kwargs(cfg.student)}
    atomic_save(model_file(model, arch, OmegaConf.to_container(cfg.data, resolve=True), masks, role="final",
                           granularity=cfg.prune.granularity, artifacts=ctx.artifacts.files,
                           teacher=cfg.teacher.name, teacher_kwargs=model_kwargs(cfg.teacher)), run_dir / "model.pt")
