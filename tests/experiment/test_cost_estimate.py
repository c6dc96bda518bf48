"""``kdprune-estimate`` counts, before a sweep runs, the samples its records will book: every job's stages, with the
dense models, CA-KLD's fine-tuned student and the iterative methods' full rounds counted once per sweep; bad
input is one line and exit 2; a rates file turns samples into GPU-hours."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from records import assert_estimate_matches
from runs import kdprune

from kdprune_cli.config.schema import TrainRecipe
from kdprune_cli.data import DeviceData
from kdprune_cli.distill import self_distillation as sd
from kdprune_cli.distill.objectives import CrossEntropy, Distill
from kdprune_cli.experiment.estimate import JobCount, gpu_seconds
from kdprune_cli.models import build_model
from kdprune_cli.pruning.budget import Budget, Count
from kdprune_cli.training.loop import train
from conftest import SAFETY_S, compose_cfg


def records(tmp_path) -> dict:
    return {int(p.parent.name): json.loads(p.read_text()) for p in (tmp_path / "multi").glob("*/results.json")}


def test_quickstart_sweep_books_what_was_estimated(tmp_path):
    """The preset's 8 jobs (CA-KLD and magnitude × 2 sparsities × 2 seeds), every training cut to 2 batches an
    epoch: one teacher, one dense student and one fine-tuned student per seed for the whole sweep."""
    args = ["experiment=quickstart_sweep", "max_batches=2", "progress=false"]
    r = kdprune(args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = records(tmp_path)
    assert len(recs) == 8 and all(x["status"] == "ok" for x in recs.values())
    assert_estimate_matches(args, recs)
    made = [i for i, x in recs.items() if x["cost"]["stages"].get("finetune", {}).get("samples")]
    assert len(made) == 2  # seeds 0 and 1; the other CA-KLD jobs read it from the store


def test_shared_rounds_channels_and_self_distillation_are_counted(tmp_path):
    """IMP's full rounds are made once for both targets; channel rounds are not shared; EPSD's CS-KD partners and
    NutePrune's snapshot teachers are teacher samples."""
    pytest.importorskip("peft")
    args = ["debug=default", "method=imp,epsd,nuteprune", "prune.granularity=weight,channel", "sparsity=0.5,0.8",
            "progress=false"]
    r = kdprune(["-m", *args], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = records(tmp_path)
    assert len(recs) == 12 and all(x["status"] == "ok" for x in recs.values())
    assert_estimate_matches(args, recs)
    reused = [x for x in recs.values() if "imp.reused" in x["cost"]["stages"]]
    assert reused and all(x["granularity"] == "weight" for x in reused)


@pytest.mark.parametrize("make", [
    lambda d, g: CrossEntropy(),
    lambda d, g: Distill(build_model("resnet20", 10, 1, 8), alpha=0.9, gamma=0.5, temperature=2.0, logit_norm=True),
    lambda d, g: sd.CSKD(d, gen=g),
    lambda d, g: sd.PSKD(d, epochs=2),
    lambda d, g: sd.DLB(d, gen=g),
], ids=["ce", "distill", "cs_kd", "ps_kd", "dlb"])
def test_an_objectives_rates_give_the_samples_the_loop_books(make):
    g = torch.Generator().manual_seed(0)
    blob = {"x_train": torch.randint(0, 256, (70, 1, 8, 8), generator=g, dtype=torch.uint8),
            "y_train": torch.arange(70) % 10, "x_test": torch.zeros(10, 1, 8, 8, dtype=torch.uint8),
            "y_test": torch.arange(10)}
    data = DeviceData("digits", blob, torch.device("cpu"))
    objective = make(data, g)
    node = TrainRecipe(epochs=2, batch_size=16, lr=0.01, eval_every=0)
    stats = train(build_model("resnet20", 10, 1, 8), data, node, objective, gen=torch.Generator().manual_seed(1),
                  progress=False)
    b = Budget(compose_cfg(["experiment=quickstart"]), 70, 10, 1, 8)
    b.train("retrain", node, "retrain", None if isinstance(objective, CrossEntropy) else type(objective))
    c = b.stages["retrain"]
    assert (c.samples, c.teacher_samples) == (stats["samples"], stats["teacher_samples"])
    assert c.samples >= 2 * 4 * 16  # 4 full batches an epoch


def test_rates_give_gpu_hours_by_the_network_each_sample_goes_through():
    job = JobCount([], "cakld", 0.9, 0, {"teacher": Count(samples=3600), "retrain": Count(7200, 3600),
                                          "prune": Count(0, 3600, self_teacher=True)}, teacher="resnet56",
                   student="resnet20")
    rates = {"train": {"resnet56": 1.0, "resnet20": 2.0}, "forward": {"resnet56": 4.0, "resnet20": 12.0}}
    assert gpu_seconds(job, rates) == pytest.approx(3600 + 3600 + 900 + 300)
    assert gpu_seconds(job, {"train": {"resnet20": 2.0}, "forward": rates["forward"]}) is None


def estimate_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kdprune_cli.cli.estimate", *args], capture_output=True, text=True,
                          timeout=SAFETY_S, cwd=cwd)


def test_the_paper_grid_is_counted_and_priced(tmp_path):
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"device": "a test's numbers", "train": {"resnet20": 10000.0, "resnet56": 4000.0},
                                 "forward": {"resnet20": 30000.0, "resnet56": 12000.0}}))
    r = estimate_cli("experiment=paper_cifar10", "--rates", str(rates))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("kdprune-estimate: 90 jobs (resnet56 → resnet20);")
    rows = {ln.split("|")[1].strip(): ln for ln in lines if ln.startswith("| ")}
    assert {"cakld", "cakld_ce", "epg", "epsd", "colt", "total"} <= set(rows)
    assert "hours (a test's numbers)" in r.stdout and "no rate for" not in r.stdout
    assert any(ln.startswith("approximate: colt") for ln in lines)


@pytest.mark.parametrize("args, match", [
    (["method=nope"], "method"),
    (["experiment=quickstrat"], "quickstrat"),
    (["experiment=quickstart", "sparsity=1.5"], "sparsity"),
    (["experiment=quickstart", "--rates", "/nonexistent/rates.json"], "--rates"),
])
def test_bad_input_is_one_line_and_exit_2(args, match):
    r = estimate_cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdprune-estimate: error:") and match in lines[0], r.stderr
