"""Iterative magnitude pruning with rewinding — the lottery-ticket procedure (Frankle & Carbin, ICLR 2019,
arXiv 1803.03635, "Strategy 1: iterative pruning with resetting"; docs/methods.md §4).

Also holds the small helpers the iterative methods share (COLT and GMP import them): removal targets per
scope group, exact-count selection through :func:`masks.select`, and rewinding.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

import torch
from omegaconf import MISSING
from torch import nn

from kdprune_cli.config.schema import ConfigError, MethodConfig, TrainRecipe, recipe
from kdprune_cli.pruning.methods.base import Method, Result
from kdprune_cli.pruning.scores.magnitude import magnitude as magnitudes
from kdprune_cli.pruning.masks import Masks, _removal_counts, apply_masks, dense_masks, prunable_params, select
from kdprune_cli.pruning.procedures.rounds import full_step, round_spec, shared_round

Groups = List[Tuple[List[str], int]]


# --- shared helpers for the iterative methods ------------------------------------------------------
def group_targets(sizes: Mapping[str, int], sparsity: float, scope: str) -> Groups:
    """``[(names, removed count)]``: one group of every tensor with ``round(s·N)`` (``global``), or one
    group per tensor with the same largest-remainder counts that one-shot ``select`` uses (``layer``)."""
    names = list(sizes)
    counts = _removal_counts([int(sizes[n]) for n in names], sparsity, scope)
    if scope == "global":
        return [(names, int(counts))]
    return [([n], int(c)) for n, c in zip(names, counts)]


def removed(masks: Mapping[str, torch.Tensor], names=None) -> int:
    """How many weights ``masks`` removes (among ``names``; default all)."""
    return sum(int((~masks[n]).sum()) for n in (masks if names is None else names))


def select_count(scores: Mapping[str, torch.Tensor], names: List[str], count: int, keep: Masks) -> Masks:
    """Masks for ``names`` that remove exactly ``count`` weights, one magnitude threshold over the group,
    weights removed by ``keep`` staying removed (through :func:`masks.select`)."""
    total = sum(scores[n].numel() for n in names)
    if count >= total:
        return {n: torch.zeros_like(keep[n]) for n in names}
    out = select({n: scores[n] for n in names}, count / total, "global", keep={n: keep[n] for n in names})
    got = removed(out, names)
    if got != count:  # cannot happen unless the float round trip count/total·total failed
        raise AssertionError(f"selection removed {got} weights, expected {count}")
    return out


def clone_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def rewind(model: nn.Module, state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Reset every parameter and buffer to ``state``, then zero the pruned weights: θ ← θ_rewind ⊙ M."""
    model.load_state_dict(state)
    apply_masks(model, masks)


def next_count(prev: int, target: int, size: int, rate: float) -> int:
    """Drop ``rate`` of the survivors (at least one weight), never past ``target``."""
    if prev >= target:
        return prev
    return min(target, prev + max(1, int(round(rate * (size - prev)))))


# --- IMP -------------------------------------------------------------------------------------------
@dataclass
class IMPConfig(MethodConfig):
    rate: float = MISSING  # fraction of the surviving weights removed per round
    rewind_epoch: int = MISSING  # 0: rewind to θ₀; k: to the weights after epoch k of the first round
    round: TrainRecipe = MISSING
    retrain: TrainRecipe = MISSING

