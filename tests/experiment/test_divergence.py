"""A training that diverges (NaN or infinite loss, weights or metrics) ends the job ``failed`` with one line
naming the stage, the epoch and the value: never an ``ok`` record, never a stored artifact or saved model."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SAFETY_S, TINY

from kdprune_cli.errors import DivergedError, non_finite_metrics, non_finite_state
from kdprune_cli.experiment.job import run_job
from kdprune_cli.experiment.services import Evaluator
from kdprune_cli.models.masks import assert_masked
from kdprune_cli.store.artifacts import Store

FAST = ["method.finetune.epochs=1", "method.retrain.epochs=2", "method.score_batches=2", "method.gamma_batches=2"]
NUTE = ["method=nuteprune", "sparsity=0.5", "method.prune.epochs=2", "method.ramp_epochs=1", "method.teacher_ahead=2",
        "method.retrain.epochs=1", "max_batches=6"]


def _record(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_cli_divergence_in_channel_retraining_is_one_line_exit_1_and_a_failed_record(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "KDPRUNE_STORE": str(tmp_path / "store"), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "kdprune_cli.cli.main", *TINY, *FAST, "print_config=false",
                        "prune.granularity=channel", "method.retrain.lr=1e6", "max_batches=4",
                        f"hydra.run.dir={run}"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=SAFETY_S)
    lines = [x for x in r.stderr.splitlines() if x.startswith("kdprune:") or "Traceback" in x]
    assert r.returncode == 1, r.stderr[-2000:]
    one_line = (r"kdprune: error: training diverged in stage retrain \(epoch 1\): loss \S+"
                r"(, non-finite values in .+)?; lower the learning rate \(method\.retrain\.lr=\.\.\.\)")
    assert len(lines) == 1 and re.fullmatch(one_line, lines[0]), r.stderr[-2000:]
    rec = _record(run)
    assert rec["status"] == "failed" and "diverged in stage retrain (epoch 1)" in rec["error"]
    assert not (run / "model.pt").exists()


def test_a_diverged_teacher_is_not_stored(tiny_cfg, tmp_path):
    with pytest.raises(DivergedError, match=r"diverged in stage teacher \(epoch 1\): loss .*teacher\.train\.lr"):
        run_job(tiny_cfg(*FAST, "teacher.train.lr=1e6"), tmp_path / "r", summary=False)
    rec = _record(tmp_path / "r")
    assert rec["status"] == "failed" and "stage teacher" in rec["error"]
    assert list((tmp_path / "store").rglob("artifact.pt")) == []  # no teacher (nor anything) stored
    assert not list((tmp_path / "store").glob("teacher/*/partial.pt"))  # nor a diverged epoch's checkpoint


def test_weight_granularity_divergence_says_diverged_not_pruned_weights_non_zero(tiny_cfg, tmp_path):
    with pytest.raises(DivergedError, match=r"diverged in stage retrain \(epoch 1\)") as info:
        run_job(tiny_cfg(*FAST, "method.retrain.lr=1e6"), tmp_path / "r", summary=False)
    assert "non-zero" not in str(info.value)
    assert _record(tmp_path / "r")["status"] == "failed"


@pytest.mark.parametrize("override,stage", [("method.retrain.lr=1e6", "retrain"), ("method.prune.lr=1e6", "prune")])
def test_nuteprune_divergence_ends_failed_with_the_stage_named(tiny_cfg, tmp_path, override, stage):
    with pytest.raises(DivergedError, match=rf"diverged in stage {stage} .*method\.{stage}\.lr"):
        run_job(tiny_cfg(*NUTE, override), tmp_path / "r", summary=False)
    rec = _record(tmp_path / "r")
    assert rec["status"] == "failed" and f"diverged in stage {stage}" in rec["error"]
    assert not (tmp_path / "r" / "model.pt").exists()


def test_non_finite_final_metrics_are_never_recorded_ok(tiny_cfg, tmp_path, monkeypatch):
    real = Evaluator.record_metrics

    def record_metrics(self, key, model, cached=None):  # an evaluation that came out NaN
        real(self, key, model, cached)
        if key == "final":
            self.metrics[key]["nll"] = float("nan")

    monkeypatch.setattr(Evaluator, "record_metrics", record_metrics)
    with pytest.raises(DivergedError, match=r"final\.nll=nan"):
        run_job(tiny_cfg(*FAST, "method.retrain.epochs=1"), tmp_path / "r", summary=False)
    assert _record(tmp_path / "r")["status"] == "failed"
    assert not (tmp_path / "r" / "model.pt").exists()


def test_the_store_refuses_a_non_finite_model(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(DivergedError, match=r"stage teacher: non-finite values in model\.w"):
        store.get_or_create("teacher", {"k": 1}, lambda: ({"model": {"w": torch.tensor([1.0, float("nan")])}}, {}))
    assert not list(tmp_path.rglob("artifact.pt")) and not list(tmp_path.rglob("meta.json"))
    state, _, cached = store.get_or_create("teacher", {"k": 1}, lambda: ({"model": {"w": torch.ones(2)}}, {}))
    assert not cached and torch.equal(state["model"]["w"], torch.ones(2))


def test_assert_masked_reports_non_finite_weights_as_divergence(tiny_net):
    masks = {"conv.weight": torch.ones_like(tiny_net.conv.weight, dtype=torch.bool)}
    masks["conv.weight"][0] = False
    with torch.no_grad():
        tiny_net.conv.weight[0] = 0.0
    assert_masked(tiny_net, masks)
    with torch.no_grad():
        tiny_net.conv.weight[0] = float("nan")  # a pruned NaN weight stays NaN when masked (NaN·0)
    with pytest.raises(DivergedError, match=r"non-finite weights in conv\.weight"):
        assert_masked(tiny_net, masks)
    with torch.no_grad():
        tiny_net.conv.weight[0] = 1.0
    with pytest.raises(AssertionError, match="pruned weights of conv.weight are non-zero"):
        assert_masked(tiny_net, masks)


def test_finiteness_helpers():
    assert non_finite_metrics({"final": {"top1": 10.0, "nll": float("nan")}, "teacher": {"top1": 99.0}}) == [
        "final.nll=nan"]
    assert non_finite_state({"model": {"a": torch.ones(2), "b": torch.tensor([float("inf")]),
                                       "n": torch.ones(1, dtype=torch.long)}}) == ["model.b"]
