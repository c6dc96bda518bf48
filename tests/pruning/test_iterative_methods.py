"""COLT (docs/methods.md §3), IMP and GMP (§4): exact targets, intersections, rewinding, the cubic schedule.

Every run uses a few hundred digits training samples and 1–2 epochs, so each takes a few optimizer steps.
"""
from __future__ import annotations

import pytest
import torch
from runs import recipe

from kdprune_cli.config.schema import ConfigError
from kdprune_cli.data import Split
from kdprune_cli.models.masks import assert_masked, prunable_modules, prunable_params, select
from kdprune_cli.pruning import selection
from kdprune_cli.pruning.methods import get_method, gmp
from kdprune_cli.pruning.methods.colt import partition_classes, partition_data
from kdprune_cli.pruning.procedures.gradual import schedule
from kdprune_cli.pruning.procedures.rounds import clone_state

QUIET = ["progress=false", "student.train.eval_every=0", "teacher.train.eval_every=0"]


def shrink(ctx, n):
    """Keep the first ``n`` training samples (digits' split is shuffled and stratified)."""
    ctx.data.train = Split(ctx.data.train.x[:n], ctx.data.train.y[:n])


def spy(ctx):
    """Record every trainer.train call (model state, masks, data at call time), the model given to
    evaluator.record_metrics("pruned"), and the ctx.log lines."""
    calls, pruned, logs = [], {}, []
    train, record = ctx.trainer.train, ctx.evaluator.record_metrics

    def train_spy(model, node, objective, stage, masks=None, step_hook=None, record=True, data=None):
        d = data if data is not None else ctx.data
        calls.append({"stage": stage, "state": clone_state(model), "model": model,
                      "masks": None if masks is None else {n: m.clone() for n, m in masks.items()},
                      "num_classes": d.num_classes, "labels": d.train.y.clone()})
        return train(model, node, objective, stage, masks=masks, step_hook=step_hook, record=record, data=data)

    def record_spy(key, model, cached=None):
        if key == "pruned":
            pruned["state"] = clone_state(model)
        return record(key, model, cached)

    ctx.trainer.train, ctx.evaluator.record_metrics = train_spy, record_spy
    ctx.log = logs.append
    return calls, pruned, logs


def spy_common(monkeypatch):
    """Record every call of the selection's ``select_common`` (the masks before, each model's scores and
    masks, their intersection): one per round with ``prune.scope=global``."""
    hist, real = [], selection.select_common

    def select_common(scores_list, names, count, cap, keep):
        per_model, inter, clipped = real(scores_list, names, count, cap, keep)
        hist.append({"before": {n: keep[n].clone() for n in names}, "per_model": per_model, "mask": inter,
                     "scores": [{n: s[n].cpu().clone() for n in names} for s in scores_list]})
        return per_model, inter, clipped

    monkeypatch.setattr(selection, "select_common", select_common)
    return hist


def round_lines(logs, stage):
    return [r for r in logs if r.get("stage") == stage and "round" in r]


def n_removed(masks, names=None):
    return sum(int((~masks[n]).sum()) for n in (masks if names is None else names))


def assert_rewound(state, theta, masks):
    """``state`` is θ ⊙ M on the masked weights and θ exactly everywhere else (BN, heads, biases)."""
    for key, v in theta.items():
        if key in masks:
            assert torch.equal(state[key], v * masks[key]), key
            assert not (state[key][masks[key]] != v[masks[key]]).any()
            assert (state[key][~masks[key]] == 0).all()
        else:
            assert torch.equal(state[key], v), key


