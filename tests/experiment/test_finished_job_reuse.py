"""A job met again after it finished is reused, and its run folder is as complete as a trained job's: its own
model.pt (a verified link or copy), its own logger run (W&B: a run in the sweep's group), a record with this
run's config and paths, and its cost booked as reused; a finished job whose model file is gone or damaged runs
again."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import SAFETY_S
from records import _row
from runs import TINY_CLI, kdprune

from kdprune_cli.experiment import reuse
from kdprune_cli.report.cli import main as report_main


def _rec(path):
    return json.loads((path / "results.json").read_text())


def test_a_reused_job_in_a_sweep_is_a_complete_job_folder(tmp_path):
    pytest.importorskip("wandb")
    env = {"WANDB_SILENT": "true", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb-home")}
    first = kdprune([*TINY_CLI, "sparsity=0.5"], tmp_path, env_extra=env)  # logger csv (the default)
    assert first.returncode == 0, first.stderr[-2000:]
    single = _rec(tmp_path / "run")
    assert single["model_file"]["sha256"] and "reused_from" not in single

    r = kdprune(["-m", *TINY_CLI, "sparsity=0.5,0.8", "logger=wandb", "logger.mode=offline"], tmp_path, env_extra=env)
    assert r.returncode == 0, r.stderr[-2000:]
    multi = tmp_path / "multi"
    recs = [_rec(multi / str(i)) for i in (0, 1)]
    reused, trained = recs
    assert reused["job_id"] == single["job_id"] and "reused_from" not in trained
    assert reused["reused_from"].endswith(f"jobs/{single['job_id']}/results.json")
    assert "not run again: model.pt linked from" in r.stdout

    # every folder holds its model, and kdprune-eval reloads it with the record's numbers
    for i, rec in enumerate(recs):
        folder = multi / str(i)
        assert (folder / "model.pt").is_file()
        assert rec["model_file"]["path"] == rec["checkpoint"] == str(folder / "model.pt")
        assert rec["model_file"]["sha256"] == reuse.sha256_file(folder / "model.pt")
    assert reused["model_file"]["sha256"] == single["model_file"]["sha256"]
    ev = subprocess.run([sys.executable, "-m", "kdprune_cli.cli.eval", str(multi / "0"), "--json"],
                        capture_output=True, text=True, cwd=tmp_path, timeout=SAFETY_S)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["record_matches"] is True

    # this sweep's config and paths; the earlier results and what they cost
    assert reused["config"]["logger"]["name"] == "wandb" and single["config"]["logger"]["name"] == "csv"
    assert reused["metrics"] == single["metrics"] and reused["params"] == single["params"]
    cost = reused["cost"]
    assert cost["reused"] is True and cost["stages"] == {}
    assert cost["original"]["total_seconds"] == single["cost"]["total_seconds"]
    assert cost["original"]["stages"] == single["cost"]["stages"]
    assert 0 < cost["total_seconds"] and "reused" not in trained["cost"]

    # its own logger run: the earlier per-epoch lines, and a W&B run per job in the sweep's group
    lines = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert lines and (multi / "0" / "metrics.jsonl").read_text() == lines
    runs = sorted(multi.glob("*/wandb/offline-run-*"))
    assert len(runs) == 2 and all(list(p.glob("*.wandb")) for p in runs)
    assert reused["wandb"]["group"] == trained["wandb"]["group"] and reused["wandb"]["id"] != trained["wandb"]["id"]
    assert reused["wandb"]["id"].startswith(reused["job_id"])

    # the report does not average the earlier run's seconds as this sweep's work
    assert report_main([str(multi), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    (row,) = [line for line in md.splitlines() if "reused)" in line]
    assert _row(md, row.split("|")[1].strip())[-2] == f"{trained['cost']['total_seconds']:.1f} (1 reused)"

    # a finished job whose model file was damaged is not reused: it runs again
    with open(tmp_path / "run" / "model.pt", "ab") as f:
        f.write(b"x")
    rerun = kdprune([*TINY_CLI, "sparsity=0.5"], tmp_path, env_extra=env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    fresh = _rec(tmp_path / "run")
    assert "reused_from" not in fresh and "runs again" in rerun.stderr
    assert fresh["metrics"] == single["metrics"]  # the same job, trained again to the same numbers


def test_a_model_file_is_copied_and_checked_where_it_cannot_be_linked(tmp_path, monkeypatch):
    src = tmp_path / "a" / "model.pt"
    src.parent.mkdir()
    src.write_bytes(b"weights" * 1000)
    digest = reuse.sha256_file(src)

    def no_link(*a, **k):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(reuse.os, "link", no_link)
    info = reuse.place_model(src, tmp_path / "b", digest)
    assert info["linked"] is False and info["sha256"] == digest and info["bytes"] == 7000
    assert (tmp_path / "b" / "model.pt").read_bytes() == src.read_bytes()
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(OSError, match="does not match"):
        reuse.place_model(src, tmp_path / "c", "0" * 64)
    assert not (tmp_path / "c" / "model.pt").exists()


def test_a_model_file_gone_or_not_matching_its_record_is_not_usable(tmp_path):
    f = tmp_path / "model.pt"
    assert reuse.usable_model({"model_file": {"path": str(f), "bytes": 3}})[2].endswith("is gone")
    f.write_bytes(b"abc")
    ok = {"path": str(f), "bytes": 3, "sha256": reuse.sha256_file(f)}
    assert reuse.usable_model({"model_file": ok})[:2] == (f, ok["sha256"])
    assert "has 3 bytes, its record says 4" in reuse.usable_model({"model_file": {**ok, "bytes": 4}})[2]
    assert "sha256" in reuse.usable_model({"model_file": {**ok, "sha256": "0" * 64}})[2]
    assert "no sha256" in reuse.usable_model({"model_file": {"path": str(f), "bytes": 3}})[2]


def test_a_job_reused_in_its_own_folder_keeps_its_model_and_log(tiny_cfg, tmp_path):
    from runs import FAST

    from kdprune_cli.experiment.job import run_job

    cfg = tiny_cfg(*FAST)
    first = run_job(cfg, tmp_path / "r", summary=False)
    log = (tmp_path / "r" / "metrics.jsonl").read_text()
    again = run_job(cfg, tmp_path / "r", summary=False)  # the same command, the same run folder
    assert again["reused_from"] and again["model_file"]["linked"] is True
    assert again["model_file"]["sha256"] == first["model_file"]["sha256"] == reuse.sha256_file(tmp_path / "r" / "model.pt")
    assert log and (tmp_path / "r" / "metrics.jsonl").read_text() == log
