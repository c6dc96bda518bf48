"""The numbers of a report: records grouped into tables and rows, per-cell statistics over seeds, the cost of a
run (samples, seconds) and the cost of inference (executed MACs, latency)."""
from __future__ import annotations

import math
import statistics
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Optional

MINUS = "\u2212"
WEIGHT = "weight"
METRICS = ("top1", "top5", "nll", "ece", "mce", "rmsce", "ece_ts", "nll_ts", "temperature")
# Recorded only by runs that held out a validation split (temperature scaling is fit there): a run without one
# is still a run, its cell shows "—".
OPTIONAL_METRICS = ("ece_ts", "nll_ts", "temperature")


def num(x) -> Optional[float]:
    """A finite JSON number as a float; None for anything else (booleans included)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def metric_of(rec: dict, key: str, metric: str) -> Optional[float]:
    m = (rec.get("metrics") or {}).get(key) or {}
    return num(m.get(metric)) if isinstance(m, dict) else None


Stat = namedtuple("Stat", "mean std n")  # over seeds: the mean, the sample std, the number of values


def stat(values: list) -> Optional[Stat]:
    """Mean and sample std (ddof=1; 0 for one value) of the values that are not None; None when none is."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Stat(statistics.fmean(values), std, len(values))


def mean(values: list) -> Optional[float]:
    """The mean of the values that are not None; None when none is."""
    s = stat(values)
    return s and s.mean


# --- the cost of a run ----------------------------------------------------------------------------------------
def is_reused(rec: dict) -> bool:
    """A run that reused a job finished earlier (``cost.reused``): no work of its own."""
    c = rec.get("cost")
    return isinstance(c, dict) and c.get("reused") is True


def run_samples(rec: dict) -> int:
    """Samples the result really cost: all stages (network + teacher), cached stages by their artifact cost;
    a reused run's by its original run's cost."""
    c = rec.get("cost") if isinstance(rec.get("cost"), dict) else {}
    if is_reused(rec):
        c = c.get("original") if isinstance(c.get("original"), dict) else {}
    stages = [st for st in (c.get("stages") or {}).values() if isinstance(st, dict)]
    stages += [st["artifact"] for st in stages if st.get("cached") and isinstance(st.get("artifact"), dict)]
    return sum(int(st.get("samples") or 0) + int(st.get("teacher_samples") or 0) for st in stages)


def run_seconds(rec: dict) -> Optional[float]:
    """The run's own wall-clock; None for a reused run (its seconds are not work, see :func:`is_reused`)."""
    return None if is_reused(rec) else num((rec.get("cost") or {}).get("total_seconds"))


def cost(recs: list) -> tuple:
    """Mean seconds (over the runs that did their own work) and mean samples per run."""
    return mean([run_seconds(r) for r in recs]), mean([float(run_samples(r)) for r in recs])


# --- the cost of inference: executed MACs and latency ----------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """Which latency measurement counts: batch size and mode (``eager``, ``compiled``)."""
    batch: int = 1
    mode: str = "eager"

    def __str__(self) -> str:
        return f"batch {self.batch}, {self.mode}"


def macs(rec: dict, key: str) -> Optional[float]:
    """``flops.<key>``: ``dense``, ``sparse`` or ``executed`` (MACs for one input); None when not recorded."""
    f = rec.get("flops")
    return num(f.get(key)) if isinstance(f, dict) else None


def macs_differ(rec: dict) -> bool:
    """The run executes fewer (or other) MACs than the dense student: a physically smaller model."""
    ex, dense = macs(rec, "executed"), macs(rec, "dense")
    return ex is not None and dense is not None and ex != dense


def latency_entries(rec: dict, which: str) -> list:
    """The latency measurements (``latency.<which>``) of ``final`` or ``dense_student``."""
    lat = rec.get("latency")
    entries = lat.get(which) if isinstance(lat, dict) else None
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def latency_of(rec: dict, which: str, setting: Setting) -> Optional[float]:
    """Median milliseconds of ``which`` for the setting; None when it was not measured."""
    found = (num(e.get("median_ms")) for e in latency_entries(rec, which)
             if num(e.get("batch")) == setting.batch and e.get("mode") == setting.mode)
    return next((ms for ms in found if ms is not None and ms > 0), None)


def speedup(rec: dict, setting: Setting) -> Optional[float]:
    """Dense student median ms / final model median ms, both measured by the same run."""
    final, dense = latency_of(rec, "final", setting), latency_of(rec, "dense_student", setting)
    return dense / final if final is not None and dense is not None else None


def latency_where(recs: list, setting: str) -> str:
    """The latency ``setting`` (as it is to be written), then where the latencies of ``recs`` were measured:
    device and dtype, as recorded."""
    lats = [r["latency"] for r in recs if isinstance(r.get("latency"), dict)]
    where = (" ".join([str(lat.get("device", "?")), str(lat.get("dtype", "?"))]
                      + (["channels_last"] if lat.get("channels_last") else [])) for lat in lats)
    return "; ".join([setting, *dict.fromkeys(where)])


