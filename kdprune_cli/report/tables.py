"""The report's tables (:func:`stats.group`) written three ways: Markdown, LaTeX (booktabs) and CSV."""
from __future__ import annotations

import csv
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from kdprune_cli.report.collect import RESULTS
from kdprune_cli.report.stats import (
    MINUS,
    OPTIONAL_METRICS,
    WEIGHT,
    Row,
    Setting,
    Stat,
    Table,
    cost,
    is_reused,
    latency_of,
    latency_where,
    macs,
    macs_differ,
    mean,
    measured_settings,
    speedup,
)

COST_COLUMNS = {"none": (), "macs": ("macs",), "latency": ("speedup",), "all": ("macs", "speedup")}
SAMPLES_NOTE = ("Samples per run: samples pushed through the network being trained or scored plus samples "
                "pushed through a teacher, summed over all stages of the job, including what a stage loaded "
                "from the cache cost when it was made (`cost.stages.*.artifact`), i.e. what the result "
                "really cost, not only what the run itself recomputed. Seconds per run are the run's own "
                "wall-clock (`cost.total_seconds`), in which cached stages cost ~0. A run that reused a job "
                "finished earlier (`cost.reused`) trained nothing: it counts the samples its original run "
                "cost (`cost.original`) and is left out of the seconds per run (counted apart: `N reused`).")
METRIC_DESC = {"top1": "top-1 accuracy (%)", "top5": "top-5 accuracy (%)", "nll": "NLL (nats)",
               "ece": "ECE (15 bins)", "mce": "MCE, largest bin gap (15 bins)",
               "rmsce": "RMS calibration error (15 bins)",
               "ece_ts": "ECE after temperature scaling (T fit on validation, 15 bins)",
               "nll_ts": "NLL after temperature scaling (T fit on validation, nats)",
               "temperature": "temperature T fit on validation"}


# A cost-of-inference column: whether a run has its number (``has(record, setting)``), what it means in the
# Markdown note and the LaTeX caption (``{setting}`` filled in), and its CSV columns.
CostColumn = namedtuple("CostColumn", "has note caption csv")


COST = {
    "macs": CostColumn(
        lambda r, setting: macs_differ(r),
        "MACs = executed MACs of the final model for one input as it actually runs (`flops.executed`) / the "
        "dense student's (`flops.dense`): below 1× only for a physically smaller model, a masked "
        "(weight-granularity) model runs all of its MACs",
        " MACs: executed MACs of the final model as a fraction of the dense student's.",
        ("macs_executed_mean", "macs_ratio_mean", "macs_ratio_n")),
    "speedup": CostColumn(
        lambda r, setting: speedup(r, setting) is not None,
        "speed-up = dense student median ms / final model median ms, both measured by the same run "
        "({setting}; `latency`)",
        " Speed-up: dense student / final model median latency ({setting}), measured by the same run.",
        ("latency_batch", "latency_mode", "latency_ms_mean", "speedup_mean", "speedup_std", "speedup_n")),
}


# --- what a table shows ---------------------------------------------------------------------------------------
def _left_out(col: str, t: Table, setting: Setting) -> str:
    """Why a cost column is not in a table and how to get it."""
    if col == "macs":
        return ("MACs column left out: every run executes all of the dense student's MACs (weight granularity "
                "zeroes weights but removes none); `prune.granularity=channel` removes channels and executes "
                "fewer.")
    other = measured_settings(t.runs)
    return (f"Speed-up column left out: no run measured latency at {setting}; "
            + (f"measured: {'; '.join(map(str, other))} (choose with --latency-batch and --latency-mode)."
               if other else "run with `eval.latency=true` (or time a saved model: `kdprune-eval RUN_DIR "
                             "--latency`)."))


def shown_cost_columns(t: Table, cols: tuple, setting: Setting) -> tuple:
    """The asked-for cost columns a table has numbers for, and a line for each left out saying how to get it:
    MACs when some run executes other MACs than the dense student, speed-up when some run measured latency
    at the setting."""
    shown = tuple(c for c in cols if any(COST[c].has(r, setting) for r in t.runs))
    return shown, [_left_out(c, t, setting) for c in cols if c not in shown]


