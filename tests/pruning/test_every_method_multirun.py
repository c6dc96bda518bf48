"""A quickstart multirun over every method completes, each at the exact target sparsity and well above
chance (10% on digits), booking the samples `kdprune-estimate` counted. Epochs are cut further than the
quickstart's to fit CI."""
from __future__ import annotations

import json
from pathlib import Path

from records import assert_estimate_matches
from runs import kdprune

from kdprune_cli.cli.main import config_dir
from kdprune_cli.pruning.methods import method_names


def test_quickstart_multirun_over_every_method(tmp_path):
    methods = method_names()
    assert {"cakld", "epg", "epsd", "colt", "snip", "grasp", "synflow", "magnitude", "random", "imp",
            "gmp"} <= set(methods)
    # NutePrune learns its sparsity (a Lagrangian, not an exact count): tests/pruning/test_nuteprune.py checks it
    methods = [m for m in methods if m != "nuteprune"]
    choices = sorted(p.stem for p in Path(config_dir(), "method").glob("*.yaml")
                     if not p.stem.startswith("nuteprune"))  # and nuteprune_intact
    args = ["experiment=quickstart", "progress=false", "teacher=resnet20", "teacher.train.epochs=2",
            "student.train.epochs=2", "method.retrain.epochs=3", f"method={','.join(choices)}", "sparsity=0.9"]
    r = kdprune(["-m", *args], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    by_job = {int(p.parent.name): json.loads(p.read_text()) for p in (tmp_path / "multi").glob("*/results.json")}
    assert_estimate_matches(args, by_job)  # kdprune-estimate counted every stage's samples (COLT's within 10 %)
    recs = list(by_job.values())
    assert len(recs) == len(choices)
    assert {x["method"] for x in recs} == set(methods)
    for x in recs:
        assert x["status"] == "ok", x
        assert abs(x["sparsity_actual"] - 0.9) < 1e-4, x["method"]
        assert x["params"]["nonzero"] == x["params"]["prunable"] - round(0.9 * x["params"]["prunable"])
        assert x["metrics"]["final"]["top1"] > 50.0, (x["method"], x["metrics"]["final"])
        assert x["cost"]["total_seconds"] > 0 and x["cost"]["stages"]
