"""Synthetic results.json records and sweep folders for the report tests (no training), table helpers, and the
samples a sweep's records booked beside what `kdprune-estimate` counted for it."""
from __future__ import annotations

import json
import math
from pathlib import Path

from kdprune_cli.cli.main import config_dir
from kdprune_cli.experiment.estimate import count_sweep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEEDS = (0, 1, 2)
SPARSITIES = (0.5, 0.9)


# (method, retrain_kd) -> sparsity -> final top-1 per seed
ACC = {
    ("magnitude", None): {0.5: [91.10, 91.70, 90.90], 0.9: [85.20, 84.10, 86.30]},
    ("cakld", True): {0.5: [92.40, 92.90, 92.00], 0.9: [88.80, 89.60, 88.10]},
    ("cakld", False): {0.5: [91.60, 91.20, 92.30], 0.9: [86.70, 85.90, 87.00]},
}


def _seconds(method, kd, sparsity, seed):
    return 10.0 + 3.0 * seed + (20.0 if sparsity == 0.9 else 0.0) + (7.0 if kd else 0.0)


def _record(method, kd, sparsity, seed, job):
    acc = ACC[(method, kd)][sparsity][SEEDS.index(seed)]
    return {
        "status": "ok", "error": None, "job_id": f"job{job:03d}",
        "dataset": "cifar10", "teacher": "resnet56", "student": "resnet20", "method": method, "seed": seed,
        "sparsity_target": sparsity, "sparsity_actual": sparsity, "retrain_kd": kd, "granularity": "weight",
        "sparsity_per_layer": {"conv1.weight": 0.2, "layer1.0.conv1.weight": sparsity,
                               "layer2.0.conv1.weight": min(1.0, sparsity + 0.05), "fc.weight": 0.1},
        "metrics": {"teacher": _metrics(TEACHER_TOP1), "dense_student": _metrics(DENSE_TOP1[seed]),
                    "pruned": _metrics(10.0), "final": _metrics(acc)},
        "params": {"prunable": 1000, "nonzero": int(1000 * (1 - sparsity)), "total": 1100},
        "flops": {"dense": 100, "sparse": int(100 * (1 - sparsity)), "executed": 100},
        "cost": {"stages": _stages(method, kd, sparsity, seed), "total_seconds": _seconds(method, kd, sparsity, seed)},
        "versions": {}, "device": "cpu", "config": {},
    }


def _job(sweep: Path, num: int, record=None, hydra=True) -> Path:
    d = sweep / str(num)
    d.mkdir(parents=True)
    if hydra:
        (d / ".hydra").mkdir()
        (d / ".hydra" / "config.yaml").write_text("seed: 0\n")
    if record is not None:
        (d / "results.json").write_text(json.dumps(record))
    return d


def write_grid(sweep, make_record) -> int:
    """A multirun folder with one ok job per (method, sparsity, seed) of the grid; returns the job count."""
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    num = 0
    for (method, kd) in ACC:
        for sp in SPARSITIES:
            for seed in SEEDS:
                _job(sweep, num, make_record(method, kd, sp, seed, num))
                num += 1
    return num


