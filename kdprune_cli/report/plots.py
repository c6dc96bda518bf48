"""The report's plots: accuracy against sparsity and against cost of inference (the tables' numbers: mean ±
sample std over seeds), per-layer sparsity of a run, and a run's reliability diagrams."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from matplotlib.figure import Figure

from kdprune_cli.report.collect import InputError
from kdprune_cli.report.stats import (
    Setting,
    Table,
    label,
    latency_entries,
    latency_of,
    latency_where,
    macs,
    macs_differ,
    metric_of,
    num,
    row_key,
    stat,
)
from kdprune_cli.report.tables import METRIC_DESC, fmt_sp


def safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(s)).strip("_") or "x"


def run_name(rfile: Path, rec: dict) -> str:
    """What a run's plots are named after: its job id, else its folder."""
    return str(rec.get("job_id") or rfile.parent.name or "run")


def _stem(t: Table) -> str:
    return f"{safe(t.dataset)}_{safe(t.teacher)}_{safe(t.student)}"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def finish(ax, t: Table, metric: str, how: str, path: Path) -> Path:
    """The common end of a table's plot: metric axis, title, grid, legend, written to ``path``."""
    ax.set_ylabel(f"final {METRIC_DESC.get(metric, metric)}, test split")
    ax.set_title(f"{t.dataset}: {t.teacher} → {t.student} ({how})", fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # none where no run recorded the metric
        ax.legend(fontsize=8)
    return _save(ax.figure, path)


def plot_table(t: Table, metric: str, out: Path) -> Path:
    """Accuracy against target sparsity: a series per row, the cells' mean ± sample std, the dense teacher and
    student as lines."""
    ax = Figure(figsize=(6.4, 4.4)).subplots()
    for row in t.rows:
        pts = [(s, c.metric) for s, c in row.cells.items() if c.metric is not None]
        if not pts:
            continue
        xs, means, stds = [s for s, _ in pts], [st.mean for _, st in pts], [st.std for _, st in pts]
        bars = ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=row.label())
        if len(xs) > 1 and any(st.n > 1 for _, st in pts):
            ax.fill_between(xs, [a - d for a, d in zip(means, stds)], [a + d for a, d in zip(means, stds)],
                            color=bars.lines[0].get_color(), alpha=0.15, linewidth=0)
    for key, name, style in (("teacher", "teacher (dense)", ":"), ("dense_student", "student (dense)", "--")):
        d = t.dense(key, metric)
        if d is not None:
            ax.axhline(d.mean, color="gray", linestyle=style, linewidth=1, label=name)
    ax.set_xlabel("target sparsity")
    return finish(ax, t, metric, "mean ± sample std over seeds, as in the tables",
                  out / f"accuracy_vs_sparsity_{_stem(t)}.png")


def cost_axis(t: Table, setting: Setting):
    """What the cost plot puts on x: ``(kind, final x of a record, dense student x of a record, label)``
    with kind ``latency`` (median ms of the setting) when some run measured it, else ``macs`` (executed
    MACs, millions) when some run executes other MACs than the dense student, else None (no plot)."""
    if any(latency_of(r, "final", setting) is not None for r in t.runs):
        return ("latency", lambda r: latency_of(r, "final", setting),
                lambda r: latency_of(r, "dense_student", setting),
                f"latency, median ms ({latency_where(t.runs, str(setting))})")
    if any(macs_differ(r) for r in t.runs):  # all at the dense MACs: one vertical line, no plot
        mm = lambda key: lambda r: None if macs(r, key) is None else macs(r, key) / 1e6  # noqa: E731
        why = "no latency measured" if not any(latency_entries(r, "final") for r in t.runs) \
            else f"no latency measured at {setting}"
        return "macs", mm("executed"), mm("dense"), f"executed MACs per input, millions ({why})"
    return None


def _xy(recs: list, fx, metric: str, key: str):
    """Mean and std of x and of the metric over the records that have both; None if none has."""
    pairs = [(x, y) for x, y in ((fx(r), metric_of(r, key, metric)) for r in recs) if x is not None and y is not None]
    return (stat([x for x, _ in pairs]), stat([y for _, y in pairs])) if pairs else None


