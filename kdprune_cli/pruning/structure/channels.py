"""Channel granularity (docs/methods.md §7): whole coupled channel groups, physically removed.

Torch-Pruning's dependency graph (``torch_pruning.DependencyGraph``) finds the coupled channels (§7 item 1);
each root channel's importance reduces the method's per-weight scores over the weights it owns, normalised per
group (item 2); channels go in ascending importance under the per-group caps until the removed fraction of
``prune.target`` is closest to ``sparsity``, the counts exact from the kept widths (item 3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping

import torch
from torch import nn

from kdprune_cli.models.matmuls import MatmulCounter
from kdprune_cli.pruning.structure.plan import Plan, closest_step, normalized, removals, structure_facts

TARGETS = ("params", "macs")
REDUCE = ("mean", "sum")
_LAYERS = (nn.Conv2d, nn.Linear)


@dataclass
class _Item:
    """One Conv2d/Linear weight in a group: which dimension the group's channels index there."""
    module: str
    kind: str  # "out" (weight rows) | "in" (weight columns)
    local: torch.Tensor  # local index of each entry
    root: torch.Tensor  # the group's root channel each entry belongs to


@dataclass
class _Group:
    root: nn.Module
    channels: int
    items: List[_Item] = field(default_factory=list)
    norms: List[_Item] = field(default_factory=list)  # the BatchNorms over the group's channels (kind "bn")


def layer_outputs(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, Dict[str, int]]:
    """One forward: the Conv2d/Linear whose output is the model's output (the classifier), and the output
    positions per sample of every Conv2d/Linear (H·W, or tokens)."""
    outs, tokens, hooks = {}, {}, []
    for n, m in model.named_modules():
        if isinstance(m, _LAYERS):
            dim = 1 if isinstance(m, nn.Conv2d) else -1

            def hook(m, i, o, n=n, dim=dim):
                outs[id(o)] = (m, o)  # the output kept alive: its id cannot be reused by a later tensor
                tokens[n] = o.numel() // (o.shape[0] * o.shape[dim])
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            y = model(example)
    finally:
        for h in hooks:
            h.remove()
    if id(y) not in outs:
        raise ValueError("channel granularity needs a model whose output comes straight from a Linear or Conv2d")
    return outs[id(y)][0], tokens


def _never_pruned(model: nn.Module, head: nn.Module, exclude: Iterable[str]) -> list:
    """Modules whose output channels stay: the classifier, ``prune.exclude``, and for timm ViTs the patch
    embedding (hence the embedding width shared by every block) and q/k/v (the attention heads)."""
    named = dict(model.named_modules())
    keep = [head] + [named[e] for e in exclude]
    for m in model.modules():
        if hasattr(m, "qkv") and isinstance(m.qkv, nn.Linear):
            keep.append(m.qkv)
        if type(m).__name__ == "PatchEmbed" and isinstance(getattr(m, "proj", None), nn.Conv2d):
            keep.append(m.proj)
    return keep


def layer_costs(layers: Dict[str, nn.Module], tokens: Dict[str, int], rows, columns, exclude: Iterable[str], zero,
                products=0) -> dict:
    """Prunable weights and MACs per sample with every Conv2d/Linear ``n`` of ``layers`` at ``rows(n, full)``
    output and ``columns(n, full)`` input channels of its ``full`` ones (a grouped Conv2d: its rows alone) over its
    ``tokens[n]`` output positions, from ``zero`` (0, or 0.0) plus the ``products`` between activations."""
    exclude = set(exclude)
    params, macs = zero, zero + products
    for n, m in layers.items():
        k, out, cols = m.weight[0, 0].numel(), rows(n, m.weight.shape[0]), columns(n, m.weight.shape[1])
        size = out * k if isinstance(m, nn.Conv2d) and m.groups > 1 else out * cols * k
        if n not in exclude:
            params = params + size
        macs = macs + size * tokens[n]
    return {"params": params, "macs": macs}


