"""``kdprune-report``: ``results.json`` records into paper-style tables (Markdown, CSV, LaTeX) and plots.

    kdprune-report PATH... [--out DIR] [--metric top1] [--cost none|macs|latency|all]
                   [--latency-batch 1] [--latency-mode eager] [--layers RUN_DIR ...] [--reliability RUN_DIR ...]
    kdprune-report --reliability RUN_DIR... [--out DIR]

Every ``results.json`` under the PATHs is read; reruns of a job count once (the newest record). The ok records
make one table per (dataset, teacher, student): a row per (method, retrain_kd, granularity, method_variant), a
column per target sparsity, cells the mean ± sample std of ``metrics.final.<metric>`` over seeds with n, the
dense references, the cost per run and, with ``--cost``, the executed-MACs ratio and the speed-up over the dense
student at one latency setting (a column only where some run has its numbers; else a line says how to get
them). Written to ``--out`` (default: the first PATH if it is a folder) with the accuracy-vs-sparsity and
accuracy-vs-latency plots, per-layer bar charts (``--layers``) and reliability diagrams (``--reliability``).
Failed records and job folders without a record are listed. Exit status: 0 all ok, 1 some job failed or is
missing (the report is still written), 2 bad input (one line on stderr, nothing written).
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Optional

from kdprune_cli.report.collect import RESULTS, InputError, Problem, collect, find_results, run_record
from kdprune_cli.report.plots import (
    layer_sparsities,
    plot_cost,
    plot_layers,
    plot_table,
    reliability_data,
    run_name,
    write_reliability,
)
from kdprune_cli.report.stats import METRICS, OPTIONAL_METRICS, Setting, group, metric_of, num
from kdprune_cli.report.tables import COST_COLUMNS, latex, markdown, write_csv


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return n


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="kdprune-report",
        description="Tables (Markdown, CSV, LaTeX) and plots from kdprune results.json records.")
    p.add_argument("paths", nargs="*", metavar="PATH", type=Path,
                   help="run or sweep folders (searched recursively) or results.json files")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: the first PATH if it is a folder, else its parent)")
    p.add_argument("--metric", default="top1", choices=METRICS, help="metrics.final.<metric> (default top1)")
    p.add_argument("--cost", default="none", choices=COST_COLUMNS,
                   help="cost-of-inference columns beside each sparsity: macs (executed MACs / dense), latency "
                        "(speed-up of the final model over the dense student), all (both); default none")
    p.add_argument("--latency-batch", type=_positive_int, default=1, metavar="N",
                   help="batch size of the latency measurement used for speed-ups and the plot (default 1)")
    p.add_argument("--latency-mode", default="eager", metavar="MODE",
                   help="mode of the latency measurement: eager (default) or compiled")
    p.add_argument("--layers", nargs="+", action="extend", type=Path, default=[], metavar="RUN_DIR",
                   help="run folders (or results.json) to draw a per-layer sparsity bar chart for")
    p.add_argument("--reliability", nargs="+", action="extend", type=Path, default=[], metavar="RUN_DIR",
                   help="run folders (or results.json) to draw a reliability diagram for: dense student and final "
                        "model, test split (into --out, or without PATHs into the run folder)")
    args = p.parse_args(argv)
    if not args.paths and not args.reliability:
        p.error("the following arguments are required: PATH")
    return args


def _reliability_inputs(paths: list) -> list:
    """``(results.json, record, data)`` per RUN_DIR, all checked before anything is written."""
    items = []
    for p in paths:
        rfile, rec, problem = run_record(p)  # problem.path is rfile
        try:
            if problem is not None:
                raise InputError(problem.error or f"no {RESULTS}")
            items.append((rfile, rec, reliability_data(rec)))
        except InputError as e:
            raise InputError(f"--reliability {rfile}: {e}") from None
    return items


def _layers(paths: list, out: Path, written: list) -> list:
    """``layers_<job>.png`` per run into ``written``; a :class:`Problem` for each run that has none to draw."""
    notes = []
    for p in paths:
        rfile, rec, problem = run_record(p)
        if problem is None and layer_sparsities(rec) is None:
            problem = Problem(str(rfile), "no sparsity_per_layer", f"status {rec.get('status')}")
        if problem is not None:
            notes.append(problem)
            continue
        written.append(plot_layers(rec, run_name(rfile, rec), out))
    return notes


def _os_error(e: OSError) -> str:
    what = e.strerror or str(e) or type(e).__name__
    return f"{what}: {e.filename}" if e.filename else what


def _check_inputs(args) -> Optional[Path]:
    """Every PATH exists and ``--out`` is no file; the output folder (None: only reliability diagrams, into
    ``--out`` or each run's folder)."""
    for p in [*args.paths, *args.layers, *args.reliability]:
        if not p.exists():
            raise InputError(f"path does not exist: {p}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file, not a folder")
    if not args.paths:
        return None
    return args.out or (args.paths[0] if args.paths[0].is_dir() else args.paths[0].parent)


def _incomplete(metric: str, rec: dict) -> Optional[str]:
    """What an ok record lacks to be in a table: the metric (unless it needs a validation split), the sparsity."""
    lacks = metric_of(rec, "final", metric) is None and metric not in OPTIONAL_METRICS
    return f"no metrics.final.{metric} or sparsity_target" if lacks or num(rec.get("sparsity_target")) is None \
        else None


def _write(args, out: Path, got, diagrams: list) -> tuple:
    """Plots, ``report.md``, ``report.csv``, ``report.tex`` into ``out``; (markdown, written, layer notes)."""
    asked, setting = COST_COLUMNS[args.cost], Setting(args.latency_batch, args.latency_mode)
    tables = group(got.ok, args.metric, asked, setting)
    written: list = []
    layer_notes = _layers(args.layers, out, written)
    written += write_reliability(diagrams, out)
    written += [png for t in tables for png in (plot_table(t, args.metric, out), plot_cost(t, args.metric, out, setting))
                if png is not None]  # no cost plot where no run recorded a cost of inference
    md = markdown(tables, args.metric, got.problems, got.superseded, layer_notes, got.counts, asked, setting)
    (out / "report.md").write_text(md, encoding="utf-8")
    write_csv(tables, out / "report.csv", asked, setting)
    (out / "report.tex").write_text(latex(tables, args.metric, asked, setting), encoding="utf-8")
    return md, [out / "report.md", out / "report.csv", out / "report.tex", *written], layer_notes


def run(args) -> int:
    out = _check_inputs(args)
    diagrams = _reliability_inputs(args.reliability)
    if out is None:
        try:
            print("written:", *(f"  {w}" for w in write_reliability(diagrams, args.out)), sep="\n")
        except OSError as e:
            raise InputError(f"cannot write the reliability diagrams: {_os_error(e)}") from None
        return 0
    found = find_results(args.paths)
    if not found.results:
        extra = f" ({len(found.missing)} job folders without one)" if found.missing else ""
        raise InputError(f"no {RESULTS} found under {', '.join(map(str, args.paths))}{extra}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the --out folder {out}: {_os_error(e)}") from None
    got = collect(found, partial(_incomplete, args.metric))
    try:
        md, written, layer_notes = _write(args, out, got, diagrams)
    except OSError as e:  # read-only, full, or not ours
        raise InputError(f"cannot write the report into {out}: {_os_error(e)}") from None
    print(md)
    print("written:", *(f"  {w}" for w in written), sep="\n")
    if got.problems or layer_notes:
        print(f"kdprune-report: {got.counts['failed']} failed, {got.counts['missing']} missing"
              + (f", {len(layer_notes)} per-layer plots not drawn" if layer_notes else ""), file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except InputError as e:
        print(f"kdprune-report: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
