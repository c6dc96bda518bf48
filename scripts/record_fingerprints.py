"""Run every method at both granularities on ``debug=default`` and write what its record says, minus what a
rerun may change (timings, memory, paths, versions, the job id), to one JSON file; or compare two such files.

A refactoring that should not change behaviour is checked with it: run once before and once after, then
``--compare before.json after.json`` prints each job whose record differs and exits 1 if any does.

    python scripts/record_fingerprints.py --out before.json [--jobs 2]
    python scripts/record_fingerprints.py --compare before.json after.json
    python scripts/record_fingerprints.py --out some.json --methods imp colt   (then --compare ... --methods x: only
                                                                              the jobs both files hold)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Record keys and cost fields that a rerun of the same job may change.
VOLATILE = {"job_id", "versions", "config", "checkpoint", "model_file", "seconds", "total_seconds", "peak_rss_bytes",
            "memory_kind", "peak_cuda_bytes", "threads", "device", "reused_from", "latency", "path", "paths",
            "started", "finished", "run_dir", "error"}


def strip(x):
    if isinstance(x, dict):
        return {k: strip(v) for k, v in sorted(x.items()) if k not in VOLATILE}
    if isinstance(x, list):
        return [strip(v) for v in x]
    return x


def run_one(method: str, granularity: str, out: Path) -> tuple[str, dict]:
    key = f"{method}/{granularity}"
    out = out / f"{method}-{granularity}"  # its own store: no job reads another's cached artifacts
    run_dir = out / "run"
    cmd = [str(ROOT / ".venv" / "bin" / "kdprune"), "debug=default", f"method={method}",
           f"prune.granularity={granularity}", "threads=1", "progress=false", f"paths.output_dir={out}",
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    out.mkdir(parents=True)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out)
    rec = run_dir / "results.json"
    if not rec.exists():
        lines = (p.stderr or p.stdout).strip().splitlines()
        return key, {"exit": p.returncode, "refused": lines[-1] if lines else ""}
    return key, {"exit": p.returncode, "record": strip(json.loads(rec.read_text()))}


def collect(out_file: Path, jobs: int, only: list | None = None) -> None:
    methods = only or sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
    pairs = [(m, g) for m in methods for g in ("weight", "channel")]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(jobs) as pool:
        res = dict(pool.map(lambda mg: run_one(*mg, Path(tmp)), pairs))
    out_file.write_text(json.dumps(dict(sorted(res.items())), indent=1, sort_keys=True))
    for k, v in sorted(res.items()):
        print(f"{k:28s} exit {v['exit']}", v.get("refused", ""))


def compare(a: Path, b: Path, only_common: bool = False) -> int:
    x, y = json.loads(a.read_text()), json.loads(b.read_text())
    bad = 0
    keys = sorted(set(x) & set(y)) if only_common else sorted(set(x) | set(y))
    for k in keys:
        if x.get(k) != y.get(k):
            bad += 1
            print(f"DIFFERS {k}")
            xa, ya = x.get(k) or {}, y.get(k) or {}
            for f in sorted(set(xa.get("record", {})) | set(ya.get("record", {}))):
                if xa.get("record", {}).get(f) != ya.get("record", {}).get(f):
                    print(f"   {f}: {json.dumps(xa.get('record', {}).get(f))[:300]}\n   {'':{len(f)}}  "
                          f"{json.dumps(ya.get('record', {}).get(f))[:300]}")
            if xa.get("refused") != ya.get("refused"):
                print(f"   refused: {xa.get('refused')!r} vs {ya.get('refused')!r}")
        else:
            print(f"same    {k}")
    print(f"{len(keys) - bad} identical, {bad} differ")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--methods", nargs="+", help="only these methods (default: every conf/method/*.yaml)")
    ap.add_argument("--compare", nargs=2, type=Path)
    a = ap.parse_args()
    if a.compare:
        return compare(*a.compare, only_common=bool(a.methods))
    if not a.out:
        ap.error("give --out FILE or --compare A B")
    collect(a.out.resolve(), a.jobs, a.methods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
