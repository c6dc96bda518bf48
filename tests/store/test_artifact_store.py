"""The content-addressed store: keys from the spec, atomic artifacts, one computation under concurrency."""
from __future__ import annotations

import threading
import time

import torch

from kdprune_cli.store.artifacts import Store
from kdprune_cli.store.atomic import atomic_write_json
from kdprune_cli.store.digests import config_hash


def test_key_is_the_hash_of_the_spec_and_order_free():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_two_jobs_asking_at_once_compute_once(tmp_path):
    calls = []

    def create():
        calls.append(1)
        time.sleep(0.5)  # long enough for the other thread to arrive while this one holds the lock
        return {"w": torch.ones(3)}, {"note": "made"}

    results = []

    def job():
        results.append(Store(tmp_path).get_or_create("teacher", {"x": 1}, create))

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(r[2] for r in results) == [False, True]  # one made it, the other found it cached
    assert all(torch.equal(r[0]["w"], torch.ones(3)) for r in results)


def test_damaged_artifact_is_recomputed(tmp_path):
    s = Store(tmp_path)
    s.get_or_create("student", {"x": 2}, lambda: ({"w": torch.zeros(1)}, {}))
    (s.dir("student", config_hash({"x": 2})) / "artifact.pt").write_bytes(b"garbage")
    state, meta, cached = s.get_or_create("student", {"x": 2}, lambda: ({"w": torch.ones(1)}, {}))
    assert not cached and torch.equal(state["w"], torch.ones(1))


def test_atomic_write_leaves_no_partial_file_on_error(tmp_path):
    import json

    import pytest

    path = tmp_path / "r.json"
    atomic_write_json({"ok": 1}, path)
    with pytest.raises(TypeError):
        atomic_write_json({("tuple", "key"): 1}, path)  # json cannot write it: fails half way
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind
    assert json.loads(path.read_text()) == {"ok": 1}  # the old record is intact


def test_the_store_version_is_part_of_every_key(tmp_path):
    spec = {"x": 1}
    keys = {Store(tmp_path, version=v).key(spec) for v in (None, 1, 2)}
    assert len(keys) == 3
    s = Store(tmp_path, version=2)
    s.get_or_create("teacher", spec, lambda: ({"w": torch.ones(1)}, {}))
    assert (tmp_path / "teacher" / s.key(spec) / "artifact.pt").is_file()
    _, _, cached = Store(tmp_path, version=3).get_or_create("teacher", spec, lambda: ({"w": torch.ones(1)}, {}))
    assert not cached  # an artifact of another store version is never read