# --- COLT ------------------------------------------------------------------------------------------
def test_partitions_are_contiguous_disjoint_cover_and_relabelled(make_ctx):
    ctx = make_ctx(*QUIET)
    parts = partition_classes(10, 3)
    assert [list(p) for p in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    seen = sorted(c for p in parts for c in p)
    assert seen == list(range(10))  # cover, and (with the length) disjoint
    with pytest.raises(ConfigError):
        partition_classes(10, 11)
    for p in parts:
        sub = partition_data(ctx.data, p)
        assert sub.num_classes == len(p) and ctx.data.num_classes == 10
        for which in ("train", "test"):
            full, s = getattr(ctx.data, which), getattr(sub, which)
            keep = (full.y >= p.start) & (full.y < p.stop)
            assert torch.equal(s.x, full.x[keep]) and torch.equal(s.y, full.y[keep] - p.start)
            assert set(s.y.tolist()) == set(range(len(p)))
        assert sum(len(b[1]) for b in sub.batches("train", 50)) == len(sub.train)


def rounds_ctx(make_ctx, method, samples, *extra):
    """A Context for IMP or COLT: rate 0.3 to sparsity 0.5, one-epoch round and retrain recipes, the first
    ``samples`` training images."""
    ctx = make_ctx(*QUIET, f"method={method}", "sparsity=0.5", "method.rate=0.3", *recipe("round"),
                   *recipe("retrain"), *extra)
    shrink(ctx, samples)
    return ctx


def colt_ctx(make_ctx, *extra):
    return rounds_ctx(make_ctx, "colt", 256, *extra)


def test_colt_intersects_partition_masks_rewinds_and_hits_target(make_ctx, monkeypatch):
    ctx = colt_ctx(make_ctx)
    calls, pruned, logs = spy(ctx)
    hist = spy_common(monkeypatch)
    method = get_method("colt")(ctx.cfg.method)
    model, masks = method.run(ctx)
    rounds = round_lines(logs, "colt")

    theta0 = clone_state(ctx.seeds.new_model("student", name="init"))
    mods = prunable_modules(model)
    P = prunable_params(model)
    convs = [f"{n}.weight" for n, m in mods.items() if isinstance(m, torch.nn.Conv2d)]
    total = sum(p.numel() for p in P.values())
    k = round(0.5 * total)
    assert set(masks) == set(P) and n_removed(masks) == k
    assert masks["fc.weight"].all()  # only convolutions are pruned
    assert_masked(model, masks)

    assert len(hist) == len(rounds) >= 2
    prev = 0
    for h in hist:
        pm, inter = h["per_model"], h["mask"]
        # the mask is the intersection of the partition models' masks: a weight survives iff all keep it
        for n in convs:
            assert torch.equal(inter[n], pm[0][n] & pm[1][n])
        for i, m in enumerate(pm):
            # each model keeps earlier removals and removes its own smallest-magnitude survivors (global)
            assert all((~h["before"][n] <= ~m[n]).all() for n in convs)
            newly = torch.cat([h["scores"][i][n][(~m[n] & h["before"][n]).cpu()] for n in convs])
            kept = torch.cat([h["scores"][i][n][m[n].cpu()] for n in convs])
            assert newly.numel() > 0 and newly.max() <= kept.min()
        if h is not hist[-1]:  # unclipped round: every model removes 30% of the survivors
            want = prev + round(0.3 * (len(torch.cat([h["before"][n].flatten() for n in convs])) - prev))
            assert [n_removed(m, convs) for m in pm] == [want, want]
        assert n_removed(inter, convs) > n_removed(pm[0], convs)  # the models disagree: overlap matters
        prev = n_removed(inter, convs)
    assert all(torch.equal(masks[n], hist[-1]["mask"][n]) for n in convs)

    # every round trains each partition model on its relabelled classes, from θ₀_i ⊙ M (same convs θ₀)
    colt_calls = [c for c in calls if c["stage"] == "colt"]
    assert len(colt_calls) == 2 * len(rounds)
    parts = partition_classes(10, 2)
    assert [list(p) for p in parts] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    # θ₀_i of each partition model, built again (its head's stream is named by the partition)
    thetas = [clone_state(method.partition_model(ctx, theta0, "fc", len(p), i)) for i, p in enumerate(parts)]
    for j, c in enumerate(colt_calls):
        r, i = divmod(j, 2)
        assert c["num_classes"] == 5 and set(c["labels"].tolist()) == set(range(5))
        before = hist[r]["before"]
        assert all(torch.equal(c["masks"][n], before[n]) for n in convs) and set(c["masks"]) == set(convs)
        assert_rewound(c["state"], thetas[i], before)
    for th in thetas:
        assert th["fc.weight"].shape == (5, 64)
        assert all(torch.equal(th[n], theta0[n]) for n in theta0 if not n.startswith("fc."))
    assert not torch.equal(thetas[0]["fc.weight"], thetas[1]["fc.weight"])
    # the ticket: θ₀ ⊙ M with θ₀'s own full-class head
    assert_rewound(pruned["state"], theta0, masks)
    assert [r["round"] for r in rounds] == list(range(1, len(hist) + 1))
    assert rounds[-1]["sparsity"] == k / total and all(r["seconds"] > 0 for r in rounds)
    halves = [int((ctx.data.train.y < 5).sum()), int((ctx.data.train.y >= 5).sum())]
    assert ctx.costs.stages["colt"].samples == len(rounds) * sum(h // 64 * 64 for h in halves)


def test_colt_cannot_reach_target_with_convs_only(make_ctx):
    ctx = colt_ctx(make_ctx, "sparsity=0.999")
    with pytest.raises(ConfigError, match="only Conv2d"):
        get_method("colt")(ctx.cfg.method).run(ctx)


# --- IMP -------------------------------------------------------------------------------------------
def imp_ctx(make_ctx, *extra):
    return rounds_ctx(make_ctx, "imp", 192, *extra)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_imp_rewinds_to_theta0_and_hits_target(make_ctx, scope):
    ctx = imp_ctx(make_ctx, f"prune.scope={scope}")
    calls, pruned, logs = spy(ctx)
    method = get_method("imp")(ctx.cfg.method)
    model, masks = method.run(ctx)
    theta0 = clone_state(ctx.seeds.new_model("student", name="init"))
    P = prunable_params(model)
    total = sum(p.numel() for p in P.values())
    assert set(masks) == set(P) and n_removed(masks) == round(0.5 * total)
    if scope == "layer":  # the same per-tensor counts as one-shot selection in layer scope
        ref = select({n: torch.rand(p.shape) for n, p in P.items()}, 0.5, "layer")
        assert {n: n_removed(masks, [n]) for n in P} == {n: n_removed(ref, [n]) for n in P}
    assert_masked(model, masks)
    rounds = [c for c in calls if c["stage"] == "imp"]
    assert len(rounds) == len(round_lines(logs, "imp")) == 2  # 30% then clipped from 51% to 50%
    assert n_removed(rounds[0]["masks"]) == 0
    r1 = rounds[1]["masks"]
    if scope == "global":
        assert n_removed(r1) == round(0.3 * total)
    else:
        assert all(n_removed(r1, [n]) == max(1, round(0.3 * p.numel())) for n, p in P.items())
    for c in rounds:  # every round starts from θ₀ ⊙ M
        assert_rewound(c["state"], theta0, c["masks"])
    assert_rewound(pruned["state"], theta0, masks)
    lines = [r for r in logs if r.get("stage") == "imp" and "round" in r]
    assert [r["round"] for r in lines] == [1, 2] and lines[-1]["sparsity"] == round(0.5 * total) / total
    assert ctx.costs.stages["imp"].samples == 2 * 192 and ctx.costs.stages["retrain"].samples == 192


def test_imp_late_rewinding_uses_epoch_k_weights(make_ctx):
    ctx = imp_ctx(make_ctx, "method.rewind_epoch=1", "method.round.epochs=2")
    calls, pruned, logs = spy(ctx)
    seen = {}
    spe = 192 // 64
    inner = ctx.trainer.train

    def train(model, node, objective, stage, masks=None, step_hook=None, record=True):
        def hook(step, total):
            if step_hook is not None:
                step_hook(step, total)
            if stage == "imp" and "epoch1" not in seen and step == spe:
                seen["epoch1"] = clone_state(model)  # the weights after exactly one epoch of round 1
        out = inner(model, node, objective, stage, masks=masks, step_hook=hook, record=record)
        seen.setdefault("end", clone_state(model))
        return out

    ctx.trainer.train = train
    method = get_method("imp")(ctx.cfg.method)
    model, masks = method.run(ctx)
    theta0 = clone_state(ctx.seeds.new_model("student", name="init"))
    assert n_removed(masks) == round(0.5 * sum(p.numel() for p in prunable_params(model).values()))
    assert_rewound(pruned["state"], seen["epoch1"], masks)
    rounds = [c for c in calls if c["stage"] == "imp"]
    assert_rewound(rounds[1]["state"], seen["epoch1"], rounds[1]["masks"])
    w = "layer1.0.conv1.weight"
    assert not torch.equal(seen["epoch1"][w], theta0[w]) and not torch.equal(seen["epoch1"][w], seen["end"][w])
    with pytest.raises(ConfigError):
        get_method("imp")(imp_ctx(make_ctx, "method.rewind_epoch=3").cfg.method)


# --- GMP -------------------------------------------------------------------------------------------
def test_gmp_follows_the_cubic_schedule_and_ends_on_target(make_ctx, monkeypatch):
    s_i, s_f = 0.1, 0.6
    ctx = make_ctx(*QUIET, "method=gmp", f"sparsity={s_f}", f"method.initial_sparsity={s_i}",
                   "method.start_from=init", "method.start=0.2", "method.end=0.9", "method.frequency=2",
                   *recipe("train", epochs=2), *recipe("retrain"))
    shrink(ctx, 320)  # 5 steps per epoch, T = 10: pruning at t = 2, 4, 6, 8 (t₀ = 2, Δt = 2, n = 3)
    calls, pruned, logs = spy(ctx)
    measured, followed = [], []
    inner = ctx.trainer.train

    def train(model, node, objective, stage, masks=None, step_hook=None, record=True):
        def hook(step, total):
            step_hook(step, total)
            zeros = sum(int((p == 0).sum()) for p in prunable_params(model).values())
            measured.append((step, n_removed(masks), zeros))
        return inner(model, node, objective, stage, masks=masks,
                     step_hook=hook if step_hook is not None else None, record=record)

    ctx.trainer.train = train
    real = gmp.prune_gradually

    def prune_gradually(*args, **kw):  # the schedule the procedure followed
        progress, history = real(*args, **kw)
        followed.append(history)
        return progress, history

    monkeypatch.setattr(gmp, "prune_gradually", prune_gradually)
    method = get_method("gmp")(ctx.cfg.method)
    model, masks = method.run(ctx)
    N = sum(p.numel() for p in prunable_params(model).values())
    t0, dt, n = 2, 2, 3
    assert followed[0].schedule == (t0, n, dt, 10)
    assert [x["step"] for x in followed[0].steps] == [2, 4, 6, 8]
    assert [m[0] for m in measured] == list(range(10))
    for step, rem, zeros in measured:
        if step < t0:
            want = 0
        else:
            j = min((step - t0) // dt, n)
            want = round(N * (s_f - (s_f - s_i) * (1 - (t0 + j * dt - t0) / (n * dt)) ** 3))
        assert rem == want, (step, rem, want)
        assert zeros == want  # the weights are pruned in the hook, before this step's forward
    assert measured[2][1] == round(s_i * N) and measured[-1][1] == round(s_f * N)
    assert n_removed(masks) == round(s_f * N)
    assert_masked(model, masks)
    assert "pruned" in ctx.evaluator.metrics and "state" in pruned
    assert [r["step"] for r in logs if r.get("stage") == "gmp" and "step" in r] == [2, 4, 6, 8]


def test_gmp_schedule_bounds():
    assert schedule(100, 0.0, 1.0, 10) == (0, 9, 10)  # last pruning step 90 ≤ T − 1
    assert schedule(100, 0.1, 0.5, 7) == (10, 5, 7)
    with pytest.raises(ConfigError):
        schedule(10, 0.0, 0.1, 2)
