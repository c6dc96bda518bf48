"""The prunable structures of a timm Vision Transformer, for NutePrune (docs/methods.md §5; our vision mapping,
after CoFi's head / MLP / hidden masks with a LayerNorm over the kept dims).

Three kinds of structure, one gate vector each (group 0, then one per block for heads, then one per block for
MLP channels):

- **hidden width** (one vector of ``D`` gates shared by every block): multiplies the embedding (after the
  patch embedding, the class / register tokens and the position embedding) and the output of every residual
  branch (``attn.proj``, ``mlp.fc2``), so the residual stream is ``z ⊙ r``; every LayerNorm over the width
  (``norm1``, ``norm2``, the final ``norm`` / ``fc_norm``) is computed over the dims whose gate is non-zero
  only, and gives 0 on the others (LayerNorm subtracts a mean, so zeroed dims would otherwise shift it);
- **attention heads** of each block: multiply the attention output, per head, before ``proj``;
- **MLP channels** of each block: multiply ``fc2``'s input (after ``fc1`` and the activation).

Sizes come from the layers' real shapes: per kept head ``3·d_head·D'`` (q, k, v rows) + ``d_head·D'``
(``proj`` columns) = ``4·d_head·D'``, per kept MLP channel ``2·D'``, plus the patch embedding and the
classifier, ``D'`` being the kept width. MACs are each layer's size times the tokens ``N`` it sees, plus
attention's ``Q·Kᵀ`` and ``A·V``: ``2·N²·d_head`` per kept head, whatever the width (what
:func:`~kdprune_cli.training.evaluate.count_flops` and ``torch.utils.flop_counter`` count). The same products with
expected kept counts give the expected size and MACs (groups independent). The export folds the soft gates
into the weights (patch embedding rows, tokens, ``proj`` and ``fc2`` rows for the width, ``proj`` / ``fc2``
columns for heads / channels) and slices the removed heads, channels and width out of every layer, so the
exported model computes what the gated one did.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdprune_cli.models.matmuls import MatmulCounter
from kdprune_cli.pruning.structure.channels import layer_outputs, structure_facts

HIDDEN = 0
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


def _slice_linear(m: nn.Linear, rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None) -> None:
    if rows is not None:
        _slice_param(m, "weight", rows, 0)
        _slice_param(m, "bias", rows, 0)
        m.out_features = len(rows)
    if cols is not None:
        _slice_param(m, "weight", cols, 1)
        m.in_features = len(cols)


def _slice_param(owner: nn.Module, name: str, keep: torch.Tensor, dim: int = -1) -> None:
    p = getattr(owner, name, None)
    if p is not None:
        setattr(owner, name, nn.Parameter(p.data.index_select(dim, keep).clone(), requires_grad=p.requires_grad))


class ViTGates:
    """The gated structures of a timm ViT: sizes, exact and expected costs, the gating hooks (``z``: a list
    of one tensor per group, or ``None`` for the intact model) and the export."""

    def __init__(self, model: nn.Module, example: torch.Tensor, exclude: Iterable[str] = ()):
        check_vit(model)
        self.model = model
        self.blocks = list(model.blocks)
        n = len(self.blocks)
        self.width = model.patch_embed.proj.out_channels
        names = {m: k for k, m in model.named_modules()}
        self.sizes = [self.width] + [b.attn.num_heads for b in self.blocks] + \
            [b.mlp.fc1.out_features for b in self.blocks]
        self.labels = ["hidden"] + [f"{names[b.attn]}.heads" for b in self.blocks] + \
            [f"{names[b.mlp]}.channels" for b in self.blocks]
        was = model.training
        with MatmulCounter() as products:
            _, self.tokens = layer_outputs(model.eval(), example.to(next(model.parameters()).device))
        model.train(was)
        # attention's Q·Kᵀ and A·V per kept head of each block: 2·N²·d_head MACs (N tokens)
        self.attention = [(1 + b, 2 * self.tokens[names[blk.attn.qkv]] ** 2 * blk.attn.head_dim)
                          for b, blk in enumerate(self.blocks)]
        if sum(per * self.sizes[g] for g, per in self.attention) != products.macs // example.shape[0]:
            raise ValueError("nuteprune for ViTs supports plain timm VisionTransformers; this one has products "
                             "between activations other than its blocks' self-attention")
        self.layers = {k: m for k, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        # per layer: (group, channels per unit) of its outputs and of its inputs, None = fixed
        io = {names[model.patch_embed.proj]: ((HIDDEN, 1), None), names[model.head]: (None, (HIDDEN, 1))}
        for b, blk in enumerate(self.blocks):
            d, heads, mlp = blk.attn.head_dim, 1 + b, 1 + n + b
            io[names[blk.attn.qkv]] = ((heads, 3 * d), (HIDDEN, 1))
            io[names[blk.attn.proj]] = ((HIDDEN, 1), (heads, d))
            io[names[blk.mlp.fc1]] = ((mlp, 1), (HIDDEN, 1))
            io[names[blk.mlp.fc2]] = ((HIDDEN, 1), (mlp, 1))
        other = [k for k in self.layers if k not in io]
        if other:
            raise ValueError(f"nuteprune for ViTs supports plain timm VisionTransformers; this one has {other[0]}")
        self.io = io
        # prune.exclude: the structures an excluded layer produces stay whole
        self.fixed = {io[e][0][0] for e in exclude if e in io and io[e][0] is not None}
        self.z = None  # the gates (a list per group), None: the intact model
        self.norms = [m for m in model.modules()
                      if isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (self.width,)]
        self.handles: list = []

    def attach(self) -> None:
        """Put the gating hooks in (after the adapters: none of the gated layers carries one)."""
        model, n = self.model, len(self.blocks)
        self.handles = [model.norm_pre.register_forward_hook(self._hidden)]
        for b, blk in enumerate(self.blocks):
            self.handles += [blk.attn.proj.register_forward_pre_hook(self._units(1 + b, blk.attn.head_dim)),
                             blk.attn.proj.register_forward_hook(self._hidden),
                             blk.mlp.fc2.register_forward_pre_hook(self._units(1 + n + b, 1)),
                             blk.mlp.fc2.register_forward_hook(self._hidden)]
        self.handles += [m.register_forward_hook(self._norm) for m in self.norms]

    # --- gates -----------------------------------------------------------------------------------------
    def _set_z(self, value: Optional[List[torch.Tensor]]) -> None:
        """Set the gates; the kept width dims (None: all) are found once here, not in every LayerNorm."""
        self._z = value
        h = self.gate(HIDDEN)
        keep = None if h is None else torch.nonzero(h != 0).flatten()
        self._keep = None if keep is None or len(keep) == self.width else keep

    z = property(lambda self: self._z, _set_z)

    def gate(self, g: int) -> Optional[torch.Tensor]:
        return None if self._z is None or g in self.fixed else self._z[g]

    def _hidden(self, m, inp, out):
        z = self.gate(HIDDEN)
        return out if z is None else out * z.to(out.device, out.dtype)

    def _units(self, g: int, per: int):
        def hook(m, inp):
            z = self.gate(g)
            if z is None:
                return None
            return (inp[0] * z.to(inp[0].device, inp[0].dtype).repeat_interleave(per),)
        return hook

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

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _whole(self, values: List[torch.Tensor], full) -> list:
        return [full(v) if g in self.fixed else v for g, v in enumerate(values)]

    # --- costs ----------------------------------------------------------------------------------------
    def _total(self, units: list, exclude: Iterable[str]) -> dict:
        exclude = set(exclude)
        params = macs = 0
        for k, m in self.layers.items():
            o_spec, i_spec = self.io[k]
            o = units[o_spec[0]] * o_spec[1] if o_spec else m.weight.shape[0]
            i = units[i_spec[0]] * i_spec[1] if i_spec else m.weight.shape[1]
            size = o * i * m.weight[0, 0].numel()
            if k not in exclude:
                params = params + size
            macs = macs + size * self.tokens[k]
        for g, per_head in self.attention:
            macs = macs + units[g] * per_head
        return {"params": params, "macs": macs}

    def counts(self, removed: list, exclude: Iterable[str] = ()) -> dict:
        """Prunable weights and MACs per sample (Conv2d/Linear and attention's products) after removing, per
        group, ``removed[g]`` units (indices, or a count)."""
        return self._total([n - (len(r) if torch.is_tensor(r) else int(r)) for n, r in zip(self.sizes, removed)],
                           exclude)

    def expected(self, probs: List[torch.Tensor], exclude: Iterable[str] = ()) -> dict:
        """The same with the expected kept units ``Σ P(z>0)`` per group; differentiable in ``probs``."""
        return self._total([p.sum() for p in self._whole(probs, torch.ones_like)], exclude)

    def describe(self, removed: List[torch.Tensor], sparsity: float, target: str,
                 exclude: Iterable[str] = ()) -> dict:
        return structure_facts(self.counts, self.sizes, self.labels, removed, sparsity, target, exclude)

    # --- export ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def export(self, z: List[torch.Tensor], sparsity: float = 0.0, target: str = "params",
               exclude: Iterable[str] = ()) -> dict:
        """Fold the soft gates ``z`` into the weights, then slice out the units with z=0; returns the
        record's ``structure``. Call after the hooks are removed (and adapters merged)."""
        z = [v.detach().float().cpu() for v in self._whole(z, torch.ones_like)]
        removed = [torch.nonzero(v == 0).flatten() for v in z]
        facts = {**self.describe(removed, sparsity, target, exclude), "method": "nuteprune"}
        self._fold(z)
        self._slice(z, torch.nonzero(z[HIDDEN] != 0).flatten())
        return facts

    @torch.no_grad()
    def _fold(self, z: List[torch.Tensor]) -> None:
        """Multiply the soft gates into the weights they gate (the width into every writer of the stream)."""
        model, n, h = self.model, len(self.blocks), z[HIDDEN]

        def on(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return t.to(like.device, like.dtype)
        pe = model.patch_embed.proj
        pe.weight.mul_(on(h, pe.weight).view(-1, 1, 1, 1))
        if pe.bias is not None:
            pe.bias.mul_(on(h, pe.bias))
        for p in (getattr(model, name, None) for name in TOKENS):
            if p is not None:
                p.mul_(on(h, p))
        for b, blk in enumerate(self.blocks):
            for layer, units, per in ((blk.attn.proj, z[1 + b], blk.attn.head_dim), (blk.mlp.fc2, z[1 + n + b], 1)):
                layer.weight.mul_(on(h, layer.weight)[:, None] * on(units.repeat_interleave(per), layer.weight)[None])
                if layer.bias is not None:
                    layer.bias.mul_(on(h, layer.bias))

    def _slice(self, z: List[torch.Tensor], keep: torch.Tensor) -> None:
        """Remove the closed units: the width (``keep``) everywhere, then each block's heads and channels."""
        model, n = self.model, len(self.blocks)
        dev = next(model.parameters()).device
        pe = model.patch_embed.proj
        k = keep.to(dev)
        _slice_param(pe, "weight", k, 0)
        _slice_param(pe, "bias", k, 0)
        pe.out_channels = len(k)
        for name in TOKENS:
            _slice_param(model, name, k)
        for ln in self.norms:
            _slice_param(ln, "weight", k, 0)
            _slice_param(ln, "bias", k, 0)
            ln.normalized_shape = (len(k),)
        for b, blk in enumerate(self.blocks):
            a, d = blk.attn, blk.attn.head_dim
            heads = torch.nonzero(z[1 + b] != 0).flatten()
            within = torch.cat([hh * d + torch.arange(d) for hh in heads.tolist()])
            rows = torch.cat([s * a.attn_dim + within for s in range(3)]).to(dev)
            _slice_linear(a.qkv, rows, k)
            _slice_linear(a.proj, k, within.to(dev))
            a.num_heads, a.attn_dim = len(heads), len(heads) * d
            channels = torch.nonzero(z[1 + n + b] != 0).flatten().to(dev)
            _slice_linear(blk.mlp.fc1, channels, k)
            _slice_linear(blk.mlp.fc2, k, channels)
            for ls in (blk.ls1, blk.ls2):
                _slice_param(ls, "gamma", k, 0)
        _slice_linear(model.head, None, k)
        for attr in ("embed_dim", "num_features", "head_hidden_size"):
            if hasattr(model, attr):
                setattr(model, attr, len(k))
