"""Selection: scores → what is removed. The one place that knows ``prune.granularity``: weight granularity keeps
the top scores (masks), channel granularity plans and removes coupled channel groups under the ``prune.*`` caps.

One-shot methods call :meth:`Pruner.prune`. Methods that prune in rounds or steps hold a progress
(:meth:`Pruner.progress`: :class:`WeightProgress` or :class:`ChannelProgress`): what earlier rounds removed,
the masks to train with meanwhile, and the moves that remove more (``round``, ``common_round``, ``prune_to``,
``select``) at either granularity; ``finish`` makes the model carry the selection (zeroed weights, or channels
removed physically)."""
from __future__ import annotations

from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig
from torch import nn

from kdprune_cli.config.schema import ConfigError
from kdprune_cli.data import DeviceData
from kdprune_cli.models.masks import Masks, Scores, apply_masks, dense_masks, prunable_modules, removal_groups, select
from kdprune_cli.pruning.methods.base import Result
from kdprune_cli.pruning.structure.channels import ChannelGroups, Plan

Groups = List[Tuple[List[str], int]]


def channel_caps(cfg: DictConfig) -> dict:
    """The per-group limits of a channel plan (:meth:`ChannelGroups.removable`'s arguments) from ``prune.*``."""
    p = cfg.prune
    return {"max_group_ratio": float(p.max_group_ratio), "min_channels": int(p.min_channels),
            "round_to": int(p.round_to)}


def check_reachable(cfg: DictConfig, groups: Callable[[], ChannelGroups]) -> None:
    """Refuse a ``sparsity`` that the channel caps cannot reach on the student (``groups()``: its channel
    groups); raises ValueError."""
    p = cfg.prune
    most = groups().reachable(p.target, p.exclude, **channel_caps(cfg))
    if cfg.sparsity > most + 1e-9:
        what = "prunable weights" if p.target == "params" else "Conv2d/Linear MACs"
        raise ValueError(f"sparsity={cfg.sparsity} cannot be reached: with prune.max_group_ratio={p.max_group_ratio}, "
                         f"prune.min_channels={p.min_channels} and prune.round_to={p.round_to}, at most {most:.4f} of "
                         f"{cfg.student.name}'s {what} can be removed; lower sparsity or loosen the caps")


class Pruner:
    """The one selection: ``prune()`` to ``sparsity`` by ``prune.scope``, ``prune.exclude``, ``prune.granularity``."""

    def __init__(self, cfg: DictConfig, data: DeviceData, device: torch.device):
        self.cfg, self.data, self.device = cfg, data, device

    sparsity = property(lambda self: float(self.cfg.sparsity))
    scope = property(lambda self: self.cfg.prune.scope)
    exclude = property(lambda self: list(self.cfg.prune.exclude))
    granularity = property(lambda self: self.cfg.prune.granularity)
    target = property(lambda self: self.cfg.prune.target)  # what sparsity counts: params | macs

    def example_input(self) -> torch.Tensor:
        """One all-zero input of the dataset's shape on the device (to trace a model's channel groups)."""
        d = self.data
        return torch.zeros(1, d.channels, d.image_size, d.image_size, device=self.device)

    def channel_groups(self, model: nn.Module) -> ChannelGroups:
        """The coupled channel groups of ``model`` (traced on :meth:`example_input`, in the model's dtype)."""
        return ChannelGroups(model, self.example_input().to(next(model.parameters()).dtype), self.exclude)

    def plan(self, groups: ChannelGroups, scores: Scores, sparsity: Optional[float] = None,
             keep_removed: Optional[List[torch.Tensor]] = None) -> Plan:
        """The channels to remove to ``sparsity`` (default: the target) with the configured ``prune.*``
        options; the channels ``keep_removed`` (an earlier plan's ``removed``) stay removed."""
        p = self.cfg.prune
        return groups.plan(scores, self.sparsity if sparsity is None else sparsity, scope=self.scope,
                           target=p.target, reduce=p.reduce, normalize=p.normalize, exclude=self.exclude,
                           keep_removed=keep_removed, **channel_caps(self.cfg))

    def prune(self, model: nn.Module, scores: Scores) -> Result:
        """Prune ``model`` by ``scores`` (higher = keep) to ``sparsity``: weight granularity keeps the top
        scores and zeroes the rest (masks); channel granularity removes the least important coupled channel
        groups physically (no masks; ``facts["structure"]`` says what was removed and how close the target is)."""
        if self.granularity == "weight":
            masks = select(scores, self.sparsity, self.scope)
            apply_masks(model, masks)
            return Result(model, masks)
        groups = self.channel_groups(model)
        plan = self.plan(groups, scores)
        groups.remove(plan)
        return Result(model, {}, {"structure": plan.facts})

    def progress(self, model: nn.Module, members: Sequence[nn.Module] = (), convs_only: bool = False):
        """The selection of ``model`` across rounds or steps, nothing removed yet. ``members``: models of the
        same architecture trained and scored instead of ``model`` (COLT's partition models; they may differ in
        the classifier's outputs), a unit surviving only if every one keeps it. ``convs_only``: at weight
        granularity only Conv2d weights are pruned (the target still counts every prunable weight)."""
        if self.granularity == "weight":
            return WeightProgress(self, model, members, convs_only)
        return ChannelProgress(self, model, members)


