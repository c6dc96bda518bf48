"""A job met again after it finished (same job id, ``resume=true``): its run folder is made complete without
training anything.

The finished job's model file (named by the store's copy of its record, ``<store>/jobs/<id>/results.json``)
is checked against that record (size and sha256) and placed in the new run folder as ``model.pt`` (a hard
link where both sit on one filesystem, else a copy whose sha256 is checked). The new folder gets its own record: the earlier record's results with this run's config
and paths, ``reused_from`` (the store record read) and the cost booked as reused (``cost.reused: true``,
``cost.original`` = what the earlier run cost, ``cost.total_seconds`` = this process's seconds), and its own
logger run (``metrics.jsonl``, ``metrics.csv``, a W&B run in this run's group) replaying the earlier
per-epoch lines. A model file that is gone or does not match its record is not reused: the job runs anew.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from kdprune_cli.experiment.loggers import RunLogger
from kdprune_cli.experiment.record import complete_record
from kdprune_cli.log import warn
from kdprune_cli.store.atomic import atomic_create
from kdprune_cli.store.digests import config_hash, sha256_file

MODEL = "model.pt"


def describe_model_file(path: Path) -> dict:
    """The record's ``model_file``: path, size and sha256 of the file's bytes."""
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def usable_model(previous: dict) -> tuple[Optional[Path], Optional[str], str]:
    """``(path, sha256, "")`` of the finished job's model file when it is there and matches its record (size and
    sha256), else ``(None, None, why not)``."""
    mf = previous.get("model_file") if isinstance(previous.get("model_file"), dict) else {}
    if not mf.get("path"):
        return None, None, "its record names no model file"
    path = Path(mf["path"])
    if not path.is_file():
        return None, None, f"its model file {path} is gone"
    size = path.stat().st_size
    if mf.get("bytes") is not None and size != mf["bytes"]:
        return None, None, f"its model file {path} has {size} bytes, its record says {mf['bytes']}"
    if not mf.get("sha256"):
        return None, None, f"its record has no sha256 of its model file {path}"
    if sha256_file(path) != mf["sha256"]:
        return None, None, f"its model file {path} does not have the sha256 its record says"
    return path, mf["sha256"], ""


def place_model(src: Path, run_dir: Path, digest: Optional[str]) -> dict:
    """``run_dir/model.pt`` with the bytes of ``src``: a hard link where possible, else a copy; checked by size
    and sha256 (against ``digest``, the source's, when known). Returns the record's ``model_file``."""
    def link_or_copy(tmp: Path) -> None:
        try:
            os.link(src, tmp)
        except OSError:  # another filesystem, or links not allowed: a copy
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())

    dst = run_dir / MODEL
    if not (dst.exists() and os.path.samefile(src, dst)):
        atomic_create(dst, link_or_copy)
    linked = os.path.samefile(src, dst)
    if linked and digest is not None:  # the same bytes on disk: the source's digest is the copy's
        info = {"path": str(dst), "bytes": dst.stat().st_size, "sha256": digest}
    else:
        info = describe_model_file(dst)
    if info["bytes"] != src.stat().st_size or (digest is not None and info["sha256"] != digest):
        dst.unlink(missing_ok=True)
        raise OSError(f"the copy of {src} in {run_dir} does not match it")
    return {**info, "source": str(src), "linked": linked}


def _earlier_lines(model_file: Path) -> list:
    """The earlier run's per-epoch log lines (``metrics.jsonl`` beside its model file), if still there."""
    try:
        text = (model_file.parent / "metrics.jsonl").read_text()
    except OSError:
        return []
    lines = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict):
                lines.append(rec)
    return lines


def wandb_run_id(job_id: str, run_dir: Path) -> str:
    """The W&B run id of a reused job in ``run_dir``: its own run (the job's id + the folder's hash), so the
    sweep's group holds a run per job and the earlier run stays as it was."""
    return f"{job_id}-{config_hash(str(Path(run_dir).resolve()), 8)}"


def reuse(cfg: DictConfig, previous: dict, store_record: Path, run_dir: Path, group: str,
          t_start: float) -> Optional[dict]:
    """The record of this run made from the finished job's (``previous``, read from ``store_record``), with
    ``model.pt`` and the logger run in ``run_dir``; None (after a one-line warning) when the finished job's
    model file is gone or damaged: the caller runs the job anew."""
    src, digest, why = usable_model(previous)
    if src is None:
        warn(f"job {previous.get('job_id')} finished earlier ({store_record}), but {why}; it runs again")
        return None
    model = place_model(src, Path(run_dir), digest)
    record = {k: v for k, v in previous.items() if k not in ("wandb", "config", "resumed_from", "reused_from")}
    record.update(checkpoint=model["path"], model_file=model, reused_from=str(store_record))
    original = previous.get("cost") if isinstance(previous.get("cost"), dict) else {}
    if original.get("reused"):  # a record that was itself reused: what the job first cost
        original = original.get("original") or {}
    record["cost"] = {"reused": True, "stages": {}, "total_seconds": None, "original": original}
    lines = _earlier_lines(src)  # read first: the logger starts this folder's metrics.jsonl afresh
    logger = RunLogger(cfg, run_dir, record["job_id"], group, run_id=wandb_run_id(record["job_id"], run_dir))
    try:
        if logger.wandb_info:
            record["wandb"] = logger.wandb_info
        for line in lines:
            logger.log(line)
        complete_record(record, cfg, None, t_start)
        logger.finish(record)
    except BaseException:
        with contextlib.suppress(Exception):
            logger.finish({**record, "status": "failed"})
        raise
    return record
