"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune", arXiv 1710.01878, Eq. 1;
docs/methods.md §4).

While training, every Δt steps from t₀ to t₀ + nΔt, the smallest-magnitude weights are removed so that the
sparsity follows ``s_t = s_f + (s_i − s_f)(1 − (t − t₀)/(nΔt))³``; the last pruning step lands exactly on
``round(s_f·|P|)`` removed weights. Then optional fine-tuning with the mask fixed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import MISSING

from kdprune_cli.config.schema import ConfigError, MethodConfig, TrainRecipe, recipe
from kdprune_cli.pruning.methods.base import Method, Result
from kdprune_cli.pruning.methods.imp import group_targets, magnitudes, removed, select_count
from kdprune_cli.pruning.masks import Masks, apply_masks, dense_masks, prunable_params


def cubic_sparsity(j: int, n: int, s_i: float, s_f: float) -> float:
    """Eq. 1 at the j-th pruning step (t = t₀ + jΔt): ``s_f + (s_i − s_f)(1 − j/n)³``."""
    return s_f + (s_i - s_f) * (1.0 - j / n) ** 3


def schedule(total_steps: int, start: float, end: float, frequency: int) -> tuple[int, int, int]:
    """``(t₀, n, Δt)``: pruning steps t₀ + jΔt, j = 0..n, inside ``[start·T, end·T]`` and before step T.

    t₀ = round(start·T); n = ⌊(min(round(end·T), T−1) − t₀)/Δt⌋ (the trainer calls the hook before the
    optimizer steps 0..T−1, so the last pruning step must be at most T−1).
    """
    t0 = int(round(start * total_steps))
    last = min(int(round(end * total_steps)), total_steps - 1)
    n = (last - t0) // frequency
    if n < 1:
        raise ConfigError(f"GMP schedule has no room: {total_steps} training steps, start={start}, end={end}, "
                          f"frequency={frequency} leave fewer than 2 pruning steps; lower method.frequency "
                          f"or train longer")
    return t0, n, frequency


@dataclass
class GMPConfig(MethodConfig):
    start_from: str = MISSING  # dense | init
    initial_sparsity: float = MISSING
    start: float = MISSING  # t₀ as a fraction of the train steps
    end: float = MISSING
    frequency: int = MISSING  # Δt in optimizer steps
    train: TrainRecipe = MISSING
    retrain: TrainRecipe = MISSING

class GMP(Method):
    """Gradual magnitude pruning with the cubic schedule (Zhu & Gupta 2017, arXiv 1710.01878, Eq. 1).

    Starts from the trained dense student (``start_from: dense``) or a fresh init (``init``) and trains it
    with the ``train`` recipe; a step hook prunes at t₀ + jΔt (j = 0..n) to ``round(s_t·|P|)`` removed
    weights by |θ|, keeping earlier removals (``prune.scope=layer``: per tensor, ``min(k_l, round(s_t·n_l))``),
    and the j = n step lands exactly on the target. The loop re-masks after every optimizer step. Then
    ``retrain`` fine-tunes with the mask fixed (0 epochs = none).

    ``pruned`` metrics (our choice): measured inside the hook right after the final pruning step, i.e. the
    weights at the moment the mask first reaches the target, before the remaining steps of ``train`` and
    before ``retrain``. Their evaluation time is booked under ``evaluate``, not ``gmp``.
    """

    name = "gmp"
    Config = GMPConfig
    granularities = ("weight", "channel")  # channel: the schedule removes channel groups (docs/methods.md §7)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.trace = []  # (step, j, formula sparsity, measured sparsity) at every pruning step

    def validate(self) -> None:
        c = self.cfg
        if c.start_from not in ("dense", "init"):
            raise ConfigError(f"method.start_from must be dense or init, got {c.start_from!r}")
        if not 0.0 <= float(c.start) < float(c.end) <= 1.0:
            raise ConfigError(f"method.start and method.end must satisfy 0 <= start < end <= 1, got "
                              f"{c.start}, {c.end}")
        f = c.frequency
        if not isinstance(f, int) or isinstance(f, bool) or f < 1:
            raise ConfigError(f"method.frequency must be an integer >= 1 (steps), got {f!r}")
        if not 0.0 <= float(c.initial_sparsity) < 1.0:
            raise ConfigError(f"method.initial_sparsity must be in [0, 1), got {c.initial_sparsity}")
        recipe(c.train, "method.train")
        recipe(c.retrain, "method.retrain")

    def run(self, ctx):
        c = self.cfg
        s_f, s_i = ctx.pruner.sparsity, float(c.initial_sparsity)
        if s_i > s_f:
            raise ConfigError(f"method.initial_sparsity={s_i} is above the target sparsity {s_f}")
        model = ctx.artifacts.dense_student() if c.start_from == "dense" else ctx.seeds.new_model("student", name="init")
        from kdprune_cli.training.loop import steps_per_epoch  # here: train imports pruning
        r = recipe(c.train, "method.train")
        T = int(r.epochs) * steps_per_epoch(ctx.data, r.batch_size, ctx.cfg.max_batches)
        t0, n, dt = schedule(T, float(c.start), float(c.end), int(c.frequency))
        params = prunable_params(model, ctx.pruner.exclude)
        total = sum(p.numel() for p in params.values())
        groups = group_targets({k: p.numel() for k, p in params.items()}, s_f, ctx.pruner.scope)
        masks: Masks = dense_masks(model, ctx.pruner.exclude)
        self.schedule = (t0, n, dt, T)
        self.trace = []
        channel = ctx.pruner.granularity == "channel"
        if channel:
            cg = ctx.pruner.channel_groups(model)
            masks = cg.masks([torch.zeros(0, dtype=torch.long)] * len(cg.groups))
            plan = None

        def hook(step: int, total_steps: int) -> None:
            nonlocal plan
            if step < t0 or (step - t0) % dt or (step - t0) // dt > n:
                return
            j = (step - t0) // dt
            s_t = cubic_sparsity(j, n, s_i, s_f)
            scores = magnitudes(params)
            if channel:  # the same cubic schedule over channel groups; removed channels stay removed
                plan = ctx.pruner.plan(cg, scores, s_f if j == n else s_t, keep_removed=plan)
                masks.update(cg.masks(plan.removed))
            for names, k in ([] if channel else groups):
                size = sum(masks[x].numel() for x in names)
                want = k if j == n else min(k, int(round(s_t * size)))
                masks.update(select_count(scores, names, max(want, removed(masks, names)), masks))
            apply_masks(model, masks)  # this step's forward already runs on the pruned net
            sp = plan.facts["achieved"] if channel else removed(masks) / total
            self.trace.append((step, j, s_t, sp))
            ctx.log({"stage": "gmp", "step": step, "round": j, "target_sparsity": s_t, "sparsity": sp})
            if j == n:
                ctx.evaluator.record_metrics("pruned", model)  # its time is "evaluate"'s, not "gmp"'s

        ctx.trainer.train(model, c.train, ctx.trainer.objective(), stage="gmp", masks=masks, step_hook=hook)
        got = removed(masks)
        if not channel and got != sum(k for _, k in groups):
            raise AssertionError(f"GMP schedule ended with {got} weights removed, expected the target")
        ctx.trainer.train(model, c.retrain, ctx.trainer.objective(), stage="retrain", masks=masks)
        if channel:  # the masked channels are removed physically: the same model, smaller
            cg.remove(plan)
            return Result(model, {}, {"structure": plan.facts})
        return Result(model, masks)

