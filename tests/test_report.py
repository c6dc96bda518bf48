"""kdprune-report on synthetic results.json records (no training): tables, CSV, LaTeX, plots, exit status."""
from __future__ import annotations

import csv
import json

import pytest
from kdprune_cli.report.main import main

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
    _seconds,
    _stages,
    _stats,
    write_grid,
)


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


def test_report_tables_csv_tex_plots(sweep, tmp_path, capsys):
    root, sweep_dir, nfail = sweep
    out = tmp_path / "report"
    rc = main([str(root), "--out", str(out), "--layers", str(sweep_dir / "0"), str(sweep_dir / "7")])
    assert rc == 1  # one failed, two missing
    stdout = capsys.readouterr().out
    md = (out / "report.md").read_text()
    tex = (out / "report.tex").read_text()

    # --- the table: mean ± std (n) per method and sparsity; the cost column per method
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

    # --- dense references: teacher and dense student top-1 over the ok runs
    t_m, t_s, t_n = _stats([TEACHER_TOP1] * 18)
    d_m, d_s, d_n = _stats([DENSE_TOP1[seed] for _ in range(6) for seed in SEEDS])
    assert (f"teacher {t_m:.2f} ± {t_s:.2f} (n={t_n}), dense student {d_m:.2f} ± {d_s:.2f} (n={d_n})") in md
    assert f"Teacher (dense) & \\multicolumn{{2}}{{c}}{{{t_m:.2f} $\\pm$ {t_s:.2f} (n={t_n})}}" in tex
    assert f"Student (dense) & \\multicolumn{{2}}{{c}}{{{d_m:.2f} $\\pm$ {d_s:.2f} (n={d_n})}}" in tex
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex and "\\begin{tabular}{lccrr}" in tex

    # --- failed and missing jobs are listed, in report.md and on stdout
    for text in (md, stdout):
        assert "## Failed jobs" in text
        assert f"{sweep_dir / str(nfail) / 'results.json'}`: failed: RuntimeError: boom at step 3" in text
        assert f"`{sweep_dir / str(nfail + 1)}`: missing (no results.json)" in text
        assert f"`{sweep_dir / str(nfail + 2)}`: missing (no results.json)" in text
    assert "18 ok, 1 failed, 2 job folders missing a record" in md

    # --- CSV: one row per group × sparsity, full precision
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

    # --- plots: valid, non-trivial PNGs
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


def test_exit_2_empty_or_missing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no results.json found" in err[0]
    assert not (empty / "report.md").exists()
    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_rerun_of_same_job_supersedes_failed_record(tmp_path):
    """A job re-run after a failure (same job_id): the newer record counts, the old one is not a failure."""
    import os

    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    old = _record("cakld", True, 0.9, 0, 1)
    old.update(status="failed", error="KeyboardInterrupt")
    (a / "results.json").write_text(json.dumps(old))
    (b / "results.json").write_text(json.dumps(_record("cakld", True, 0.9, 0, 1)))
    os.utime(a / "results.json", (1_000_000, 1_000_000))
    out = tmp_path / "out"
    assert main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "Superseded" in md and "(n=1)" in md and "Failed jobs" not in md