def _stats(values):
    """Mean and sample std (ddof=1), computed by hand."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std, n


def _label(method, kd, minus="\u2212"):
    return method if kd is None else f"{method} {'+' if kd else minus}KD"


def _check_png(path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 300, img.shape
    assert float(img.std()) > 0.01  # not a blank image


DENSE_MACS = 40_000_000
SETTINGS = [(1, "eager"), (256, "eager"), (1, "compiled")]
PLOT = "accuracy_vs_latency_cifar10_resnet56_resnet20.png"


def _executed(method, sparsity, seed):
    """Channel pruning: executed MACs shrink with the sparsity, a little differently per seed."""
    return int(DENSE_MACS * (1 - sparsity + 0.01 * seed + (0.02 if method == "cakld" else 0.0)))


def _dense_ms(seed, batch, mode):
    return (2.0 + 0.1 * seed) * (40 if batch == 256 else 1) * (0.5 if mode == "compiled" else 1.0)


def _final_ms(method, sparsity, seed, batch, mode):
    return _dense_ms(seed, batch, mode) * (1 - sparsity) * (1.2 + 0.05 * seed + (0.1 if mode == "compiled" else 0))


def _entries(ms_of):
    out = []
    for batch, mode in SETTINGS:
        ms = ms_of(batch, mode)
        e = {"batch": batch, "mode": mode, "median_ms": ms, "p10_ms": 0.9 * ms, "p90_ms": 1.1 * ms,
             "images_per_s": batch * 1000.0 / ms}
        if mode == "compiled":
            e["compile_seconds"] = 12.5
        out.append(e)
    return out


def _channel_record(method, kd, sparsity, seed, job, latency=True):
    rec = _record(method, kd, sparsity, seed, job)
    rec["granularity"] = "channel"
    rec["flops"] = {"dense": DENSE_MACS, "sparse": int(DENSE_MACS * (1 - sparsity)),
                    "executed": _executed(method, sparsity, seed)}
    rec["params"]["total_dense"] = 1100
    rec["model_file"] = {"path": f"/runs/{job}/model.pt", "bytes": 12345}
    if latency:
        rec["latency"] = {
            "device": "cpu", "dtype": "float32", "channels_last": False, "torch": "2.14.1", "iters": 100,
            "warmup": 20,
            "dense_student": _entries(lambda b, m: _dense_ms(seed, b, m)),
            "final": _entries(lambda b, m: _final_ms(method, sparsity, seed, b, m)),
        }
    return rec


def _row(md: str, label: str) -> list:
    """The cells of the table row whose first cell is ``label``."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in\n{md}")


TEACHER_TOP1 = 95.5


DENSE_TOP1 = {0: 93.1, 1: 93.4, 2: 92.8}  # the dense student differs by seed


def _stages(method, kd, sparsity, seed):
    """Cost stages as run_job writes them: teacher and student cached (cost in ``artifact``), the rest run."""
    retrain = 1000 + int(sparsity * 100) + seed
    return {
        "data": {"seconds": 0.5, "samples": 0, "teacher_samples": 0, "cached": False},
        "teacher": {"seconds": 0.01, "samples": 0, "teacher_samples": 0, "cached": True,
                    "artifact": {"seconds": 30.0, "samples": 20000, "teacher_samples": 0}},
        "student": {"seconds": 0.01, "samples": 0, "teacher_samples": 0, "cached": True,
                    "artifact": {"seconds": 15.0, "samples": 12000, "teacher_samples": 7}},
        "score": {"seconds": 1.0, "samples": 128, "teacher_samples": 128 if method == "cakld" else 0,
                  "cached": False},
        "retrain": {"seconds": 4.0, "samples": retrain, "teacher_samples": retrain if kd else 0, "cached": False},
    }


def _metrics(top1):
    return {"top1": top1, "top5": 99.0, "nll": 0.3, "ece": 0.02, "mce": 0.1, "rmsce": 0.03}


def booked_samples(rec: dict) -> dict:
    """``{stage: (samples, teacher_samples)}`` the record booked to its own stages (a cached stage books none)."""
    out = {}
    for name, st in rec["cost"]["stages"].items():
        pair = (st.get("samples", 0), st.get("teacher_samples", 0))
        if pair != (0, 0):
            out[name] = pair
    return out


def estimated_samples(overrides) -> list:
    """Every job of ``kdprune-estimate <overrides>`` as ``(exact {stage: pair}, approximate {stage: pair})``."""
    plain = [o for o in overrides if not o.startswith(("hydra.", "-m"))]
    return [({k: (c.samples, c.teacher_samples) for k, c in j.stages.items() if c.exact},
             {k: (c.samples, c.teacher_samples) for k, c in j.stages.items() if not c.exact})
            for j in count_sweep(config_dir(), plain)]


def assert_estimate_matches(overrides, recs: dict, rel: float = 0.1) -> None:
    """The records ``{job number: record}`` of a sweep book exactly the estimate's samples, stage by stage; a
    stage the estimate calls approximate within ``rel``."""
    jobs = estimated_samples(overrides)
    assert sorted(recs) == list(range(len(jobs)))
    for i, (exact, approx) in enumerate(jobs):
        got = booked_samples(recs[i])
        assert {k: v for k, v in got.items() if k not in approx} == exact, (i, recs[i]["method"])
        for k, (s, t) in approx.items():
            gs, gt = got.get(k, (0, 0))
            assert abs(gs - s) <= rel * max(s, 1) and abs(gt - t) <= rel * max(t, 1), (i, k, got[k], (s, t))
