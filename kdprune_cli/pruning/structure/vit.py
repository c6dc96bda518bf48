"""The prunable structures of a timm Vision Transformer for NutePrune (arXiv 2402.09773; the mapping, after
CoFi, is described in docs/methods.md §5): the hidden width shared by every block, each block's attention heads and
MLP channels; their exact and expected sizes and MACs, the gates' hooks (LayerNorms over the kept width only) and
the export that folds the soft gates in and slices the closed structures out.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdprune_cli.models.matmuls import MatmulCounter
from kdprune_cli.pruning.structure.channels import layer_costs, layer_outputs, structure_facts
from kdprune_cli.pruning.structure.conv_gates import Gates

HIDDEN = 0  # the width's group; then a group of heads per block, then one of MLP channels per block
TOKENS = ("cls_token", "reg_token", "pos_embed")  # the embedding's parameters over the width


def is_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "blocks") and \
        any(hasattr(m, "qkv") for m in model.modules())


def check_vit(model: nn.Module) -> None:
    """Raise ``ValueError`` (one line) unless ``model`` is a plain timm ViT (pre-norm blocks, fused qkv,
    class-token or average pooling)."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"nuteprune for ViTs supports plain timm VisionTransformers; this one has {what}")
    pe = getattr(model.patch_embed, "proj", None)
    need(isinstance(pe, nn.Conv2d), "no Conv2d patch embedding")
    need(isinstance(getattr(model.patch_embed, "norm", nn.Identity()), nn.Identity), "a patch-embedding norm")
    need(isinstance(getattr(model, "norm_pre", None), nn.Identity), "a pre-norm (norm_pre)")
    need(getattr(model, "attn_pool", None) is None, "attention pooling")
    need(isinstance(getattr(model, "head", None), nn.Linear), "no Linear head")
    for b in model.blocks:
        need(type(b).__name__ == "Block", f"a {type(b).__name__} block")
        a, m = b.attn, b.mlp
        need(isinstance(getattr(a, "qkv", None), nn.Linear) and isinstance(getattr(a, "proj", None), nn.Linear),
             "no fused qkv")
        need(getattr(a, "gate", None) is None and isinstance(getattr(a, "norm", nn.Identity()), nn.Identity),
             "a gated or normalised attention output")
        need(isinstance(getattr(m, "fc1", None), nn.Linear) and isinstance(getattr(m, "fc2", None), nn.Linear)
             and isinstance(getattr(m, "norm", nn.Identity()), nn.Identity), "a gated or normalised MLP")
        need(isinstance(b.norm1, nn.LayerNorm) and isinstance(b.norm2, nn.LayerNorm), "no LayerNorms")


def _slice_param(owner: nn.Module, name: str, keep: torch.Tensor, dim: int = -1) -> None:
    p = getattr(owner, name, None)
    if p is not None:
        setattr(owner, name, nn.Parameter(p.data.index_select(dim, keep), requires_grad=p.requires_grad))


