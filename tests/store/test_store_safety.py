"""Fsync'ed, group-readable atomic writes; a full disk says so; orphaned temp files are removed;
checkpoint digests follow content; unfit or damaged artifacts warn once and are redone; lock waits are measured."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import hold_lock

from kdprune_cli.log import warn
from kdprune_cli.store import atomic, digests
from kdprune_cli.store.artifacts import Store
from kdprune_cli.store.atomic import atomic_save, atomic_write_json, clean_orphans
from kdprune_cli.store.digests import config_hash, file_digest


@pytest.fixture
def umask():
    """``umask(value)`` sets the process umask for the test and restores it afterwards."""
    old = os.umask(0o022)
    os.umask(old)

    def set_(value):
        os.umask(value)
    yield set_
    os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_files_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    atomic_save({"w": torch.ones(2)}, tmp_path / "a.pt")
    atomic_write_json({"ok": 1}, tmp_path / "r.json")
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == mode
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == mode


def test_writes_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_write_json({"ok": 1}, tmp_path / "r.json")
    assert events[:2] == ["fsync", "replace"]
    events.clear()
    atomic_save({"w": torch.ones(2)}, tmp_path / "a.pt")
    assert events[:2] == ["fsync", "replace"]


@pytest.mark.parametrize("kind", ["torch", "json"])
def test_full_disk_raises_enospc_and_leaves_no_temp_file(tmp_path, monkeypatch, kind):
    path = tmp_path / ("a.pt" if kind == "torch" else "r.json")
    write = (lambda obj: atomic_save(obj, path)) if kind == "torch" else (lambda obj: atomic_write_json(obj, path))
    write({"w": [1.0]} if kind == "json" else {"w": torch.ones(3)})
    old = path.read_bytes()

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    big = {"w": list(range(10000))} if kind == "json" else {"w": torch.zeros(100_000)}
    with pytest.raises(OSError) as info:
        write(big)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert "No space left on device" in str(info.value) and "unexpected pos" not in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    assert path.read_bytes() == old  # the old file is intact


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_clean_orphans_removes_dead_writers_files_only(tmp_path):
    host = atomic._HOST
    nested = tmp_path / "teacher" / "abc"
    nested.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = nested / f".artifact.pt.{host}.{_dead_pid()}.0123abcd.tmp"
        mine = nested / f".artifact.pt.{host}.{os.getpid()}.0123abcd.tmp"
        alive = tmp_path / f".results.json.{host}.{sleeper.pid}.89abcdef.tmp"
        other_new = tmp_path / ".results.json.otherhost.1.00000000.tmp"
        other_old = tmp_path / ".meta.json.otherhost.1.11111111.tmp"
        unrelated = tmp_path / ".notes.tmp"
        for p in (dead, mine, alive, other_new, other_old, unrelated):
            p.write_bytes(b"partial")
        two_hours_ago = time.time() - 7200
        for p in (other_old, unrelated):
            os.utime(p, (two_hours_ago, two_hours_ago))
        assert clean_orphans(tmp_path) == 2
        assert not dead.exists() and not other_old.exists()
        assert mine.exists() and alive.exists() and other_new.exists() and unrelated.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert clean_orphans(tmp_path / "nowhere") == 0


def test_a_killed_writer_leaves_a_temp_file_that_is_recognised(tmp_path):
    """A writer killed between creating its temp file and the rename: its file goes at the next start."""
    code = ("import os, sys; from pathlib import Path; from kdprune_cli.store import atomic; "
            "t = atomic.tmp_path(Path(sys.argv[1])); t.write_bytes(b'half'); os._exit(9)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(atomic.__file__).parents[2]),
                                                         os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "artifact.pt")], env=env)
    assert r.returncode == 9
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and left[0].name.startswith(".artifact.pt.")
    assert clean_orphans(tmp_path) == 1
    assert not list(tmp_path.iterdir())


def test_warn_is_one_line(capsys):
    warn("first\nsecond")
    err = capsys.readouterr().err
    assert err == "kdprune: warning: first second\n"


# --- checkpoint digests --------------------------------------------------------------------------------------
@pytest.fixture
def hashing(monkeypatch):
    """Count the times a file's bytes are hashed; start with an empty in-memory digest cache."""
    calls = []
    real = digests.sha256_file
    monkeypatch.setattr(digests, "sha256_file", lambda p: (calls.append(Path(p)), real(p))[1])
    monkeypatch.setattr(digests, "_DIGESTS", {})
    return calls