def check_round_to(cfg: DictConfig, groups: Callable[[], ChannelGroups]) -> None:
    """``prune.round_to`` must leave some channel removable: below the widest channel group of the student
    (``groups()``: its channel groups)."""
    r = int(cfg.prune.round_to)
    if cfg.prune.granularity != "channel" or r <= 1:
        return
    widest = max(g.channels for g in groups().groups)
    if r >= widest:
        raise ConfigError(f"prune.round_to={r} leaves no channel removable: the widest channel group of "
                          f"{cfg.student.name} has {widest} channels (set prune.round_to below {widest})")


# --- exact counts per scope group (weight granularity) -------------------------------------------------------
def weight_targets(model: nn.Module, exclude: List[str], sparsity: float, scope: str,
                   convs_only: bool = False) -> tuple[dict, int, Groups]:
    """The prunable weight counts of ``model`` by tensor (``exclude`` left out; only the Conv2d ones with
    ``convs_only``), the count of every prunable weight |P|, and the scope groups with their exact removal
    counts: ``round(sparsity·|P|)`` in all, spread over the Conv2d weights alone with ``convs_only``."""
    mods = prunable_modules(model, exclude)
    total = sum(m.weight.numel() for m in mods.values())
    sizes = {f"{n}.weight": m.weight.numel() for n, m in mods.items() if not convs_only or isinstance(m, nn.Conv2d)}
    k, part = int(round(sparsity * total)), sum(sizes.values())
    share = sparsity if not convs_only else (k / part if part else 0.0)
    return sizes, total, removal_groups(sizes, share, scope)


def removed(masks: Mapping[str, torch.Tensor], names=None) -> int:
    """How many weights ``masks`` removes (among ``names``; default all)."""
    return sum(int((~masks[n]).sum()) for n in (masks if names is None else names))


def select_count(scores: Mapping[str, torch.Tensor], names: List[str], count: int, keep: Masks) -> Masks:
    """Masks for ``names`` that remove exactly ``count`` weights, one threshold over the group, weights
    removed by ``keep`` staying removed (through :func:`masks.select`)."""
    total = sum(scores[n].numel() for n in names)
    if count >= total:
        return {n: torch.zeros_like(keep[n]) for n in names}
    out = select({n: scores[n] for n in names}, count / total, "global", keep={n: keep[n] for n in names})
    got = removed(out, names)
    if got != count:  # cannot happen unless the float round trip count/total·total failed
        raise AssertionError(f"selection removed {got} weights, expected {count}")
    return out


def round_count(prev: int, size: int, k: int, rate: float) -> tuple[int, bool]:
    """The count removed after the next round toward ``k`` (``prev`` removed of ``size``) and whether that round
    is full: ``rate`` of the survivors, not clipped to ``k`` (a done group's round is not full)."""
    if prev >= k:
        return prev, False
    nxt = prev + max(1, int(round(rate * (size - prev))))  # unclipped: rate of the survivors more, at least one
    return min(k, nxt), nxt <= k


def intersect(masks_list: List[Masks], names: List[str]) -> Masks:
    """A weight survives only if every mask keeps it."""
    return {n: torch.stack([m[n] for m in masks_list]).all(0) for n in names}


