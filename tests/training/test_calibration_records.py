"""Calibration in the record: MCE and RMSCE beside ECE, temperature scaling fitted on held-out data only,
reliability bins (what kdprune-report makes of them: tests/report/test_calibration_report.py)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from records import _check_png
from torch import nn
from torchmetrics.classification import MulticlassCalibrationError

from kdprune_cli.cli.eval import main as eval_main
from kdprune_cli.experiment.job import run_job
from kdprune_cli.report.cli import main
from kdprune_cli.training.evaluate import (
    classification_metrics,
    evaluate_splits,
    fit_temperature,
    reliability_bins,
    temperature_scaled,
)

FAST = ["method.finetune.epochs=1", "method.retrain.epochs=1", "method.score_batches=2", "method.gamma_batches=2"]

# Six samples, three classes; confidences kept away from the bin edges k/15.
PROBS = torch.tensor([[0.90, 0.05, 0.05],   # conf 0.90, correct    bin 13
                      [0.92, 0.04, 0.04],   # conf 0.92, wrong      bin 13
                      [0.62, 0.28, 0.10],   # conf 0.62, wrong      bin 9
                      [0.20, 0.70, 0.10],   # conf 0.70, correct    bin 10
                      [0.50, 0.25, 0.25],   # conf 0.50, wrong      bin 7
                      [0.25, 0.50, 0.25]])  # conf 0.50, correct    bin 7
LABELS = torch.tensor([0, 1, 1, 1, 2, 1])
# per non-empty bin: (samples, mean confidence, accuracy)
BINS = {13: (2, 0.91, 0.5), 9: (1, 0.62, 0.0), 10: (1, 0.70, 1.0), 7: (2, 0.50, 0.5)}


def test_mce_and_rmsce_by_hand_and_as_torchmetrics():
    m = classification_metrics(PROBS.log(), LABELS, n_bins=15)
    gaps = {b: abs(conf - acc) for b, (_, conf, acc) in BINS.items()}  # 0.41, 0.62, 0.30, 0.00
    w = {b: n / 6 for b, (n, _, _) in BINS.items()}
    assert m["ece"] == pytest.approx(sum(w[b] * gaps[b] for b in BINS), rel=1e-5)  # 0.29
    assert m["mce"] == pytest.approx(0.62, rel=1e-5)
    assert m["rmsce"] == pytest.approx(math.sqrt(sum(w[b] * gaps[b] ** 2 for b in BINS)), rel=1e-5)
    for norm, key in (("max", "mce"), ("l2", "rmsce")):  # the stateful metric, fed in two batches
        metric = MulticlassCalibrationError(num_classes=3, n_bins=15, norm=norm)
        metric.update(PROBS[:3], LABELS[:3])
        metric.update(PROBS[3:], LABELS[3:])
        assert m[key] == pytest.approx(float(metric.compute()), rel=1e-6)


def test_reliability_bins_by_hand():
    r = reliability_bins(PROBS.log(), LABELS, n_bins=15)
    assert r["count"] == [BINS.get(b, (0,))[0] for b in range(15)]
    for b in range(15):
        if b in BINS:
            assert r["confidence"][b] == pytest.approx(BINS[b][1], rel=1e-5)
            assert r["accuracy"][b] == pytest.approx(BINS[b][2])
        else:
            assert r["confidence"][b] is None and r["accuracy"][b] is None
    json.dumps(r, allow_nan=False)  # a plain JSON object


def _calibrated(n: int, seed: int, classes: int = 10):
    """Logits of a perfectly calibrated model: each label is drawn from softmax(logits)."""
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(n, classes, generator=g)
    return z, torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)


def test_temperature_scaling_recovers_a_known_temperature():
    (zv, yv), (zt, yt) = _calibrated(8000, 0), _calibrated(8000, 1)
    assert fit_temperature(zv, yv) == pytest.approx(1.0, abs=0.05)  # calibrated: nothing to undo
    val, test = (3 * zv, yv), (3 * zt, yt)  # three times too confident
    assert fit_temperature(*val) == pytest.approx(3.0, rel=0.03)
    ts = temperature_scaled(val, test)
    before = classification_metrics(*test)
    assert ts["temperature"] == pytest.approx(3.0, rel=0.03)
    assert ts["ece_ts"] < before["ece"] / 5 and ts["nll_ts"] < before["nll"]
    r = reliability_bins(*test)  # ECE from the recorded bins is the recorded ECE
    ece = sum(n * abs(a - c) for n, c, a in zip(r["count"], r["confidence"], r["accuracy"]) if n) / len(yt)
    assert ece == pytest.approx(before["ece"], rel=1e-4)


def test_temperature_stays_in_range_on_separable_data():
    z = torch.tensor([[5.0, 0.0], [0.0, 5.0]] * 50)
    y = torch.tensor([0, 1] * 50)
    t = fit_temperature(z, y)  # NLL keeps falling as T -> 0 (LBFGS stops where its gradient vanishes)
    assert 0.01 <= t < 0.5 and math.isfinite(t)  # sharper than T = 1, finite, in range


class LogitData:
    """Splits whose inputs are logits already: with ``nn.Identity`` as the model, predictions are the inputs."""

    def __init__(self, **splits):
        self.splits, self.val = splits, splits.get("val")

    def batches(self, split, batch_size):
        z, y = self.splits[split]
        for i in range(0, len(y), batch_size):
            yield z[i:i + batch_size], y[i:i + batch_size], torch.arange(i, min(i + batch_size, len(y)))


def test_temperature_is_fitted_on_validation_never_on_test():
    (zv, yv), (zt, yt) = _calibrated(4000, 2), _calibrated(4000, 3)
    data = LogitData(val=(3 * zv, yv), test=(zt, yt))  # overconfident on val, calibrated on test
    out = evaluate_splits(nn.Identity(), data, ("test", "val"), batch_size=1000)
    assert out["test"]["temperature"] == pytest.approx(3.0, rel=0.05)  # test alone would give T = 1
    assert out["test"]["ece_ts"] > out["test"]["ece"]  # so scaling the calibrated test logits hurts here
    assert not {"temperature", "ece_ts", "nll_ts"} & set(out["val"])
    assert out["val"]["reliability"]["count"] and out["test"]["reliability"]["count"]
    alone = evaluate_splits(nn.Identity(), LogitData(test=(zt, yt)), ("test",), batch_size=1000)["test"]
    assert not {"temperature", "ece_ts", "nll_ts"} & set(alone)  # no held-out split: no fit at all
    assert {"ece", "mce", "rmsce", "reliability"} <= set(alone)


def test_record_of_a_run_with_a_validation_split(tiny_cfg, tmp_path, capsys):
    rec = run_job(tiny_cfg("data.val_split=0.2", *FAST), tmp_path / "r", summary=False)
    assert rec["status"] == "ok", rec["error"]
    for model in ("teacher", "dense_student", "pruned", "final"):
        m = rec["metrics"][model]
        assert {"ece", "mce", "rmsce", "temperature", "ece_ts", "nll_ts", "reliability"} <= set(m), model
        assert 0 <= m["ece"] <= m["mce"] <= 1 and m["ece"] <= m["rmsce"] <= m["mce"]
        assert 0.01 <= m["temperature"] <= 100
        r = m["reliability"]
        assert len(r["count"]) == 15 and sum(r["count"]) == 360  # digits: 360 test images
        v = rec["metrics_val"][model]
        assert {"mce", "rmsce", "reliability"} <= set(v) and "ece_ts" not in v
    on_disk = json.loads((tmp_path / "r" / "results.json").read_text())
    assert on_disk["metrics"]["final"]["ece_ts"] == rec["metrics"]["final"]["ece_ts"]
    # kdprune-eval reloads the model and gives the record's final metrics, the fitted temperature included
    assert eval_main([str(tmp_path / "r"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == on_disk["metrics"]["final"]
    # the diagram from the run's own record, into its folder
    assert main(["--reliability", str(tmp_path / "r")]) == 0
    png = tmp_path / "r" / f"reliability_{rec['job_id']}.png"
    _check_png(png)


def test_record_without_validation_split_has_no_temperature(tiny_cfg, tmp_path):
    rec = run_job(tiny_cfg(*FAST), tmp_path / "r", summary=False)
    assert rec["status"] == "ok" and "metrics_val" not in rec
    for model in ("teacher", "dense_student", "final"):
        m = rec["metrics"][model]
        assert {"mce", "rmsce", "reliability"} <= set(m)
        assert not {"temperature", "ece_ts", "nll_ts"} & set(m)
