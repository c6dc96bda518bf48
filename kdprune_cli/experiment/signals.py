"""A scheduler's signals during a job: SIGTERM and SIGUSR1 (the warning before a kill or a preemption) end the
job through :class:`Interrupted`, so it writes a ``failed`` record and keeps its last checkpoint."""
from __future__ import annotations

import contextlib
import signal
import threading

from kdprune_cli.store.atomic import defer_while_writing


class Interrupted(BaseException):
    """SIGTERM / SIGUSR1 (a scheduler's warning before a kill or a preemption) during a job."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


@contextlib.contextmanager
def signals_interrupt():
    """Turn SIGTERM and SIGUSR1 into :class:`Interrupted` (once: a second signal while the job winds down
    is ignored), so the job writes a ``failed`` record and keeps its last checkpoint. A signal that arrives
    during an atomic write (:func:`~kdprune_cli.store.atomic.writing`) is raised once the write is complete."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = (signal.SIGTERM, signal.SIGUSR1)

    def handler(signum, frame):
        def interrupt():
            raise Interrupted(signum)

        for s in sigs:
            signal.signal(s, signal.SIG_IGN)
        if not defer_while_writing(interrupt):
            interrupt()

    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
