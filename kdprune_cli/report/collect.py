"""Finding ``results.json`` records, reading them (type-checked), and keeping one record per job."""
from __future__ import annotations

import hashlib
import json
import os
from collections import namedtuple
from pathlib import Path
from typing import Iterable, Optional

from kdprune_cli.config.identity import identity_config

RESULTS = "results.json"


class InputError(Exception):
    """Bad input: reported as one line on stderr with exit status 2."""


# A record or job folder the report lists: its path, what is wrong ("failed", "missing (no results.json)", ...),
# the error line, the record where one was read.
Problem = namedtuple("Problem", "path what error record", defaults=("", None))
# The Paths of the results.json found, and the job folders without one.
Found = namedtuple("Found", "results missing")


def find_results(paths: Iterable[Path]) -> Found:
    """All ``results.json`` under ``paths`` and the job folders that lack one (deduplicated, sorted)."""
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
    missing = [d for key, (d, has_hydra) in candidates.items()
               if key not in ancestors  # results.json further down: a container, not a job
               and (has_hydra or (key.name.isdigit()
                                  and ((key.parent / "multirun.yaml").is_file() or key.parent in job_parents)))]
    return Found([results[k] for k in sorted(results, key=str)], sorted(missing, key=str))


def load(path: Path):
    """``(record, None)`` or ``(None, error line)``."""
    try:
        rec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"unreadable {RESULTS} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    wrong = wrong_field(rec) if isinstance(rec, dict) else "not a JSON object"
    return (rec, None) if wrong is None else (None, f"unreadable {RESULTS} ({wrong})")


def run_record(p: Path):
    """The record of a RUN_DIR (or its ``results.json``): ``(results.json, record, None)``, or
    ``(path, None, Problem)`` when it has none or it cannot be read."""
    rfile = p if p.is_file() else p / RESULTS
    if not rfile.is_file():
        return p, None, Problem(str(p), f"missing (no {RESULTS})")
    rec, err = load(rfile)
    return rfile, rec, None if rec is not None else Problem(str(rfile), "unreadable", err)


_NUMBER = (int, float)
_TEXT = (str, type(None))
# The fields the report reads, and the JSON types each may have (null where a record may leave it empty).
FIELD_TYPES = {"status": (str,), "error": _TEXT, "job_id": _TEXT, "dataset": _TEXT, "teacher": _TEXT,
               "student": _TEXT, "method": _TEXT, "method_variant": _TEXT, "granularity": _TEXT,
               "seed": (int, type(None)), "sparsity_target": (*_NUMBER, type(None)),
               "sparsity_actual": (*_NUMBER, type(None)), "retrain_kd": (bool, type(None)),
               "metrics": (dict,), "metrics_val": (dict,), "params": (dict,), "flops": (dict,), "cost": (dict,),
               "config": (dict, type(None)), "sparsity_per_layer": (dict,), "latency": (dict, type(None))}


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _wrong_inside(rec: dict) -> Optional[str]:
    """Which field inside ``metrics``, ``metrics_val`` or ``cost`` has a type no kdprune record has."""
    for key in ("metrics", "metrics_val"):
        for role, m in (rec.get(key) or {}).items():
            if not isinstance(m, dict):
                return f"{key}.{role} is {_kind(m)}"
            for metric, v in m.items():  # a number or null; the per-bin calibration data: an object of lists
                if not (isinstance(v, dict) if metric == "reliability" else
                        v is None or isinstance(v, _NUMBER) and not isinstance(v, bool)):
                    return f"{key}.{role}.{metric} is {_kind(v)}"
    cost = rec.get("cost") or {}
    stages = cost.get("stages", {})
    if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
        return "cost.stages is not an object of stages"
    if cost.get("total_seconds") is not None and not isinstance(cost["total_seconds"], _NUMBER):
        return f"cost.total_seconds is {_kind(cost['total_seconds'])}"
    return None