class ViTGates(Gates):
    """The gated structures of a timm ViT: sizes, exact and expected costs, the gating hooks and the export."""

    def __init__(self, model: nn.Module, example: torch.Tensor, exclude: Iterable[str] = ()):
        check_vit(model)
        self.blocks = list(model.blocks)
        n = len(self.blocks)
        self.width = model.patch_embed.proj.out_channels
        names = {m: k for k, m in model.named_modules()}
        sizes = [self.width] + [b.attn.num_heads for b in self.blocks] + [b.mlp.fc1.out_features for b in self.blocks]
        self.labels = ["hidden"] + [f"{names[b.attn]}.heads" for b in self.blocks] + \
            [f"{names[b.mlp]}.channels" for b in self.blocks]
        was = model.training
        with MatmulCounter() as products:
            _, self.tokens = layer_outputs(model.eval(), example.to(next(model.parameters()).device))
        model.train(was)
        # attention's Q·Kᵀ and A·V per kept head of each block: 2·N²·d_head MACs (N tokens)
        self.attention = [(1 + b, 2 * self.tokens[names[blk.attn.qkv]] ** 2 * blk.attn.head_dim)
                          for b, blk in enumerate(self.blocks)]
        if sum(per * sizes[g] for g, per in self.attention) != products.macs // example.shape[0]:
            raise ValueError("nuteprune for ViTs supports plain timm VisionTransformers; this one has products "
                             "between activations other than its blocks' self-attention")
        self.layers = {k: m for k, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}

        def units(g: int, per: int = 1, copies: int = 1) -> tuple:
            """``(g, index)``: ``index[j]`` is the unit of group ``g`` that owns row (column) ``j`` of a layer."""
            return g, torch.arange(sizes[g]).repeat_interleave(per).repeat(copies)
        # per layer: the units of its outputs and of its inputs, None = fixed; qkv's rows are q, k, v of every head
        io = {names[model.patch_embed.proj]: (units(HIDDEN), None), names[model.head]: (None, units(HIDDEN))}
        points = [(model.norm_pre, HIDDEN, None, False)]  # the embedding
        for b, blk in enumerate(self.blocks):
            d, heads, mlp = blk.attn.head_dim, 1 + b, 1 + n + b
            io[names[blk.attn.qkv]] = (units(heads, d, 3), units(HIDDEN))
            io[names[blk.attn.proj]] = (units(HIDDEN), units(heads, d))
            io[names[blk.mlp.fc1]] = (units(mlp), units(HIDDEN))
            io[names[blk.mlp.fc2]] = (units(HIDDEN), units(mlp))
            points += [(blk.attn.proj, heads, units(heads, d)[1], True), (blk.attn.proj, HIDDEN, None, False),
                       (blk.mlp.fc2, mlp, None, True), (blk.mlp.fc2, HIDDEN, None, False)]
        other = [k for k in self.layers if k not in io]
        if other:
            raise ValueError(f"nuteprune for ViTs supports plain timm VisionTransformers; this one has {other[0]}")
        self.io = io
        # prune.exclude: the structures an excluded layer produces stay whole
        self.fixed = {io[e][0][0] for e in exclude if e in io and io[e][0] is not None}
        self.norms = [m for m in model.modules()
                      if isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (self.width,)]
        super().__init__(model, sizes, points)

    def attach(self) -> None:
        """Put the gating hooks in, and the LayerNorms over the kept width."""
        super().attach()
        self.handles += [m.register_forward_hook(self._norm) for m in self.norms]

    def _set_z(self, value: Optional[List[torch.Tensor]]) -> None:
        """Set the gates; the kept width dims (None: all) are found once here, not in every LayerNorm."""
        self._z = value
        h = self.gate(HIDDEN)
        keep = None if h is None else torch.nonzero(h != 0).flatten()
        self._keep = None if keep is None or len(keep) == self.width else keep

    z = property(lambda self: self._z, _set_z)

    def _norm(self, m: nn.LayerNorm, inp, out):
        """LayerNorm over the kept dims only (0 elsewhere)."""
        if self._keep is None:
            return out
        keep = self._keep.to(out.device)
        x = inp[0].index_select(-1, keep)
        w = m.weight.index_select(0, keep) if m.weight is not None else None
        b = m.bias.index_select(0, keep) if m.bias is not None else None
        y = F.layer_norm(x, (len(keep),), w, b, m.eps)
        return y.new_zeros(*y.shape[:-1], self.width).index_copy(-1, keep, y)

    # --- costs ----------------------------------------------------------------------------------------
    def _total(self, units: list, exclude: Iterable[str]) -> dict:
        def kept(spec, full: int):
            return full if spec is None else units[spec[0]] * (len(spec[1]) // self.sizes[spec[0]])
        costs = layer_costs(self.layers, self.tokens, lambda k, full: kept(self.io[k][0], full),
                            lambda k, full: kept(self.io[k][1], full), exclude, 0)
        for g, per_head in self.attention:
            costs["macs"] = costs["macs"] + units[g] * per_head
        return costs

    def counts(self, removed: list, exclude: Iterable[str] = ()) -> dict:
        """Prunable weights and MACs per sample (Conv2d/Linear and attention's products) after removing, per
        group, ``removed[g]`` units (indices, or a count)."""
        return self._total([n - (len(r) if torch.is_tensor(r) else int(r)) for n, r in zip(self.sizes, removed)],
                           exclude)

    def expected(self, probs: List[torch.Tensor], exclude: Iterable[str] = ()) -> dict:
        """The same with the expected kept units ``Σ P(z>0)`` per group; differentiable in ``probs``."""
        return self._total([p.sum() for p in self.whole(probs)], exclude)

    def describe(self, removed: List[torch.Tensor], sparsity: float, target: str,
                 exclude: Iterable[str] = ()) -> dict:
        return structure_facts(self.counts, self.sizes, self.labels, removed, sparsity, target, exclude)

    # --- export ---------------------------------------------------------------------------------------
    def fold(self, z: List[torch.Tensor]) -> None:
        """Multiply the soft gates into the weights they gate: the width into every writer of the residual
        stream (the tokens, the patch embedding's, ``proj``'s and ``fc2``'s rows), the heads and MLP channels
        into ``proj``'s and ``fc2``'s columns."""
        h = z[HIDDEN]
        for p in (getattr(self.model, name, None) for name in TOKENS):
            if p is not None:
                p.mul_(h.to(p.device, p.dtype))
        for k, m in self.layers.items():
            out, inp = self.io[k]
            if out is None or out[0] != HIDDEN:
                continue
            w = m.weight
            scale = h.to(w.device, w.dtype).view(-1, *[1] * (w.dim() - 1))
            if inp is not None and inp[0] != HIDDEN:
                scale = scale * z[inp[0]][inp[1]].to(w.device, w.dtype)[None]
            w.mul_(scale)
            if m.bias is not None:
                m.bias.mul_(h.to(m.bias.device, m.bias.dtype))

    def remove(self, z: List[torch.Tensor], removed: List[torch.Tensor]) -> None:
        """Slice the closed units out: every layer's rows and columns by the units that own them, the width out
        of the tokens, LayerNorms and LayerScales."""
        model = self.model
        dev = next(model.parameters()).device
        for k, m in self.layers.items():
            out, inp = self.io[k]
            if out is not None:
                rows = torch.nonzero(z[out[0]][out[1]] != 0).flatten().to(dev)
                _slice_param(m, "weight", rows, 0)
                _slice_param(m, "bias", rows, 0)
                setattr(m, "out_channels" if isinstance(m, nn.Conv2d) else "out_features", len(rows))
            if inp is not None:
                cols = torch.nonzero(z[inp[0]][inp[1]] != 0).flatten().to(dev)
                _slice_param(m, "weight", cols, 1)
                m.in_features = len(cols)
        keep = torch.nonzero(z[HIDDEN] != 0).flatten().to(dev)
        over_width = [(model, TOKENS)] + [(ln, ("weight", "bias")) for ln in self.norms] + \
            [(ls, ("gamma",)) for blk in self.blocks for ls in (blk.ls1, blk.ls2)]
        for owner, params in over_width:
            for name in params:
                _slice_param(owner, name, keep)
        for ln in self.norms:
            ln.normalized_shape = (len(keep),)
        for blk in self.blocks:
            a = blk.attn
            a.num_heads = a.qkv.out_features // (3 * a.head_dim)
            a.attn_dim = a.num_heads * a.head_dim
        for attr in ("embed_dim", "num_features", "head_hidden_size"):
            if hasattr(model, attr):
                setattr(model, attr, len(keep))