def test_digest_follows_content_not_path(tmp_path, hashing):
    import hashlib

    ck, cache = tmp_path / "teacher.pt", tmp_path / "cache"
    ck.write_bytes(b"A" * 1000)
    a = file_digest(ck, cache_dir=cache)
    assert a == hashlib.sha256(b"A" * 1000).hexdigest()
    # another file at the same path (a new inode, same size, same mtime): another digest
    st = ck.stat()
    (tmp_path / "new.pt").write_bytes(b"B" * 1000)
    os.utime(tmp_path / "new.pt", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp_path / "new.pt", ck)
    b = file_digest(ck, cache_dir=cache)
    assert b == hashlib.sha256(b"B" * 1000).hexdigest() != a
    # rewritten in place with another size
    ck.write_bytes(b"C" * 10)
    assert file_digest(ck, cache_dir=cache) == hashlib.sha256(b"C" * 10).hexdigest()
    # the same bytes at another path: the same digest
    (tmp_path / "copy.pt").write_bytes(b"C" * 10)
    assert file_digest(tmp_path / "copy.pt", cache_dir=cache) == file_digest(ck, cache_dir=cache)


def test_unchanged_file_is_hashed_once(tmp_path, hashing):
    ck, cache = tmp_path / "teacher.pt", tmp_path / "cache"
    ck.write_bytes(os.urandom(4096))
    d = file_digest(ck, cache_dir=cache)
    assert file_digest(ck, cache_dir=cache) == d
    assert len(hashing) == 1  # in memory
    digests._DIGESTS.clear()  # a new process: the cache file answers
    assert file_digest(ck, cache_dir=cache) == d
    assert len(hashing) == 1
    entries = json.loads((cache / "digests.json").read_text())["entries"]
    assert entries[str(ck.resolve())]["sha256"] == d
    # same size, other mtime: hashed again
    st = ck.stat()
    os.utime(ck, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert file_digest(ck, cache_dir=cache) == d
    assert len(hashing) == 2


def test_damaged_digest_cache_is_ignored(tmp_path, hashing):
    ck, cache = tmp_path / "teacher.pt", tmp_path / "cache"
    ck.write_bytes(b"x" * 100)
    cache.mkdir()
    (cache / "digests.json").write_text("{not json")
    d = file_digest(ck, cache_dir=cache)
    assert len(d) == 64
    assert json.loads((cache / "digests.json").read_text())["entries"][str(ck.resolve())]["sha256"] == d
    (cache / "digests.json").write_text(json.dumps({"entries": {str(ck.resolve()): "junk"}}))
    digests._DIGESTS.clear()
    assert file_digest(ck, cache_dir=cache) == d


# --- artifacts that do not fit, lock waits -------------------------------------------------------------------
def test_unfit_artifact_warns_once_and_is_made_anew(tmp_path, capsys):
    s = Store(tmp_path)
    spec = {"x": 3}
    d = s.dir("teacher", config_hash(spec))
    s.get_or_create("teacher", spec, lambda: ({"w": torch.ones(3)}, {"n": 3}))
    (d / "partial.pt").write_bytes(b"an interrupted attempt")
    capsys.readouterr()

    def check(state):
        if state["w"].shape != (4,):
            raise RuntimeError(f"size mismatch for w: {tuple(state['w'].shape)} vs (4,)\nsecond line")

    made = []
    state, meta, cached = s.get_or_create("teacher", spec, lambda: (made.append(1) or {"w": torch.ones(4)}, {}),
                                          check=check)
    assert not cached and made == [1] and state["w"].shape == (4,)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("kdprune: warning: ") and str(d) in err[0]
    assert "does not fit" in err[0] and "size mismatch" in err[0]
    assert not (d / "partial.pt").exists()  # the stage starts from scratch
    # stored anew: the next call finds it and the check passes
    state, meta, cached = s.get_or_create("teacher", spec, lambda: pytest.fail("made twice"), check=check)
    assert cached and state["w"].shape == (4,)
    assert capsys.readouterr().err == ""


def test_damaged_artifact_warns_once(tmp_path, capsys):
    s = Store(tmp_path)
    s.get_or_create("student", {"x": 2}, lambda: ({"w": torch.zeros(1)}, {}))
    d = s.dir("student", config_hash({"x": 2}))
    (d / "artifact.pt").write_bytes(b"garbage")
    capsys.readouterr()
    state, meta, cached = s.get_or_create("student", {"x": 2}, lambda: ({"w": torch.ones(1)}, {}))
    assert not cached and torch.equal(state["w"], torch.ones(1))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "cannot be read" in err[0] and str(d) in err[0]


def test_waiting_for_another_jobs_lock_is_measured(tmp_path):
    s = Store(tmp_path)
    spec = {"x": 5}
    d = s.dir("teacher", config_hash(spec))
    d.mkdir(parents=True)
    t = hold_lock(d / "stage", 0.5)
    s.get_or_create("teacher", spec, lambda: ({"w": torch.ones(1)}, {}))
    t.join()
    assert 0.3 < s.waited < 5.0
    s.get_or_create("teacher", spec, lambda: pytest.fail("made twice"))
    assert s.waited == 0.0
    s.get_or_create("teacher", {"x": 6}, lambda: ({"w": torch.ones(1)}, {}), enabled=False)
    assert s.waited == 0.0
