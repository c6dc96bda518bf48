"""Rounds: the loop of the iterative methods (IMP, COLT). A method gives a round kernel (train, score, remove
through its :meth:`~kdprune_cli.pruning.selection.Pruner.progress`, rewind); :func:`run_rounds` repeats it until
the target is reached, logs every round and shares full rounds as content-addressed artifacts of the store,
keyed by :func:`round_spec` and the round index, never by the target (docs/methods.md §4 "Shared rounds": why
full rounds are a prefix of every target's, how reused rounds are booked and stay bit-identical). Rounds are
computed under the store's lock, so jobs running at once wait for each other instead of training one round twice.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Mapping, Optional

import torch
from torch import nn

from kdprune_cli.config.schema import model_kwargs
from kdprune_cli.models.masks import apply_masks


def round_spec(ctx, method: str, recipe_node, where: str, **extra) -> dict:
    """What determines a round besides its index: data, student architecture, the seed (θ₀ and the
    training streams come from it), the round recipe, scope, exclusions and the method's own options
    (``extra``: rate, rewinding, partitions). bf16 autocast changes the numbers, so it is part of the key
    where it is in effect (CUDA with ``amp``). Not the target sparsity."""
    amp = bool(ctx.cfg.get("amp", False)) and ctx.device.type == "cuda"
    return {"method": method, "data": ctx.artifacts.data_spec(), "student": ctx.cfg.student.name,
            **({"student_kwargs": model_kwargs(ctx.cfg.student)} if model_kwargs(ctx.cfg.student) else {}), "seed": ctx.seeds.seed,
            "recipe": ctx.artifacts.recipe_spec(recipe_node, where), "scope": ctx.pruner.scope, "exclude": ctx.pruner.exclude,
            "amp": amp, **extra}


def clone_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def rewind(model: nn.Module, state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Reset every parameter and buffer to ``state``, then zero the pruned weights: θ ← θ_rewind ⊙ M."""
    model.load_state_dict(state)
    apply_masks(model, masks)


def run_rounds(ctx, stage: str, progress, kernel: Callable[[], Optional[dict]], spec: dict, rate: float,
               trainings: int, restore: Callable[[dict], None],
               check: Callable[[dict], None] = lambda state: None) -> list[dict]:
    """Run ``kernel`` (one round in this job: it returns the state to store, or None when the round was
    clipped) until ``progress`` reaches the target. A round that removes ``rate`` of the survivors for
    every target this far (``progress.full_round``) goes through the store (:func:`shared_round`); a stored
    one is loaded into ``progress`` and handed to ``restore`` (rewind the models). Each round is logged as
    ``{"stage", "round", "sparsity", "seconds"}`` (+ ``cached``); returns those lines."""
    history, r = [], 0

    def fits(state):
        progress.check(state)
        check(state)

    while not progress.done:
        r += 1
        t = time.perf_counter()
        cached = False
        if progress.full_round(rate):  # the same round for every target this far: a shared artifact
            state, cached = shared_round(ctx, stage, spec, r, kernel, trainings, check=fits, usable=progress.usable)
            if cached:
                progress.load(state)
                restore(state)
        else:  # clipped to this job's target
            kernel()
        line = {"stage": stage, "round": r, **progress.log(), "seconds": time.perf_counter() - t,
                **({"cached": True} if cached else {})}
        ctx.log(line)
        history.append(line)
    return history


def shared_round(ctx, stage: str, spec: dict, r: int, make: Callable[[], Optional[dict]], trainings: int,
                 check: Optional[Callable[[dict], None]] = None,
                 usable: Callable[[dict], bool] = lambda state: True) -> tuple[Optional[dict], bool]:
    """Round ``r`` of ``stage`` through the store: ``(state, cached)``.

    ``make()`` computes the round in this job (its trainings and scoring book themselves to ``stage``) and
    returns the state to store (tensors only), or None when the round turned out clipped (then nothing is
    stored). A stored round is loaded instead when ``usable(state)``; then ``trainings`` trainings of
    ``stage`` are counted as done and the round is booked to ``<stage>.reused``. ``(None, False)`` means
    ``make()`` ran and returned None. With ``store.enabled=false`` every round is made, nothing is shared.
    """
    made: dict = {}

    def create():
        before = ctx.costs.stages.get(stage)
        s0 = (before.samples, before.teacher_samples) if before is not None else (0, 0)
        t0 = time.perf_counter()
        state = make()
        after = ctx.costs.stages.get(stage)
        s1 = (after.samples, after.teacher_samples) if after is not None else (0, 0)
        made["seconds"] = time.perf_counter() - t0
        cost = {"seconds": made["seconds"], "samples": s1[0] - s0[0], "teacher_samples": s1[1] - s0[1]}
        return state, {"cost": cost, "round": r}

    t = time.perf_counter()
    state, meta, cached = ctx.artifacts.store.get_or_create(f"{stage}_round", {**spec, "round": r}, create,
                                                  enabled=ctx.cfg.store.enabled, check=check)
    waited = ctx.artifacts.store.waited
    overhead = time.perf_counter() - t - waited - made.get("seconds", 0.0)  # locking, loading, saving
    reused = cached and usable(state)  # not usable: stored by a job for which this round was full, clipped here
    with ctx.costs.stage(f"{stage}.reused" if reused else stage) as st:
        st.seconds += overhead
        st.lock_wait_seconds += waited
        if reused:
            st.cached = True
            art = st.artifact or {"rounds": [], "seconds": 0.0, "samples": 0, "teacher_samples": 0}
            cost = meta.get("cost") or {}
            art["rounds"].append(r)
            for key in ("seconds", "samples", "teacher_samples"):
                art[key] += cost.get(key, 0)
            st.artifact = art
            ctx.trainer.skip_trainings(stage, trainings)
    if cached and not reused:
        return make(), False
    return state, cached
