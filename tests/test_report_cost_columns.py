"""kdprune-report shows a cost column or plot only with numbers behind it (else one line says how to get them),
its plots draw the spread the tables give (mean ± sample std), and a run that reused a finished job is not
averaged into the seconds per run."""
from __future__ import annotations

import csv
import copy

import numpy as np
import pytest

from kdprune_cli.report import main as report
from kdprune_cli.report.main import main

from records import ACC, SEEDS, SPARSITIES, _job, _label, _record, _seconds, _stats, write_grid
from records import PLOT, _row


def _masked(method, kd, sparsity, seed, job):
    """A weight-granularity run as run_job records it: it executes every MAC of the dense student."""
    rec = _record(method, kd, sparsity, seed, job)
    rec["granularity"] = "weight"
    rec["flops"] = {"dense": 40_000_000, "sparse": int(40_000_000 * (1 - sparsity)), "executed": 40_000_000}
    return rec


def test_weight_granularity_sweep_gets_lines_not_empty_cost_columns_nor_a_latency_plot(tmp_path):
    sweep = tmp_path / "multi"
    write_grid(sweep, _masked)
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out), "--cost", "all"]) == 0
    md = (out / "report.md").read_text()
    assert "| method | sparsity 0.5 | sparsity 0.9 | seconds / run | samples / run¹ |" in md
    assert "1.00×" not in md and "—." not in md and "Cost of inference" not in md
    assert "Dense student cost: 40.00 M MACs per input." in md
    assert ("MACs column left out: every run executes all of the dense student's MACs (weight granularity zeroes "
            "weights but removes none); `prune.granularity=channel` removes channels and executes fewer.") in md
    assert ("Speed-up column left out: no run measured latency at batch 1, eager; run with `eval.latency=true` "
            "(or time a saved model: `kdprune-eval RUN_DIR --latency`).") in md
    assert not (out / PLOT).exists()  # every point at the dense MACs: a vertical line, not drawn
    assert "\\begin{tabular}{lccrr}" in (out / "report.tex").read_text()


def test_accuracy_vs_sparsity_plot_draws_mean_and_sample_std_as_the_tables(tmp_path, monkeypatch):
    sweep = tmp_path / "multi"
    write_grid(sweep, _record)
    drawn = {}
    finish = report._finish

    def spy(fig, ax, t, metric, how, path):
        if path.name.startswith("accuracy_vs_sparsity"):
            drawn["how"] = how
            for container in ax.containers:
                segs = container.lines[2][0].get_segments()  # one vertical error bar per sparsity
                drawn[container.get_label()] = [(float(s[0][1]), float(s[1][1])) for s in segs]
        return finish(fig, ax, t, metric, how, path)

    monkeypatch.setattr(report, "_finish", spy)
    assert main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    assert "± sample std" in drawn["how"] and "min" not in drawn["how"]
    md = (tmp_path / "out" / "report.md").read_text()
    for (method, kd), per_sp in ACC.items():
        for i, sp in enumerate(SPARSITIES):
            m, s, n = _stats(per_sp[sp])
            assert f"{m:.2f} ± {s:.2f} (n={n})" in _row(md, _label(method, kd))[i]
            assert drawn[_label(method, kd)][i] == pytest.approx((m - s, m + s))


def test_reused_runs_are_counted_apart_from_the_seconds_per_run(tmp_path):
    """A sweep whose runs of magnitude at 0.5 reused jobs finished earlier: their seconds (the earlier runs')
    are not averaged as new work; samples count what the result cost (the original run's)."""
    sweep = tmp_path / "multi"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    num = 0
    for sp in SPARSITIES:
        for seed in SEEDS:
            rec = _record("magnitude", None, sp, seed, num)
            if sp == 0.5 and seed != 0:  # reused: booked as such, with the original run's cost kept
                rec["cost"] = {"reused": True, "stages": {}, "total_seconds": 0.25,
                               "original": copy.deepcopy(rec["cost"])}
                rec["cost"]["original"]["total_seconds"] = 387.0
                rec["reused_from"] = f"/store/jobs/job{num:03d}/results.json"
            _job(sweep, num, rec)
            num += 1
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    own = [_seconds("magnitude", None, sp, s) for sp in SPARSITIES for s in SEEDS if not (sp == 0.5 and s != 0)]
    cells = _row(md, "magnitude")
    assert cells[-2] == f"{np.mean(own):.1f} (2 reused)"
    assert "387" not in md and "0.2" not in cells[-2]
    assert "`N reused`" in md
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["runs_reused"] for r in rows] == ["2", "0"]
    assert float(rows[0]["seconds_mean"]) == pytest.approx(_seconds("magnitude", None, 0.5, 0))
    with open(out / "report.csv", newline="") as f:
        rows_samples = [float(r["samples_mean"]) for r in csv.DictReader(f)]
    assert rows_samples[0] > 30000  # the reused runs count what their original runs cost, not 0
    assert "(2 reused)" in (out / "report.tex").read_text()