def measured_settings(recs: list) -> list:
    """The latency settings some run measured (final model), in order of appearance."""
    return list(dict.fromkeys(Setting(int(e["batch"]), e["mode"]) for r in recs for e in latency_entries(r, "final")
                              if num(e.get("batch")) is not None and isinstance(e.get("mode"), str)))


def macs_ratio(rec: dict, setting: Setting = Setting()) -> Optional[float]:
    """Executed MACs of the final model as a fraction of the dense student's (the setting plays no part)."""
    ex, dense = macs(rec, "executed"), macs(rec, "dense")
    return ex / dense if ex is not None and dense else None


# A cost-of-inference column: its number for one record at a latency setting.
COST_OF = {"macs": macs_ratio, "speedup": speedup}


# --- grouping -------------------------------------------------------------------------------------------------
KD_ORDER = {None: 0, True: 1, False: 2}


def label(method: str, kd, granularity: str = WEIGHT, variant: Optional[str] = None, minus: str = MINUS,
          esc=str) -> str:
    """``cakld +KD [variant] (channel)``; ``esc`` escapes the recorded names (LaTeX), ``minus`` writes −KD."""
    name = esc(method) if kd is None else f"{esc(method)} {'+' if kd else minus}KD"
    name = name if variant is None else f"{name} [{esc(variant)}]"
    return name if granularity == WEIGHT else f"{name} ({esc(granularity)})"


def row_key(rec: dict) -> tuple:
    """The row of a record: method, ``retrain_kd`` (None when not a boolean), ``prune.granularity`` (``weight``:
    masked, ``channel``: a physically smaller model) and ``method_variant`` (``Method.variant()``, e.g. ``intact
    teacher``; None, recorded as null, for the method as it is)."""
    kd, v = rec.get("retrain_kd"), rec.get("method_variant")
    return (str(rec.get("method")), kd if isinstance(kd, bool) else None, str(rec.get("granularity")),
            v if isinstance(v, str) and v else None)


@dataclass
class Cell:
    """One (row, sparsity): its runs, the metric over seeds and each asked-for cost column over seeds."""
    recs: list = field(default_factory=list)
    metric: Optional[Stat] = None
    costs: dict = field(default_factory=dict)  # "macs" / "speedup" -> Optional[Stat]


@dataclass
class Row:
    method: str
    kd: Optional[bool]
    granularity: str = WEIGHT
    variant: Optional[str] = None
    cells: dict = field(default_factory=dict)  # sparsity -> Cell, in order
    runs: list = field(default_factory=list)

    def label(self, minus: str = MINUS, esc=str) -> str:
        return label(self.method, self.kd, self.granularity, self.variant, minus, esc)


@dataclass
class Table:
    dataset: str
    teacher: str
    student: str
    rows: list = field(default_factory=list)  # in the order the tables show them
    runs: list = field(default_factory=list)

    @property
    def sparsities(self) -> list:
        return sorted({s for r in self.rows for s in r.cells})

    def dense(self, key: str, metric: str) -> Optional[Stat]:
        return stat([metric_of(r, key, metric) for r in self.runs])


def group(records: list, metric: str = "top1", asked: tuple = (), setting: Setting = Setting()) -> list:
    """One :class:`Table` per (dataset, teacher, student), one :class:`Row` per (method, retrain_kd,
    granularity, variant), one :class:`Cell` per target sparsity with the metric and the ``asked`` cost columns
    (``macs``, ``speedup`` at the latency ``setting``) over seeds."""
    tables, rows = {}, {}
    for rec in records:
        tkey = (str(rec.get("dataset")), str(rec.get("teacher")), str(rec.get("student")))
        tables.setdefault(tkey, Table(*tkey)).runs.append(rec)
        row = rows.setdefault((tkey, row_key(rec)), Row(*row_key(rec)))
        row.cells.setdefault(float(rec["sparsity_target"]), Cell()).recs.append(rec)
        row.runs.append(rec)
    def order(key):  # table; method, no KD before +KD before -KD, weight granularity first, the method as it is first
        tkey, (method, kd, gran, var) = key
        return tkey, method, KD_ORDER.get(kd, 3), gran != WEIGHT, gran, var is not None, var or ""

    for key in sorted(rows, key=order):
        row, tkey = rows[key], key[0]
        row.cells = {s: Cell(c.recs, stat([metric_of(r, "final", metric) for r in c.recs]),
                             {k: stat([COST_OF[k](r, setting) for r in c.recs]) for k in asked})
                     for s, c in sorted(row.cells.items())}
        tables[tkey].rows.append(row)
    return [tables[k] for k in sorted(tables)]