def plot_cost(t: Table, metric: str, out: Path, setting: Setting = Setting()) -> Optional[Path]:
    """Accuracy vs latency (or executed MACs where no latency was measured): one series per row, a point per
    sparsity (mean ± std over seeds in x and y), the dense student as a reference point, the teacher as a
    line. None (nothing written) when no run of the table recorded either."""
    axis = cost_axis(t, setting)
    if axis is None:
        return None
    kind, fx, fdense, xlabel = axis
    ax = Figure(figsize=(6.4, 4.4)).subplots()
    for row in t.rows:
        pts = [(s, xy) for s, xy in ((s, _xy(c.recs, fx, metric, "final")) for s, c in row.cells.items())
               if xy is not None]
        if not pts:
            continue
        xs, ys = [xy[0] for _, xy in pts], [xy[1] for _, xy in pts]
        bars = ax.errorbar([x.mean for x in xs], [y.mean for y in ys], xerr=[x.std for x in xs],
                           yerr=[y.std for y in ys], marker="o", capsize=3, label=row.label())
        for (s, _), x, y in zip(pts, xs, ys):
            ax.annotate(fmt_sp(s), (x.mean, y.mean), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=bars.lines[0].get_color())
    dense = _xy(t.runs, fdense, metric, "dense_student")
    if dense is not None:
        ax.errorbar([dense[0].mean], [dense[1].mean], xerr=[dense[0].std], yerr=[dense[1].std], marker="*",
                    markersize=12, color="black", linestyle="none", capsize=3, label="student (dense)")
    d = t.dense("teacher", metric)
    if d is not None:
        ax.axhline(d.mean, color="gray", linestyle=":", linewidth=1, label="teacher (dense)")
    ax.set_xlabel(f"final model {xlabel}" if kind == "latency" else xlabel, fontsize=8)
    return finish(ax, t, metric, "mean ± sample std over seeds; labels: sparsity",
                  out / f"accuracy_vs_latency_{_stem(t)}.png")


def layer_sparsities(rec: dict) -> Optional[dict]:
    """``sparsity_per_layer`` when it is a non-empty object of numbers; None otherwise."""
    per = rec.get("sparsity_per_layer")
    return per if isinstance(per, dict) and per and all(num(v) is not None for v in per.values()) else None


def plot_layers(rec: dict, name: str, out: Path) -> Path:
    """A bar per layer: its sparsity, the target as a red dashed line."""
    layers = rec["sparsity_per_layer"]
    names, vals = list(layers), [float(v) for v in layers.values()]
    ax = Figure(figsize=(7.0, max(2.5, 0.28 * len(names) + 1.2))).subplots()
    y = list(range(len(names)))
    ax.barh(y, vals, color="tab:blue")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("sparsity (fraction of zero weights)")
    sub = []
    tgt = num(rec.get("sparsity_target"))
    if tgt is not None:
        ax.axvline(tgt, color="red", linestyle="--", linewidth=1)
        sub.append(f"target {tgt:g} (red dashed)")
    act = num(rec.get("sparsity_actual"))
    if act is not None:
        sub.append(f"global {act:.4f}")
    ax.set_title(f"{label(str(rec.get('method')), None, variant=row_key(rec)[3])} · {rec.get('dataset')} · "
                 f"{rec.get('student')} · seed {rec.get('seed')}" + (f"\n{', '.join(sub)}" if sub else ""),
                 fontsize=10)
    return _save(ax.figure, out / f"layers_{safe(name)}.png")


# --- reliability diagrams ---------------------------------------------------------------------------------------
RELIABILITY_MODELS = (("dense_student", "dense student"), ("final", "final model"))


