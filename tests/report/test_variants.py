"""A method's variant (``method_variant``, e.g. NutePrune's ``teachers=intact`` ablation) is its own
row in every output of kdprune-report: markdown, LaTeX, CSV and the plots' legends."""
from __future__ import annotations

import csv

from records import _channel_record, _check_png, _job, _row, _stats

from kdprune_cli.report import plots
from kdprune_cli.report.cli import main

ACC = {None: {0: 90.0, 1: 91.0}, "intact teacher": {0: 88.0, 1: 88.5}}


def _nute(variant, seed, job):
    """A NutePrune channel record; the two variants differ only in ``method_variant`` (and the numbers)."""
    rec = _channel_record("magnitude", None, 0.5, seed, job)
    rec["method"] = "nuteprune"
    rec["metrics"]["final"]["top1"] = ACC[variant][seed]
    if variant is not None:
        rec["method_variant"] = variant
    elif seed == 1:
        rec["method_variant"] = None  # the field written as null reads as no variant, as a missing one
    return rec


def test_variants_are_rows_of_their_own(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    num = 0
    for variant in ACC:
        for seed in (0, 1):
            _job(runs, num, _nute(variant, seed, num), hydra=False)
            num += 1
    legends = []
    finish = plots.finish

    def spy(ax, *a, **k):
        legends.append(ax.get_legend_handles_labels()[1])
        return finish(ax, *a, **k)

    monkeypatch.setattr(plots, "finish", spy)
    out = tmp_path / "out"
    assert main([str(runs), "--out", str(out), "--cost", "all"]) == 0

    md = (out / "report.md").read_text()
    for variant, label in ((None, "nuteprune (channel)"), ("intact teacher", "nuteprune [intact teacher] (channel)")):
        m, s, n = _stats(list(ACC[variant].values()))
        assert _row(md, label)[0] == f"{m:.2f} ± {s:.2f} (n={n})"
    assert "4 ok" in md

    tex = (out / "report.tex").read_text()
    assert "\nnuteprune (channel) & " in tex and "\nnuteprune [intact teacher] (channel) & " in tex

    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["variant"], r["n"]) for r in rows] == [("nuteprune", "", "2"),
                                                                   ("nuteprune", "intact teacher", "2")]
    assert rows[1]["mean"] == repr(_stats(list(ACC["intact teacher"].values()))[0])

    rows_in_legend = [[lab for lab in labels if lab.startswith("nuteprune")] for labels in legends]
    assert rows_in_legend == [["nuteprune (channel)", "nuteprune [intact teacher] (channel)"]] * 2  # both plots
    for png in ("accuracy_vs_sparsity_cifar10_resnet56_resnet20.png",
                "accuracy_vs_latency_cifar10_resnet56_resnet20.png"):
        _check_png(out / png)


def test_records_without_variants_have_no_variant_column(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        _job(runs, seed, _nute(None, seed, seed), hydra=False)
    assert main([str(runs), "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "report.csv", newline="") as f:
        assert "variant" not in next(csv.reader(f))
