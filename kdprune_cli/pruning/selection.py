"""Selection: scores → what is removed. The one place that knows ``prune.granularity``: weight granularity keeps
the top scores (masks), channel granularity plans and removes coupled channel groups under the ``prune.*`` caps."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from kdprune_cli.config.schema import ConfigError
from kdprune_cli.data import DeviceData
from kdprune_cli.pruning.methods.base import Result
from kdprune_cli.pruning.masks import Scores, apply_masks, select
from kdprune_cli.pruning.structure.channels import ChannelGroups, Plan


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

    def example_input(self) -> torch.Tensor:
        """One all-zero input of the dataset's shape on the device (to trace a model's channel groups)."""
        d = self.data
        return torch.zeros(1, d.channels, d.image_size, d.image_size, device=self.device)

    def channel_groups(self, model: nn.Module) -> ChannelGroups:
        """The coupled channel groups of ``model`` (traced on :meth:`example_input`, in the model's dtype)."""
        return ChannelGroups(model, self.example_input().to(next(model.parameters()).dtype), self.exclude)

    def plan(self, groups: ChannelGroups, scores: Scores, sparsity: Optional[float] = None,
             keep_removed: Optional[Plan] = None) -> Plan:
        """The channels to remove to ``sparsity`` (default: the target) with the configured ``prune.*``
        options; the channels ``keep_removed`` (an earlier plan) removed stay removed."""
        p = self.cfg.prune
        return groups.plan(scores, self.sparsity if sparsity is None else sparsity, scope=self.scope,
                           target=p.target, reduce=p.reduce, normalize=p.normalize, exclude=self.exclude,
                           keep_removed=keep_removed.removed if keep_removed is not None else None,
                           **channel_caps(self.cfg))

    def removable(self, groups: ChannelGroups) -> list[int]:
        """The most channels each group may lose under the configured caps."""
        return groups.removable(**channel_caps(self.cfg))

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
