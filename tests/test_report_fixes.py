"""Issue #7: kdprune-report counts each job once (also failures before the job_id) and says in one line, with
exit status 2, when --out is a file or cannot be written."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from kdprune_cli.report.main import main

from records import _record

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


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_failures_without_job_id_count_once_per_job(tmp_path, capsys):
    runs = tmp_path / "multirun"
    # the same job, failed in three reruns (the switches that do not change the job differ)
    for i, extra in enumerate([{}, {"resume": False}, {"progress": True, "data": {**CONFIG["data"], "download": True}}]):
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


@pytest.fixture
def one_ok(tmp_path) -> Path:
    return _write(tmp_path / "runs" / "a", _record("magnitude", None, 0.5, 0, 1), 1_000_000)


def test_out_is_a_file(tmp_path, one_ok, capsys):
    target = tmp_path / "report.txt"
    target.write_text("keep me")
    assert main([str(one_ok), "--out", str(target)]) == 2
    assert _one_line(capsys) == f"kdprune-report: error: --out {target} is a file, not a folder"
    assert target.read_text() == "keep me"
    assert main([str(one_ok), "--out", str(target / "sub")]) == 2  # a file on the way
    line = _one_line(capsys)
    assert line.startswith("kdprune-report: error: cannot create the --out folder") and "Not a directory" in line


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_unwritable_out_is_one_line(tmp_path, one_ok, capsys, monkeypatch, code):
    def fail(self, *a, **k):
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "write_text", fail)
    out = tmp_path / "out"
    assert main([str(one_ok), "--out", str(out)]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"kdprune-report: error: cannot write the report into {out}: {os.strerror(code)}")
    assert "Traceback" not in line
