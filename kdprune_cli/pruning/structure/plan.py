"""A channel plan: which root channels of each coupled group go (:meth:`ChannelGroups.plan
<kdprune_cli.pruning.structure.channels.ChannelGroups.plan>`), found on one ranking of normalised importances
by bisection on the removed fraction, and the record's ``structure`` facts of a removal."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, List

import torch

NORMALIZE = ("mean", "max", "sum", "standarization", "none")


@dataclass
class Plan:
    """Which root channels of which group go, and the exact counts before and after."""
    groups: list  # the ChannelGroups' groups
    removed: List[torch.Tensor]  # per group: root channel indices to remove
    facts: dict


def normalize_importance(imp: torch.Tensor, how: str, present: torch.Tensor | None = None) -> torch.Tensor:
    """One group's importances on a common scale, Torch-Pruning's ``GroupMagnitudeImportance`` normalisers
    (docs/methods.md §7 item 2), their statistics from the channels ``present`` (default: all). Dividing by
    magnitudes keeps the order of negative scores (GraSP); a group whose scale is 0 gets all zeros."""
    if how not in NORMALIZE:
        raise ValueError(f"prune.normalize must be one of {', '.join(NORMALIZE)}, got {how!r}")
    v = imp if present is None else imp[present]
    if how == "none" or v.numel() == 0:
        return imp
    if how == "standarization":
        span = v.max() - v.min()
        return (imp - v.min()) / span if span > 0 else torch.zeros_like(imp)
    scale = {"mean": torch.mean, "max": torch.max, "sum": torch.sum}[how](v.abs())
    return imp / scale if scale > 0 else torch.zeros_like(imp)


def normalized(imp: List[torch.Tensor], normalize: str, keep_removed: List[torch.Tensor] | None = None):
    """``(imp, forced)``: importances normalised on the channels still there; those an earlier plan removed
    (``keep_removed``, ``forced`` per group) ranked first, so they go again."""
    gone = list(keep_removed or ())
    gone += [torch.zeros(0, dtype=torch.long)] * (len(imp) - len(gone))
    for g, r in enumerate(gone):
        present = torch.ones(len(imp[g]), dtype=torch.bool)
        present[r] = False
        imp[g] = normalize_importance(imp[g], normalize, present)  # on the channels still there
        imp[g][r] = -math.inf  # ranked first: they go again
    return imp, [len(r) for r in gone]


def removals(imp: List[torch.Tensor], forced: List[int], caps: List[int], round_to: int,
             scope: str) -> tuple[Callable[[int], list], int, int]:
    """``(removal, first, steps)``: ``removal(k)``, each group's lost root channels at step ``k`` (``global``: the
    k least important of all; ``layer``: k/steps of each), capped, rounded (``round_to``), at least ``forced``."""
    sizes = [len(v) for v in imp]

    def rounded(r: int, n: int, cap: int) -> int:
        kept = min(n, math.ceil((n - min(r, cap)) / round_to) * round_to)
        return n - kept

    if scope == "global":
        flat = torch.cat(imp)
        owner = torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)])
        ranked = owner[torch.sort(flat, stable=True).indices]  # the group of each channel, least first

        def removal(k: int) -> list:
            per = torch.bincount(ranked[:k], minlength=len(sizes)).tolist()
            return [max(f, rounded(r, n, c)) for r, n, c, f in zip(per, sizes, caps, forced)]
        return removal, sum(forced), len(ranked)
    if scope == "layer":
        steps = max(sizes)

        def removal(k: int) -> list:
            return [max(f, rounded(int(round(k / steps * n)), n, c)) for n, c, f in zip(sizes, caps, forced)]
        return removal, 0, steps
    raise ValueError(f"prune.scope must be 'global' or 'layer', got {scope!r}")


def closest_step(frac: Callable[[int], float], lo: int, hi: int, sparsity: float) -> tuple[int, float]:
    """``(k, tolerance)``: the step in ``[lo, hi]`` whose removed fraction ``frac(k)`` (growing with k) is closest
    to ``sparsity`` (a tie: the larger), found by bisection, and the fraction between the two steps around the
    target (no closer removal exists)."""
    while lo < hi:  # the smallest k with frac(k) >= sparsity
        mid = (lo + hi) // 2
        if frac(mid) >= sparsity:
            hi = mid
        else:
            lo = mid + 1
    above, below = frac(lo), (frac(lo - 1) if lo > 0 else None)
    k = lo if below is None or abs(above - sparsity) <= abs(below - sparsity) else lo - 1
    return k, 0.0 if below is None else max(0.0, above - below)


def structure_facts(counts, sizes: List[int], labels: List[str], removed: List[torch.Tensor], sparsity: float,
                    target: str, exclude: Iterable[str] = (), **options) -> dict:
    """The record's ``structure``: removing ``removed[g]`` of group ``g``'s ``sizes[g]`` units, with the exact
    costs ``counts(removed, exclude)`` (``{"params", "macs"}``), against ``sparsity`` of ``target``."""
    dense = counts([0] * len(sizes), exclude)
    after = counts(removed, exclude)
    achieved = 1.0 - after[target] / dense[target]
    return {"granularity": "channel", "target": target, **options, "requested": sparsity, "achieved": achieved,
            "off_target": achieved - sparsity,
            "params_removed": 1.0 - after["params"] / dense["params"],
            "macs_removed": 1.0 - after["macs"] / dense["macs"],
            "channels_removed": int(sum(len(r) for r in removed)), "channels": int(sum(sizes)), "groups": len(sizes),
            "widths": {lab: n - len(r) for lab, n, r in zip(labels, sizes, removed)}}
