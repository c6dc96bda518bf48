"""``kdprune-report``: collect ``results.json`` records into paper-style tables, CSV, LaTeX and plots.

    kdprune-report PATH... [--out DIR] [--metric top1] [--cost none|macs|latency|all]
                   [--latency-batch 1] [--latency-mode eager] [--layers RUN_DIR ...] [--reliability RUN_DIR ...]
    kdprune-report --reliability RUN_DIR... [--out DIR]

Every ``results.json`` under the PATHs (searched recursively; a PATH may also be a ``results.json``) is read.
Records with ``status: ok`` are grouped by (dataset, teacher, student, method, retrain_kd, granularity,
method_variant); each (dataset, teacher, student) gets one table: rows are methods (a variant, e.g. NutePrune's
``teachers=intact`` ablation, is its own row ``nuteprune [intact teacher]``), columns the target sparsities, cells the
mean ± sample std (ddof=1) of ``metrics.final.<metric>`` over seeds with n, plus the dense references and
the cost per run. Written to ``--out`` (default: the first PATH if it is a folder): ``report.md``,
``report.csv``, ``report.tex`` (booktabs), ``accuracy_vs_sparsity_<dataset>_<teacher>_<student>.png``,
``accuracy_vs_latency_<dataset>_<teacher>_<student>.png`` where some run recorded its latency or executes
fewer MACs than the dense student, and, for each ``--layers`` run, ``layers_<job>.png``. Plots draw what the
tables give: mean ± sample std over seeds.

``--metric`` is one of top1, top5, nll, ece, and the calibration fields mce, rmsce, ece_ts, nll_ts,
temperature (docs/calibration.md); a run that did not record the chosen one (``ece_ts`` needs a held-out
validation split) counts among the runs but not in n, and a cell where none did shows ``—``.

``--reliability RUN_DIR...`` draws ``reliability_<job>.png`` per run: accuracy against confidence per bin
(``metrics.<model>.reliability``), the dense student beside the final model, ECE in the titles; into
``--out``, or, without PATHs, into the run folder. A run whose record has no bins for the final model is bad
input (exit 2, nothing written).

``--cost macs|latency|all`` adds cost-of-inference columns beside each sparsity: the final model's executed
MACs as a fraction of the dense student's (``flops.executed / flops.dense``) and its speed-up over the dense
student (dense median ms / final median ms of one run) for the latency setting ``--latency-batch`` (1) and
``--latency-mode`` (eager); means over seeds, ``—`` where no run of a cell recorded them. A table gets a
column only when some run has its numbers (MACs: some run executes other MACs than the dense student); in
place of one left out, a line says how to get it (``prune.granularity=channel``, ``eval.latency=true``).
A run that reused a job finished earlier (``cost.reused``) is left out of the seconds per run and counted
apart (``N reused``).

Failed records and job folders without ``results.json`` are listed (stdout and ``report.md``); reruns of
one job count once (the newest record): records are matched by ``job_id``, or, when a job failed before
its id was computed, by its config. Exit status: 0 all ok, 1 some job failed or is missing (the report is
still written), 2 bad input (a PATH does not exist, no ``results.json`` was found at all, ``--out`` is a
file, or the report cannot be written there), reported in one line on stderr.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

RESULTS = "results.json"
MINUS = "\u2212"
METRICS = ("top1", "top5", "nll", "ece", "mce", "rmsce", "ece_ts", "nll_ts", "temperature")
# Recorded only by some runs (temperature scaling needs a held-out validation split; records made before the
# calibration fields lack them all): a run without one is still a run, its cell shows "—".
OPTIONAL_METRICS = ("mce", "rmsce", "ece_ts", "nll_ts", "temperature")

SAMPLES_NOTE = ("Samples per run: samples pushed through the network being trained or scored plus samples "
                "pushed through a teacher, summed over all stages of the job, including what a stage loaded "
                "from the cache cost when it was made (`cost.stages.*.artifact`), i.e. what the result "
                "really cost, not only what the run itself recomputed. Seconds per run are the run's own "
                "wall-clock (`cost.total_seconds`), in which cached stages cost ~0. A run that reused a job "
                "finished earlier (`cost.reused`) trained nothing: it counts the samples its original run "
                "cost (`cost.original`) and is left out of the seconds per run (counted apart: `N reused`).")


class InputError(Exception):
    """Bad input: reported as one line on stderr with exit status 2."""


# --- finding and reading records --------------------------------------------------------------------------
@dataclass
class Problem:
    path: str
    what: str  # "failed", "missing (no results.json)", ...
    error: str = ""
    record: Optional[dict] = None


@dataclass
class Found:
    results: list = field(default_factory=list)  # Paths of results.json
    missing: list = field(default_factory=list)  # job folders without results.json


def _is_numbered_job(d: Path, siblings_hint: bool) -> bool:
    return d.name.isdigit() and ((d.parent / "multirun.yaml").is_file() or siblings_hint)


def find_results(paths: Iterable[Path]) -> Found:
    """All ``results.json`` under ``paths`` and the job folders that lack one (deduplicated, sorted)."""
    found = Found()
    results: dict = {}
    candidates: dict = {}
    for p in paths:
        if p.is_file():
            results.setdefault(p.resolve(), p)
            continue
        for root, dirs, files in os.walk(p):
            d = Path(root)
            has_hydra = ".hydra" in dirs
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            if RESULTS in files:
                results.setdefault((d / RESULTS).resolve(), d / RESULTS)
            elif has_hydra or d.name.isdigit():
                candidates.setdefault(d.resolve(), (d, has_hydra))
    # A numbered folder is a job folder when it sits in a sweep: multirun.yaml beside it, or a numbered
    # sibling that is a job (has results.json or .hydra/).
    job_parents = {r.parent.parent for r in results if r.parent.name.isdigit()}
    job_parents |= {k.parent for k, (_, h) in candidates.items() if h and k.name.isdigit()}
    ancestors = {a for r in results for a in r.parents}
    for key, (d, has_hydra) in candidates.items():
        if key in ancestors:  # results.json further down: a container, not a job
            continue
        if has_hydra or _is_numbered_job(key, key.parent in job_parents):
            found.missing.append(d)
    found.results = [results[k] for k in sorted(results, key=str)]
    found.missing.sort(key=str)
    return found


def load(path: Path):
    """``(record, None)`` or ``(None, error line)``."""
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"unreadable {RESULTS} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if not isinstance(rec, dict):
        return None, f"unreadable {RESULTS} (not a JSON object)"
    wrong = wrong_field(rec)
    if wrong is not None:
        return None, f"unreadable {RESULTS} ({wrong})"
    return rec, None


_NUMBER = (int, float)
_TEXT = (str, type(None))
# The fields the report reads, and the JSON types each may have (null where a record may leave it empty).
FIELD_TYPES = {"status": (str,), "error": _TEXT, "job_id": _TEXT, "dataset": _TEXT, "teacher": _TEXT,
               "student": _TEXT, "method": _TEXT, "method_variant": _TEXT, "granularity": _TEXT,
               "seed": (int, type(None)), "sparsity_target": (*_NUMBER, type(None)),
               "sparsity_actual": (*_NUMBER, type(None)), "retrain_kd": (bool, type(None)),
               "metrics": (dict,), "metrics_val": (dict,), "params": (dict,), "flops": (dict,), "cost": (dict,),
               "config": (dict, type(None)), "sparsity_per_layer": (dict,), "latency": (dict, type(None)),
               "latency_ms": (dict, *_NUMBER, type(None))}


def wrong_field(rec: dict) -> Optional[str]:
    """Which field of a record has a type no kdprune record has (``metrics`` a list, ``sparsity_target`` a
    string, ...), said in a few words; None when every field the report reads has its type."""
    def name(v) -> str:
        return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(v), "a number")

    for k, types in FIELD_TYPES.items():
        v = rec.get(k)
        if k in rec and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
            return f"{k} is {name(v)}"
    for key in ("metrics", "metrics_val"):
        for role, m in (rec.get(key) or {}).items():
            if not isinstance(m, dict):
                return f"{key}.{role} is {name(m)}"
            for metric, v in m.items():
                if metric == "reliability":  # the per-bin calibration data: an object of lists
                    if not isinstance(v, dict):
                        return f"{key}.{role}.{metric} is {name(v)}"
                elif v is not None and (not isinstance(v, _NUMBER) or isinstance(v, bool)):
                    return f"{key}.{role}.{metric} is {name(v)}"
    cost = rec.get("cost") or {}
    if not isinstance(cost.get("stages", {}), dict) or not all(isinstance(v, dict)
                                                                 for v in (cost.get("stages") or {}).values()):
        return "cost.stages is not an object of stages"
    if cost.get("total_seconds") is not None and not isinstance(cost["total_seconds"], _NUMBER):
        return f"cost.total_seconds is {name(cost['total_seconds'])}"
    return None


# Config keys that do not change what a job computes (as ``runner.job_id`` drops them).
VOLATILE_KEYS = ("logger", "progress", "store", "experiment", "resume", "fail_fast")
VOLATILE_DATA_KEYS = ("cache_dir", "download", "verify_checksums")


def config_key(rec: dict) -> Optional[str]:
    """A hash of the record's ``config`` without the keys that do not change the job; None without one."""
    import hashlib

    c = rec.get("config")
    if not isinstance(c, dict) or not c:
        return None
    c = {k: v for k, v in c.items() if k not in VOLATILE_KEYS}
    if isinstance(c.get("data"), dict):
        c["data"] = {k: v for k, v in c["data"].items() if k not in VOLATILE_DATA_KEYS}
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()


