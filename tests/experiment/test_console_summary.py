"""The console summary: the headline reports what was asked for (params or MACs, achieved vs target) and warns
in one line when the target is missed by more than the plan's tolerance; the table's columns never run together."""
from __future__ import annotations

import pytest

from kdprune_cli.experiment.job import run_job
from kdprune_cli.experiment.record import print_summary


def _record(**over):
    m = {"top1": 97.5, "top5": 99.9, "nll": 0.081, "ece": 0.012}
    rec = {"method": "magnitude", "method_variant": None, "dataset": "digits", "teacher": "resnet20",
           "student": "resnet20", "sparsity_target": 0.5, "sparsity_actual": 0.5, "seed": 0,
           "metrics": {"teacher": dict(m), "dense_student": dict(m), "final": dict(m)},
           "params": {"nonzero": 500, "prunable": 1000, "total": 1100, "total_dense": 1100},
           "flops": {"dense": 100, "sparse": 50, "executed": 100},
           "cost": {"stages": {"data": {"seconds": 0.1}}, "total_seconds": 1.0}}
    rec.update(over)
    return rec


def _channel(target, requested, achieved, params, macs, **extra):
    return _record(granularity="channel", sparsity_target=requested, sparsity_actual=params,
                   structure={"granularity": "channel", "target": target, "requested": requested,
                              "achieved": achieved, "off_target": achieved - requested, "params_removed": params,
                              "macs_removed": macs, **extra})


def test_a_huge_nll_does_not_run_into_its_neighbours(tmp_path, capsys):
    rec = _record()
    rec["metrics"]["teacher"] = {"top1": 10.0, "top5": 55.2871, "nll": 71416760.0, "ece": 0.9}
    print_summary(rec, tmp_path)
    out = capsys.readouterr().out.splitlines()
    row = next(line for line in out if line.strip().startswith("teacher"))
    assert row.split() == ["teacher", "10.00", "55.29", "7.14e+07", "0.900"]
    head = next(line for line in out if "top1" in line)
    final = next(line for line in out if line.strip().startswith("final"))
    assert final.split() == ["final", "97.50", "99.90", "0.081", "0.012"]
    for col in ("top1", "top5", "nll", "ece"):  # right-aligned under its header, whatever the magnitude
        end = head.index(col) + len(col)
        assert row[end - 1] != " " and (end == len(row) or row[end] == " ")


def test_a_macs_target_is_reported_in_macs_with_params_beside(tmp_path, capsys):
    print_summary(_channel("macs", 0.6, 0.5995, 0.2181, 0.5995, tolerance=0.004), tmp_path)
    cap = capsys.readouterr()
    head = cap.out.splitlines()[0]
    assert "MACs removed 0.5995 (target 0.6), params removed 0.2181" in head
    assert "sparsity" not in head and "actual" not in head and cap.err == ""


def test_a_params_target_and_weight_granularity_are_reported_in_params(tmp_path, capsys):
    print_summary(_channel("params", 0.5, 0.5012, 0.5012, 0.61, tolerance=0.003), tmp_path)
    assert "params removed 0.5012 (target 0.5), MACs removed 0.6100" in capsys.readouterr().out
    print_summary(_record(sparsity_actual=0.5), tmp_path)
    cap = capsys.readouterr()
    assert "params pruned 0.5000 (target 0.5)" in cap.out.splitlines()[0] and cap.err == ""


def test_a_target_missed_by_more_than_the_tolerance_warns_in_one_line(tmp_path, capsys):
    # NutePrune's gates on a debug budget: no plan, no recorded tolerance (0.01 applies)
    print_summary(_channel("params", 0.5, 0.0819, 0.0819, 0.1, method="nuteprune"), tmp_path)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kdprune: warning: asked for 0.5 of the params removed, got "
                                                   "0.0819 (-0.4181, more than the tolerance 0.0100)")
    print_summary(_channel("macs", 0.6, 0.58, 0.3, 0.58, tolerance=0.05), tmp_path)  # within the plan's step
    assert capsys.readouterr().err == ""
    print_summary(_record(sparsity_actual=0.42), tmp_path)
    assert "asked for 0.5 of the params removed, got 0.4200" in capsys.readouterr().err


def test_a_real_macs_target_run_headlines_its_macs(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg("method=magnitude", "method.retrain.epochs=1", "prune.granularity=channel", "prune.target=macs",
                   "sparsity=0.6")
    rec = run_job(cfg, tmp_path / "r")
    s = rec["structure"]
    assert 0 <= s["tolerance"] < 0.2 and abs(s["achieved"] - 0.6) <= s["tolerance"] + 1e-9
    cap = capsys.readouterr()
    head = next(line for line in cap.out.splitlines() if line.startswith("kdprune: magnitude"))
    assert f"MACs removed {s['macs_removed']:.4f} (target 0.6), params removed {s['params_removed']:.4f}" in head
    assert "kdprune: warning" not in cap.err
    assert s["params_removed"] == pytest.approx(rec["sparsity_actual"], abs=1e-12)
