"""NutePrune's gates on a CNN's coupled channel groups (docs/methods.md §5): where they multiply, the hooks, and
the export that folds the soft gates in and removes the closed channels."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from kdprune_cli.pruning.structure.channels import ChannelGroups, Plan


def _index(it) -> torch.Tensor:
    index = torch.empty(len(it.local), dtype=torch.long)
    index[it.local] = it.root
    return index


def gate_points(model: nn.Module, groups: ChannelGroups, example: torch.Tensor) -> List[list]:
    """Per group, ``(module, index)`` pairs whose outputs the gates multiply; ``index[j]`` is the root channel
    of the module's output channel ``j``.

    Every BatchNorm over the group's channels is gated (after BN, before the activation): in a post-activation
    net those are the BNs right after the producing convs; in a pre-activation one (WRN) the BNs that read the
    residual stream. A producing conv whose output is not normalised by one of them (it feeds an addition,
    pre-activation) is gated as well, so the stream itself is zero on a closed channel. Raises when a group's
    channels pass through no BatchNorm."""
    produced, follows = {}, {}
    named = dict(model.named_modules())

    def conv_hook(m, i, o):
        produced[id(o)] = (m, o)  # the output kept alive: its id cannot be reused by a later tensor

    def bn_hook(m, i, o):
        if id(i[0]) in produced:
            follows[produced[id(i[0])][0]] = m
    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(bn_hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    points = []
    for g in groups.groups:
        if not g.norms:
            raise ValueError(f"nuteprune gates BatchNorms; the channels of {groups.names[g.root]} pass through none "
                             "(BN-free layers are not supported)")
        pts = [(named[it.module], _index(it)) for it in g.norms]
        gated = {named[it.module] for it in g.norms}
        for it in g.items:
            conv = named[it.module]
            if it.kind == "out" and isinstance(conv, nn.Conv2d) and follows.get(conv) not in gated:
                pts.append((conv, _index(it)))
        points.append(pts)
    return points


class ConvGates:
    """A CNN's gated structures: :class:`ChannelGroups` costs, forward hooks that multiply each gated module's
    output (BN, or a conv feeding an addition) by the gates ``z`` (``None``: open), the export by
    :func:`fold_and_remove`; the interface of :class:`~kdprune_cli.pruning.structure.vit.ViTGates`."""

    def __init__(self, model: nn.Module, groups: ChannelGroups, example: torch.Tensor):
        self.model, self.groups = model, groups
        self.points = gate_points(model, groups, example)
        self.sizes = [g.channels for g in groups.groups]
        self.counts, self.expected = groups.counts, groups.expected
        self.z: Optional[List[torch.Tensor]] = None
        self.handles: list = []

    def attach(self) -> None:
        """Put the gates in; a module that a LoRA adapter wraps is gated at the wrapper's output (base +
        adapter), so call this once the adapters are in."""
        wrapped = {w.base_layer: w for w in self.model.modules() if isinstance(getattr(w, "base_layer", None), nn.Module)}
        for g, pts in enumerate(self.points):
            for m, index in pts:  # the index on the module's device once, not copied there every forward
                index = index.to(next(m.parameters()).device)
                self.handles.append(wrapped.get(m, m).register_forward_hook(self._hook(g, index)))

    def _hook(self, g: int, index: torch.Tensor):
        def hook(m, i, o):
            return o if self.z is None else o * self.z[g][index].view(1, -1, 1, 1).to(o.dtype)
        return hook

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()

    def export(self, z: List[torch.Tensor], sparsity: float, target: str, exclude=()) -> dict:
        return fold_and_remove(self.model, self.groups, self.points, z, sparsity, target, exclude)


@torch.no_grad()
def fold_and_remove(model: nn.Module, groups: ChannelGroups, points: List[list], z: List[torch.Tensor],
                    sparsity: float = 0.0, target: str = "params", exclude=()) -> dict:
    """Fold the soft gates into the gated modules (a BatchNorm's ``z·(γx̂+β)``, a conv's output rows and bias),
    then remove the z=0 channels; returns the record's ``structure`` against ``sparsity``."""
    for g, pts in enumerate(points):
        for m, index in pts:
            scale = z[g][index].to(m.weight.device)
            m.weight.mul_(scale.view(-1, *[1] * (m.weight.dim() - 1)))
            if m.bias is not None:
                m.bias.mul_(scale)
    removed = [torch.nonzero(zg.cpu() == 0).flatten() for zg in z]
    facts = {**groups.describe(removed, sparsity, target, exclude), "method": "nuteprune"}
    groups.remove(Plan(groups.groups, removed, facts))
    return facts
