"""Atomic writes: every file is written to a temporary file beside it, flushed and fsync'ed, then renamed over
the target, so a reader sees the old file or the whole new one.

The temporary file is named ``.<name>.<host>.<pid>.<random>.tmp``; a writer that is killed leaves only it, which
:func:`clean_orphans` recognises and removes at the next start. Files are created ``0666 & ~umask`` (group-
readable under the usual umask), so a team can share a store. A signal whose handler asks
:func:`defer_while_writing` lands once the write is complete (:func:`writing`).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch

_HOST = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname()).strip("-") or "host"
# .<name>.<host>.<pid>.<8 hex>.tmp; the host has no dots, so the name is everything before it.
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
ORPHAN_AGE = 3600.0  # seconds: a temp file untouched this long belongs to no live writer


def tmp_path(path: Path) -> Path:
    """A fresh temporary file name beside ``path`` (see the module docstring)."""
    return path.parent / f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def fsync_dir(d: Path) -> None:
    """fsync a folder, so a rename in it is durable (best effort: some filesystems cannot fsync a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# How many writes the main thread is inside, and the action of the signal that arrived meanwhile (see :func:`writing`).
_WRITES = SimpleNamespace(depth=0, pending=None)


@contextlib.contextmanager
def writing():
    """``with writing():`` a critical section in which a signal whose handler asks :func:`defer_while_writing`
    does not land: the handler records it and returns, and when the outermost section is left (normally or by
    an exception) the recorded action runs (e.g. raises the job's ``Interrupted``). Every atomic write is one.

    Python runs signal handlers only on the main thread, between its bytecodes; a write on another thread (a
    Ray or submitit worker's helper thread, a lock holder) is never interrupted by them, so only the main
    thread counts. Sections nest; the action runs once, at the outermost exit.
    """
    main = threading.current_thread() is threading.main_thread()
    if main:
        _WRITES.depth += 1
    try:
        yield
    finally:
        if main:
            _WRITES.depth -= 1
            if _WRITES.depth == 0 and _WRITES.pending is not None:
                fire, _WRITES.pending = _WRITES.pending, None
                fire()


def defer_while_writing(fire: Callable[[], None]) -> bool:
    """For a signal handler: inside a :func:`writing` section keep ``fire`` (the first one only) to run when
    the section ends and return True; outside return False (the handler acts at once)."""
    if _WRITES.depth > 0 and threading.current_thread() is threading.main_thread():
        if _WRITES.pending is None:
            _WRITES.pending = fire
        return True
    return False


def atomic_create(path: str | os.PathLike, create: Callable[[Path], None]) -> None:
    """``create(tmp)`` makes a complete file at a temp path beside ``path``, which is renamed over ``path``, and
    the folder fsync'ed; a signal that arrives meanwhile is acted on once the file is in place (or the temp
    file removed)."""
    path = Path(path)
    with writing():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path(path)
        try:
            create(tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[int], None]) -> None:
    """:func:`atomic_create` of a file that ``write(fd)`` fills (then fsync'ed)."""
    def create(tmp: Path) -> None:
        # 0666 through the umask (0644 under umask 022), not mkstemp's 0600
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            write(fd)
            os.fsync(fd)
        finally:
            os.close(fd)

    atomic_create(path, create)


class _Sink:
    """A file-like ``torch.save`` target that writes with plain ``os.write`` and keeps the first OSError.

    ``torch.save`` swallows an exception raised by ``write`` and reports "unexpected pos"; the kept error
    (e.g. ENOSPC "No space left on device") is raised instead.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.error: Optional[OSError] = None

    def write(self, b) -> int:
        if self.error is not None:
            raise self.error
        try:
            write_all(self.fd, b)
        except OSError as e:
            self.error = e
            raise
        return memoryview(b).nbytes

    def flush(self) -> None:
        pass


def _torch_save(obj: Any, fd: int) -> None:
    sink = _Sink(fd)
    try:
        torch.save(obj, sink)
    except Exception:
        if sink.error is None:
            raise
    if sink.error is not None:  # raised by torch.save as another error, or swallowed
        raise sink.error from None


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` into a temporary file in the same folder (fsync'ed), then rename over ``path``.

    The bytes go through plain file I/O, so a full disk raises ``OSError`` (errno ENOSPC, "No space left on
    device") rather than torch's "unexpected pos", and nothing but the old file (if any) is left.
    """
    atomic_write(Path(path), lambda fd: _torch_save(obj, fd))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8")
    atomic_write(Path(path), lambda fd: write_all(fd, data))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's live process
        pass
    return True


def clean_orphans(root: str | os.PathLike, max_age: float = ORPHAN_AGE) -> int:
    """Remove temp files that killed writers left under ``root`` (recursively); return how many.

    A temp file is an orphan when it was written on this host by a process that is gone, or when it is
    older than ``max_age`` seconds (a writer on another host). A live writer's file is never removed.
    """
    now = time.time()
    removed = 0
    for d, _, files in os.walk(root):
        for name in files:
            m = _TMP_RE.match(name)
            if m is None:
                continue
            p = Path(d) / name
            try:
                if m["host"] != _HOST:
                    orphan = now - p.stat().st_mtime > max_age
                else:  # this host: its writer is gone (never this very process)
                    orphan = int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"]))
                if orphan:
                    p.unlink()
                    removed += 1
            except OSError:
                continue
    return removed


def check_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` and write a probe file into it (one per writer), so an unwritable, full or impossible
    folder raises ``OSError`` before any work is done there."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".kdprune-write-check-{os.getpid()}-{threading.get_ident()}"
    atomic_write_json({}, probe)
    probe.unlink()