def _overrides_key(path: Path) -> Optional[str]:
    """The Hydra overrides of the job that wrote ``path`` (``.hydra/overrides.yaml`` beside it), if any."""
    try:
        text = (path.parent / ".hydra" / "overrides.yaml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text.strip() or None


def job_identity(path: Path, rec: dict, jobs_by_config: Optional[dict] = None) -> Optional[str]:
    """What makes two records runs of the same job: the ``job_id``; for a record without one (it failed
    before the id was computed), the job with the same config, else the config itself, else the sweep
    job's Hydra overrides. None: the record stands alone."""
    jid = rec.get("job_id")
    if isinstance(jid, str) and jid:
        return f"job:{jid}"
    ck = config_key(rec)
    if ck is not None:
        jids = (jobs_by_config or {}).get(ck, set())
        return f"job:{next(iter(jids))}" if len(jids) == 1 else f"config:{ck}"
    ov = _overrides_key(path)
    return f"overrides:{ov}" if ov is not None else None


def dedupe(loaded: list) -> tuple:
    """Keep the newest record per job (see :func:`job_identity`); return (kept, superseded)."""
    jobs_by_config: dict = {}
    for _, rec in loaded:
        jid, ck = rec.get("job_id"), config_key(rec)
        if isinstance(jid, str) and jid and ck is not None:
            jobs_by_config.setdefault(ck, set()).add(jid)
    ids = [job_identity(path, rec, jobs_by_config) for path, rec in loaded]
    newest: dict = {}
    for i, ((path, rec), ident) in enumerate(zip(loaded, ids)):
        if ident is None:
            continue
        try:
            mtime = path.stat().st_mtime
        except OSError:
            mtime = 0.0
        if ident not in newest or mtime >= newest[ident][0]:
            newest[ident] = (mtime, i)
    keep = {i for _, i in newest.values()}
    kept, superseded = [], []
    for i, ((path, rec), ident) in enumerate(zip(loaded, ids)):
        if ident is not None and i not in keep:
            superseded.append((path, loaded[newest[ident][1]][0]))
        else:
            kept.append((path, rec))
    return kept, superseded


# --- numbers ------------------------------------------------------------------------------------------------
def _num(x) -> Optional[float]:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def metric_of(rec: dict, key: str, metric: str) -> Optional[float]:
    m = (rec.get("metrics") or {}).get(key) or {}
    return _num(m.get(metric)) if isinstance(m, dict) else None


def is_reused(rec: dict) -> bool:
    """A run that reused a job finished earlier (``cost.reused``): no work of its own."""
    c = rec.get("cost")
    return isinstance(c, dict) and c.get("reused") is True


def run_samples(rec: dict) -> int:
    """Samples the result really cost: all stages (network + teacher), cached stages by their artifact cost;
    a reused run's by its original run's cost."""
    total = 0
    c = rec.get("cost") if isinstance(rec.get("cost"), dict) else {}
    if is_reused(rec):
        c = c.get("original") if isinstance(c.get("original"), dict) else {}
    stages = c.get("stages") or {}
    for st in stages.values():
        if not isinstance(st, dict):
            continue
        total += int(st.get("samples") or 0) + int(st.get("teacher_samples") or 0)
        art = st.get("artifact")
        if st.get("cached") and isinstance(art, dict):
            total += int(art.get("samples") or 0) + int(art.get("teacher_samples") or 0)
    return total


def run_seconds(rec: dict) -> Optional[float]:
    """The run's own wall-clock; None for a reused run (its seconds are not work, see :func:`is_reused`)."""
    return None if is_reused(rec) else _num((rec.get("cost") or {}).get("total_seconds"))


@dataclass
class Stat:
    mean: float
    std: float
    n: int
    min: float
    max: float


def stat(values: list) -> Optional[Stat]:
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Stat(statistics.fmean(values), std, len(values), min(values), max(values))


def _mean(values: list) -> Optional[float]:
    return statistics.fmean(values) if values else None


# --- grouping -----------------------------------------------------------------------------------------------
KD_ORDER = {None: 0, True: 1, False: 2}


WEIGHT = "weight"


def label(method: str, kd, granularity: str = WEIGHT, variant: Optional[str] = None) -> str:
    name = method if kd is None else f"{method} {'+' if kd else MINUS}KD"
    name = name if variant is None else f"{name} [{variant}]"
    return name if granularity == WEIGHT else f"{name} ({granularity})"


def granularity(rec: dict) -> str:
    """``prune.granularity`` of the record: ``weight`` (masked, also every record older than the field) or
    ``channel`` (a physically smaller model)."""
    g = rec.get("granularity")
    return g if isinstance(g, str) and g else WEIGHT


def variant(rec: dict) -> Optional[str]:
    """``method_variant`` of the record (``Method.variant()``, e.g. ``intact teacher``); None for the method as
    it is, and for every record older than the field."""
    v = rec.get("method_variant")
    return v if isinstance(v, str) and v else None


@dataclass
class Row:
    method: str
    kd: Optional[bool]
    granularity: str = WEIGHT
    variant: Optional[str] = None
    cells: dict = field(default_factory=dict)  # sparsity -> list of records
    runs: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return label(self.method, self.kd, self.granularity, self.variant)


@dataclass
class Table:
    dataset: str
    teacher: str
    student: str
    rows: dict = field(default_factory=dict)  # (method, kd, granularity, variant) -> Row
    runs: list = field(default_factory=list)

    @property
    def sparsities(self) -> list:
        return sorted({s for r in self.rows.values() for s in r.cells})

    def sorted_rows(self) -> list:
        return [self.rows[k] for k in sorted(self.rows, key=lambda k: (k[0], KD_ORDER.get(k[1], 3), k[2] != WEIGHT,
                                                                        k[2], k[3] is not None, k[3] or ""))]

    def dense(self, key: str, metric: str) -> Optional[Stat]:
        return stat([v for v in (metric_of(r, key, metric) for r in self.runs) if v is not None])


def _kd(x):
    return x if isinstance(x, bool) else None


def group(records: list, metric: str) -> list:
    tables: dict = {}
    for rec in records:
        tkey = (str(rec.get("dataset")), str(rec.get("teacher")), str(rec.get("student")))
        t = tables.setdefault(tkey, Table(*tkey))
        t.runs.append(rec)
        rkey = (str(rec.get("method")), _kd(rec.get("retrain_kd")), granularity(rec), variant(rec))
        row = t.rows.setdefault(rkey, Row(*rkey))
        row.cells.setdefault(float(rec["sparsity_target"]), []).append(rec)
        row.runs.append(rec)
    return [tables[k] for k in sorted(tables)]


def cell_stat(recs: list, metric: str) -> Optional[Stat]:
    """Over the runs that recorded ``metrics.final.<metric>``; None when none did."""
    return stat([v for v in (metric_of(r, "final", metric) for r in recs) if v is not None])


def cost(recs: list) -> tuple:
    """Mean seconds (over the runs that did their own work) and mean samples per run."""
    secs = [s for s in (run_seconds(r) for r in recs) if s is not None]
    return _mean(secs), _mean([float(run_samples(r)) for r in recs])


def n_reused(recs: list) -> int:
    return sum(is_reused(r) for r in recs)


def fmt_run_secs(recs: list, secs: Optional[float]) -> str:
    """The seconds / run cell: the mean over runs that did their own work, ``(N reused)`` beside it."""
    n = n_reused(recs)
    return fmt_secs(secs) + (f" ({n} reused)" if n else "")


# --- cost of inference: executed MACs and latency (``--cost``) ----------------------------------------------
COSTS = ("none", "macs", "latency", "all")
LEGACY_LATENCY = {"final": "pruned", "dense_student": "dense"}  # old ``latency_ms`` keys


@dataclass(frozen=True)
class Setting:
    """Which latency measurement counts: batch size and mode (``eager``, ``compiled``)."""
    batch: int = 1
    mode: str = "eager"

    def __str__(self) -> str:
        return f"batch {self.batch}, {self.mode}"


def cost_columns(which: str) -> tuple:
    return {"none": (), "macs": ("macs",), "latency": ("speedup",), "all": ("macs", "speedup")}[which]


def macs(rec: dict, key: str) -> Optional[float]:
    """``flops.<key>``: ``dense``, ``sparse`` or ``executed`` (MACs for one input); None when not recorded."""
    f = rec.get("flops")
    return _num(f.get(key)) if isinstance(f, dict) else None


def macs_ratio(rec: dict) -> Optional[float]:
    """Executed MACs of the final model as a fraction of the dense student's."""
    ex, dense = macs(rec, "executed"), macs(rec, "dense")
    return ex / dense if ex is not None and dense else None


def latency_entries(rec: dict, which: str) -> list:
    """The latency measurements of ``final`` or ``dense_student``; an old record's ``latency_ms`` reads as
    one batch-1 eager measurement."""
    lat = rec.get("latency")
    if isinstance(lat, dict):
        entries = lat.get(which)
        return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    old = rec.get("latency_ms")
    if isinstance(old, dict) and _num(old.get(LEGACY_LATENCY[which])) is not None:
        return [{"batch": 1, "mode": "eager", "median_ms": old[LEGACY_LATENCY[which]]}]
    return []


def latency_of(rec: dict, which: str, setting: Setting) -> Optional[float]:
    """Median milliseconds of ``which`` for the setting; None when it was not measured."""
    for e in latency_entries(rec, which):
        if _num(e.get("batch")) == setting.batch and e.get("mode") == setting.mode:
            ms = _num(e.get("median_ms"))
            if ms is not None and ms > 0:
                return ms
    return None


def speedup(rec: dict, setting: Setting) -> Optional[float]:
    """Dense student median ms / final model median ms, both measured by the same run."""
    final, dense = latency_of(rec, "final", setting), latency_of(rec, "dense_student", setting)
    return dense / final if final is not None and dense is not None else None


def latency_where(recs: list) -> str:
    """Where the latencies of ``recs`` were measured: device and dtype, as recorded."""
    seen = []
    for r in recs:
        lat = r.get("latency")
        if isinstance(lat, dict):
            bits = [str(lat.get("device", "?")), str(lat.get("dtype", "?"))]
            if lat.get("channels_last"):
                bits.append("channels_last")
            where = " ".join(bits)
        elif isinstance(r.get("latency_ms"), dict):
            where = f"{r.get('device', '?')} (legacy latency_ms)"
        else:
            continue
        if where not in seen:
            seen.append(where)
    return "; ".join(seen)


def macs_differ(rec: dict) -> bool:
    """The run executes fewer (or other) MACs than the dense student: a physically smaller model."""
    ex, dense = macs(rec, "executed"), macs(rec, "dense")
    return ex is not None and dense is not None and ex != dense


def measured_settings(recs: list) -> list:
    """The latency settings some run measured (final model), in order of appearance."""
    seen = []
    for r in recs:
        for e in latency_entries(r, "final"):
            if _num(e.get("batch")) is not None and isinstance(e.get("mode"), str):
                st = Setting(int(e["batch"]), e["mode"])
                if st not in seen:
                    seen.append(st)
    return seen


def shown_cost_columns(t: "Table", cols: tuple, setting: Setting) -> tuple:
    """The asked-for cost columns a table has numbers for, and a line for each left out saying how to get it:
    MACs when some run executes other MACs than the dense student, speed-up when some run measured latency
    at the setting."""
    shown, notes = [], []
    for c in cols:
        if c == "macs":
            if any(macs_differ(r) for r in t.runs):
                shown.append(c)
            elif not any(macs(r, "executed") is not None for r in t.runs):
                notes.append("MACs column left out: no run recorded the MACs its final model executes "
                             "(`flops.executed`).")
            else:
                notes.append("MACs column left out: every run executes all of the dense student's MACs (weight "
                             "granularity zeroes weights but removes none); `prune.granularity=channel` removes "
                             "channels and executes fewer.")
        elif c == "speedup":
            if any(speedup(r, setting) is not None for r in t.runs):
                shown.append(c)
            else:
                other = measured_settings(t.runs)
                notes.append(f"Speed-up column left out: no run measured latency at {setting}; "
                             + (f"measured: {'; '.join(map(str, other))} (choose with --latency-batch and "
                                "--latency-mode)." if other else
                                "run with `eval.latency=true` (or time a saved model: `kdprune-eval RUN_DIR "
                                "--latency`)."))
    return tuple(shown), notes


def cost_stat(recs: list, col: str, setting: Setting) -> Optional[Stat]:
    vals = [macs_ratio(r) if col == "macs" else speedup(r, setting) for r in recs]
    return stat([v for v in vals if v is not None])


# --- formatting ---------------------------------------------------------------------------------------------
def digits(metric: str) -> int:
    return 2 if metric in ("top1", "top5") else 4


def fmt_stat(s: Optional[Stat], nd: int, pm: str = "±") -> str:
    if s is None:
        return "—"
    return f"{s.mean:.{nd}f} {pm} {s.std:.{nd}f} (n={s.n})"


def fmt_sp(s: float) -> str:
    return f"{s:g}"


def fmt_secs(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.1f}"


def fmt_samples(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:,.0f}"


def fmt_times(s: Optional[Stat], runs: int) -> str:
    """``0.48×``: the mean over seeds; ``(n=k)`` when fewer runs than the cell's have the number."""
    if s is None:
        return "—"
    return f"{s.mean:.2f}×" + (f" (n={s.n})" if s.n < runs else "")


COST_HEAD = {"macs": "MACs", "speedup": "speed-up"}


def cost_note(cols: tuple, setting: Setting) -> str:
    bits = []
    if "macs" in cols:
        bits.append("MACs = executed MACs of the final model for one input as it actually runs "
                    "(`flops.executed`) / the dense student's (`flops.dense`): below 1× only for a physically "
                    "smaller model, a masked (weight-granularity) model runs all of its MACs")
    if "speedup" in cols:
        bits.append(f"speed-up = dense student median ms / final model median ms, both measured by the same run "
                    f"({setting}; `latency`, or an old record's `latency_ms` as batch 1, eager)")
    return ("Cost of inference: " + "; ".join(bits) + ". Both are means over the runs that recorded them "
            "(n shown when fewer than the cell's runs); — where no run did.")


def metric_desc(metric: str) -> str:
    return {"top1": "top-1 accuracy (%)", "top5": "top-5 accuracy (%)", "nll": "NLL (nats)",
            "ece": "ECE (15 bins)", "mce": "MCE, largest bin gap (15 bins)",
            "rmsce": "RMS calibration error (15 bins)",
            "ece_ts": "ECE after temperature scaling (T fit on validation, 15 bins)",
            "nll_ts": "NLL after temperature scaling (T fit on validation, nats)",
            "temperature": "temperature T fit on validation"}.get(metric, metric)


def title(t: Table) -> str:
    return f"{t.dataset} · {t.teacher} → {t.student}"


def markdown(tables: list, metric: str, problems: list, superseded: list, layer_notes: list,
             counts: dict, costs: str = "none", setting: Setting = Setting()) -> str:
    nd = digits(metric)
    cols = cost_columns(costs)
    out = ["# kdprune report", ""]
    out.append(f"Metric: `metrics.final.{metric}`, {metric_desc(metric)} on the test split; cells are "
               "mean ± sample std (ddof=1) over seeds, n = number of runs (± 0.00 when n=1). Every number "
               "here is a test-split number; validation-split numbers (`metrics_val`, runs with "
               "`data.val_split > 0`, what a search selects on) are in the records and a search's `best.yaml`.")
    if metric in OPTIONAL_METRICS:
        out += ["", f"A run that did not record `{metric}` counts among the runs but not in n; a cell is — where "
                "no run did (`ece_ts`, `nll_ts` and `temperature` need a held-out validation split, "
                "`data.val_split>0`; records older than the calibration fields lack all of them)."]
    out.append("")
    out.append(f"Records: {counts['files']} `{RESULTS}` read, {counts['ok']} ok, {counts['failed']} failed, "
               f"{counts['missing']} job folders missing a record"
               + (f", {len(superseded)} superseded by a newer run of the same job" if superseded else "") + ".")
    asked = cols
    shown = {id(t): shown_cost_columns(t, asked, setting) for t in tables}
    anywhere = tuple(c for c in asked if any(c in sh for sh, _ in shown.values()))
    if anywhere:
        out += ["", cost_note(anywhere, setting)]
    for t in tables:
        sps = t.sparsities
        cols, notes = shown[id(t)]
        out += ["", f"## {title(t)}", ""]
        out.append(f"Dense references ({metric}): teacher {fmt_stat(t.dense('teacher', metric), nd)}, "
                   f"dense student {fmt_stat(t.dense('dense_student', metric), nd)}.")
        dense_line = dense_cost_line(t, asked, setting) if asked else None
        for line in ([dense_line] if dense_line else []) + notes:
            out += ["", line]
        out.append("")
        out.append("| method | " + " | ".join(f"sparsity {fmt_sp(s)}" + "".join(
            f" | {COST_HEAD[c]} {fmt_sp(s)}" for c in cols) for s in sps) + " | seconds / run | samples / run¹ |")
        out.append("|---|" + "---:|" * (len(sps) * (1 + len(cols)) + 2))
        for row in t.sorted_rows():
            secs, samples = cost(row.runs)
            cells = []
            for s in sps:
                recs = row.cells.get(s)
                cells.append(fmt_stat(cell_stat(recs, metric), nd) if recs else "—")
                cells += [fmt_times(cost_stat(recs, c, setting), len(recs)) if recs else "—" for c in cols]
            out.append(f"| {row.label} | " + " | ".join(cells)
                       + f" | {fmt_run_secs(row.runs, secs)} | {fmt_samples(samples)} |")
    if tables:
        out += ["", "¹ " + SAMPLES_NOTE]
    if problems:
        out += ["", "## Failed jobs", ""]
        out += [f"- `{p.path}`: {p.what}" + (f": {p.error}" if p.error else "") + _where(p.record)
                for p in problems]
    if layer_notes:
        out += ["", "## Per-layer plots not drawn", ""]
        out += [f"- `{p.path}`: {p.what}" + (f": {p.error}" if p.error else "") for p in layer_notes]
    if superseded:
        out += ["", "## Superseded records (same job, newer record used)", ""]
        out += [f"- `{old}` → `{new}`" for old, new in superseded]
    return "\n".join(out) + "\n"


def _fmt_macs(x: Optional[float]) -> str:
    return "—" if x is None else f"{x / 1e6:,.2f} M" if x >= 1e6 else f"{x:,.0f}"


def dense_cost_line(t: Table, cols: tuple, setting: Setting) -> Optional[str]:
    """The dense student's cost: MACs and, for the latency setting, median ms (means over the runs that
    recorded them); None when the runs recorded neither."""
    bits = []
    if "macs" in cols:
        dense = _mean([v for v in (macs(r, "dense") for r in t.runs) if v])
        if dense is not None:
            bits.append(f"{_fmt_macs(dense)} MACs per input")
    if "speedup" in cols:
        ms = [v for v in (latency_of(r, "dense_student", setting) for r in t.runs) if v is not None]
        where = latency_where(t.runs)
        if ms:
            bits.append(f"{_mean(ms):.3f} ms median ({setting}, n={len(ms)}" + (f"; {where}" if where else "") + ")")
    return "Dense student cost: " + ", ".join(bits) + "." if bits else None


def _where(rec: Optional[dict]) -> str:
    if not rec:
        return ""
    bits = [f"{k}={rec.get(k)}" for k in ("method", "method_variant", "sparsity_target", "seed", "dataset")
            if rec.get(k) is not None]
    return f" ({', '.join(bits)})" if bits else ""


TEX_ESC = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
           "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(s: str) -> str:
    return "".join(TEX_ESC.get(c, c) for c in str(s))


def tex_label(row: Row) -> str:
    m = tex_escape(row.method)
    m = m if row.kd is None else f"{m} {'+' if row.kd else '$-$'}KD"
    m = m if row.variant is None else f"{m} [{tex_escape(row.variant)}]"
    return m if row.granularity == WEIGHT else f"{m} ({tex_escape(row.granularity)})"


def latex(tables: list, metric: str, costs: str = "none", setting: Setting = Setting()) -> str:
    nd = digits(metric)
    cols = cost_columns(costs)
    pm = r"$\pm$"
    out = ["% kdprune-report: one booktabs tabular per (dataset, teacher, student); needs \\usepackage{booktabs}",
           ""]
    asked = cols
    for t in tables:
        sps = t.sparsities
        cols, _ = shown_cost_columns(t, asked, setting)
        ncol = len(sps) * (1 + len(cols))
        cap = (f"{tex_escape(t.dataset)}, {tex_escape(t.teacher)} $\\to$ {tex_escape(t.student)}: final "
               f"{tex_escape(metric_desc(metric))} on the test split, mean {pm} sample std over seeds (n runs). Samples per run "
               "include the recorded cost of cached stages (teacher, dense student, ...); seconds are the "
               "run's own wall-clock.")
        if "macs" in cols:
            cap += " MACs: executed MACs of the final model as a fraction of the dense student's."
        if "speedup" in cols:
            cap += (f" Speed-up: dense student / final model median latency ({tex_escape(str(setting))}), "
                    "measured by the same run.")
        cap += " Cost columns are means over seeds." if cols else ""
        head = {"macs": "MACs", "speedup": "Speed-up"}
        out += [r"\begin{table}[t]", r"\centering", f"\\caption{{{cap}}}",
                r"\begin{tabular}{l" + ("c" + "r" * len(cols)) * len(sps) + "rr}", r"\toprule",
                "Method & " + " & ".join(f"$s={fmt_sp(s)}$" + "".join(f" & {head[c]}" for c in cols) for s in sps)
                + r" & Seconds & Samples \\",
                r"\midrule"]
        for name, key in (("Teacher (dense)", "teacher"), ("Student (dense)", "dense_student")):
            out.append(f"{name} & \\multicolumn{{{ncol}}}{{c}}{{{fmt_stat(t.dense(key, metric), nd, pm).replace('—', '--')}}}"
                       r" & & \\")
        out.append(r"\midrule")
        for row in t.sorted_rows():
            secs, samples = cost(row.runs)
            cells = []
            for s in sps:
                recs = row.cells.get(s)
                cells.append(fmt_stat(cell_stat(recs, metric), nd, pm).replace("—", "--") if recs else "--")
                cells += [fmt_times(cost_stat(recs, c, setting), len(recs)).replace("×", r"$\times$")
                          .replace("—", "--") if recs else "--" for c in cols]
            sam = "--" if samples is None else f"{samples:,.0f}".replace(",", "{,}")
            out.append(f"{tex_label(row)} & " + " & ".join(cells)
                       + f" & {fmt_run_secs(row.runs, secs).replace('—', '--')} & {sam} \\\\")
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out) + "\n"


