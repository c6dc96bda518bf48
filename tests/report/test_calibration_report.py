"""kdprune-report and the calibration fields of a record: tables of ``--metric ece_ts`` (and the other
calibration metrics), a dash where no run recorded the metric, and reliability diagrams (``--reliability``)."""
from __future__ import annotations

import json

from records import _check_png, _job, _record, _row, write_grid

from kdprune_cli.report.cli import main
from kdprune_cli.report.plots import reliability_data


def _with_ts(method, kd, sparsity, seed, job):
    """A synthetic record with the calibration fields; ECE after scaling = ECE / (10 + seed)."""
    rec = _record(method, kd, sparsity, seed, job)
    for key, m in rec["metrics"].items():
        m.update(mce=0.1 + seed / 100, rmsce=0.03, ece_ts=m["ece"] / (10 + seed), temperature=1.5)
    return rec


def test_report_metric_ece_ts_table(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    n = write_grid(sweep, _with_ts)
    no_val = _record("magnitude", None, 0.5, 0, n)  # a run that held out no validation split: no ece_ts
    no_val["job_id"] = "no-val"
    _job(sweep, n, no_val)
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out), "--metric", "ece_ts"]) == 0
    md = (out / "report.md").read_text()
    assert "ECE after temperature scaling (T fit on validation, 15 bins)" in md
    mean = sum(0.02 / (10 + s) for s in (0, 1, 2)) / 3
    row = _row(md, "magnitude")
    assert row[0].startswith(f"{mean:.4f} ± ") and row[0].endswith("(n=3)")  # the run without it is not in n
    assert f"Dense references (ece_ts): teacher {mean:.4f}" in md
    assert "mean" in (out / "report.csv").read_text().splitlines()[0]
    _check_png(out / "accuracy_vs_sparsity_cifar10_resnet56_resnet20.png")


def test_report_metric_missing_everywhere_shows_a_dash(tmp_path):
    """No run held out a validation split: no record has ``ece_ts``, ``nll_ts`` or ``temperature``."""
    sweep = tmp_path / "sweep"
    write_grid(sweep, _record)
    out = tmp_path / "report"
    for metric, desc in (("nll_ts", "NLL after temperature scaling (T fit on validation, nats)"),
                         ("ece_ts", "ECE after temperature scaling"), ("temperature", "temperature T fit")):
        assert main([str(sweep), "--out", str(out), "--metric", metric]) == 0
        md = (out / "report.md").read_text()
        assert desc in md
        assert all(c == "—" for c in _row(md, "magnitude")[:2])
        assert "teacher —, dense student —" in md
        assert "--" in (out / "report.tex").read_text()


def test_report_metric_mce_and_rmsce(tmp_path):
    """Every evaluation records MCE and RMSCE: a run without the chosen one is incomplete, as without top-1."""
    sweep = tmp_path / "sweep"
    n = write_grid(sweep, _record)
    out = tmp_path / "report"
    for metric, desc, value in (("mce", "MCE, largest bin gap (15 bins)", 0.1),
                                ("rmsce", "RMS calibration error (15 bins)", 0.03)):
        assert main([str(sweep), "--out", str(out), "--metric", metric]) == 0
        md = (out / "report.md").read_text()
        assert desc in md and _row(md, "magnitude")[0] == f"{value:.4f} ± 0.0000 (n=3)"
    lacking = _record("magnitude", None, 0.5, 0, n)
    del lacking["metrics"]["final"]["mce"]
    _job(sweep, n, lacking)
    assert main([str(sweep), "--out", str(out), "--metric", "mce"]) == 1
    assert "incomplete: no metrics.final.mce or sparsity_target" in (out / "report.md").read_text()


def _reliability(count, conf, acc):
    return {"count": count, "confidence": conf, "accuracy": acc}


def _bins_record():
    rec = _record("cakld", True, 0.5, 0, 7)
    dense = _reliability([0] * 13 + [10, 30], [None] * 13 + [0.9, 0.97], [None] * 13 + [0.8, 0.9])
    final = _reliability([0] * 12 + [5, 10, 25], [None] * 12 + [0.82, 0.9, 0.98], [None] * 12 + [0.6, 0.7, 0.96])
    rec["metrics"]["dense_student"].update(reliability=dense, ece=0.05)
    rec["metrics"]["final"].update(reliability=final, ece=0.08, ece_ts=0.02, temperature=1.7)
    return rec, dense, final


def test_reliability_diagram_from_the_record(tmp_path, capsys):
    rec, dense, final = _bins_record()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps(rec))
    data = reliability_data(rec)
    assert data["dense_student"] == {**dense, "ece": 0.05, "ece_ts": None, "temperature": None}
    assert data["final"] == {**final, "ece": 0.08, "ece_ts": 0.02, "temperature": 1.7}
    out = tmp_path / "figs"
    assert main(["--reliability", str(run_dir), "--out", str(out)]) == 0
    _check_png(out / "reliability_job007.png")
    assert str(out / "reliability_job007.png") in capsys.readouterr().out
    # beside a report: into its --out
    del rec["metrics"]["dense_student"]["reliability"]  # a dense student cached without bins: its panel says so
    (run_dir / "results.json").write_text(json.dumps(rec))
    assert reliability_data(rec)["dense_student"] is None
    assert main([str(run_dir), "--reliability", str(run_dir), "--out", str(tmp_path / "rep")]) == 0
    _check_png(tmp_path / "rep" / "reliability_job007.png")
    assert (tmp_path / "rep" / "report.md").is_file()


def test_reliability_without_bins_is_one_line_and_exit_2(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps(_record("cakld", True, 0.5, 0, 1)))
    assert main(["--reliability", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kdprune-report: error: ") and "reliability" in err
    assert list(run_dir.iterdir()) == [run_dir / "results.json"]  # nothing written
    assert main([str(run_dir), "--reliability", str(run_dir), "--out", str(tmp_path / "rep")]) == 2
    assert not (tmp_path / "rep").exists()
    assert main(["--reliability", str(tmp_path / "nowhere")]) == 2