def intersect_exact(scores_list: List[Scores], names: List[str], keep: Masks, need: int):
    """Per-model masks whose intersection removes exactly ``need`` weights of the group (the clipped round).

    Every model removes the same number ``prev + c`` of its lowest-scored survivors; ``c`` is the largest
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


def select_common(scores_list: List[Scores], names: List[str], count: int, cap: int, keep: Masks):
    """Each model removes ``count`` weights of the group by its own scores (``keep``'s removals staying);
    a weight survives only if every model keeps it. Where that intersection removes more than ``cap``, the
    per-model counts are lowered so that it removes exactly ``cap``. Returns ``(per-model masks,
    intersection, clipped)``."""
    ms = [select_count(s, names, count, keep) for s in scores_list]
    inter = intersect(ms, names)
    if removed(inter, names) > cap:
        return (*intersect_exact(scores_list, names, keep, cap), True)
    return ms, inter, False


class WeightProgress:
    """Masks across rounds: exactly ``round(s·|P|)`` weights removed at the end, per scope group."""

    def __init__(self, pruner: Pruner, model: nn.Module, members: Sequence[nn.Module], convs_only: bool):
        self.pruner, self.model = pruner, model
        sizes, self.total, self.groups = weight_targets(model, pruner.exclude, pruner.sparsity, pruner.scope,
                                                        convs_only)
        k = int(round(pruner.sparsity * self.total))
        self.part = sum(sizes.values()) if convs_only else None
        if convs_only and k and k >= self.part:
            raise ConfigError(f"{pruner.cfg.method.name.upper()} prunes only Conv2d weights, but sparsity "
                              f"{pruner.sparsity} must remove {k} of |P|={self.total} weights and the prunable "
                              f"convolutions hold only {self.part}; lower the sparsity or put the linear layers "
                              "in prune.exclude")
        assert not convs_only or sum(g for _, g in self.groups) == k
        self.masks: Masks = {n: torch.ones_like(model.get_parameter(n), dtype=torch.bool) for n in sizes}
        self.steps = 0  # the members train and prune with the same masks

    @property
    def done(self) -> bool:
        return all(removed(self.masks, names) >= k for names, k in self.groups)

    def log(self) -> dict:
        """The sparsity reached, for the round's log line (and of the convolutions alone, with ``convs_only``)."""
        r = removed(self.masks)
        return {"sparsity": r / self.total, **({"conv_sparsity": r / max(self.part, 1)} if self.part is not None else {})}

    def masks_for(self, i: int) -> Masks:
        """The masks member ``i`` (or the model) trains with."""
        return self.masks

    def full_round(self, rate: float) -> bool:
        """Whether the next round removes ``rate`` of the survivors everywhere (not clipped to this target):
        the same round for every target this far."""
        return all(self._next(names, k, rate)[1] for names, k in self.groups)

    def _next(self, names: List[str], k: int, rate: float) -> tuple[int, bool]:
        """The group's :func:`round_count` for the next round."""
        return round_count(removed(self.masks, names), sum(self.masks[n].numel() for n in names), k, rate)

    def round(self, scores: Scores, rate: float) -> bool:
        """Remove ``rate`` of the surviving weights of each group by ``scores`` (at least one; the last round
        clipped to the target); returns whether the round was full."""
        return self.common_round([scores], rate)

    def common_round(self, scores_list: List[Scores], rate: float) -> bool:
        """A round of several models: each removes ``rate`` of the survivors by its own scores, a weight
        survives only if every model keeps it; a round whose intersection passes the target lands exactly on
        it. Returns whether the round was full (unclipped)."""
        full, new = True, {}
        for names, k in self.groups:
            count, unclipped = self._next(names, k, rate)
            _, inter, clipped = select_common(scores_list, names, count, k, self.masks)
            full &= unclipped and not clipped
            new.update(inter)
        self.masks.update(new)
        self.steps += 1
        return full

    def prune_to(self, scores: Scores, sparsity: Optional[float] = None) -> None:
        """Remove weights by ``scores`` until each group has lost ``round(sparsity·size)`` (never more than its
        target, never fewer than it already lost); ``None``: exactly the target."""
        for names, k in self.groups:
            size = sum(self.masks[x].numel() for x in names)
            want = k if sparsity is None else min(k, int(round(sparsity * size)))
            self.masks.update(select_count(scores, names, max(want, removed(self.masks, names)), self.masks))
        self.steps += 1

    def select(self, scores: Scores, sparsity: float) -> None:
        """One-shot selection to ``sparsity`` by ``prune.scope`` with the earlier removals kept."""
        self.masks.update(select(scores, sparsity, self.pruner.scope, keep=self.masks if self.steps else None))
        self.steps += 1

    def state(self) -> dict:
        return {"masks": {n: m.cpu() for n, m in self.masks.items()}}

    def check(self, state: dict) -> None:
        """A stored round must fit this model."""
        ms = state["masks"]
        if set(ms) != set(self.masks) or any(tuple(ms[n].shape) != tuple(self.masks[n].shape) for n in ms):
            raise ValueError("masks of other parameters")

    def usable(self, state: dict) -> bool:
        """A stored round is this job's round when it passes no group's target."""
        return all(removed(state["masks"], names) <= k for names, k in self.groups)

    def load(self, state: dict) -> None:
        self.masks.update({n: m.to(self.masks[n].device) for n, m in state["masks"].items()})

    def final_masks(self) -> Masks:
        """Masks of every prunable weight of the model."""
        return {**dense_masks(self.model, self.pruner.exclude), **self.masks}

    def finish(self, model: nn.Module) -> Result:
        """Zero the removed weights of ``model`` (the model, or one of its architecture)."""
        masks = self.final_masks()
        apply_masks(model, masks)
        return Result(model, masks)


class ChannelProgress:
    """Channel groups across rounds: round ``r`` plans to ``1 − (1 − rate)^r`` of the target unit (the last
    round to ``sparsity``), removed channels staying removed; the masks zero what will be removed."""

    def __init__(self, pruner: Pruner, model: nn.Module, members: Sequence[nn.Module]):
        self.pruner, self.model = pruner, model
        self.groups = pruner.channel_groups(model)
        self.member_groups = [pruner.channel_groups(m) for m in members]  # the head's outputs may differ
        if any([g.channels for g in x.groups] != [g.channels for g in self.groups.groups] for x in self.member_groups):
            raise ValueError("models pruned together have other channel groups than the model")
        self.removed = [torch.zeros(0, dtype=torch.long) for _ in self.groups.groups]
        self.facts: dict = {}
        self.masks = self.groups.masks(self.removed)
        self.rounds, self.done = 0, False

    def log(self) -> dict:
        return {"sparsity": self.facts["achieved"]}

    def masks_for(self, i: int) -> Masks:
        return self.member_groups[i].masks(self.removed) if self.member_groups else self.masks

    def full_round(self, rate: float) -> bool:
        return False  # rounds of channel groups are not shared between targets

    def _take(self, plan: Plan) -> None:
        self.removed, self.facts = plan.removed, plan.facts
        self.masks.update(self.groups.masks(plan.removed))

    def round(self, scores: Scores, rate: float) -> bool:
        """A round over channel groups by ``scores``; a round too small to remove a channel goes to the target."""
        p, s = self.pruner, self.pruner.sparsity
        self.rounds += 1
        goal = min(s, 1 - (1 - rate) ** self.rounds)
        new = p.plan(self.groups, scores, goal, keep_removed=self.removed)
        if self.rounds > 1 and goal < s and sum(map(len, new.removed)) == sum(map(len, self.removed)):
            goal = s
            new = p.plan(self.groups, scores, goal, keep_removed=self.removed)
        self._take(new)
        self.done = goal >= s
        return False

    def common_round(self, scores_list: List[Scores], rate: float) -> bool:
        """A round of several models: each plans its channels (removed ones staying removed), a channel
        survives only if every model keeps it; a round whose union would pass a group's cap or ``sparsity`` is
        planned once on the models' summed scores (to the round's goal, or to ``sparsity``)."""
        p, s, c = self.pruner, self.pruner.sparsity, self.pruner.cfg.prune
        self.rounds += 1
        goal, gone = min(s, 1 - (1 - rate) ** self.rounds), self.removed
        plans = [p.plan(x, sc, goal, keep_removed=gone) for x, sc in zip(self.member_groups, scores_list)]
        union = [torch.unique(torch.cat([pl.removed[g] for pl in plans])) for g in range(len(self.groups.groups))]
        common = {n: sum(sc[n] for sc in scores_list) for n in scores_list[0]
                  if all(sc[n].shape == scores_list[0][n].shape for sc in scores_list)}
        if any(len(u) > most for u, most in zip(union, self.groups.removable(**channel_caps(p.cfg)))):
            union = p.plan(self.groups, common, goal, keep_removed=gone).removed  # past a group's cap
        if goal >= s or self.groups.describe(union, s, c.target, p.exclude)["achieved"] > s:
            union = p.plan(self.groups, common, s, keep_removed=gone).removed  # clipped to the target
        facts = self.groups.describe(union, s, c.target, p.exclude, scope=p.scope, reduce=c.reduce,
                                     normalize=c.normalize, **channel_caps(p.cfg))
        self._take(Plan(self.groups.groups, union, facts))
        self.done = goal >= s or facts["achieved"] >= s
        return False

    def prune_to(self, scores: Scores, sparsity: Optional[float] = None) -> None:
        """Plan to ``sparsity`` (``None``: the target) with the earlier removals kept."""
        self._take(self.pruner.plan(self.groups, scores, sparsity, keep_removed=self.removed))
        self.done = sparsity is None

    select = prune_to  # a re-plan to ``sparsity``, the earlier removals kept

    def final_masks(self) -> Masks:
        return self.groups.masks(self.removed)

    def finish(self, model: nn.Module) -> Result:
        """Remove the planned channels from ``model`` (the model, or one of its architecture) physically."""
        groups = self.groups if model is self.model else self.pruner.channel_groups(model)
        groups.remove(Plan(groups.groups, self.removed, self.facts))
        return Result(model, {}, {"structure": self.facts})