CSV_COLUMNS = ["dataset", "teacher", "student", "method", "retrain_kd", "sparsity", "mean", "std", "n",
               "seconds_mean", "samples_mean"]


CSV_COST_COLUMNS = {
    "macs": ["macs_executed_mean", "macs_ratio_mean", "macs_ratio_n"],
    "speedup": ["latency_batch", "latency_mode", "latency_ms_mean", "speedup_mean", "speedup_std", "speedup_n"],
}


def _r(x) -> str:
    return "" if x is None else repr(x)


def csv_cost_cells(recs: list, col: str, setting: Setting) -> list:
    st = cost_stat(recs, col, setting)
    if col == "macs":
        ex = _mean([v for v in (macs(r, "executed") for r in recs) if v is not None])
        return [_r(ex), _r(st and st.mean), st.n if st else 0]
    ms = _mean([v for v in (latency_of(r, "final", setting) for r in recs) if v is not None])
    return [setting.batch, setting.mode, _r(ms), _r(st and st.mean), _r(st and st.std), st.n if st else 0]


def write_csv(tables: list, metric: str, path: Path, costs: str = "none", setting: Setting = Setting()) -> None:
    """One row per (table, row, sparsity). A ``granularity`` column is appended when some row is not
    weight-granularity or ``--cost`` is given, a ``variant`` column (empty for the method as it is) when some
    row is a variant, then the cost columns (records without the new fields and no ``--cost``: the CSV is as
    before them)."""
    cols = cost_columns(costs)
    gran = bool(cols) or any(row.granularity != WEIGHT for t in tables for row in t.rows.values())
    var = any(row.variant is not None for t in tables for row in t.rows.values())
    reused = any(is_reused(r) for t in tables for r in t.runs)  # seconds_mean leaves them out
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS + (["granularity"] if gran else []) + (["variant"] if var else [])
                   + [c for k in cols for c in CSV_COST_COLUMNS[k]] + (["runs_reused"] if reused else []))
        for t in tables:
            for row in t.sorted_rows():
                for s in sorted(row.cells):
                    st = cell_stat(row.cells[s], metric)
                    secs, samples = cost(row.cells[s])
                    kd = "" if row.kd is None else str(row.kd).lower()
                    w.writerow([t.dataset, t.teacher, t.student, row.method, kd, repr(s), _r(st and st.mean),
                                _r(st and st.std), st.n if st else 0, "" if secs is None else repr(secs),
                                "" if samples is None else repr(samples)] + ([row.granularity] if gran else [])
                               + ([row.variant or ""] if var else [])
                               + [c for k in cols for c in csv_cost_cells(row.cells[s], k, setting)]
                               + ([n_reused(row.cells[s])] if reused else []))