class IMP(Method):
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019, arXiv 1803.03635, Strategy 1).

    θ₀ = a fresh student init. Each round: train (``round`` recipe) with the current mask, remove ``rate``
    of the surviving weights by |θ| (global threshold, or per tensor with ``prune.scope=layer``), rewind
    the survivors to θ₀ (``rewind_epoch=0``) or to the weights after epoch k of the first round
    (``rewind_epoch=k``, late rewinding as in Frankle et al. 2019, arXiv 1903.01611). Rounds repeat until
    exactly ``round(s·|P|)`` weights are removed (the last round is clipped). The rewound sparse net is
    then trained with the mask fixed (``retrain``). Every round's training and pruning cost goes into
    the ``imp`` stage; each round is logged as ``{"stage": "imp", "round", "sparsity", "seconds"}``.
    """

    name = "imp"
    granularities = ("weight", "channel")
    Config = IMPConfig

    def validate(self) -> None:
        c = self.cfg
        if not 0.0 < float(c.rate) < 1.0:
            raise ConfigError(f"method.rate must be in (0, 1), got {c.rate}")
        k = c.rewind_epoch
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ConfigError(f"method.rewind_epoch must be an integer >= 0, got {k!r}")
        r = recipe(c.round, "method.round")
        if k > r.epochs:
            raise ConfigError(f"method.rewind_epoch={k} is past the end of a round ({r.epochs} epochs)")
        recipe(c.retrain, "method.retrain")

    def round_spec(self, ctx) -> dict:
        """What determines a round of this job besides its index (not the target; :mod:`.rounds`)."""
        c = self.cfg
        return round_spec(ctx, "imp", c.round, "method.round", rate=float(c.rate),
                          rewind_epoch=int(c.rewind_epoch))

    def run(self, ctx):
        if ctx.pruner.granularity == "channel":
            return self.run_channels(ctx)
        from kdprune_cli.training.loop import steps_per_epoch  # here: train imports pruning
        c = self.cfg
        rate, k_rewind = float(c.rate), int(c.rewind_epoch)
        model = ctx.seeds.new_model("student", name="init")
        theta0 = clone_state(model)
        params = prunable_params(model, ctx.pruner.exclude)
        total = sum(p.numel() for p in params.values())
        groups = group_targets({n: p.numel() for n, p in params.items()}, ctx.pruner.sparsity, ctx.pruner.scope)
        masks = dense_masks(model, ctx.pruner.exclude)
        rewind_state = theta0 if k_rewind == 0 else None
        self.rewind_state = rewind_state
        spec = self.round_spec(ctx)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

        def check(state):  # a stored round must fit this model
            ms, rw = state["masks"], state.get("rewind", {})
            if set(ms) != set(masks) or any(tuple(ms[n].shape) != tuple(masks[n].shape) for n in ms):
                raise ValueError("masks of other parameters")
            if (k_rewind > 0) != bool(rw) or any(shapes.get(k) != tuple(v.shape) for k, v in rw.items()):
                raise ValueError("a rewind state of another model")

        def train_and_prune():
            """One round in this job: train with the mask, select by magnitude, rewind (θ ← θ_rewind ⊙ M)."""
            nonlocal masks, rewind_state
            hook = None
            if rewind_state is None:
                spe = steps_per_epoch(ctx.data, recipe(c.round, "method.round").batch_size, ctx.cfg.max_batches)
                snap_step = k_rewind * spe

                def hook(step, total_steps, model=model, snap_step=snap_step):
                    if step == snap_step:
                        self.rewind_state = clone_state(model)

            ctx.trainer.train(model, c.round, ctx.trainer.objective(), stage="imp", masks=masks, step_hook=hook)
            if rewind_state is None:
                if self.rewind_state is None:  # k = the round's last epoch: the weights after training
                    self.rewind_state = clone_state(model)
                rewind_state = self.rewind_state
            with ctx.costs.count(stage="imp"):
                scores = magnitudes(prunable_params(model, ctx.pruner.exclude))
                new: Masks = {}
                for names, k in groups:
                    size = sum(masks[n].numel() for n in names)
                    new.update(select_count(scores, names, next_count(removed(masks, names), k, size, rate), masks))
                masks = new
                rewind(model, rewind_state, masks)
            return {"masks": {n: m.cpu() for n, m in masks.items()},
                    "rewind": {k: v.cpu() for k, v in rewind_state.items()} if k_rewind > 0 else {}}

        r = 0
        while any(removed(masks, names) < k for names, k in groups):
            r += 1
            t = time.perf_counter()
            shareable = all(full_step(removed(masks, names), k, sum(masks[n].numel() for n in names), rate) is not None
                       for names, k in groups)
            cached = False
            if shareable:  # the same round for every target this far: a shared artifact
                state, cached = shared_round(ctx, "imp", spec, r, train_and_prune, trainings=1, check=check)
                if cached:
                    masks = {n: m.to(ctx.device) for n, m in state["masks"].items()}
                    if k_rewind > 0:
                        rewind_state = {k: v.to(ctx.device) for k, v in state["rewind"].items()}
                        self.rewind_state = rewind_state
                    rewind(model, rewind_state, masks)
            else:  # clipped to this job's target
                train_and_prune()
            ctx.log({"stage": "imp", "round": r, "sparsity": removed(masks) / total,
                     "seconds": time.perf_counter() - t, **({"cached": True} if cached else {})})
        self.rounds = r
        ctx.evaluator.record_metrics("pruned", model)
        ctx.trainer.train(model, c.retrain, ctx.trainer.objective(), stage="retrain", masks=masks)
        return Result(model, masks)

    def run_channels(self, ctx):
        """IMP over channel groups (docs/methods.md §7): round r removes channels until a fraction
        ``1 − (1 − rate)^r`` of the target unit is gone (the last round clipped to ``sparsity``), removed
        channels staying removed; rewinding as above; the masked channels are removed physically at the end.
        Rounds are not shared between targets at this granularity."""
        from kdprune_cli.training.loop import steps_per_epoch
        c = self.cfg
        rate, k_rewind = float(c.rate), int(c.rewind_epoch)
        model = ctx.seeds.new_model("student", name="init")
        theta0 = clone_state(model)
        cg = ctx.pruner.channel_groups(model)
        plan, r = None, 0
        masks = cg.masks([torch.zeros(0, dtype=torch.long)] * len(cg.groups))
        self.rewind_state = theta0 if k_rewind == 0 else None
        while True:
            r += 1
            t = time.perf_counter()
            snap = k_rewind * steps_per_epoch(ctx.data, recipe(c.round, "method.round").batch_size, ctx.cfg.max_batches)

            def hook(step, total_steps):
                if self.rewind_state is None and step == snap:
                    self.rewind_state = clone_state(model)
            ctx.trainer.train(model, c.round, ctx.trainer.objective(), stage="imp", masks=masks, step_hook=hook)
            if self.rewind_state is None:
                self.rewind_state = clone_state(model)
            with ctx.costs.count(stage="imp"):
                goal = min(ctx.pruner.sparsity, 1 - (1 - rate) ** r)
                scores = magnitudes(prunable_params(model, ctx.pruner.exclude))
                new = ctx.pruner.plan(cg, scores, goal, keep_removed=plan)
                if plan is not None and goal < ctx.pruner.sparsity and \
                        sum(map(len, new.removed)) == sum(map(len, plan.removed)):
                    goal = ctx.pruner.sparsity  # a round too small to remove a channel: go to the target
                    new = ctx.pruner.plan(cg, scores, goal, keep_removed=plan)
                plan = new
                masks.update(cg.masks(plan.removed))
                rewind(model, self.rewind_state, masks)
            ctx.log({"stage": "imp", "round": r, "sparsity": plan.facts["achieved"],
                     "seconds": time.perf_counter() - t})
            if goal >= ctx.pruner.sparsity:
                break
        self.rounds = r
        ctx.evaluator.record_metrics("pruned", model)
        ctx.trainer.train(model, c.retrain, ctx.trainer.objective(), stage="retrain", masks=masks)
        cg.remove(plan)
        return Result(model, {}, {"structure": plan.facts})
