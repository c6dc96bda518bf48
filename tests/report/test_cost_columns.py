"""kdprune-report --cost: the executed-MACs ratio and the speed-up over the dense student beside each sparsity
(Markdown, CSV, LaTeX), the latency setting they use, and a cost column shown only with numbers behind it (else
one line says how to get them)."""
from __future__ import annotations

import csv

import pytest
from records import (
    ACC,
    DENSE_MACS,
    PLOT,
    SEEDS,
    SPARSITIES,
    _channel_record,
    _check_png,
    _dense_ms,
    _executed,
    _final_ms,
    _job,
    _label,
    _record,
    _row,
    _stats,
    write_grid,
)

from kdprune_cli.report.cli import main


def test_cost_all_markdown_csv_tex_and_plot(channel_sweep, tmp_path):
    out = tmp_path / "report"
    assert main([str(channel_sweep), "--out", str(out), "--cost", "all"]) == 0
    md = (out / "report.md").read_text()
    assert ("| method | sparsity 0.5 | MACs 0.5 | speed-up 0.5 | sparsity 0.9 | MACs 0.9 | speed-up 0.9 "
            "| seconds / run | samples / run¹ |") in md
    assert "|---|" + "---:|" * 8 in md
    for (method, kd), per_sp in ACC.items():
        cells = _row(md, f"{_label(method, kd)} (channel)")
        for i, sp in enumerate(SPARSITIES):
            m, s, n = _stats(per_sp[sp])
            macs = sum(_executed(method, sp, x) / DENSE_MACS for x in SEEDS) / len(SEEDS)
            speed = sum(_dense_ms(x, 1, "eager") / _final_ms(method, sp, x, 1, "eager") for x in SEEDS) / len(SEEDS)
            assert cells[3 * i: 3 * i + 3] == [f"{m:.2f} ± {s:.2f} (n={n})", f"{macs:.2f}×", f"{speed:.2f}×"]
    dense_ms = sum(_dense_ms(x, 1, "eager") for x in SEEDS) / len(SEEDS)
    assert (f"Dense student cost: 40.00 M MACs per input, {dense_ms:.3f} ms median (batch 1, eager, n=18; "
            "cpu float32).") in md
    assert "Cost of inference: MACs = executed MACs" in md and "speed-up = dense student median ms" in md

    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(ACC) * len(SPARSITIES)
    for r in rows:
        method, sp = r["method"], float(r["sparsity"])
        assert r["granularity"] == "channel"
        assert float(r["macs_executed_mean"]) == pytest.approx(sum(_executed(method, sp, x) for x in SEEDS) / 3)
        assert float(r["macs_ratio_mean"]) == pytest.approx(
            sum(_executed(method, sp, x) / DENSE_MACS for x in SEEDS) / 3)
        speeds = [_dense_ms(x, 1, "eager") / _final_ms(method, sp, x, 1, "eager") for x in SEEDS]
        sm, ss, sn = _stats(speeds)
        assert float(r["speedup_mean"]) == pytest.approx(sm)
        assert float(r["speedup_std"]) == pytest.approx(ss)
        assert (int(r["speedup_n"]), int(r["macs_ratio_n"]), r["latency_batch"], r["latency_mode"]) == (
            sn, 3, "1", "eager")
        assert float(r["latency_ms_mean"]) == pytest.approx(
            sum(_final_ms(method, sp, x, 1, "eager") for x in SEEDS) / 3)

    tex = (out / "report.tex").read_text()
    assert "\\begin{tabular}{lcrrcrrrr}" in tex
    assert "Method & $s=0.5$ & MACs & Speed-up & $s=0.9$ & MACs & Speed-up & Seconds & Samples \\\\" in tex
    assert "\\multicolumn{6}{c}" in tex and "cakld +KD (channel) & " in tex and "$\\times$" in tex

    _check_png(out / PLOT)
    _check_png(out / "accuracy_vs_sparsity_cifar10_resnet56_resnet20.png")