# --- plots --------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(s)).strip("_") or "x"


def plot_table(t: Table, metric: str, out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for row in t.sorted_rows():
        xs = sorted(row.cells)
        sts = [cell_stat(row.cells[s], metric) for s in xs]
        xs, sts = [s for s, st in zip(xs, sts) if st is not None], [st for st in sts if st is not None]
        if not xs:
            continue
        means, stds = [s.mean for s in sts], [s.std for s in sts]  # as the tables: mean ± sample std
        bars = ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=row.label)
        if len(xs) > 1 and any(s.n > 1 for s in sts):
            ax.fill_between(xs, [m - d for m, d in zip(means, stds)], [m + d for m, d in zip(means, stds)],
                            color=bars.lines[0].get_color(), alpha=0.15, linewidth=0)
    for key, name, style in (("teacher", "teacher (dense)", ":"), ("dense_student", "student (dense)", "--")):
        d = t.dense(key, metric)
        if d is not None:
            ax.axhline(d.mean, color="gray", linestyle=style, linewidth=1, label=name)
    ax.set_xlabel("target sparsity")
    return _finish(fig, ax, t, metric, "mean ± sample std over seeds, as in the tables", out / f"accuracy_vs_sparsity_{_stem(t)}.png")


def _stem(t: Table) -> str:
    return f"{safe(t.dataset)}_{safe(t.teacher)}_{safe(t.student)}"


