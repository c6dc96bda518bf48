"""COLT — Cyclic Overlapping Lottery Tickets (Hossain et al., IEEE TAI 2025, arXiv 2212.12770; docs/methods.md §3).

The classes are split into ``partitions`` contiguous disjoint sets, each relabelled ``0..k−1``. One model
per partition (its own ``k``-class head) starts from the same random init θ₀ (identical convolutions).
Each round every model is trained on its partition, each prunes ``rate`` of its remaining conv weights by
magnitude, the masks are intersected (a weight survives only if every model keeps it), and all models are
rewound to θ₀ ⊙ M. The ticket θ₀ ⊙ M, with the full-class head of θ₀, is finally trained on the whole
dataset with the mask fixed.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import List

import torch
from omegaconf import MISSING
from torch import nn

from kdprune_cli.config.schema import ConfigError, MethodConfig, TrainRecipe, model_kwargs, recipe
from kdprune_cli.data import Split
from kdprune_cli.models import build_model
from kdprune_cli.pruning.methods.base import Method, Result
from kdprune_cli.pruning.methods.imp import clone_state, group_targets, magnitudes, next_count, removed, rewind, select_count
from kdprune_cli.pruning.masks import Masks, dense_masks, prunable_modules, prunable_params
from kdprune_cli.pruning.procedures.rounds import full_step, round_spec, shared_round
from kdprune_cli.pruning.structure.channels import Plan


def partition_classes(num_classes: int, partitions: int) -> List[range]:
    """``partitions`` contiguous disjoint class ranges covering ``0..num_classes−1`` (sizes differ by ≤ 1;
    the first ones get the extra class)."""
    if not 1 <= partitions <= num_classes:
        raise ConfigError(f"method.partitions must be in [1, {num_classes}] for {num_classes} classes, "
                          f"got {partitions}")
    base, extra = divmod(num_classes, partitions)
    out, lo = [], 0
    for i in range(partitions):
        hi = lo + base + (1 if i < extra else 0)
        out.append(range(lo, hi))
        lo = hi
    return out


def partition_data(data, classes: range):
    """A shallow copy of ``data`` whose splits hold only ``classes``, relabelled ``0..k−1``.

    Normalisation statistics stay those of the whole training set; only ``batches``/``num_batches`` and
    the splits are used by the trainer and the evaluator.
    """
    lo, hi = classes.start, classes.stop

    def restrict(s: Split) -> Split:
        keep = (s.y >= lo) & (s.y < hi)
        return Split(s.x[keep], s.y[keep] - lo)

    sub = copy.copy(data)
    sub.train = restrict(data.train)
    sub.test = restrict(data.test)
    sub.val = restrict(data.val) if data.val is not None else None
    sub.num_classes = hi - lo
    return sub


def classifier_name(model: nn.Module, num_classes: int) -> str:
    """The classifier: the last ``nn.Linear`` with ``num_classes`` outputs."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not names:
        raise ConfigError(f"COLT needs a final nn.Linear classifier with {num_classes} outputs; the student has none")
    return names[-1]


def intersect(masks_list: List[Masks], names: List[str]) -> Masks:
    """A weight survives only if every mask keeps it."""
    return {n: torch.stack([m[n] for m in masks_list]).all(0) for n in names}


def intersect_exact(scores_list: List[dict], names: List[str], keep: Masks, need: int):
    """Per-model masks whose intersection removes exactly ``need`` weights of the group (the clipped round).

    Every model removes the same number ``prev + c`` of its lowest-magnitude survivors; ``c`` is the largest
    count whose intersection removes at most ``need``; the remaining deficit (smaller than the number of
    models) is filled by letting models 0, 1, … remove one more weight each, which adds 0 or 1 to the
    intersection at a time. Returns ``(per-model masks, intersection)``.
    """
    prev = removed(keep, names)

    def per_model(c):
        return [select_count(s, names, prev + c, keep) for s in scores_list]

    lo, hi = 0, need - prev  # f(0) = prev ≤ need; f(need − prev) ≥ need (each model alone removes need)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if removed(intersect(per_model(mid), names), names) <= need:
            lo = mid
        else:
            hi = mid - 1
    ms = per_model(lo)
    cur = intersect(ms, names)
    if removed(cur, names) < need:
        more = per_model(lo + 1)
        for i in range(len(ms)):
            ms[i] = more[i]
            cur = intersect(ms, names)
            if removed(cur, names) == need:
                break
    assert removed(cur, names) == need
    return ms, cur


