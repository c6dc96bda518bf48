"""kdprune-report counts each job once: reruns of a job (the same job_id) and failures before the job_id was
computed (matched by the config without the keys that change no result, else by the sweep job's overrides)
keep their newest record; the others are listed as superseded."""
from __future__ import annotations

import json
import os
from pathlib import Path

from records import _record

from kdprune_cli.report.cli import main

CONFIG = {"seed": 0, "sparsity": 0.9, "device": "auto", "progress": False, "resume": True, "fail_fast": False,
          "data": {"name": "cifar10", "root": "./data", "download": False, "cache_dir": "${store.root}/data"},
          "method": {"name": "cakld"}, "store": {"root": "outputs/store", "enabled": True}}


def _early_failure(config: dict) -> dict:
    """A record of a job that failed before its job_id was computed (e.g. a config error)."""
    rec = _record("cakld", True, 0.9, 0, 1)
    rec.update(status="failed", error="ConfigError: bad method option", job_id=None, metrics={}, config=config)
    return rec


def _write(path: Path, rec: dict, mtime: float) -> Path:
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(rec))
    os.utime(path / "results.json", (mtime, mtime))
    return path


def test_failures_without_job_id_count_once_per_job(tmp_path, capsys):
    runs = tmp_path / "multirun"
    # the same job, failed in three reruns (the switches that do not change the job differ)
    reruns = [{}, {"resume": False}, {"progress": True, "data": {**CONFIG["data"], "download": True}}]
    for i, extra in enumerate(reruns):
        _write(runs / f"sweep{i}" / "0", _early_failure({**CONFIG, **extra}), 1_000_000 + i)
    # another job (other sparsity) that also failed early, twice
    other = {**CONFIG, "sparsity": 0.5}
    _write(runs / "sweep0" / "1", _early_failure(other), 1_000_000)
    _write(runs / "sweep1" / "1", _early_failure(other), 1_000_001)
    # an ok job, so a table is drawn
    _write(runs / "sweep0" / "2", _record("magnitude", None, 0.5, 0, 2), 1_000_000)
    out = tmp_path / "out"
    assert main([str(runs), "--out", str(out)]) == 1
    md = (out / "report.md").read_text()
    assert "1 ok, 2 failed" in md and "3 superseded" in md
    assert md.count("ConfigError: bad method option") == 2
    assert "kdprune-report: 2 failed, 0 missing" in capsys.readouterr().err


def test_rerun_with_job_id_supersedes_an_early_failure_of_the_same_config(tmp_path):
    """Fixed and rerun: the ok record (with its job_id) replaces the failure that had none."""
    runs = tmp_path / "runs"
    _write(runs / "a", _early_failure(CONFIG), 1_000_000)
    ok = _record("cakld", True, 0.9, 0, 1)
    ok["config"] = {**CONFIG, "resume": False}
    _write(runs / "b", ok, 1_000_100)
    out = tmp_path / "out"
    assert main([str(runs), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "1 ok, 0 failed" in md and "Failed jobs" not in md and "1 superseded" in md


def test_failures_without_job_id_or_config_group_by_sweep_overrides(tmp_path):
    runs = tmp_path / "runs"
    for i in range(2):
        rec = _early_failure(CONFIG)
        del rec["config"]
        d = _write(runs / f"sweep{i}" / "0", rec, 1_000_000 + i)
        (d / ".hydra").mkdir()
        (d / ".hydra" / "overrides.yaml").write_text("- method=cakld\n- sparsity=0.9\n")
    rec = _early_failure(CONFIG)
    del rec["config"]
    _write(runs / "lone", rec, 1_000_000)  # nothing to match it by: counted on its own
    out = tmp_path / "out"
    assert main([str(runs), "--out", str(out)]) == 1
    md = (out / "report.md").read_text()
    assert "0 ok, 2 failed" in md and "1 superseded" in md


def test_rerun_of_same_job_supersedes_failed_record(tmp_path):
    """A job re-run after a failure (same job_id): the newer record counts, the old one is not a failure."""
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    old = _record("cakld", True, 0.9, 0, 1)
    old.update(status="failed", error="KeyboardInterrupt")
    (a / "results.json").write_text(json.dumps(old))
    (b / "results.json").write_text(json.dumps(_record("cakld", True, 0.9, 0, 1)))
    os.utime(a / "results.json", (1_000_000, 1_000_000))
    out = tmp_path / "out"
    assert main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "Superseded" in md and "(n=1)" in md and "Failed jobs" not in md


def test_config_keys_that_change_no_result_are_those_the_job_id_leaves_out():
    """Records are matched on the job id's own list of ignored keys (``identity_config``): threads, paths,
    compilation, where the data lies and its checkpoints' paths change no result."""
    from kdprune_cli.report.collect import config_key

    base = {**CONFIG, "threads": 1, "compile": False, "paths": {"output_dir": "a"}, "teacher": {"checkpoint": "t.pt"}}
    other = {**base, "threads": 4, "compile": True, "paths": {"output_dir": "b"}, "teacher": {"checkpoint": "u.pt"},
             "data": {**CONFIG["data"], "root": "/elsewhere"}}
    assert config_key({"config": other}) == config_key({"config": base})
    assert config_key({"config": {**base, "sparsity": 0.5}}) != config_key({"config": base})
