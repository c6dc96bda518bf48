"""Shared rounds of IMP and COLT (docs/methods.md §4): the full rounds of a lower target are stored and reused
by a higher one, bit-identically; only the clipped last round and the final training are per target. A killed
job resumes."""
from __future__ import annotations

import json

import pytest
import torch
from runs import recipe

from kdprune_cli.experiment import job as runner
from kdprune_cli.experiment.job import run_job
from kdprune_cli.pruning import selection
from kdprune_cli.pruning.methods import get_method

QUIET = ["progress=false", "student.train.eval_every=0", "teacher.train.eval_every=0", "max_batches=2"]


IMP = [*QUIET, "method=imp", "method.rate=0.2", *recipe("round"), *recipe("retrain")]
COLT = [*QUIET, "method=colt", "method.rate=0.2", *recipe("round"), *recipe("retrain")]


def same_model(a, b):
    """The final weights and masks of two records' model files are equal."""
    fa, fb = (torch.load(r["checkpoint"], map_location="cpu", weights_only=True) for r in (a, b))
    for key in ("state_dict", "masks"):
        assert fa[key].keys() == fb[key].keys()
        assert all(torch.equal(fa[key][k], fb[key][k]) for k in fa[key]), key


def imp_rounds(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x.get("stage") == "imp" and "round" in x]


def test_imp_rounds_are_shared_across_targets_bit_identically(tiny_cfg, tmp_path):
    # rate 0.2: 0.3 = round 1 (20%, full) + clipped round 2; 0.5 = 20%, 36%, 48.8% (full) + clipped round 4
    a = run_job(tiny_cfg(*IMP, "sparsity=0.3", f"store.root={tmp_path}/shared"), tmp_path / "a", summary=False)
    assert "imp.reused" not in a["cost"]["stages"]  # nothing to reuse in an empty store
    assert len(list((tmp_path / "shared" / "imp_round").glob("*/artifact.pt"))) == 1  # the clipped round is not stored

    b = run_job(tiny_cfg(*IMP, "sparsity=0.5", f"store.root={tmp_path}/shared"), tmp_path / "b", summary=False)
    fresh = run_job(tiny_cfg(*IMP, "sparsity=0.5", f"store.root={tmp_path}/fresh"), tmp_path / "f", summary=False)
    reused = b["cost"]["stages"]["imp.reused"]
    assert reused["cached"] is True and reused["artifact"]["rounds"] == [1]
    assert reused["artifact"]["samples"] == 2 * 64  # what round 1 cost when job a made it (2 batches of 64)
    assert b["cost"]["stages"]["imp"]["samples"] == 3 * 2 * 64  # rounds 2–4 were trained here
    assert fresh["cost"]["stages"]["imp"]["samples"] == 4 * 2 * 64 and "imp.reused" not in fresh["cost"]["stages"]
    assert b["metrics"] == fresh["metrics"] and b["sparsity_actual"] == fresh["sparsity_actual"]
    same_model(b, fresh)
    assert [r.get("cached", False) for r in imp_rounds(tmp_path / "b")] == [True, False, False, False]

    # the same target again (resume=false: another run): every full round is in the store now
    c = run_job(tiny_cfg(*IMP, "sparsity=0.5", f"store.root={tmp_path}/shared", "resume=false"), tmp_path / "c",
                summary=False)
    assert c["cost"]["stages"]["imp.reused"]["artifact"]["rounds"] == [1, 2, 3]
    assert c["cost"]["stages"]["imp"]["samples"] == 2 * 64  # only the clipped round
    assert c["metrics"] == fresh["metrics"]
    same_model(c, fresh)
    assert len(list((tmp_path / "shared" / "imp_round").glob("*/artifact.pt"))) == 3


def test_imp_late_rewinding_rounds_are_shared(make_ctx, tmp_path):
    """With rewind_epoch=k a reused round also brings the epoch-k weights the later rounds rewind to."""
    args = [*IMP, "method.rewind_epoch=1", *recipe("round", epochs=2)]
    ctx_a = make_ctx(*args, "sparsity=0.3")
    get_method("imp")(ctx_a.cfg.method).run(ctx_a)
    ctx_b = make_ctx(*args, "sparsity=0.5")
    mb, masks_b = get_method("imp")(ctx_b.cfg.method).run(ctx_b)
    ctx_f = make_ctx(*args, "sparsity=0.5", f"store.root={tmp_path}/fresh")
    mf, masks_f = get_method("imp")(ctx_f.cfg.method).run(ctx_f)
    assert ctx_b.costs.stages["imp.reused"].artifact["rounds"] == [1] and "imp.reused" not in ctx_f.costs.stages
    assert all(torch.equal(masks_b[n], masks_f[n]) for n in masks_f)
    sb, sf = mb.state_dict(), mf.state_dict()
    assert all(torch.equal(sb[k], sf[k]) for k in sf)


