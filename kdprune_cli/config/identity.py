"""What of a resolved config makes a job's identity: everything but the keys that change no result."""
from __future__ import annotations

# What changes no result of a job, so it is not part of the job's identity: where and how it is logged, stored and
# shown, whether it is resumed, how fast it runs, and where its inputs lie (their content is identified instead).
IGNORED_KEYS = ("logger", "progress", "store", "experiment", "resume", "fail_fast", "paths", "print_config",
                "detect_anomaly", "compile", "threads", "optimized_metric")
IGNORED_SUBKEYS = {"eval": ("latency_batch", "latency_iters", "latency_compile"),
                   "data": ("root", "cache_dir", "download", "verify_checksums"),
                   "teacher": ("checkpoint",), "student": ("checkpoint",)}


def identity_config(c: dict) -> dict:
    """A resolved config (a plain dict) without the keys that change no result (:data:`IGNORED_KEYS`)."""
    c = {k: v for k, v in c.items() if k not in IGNORED_KEYS}
    for k, sub in IGNORED_SUBKEYS.items():
        if isinstance(c.get(k), dict):
            c[k] = {kk: v for kk, v in c[k].items() if kk not in sub}
    return c
