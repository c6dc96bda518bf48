"""Content-addressed artifacts (the open_lth idea), atomic writes, file locks and file digests.

A stage's artifact lives under ``<root>/<stage>/<key>/`` where ``key`` is a hash of exactly the config
that determines it. A stage whose artifact exists is loaded, not recomputed; two jobs that need the
same artifact at once serialise on a file lock, so it is computed once.

Every file is written to a temporary file beside it (``.<name>.<host>.<pid>.<random>.tmp``), flushed and
fsync'ed, then renamed over the target; a writer that is killed leaves only its temporary file, which
:func:`clean_orphans` recognises and removes at the next start. Files are created ``0666 & ~umask`` (group-
readable under the usual umask), so a team can share a store.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from filelock import FileLock, Timeout

from kdprune_cli.errors import DivergedError, describe, non_finite_state


def warn(msg: str) -> None:
    """One line ``kdprune: warning: <msg>`` on stderr."""
    text = " ".join(str(msg).split())  # one line, whatever the message holds
    from kdprune_cli.log import say

    say(f"kdprune: warning: {text}", err=True, level=logging.WARNING)


def config_hash(obj: Any, n: int = 16) -> str:
    """A stable hash of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


# --- atomic writes ------------------------------------------------------------------------------------------
_HOST = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname()).strip("-") or "host"
# .<name>.<host>.<pid>.<8 hex>.tmp; the host has no dots, so the name is everything before it.
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
_LEGACY_TMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # tempfile.mkstemp names of earlier versions
ORPHAN_AGE = 3600.0  # seconds: a temp file untouched this long belongs to no live writer


def _tmp_path(path: Path) -> Path:
    return path.parent / f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # best effort: some filesystems cannot fsync a folder
    finally:
        os.close(fd)


class _Writing:
    """How many writes the main thread is inside, and the signal that arrived meanwhile (see :class:`writing`)."""

    depth = 0
    pending: Optional[Callable[[], None]] = None


class writing:
    """``with writing():`` a critical section in which a signal whose handler asks :func:`defer_while_writing`
    does not land: the handler records it and returns, and when the outermost section is left (normally or by
    an exception) the recorded action runs (e.g. raises the job's ``Interrupted``). Every atomic write is one.

    Python runs signal handlers only on the main thread, between its bytecodes; a write on another thread (a
    Ray or submitit worker's helper thread, a lock holder) is never interrupted by them, so only the main
    thread counts. Sections nest; the action runs once, at the outermost exit.
    """

    def __enter__(self) -> "writing":
        self.main = threading.current_thread() is threading.main_thread()
        if self.main:
            _Writing.depth += 1
        return self

    def __exit__(self, *exc) -> None:
        if not self.main:
            return
        _Writing.depth -= 1
        if _Writing.depth == 0 and _Writing.pending is not None:
            fire, _Writing.pending = _Writing.pending, None
            fire()


def defer_while_writing(fire: Callable[[], None]) -> bool:
    """For a signal handler: inside a :class:`writing` section keep ``fire`` (the first one only) to run when
    the section ends and return True; outside return False (the handler acts at once)."""
    if _Writing.depth > 0 and threading.current_thread() is threading.main_thread():
        if _Writing.pending is None:
            _Writing.pending = fire
        return True
    return False


def _atomic(path: Path, write: Callable[[int], None]) -> None:
    """Create a temp file beside ``path``, ``write(fd)``, fsync, rename over ``path``, fsync the folder; a
    signal that arrives meanwhile is acted on once the file is in place (or the temp file removed)."""
    with writing():
        _atomic_write(Path(path), write)


