"""kdprune-report on synthetic results.json records (no training): tables, CSV, LaTeX, plots, failed and
missing jobs."""
from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest
from records import (
    ACC,
    DENSE_TOP1,
    SEEDS,
    SPARSITIES,
    TEACHER_TOP1,
    _check_png,
    _job,
    _label,
    _record,
    _row,
    _seconds,
    _stages,
    _stats,
    write_grid,
)

from kdprune_cli.report.cli import main


def _expected_samples(method, kd, sparsity, seed):
    st = _stages(method, kd, sparsity, seed)
    run = sum(v["samples"] + v["teacher_samples"] for v in st.values())
    cached = sum(v["artifact"]["samples"] + v["artifact"]["teacher_samples"] for v in st.values() if "artifact" in v)
    return run + cached


@pytest.fixture
def sweep(tmp_path):
    """outputs/multirun/<date>/<time>/<job>/results.json: 18 ok jobs, one failed, two without a record."""
    root = tmp_path / "outputs" / "multirun"
    sweep = root / "2026-01-01" / "10-00-00"
    num = write_grid(sweep, _record)
    failed = _record("magnitude", None, 0.9, 2, num)  # its own job_id
    failed.update(status="failed", error="RuntimeError: boom at step 3", metrics={}, sparsity_actual=None)
    del failed["sparsity_per_layer"]
    _job(sweep, num, failed)
    _job(sweep, num + 1, None)  # killed before writing its record
    _job(sweep, num + 2, None, hydra=False)  # not even .hydra/ yet
    return root, sweep, num


@pytest.fixture
def report(sweep, tmp_path, capsys):
    """The report of the sweep with two per-layer plots: (out folder, stdout, report.md, report.tex)."""
    root, sweep_dir, _ = sweep
    out = tmp_path / "report"
    rc = main([str(root), "--out", str(out), "--layers", str(sweep_dir / "0"), str(sweep_dir / "7")])
    assert rc == 1  # one failed, two missing
    return out, capsys.readouterr().out, (out / "report.md").read_text(), (out / "report.tex").read_text()


def test_markdown_and_latex_tables(report):
    _, stdout, md, tex = report
    # the table: mean ± std (n) per method and sparsity; the cost column per method
    assert "## cifar10 · resnet56 → resnet20" in md
    assert "| method | sparsity 0.5 | sparsity 0.9 | seconds / run | samples / run¹ |" in md
    for (method, kd), per_sp in ACC.items():
        cells = []
        for sp in SPARSITIES:
            m, s, n = _stats(per_sp[sp])
            cells.append(f"{m:.2f} ± {s:.2f} (n={n})")
            assert f"{m:.2f} $\\pm$ {s:.2f} (n={n})" in tex
        runs = [(sp, seed) for sp in SPARSITIES for seed in SEEDS]
        secs = sum(_seconds(method, kd, sp, seed) for sp, seed in runs) / len(runs)
        samples = sum(_expected_samples(method, kd, sp, seed) for sp, seed in runs) / len(runs)
        row = f"| {_label(method, kd)} | {cells[0]} | {cells[1]} | {secs:.1f} | {samples:,.0f} |"
        assert row in md, (row, md)
        assert row in stdout
        tex_row = (f"{_label(method, kd, '$-$')} & " + " & ".join(c.replace('±', '$\\pm$') for c in cells)
                   + f" & {secs:.1f} & {samples:,.0f}".replace(",", "{,}") + " \\\\")
        assert tex_row in tex, (tex_row, tex)
    # the samples footnote says cached stages count with what they cost when made
    assert "¹ Samples per run" in md and "artifact" in md and "really cost" in md

    # dense references: teacher and dense student top-1 over the ok runs
    t_m, t_s, t_n = _stats([TEACHER_TOP1] * 18)
    d_m, d_s, d_n = _stats([DENSE_TOP1[seed] for _ in range(6) for seed in SEEDS])
    assert (f"teacher {t_m:.2f} ± {t_s:.2f} (n={t_n}), dense student {d_m:.2f} ± {d_s:.2f} (n={d_n})") in md
    assert f"Teacher (dense) & \\multicolumn{{2}}{{c}}{{{t_m:.2f} $\\pm$ {t_s:.2f} (n={t_n})}}" in tex
    assert f"Student (dense) & \\multicolumn{{2}}{{c}}{{{d_m:.2f} $\\pm$ {d_s:.2f} (n={d_n})}}" in tex
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex and "\\begin{tabular}{lccrr}" in tex


