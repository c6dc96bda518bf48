"""NutePrune's gated structures (docs/methods.md §5): what a CNN's and a ViT's gates share (the hooks that
multiply, the export's steps), and a CNN's gates on its coupled channel groups with the export that folds the
soft gates in and removes the closed channels."""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch
from torch import nn

from kdprune_cli.pruning.structure.channels import ChannelGroups, Plan


class Gates:
    """Gated structures: ``sizes`` (units per group), ``points`` where the gates multiply, as ``(module, group,
    index, pre)``: the module's output (``pre``: its input) channel ``j`` is gated by unit ``index[j]`` of the
    group (``index`` None: unit ``j``); ``z`` the gates, a tensor per group (``None``: the intact model). A
    subclass says how its structures count (``counts``, ``expected``, ``describe``), fold and are removed."""

    shape = (-1,)  # how a gate vector broadcasts over a gated tensor: channels last
    fixed: frozenset = frozenset()  # groups that stay whole (prune.exclude)

    def __init__(self, model: nn.Module, sizes: List[int], points: list):
        self.model, self.sizes, self.points = model, sizes, points
        self.z: Optional[List[torch.Tensor]] = None
        self.handles: list = []

    def gate(self, g: int) -> Optional[torch.Tensor]:
        return None if self.z is None or g in self.fixed else self.z[g]

    def attach(self) -> None:
        """Put the gates in; a module that a LoRA adapter wraps is gated at the wrapper's output (base +
        adapter), so call this once the adapters are in."""
        wrapped = {w.base_layer: w for w in self.model.modules() if isinstance(getattr(w, "base_layer", None), nn.Module)}
        device = next(self.model.parameters()).device
        for m, g, index, pre in self.points:  # the index on the model's device once, not copied every forward
            hook = self._hook(g, None if index is None else index.to(device), pre)
            m = wrapped.get(m, m)
            self.handles.append(m.register_forward_pre_hook(hook) if pre else m.register_forward_hook(hook))

    def _hook(self, g: int, index: Optional[torch.Tensor], pre: bool):
        def scale(t: torch.Tensor) -> torch.Tensor:
            z = self.gate(g)
            if z is None:
                return t
            return t * (z if index is None else z[index]).view(self.shape).to(t.device, t.dtype)
        if pre:
            return lambda m, inp: (scale(inp[0]),)
        return lambda m, inp, out: scale(out)

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def whole(self, values: List[torch.Tensor]) -> List[torch.Tensor]:
        """``values`` with the fixed groups' set to ones (their gates count as open)."""
        return [torch.ones_like(v) if g in self.fixed else v for g, v in enumerate(values)]

    @torch.no_grad()
    def export(self, z: List[torch.Tensor], sparsity: float = 0.0, target: str = "params",
               exclude: Iterable[str] = ()) -> dict:
        """Fold the soft gates ``z`` into the weights, then remove the units with z=0; returns the record's
        ``structure`` against ``sparsity``. Call after the hooks are removed (and the adapters merged)."""
        z = [v.detach().float().cpu() for v in self.whole(z)]
        removed = [torch.nonzero(v == 0).flatten() for v in z]
        facts = {**self.describe(removed, sparsity, target, exclude), "method": "nuteprune"}
        self.fold(z)
        self.remove(z, removed)
        return facts


def gate_points(model: nn.Module, groups: ChannelGroups) -> List[list]:
    """Per group, ``(module, index)`` pairs whose outputs the gates multiply; ``index[j]`` is the root channel
    of the module's output channel ``j``: every BatchNorm over the group's channels, and each producing conv
    whose output none of them normalises (pre-activation: it feeds an addition), so the stream itself is zero
    on a closed channel (docs/methods.md §5 item 1). Raises when a group's channels pass through no BatchNorm."""
    named = dict(model.named_modules())
    points = []
    for g in groups.groups:
        if not g.norms:
            raise ValueError(f"nuteprune gates BatchNorms; the channels of {groups.names[g.root]} pass through none "
                             "(BN-free layers are not supported)")
        pts = [(named[it.module], it.root[it.local.argsort()]) for it in g.norms]
        gated = {named[it.module] for it in g.norms}
        for it in g.items:
            conv = named[it.module]
            if it.kind == "out" and isinstance(conv, nn.Conv2d) and \
                    not gated & {n.module for n in groups.graph.module2node[conv].outputs}:
                pts.append((conv, it.root[it.local.argsort()]))
        points.append(pts)
    return points


class ConvGates(Gates):
    """A CNN's gated structures: the :class:`ChannelGroups` and their costs; each gated module's output (BN, or
    a conv feeding an addition) is multiplied by its group's gates; the export folds them into its weight rows
    and bias, then removes the closed channels through the dependency graph."""

    shape = (-1, 1, 1)  # over (channels, H, W)

    def __init__(self, model: nn.Module, groups: ChannelGroups):
        points = [(m, g, index, False) for g, pts in enumerate(gate_points(model, groups)) for m, index in pts]
        super().__init__(model, [g.channels for g in groups.groups], points)
        self.groups = groups
        self.counts, self.expected, self.describe = groups.counts, groups.expected, groups.describe

    def fold(self, z: List[torch.Tensor]) -> None:
        """A BatchNorm's ``z·(γx̂+β)``, a conv's output rows and bias."""
        for m, g, index, _ in self.points:
            scale = z[g][index].to(m.weight.device)
            m.weight.mul_(scale.view(-1, *[1] * (m.weight.dim() - 1)))
            if m.bias is not None:
                m.bias.mul_(scale)

    def remove(self, z: List[torch.Tensor], removed: List[torch.Tensor]) -> None:
        self.groups.remove(Plan(self.groups.groups, removed, {}))
