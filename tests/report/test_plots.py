"""kdprune-report's plots draw the spread the tables give (mean ± sample std); the accuracy-vs-cost plot puts
the latency of the chosen setting on x, else executed MACs, else is not drawn."""
from __future__ import annotations

import json

import pytest
from records import (
    ACC,
    PLOT,
    SPARSITIES,
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

from kdprune_cli.report import plots
from kdprune_cli.report.cli import main
from kdprune_cli.report.stats import Setting, group


def test_accuracy_vs_sparsity_plot_draws_mean_and_sample_std_as_the_tables(tmp_path, monkeypatch):
    sweep = tmp_path / "multi"
    write_grid(sweep, _record)
    drawn = {}
    finish = plots.finish

    def spy(ax, t, metric, how, path):
        if path.name.startswith("accuracy_vs_sparsity"):
            drawn["how"] = how
            for container in ax.containers:
                segs = container.lines[2][0].get_segments()  # one vertical error bar per sparsity
                drawn[container.get_label()] = [(float(s[0][1]), float(s[1][1])) for s in segs]
        return finish(ax, t, metric, how, path)

    monkeypatch.setattr(plots, "finish", spy)
    assert main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    assert "± sample std" in drawn["how"] and "min" not in drawn["how"]
    md = (tmp_path / "out" / "report.md").read_text()
    for (method, kd), per_sp in ACC.items():
        for i, sp in enumerate(SPARSITIES):
            m, s, n = _stats(per_sp[sp])
            assert f"{m:.2f} ± {s:.2f} (n={n})" in _row(md, _label(method, kd))[i]
            assert drawn[_label(method, kd)][i] == pytest.approx((m - s, m + s))


def test_plot_axis_latency_or_macs(channel_sweep, tmp_path):
    recs = [json.loads(p.read_text()) for p in sorted(channel_sweep.glob("*/results.json"))]
    (t,) = group(recs)
    kind, fx, fdense, xlabel = plots.cost_axis(t, Setting(256, "eager"))
    assert kind == "latency" and "batch 256, eager" in xlabel and "cpu float32" in xlabel
    assert fx(recs[0]) == pytest.approx(_final_ms("magnitude", 0.5, 0, 256, "eager"))
    assert fdense(recs[0]) == pytest.approx(_dense_ms(0, 256, "eager"))
    # a setting nobody measured: x falls back to executed MACs, and the label says why
    kind, fx, fdense, xlabel = plots.cost_axis(t, Setting(64, "eager"))
    assert kind == "macs" and "executed MACs" in xlabel and "no latency measured at batch 64, eager" in xlabel
    assert fx(recs[0]) == pytest.approx(_executed("magnitude", 0.5, 0) / 1e6) and fdense(recs[0]) == 40.0
    # records without latency: MACs on x, the plot is still written
    for r in recs:
        del r["latency"]
    (t,) = group(recs)
    assert plots.cost_axis(t, Setting())[3].endswith("(no latency measured)")
    runs = tmp_path / "runs"
    for i, r in enumerate(recs):
        _job(runs, i, r, hydra=False)
    out = tmp_path / "out"
    assert main([str(runs), "--out", str(out), "--cost", "all"]) == 0
    _check_png(out / PLOT)
    md = (out / "report.md").read_text()
    assert "MACs 0.5" in md and "speed-up 0.5" not in md and "Speed-up column left out" in md  # no latency