def test_failed_and_missing_jobs_are_listed(sweep, report):
    _, sweep_dir, nfail = sweep
    _, stdout, md, _ = report
    for text in (md, stdout):
        assert "## Failed jobs" in text
        assert f"{sweep_dir / str(nfail) / 'results.json'}`: failed: RuntimeError: boom at step 3" in text
        assert f"`{sweep_dir / str(nfail + 1)}`: missing (no results.json)" in text
        assert f"`{sweep_dir / str(nfail + 2)}`: missing (no results.json)" in text
    assert "18 ok, 1 failed, 2 job folders missing a record" in md


def test_csv_has_one_row_per_cell_in_full_precision(report):
    out = report[0]
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["dataset", "teacher", "student", "method", "retrain_kd", "sparsity", "mean", "std",
                             "n", "seconds_mean", "samples_mean"]
    assert len(rows) == len(ACC) * len(SPARSITIES)
    got = {(r["method"], r["retrain_kd"], float(r["sparsity"])): r for r in rows}
    for (method, kd), per_sp in ACC.items():
        for sp in SPARSITIES:
            r = got[(method, "" if kd is None else str(kd).lower(), sp)]
            assert (r["dataset"], r["teacher"], r["student"]) == ("cifar10", "resnet56", "resnet20")
            m, s, n = _stats(per_sp[sp])
            assert float(r["mean"]) == pytest.approx(m, abs=1e-9)
            assert float(r["std"]) == pytest.approx(s, abs=1e-9)
            assert int(r["n"]) == n
            assert float(r["seconds_mean"]) == pytest.approx(sum(_seconds(method, kd, sp, x) for x in SEEDS) / 3)
            assert float(r["samples_mean"]) == pytest.approx(
                sum(_expected_samples(method, kd, sp, x) for x in SEEDS) / 3)


def test_plots_are_valid_pictures(report):
    out = report[0]
    acc_png = out / "accuracy_vs_sparsity_cifar10_resnet56_resnet20.png"
    _check_png(acc_png)
    _check_png(out / "layers_job000.png")
    _check_png(out / "layers_job007.png")
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        [acc_png.name, "layers_job000.png", "layers_job007.png"])


def test_default_out_single_sample_and_exit_0(sweep, tmp_path):
    """A results.json file as PATH; n=1 shows ± 0.00; all ok gives exit status 0; default --out."""
    _, sweep_dir, _ = sweep
    single = tmp_path / "single"
    single.mkdir()
    rec = _record("magnitude", None, 0.5, 1, 5)
    (single / "results.json").write_text(json.dumps(rec))
    assert main([str(single / "results.json"), "--metric", "top1"]) == 0
    md = (single / "report.md").read_text()
    assert f"| magnitude | {ACC[('magnitude', None)][0.5][1]:.2f} ± 0.00 (n=1) |" in md
    assert "Failed jobs" not in md
    # a folder given first is the default --out
    assert main([str(single)]) == 0
    assert (single / "report.csv").stat().st_size > 0


def test_failed_layers_run_is_reported(sweep, tmp_path, capsys):
    _, sweep_dir, nfail = sweep
    out = tmp_path / "r"
    rc = main([str(sweep_dir / "0"), "--out", str(out), "--layers", str(sweep_dir / str(nfail))])
    assert rc == 1
    assert "no sparsity_per_layer" in (out / "report.md").read_text()
    assert not list(out.glob("layers_*.png"))


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