def _atomic_write(path: Path, write: Callable[[int], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    # 0666 through the umask (0644 under umask 022), not mkstemp's 0600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        try:
            write(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


class _Sink:
    """A file-like ``torch.save`` target that writes with plain ``os.write`` and keeps the first OSError.

    ``torch.save`` swallows an exception raised by ``write`` and reports "unexpected pos"; the kept error
    (e.g. ENOSPC "No space left on device") is raised instead.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.error: Optional[OSError] = None

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        if self.error is None:
            try:
                _write_all(self.fd, b)
            except OSError as e:
                self.error = e
                raise
        else:
            raise self.error
        return n

    def flush(self) -> None:
        pass


def _torch_save(obj: Any, fd: int) -> None:
    sink = _Sink(fd)
    try:
        torch.save(obj, sink)
    except Exception:
        if sink.error is not None:
            raise sink.error from None
        raise
    if sink.error is not None:
        raise sink.error


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` into a temporary file in the same folder (fsync'ed), then rename over ``path``.

    The bytes go through plain file I/O, so a full disk raises ``OSError`` (errno ENOSPC, "No space left on
    device") rather than torch's "unexpected pos", and nothing but the old file (if any) is left.
    """
    _atomic(Path(path), lambda fd: _torch_save(obj, fd))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8")
    _atomic(Path(path), lambda fd: _write_all(fd, data))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OSError:
        return True
    return True


def clean_orphans(root: str | os.PathLike, max_age: float = ORPHAN_AGE) -> int:
    """Remove temp files that killed writers left under ``root`` (recursively); return how many.

    A temp file is an orphan when it was written on this host by a process that is gone, or when it is
    older than ``max_age`` seconds (a writer on another host, or a name of an earlier version). A live
    writer's file is never removed.
    """
    root = Path(root)
    if not root.is_dir():
        return 0
    now = time.time()
    removed = 0
    for d, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".tmp") or not name.startswith("."):
                continue
            m = _TMP_RE.match(name)
            p = Path(d) / name
            try:
                if m is not None and m["host"] == _HOST and int(m["pid"]) != os.getpid():
                    orphan = not _pid_alive(int(m["pid"]))
                elif m is not None and m["host"] == _HOST:
                    orphan = False  # this very process is writing it
                elif m is not None or _LEGACY_TMP_RE.match(name):
                    orphan = now - p.stat().st_mtime > max_age
                else:
                    orphan = False
                if orphan:
                    p.unlink()
                    removed += 1
            except (FileNotFoundError, PermissionError):
                continue
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


def file_lock(path: str | os.PathLike, timeout: float = -1) -> FileLock:
    return FileLock(str(path) + ".lock", timeout=timeout)


def acquire(lock: FileLock) -> float:
    """Acquire ``lock``; return the seconds spent waiting for another holder (0.0 when it was free)."""
    try:
        lock.acquire(timeout=0)
        return 0.0
    except Timeout:
        pass
    t = time.perf_counter()
    lock.acquire()
    return time.perf_counter() - t


# --- file digests -------------------------------------------------------------------------------------------
_DIGESTS: dict = {}  # (resolved path, size, mtime_ns, inode) -> sha256 hex
_DIGESTS_LOCK = threading.Lock()
DIGESTS_FILE = "digests.json"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/kdprune``, else ``~/.cache/kdprune`` (a folder under the temp dir without a home)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = Path.home() / ".cache"
        except (RuntimeError, KeyError):
            import tempfile

            base = Path(tempfile.gettempdir()) / f"kdprune-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    return Path(base) / "kdprune"


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> list:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _read_digests(file: Path) -> dict:
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # absent or damaged: ignored
    entries = obj.get("entries") if isinstance(obj, dict) else None
    return entries if isinstance(entries, dict) else {}


def file_digest(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """sha256 (hex) of the bytes of ``path``, hashed once per (path, size, mtime, inode).

    The digest is remembered in memory and in ``<cache_dir>/digests.json`` (default
    ``$XDG_CACHE_HOME/kdprune`` or ``~/.cache/kdprune``), so a big checkpoint is read once, not at every
    start; a file replaced at the same path (other size, mtime or inode) is hashed anew. A damaged or
    unwritable cache file is ignored.
    """
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = (str(p), *_stat_key(st))
    with _DIGESTS_LOCK:
        if key in _DIGESTS:
            return _DIGESTS[key]
    cfile = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / DIGESTS_FILE
    e = _read_digests(cfile).get(str(p))
    if isinstance(e, dict) and e.get("stat") == _stat_key(st) and isinstance(e.get("sha256"), str):
        digest = e["sha256"]
    else:
        for _ in range(3):  # a file written while it is read is read again
            digest = _hash_file(p)
            st2 = p.stat()
            if _stat_key(st2) == _stat_key(st):
                break
            st = st2
        else:
            return digest  # still changing: not remembered
        key = (str(p), *_stat_key(st))
        _remember(cfile, str(p), _stat_key(st), digest)
    with _DIGESTS_LOCK:
        _DIGESTS[key] = digest
    return digest


def _remember(cfile: Path, path: str, stat: list, digest: str) -> None:
    try:
        cfile.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(cfile, timeout=10):
            entries = _read_digests(cfile)
            entries[path] = {"stat": stat, "sha256": digest}
            atomic_write_json({"version": 1, "entries": entries}, cfile)
    except (OSError, Timeout):
        pass  # a read-only or busy cache only costs a second hashing


# --- the store ----------------------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Store:
    """``root/<stage>/<key>/{artifact.pt, meta.json}``.

    ``waited`` holds the seconds the last :meth:`get_or_create` spent waiting for another job's lock.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.waited = 0.0

    def dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get_or_create(self, stage: str, spec: dict, create: Callable[[], tuple[dict, dict]],
                      enabled: bool = True, check: Optional[Callable[[dict], Any]] = None
                      ) -> tuple[dict, dict, bool]:
        """Return ``(state, meta, cached)``; ``create()`` returns ``(state, meta)`` and runs at most once.

        ``spec`` is the config subset that determines the artifact; its hash is the key. ``check(state)``
        raises when a stored artifact does not fit (e.g. another architecture); such an artifact, or one
        that cannot be read, is reported in one warning line, discarded and made anew. ``create()`` may
        return ``(None, meta)`` when what it made turned out not to be this artifact (e.g. an iterative
        method's round that had to be clipped to the job's own target): nothing is stored and
        ``(None, meta, False)`` is returned.
        """
        self.waited = 0.0
        key = config_hash(spec)
        d = self.dir(stage, key)
        art, meta_path = d / "artifact.pt", d / "meta.json"
        if not enabled:
            state, meta = create()
            return state, meta, False
        d.mkdir(parents=True, exist_ok=True)
        lock = file_lock(d / "stage")
        self.waited = acquire(lock)
        try:
            if art.exists():
                loaded, problem = self._load(art, meta_path)
                if loaded is not None and check is not None:
                    try:
                        check(loaded[0])
                    except Exception as e:
                        loaded, problem = None, f"does not fit ({_first_line(e)})"
                if loaded is not None:
                    return loaded[0], loaded[1], True
                warn(f"stored {stage} artifact {d} {problem}; discarded, making it anew")
                for f in (art, meta_path, d / "partial.pt"):  # partial.pt: an attempt at the same artifact
                    f.unlink(missing_ok=True)
            state, meta = create()
            if state is None:  # not this artifact after all: nothing to store
                return None, meta, False
            bad = non_finite_state(state)
            if bad:  # a diverged model is not an artifact
                raise DivergedError(f"training diverged in stage {stage}: non-finite values in {describe(bad)}; "
                                    f"not stored; lower the learning rate")
            meta = {**meta, "stage": stage, "key": key, "spec": spec}
            with writing():  # the artifact, its meta.json and the clean-up land together, whatever signal comes
                atomic_save(state, art)
                atomic_write_json(meta, meta_path)
                (d / "partial.pt").unlink(missing_ok=True)  # training checkpoint of an interrupted attempt
            return state, meta, False
        finally:
            lock.release()

    @staticmethod
    def _load(art: Path, meta_path: Path) -> tuple[Optional[tuple[dict, dict]], str]:
        """``((state, meta), "")`` or ``(None, what is wrong)``."""
        try:
            state = torch.load(art, map_location="cpu", weights_only=True)
        except Exception as e:
            return None, f"cannot be read ({_first_line(e)})"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, "has no meta.json"
        except (OSError, ValueError) as e:
            return None, f"has an unreadable meta.json ({_first_line(e)})"
        if not isinstance(state, dict) or not isinstance(meta, dict):
            return None, "is not a dict of tensors with a meta.json object"
        return (state, meta), ""
