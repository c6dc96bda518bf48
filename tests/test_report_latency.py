"""Issue #10 (part 5): kdprune-report --cost (executed MACs ratio, speed-up over the dense student) and the
accuracy-vs-latency plot, on synthetic results.json records with the new fields (granularity, flops.executed,
latency); old records without them report as before."""
from __future__ import annotations

import csv
import json

import pytest
from kdprune_cli.report.main import Setting, cost_axis, group, main

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


@pytest.fixture
def channel_sweep(tmp_path):
    """18 ok channel-pruning jobs (3 rows × 2 sparsities × 3 seeds) with executed MACs and latency."""
    sweep = tmp_path / "multirun" / "2026-02-01" / "10-00-00"
    write_grid(sweep, _channel_record)
    return sweep


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


def test_plot_axis_latency_or_macs(channel_sweep, tmp_path):
    recs = [json.loads(p.read_text()) for p in sorted(channel_sweep.glob("*/results.json"))]
    (t,) = group(recs, "top1")
    kind, fx, fdense, xlabel = cost_axis(t, Setting(256, "eager"))
    assert kind == "latency" and "batch 256, eager" in xlabel and "cpu float32" in xlabel
    assert fx(recs[0]) == pytest.approx(_final_ms("magnitude", 0.5, 0, 256, "eager"))
    assert fdense(recs[0]) == pytest.approx(_dense_ms(0, 256, "eager"))
    # a setting nobody measured: x falls back to executed MACs, and the label says why
    kind, fx, fdense, xlabel = cost_axis(t, Setting(64, "eager"))
    assert kind == "macs" and "executed MACs" in xlabel and "no latency measured at batch 64, eager" in xlabel
    assert fx(recs[0]) == pytest.approx(_executed("magnitude", 0.5, 0) / 1e6) and fdense(recs[0]) == 40.0
    # records without latency: MACs on x, the plot is still written
    for r in recs:
        del r["latency"]
    (t,) = group(recs, "top1")
    assert cost_axis(t, Setting())[3].endswith("(no latency measured)")
    runs = tmp_path / "runs"
    for i, r in enumerate(recs):
        _job(runs, i, r, hydra=False)
    out = tmp_path / "out"
    assert main([str(runs), "--out", str(out), "--cost", "all"]) == 0
    _check_png(out / PLOT)
    md = (out / "report.md").read_text()
    assert "MACs 0.5" in md and "speed-up 0.5" not in md and "Speed-up column left out" in md  # no latency


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


def test_legacy_latency_ms_is_batch_1_eager(tmp_path):
    runs = tmp_path / "runs"
    pruned = {0: 1.0, 1: 1.25, 2: 0.8}
    for seed in SEEDS:
        rec = _record("cakld", True, 0.5, seed, seed)
        rec["latency_ms"] = {"pruned": pruned[seed], "dense": 2.0}
        _job(runs, seed, rec, hydra=False)
    out = tmp_path / "out"
    assert main([str(runs), "--out", str(out), "--cost", "all"]) == 0
    md = (out / "report.md").read_text()
    speed = sum(2.0 / pruned[x] for x in SEEDS) / 3
    assert _row(md, "cakld +KD")[1] == f"{speed:.2f}×"  # no flops.executed in old records: no MACs column
    assert "MACs column left out: no run recorded the MACs its final model executes" in md
    assert "2.000 ms median (batch 1, eager, n=3; cpu (legacy latency_ms))" in md
    _check_png(out / PLOT)
    assert main([str(runs), "--out", str(tmp_path / "o2"), "--cost", "latency", "--latency-batch", "2"]) == 0
    md2 = (tmp_path / "o2" / "report.md").read_text()
    assert "speed-up 0.5" not in md2 and "no run measured latency at batch 2, eager; measured: batch 1, eager" in md2


def test_old_records_report_as_before(tmp_path):
    """Records without the new fields: without --cost the same table, CSV and LaTeX header as before (and
    no accuracy-vs-latency plot); --cost none is the default; --cost all adds no empty column, only a line
    each saying how to get it."""
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


def test_bad_latency_batch_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--latency-batch", "0"])
    assert e.value.code == 2 and "not a positive integer" in capsys.readouterr().err