def dense_cost_line(t: Table, cols: tuple, setting: Setting) -> Optional[str]:
    """The dense student's cost: MACs and, for the latency setting, median ms (means over the runs that
    recorded them); None when the runs recorded neither."""
    bits = []
    dense = mean([macs(r, "dense") or None for r in t.runs])
    if "macs" in cols and dense is not None:
        bits.append((f"{dense / 1e6:,.2f} M" if dense >= 1e6 else f"{dense:,.0f}") + " MACs per input")
    ms = [v for v in (latency_of(r, "dense_student", setting) for r in t.runs) if v is not None]
    if "speedup" in cols and ms:
        bits.append(f"{mean(ms):.3f} ms median ({latency_where(t.runs, f'{setting}, n={len(ms)}')})")
    return "Dense student cost: " + ", ".join(bits) + "." if bits else None


# --- how a table is written ------------------------------------------------------------------------------------
TEX_ESC = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
           "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(s: str) -> str:
    return "".join(TEX_ESC.get(c, c) for c in str(s))


@dataclass(frozen=True)
class Style:
    """How a format writes a table: the characters of its numbers, its column headings (``{s}``: the
    sparsity) and how cells join into a line."""
    pm: str
    dash: str  # no number
    times: str
    minus: str
    comma: str  # thousands
    esc: Callable
    heads: dict  # method, sparsity, macs, speedup, seconds, samples
    line: str  # the cells joined by ``sep`` go into {}
    sep: str

    def row(self, cells: list) -> str:
        return self.line.format(self.sep.join(cells))


MD = Style("±", "—", "×", MINUS, ",", str, {
    "method": "method", "sparsity": "sparsity {s}", "macs": "MACs {s}", "speedup": "speed-up {s}",
    "seconds": "seconds / run", "samples": "samples / run¹"}, "| {} |", " | ")
TEX = Style(r"$\pm$", "--", r"$\times$", "$-$", "{,}", tex_escape, {
    "method": "Method", "sparsity": "$s={s}$", "macs": "MACs", "speedup": "Speed-up",
    "seconds": "Seconds", "samples": "Samples"}, "{} \\\\", " & ")


def digits(metric: str) -> int:
    return 2 if metric in ("top1", "top5") else 4


def fmt_stat(s: Optional[Stat], nd: int, st: Style = MD) -> str:
    return st.dash if s is None else f"{s.mean:.{nd}f} {st.pm} {s.std:.{nd}f} (n={s.n})"


def fmt_sp(s: float) -> str:
    return f"{s:g}"


def row_texts(row: Row, sparsities: list, cols: tuple, nd: int, st: Style) -> list:
    """A table row as text: label; per sparsity the metric and the shown cost columns (``0.48×``, the mean over
    seeds, with n when fewer runs than the cell's have it); seconds per run over the runs that did their own
    work (``(N reused)`` beside it); samples per run."""
    cells = []
    for s in sparsities:
        c = row.cells.get(s)
        cells.append(fmt_stat(c.metric, nd, st) if c else st.dash)
        for x in ([c.costs[col] for col in cols] if c else [None] * len(cols)):
            cells.append(st.dash if x is None else f"{x.mean:.2f}{st.times}"
                         + (f" (n={x.n})" if x.n < len(c.recs) else ""))
    (secs, samples), reused = cost(row.runs), sum(map(is_reused, row.runs))
    return [row.label(st.minus, st.esc), *cells,
            (st.dash if secs is None else f"{secs:.1f}") + (f" ({reused} reused)" if reused else ""),
            st.dash if samples is None else f"{samples:,.0f}".replace(",", st.comma)]