def wrong_field(rec: dict) -> Optional[str]:
    """Which field of a record has a type no kdprune record has (``metrics`` a list, ``sparsity_target`` a
    string, ...), said in a few words; None when every field the report reads has its type."""
    for k, types in FIELD_TYPES.items():
        v = rec.get(k)
        if k in rec and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
            return f"{k} is {_kind(v)}"
    return _wrong_inside(rec)


# --- one record per job -------------------------------------------------------------------------------------
def config_key(rec: dict) -> Optional[str]:
    """A hash of the record's ``config`` without the keys that change no result (as the job id leaves them
    out, :func:`identity_config`); None without one."""
    c = rec.get("config")
    if not isinstance(c, dict) or not c:
        return None
    return hashlib.sha256(json.dumps(identity_config(c), sort_keys=True, default=str).encode()).hexdigest()


def _overrides_key(path: Path) -> Optional[str]:
    """The Hydra overrides of the job that wrote ``path`` (``.hydra/overrides.yaml`` beside it), if any."""
    try:
        text = (path.parent / ".hydra" / "overrides.yaml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text.strip() or None


def job_identity(path: Path, rec: dict, jobs_by_config: dict) -> Optional[str]:
    """What makes two records runs of the same job: the ``job_id``; for a record without one (it failed
    before the id was computed), the job with the same config, else the config itself, else the sweep
    job's Hydra overrides. None: the record stands alone."""
    jid = rec.get("job_id")
    if isinstance(jid, str) and jid:
        return f"job:{jid}"
    ck = config_key(rec)
    if ck is not None:
        jids = jobs_by_config.get(ck, set())
        return f"job:{next(iter(jids))}" if len(jids) == 1 else f"config:{ck}"
    ov = _overrides_key(path)
    return f"overrides:{ov}" if ov is not None else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def dedupe(loaded: list) -> tuple:
    """Keep the newest record per job (see :func:`job_identity`); return (kept, superseded)."""
    jobs_by_config: dict = {}  # only records without a job id are matched by their config
    has_id = [isinstance(rec.get("job_id"), str) and rec["job_id"] != "" for _, rec in loaded]
    for (_, rec), jid in zip(loaded, has_id):
        ck = config_key(rec) if jid and not all(has_id) else None
        if ck is not None:
            jobs_by_config.setdefault(ck, set()).add(rec["job_id"])
    ids = [job_identity(path, rec, jobs_by_config) for path, rec in loaded]
    newest: dict = {}  # job -> its newest record: by modification time; of equally new ones, the last found
    for i in sorted(range(len(loaded)), key=lambda i: (_mtime(loaded[i][0]), i)):
        if ids[i] is not None:
            newest[ids[i]] = i
    kept = [loaded[i] for i, ident in enumerate(ids) if ident is None or newest[ident] == i]
    return kept, [(loaded[i][0], loaded[newest[ident]][0]) for i, ident in enumerate(ids)
                  if ident is not None and newest[ident] != i]


# What the PATHs hold: the ok records, the problems (failed, unreadable, incomplete, missing), the superseded
# reruns and the counts the report states.
Collected = namedtuple("Collected", "ok problems superseded counts")


def collect(found: Found, incomplete) -> Collected:
    """Read every record found, keep the newest per job, sort them into ok and problems; ``incomplete(rec)``
    says what a record with status ok lacks (None: nothing)."""
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
        status, lacks = rec.get("status"), incomplete(rec)
        if status != "ok":
            problems.append(Problem(str(path), str(status), str(rec.get("error") or ""), rec))
        elif lacks is not None:
            problems.append(Problem(str(path), "incomplete", lacks, rec))
        else:
            ok.append(rec)
    counts = {"files": len(found.results), "ok": len(ok), "failed": len(problems), "missing": len(found.missing)}
    problems += [Problem(str(d), f"missing (no {RESULTS})") for d in found.missing]
    return Collected(ok, problems, superseded, counts)