def test_latency_setting_picks_batch_and_mode(channel_sweep, tmp_path):
    out = tmp_path / "r"
    assert main([str(channel_sweep), "--out", str(out), "--cost", "latency", "--latency-batch", "256",
                 "--latency-mode", "compiled"]) == 0
    md = (out / "report.md").read_text()
    # batch 256 compiled was not measured: no speed-up column, a line naming what was measured instead
    assert "| method | sparsity 0.5 | sparsity 0.9 | seconds / run |" in md and "MACs 0.5" not in md
    assert ("Speed-up column left out: no run measured latency at batch 256, compiled; measured: batch 1, eager; "
            "batch 256, eager; batch 1, compiled (choose with --latency-batch and --latency-mode).") in md
    assert "Dense student cost" not in md and "—." not in md
    assert "Cost of inference" not in md

    out2 = tmp_path / "r2"
    assert main([str(channel_sweep), "--out", str(out2), "--cost", "latency", "--latency-mode", "compiled"]) == 0
    cells = _row((out2 / "report.md").read_text(), "cakld −KD (channel)")
    for i, sp in enumerate(SPARSITIES):
        speed = sum(_dense_ms(x, 1, "compiled") / _final_ms("cakld", sp, x, 1, "compiled") for x in SEEDS) / 3
        assert cells[2 * i + 1] == f"{speed:.2f}×"


def test_partial_latency_shows_n_and_weight_rows_run_dense(tmp_path):
    """One seed without latency: speed-up over the two that have it, (n=2). A weight-granularity (masked)
    run executes all of its MACs: 1.00×, and it gets its own row beside the channel one."""
    runs = tmp_path / "runs"
    num = 0
    for seed in SEEDS:
        _job(runs, num, _channel_record("magnitude", None, 0.9, seed, num, latency=seed != 2), hydra=False)
        num += 1
        masked = _channel_record("magnitude", None, 0.9, seed, num)
        masked["granularity"] = "weight"
        masked["flops"]["executed"] = DENSE_MACS
        _job(runs, num, masked, hydra=False)
        num += 1
    out = tmp_path / "out"
    assert main([str(runs), "--out", str(out), "--cost", "all"]) == 0
    md = (out / "report.md").read_text()
    speed = sum(_dense_ms(x, 1, "eager") / _final_ms("magnitude", 0.9, x, 1, "eager") for x in (0, 1)) / 2
    macs = sum(_executed("magnitude", 0.9, x) / DENSE_MACS for x in SEEDS) / 3
    assert _row(md, "magnitude (channel)")[1:3] == [f"{macs:.2f}×", f"{speed:.2f}× (n=2)"]
    assert _row(md, "magnitude")[1] == "1.00×"
    with open(out / "report.csv", newline="") as f:
        grans = [r["granularity"] for r in csv.DictReader(f)]
    assert grans == ["weight", "channel"]


def test_cost_none_is_the_default_and_all_adds_no_empty_column(tmp_path):
    """Weight-granularity runs without latency: without --cost the basic table, CSV and LaTeX header (and no
    accuracy-vs-latency plot); --cost none is the default; --cost all adds no empty column, only a line each
    saying how to get it."""
    runs = tmp_path / "runs"
    num = 0
    for (method, kd) in ACC:
        for seed in SEEDS:
            _job(runs, num, _record(method, kd, 0.5, seed, num), hydra=False)
            num += 1
    outs = {}
    for name, extra in (("default", []), ("none", ["--cost", "none"]), ("all", ["--cost", "all"])):
        outs[name] = tmp_path / name
        assert main([str(runs), "--out", str(outs[name]), *extra]) == 0
    md = (outs["default"] / "report.md").read_text()
    assert md == (outs["none"] / "report.md").read_text()
    assert "| method | sparsity 0.5 | seconds / run | samples / run¹ |\n|---|---:|---:|---:|\n" in md
    assert "Cost of inference" not in md and "(channel)" not in md and "Dense student cost" not in md
    m, s, n = _stats(ACC[("magnitude", None)][0.5])
    assert f"| magnitude | {m:.2f} ± {s:.2f} (n={n}) | " in md
    with open(outs["default"] / "report.csv", newline="") as f:
        assert next(csv.reader(f)) == ["dataset", "teacher", "student", "method", "retrain_kd", "sparsity", "mean",
                                       "std", "n", "seconds_mean", "samples_mean"]
    assert "\\begin{tabular}{lcrr}" in (outs["default"] / "report.tex").read_text()
    assert sorted(p.name for p in outs["default"].glob("*.png")) == [
        "accuracy_vs_sparsity_cifar10_resnet56_resnet20.png"]
    assert not (outs["all"] / PLOT).exists()
    md_all = (outs["all"] / "report.md").read_text()
    assert f"| magnitude | {m:.2f} ± {s:.2f} (n={n}) | " in md_all
    assert "| method | sparsity 0.5 | seconds / run | samples / run¹ |" in md_all
    assert "Dense student cost: 100 MACs per input." in md_all and "—." not in md_all
    assert "MACs column left out" in md_all
    assert "Speed-up column left out: no run measured latency at batch 1, eager; run with `eval.latency=true`" in md_all


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
