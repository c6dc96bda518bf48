"""Shared rounds of the iterative methods (IMP, COLT; docs/methods.md §4 "Shared rounds").

Every full round of IMP or COLT removes a fixed ``rate`` of the survivors, whatever the target; only the
last round is clipped to the job's exact target. So the full rounds of a lower target are a prefix of those
of a higher one, and each full round is a content-addressed artifact of the store (``<store>/<method>_round/
<key>/``), keyed by everything that determines it (:func:`round_spec` plus the round index), never by the
target. A sweep over sparsities trains each round once per seed; only the clipped last round and the final
training are per target. Rounds are computed under the store's lock, so jobs running at once wait for each
other instead of training the same round twice.

Cost: a computed round is booked to the method's stage (``imp``, ``colt``) as before; reused rounds are
booked together to ``<stage>.reused`` (``cached: true``; ``artifact`` holds the rounds' indices and what
they cost when they were made). A reused round stands in for its trainings: the trainer's call counter is
advanced (``ctx.trainer.skip_trainings``), so later rounds draw the generator streams (named by the round:
the n-th training of a stage) and job checkpoints they would have had, and the numbers are bit-identical to
computing every round in the job.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from kdprune_cli.config.schema import model_kwargs


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


def full_step(prev: int, target: int, size: int, rate: float) -> Optional[int]:
    """The count after an unclipped round (``rate`` of the survivors, at least one weight), or None when
    this round is clipped for ``target`` (or the group is already there)."""
    if prev >= target:
        return None
    nxt = prev + max(1, int(round(rate * (size - prev))))
    return nxt if nxt <= target else None


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
    if cached and not usable(state):  # stored by a job for which this round was full; here it is clipped
        with ctx.costs.stage(stage) as st:
            st.seconds += overhead
            st.lock_wait_seconds += waited
        return make(), False
    with ctx.costs.stage(f"{stage}.reused" if cached else stage) as st:
        st.seconds += overhead
        st.lock_wait_seconds += waited
        if cached:
            st.cached = True
            art = st.artifact or {"rounds": [], "seconds": 0.0, "samples": 0, "teacher_samples": 0}
            cost = meta.get("cost") or {}
            art["rounds"].append(r)
            for key in ("seconds", "samples", "teacher_samples"):
                art[key] += cost.get(key, 0)
            st.artifact = art
            ctx.trainer.skip_trainings(stage, trainings)
    return state, cached
