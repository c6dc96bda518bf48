"""The errors a run ends with in one line: a storage error (:func:`storage_error`) and divergence.

Divergence: a training whose loss or weights stop being finite ends the job, never an ``ok`` record.

The trainer reads the epoch's loss sum (accumulated on the device, no host sync per step; a NaN or infinite step
loss makes it non-finite) once at the end of the epoch and checks the weights, before the epoch's checkpoint;
the store refuses a model with a NaN or infinite tensor, and the runner refuses non-finite final metrics.
Each raises :class:`DivergedError`, which the command line prints as one line ``kdprune: error: ...`` and
exits 1 (a run error that followed from the values chosen, not input refused before the work: that is exit 2);
in a multirun the job's record says ``failed`` and the sweep goes on.
"""
from __future__ import annotations

import errno
import math
import os
from typing import Iterable, Mapping, Optional

import torch

STORAGE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR,
                  errno.EEXIST, errno.EISDIR}


def storage_error(e: BaseException) -> Optional[str]:
    """One line for a folder or disk that cannot take our files (full, read-only, not a folder), else None."""
    if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
        where = f" {e.filename}" if e.filename else ""
        return f"cannot write{where}: {e.strerror or os.strerror(e.errno)}"
    return None


class DivergedError(FloatingPointError):
    """A training stage produced a non-finite loss, weights or metrics."""


def diverged(stage: str, when: str, what: str, where: Optional[str] = None) -> DivergedError:
    """``training diverged in stage <stage> (<when>): <what>; lower the learning rate (<where>.lr=...)``."""
    hint = f" ({where}.lr=...)" if where else ""
    return DivergedError(f"training diverged in stage {stage} ({when}): {what}; lower the learning rate{hint}")


def non_finite_tensors(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity (one host sync for them all)."""
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    named = [(n, t) for n, t in items if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    if not named:
        return []
    by_device: dict = {}
    for n, t in named:
        by_device.setdefault(t.device, []).append((n, torch.isfinite(t.detach()).all()))
    bad = []
    for flags in by_device.values():  # one read per device
        ok = torch.stack([f for _, f in flags]).tolist()
        bad += [n for (n, _), good in zip(flags, ok) if not good]
    return bad


def non_finite_state(state) -> list[str]:
    """The non-finite tensors of a (possibly nested) dict of tensors, by dotted key."""
    found: list[tuple[str, torch.Tensor]] = []

    def walk(obj, prefix: str) -> None:
        if torch.is_tensor(obj):
            found.append((prefix, obj))
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))

    walk(state, "")
    return non_finite_tensors(found)


def non_finite_metrics(metrics: Mapping[str, Mapping]) -> list[str]:
    """``<model>.<metric>=<value>`` for every NaN or infinite number in ``{model: {metric: value}}``."""
    bad = []
    for model, m in metrics.items():
        for k, v in (m or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
                bad.append(f"{model}.{k}={v}")
    return bad


def describe(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def config_path(node) -> Optional[str]:
    """The dotted config path of an OmegaConf node (``method.retrain``), or None for a plain dict."""
    try:
        return node._get_full_key(None) or None
    except Exception:
        return None