class ChannelGroups:
    """The coupled channel groups of ``model`` (traced once with ``example``) and their exact costs."""

    def __init__(self, model: nn.Module, example: torch.Tensor, exclude: Iterable[str] = ()):
        import torch_pruning as tp

        was_training = model.training
        model.eval()
        example = example.to(next(model.parameters()).device)
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        with MatmulCounter() as products:
            self.head, self.tokens = layer_outputs(model, example)
        # attention's products between activations, per sample: fixed, as q/k/v are never removed
        self.products = products.macs // example.shape[0]
        unwrapped = [(p, p.dim() - 1) for n, p in model.named_parameters()
                     if n.split(".")[-1] in ("cls_token", "pos_embed", "dist_token", "reg_token")]
        self.graph = tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                                           unwrapped_parameters=unwrapped or None)
        model.train(was_training)
        ignored = _never_pruned(model, self.head, exclude)
        self.groups: List[_Group] = []
        for g in self.graph.get_all_groups(ignored_layers=ignored, root_module_types=_LAYERS):
            group = _Group(root=g[0].dep.target.module, channels=len(g[0].idxs))
            seen = set()
            for i, (dep, idxs) in enumerate(g):
                m = dep.target.module
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m, "bn") not in seen:
                    seen.add((m, "bn"))
                    group.norms.append(_Item(self.names[m], "bn", torch.as_tensor(list(idxs), dtype=torch.long),
                                             torch.as_tensor(list(g[i].root_idxs), dtype=torch.long)))
                if not isinstance(m, _LAYERS):
                    continue
                kind = "out" if self.graph.is_out_channel_pruning_fn(dep.handler) else "in"
                if kind == "in" and isinstance(m, nn.Conv2d) and m.groups > 1:
                    kind = "out"  # depthwise: input and output channels are one, counted once as rows
                if (m, kind) in seen:
                    continue
                seen.add((m, kind))
                group.items.append(_Item(self.names[m], kind, torch.as_tensor(list(idxs), dtype=torch.long),
                                         torch.as_tensor(list(g[i].root_idxs), dtype=torch.long)))
            self.groups.append(group)
        if not self.groups:
            raise ValueError("channel granularity found no channel group to remove in this model")
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, _LAYERS)}

    # --- importance ---------------------------------------------------------------------------------
    def importance(self, scores: Mapping[str, torch.Tensor], reduce: str = "mean") -> List[torch.Tensor]:
        """Per group, per root channel: the mean (or sum) of the scores of the weights the channel owns
        (not normalised: :meth:`plan` puts the groups on one scale with :func:`normalize_importance`).

        Scores are accumulated in float64 (SynFlow-sized scores keep their order); weights without a
        score (``prune.exclude``d modules) do not contribute."""
        if reduce not in REDUCE:
            raise ValueError(f"prune.reduce must be one of {', '.join(REDUCE)}, got {reduce!r}")
        out = []
        for g in self.groups:
            total = torch.zeros(g.channels, dtype=torch.float64)
            count = torch.zeros(g.channels, dtype=torch.float64)
            for it in g.items:
                s = scores.get(f"{it.module}.weight")
                if s is None:
                    continue
                s = s.detach().to("cpu", torch.float64)
                per = s.flatten(1) if it.kind == "out" else s.transpose(0, 1).flatten(1)
                picked = per[it.local]
                total.index_add_(0, it.root, picked.sum(1))
                count.index_add_(0, it.root, torch.full((len(it.local),), float(picked.shape[1]), dtype=torch.float64))
            bad = int((~torch.isfinite(total)).sum())
            if bad:
                raise ValueError(f"channel importance of the group rooted at {self.names[g.root]} has {bad} "
                                 "non-finite values")
            out.append(total if reduce == "sum" else total / count.clamp(min=1))
        return out

    # --- exact counts -------------------------------------------------------------------------------
    def counts(self, removed: List[int] | List[torch.Tensor], exclude: Iterable[str] = ()) -> dict:
        """Prunable weights and MACs (per sample: Conv2d/Linear, plus the fixed attention products) after
        removing, from each group, its ``removed[g]`` root channels (a count: the lowest-ranked ones in
        ``self.order``; or indices)."""
        gone_out: Dict[str, set] = {}
        gone_in: Dict[str, set] = {}
        for gi, (g, r) in enumerate(zip(self.groups, removed)):
            if not torch.is_tensor(r) and r == 0:
                continue
            roots = r if torch.is_tensor(r) else self.order[gi][:r]
            sel = torch.zeros(g.channels, dtype=torch.bool)
            sel[roots] = True
            for it in g.items:
                target = gone_out if it.kind == "out" else gone_in
                target.setdefault(it.module, set()).update(it.local[sel[it.root]].tolist())
        return layer_costs(self.layers, self.tokens, lambda n, full: full - len(gone_out.get(n, ())),
                           lambda n, full: full - len(gone_in.get(n, ())), exclude, 0, self.products)

    def expected(self, probs: List[torch.Tensor], exclude: Iterable[str] = ()) -> dict:
        """Expected prunable weights and MACs when root channel ``c`` of group ``g`` is kept with probability
        ``probs[g][c]`` (groups independent): per layer ``E[out]·E[in]·k``; differentiable in ``probs``."""
        e_out: Dict[str, torch.Tensor] = {}
        e_in: Dict[str, torch.Tensor] = {}
        for g, p in zip(self.groups, probs):
            for it in g.items:
                (e_out if it.kind == "out" else e_in)[it.module] = p[it.root.to(p.device)].sum()
        return layer_costs(self.layers, self.tokens, e_out.get, e_in.get, exclude, 0.0, self.products)

    # --- selection ----------------------------------------------------------------------------------
    def removable(self, max_group_ratio: float = 0.9, min_channels: int = 4, round_to: int = 1) -> List[int]:
        """The most root channels each group may lose: at most ``max_group_ratio`` of them, keeping at least
        ``min_channels`` (all of a group that has no more) and at least one, the kept width a multiple of
        ``round_to`` (or the whole group)."""
        out = []
        for g in self.groups:
            n = g.channels
            keep = max(min(int(min_channels), n), n - math.floor(max_group_ratio * n + 1e-9), 1)
            out.append(n - min(n, math.ceil(keep / round_to) * round_to))
        return out

    def reachable(self, target: str = "params", exclude: Iterable[str] = (), **caps) -> float:
        """The largest removed fraction of ``target`` the caps (:meth:`removable`) allow."""
        dense = self.counts([0] * len(self.groups), exclude)[target]
        most = [torch.arange(r) for r in self.removable(**caps)]
        return 1.0 - self.counts(most, exclude)[target] / dense

    def plan(self, scores: Mapping[str, torch.Tensor], sparsity: float, *, scope: str = "global",
             target: str = "params", reduce: str = "mean", normalize: str = "mean", max_group_ratio: float = 0.9,
             min_channels: int = 4, round_to: int = 1, exclude: Iterable[str] = (),
             keep_removed: List[torch.Tensor] | None = None) -> Plan:
        """The channels to remove so that the removed fraction of ``target`` is closest to ``sparsity``
        within the per-group caps (:meth:`removable`); ``keep_removed`` (an earlier plan's ``removed``) stay
        removed (iterative methods). ``facts["reachable"]`` is the most the caps allow."""
        if target not in TARGETS:
            raise ValueError(f"prune.target must be one of {', '.join(TARGETS)}, got {target!r}")
        imp, forced = normalized(self.importance(scores, reduce), normalize, keep_removed)
        self.order = [torch.sort(v, stable=True).indices for v in imp]  # ascending: first = least important
        dense = self.counts([0] * len(self.groups), exclude)
        caps = self.removable(max_group_ratio, min_channels, round_to)
        removal, first, steps = removals(imp, forced, caps, round_to, scope)

        def frac(k: int) -> float:
            return 1.0 - self.counts(removal(k), exclude)[target] / dense[target]

        k, tolerance = closest_step(frac, first, steps, sparsity)
        removed = [o[:r] for o, r in zip(self.order, removal(k))]
        facts = self.describe(removed, sparsity, target, exclude, scope=scope, reduce=reduce, normalize=normalize,
                              max_group_ratio=max_group_ratio, min_channels=min_channels, round_to=round_to,
                              tolerance=tolerance)
        facts["reachable"] = frac(steps)  # every group at its cap
        return Plan(self.groups, removed, facts)

    def describe(self, removed: List[torch.Tensor], sparsity: float, target: str, exclude: Iterable[str] = (),
                 **options) -> dict:
        """The record's ``structure`` for removing ``removed`` (root channels per group) against ``sparsity``."""
        return structure_facts(self.counts, [g.channels for g in self.groups],
                               [self.names[g.root] for g in self.groups], removed, sparsity, target, exclude, **options)

    def masks(self, removed: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Weight masks (``True`` = keep) of every Conv2d/Linear that zero the rows and columns the removed
        root channels own: the masked model computes what the physically smaller one will."""
        out = {f"{n}.weight": torch.ones_like(m.weight, dtype=torch.bool) for n, m in self.layers.items()}
        for g, r in zip(self.groups, removed):
            sel = torch.zeros(g.channels, dtype=torch.bool)
            sel[r] = True
            for it in g.items:
                idx = it.local[sel[it.root]].to(out[f"{it.module}.weight"].device)
                if it.kind == "out":
                    out[f"{it.module}.weight"][idx] = False
                else:
                    out[f"{it.module}.weight"][:, idx] = False
        return out

    def remove(self, plan: Plan) -> nn.Module:
        """Physically remove the planned channels (in place) through the dependency graph."""
        for g, roots in zip(plan.groups, plan.removed):
            if len(roots):
                fn = self.graph.get_pruner_of_module(g.root).prune_out_channels
                self.graph.get_pruning_group(g.root, fn, sorted(roots.tolist())).prune()
        return self.model
