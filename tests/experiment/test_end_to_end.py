"""End to end: the quickstart as a user runs it, caching across runs, bad input from the CLI, W&B offline."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from records import assert_estimate_matches
from runs import FAST, kdprune

from kdprune_cli.config.schema import ConfigError
from kdprune_cli.experiment.job import run_job
from kdprune_cli.models.checkpoint import CheckpointError

REQUIRED = ["status", "dataset", "teacher", "student", "method", "seed", "sparsity_target", "sparsity_actual",
            "retrain_kd", "metrics", "params", "flops", "cost", "versions", "device"]


def test_quickstart_end_to_end(tmp_path):
    """`kdprune experiment=quickstart` exactly as the Makefile runs it (own store, own run folder)."""
    r = kdprune(["experiment=quickstart", "progress=false"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "run" / "results.json").read_text())
    for k in REQUIRED:
        assert k in rec, k
    assert rec["status"] == "ok" and rec["error"] is None
    assert (rec["dataset"], rec["teacher"], rec["student"], rec["method"]) == ("digits", "resnet32", "resnet20", "cakld")
    prunable = rec["params"]["prunable"]
    assert rec["params"]["nonzero"] == prunable - round(0.9 * prunable)  # exact count, from the weights
    assert abs(rec["sparsity_actual"] - 0.9) < 1e-4
    for stage in ("teacher", "dense_student", "pruned", "final"):
        assert set(rec["metrics"][stage]) == {"top1", "top5", "nll", "ece", "mce", "rmsce", "reliability"}
    assert rec["metrics"]["final"]["top1"] >= 90.0  # the quickstart's promised accuracy
    assert rec["metrics"]["pruned"]["top1"] < rec["metrics"]["final"]["top1"]
    assert rec["flops"]["sparse"] < rec["flops"]["dense"]
    assert 0.0 <= rec["gamma"] <= 1.0 and rec["retrain_kd"] is True
    stages = rec["cost"]["stages"]
    for s in ("teacher", "student", "finetune", "score", "retrain"):
        assert stages[s]["seconds"] >= 0 and "samples" in stages[s]
    assert stages["retrain"]["samples"] > 0 and stages["retrain"]["teacher_samples"] > 0
    assert stages["teacher"]["cached"] is False
    assert_estimate_matches(["experiment=quickstart"], {0: rec})  # kdprune-estimate counted these samples
    assert "in" in r.stdout and "results.json" in r.stdout  # the one-screen summary names the record
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {x["stage"] for x in lines} >= {"teacher", "student", "finetune", "retrain"}
    assert (tmp_path / "run" / "metrics.csv").is_file()
    ck = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    for n, m in ck["masks"].items():
        assert (ck["state_dict"][n][~m] == 0).all()


def test_multirun_trains_the_teacher_once(tmp_path):
    r = kdprune(["-m", "experiment=quickstart", "progress=false", "teacher=resnet20", "teacher.train.epochs=1",
                 "student.train.epochs=1", *FAST, "sparsity=0.5,0.8"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads((tmp_path / "multi" / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert [x["status"] for x in recs] == ["ok", "ok"]
    assert recs[0]["cost"]["stages"]["teacher"]["cached"] is False
    assert recs[1]["cost"]["stages"]["teacher"]["cached"] is True
    assert recs[1]["cost"]["stages"]["finetune"]["cached"] is True  # same fine-tuned student for every sparsity
    assert recs[1]["cost"]["stages"]["teacher"]["artifact"]["samples"] > 0  # what it cost when made
    assert recs[0]["metrics"]["teacher"] == recs[1]["metrics"]["teacher"]
    for x, s in zip(recs, (0.5, 0.8)):
        assert abs(x["sparsity_actual"] - s) < 1e-4


@pytest.mark.parametrize("args,match", [
    (["sparsity=1.0"], "sparsity must be in \\[0, 1\\)"),
    (["teacher.train.epochs=-3"], "teacher.train.epochs must be >= 0"),
    (["teacher.checkpoint=/no/such.pt"], "does not exist"),
])
def test_cli_bad_input_one_line_exit_2_and_no_ok_record(tmp_path, args, match):
    r = kdprune(["experiment=quickstart", *args], tmp_path)
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("kdprune: error:"), r.stderr
    assert __import__("re").search(match, err[0])
    rec = json.loads((tmp_path / "run" / "results.json").read_text())
    assert rec["status"] == "failed" and rec["error"]
    assert not (tmp_path / "store" / "teacher").exists()  # nothing was trained or half written


def test_cli_unknown_method_and_missing_dataset(tmp_path):
    r = kdprune(["method=nope"], tmp_path)
    assert r.returncode != 0 and "method" in r.stderr and not (tmp_path / "run" / "results.json").exists()
    r = kdprune(["dataset=cifar10", f"data.root={tmp_path}/empty", "progress=false"], tmp_path)
    assert r.returncode == 2 and "data.root" in r.stderr and "data.download=true" in r.stderr


def test_corrupt_and_mismatched_checkpoints(tiny_cfg, tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read"):
        run_job(tiny_cfg(f"teacher.checkpoint={bad}", *FAST), tmp_path / "r1", summary=False)
    assert json.loads((tmp_path / "r1" / "results.json").read_text())["status"] == "failed"
    wrong = tmp_path / "wrong.pt"
    from kdprune_cli.models import build_model
    torch.save(build_model("resnet32", 10, 1, 8).state_dict(), wrong)  # teacher here is resnet20
    with pytest.raises(CheckpointError, match="does not fit resnet20"):
        run_job(tiny_cfg(f"teacher.checkpoint={wrong}", *FAST), tmp_path / "r2", summary=False)


def test_teacher_checkpoint_is_loaded_not_trained(tiny_cfg, tmp_path):
    from kdprune_cli.models import build_model
    torch.manual_seed(3)
    t = build_model("resnet20", 10, 1, 8)
    path = tmp_path / "teacher.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in t.state_dict().items()}}, path)  # DataParallel style
    rec = run_job(tiny_cfg(f"teacher.checkpoint={path}", *FAST), tmp_path / "r", summary=False)
    assert rec["status"] == "ok" and rec["cost"]["stages"]["teacher"]["samples"] == 0
    assert not (Path(tiny_cfg().store.root) / "teacher").exists()


def test_config_error_in_process_writes_failed_record(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError):
        run_job(tiny_cfg("method.alpha=2.0"), tmp_path / "r", summary=False)
    rec = json.loads((tmp_path / "r" / "results.json").read_text())
    assert rec["status"] == "failed" and "alpha" in rec["error"]


def test_plain_kd_ablation_and_ce_retraining_run(tiny_cfg, tmp_path):
    rec = run_job(tiny_cfg("method.gamma=0", "method.logit_norm=false", "method.retrain.kd=false", *FAST),
                  tmp_path / "r", summary=False)
    assert rec["status"] == "ok" and rec["retrain_kd"] is False and rec["gamma"] == 0.0
    assert rec["cost"]["stages"]["retrain"]["teacher_samples"] == 0  # CE retraining asks no teacher


def test_validation_split_reported_beside_test(tiny_cfg, tmp_path):
    rec = run_job(tiny_cfg("data.val_split=0.2", *FAST), tmp_path / "r", summary=False)
    assert set(rec["metrics_val"]) == {"teacher", "dense_student", "pruned", "final"}


def test_wandb_offline_one_run_with_summary(tiny_cfg, tmp_path):
    pytest.importorskip("wandb")
    cfg = tiny_cfg("logger=wandb", "logger.mode=offline", "logger.group=testgroup", *FAST)
    os.environ.setdefault("WANDB_SILENT", "true")
    rec = run_job(cfg, tmp_path / "r", group="ignored", summary=False)
    runs = list((tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and rec["job_id"] in runs[0].name
    assert list(runs[0].glob("*.wandb"))