def _finish(fig, ax, t: Table, metric: str, how: str, path: Path) -> Path:
    """The common end of a table's plot: metric axis, title, grid, legend, written to ``path``."""
    ax.set_ylabel(f"final {metric_desc(metric)}, test split")
    ax.set_title(f"{t.dataset}: {t.teacher} → {t.student} ({how})", fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # none where no run recorded the metric
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def cost_axis(t: Table, setting: Setting):
    """What the cost plot puts on x: ``(kind, final x of a record, dense student x of a record, label)``
    with kind ``latency`` (median ms of the setting) when some run measured it, else ``macs`` (executed
    MACs, millions) when some run executes other MACs than the dense student, else None (no plot)."""
    if any(latency_of(r, "final", setting) is not None for r in t.runs):
        where = latency_where(t.runs)
        return ("latency", lambda r: latency_of(r, "final", setting),
                lambda r: latency_of(r, "dense_student", setting),
                f"latency, median ms ({setting}" + (f"; {where}" if where else "") + ")")
    if any(macs_differ(r) for r in t.runs):  # all at the dense MACs: one vertical line, no plot
        mm = lambda key: lambda r: None if macs(r, key) is None else macs(r, key) / 1e6  # noqa: E731
        why = "no latency measured" if not any(latency_entries(r, "final") for r in t.runs) \
            else f"no latency measured at {setting}"
        return "macs", mm("executed"), mm("dense"), f"executed MACs per input, millions ({why})"
    return None


def _xy(recs: list, fx, metric: str, key: str):
    """Mean and std of x and of the metric over the records that have both; None if none has."""
    pairs = [(x, y) for x, y in ((fx(r), metric_of(r, key, metric)) for r in recs) if x is not None and y is not None]
    if not pairs:
        return None
    return stat([x for x, _ in pairs]), stat([y for _, y in pairs])


def plot_cost(t: Table, metric: str, out: Path, setting: Setting = Setting()) -> Optional[Path]:
    """Accuracy vs latency (or executed MACs where no latency was measured): one series per row, a point per
    sparsity (mean ± std over seeds in x and y), the dense student as a reference point, the teacher as a
    line. None (nothing written) when no run of the table recorded either."""
    axis = cost_axis(t, setting)
    if axis is None:
        return None
    kind, fx, fdense, xlabel = axis
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for row in t.sorted_rows():
        pts = [(s, _xy(row.cells[s], fx, metric, "final")) for s in sorted(row.cells)]
        pts = [(s, xy) for s, xy in pts if xy is not None]
        if not pts:
            continue
        xs, ys = [xy[0] for _, xy in pts], [xy[1] for _, xy in pts]
        bars = ax.errorbar([x.mean for x in xs], [y.mean for y in ys], xerr=[x.std for x in xs],
                           yerr=[y.std for y in ys], marker="o", capsize=3, label=row.label)
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
    return _finish(fig, ax, t, metric, "mean ± sample std over seeds; labels: sparsity",
                   out / f"accuracy_vs_latency_{_stem(t)}.png")


def plot_layers(rec: dict, name: str, out: Path) -> Path:
    plt = _plt()
    layers = rec["sparsity_per_layer"]
    names, vals = list(layers), [float(v) for v in layers.values()]
    fig, ax = plt.subplots(figsize=(7.0, max(2.5, 0.28 * len(names) + 1.2)))
    y = list(range(len(names)))
    ax.barh(y, vals, color="tab:blue")
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("sparsity (fraction of zero weights)")
    sub = []
    tgt = _num(rec.get("sparsity_target"))
    if tgt is not None:
        ax.axvline(tgt, color="red", linestyle="--", linewidth=1)
        sub.append(f"target {tgt:g} (red dashed)")
    act = _num(rec.get("sparsity_actual"))
    if act is not None:
        sub.append(f"global {act:.4f}")
    ax.set_title(f"{label(str(rec.get('method')), None, WEIGHT, variant(rec))} · {rec.get('dataset')} · {rec.get('student')} · seed {rec.get('seed')}"
                 + (f"\n{', '.join(sub)}" if sub else ""), fontsize=10)
    fig.tight_layout()
    path = out / f"layers_{safe(name)}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- reliability diagrams (``--reliability``) --------------------------------------------------------------
RELIABILITY_MODELS = (("dense_student", "dense student"), ("final", "final model"))


def _bins(m) -> Optional[dict]:
    """``metrics.<model>.reliability`` checked: equal-length ``count``, ``confidence``, ``accuracy``; None when
    absent or malformed."""
    r = m.get("reliability") if isinstance(m, dict) else None
    if not isinstance(r, dict):
        return None
    count, conf, acc = r.get("count"), r.get("confidence"), r.get("accuracy")
    if not (isinstance(count, list) and isinstance(conf, list) and isinstance(acc, list)
            and 0 < len(count) == len(conf) == len(acc)):
        return None
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in count):
        return None
    if any(n and (_num(x) is None or _num(a) is None) for n, x, a in zip(count, conf, acc)):
        return None
    return {"count": count, "confidence": conf, "accuracy": acc}