def grid(t: Table, cols: tuple, nd: int, st: Style) -> tuple:
    """The table's heading line and its row lines in the style."""
    h = st.heads
    head = [h["method"], *(h[k].format(s=fmt_sp(s)) for s in t.sparsities for k in ("sparsity", *cols)),
            h["seconds"], h["samples"]]
    return st.row(head), [st.row(row_texts(row, t.sparsities, cols, nd, st)) for row in t.rows]


# --- Markdown -------------------------------------------------------------------------------------------------
def cost_note(cols: tuple, setting: Setting) -> str:
    return ("Cost of inference: " + "; ".join(COST[c].note.format(setting=setting) for c in cols)
            + ". Both are means over the runs that recorded them (n shown when fewer than the cell's runs); — "
              "where no run did.")


def _md_head(metric: str, counts: dict, n_superseded: int) -> list:
    out = ["# kdprune report", "",
           f"Metric: `metrics.final.{metric}`, {METRIC_DESC.get(metric, metric)} on the test split; cells are "
           "mean ± sample std (ddof=1) over seeds, n = number of runs (± 0.00 when n=1). Every number "
           "here is a test-split number; validation-split numbers (`metrics_val`, runs with "
           "`data.val_split > 0`, what a search selects on) are in the records and a search's `best.yaml`."]
    if metric in OPTIONAL_METRICS:
        out += ["", f"A run that did not record `{metric}` counts among the runs but not in n; a cell is — where "
                "no run did (`ece_ts`, `nll_ts` and `temperature` need a held-out validation split, "
                "`data.val_split>0`)."]
    return out + ["", f"Records: {counts['files']} `{RESULTS}` read, {counts['ok']} ok, {counts['failed']} failed, "
                      f"{counts['missing']} job folders missing a record"
                      + (f", {n_superseded} superseded by a newer run of the same job" if n_superseded else "")
                      + "."]


def _md_table(t: Table, metric: str, nd: int, asked: tuple, setting: Setting) -> list:
    cols, notes = shown_cost_columns(t, asked, setting)
    out = ["", f"## {t.dataset} · {t.teacher} → {t.student}", "",
           f"Dense references ({metric}): teacher {fmt_stat(t.dense('teacher', metric), nd)}, "
           f"dense student {fmt_stat(t.dense('dense_student', metric), nd)}."]
    for line in filter(None, [dense_cost_line(t, asked, setting), *notes]):
        out += ["", line]
    head, rows = grid(t, cols, nd, MD)
    return out + ["", head, "|---|" + "---:|" * (len(t.sparsities) * (1 + len(cols)) + 2), *rows]


def _where(rec: Optional[dict]) -> str:
    bits = [f"{k}={rec.get(k)}" for k in ("method", "method_variant", "sparsity_target", "seed", "dataset")
            if rec.get(k) is not None] if rec else []
    return f" ({', '.join(bits)})" if bits else ""


def _problem_lines(problems: list) -> list:
    return [f"- `{p.path}`: {p.what}" + (f": {p.error}" if p.error else "") + _where(p.record) for p in problems]


def markdown(tables: list, metric: str, problems: list, superseded: list, layer_notes: list, counts: dict,
             asked: tuple = (), setting: Setting = Setting()) -> str:
    nd = digits(metric)
    out = _md_head(metric, counts, len(superseded))
    shown = [shown_cost_columns(t, asked, setting)[0] for t in tables]
    anywhere = tuple(c for c in asked if any(c in cols for cols in shown))
    if anywhere:
        out += ["", cost_note(anywhere, setting)]
    for t in tables:
        out += _md_table(t, metric, nd, asked, setting)
    if tables:
        out += ["", "¹ " + SAMPLES_NOTE]
    for heading, lines in (("Failed jobs", _problem_lines(problems)),
                           ("Per-layer plots not drawn", _problem_lines(layer_notes)),
                           ("Superseded records (same job, newer record used)",
                            [f"- `{old}` → `{new}`" for old, new in superseded])):
        if lines:
            out += ["", f"## {heading}", "", *lines]
    return "\n".join(out) + "\n"