@dataclass
class COLTConfig(MethodConfig):
    partitions: int = MISSING
    rate: float = MISSING  # fraction of each model's remaining conv weights pruned per round
    round: TrainRecipe = MISSING
    retrain: TrainRecipe = MISSING

class COLT(Method):
    """Cyclic Overlapping Lottery Tickets (Hossain et al., IEEE TAI 2025, arXiv 2212.12770).

    Round r: each partition model f_i(θ₀_i ⊙ M) trains on its classes; each computes the mask that removes
    ``rate`` of its remaining conv weights by |θ| (global threshold over the convs, or per tensor with
    ``prune.scope=layer``); ``M ← ∧_i M_i``; every model rewinds to θ₀_i ⊙ M. Only Conv2d weights are pruned;
    the linear layers stay dense, so the conv removals alone must reach ``round(s·|P|)`` (|P| includes the
    classifier, docs/methods.md §0), and the last round is clipped to land exactly on it. Final: θ₀ ⊙ M with θ₀'s
    own (untrained) full-class head, trained on the whole dataset with the mask fixed (``retrain``).
    Every round's training and pruning cost goes into the ``colt`` stage; each round is logged as
    ``{"stage": "colt", "round", "sparsity", "conv_sparsity", "seconds"}``.
    """

    name = "colt"
    granularities = ("weight", "channel")
    Config = COLTConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.history = None  # set to a list to keep every round's masks and magnitudes (tests)

    def validate(self) -> None:
        c = self.cfg
        p = c.partitions
        if not isinstance(p, int) or isinstance(p, bool) or p < 2:
            raise ConfigError(f"method.partitions must be an integer >= 2, got {p!r}")
        if not 0.0 < float(c.rate) < 1.0:
            raise ConfigError(f"method.rate must be in (0, 1), got {c.rate}")
        recipe(c.round, "method.round")
        recipe(c.retrain, "method.retrain")

    def partition_model(self, ctx, theta0: dict, head: str, classes: int, i: int) -> nn.Module:
        """θ₀ everywhere except the classifier, which is partition ``i``'s own ``classes``-way head."""
        d = ctx.data
        torch.manual_seed(int(ctx.seeds.generator(f"colt/head{i}").initial_seed()))
        m = build_model(ctx.cfg.student.name, classes, d.channels, d.image_size,
                        model_kwargs(ctx.cfg.student)).to(ctx.device)
        shared = {k: v for k, v in theta0.items() if not k.startswith(head + ".")}
        missing, unexpected = m.load_state_dict(shared, strict=False)
        if unexpected or any(not k.startswith(head + ".") for k in missing):
            raise RuntimeError(f"partition model does not match θ₀ outside {head}: {missing[:3]} {unexpected[:3]}")
        return m

    def train_on(self, ctx, model, data) -> None:
        """One round's training of a partition model on its partition's splits."""
        ctx.trainer.train(model, self.cfg.round, ctx.trainer.objective(), stage="colt", masks=self._masks, data=data)

    def run(self, ctx):
        if ctx.pruner.granularity == "channel":
            return self.run_channels(ctx)
        c = self.cfg
        rate = float(c.rate)
        full = ctx.seeds.new_model("student", name="init")
        theta0 = clone_state(full)
        head = classifier_name(full, ctx.data.num_classes)
        parts = partition_classes(ctx.data.num_classes, int(c.partitions))
        mods = prunable_modules(full, ctx.pruner.exclude)
        P = {f"{n}.weight": m.weight for n, m in mods.items()}
        convs = {f"{n}.weight": m.weight.numel() for n, m in mods.items() if isinstance(m, nn.Conv2d)}
        total, n_conv = sum(p.numel() for p in P.values()), sum(convs.values())
        k = int(round(ctx.pruner.sparsity * total))
        if k and k >= n_conv:
            raise ConfigError(f"COLT prunes only Conv2d weights, but sparsity {ctx.pruner.sparsity} must remove {k} of "
                              f"|P|={total} weights and the prunable convolutions hold only {n_conv}; lower the "
                              f"sparsity or put the linear layers in prune.exclude")
        groups = group_targets(convs, k / n_conv if n_conv else 0.0, ctx.pruner.scope)
        assert sum(g for _, g in groups) == k

        models = [self.partition_model(ctx, theta0, head, len(p), i) for i, p in enumerate(parts)]
        thetas = [clone_state(m) for m in models]
        datas = [partition_data(ctx.data, p) for p in parts]
        self.parts, self.thetas = parts, thetas
        M: Masks = {n: torch.ones_like(P[n], dtype=torch.bool) for n in convs}
        spec = round_spec(ctx, "colt", c.round, "method.round", rate=rate, partitions=int(c.partitions),
                          head=head)

        def check(state):  # a stored round must fit this model
            if set(state["mask"]) != set(convs) or any(tuple(v.shape) != tuple(M[n].shape)
                                                         for n, v in state["mask"].items()):
                raise ValueError("masks of other parameters")

        def full_for_me(state) -> bool:  # a stored round is this job's round when it lands on no target
            return all(removed(state["mask"], names) <= g for names, g in groups)

        def train_and_prune():
            """One round in this job: train every partition model, select, intersect, rewind. Returns the
            state to store, or None when the intersection had to be clipped to this job's target."""
            nonlocal M
            self._masks = M
            for model, data in zip(models, datas):
                self.train_on(ctx, model, data)
            clipped = False
            with ctx.costs.count(stage="colt"):
                named = [dict(m.named_parameters()) for m in models]
                scores = [magnitudes({n: nm[n] for n in convs}) for nm in named]
                per_model: List[Masks] = [{} for _ in models]
                new: Masks = {}
                for names, g in groups:
                    prev = removed(M, names)
                    size = sum(M[n].numel() for n in names)
                    target = next_count(prev, g, size, rate)
                    clipped |= target != prev + max(1, int(round(rate * (size - prev)))) or prev >= g
                    ms = [select_count(s, names, target, M) for s in scores]
                    inter = intersect(ms, names)
                    if removed(inter, names) > g:  # clip: land exactly on the target
                        ms, inter = intersect_exact(scores, names, M, g)
                        clipped = True
                    for pm, m in zip(per_model, ms):
                        pm.update(m)
                    new.update(inter)
                if self.history is not None:
                    self.history.append({"round": r, "before": M, "per_model": per_model, "mask": new,
                                         "scores": [{n: s[n].cpu().clone() for n in s} for s in scores]})
                M = new
                for model, th in zip(models, thetas):
                    rewind(model, th, M)
            return None if clipped else {"mask": {n: m.cpu() for n, m in M.items()}}

        r = 0
        while any(removed(M, names) < g for names, g in groups):
            r += 1
            t = time.perf_counter()
            shareable = all(full_step(removed(M, names), g, sum(M[n].numel() for n in names), rate) is not None
                       for names, g in groups)
            cached = False
            if shareable:  # unclipped so far: the same round for every target whose intersection it does not pass
                state, cached = shared_round(ctx, "colt", spec, r, train_and_prune, trainings=len(models),
                                             check=check, usable=full_for_me)
                if cached:
                    M = {n: m.to(P[n].device) for n, m in state["mask"].items()}
                    for model, th in zip(models, thetas):
                        rewind(model, th, M)
            else:
                train_and_prune()
            ctx.log({"stage": "colt", "round": r, "sparsity": removed(M) / total,
                     "conv_sparsity": removed(M) / max(n_conv, 1), "seconds": time.perf_counter() - t,
                     **({"cached": True} if cached else {})})
        self.rounds = r
        masks = dense_masks(full, ctx.pruner.exclude)
        masks.update(M)
        rewind(full, theta0, masks)
        ctx.evaluator.record_metrics("pruned", full)
        ctx.trainer.train(full, c.retrain, ctx.trainer.objective(), stage="retrain", masks=masks)
        return Result(full, masks)

    def run_channels(self, ctx):
        """COLT over channel groups (docs/methods.md §7): each round trains every partition model, each one
        plans its channels by magnitude to ``1 − (1 − rate)^r`` of the target unit (removed channels staying
        removed), a channel survives only if every model keeps it (the union of the removals), and a round
        whose union would pass a group's cap (``prune.max_group_ratio``, ``prune.min_channels``) or
        ``sparsity`` is planned once on the models' summed magnitudes (to the round's target or to
        ``sparsity``); all models
        rewind to θ₀ ⊙ M. Then the full-class model trains with the mask and the channels go physically.
        Rounds are not shared between targets at this granularity."""
        c, p = self.cfg, ctx.cfg.prune
        rate, s_f = float(c.rate), ctx.pruner.sparsity
        full = ctx.seeds.new_model("student", name="init")
        theta0 = clone_state(full)
        head = classifier_name(full, ctx.data.num_classes)
        parts = partition_classes(ctx.data.num_classes, int(c.partitions))
        models = [self.partition_model(ctx, theta0, head, len(q), i) for i, q in enumerate(parts)]
        thetas, datas = [clone_state(m) for m in models], [partition_data(ctx.data, q) for q in parts]
        exclude = ctx.pruner.exclude
        cg = ctx.pruner.channel_groups(full)
        cgs = [ctx.pruner.channel_groups(m) for m in models]  # the same groups; only the head's outputs differ
        if any([g.channels for g in x.groups] != [g.channels for g in cg.groups] for x in cgs):
            raise ValueError("COLT's partition models have other channel groups than the full model")
        gone = Plan(cg.groups, [torch.zeros(0, dtype=torch.long) for _ in cg.groups], {})
        r = 0
        while True:
            r += 1
            t = time.perf_counter()
            for x, model, data in zip(cgs, models, datas):
                self._masks = x.masks(gone.removed)
                self.train_on(ctx, model, data)
            with ctx.costs.count(stage="colt"):
                goal = min(s_f, 1 - (1 - rate) ** r)
                scores = [magnitudes(prunable_params(m, exclude)) for m in models]
                plans = [ctx.pruner.plan(x, sc, goal, keep_removed=gone) for x, sc in zip(cgs, scores)]
                union = [torch.unique(torch.cat([pl.removed[g] for pl in plans])) for g in range(len(cg.groups))]
                common = {n: sum(sc[n] for sc in scores) for n in scores[0]
                          if all(sc[n].shape == scores[0][n].shape for sc in scores)}
                if any(len(u) > most for u, most in zip(union, ctx.pruner.removable(cg))):
                    union = ctx.pruner.plan(cg, common, goal, keep_removed=gone).removed  # past a group's cap
                if goal >= s_f or cg.describe(union, s_f, p.target, exclude)["achieved"] > s_f:
                    union = ctx.pruner.plan(cg, common, s_f, keep_removed=gone).removed  # clipped to the target
                gone = Plan(cg.groups, union, {})
                for x, model, th in zip(cgs, models, thetas):
                    rewind(model, th, x.masks(gone.removed))
            facts = cg.describe(gone.removed, s_f, p.target, exclude, scope=ctx.pruner.scope, reduce=p.reduce,
                                normalize=p.normalize, max_group_ratio=float(p.max_group_ratio),
                                min_channels=int(p.min_channels), round_to=int(p.round_to))
            ctx.log({"stage": "colt", "round": r, "sparsity": facts["achieved"], "seconds": time.perf_counter() - t})
            if goal >= s_f or facts["achieved"] >= s_f:
                break
        self.rounds = r
        masks = cg.masks(gone.removed)
        rewind(full, theta0, masks)
        ctx.evaluator.record_metrics("pruned", full)
        ctx.trainer.train(full, c.retrain, ctx.trainer.objective(), stage="retrain", masks=masks)
        cg.remove(Plan(cg.groups, gone.removed, facts))
        return Result(full, {}, {"structure": facts})
