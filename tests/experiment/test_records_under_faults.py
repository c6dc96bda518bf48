"""Records that are right under faults and bad input.

Identity follows content (a new checkpoint file or other data is a new job), damaged checkpoints and records
are discarded with one warning line, the run folder's record is written last, SIGTERM leaves a failed record
and a resumable checkpoint, and bad values end with one line before any training.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import SAFETY_S, hold_lock
from fakedata import write_cifar

from kdprune_cli.config.schema import ConfigError
from kdprune_cli.experiment.job import run_job
from kdprune_cli.experiment.loggers import RunLogger
from kdprune_cli.experiment.signals import Interrupted
from kdprune_cli.models import build_model
from kdprune_cli.models.checkpoint import CheckpointError, load_checkpoint

FAST = ["method.finetune.epochs=1", "method.retrain.epochs=3", "method.score_batches=2", "method.gamma_batches=2"]


def _records(path: Path) -> dict:
    return json.loads((path / "results.json").read_text())


# --- 1. identity follows content -------------------------------------------------------------------------
def test_a_new_checkpoint_file_at_the_same_path_is_a_new_job(tiny_cfg, tmp_path):
    ck = tmp_path / "teacher.pt"
    torch.manual_seed(1)
    torch.save(build_model("resnet20", 10, 1, 8).state_dict(), ck)
    cfg = tiny_cfg(*FAST, f"teacher.checkpoint={ck}", "method.retrain.epochs=1")
    first = run_job(cfg, tmp_path / "a", summary=False)
    torch.manual_seed(2)
    torch.save(build_model("resnet20", 10, 1, 8).state_dict(), ck)  # same path, other weights
    second = run_job(cfg, tmp_path / "b", summary=False)
    assert "reused_from" not in second and second["job_id"] != first["job_id"]
    assert second["metrics"]["teacher"] != first["metrics"]["teacher"]
    third = run_job(cfg, tmp_path / "c", summary=False)  # unchanged file: the finished job is reused
    assert third["reused_from"] and third["job_id"] == second["job_id"]


def test_two_data_roots_with_other_content_are_two_jobs_and_share_no_artifact(tiny_cfg, tmp_path):
    for name, seed in (("a", 0), ("b", 1)):
        write_cifar(tmp_path / name, per_batch=8, test=10, seed=seed)
    common = ["dataset=cifar10", "data.verify_checksums=false", "teacher.train.epochs=1", "student.train.epochs=1",
              "method.finetune.epochs=1", "method.retrain.epochs=1", "method.score_batches=1",
              "method.gamma_batches=1"]
    ra = run_job(tiny_cfg(*common, f"data.root={tmp_path / 'a'}"), tmp_path / "ra", summary=False)
    rb = run_job(tiny_cfg(*common, f"data.root={tmp_path / 'b'}", "resume=false"), tmp_path / "rb", summary=False)
    assert ra["job_id"] != rb["job_id"] and "reused_from" not in rb
    assert rb["cost"]["stages"]["teacher"]["cached"] is False  # trained on b's data, not a's artifact
    assert rb["cost"]["stages"]["student"]["cached"] is False


# --- 2. damaged checkpoints and records: one warning, discarded, the stage redone --------------------------
class Killed(Exception):
    pass


def _kill_at(monkeypatch, stage: str, epoch: int):
    real = RunLogger.log

    def dying(self, rec):
        real(self, rec)
        if rec.get("stage") == stage and rec["epoch"] == epoch:
            raise Killed(f"simulated kill after {stage} epoch {epoch}")

    monkeypatch.setattr(RunLogger, "log", dying)
    return real


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_damaged_training_checkpoints_records_and_artifacts_are_redone(tiny_cfg, tmp_path, monkeypatch, capsys):
    args = [*FAST, "teacher.train.epochs=2"]
    ref = run_job(tiny_cfg(*args, f"store.root={tmp_path}/ref"), tmp_path / "ref", summary=False)
    cfg = tiny_cfg(*args, f"store.root={tmp_path}/s")

    # the shared teacher's partial.pt (an artifact's training checkpoint), truncated
    real = _kill_at(monkeypatch, "teacher", 2)
    with pytest.raises(Killed):
        run_job(cfg, tmp_path / "r1", summary=False)
    (partial,) = (tmp_path / "s" / "teacher").glob("*/partial.pt")
    _truncate(partial)
    # a job's retraining checkpoint, truncated
    monkeypatch.setattr(RunLogger, "log", real)
    _kill_at(monkeypatch, "retrain", 2)
    capsys.readouterr()
    with pytest.raises(Killed):
        run_job(cfg, tmp_path / "r2", summary=False)
    warned = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert len(warned) == 1 and "partial.pt" in warned[0]
    (ck,) = (tmp_path / "s" / "jobs").glob("*/retrain.1.pt")
    _truncate(ck)
    monkeypatch.setattr(RunLogger, "log", real)
    rec = run_job(cfg, tmp_path / "r3", summary=False)
    warned = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert len(warned) == 1 and "retrain.1.pt" in warned[0]
    assert rec["status"] == "ok" and rec["metrics"] == ref["metrics"]

    # a garbage finished-job record: discarded, the job runs again
    done = tmp_path / "s" / "jobs" / rec["job_id"] / "results.json"
    done.write_text("{not json")
    again = run_job(cfg, tmp_path / "r4", summary=False)
    warned = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert len(warned) == 1 and "results.json" in warned[0]
    assert "reused_from" not in again and again["metrics"] == ref["metrics"]

    # a stored teacher of another architecture: discarded, trained again
    (art,) = (tmp_path / "s" / "teacher").glob("*/artifact.pt")
    torch.save({"model": build_model("resnet32", 10, 1, 8).state_dict()}, art)
    fresh = run_job(tiny_cfg(*args, f"store.root={tmp_path}/s", "resume=false"), tmp_path / "r5", summary=False)
    warned = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert len(warned) == 1 and "teacher" in warned[0]
    assert fresh["cost"]["stages"]["teacher"]["cached"] is False and fresh["metrics"] == ref["metrics"]


def test_resume_false_never_reads_a_partial_checkpoint(tiny_cfg, tmp_path, monkeypatch, capsys):
    cfg = tiny_cfg(*FAST, "teacher.train.epochs=2", f"store.root={tmp_path}/s")
    real = _kill_at(monkeypatch, "teacher", 2)
    with pytest.raises(Killed):
        run_job(cfg, tmp_path / "r1", summary=False)
    monkeypatch.setattr(RunLogger, "log", real)
    rec = run_job(tiny_cfg(*FAST, "teacher.train.epochs=2", f"store.root={tmp_path}/s", "resume=false"),
                  tmp_path / "r2", summary=False)
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "r2" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["stage"] == "teacher"]
    assert rec["status"] == "ok" and epochs == [1, 2]  # started over, did not continue after epoch 1


# --- 3. the run folder's record is written last -------------------------------------------------------------
def test_a_failure_after_the_work_leaves_a_failed_record(tiny_cfg, tmp_path, monkeypatch):
    def broken_finish(self, record):
        raise RuntimeError("W&B finish failed")

    monkeypatch.setattr(RunLogger, "finish", broken_finish)
    with pytest.raises(RuntimeError, match="W&B finish failed"):
        run_job(tiny_cfg(*FAST, "method.retrain.epochs=1"), tmp_path / "r", summary=False)
    rec = _records(tmp_path / "r")
    assert rec["status"] == "failed" and "W&B finish failed" in rec["error"]


# --- 4. SIGTERM / SIGUSR1 ---------------------------------------------------------------------------------
def test_sigterm_in_retraining_leaves_a_failed_record_and_resumes_to_the_same_numbers(tiny_cfg, tmp_path,
                                                                                        monkeypatch):
    ref = run_job(tiny_cfg(*FAST, f"store.root={tmp_path}/ref"), tmp_path / "ref", summary=False)
    real_log, real_finish = RunLogger.log, RunLogger.finish
    finished = []

    def log(self, rec):
        real_log(self, rec)
        if rec.get("stage") == "retrain" and rec["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends before the kill

    def finish(self, record):
        finished.append(record["status"])
        real_finish(self, record)

    monkeypatch.setattr(RunLogger, "log", log)
    monkeypatch.setattr(RunLogger, "finish", finish)
    cfg = tiny_cfg(*FAST, f"store.root={tmp_path}/s")
    with pytest.raises(Interrupted) as info:
        run_job(cfg, tmp_path / "a", summary=False)
    assert info.value.signum == signal.SIGTERM
    rec = _records(tmp_path / "a")
    assert rec["status"] == "failed" and "interrupted by SIGTERM" in rec["error"]
    assert finished == ["failed"]  # the logger (W&B) run is finished as failed
    assert list((tmp_path / "s" / "jobs").glob("*/retrain.1.pt"))  # the last checkpoint (after epoch 1) is kept
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the job

    monkeypatch.setattr(RunLogger, "log", real_log)
    again = run_job(cfg, tmp_path / "b", summary=False)
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["stage"] == "retrain"]
    assert again["status"] == "ok" and epochs == [2, 3] and again["metrics"] == ref["metrics"]


def test_sigterm_exits_143_and_sigusr1_138_from_the_cli(tmp_path):
    env = {**os.environ, "KDPRUNE_STORE": str(tmp_path / "store"), "OMP_NUM_THREADS": "1"}
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGUSR1, 138)):
        run = tmp_path / sig.name
        p = subprocess.Popen([sys.executable, "-m", "kdprune_cli.cli.main", "experiment=quickstart", "progress=false",
                              "teacher.train.epochs=50", f"hydra.run.dir={run}"], env=env, cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + SAFETY_S
        while time.time() < deadline and p.poll() is None and not (run / "metrics.jsonl").is_file():
            time.sleep(0.05)
        time.sleep(1.0)
        p.send_signal(sig)
        _, err = p.communicate(timeout=SAFETY_S)
        assert p.returncode == code, err[-2000:]
        assert f"interrupted by {sig.name}" in err and "Traceback" not in err
        rec = _records(run)
        assert rec["status"] == "failed" and f"interrupted by {sig.name}" in rec["error"]


# --- 5–8. bad input: one line, exit 2, before any training ---------------------------------------------------
BAD = [
    ("method.retrain.epochs=-1", "method.retrain.epochs"),
    ("method.retrain.batch_size=0", "method.retrain.batch_size"),
    ("method.retrain.lr=-0.1", "method.retrain"),
    ("method.finetune.batch_size=0", "method.finetune.batch_size"),
    ("method.score_batch_size=0", "method.score_batch_size"),
    ("prune.exclude=[nope]", "prune.exclude"),
    ("device=cuda:x", "device must be"),
    ("device=cuda:7", "device=cuda:7"),
]


@pytest.mark.parametrize("override,match", BAD)
def test_bad_values_fail_before_any_work(tiny_cfg, tmp_path, override, match):
    cfg = tiny_cfg(override)
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=match):
        run_job(cfg, tmp_path / "r", summary=False, overrides=[override])
    assert time.perf_counter() - t < 20
    rec = _records(tmp_path / "r")
    assert rec["status"] == "failed" and rec["cost"]["stages"] == {}
    assert not (tmp_path / "store" / "teacher").exists()


def test_a_wrong_type_is_refused_when_the_config_is_composed(tiny_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="method.alpha=abc"):
        tiny_cfg("method.alpha=abc")


def test_method_name_cannot_be_swapped_under_a_method_config(tiny_cfg, tmp_path):
    cfg = tiny_cfg("method.name=snip")
    with pytest.raises(ConfigError, match="method=<name>"):
        run_job(cfg, tmp_path / "r", summary=False, overrides=["method=cakld", "method.name=snip"])


def _cli(args, tmp_path):
    env = {**os.environ, "KDPRUNE_STORE": str(tmp_path / "store"), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "kdprune_cli.cli.main", "experiment=quickstart", "progress=false",
                           *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=SAFETY_S)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "afile").write_text("")
    bad_ck = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "obj": threading.Lock}, bad_ck)  # a pickled global, not a tensor
    cases = [["method.name=snip"], ["method.retrain.batch_size=0"], ["prune.exclude=[nope]"],
             ["hydra.run.dir=afile/run"], ["store.root=afile/store"], [f"teacher.checkpoint={bad_ck}"]]
    for args in cases:
        run_dir = [] if any(a.startswith("hydra.run.dir") for a in args) else [f"hydra.run.dir={tmp_path}/run"]
        r = _cli([*args, *run_dir], tmp_path)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("kdprune: error:"), (args, r.stderr)
        assert "weights_only" not in r.stderr and "unexpected pos" not in r.stderr
    assert "Not a directory" in _cli(["store.root=afile/store", f"hydra.run.dir={tmp_path}/r2"], tmp_path).stderr


def test_checkpoint_errors_are_said_in_our_words(tmp_path):
    model = build_model("resnet20", 10, 1, 8)
    evil = tmp_path / "evil.pt"
    torch.save({"obj": threading.Lock}, evil)
    with pytest.raises(CheckpointError, match="Python objects other than tensors") as info:
        load_checkpoint(str(evil), model, "resnet20")
    assert "weights_only" not in str(info.value)
    cut = tmp_path / "cut.pt"
    torch.save(model.state_dict(), cut)
    _truncate(cut)
    with pytest.raises(CheckpointError, match="truncated, damaged or not a PyTorch checkpoint"):
        load_checkpoint(str(cut), model, "resnet20")


# --- 12. waiting on another job's lock is not this job's stage time --------------------------------------------
def test_lock_wait_is_not_counted_as_stage_seconds(make_ctx):
    ctx = make_ctx()
    spec = {"what": "lock-wait test"}
    d = ctx.artifacts.store.dir("probe", ctx.artifacts.store.key(spec))
    d.mkdir(parents=True)
    t = hold_lock(d / "stage", 1.5)
    t0 = time.perf_counter()
    ctx.artifacts.cached_model("probe", spec, lambda: ctx.seeds.new_model("student"),
                               lambda m, ck: {"seconds": 0.0, "samples": 0, "teacher_samples": 0})
    elapsed = time.perf_counter() - t0
    t.join()
    st = ctx.costs.stages["probe"]
    assert st.lock_wait_seconds > 1.0 and st.seconds <= elapsed - st.lock_wait_seconds + 1e-6


def test_storage_errors_are_one_line_in_the_systems_words():
    import errno

    from kdprune_cli.errors import storage_error

    assert storage_error(OSError(errno.ENOSPC, "No space left on device", "/store/x.pt")) == \
        "cannot write /store/x.pt: No space left on device"
    assert "Read-only file system" in storage_error(OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro"))
    assert storage_error(RuntimeError("unexpected pos")) is None  # not a storage error: not dressed up as one
