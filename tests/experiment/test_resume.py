"""A job killed mid-retraining continues from its last epoch and ends with the numbers of an uninterrupted run;
a finished job is not run again."""
from __future__ import annotations

import json

import pytest
from conftest import SAFETY_S

from kdprune_cli.experiment.job import run_job
from kdprune_cli.experiment.loggers import RunLogger

ARGS = ["method.finetune.epochs=1", "method.retrain.epochs=3", "method.score_batches=2", "method.gamma_batches=2"]


class Killed(Exception):
    pass


def test_resume_after_kill_gives_the_uninterrupted_numbers(tiny_cfg, tmp_path, monkeypatch):
    ref = run_job(tiny_cfg(*ARGS, f"store.root={tmp_path}/storeA"), tmp_path / "a", summary=False)

    real_log = RunLogger.log

    def dying_log(self, rec):
        real_log(self, rec)
        if rec.get("stage") == "retrain" and rec["epoch"] == 2:
            raise Killed("simulated kill after retraining epoch 2")

    cfg = tiny_cfg(*ARGS, f"store.root={tmp_path}/storeB")
    monkeypatch.setattr(RunLogger, "log", dying_log)
    with pytest.raises(Killed):
        run_job(cfg, tmp_path / "b1", summary=False)
    assert json.loads((tmp_path / "b1" / "results.json").read_text())["status"] == "failed"
    ckpts = list((tmp_path / "storeB" / "jobs").glob("*/retrain.1.pt"))
    assert len(ckpts) == 1  # epoch-1 checkpoint of the retraining stage

    monkeypatch.setattr(RunLogger, "log", real_log)
    resumed = run_job(cfg, tmp_path / "b2", summary=False)
    assert resumed["status"] == "ok"
    lines = [json.loads(x) for x in (tmp_path / "b2" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if x["stage"] == "retrain"] == [2, 3]  # epoch 1 was not redone
    assert resumed["cost"]["stages"]["teacher"]["cached"] is True
    assert resumed["metrics"] == ref["metrics"]  # bit-identical on CPU
    assert resumed["sparsity_actual"] == ref["sparsity_actual"]
    assert resumed["cost"]["stages"]["retrain"]["samples"] == ref["cost"]["stages"]["retrain"]["samples"]
    assert not list((tmp_path / "storeB" / "jobs").glob("*/*.pt"))  # checkpoints cleared once finished

    again = run_job(cfg, tmp_path / "b3", summary=False)
    assert again["reused_from"] and again["metrics"] == ref["metrics"]
    assert again["cost"]["reused"] is True and again["cost"]["stages"] == {}  # nothing was trained
    assert (tmp_path / "b3" / "model.pt").is_file()
    assert (tmp_path / "b3" / "metrics.jsonl").read_text() == (tmp_path / "b2" / "metrics.jsonl").read_text()
    fresh = run_job(tiny_cfg(*ARGS, f"store.root={tmp_path}/storeB", "resume=false"), tmp_path / "b4", summary=False)
    assert "reused_from" not in fresh and fresh["metrics"] == ref["metrics"]


def test_sigkill_mid_retraining_then_the_same_command_resumes(tmp_path):
    """A real SIGKILL of the CLI process during retraining; rerunning the same command finishes the job."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["experiment=quickstart", "progress=false", "teacher=resnet20", "teacher.train.epochs=1",
            "student.train.epochs=1", "method.finetune.epochs=1", "method.retrain.epochs=4",
            "method.score_batches=2", "method.gamma_batches=2"]

    def cmd(run):
        return [sys.executable, "-m", "kdprune_cli.cli.main", *args, f"hydra.run.dir={run}"]

    env = {**os.environ, "KDPRUNE_STORE": str(tmp_path / "store"), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd(tmp_path / "killed"), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + SAFETY_S
    while time.time() < deadline and p.poll() is None:
        if list((tmp_path / "store" / "jobs").glob("*/retrain.1.pt")):  # an epoch of retraining is saved
            break
        time.sleep(0.05)
    assert p.poll() is None, "the job ended before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "killed" / "results.json").exists()  # killed: no record at all
    assert list((tmp_path / "store" / "jobs").glob("*/retrain.1.pt"))

    r = subprocess.run(cmd(tmp_path / "again"), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=SAFETY_S)
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["stage"] == "retrain"]
    assert epochs and epochs[0] >= 2 and epochs[-1] == 4  # continued, did not start over

    env_ref = {**env, "KDPRUNE_STORE": str(tmp_path / "store_ref")}
    r = subprocess.run(cmd(tmp_path / "ref"), env=env_ref, cwd=tmp_path, capture_output=True, text=True, timeout=SAFETY_S)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert again["metrics"] == ref["metrics"] and again["sparsity_actual"] == ref["sparsity_actual"]
