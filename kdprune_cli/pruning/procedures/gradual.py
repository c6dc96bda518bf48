"""Gradual pruning while training, GMP's procedure (Zhu & Gupta 2017, arXiv 1710.01878, Eq. 1; docs/methods.md
§4): every Δt steps from t₀ to t₀ + nΔt a step hook removes the lowest-scored units so that the sparsity follows
``s_t = s_f + (s_i − s_f)(1 − (t − t₀)/(nΔt))³``, earlier removals kept, the last step exactly on the target."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from kdprune_cli.config.schema import ConfigError
from kdprune_cli.models.masks import Scores, apply_masks
from kdprune_cli.training.loop import steps_per_epoch


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
class Gradual:
    """What :func:`prune_gradually` did: the schedule ``(t₀, n, Δt, T)`` and every pruning step's log line."""

    schedule: tuple
    steps: list = field(default_factory=list)


def prune_gradually(ctx, model: nn.Module, node, stage: str, scores: Callable[[], Scores], s_i: float,
                    start: float, end: float, frequency: int):
    """Train ``model`` with the ``node`` recipe while pruning it on the cubic schedule from ``s_i`` to the
    target, by ``scores()`` at each pruning step. The ``pruned`` metrics are measured right after the final
    pruning step (their time is ``evaluate``'s). Returns ``(progress, Gradual)``: the selection, to retrain
    with and finish, and the schedule followed."""
    T = int(node.epochs) * steps_per_epoch(ctx.data, int(node.batch_size), ctx.cfg.max_batches)
    t0, n, dt = schedule(T, start, end, frequency)
    progress = ctx.pruner.progress(model)
    history = Gradual((t0, n, dt, T))

    def hook(step: int, total_steps: int) -> None:
        if step < t0 or (step - t0) % dt or (step - t0) // dt > n:
            return
        j = (step - t0) // dt
        s_t = cubic_sparsity(j, n, s_i, ctx.pruner.sparsity)
        progress.prune_to(scores(), None if j == n else s_t)
        apply_masks(model, progress.masks)  # this step's forward already runs on the pruned net
        line = {"stage": stage, "step": step, "round": j, "target_sparsity": s_t, **progress.log()}
        history.steps.append(line)
        ctx.log(line)
        if j == n:
            ctx.evaluator.record_metrics("pruned", model)  # its time is "evaluate"'s, not the stage's

    ctx.trainer.train(model, node, ctx.trainer.objective(), stage=stage, masks=progress.masks, step_hook=hook)
    if not progress.done:
        raise AssertionError(f"{stage} schedule ended at sparsity {progress.log()['sparsity']}, not the target")
    return progress, history