def test_no_sharing_without_a_store(make_ctx, tmp_path):
    for s in ("0.3", "0.5"):
        ctx = make_ctx(*IMP, f"sparsity={s}", "store.enabled=false")
        get_method("imp")(ctx.cfg.method).run(ctx)
        assert "imp.reused" not in ctx.costs.stages
    assert not (tmp_path / "store" / "imp_round").exists()


def test_colt_rounds_are_shared_across_targets_bit_identically(make_ctx, tmp_path):
    def run(*extra):
        ctx = make_ctx(*COLT, *extra)
        logs = []
        ctx.log = logs.append
        model, masks = get_method("colt")(ctx.cfg.method).run(ctx)
        return ctx, len([x for x in logs if x.get("stage") == "colt" and "round" in x]), model, masks

    run("sparsity=0.3")
    ctx_b, rounds_b, model_b, masks_b = run("sparsity=0.5")
    ctx_f, rounds_f, model_f, masks_f = run("sparsity=0.5", f"store.root={tmp_path}/fresh")
    assert rounds_b == rounds_f >= 3
    cost_b, cost_f = ctx_b.costs.stages, ctx_f.costs.stages
    reused = cost_b["colt.reused"]
    assert reused.cached and reused.artifact["rounds"] and reused.artifact["rounds"][0] == 1
    assert reused.artifact["samples"] > 0 and "colt.reused" not in cost_f
    n_reused = len(reused.artifact["rounds"])
    assert cost_b["colt"].samples + reused.artifact["samples"] == cost_f["colt"].samples
    assert cost_b["colt"].samples < cost_f["colt"].samples and n_reused < rounds_b
    assert all(torch.equal(masks_b[n], masks_f[n]) for n in masks_f)
    sb, sf = model_b.state_dict(), model_f.state_dict()
    assert all(torch.equal(sb[k], sf[k]) for k in sf)
    assert ctx_b.evaluator.metrics == ctx_f.evaluator.metrics


def test_colt_stored_round_that_passes_a_lower_target_is_not_used(make_ctx, tmp_path, monkeypatch):
    """A round stored as full by a higher target can overshoot a lower target (the intersection removes more
    than the per-model count): that job computes its clipped round itself, as a fresh run does."""
    def run(*extra):
        ctx = make_ctx(*COLT, *extra)
        return ctx, get_method("colt")(ctx.cfg.method).run(ctx)

    first, real = [], selection.select_common

    def select_common(*args):  # round 1's per-model masks and intersection
        out = real(*args)
        first.append(out)
        return out

    monkeypatch.setattr(selection, "select_common", select_common)
    _, (model, _) = run("sparsity=0.6")
    monkeypatch.setattr(selection, "select_common", real)
    total = sum(p.numel() for n, p in model.named_parameters()
                if n.endswith("weight") and p.dim() in (2, 4))
    per_model, mask, _ = first[0]
    each, inter = (sum(int((~m[n]).sum()) for n in m) for m in (per_model[0], mask))
    assert each < inter  # the partition models disagree
    s = (each + inter) / 2 / total  # round 1 unclipped per model, but its intersection overshoots
    ctx, (model, masks) = run(f"sparsity={s}")
    ctx_f, (model_f, masks_f) = run(f"sparsity={s}", f"store.root={tmp_path}/fresh")
    assert "colt.reused" not in ctx.costs.stages
    assert ctx.costs.stages["colt"].samples == ctx_f.costs.stages["colt"].samples
    assert all(torch.equal(masks[n], masks_f[n]) for n in masks_f)
    assert ctx.evaluator.metrics == ctx_f.evaluator.metrics


class Killed(Exception):
    pass


def test_killed_imp_job_resumes_with_its_stored_rounds(tiny_cfg, tmp_path, monkeypatch):
    args = [*IMP, "sparsity=0.5", *recipe("round", epochs=3)]
    ref = run_job(tiny_cfg(*args, f"store.root={tmp_path}/ref"), tmp_path / "ref", summary=False)
    real_log = runner.RunLogger.log
    seen = []

    def dying_log(self, rec):
        real_log(self, rec)
        if rec.get("stage") == "imp" and "epoch" in rec:
            seen.append(rec["epoch"])
            if len(seen) == 5:  # epoch 2 of round 2: round 1 is stored, round 2 has an epoch-1 checkpoint
                raise Killed("simulated kill in round 2")

    cfg = tiny_cfg(*args, f"store.root={tmp_path}/store")
    monkeypatch.setattr(runner.RunLogger, "log", dying_log)
    with pytest.raises(Killed):
        run_job(cfg, tmp_path / "k", summary=False)
    assert list((tmp_path / "store" / "jobs").glob("*/imp.2.pt"))
    monkeypatch.setattr(runner.RunLogger, "log", real_log)
    again = run_job(cfg, tmp_path / "again", summary=False)
    assert again["status"] == "ok"
    lines = [json.loads(x) for x in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if x["stage"] == "imp" and "epoch" in x][:1] == [2]  # round 2 continued
    assert again["cost"]["stages"]["imp.reused"]["artifact"]["rounds"] == [1]
    assert again["metrics"] == ref["metrics"] and again["sparsity_actual"] == ref["sparsity_actual"]
    same_model(again, ref)
