"""How many CPU threads torch may use: the cores this process may run on, not the cores the machine has.

torch sizes its intra-op pool by the machine's cores. In a container with a CPU quota, under ``taskset``, in a
SLURM allocation or beside other jobs that is too many threads for the cores really available, and every
parallel op then waits for threads that cannot run: training slows down many times. ``threads: auto`` (the
default) uses the smaller of the CPU affinity (``os.sched_getaffinity``) and the cgroup CPU quota (v2
``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``), unless ``OMP_NUM_THREADS`` is set, which wins
(Ray sets it to a job's ``num_cpus``); ``threads: N`` sets it outright.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

import torch

CGROUP = Path("/sys/fs/cgroup")


def cgroup_quota(root: Path = CGROUP) -> Optional[float]:
    """CPUs the cgroup quota allows (``2.5`` for 250 ms per 100 ms), or None without a quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # cgroup v1: -1 means no quota
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores(affinity: int, quota: Optional[float] = None) -> int:
    """The cores this process may use: the affinity mask's size, capped by the quota (rounded up, at least 1)."""
    if quota is not None and quota > 0:
        affinity = min(affinity, math.ceil(quota))
    return max(1, int(affinity))


def resolve_threads(setting: Any, env: Optional[dict] = None, affinity: Optional[int] = None,
                    quota: Optional[float] = None) -> tuple[int, str]:
    """``(threads, why)`` for the ``threads`` config value: an integer > 0 is used as it is; ``auto`` takes
    ``OMP_NUM_THREADS`` when it is set, else :func:`usable_cores` (``affinity``/``quota`` default to this
    process's). Raises ValueError for anything else."""
    env = os.environ if env is None else env
    s = str(setting).strip().lower()
    if s != "auto":
        if isinstance(setting, (bool, float)) or not s.isdecimal() or int(s) <= 0:
            raise ValueError(f"threads must be auto or an integer > 0, got {setting!r}")
        return int(s), "threads"
    omp = str(env.get("OMP_NUM_THREADS", "")).strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    if affinity is None:  # without an affinity mask (macOS, Windows): every core
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if quota is None:
        quota = cgroup_quota()
    n = usable_cores(affinity, quota)
    why = f"auto: {affinity} CPUs in the affinity mask" + (f", cgroup quota {quota:g} CPUs" if quota else "")
    return n, why


def apply_threads(setting: Any) -> dict:
    """Set torch's intra-op threads (and inter-op threads, where torch still allows it) from ``setting``;
    returns what the record keeps: ``{"intra_op", "inter_op", "source"}``."""
    n, why = resolve_threads(setting)
    torch.set_num_threads(n)
    try:  # allowed once, before any inter-op work in the process (a later job of a sweep keeps the first value)
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass
    return {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads(), "source": why}
