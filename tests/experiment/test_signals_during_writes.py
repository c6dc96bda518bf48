"""SIGTERM / SIGUSR1 never land inside a write: a signal that arrives while an atomic write is in progress is
raised once the file is complete, so the job exits 143 (138) with ``interrupted by SIGTERM``, keeps a
complete checkpoint and resumes to the numbers of an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import SAFETY_S, TINY
from sigterm_write import sigterm_in_checkpoint_write

from kdprune_cli.experiment.job import run_job
from kdprune_cli.experiment.signals import Interrupted, signals_interrupt
from kdprune_cli.store import atomic
from kdprune_cli.store.atomic import atomic_save, defer_while_writing, writing

CHANNEL = ["method.finetune.epochs=1", "method.retrain.epochs=3", "method.score_batches=2", "method.gamma_batches=2",
           "prune.granularity=channel", "sparsity=0.5", "max_batches=4"]
NUTE = ["method=nuteprune", "sparsity=0.5", "method.prune.epochs=3", "method.ramp_epochs=1", "method.teacher_ahead=2",
        "method.retrain.epochs=1", "max_batches=6"]
DRIVER = Path(__file__).resolve().parents[1] / "sigterm_write.py"  # kdprune with SIGTERM inside the write of retrain.1.pt


def _record(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _epochs(run: Path, stage: str) -> list:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["epoch"] for r in recs if r.get("stage") == stage and "epoch" in r]


def test_a_signal_during_a_write_is_raised_once_the_file_is_complete(tmp_path, monkeypatch):
    real, sent = atomic.write_all, []

    def write_all(fd, data):  # the signal comes while torch.save is writing the file's first bytes
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        real(fd, data)

    monkeypatch.setattr(atomic, "write_all", write_all)
    obj = {"w": torch.arange(1000.0), "n": 3}
    with signals_interrupt():
        with pytest.raises(Interrupted) as info:
            atomic_save(obj, tmp_path / "ck.pt")
    assert sent and info.value.signum == signal.SIGTERM
    back = torch.load(tmp_path / "ck.pt", weights_only=True)  # complete, not torch's "unexpected pos"
    assert torch.equal(back["w"], obj["w"]) and back["n"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sections_nest_and_only_the_main_thread_defers():
    fired = []
    with writing():
        with writing():
            assert defer_while_writing(lambda: fired.append(1))
            assert defer_while_writing(lambda: fired.append(2))  # one pending action: the first
        assert fired == []  # still inside the outer write
    assert fired == [1]
    assert not defer_while_writing(lambda: fired.append(3))  # outside a write the handler acts at once

    inside, leave = threading.Event(), threading.Event()

    def worker():  # a write on another thread: Python's signal handlers never run there
        with writing():
            inside.set()
            leave.wait(60)

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(60)
    try:
        assert not defer_while_writing(lambda: fired.append(4))  # the main thread is not writing
    finally:
        leave.set()
        t.join()
    assert fired == [1]


def test_a_write_that_fails_still_delivers_the_pending_signal():
    def interrupt():
        raise Interrupted(signal.SIGUSR1)

    with pytest.raises(Interrupted) as info:
        with writing():
            defer_while_writing(interrupt)
            raise OSError(28, "No space left on device")
    assert info.value.signum == signal.SIGUSR1 and isinstance(info.value.__context__, OSError)


@pytest.mark.parametrize("extra,stage,total", [(CHANNEL, "retrain", 3), (NUTE, "prune", 3)],
                         ids=["channel-retrain", "nuteprune"])
def test_sigterm_inside_a_checkpoint_write_resumes_to_the_same_numbers(tiny_cfg, tmp_path, monkeypatch, extra,
                                                                        stage, total):
    ref = run_job(tiny_cfg(*extra, f"store.root={tmp_path}/ref"), tmp_path / "ref", summary=False)
    assert ref["status"] == "ok"
    cfg = tiny_cfg(*extra, f"store.root={tmp_path}/s")
    with monkeypatch.context() as m:
        sent = sigterm_in_checkpoint_write(m.setattr, f"{stage}.1.pt", 2)
        with pytest.raises(Interrupted) as info:
            run_job(cfg, tmp_path / "a", summary=False)
    assert sent and info.value.signum == signal.SIGTERM
    rec = _record(tmp_path / "a")
    assert rec["status"] == "failed" and rec["error"] == "Interrupted: interrupted by SIGTERM"
    (ck,) = (tmp_path / "s" / "jobs").glob(f"*/{stage}.1.pt")
    assert torch.load(ck, weights_only=True)["epoch"] == 2  # the write the signal met was finished
    again = run_job(cfg, tmp_path / "b", summary=False)
    assert again["status"] == "ok" and _epochs(tmp_path / "b", stage) == list(range(3, total + 1))
    assert again["metrics"] == ref["metrics"] and again["sparsity_actual"] == ref["sparsity_actual"]


def test_cli_sigterm_inside_a_checkpoint_write_exits_143_with_a_failed_record(tmp_path):
    env = {**os.environ, "KDPRUNE_STORE": str(tmp_path / "store"), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    args = [*TINY, *CHANNEL, "print_config=false"]
    r = subprocess.run([sys.executable, str(DRIVER), *args, f"hydra.run.dir={tmp_path}/a"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=SAFETY_S)
    assert r.returncode == 143, r.stderr[-3000:]
    assert "kdprune: interrupted by SIGTERM; rerun the same command to resume" in r.stderr
    assert "Traceback" not in r.stderr and "unexpected pos" not in r.stderr
    rec = _record(tmp_path / "a")
    assert rec["status"] == "failed" and "interrupted by SIGTERM" in rec["error"]
    (ck,) = (tmp_path / "store" / "jobs").glob("*/retrain.1.pt")
    assert torch.load(ck, weights_only=True)["epoch"] == 2  # complete: the rerun resumes after epoch 2