def _bins(m) -> Optional[dict]:
    """``metrics.<model>.reliability`` checked (equal-length ``count``, ``confidence``, ``accuracy``) with the
    model's ``ece``, ``ece_ts`` and ``temperature``; None when the bins are absent or malformed."""
    r = m.get("reliability") if isinstance(m, dict) else None
    bins = {k: r.get(k) for k in ("count", "confidence", "accuracy")} if isinstance(r, dict) else {}
    if not (bins and all(isinstance(v, list) for v in bins.values())
            and 0 < len(bins["count"]) == len(bins["confidence"]) == len(bins["accuracy"])):
        return None
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in bins["count"]) or any(
            n and (num(x) is None or num(a) is None) for n, x, a in zip(*bins.values())):
        return None
    return {**bins, **{k: num(m.get(k)) for k in ("ece", "ece_ts", "temperature")}}


def reliability_data(rec: dict) -> dict:
    """For the dense student and the final model of a record: the per-bin sample counts, mean confidence and
    accuracy (``metrics.<model>.reliability``, test split) with the recorded ``ece`` (and ``ece_ts``,
    ``temperature`` where the run fit one); a model without bins maps to None. :class:`InputError` when the
    final model has none."""
    metrics = rec.get("metrics") if isinstance(rec.get("metrics"), dict) else {}
    out = {key: _bins(metrics.get(key)) for key, _ in RELIABILITY_MODELS}
    if out["final"] is None:
        raise InputError(f"no reliability bins (metrics.final.reliability) in the record (status "
                         f"{rec.get('status')}); kdprune records them for every run it evaluates")
    return out


def _reliability_panel(ax, d: Optional[dict], name: str) -> None:
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-label probability)")
    ax.grid(True, alpha=0.3)
    if d is None:
        ax.set_title(f"{name}: no reliability bins recorded", fontsize=10)
        return
    n = len(d["count"])
    width = 1.0 / n
    full = [i for i, c in enumerate(d["count"]) if c]
    left = [i * width for i in full]
    acc = [d["accuracy"][i] for i in full]
    conf = [d["confidence"][i] for i in full]
    ax.bar(left, acc, width=width, align="edge", color="tab:blue", edgecolor="black", linewidth=0.5,
           label="accuracy")
    ax.bar(left, [c - a for c, a in zip(conf, acc)], bottom=acc, width=width, align="edge", color="tab:red",
           alpha=0.3, edgecolor="tab:red", hatch="//", linewidth=0.5, label="gap to mean confidence")
    t = f"{name}: ECE {d['ece']:.4f}" if d["ece"] is not None else f"{name}"
    if d.get("ece_ts") is not None and d.get("temperature") is not None:
        t += f"\nafter temperature scaling (T={d['temperature']:.3g}): ECE {d['ece_ts']:.4f}"
    ax.set_title(t, fontsize=10)
    ax.text(0.98, 0.02, f"{sum(d['count']):,} test samples, {n} bins", transform=ax.transAxes,
            ha="right", va="bottom", fontsize=7)
    ax.legend(fontsize=8, loc="upper left")


def plot_reliability(data: dict, heading: str, path: Path) -> Path:
    """Two panels, dense student and final model: per confidence bin the accuracy (bar), the gap to the bin's
    mean confidence (hatched), the diagonal of perfect calibration; the ECE in each panel's title."""
    fig = Figure(figsize=(9.6, 4.6))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (key, name) in zip(axes, RELIABILITY_MODELS):
        _reliability_panel(ax, data.get(key), name)
    axes[0].set_ylabel("accuracy")
    fig.suptitle(heading, fontsize=10)
    return _save(fig, path)


def write_reliability(items: list, out: Optional[Path]) -> list:
    """``reliability_<job>.png`` per ``(results.json, record, data)``, into ``out`` (default: the run's own
    folder)."""
    written = []
    for rfile, rec, data in items:
        where = out if out is not None else rfile.parent
        where.mkdir(parents=True, exist_ok=True)
        heading = (f"{label(*row_key(rec))} · {rec.get('dataset')} · {rec.get('student')} · sparsity "
                   f"{rec.get('sparsity_target')} · seed {rec.get('seed')} (test split)")
        written.append(plot_reliability(data, heading, where / f"reliability_{safe(run_name(rfile, rec))}.png"))
    return written