def reliability_data(rec: dict) -> dict:
    """For the dense student and the final model of a record: the per-bin sample counts, mean confidence and
    accuracy (``metrics.<model>.reliability``, test split) with the recorded ``ece`` (and ``ece_ts``,
    ``temperature`` where the run fit one); a model without bins maps to None. :class:`InputError` when the
    final model has none."""
    metrics = rec.get("metrics") if isinstance(rec.get("metrics"), dict) else {}
    out = {}
    for key, _ in RELIABILITY_MODELS:
        m = metrics.get(key)
        bins = _bins(m)
        if bins is not None:
            bins.update({k: _num(m.get(k)) for k in ("ece", "ece_ts", "temperature")})
        out[key] = bins
    if out["final"] is None:
        raise InputError(f"no reliability bins (metrics.final.reliability) in the record (status "
                         f"{rec.get('status')}); kdprune records them for every run it evaluates")
    return out


def plot_reliability(data: dict, heading: str, path: Path) -> Path:
    """Two panels, dense student and final model: per confidence bin the accuracy (bar), the gap to the bin's
    mean confidence (hatched), the diagonal of perfect calibration; the ECE in each panel's title."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.6), sharey=True)
    for ax, (key, name) in zip(axes, RELIABILITY_MODELS):
        ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-label probability)")
        ax.grid(True, alpha=0.3)
        d = data.get(key)
        if d is None:
            ax.set_title(f"{name}: no reliability bins recorded", fontsize=10)
            continue
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
    axes[0].set_ylabel("accuracy")
    fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _reliability_inputs(paths: list) -> list:
    """``(results.json, record, data)`` per RUN_DIR, all checked before anything is written."""
    items = []
    for p in paths:
        rfile = p if p.is_file() else p / RESULTS
        if not rfile.is_file():
            raise InputError(f"--reliability {p}: no {RESULTS}")
        rec, err = load(rfile)
        if rec is None:
            raise InputError(f"--reliability {rfile}: {err}")
        try:
            items.append((rfile, rec, reliability_data(rec)))
        except InputError as e:
            raise InputError(f"--reliability {rfile}: {e}") from None
    return items


def write_reliability(items: list, out: Optional[Path]) -> list:
    """``reliability_<job>.png`` per run, into ``out`` (default: the run's own folder)."""
    written = []
    for rfile, rec, data in items:
        where = out if out is not None else rfile.parent
        where.mkdir(parents=True, exist_ok=True)
        name = rec.get("job_id") or (rfile.parent.name if rfile.parent.name else "run")
        heading = (f"{label(str(rec.get('method')), _kd(rec.get('retrain_kd')), granularity(rec), variant(rec))} · "
                   f"{rec.get('dataset')} · {rec.get('student')} · sparsity {rec.get('sparsity_target')} · "
                   f"seed {rec.get('seed')} (test split)")
        written.append(plot_reliability(data, heading, where / f"reliability_{safe(str(name))}.png"))
    return written


# --- main ---------------------------------------------------------------------------------------------------
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
    p.add_argument("--cost", default="none", choices=COSTS,
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


def _layers(paths: list, out: Path, written: list) -> list:
    notes = []
    for p in paths:
        rfile = p if p.is_file() else p / RESULTS
        if not rfile.is_file():
            notes.append(Problem(str(p), f"missing (no {RESULTS})"))
            continue
        rec, err = load(rfile)
        if rec is None:
            notes.append(Problem(str(rfile), "unreadable", err))
            continue
        per = rec.get("sparsity_per_layer")
        if not isinstance(per, dict) or not per or any(_num(v) is None for v in per.values()):
            notes.append(Problem(str(rfile), "no sparsity_per_layer", f"status {rec.get('status')}"))
            continue
        name = rec.get("job_id") or (rfile.parent.name if rfile.parent.name else "run")
        written.append(plot_layers(rec, str(name), out))
    return notes


def _os_error(e: OSError) -> str:
    what = e.strerror or str(e) or type(e).__name__
    return f"{what}: {e.filename}" if e.filename else what


def run(args) -> int:
    for p in [*args.paths, *args.layers, *args.reliability]:
        if not p.exists():
            raise InputError(f"path does not exist: {p}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file, not a folder")
    diagrams = _reliability_inputs(args.reliability)
    if not args.paths:
        try:
            written = write_reliability(diagrams, args.out)
        except OSError as e:
            raise InputError(f"cannot write the reliability diagrams: {_os_error(e)}") from None
        print("written:")
        for w in written:
            print(f"  {w}")
        return 0
    out = args.out or (args.paths[0] if args.paths[0].is_dir() else args.paths[0].parent)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    found = find_results(args.paths)
    if not found.results:
        extra = f" ({len(found.missing)} job folders without one)" if found.missing else ""
        raise InputError(f"no {RESULTS} found under {', '.join(map(str, args.paths))}{extra}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the --out folder {out}: {_os_error(e)}") from None

    problems, loaded = [], []
    for path in found.results:
        rec, err = load(path)
        if rec is None:
            problems.append(Problem(str(path), "failed", err))
        else:
            loaded.append((path, rec))
    loaded, superseded = dedupe(loaded)
    ok = []
    for path, rec in loaded:
        status = rec.get("status")
        if status != "ok":
            problems.append(Problem(str(path), str(status), str(rec.get("error") or ""), rec))
        elif ((metric_of(rec, "final", args.metric) is None and args.metric not in OPTIONAL_METRICS)
              or _num(rec.get("sparsity_target")) is None):
            problems.append(Problem(str(path), "incomplete",
                                    f"no metrics.final.{args.metric} or sparsity_target", rec))
        else:
            ok.append(rec)
    n_failed = len(problems)
    problems += [Problem(str(d), f"missing (no {RESULTS})") for d in found.missing]

    tables = group(ok, args.metric)
    setting = Setting(args.latency_batch, args.latency_mode)
    written: list = []
    counts = {"files": len(found.results), "ok": len(ok), "failed": n_failed, "missing": len(found.missing)}
    try:
        layer_notes = _layers(args.layers, out, written)
        written += write_reliability(diagrams, out)
        for t in tables:
            written.append(plot_table(t, args.metric, out))
            cost_png = plot_cost(t, args.metric, out, setting)
            if cost_png is not None:
                written.append(cost_png)
        md = markdown(tables, args.metric, problems, superseded, layer_notes, counts, args.cost, setting)
        (out / "report.md").write_text(md, encoding="utf-8")
        write_csv(tables, args.metric, out / "report.csv", args.cost, setting)
        (out / "report.tex").write_text(latex(tables, args.metric, args.cost, setting), encoding="utf-8")
    except OSError as e:  # read-only, full, or not ours
        raise InputError(f"cannot write the report into {out}: {_os_error(e)}") from None
    written = [out / "report.md", out / "report.csv", out / "report.tex", *written]

    print(md, end="")
    print("\nwritten:")
    for w in written:
        print(f"  {w}")
    if problems or layer_notes:
        print(f"kdprune-report: {n_failed} failed, {len(found.missing)} missing"
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