# --- LaTeX ----------------------------------------------------------------------------------------------------
def _tex_caption(t: Table, cols: tuple, metric: str, setting: Setting) -> str:
    return (f"{tex_escape(t.dataset)}, {tex_escape(t.teacher)} $\\to$ {tex_escape(t.student)}: final "
            f"{tex_escape(METRIC_DESC.get(metric, metric))} on the test split, mean {TEX.pm} sample std over seeds "
            "(n runs). Samples per run include the recorded cost of cached stages (teacher, dense student, ...); "
            "seconds are the run's own wall-clock."
            + "".join(COST[c].caption.format(setting=tex_escape(str(setting))) for c in cols)
            + (" Cost columns are means over seeds." if cols else ""))


def latex(tables: list, metric: str, asked: tuple = (), setting: Setting = Setting()) -> str:
    nd = digits(metric)
    out = ["% kdprune-report: one booktabs tabular per (dataset, teacher, student); needs \\usepackage{booktabs}",
           ""]
    for t in tables:
        sps, (cols, _) = t.sparsities, shown_cost_columns(t, asked, setting)
        head, rows = grid(t, cols, nd, TEX)
        out += [r"\begin{table}[t]", r"\centering", f"\\caption{{{_tex_caption(t, cols, metric, setting)}}}",
                r"\begin{tabular}{l" + ("c" + "r" * len(cols)) * len(sps) + "rr}", r"\toprule", head, r"\midrule"]
        for name, key in (("Teacher (dense)", "teacher"), ("Student (dense)", "dense_student")):
            out.append(f"{name} & \\multicolumn{{{len(sps) * (1 + len(cols))}}}{{c}}"
                       f"{{{fmt_stat(t.dense(key, metric), nd, TEX)}}}" r" & & \\")
        out += [r"\midrule", *rows, r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out) + "\n"


# --- CSV ------------------------------------------------------------------------------------------------------
CSV_COLUMNS = ["dataset", "teacher", "student", "method", "retrain_kd", "sparsity", "mean", "std", "n",
               "seconds_mean", "samples_mean"]


def _r(x) -> str:
    return "" if x is None else repr(x)


def _csv_cost_cells(recs: list, st: Optional[Stat], col: str, setting: Setting) -> list:
    if col == "macs":
        return [_r(mean([macs(r, "executed") for r in recs])), _r(st and st.mean), st.n if st else 0]
    ms = mean([latency_of(r, "final", setting) for r in recs])
    return [setting.batch, setting.mode, _r(ms), _r(st and st.mean), _r(st and st.std), st.n if st else 0]


def write_csv(tables: list, path: Path, asked: tuple = (), setting: Setting = Setting()) -> None:
    """One row per (table, row, sparsity), full precision. A ``granularity`` column is appended when some row is
    not weight-granularity or cost columns are asked for, a ``variant`` column (empty for the method as it is)
    when some row is a variant, then the asked-for cost columns and, where some run reused a finished job,
    ``runs_reused``."""
    rows = [(t, row) for t in tables for row in t.rows]
    gran = bool(asked) or any(row.granularity != WEIGHT for _, row in rows)
    var = any(row.variant is not None for _, row in rows)
    reused = any(is_reused(r) for t in tables for r in t.runs)  # seconds_mean leaves them out
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS + (["granularity"] if gran else []) + (["variant"] if var else [])
                   + [c for k in asked for c in COST[k].csv] + (["runs_reused"] if reused else []))
        for t, row in rows:
            for s, c in row.cells.items():
                w.writerow([t.dataset, t.teacher, t.student, row.method, "" if row.kd is None else str(row.kd).lower(),
                            repr(s), _r(c.metric and c.metric.mean), _r(c.metric and c.metric.std),
                            c.metric.n if c.metric else 0, *map(_r, cost(c.recs))]
                           + ([row.granularity] if gran else []) + ([row.variant or ""] if var else [])
                           + [x for k in asked for x in _csv_cost_cells(c.recs, c.costs[k], k, setting)]
                           + ([sum(map(is_reused, c.recs))] if reused else []))
