"""File locks: two processes that need the same file (an artifact, the data cache) take turns."""
from __future__ import annotations

import contextlib
import os
import time

from filelock import FileLock, Timeout


def file_lock(path: str | os.PathLike, timeout: float = -1) -> FileLock:
    return FileLock(str(path) + ".lock", timeout=timeout)


def acquire(lock: FileLock) -> float:
    """Acquire ``lock``; return the seconds spent waiting for another holder (0.0 when it was free)."""
    with contextlib.suppress(Timeout):
        lock.acquire(timeout=0)
        return 0.0
    t = time.perf_counter()
    lock.acquire()
    return time.perf_counter() - t

