"""Multiply–accumulates of the matrix products between activations (docs/methods.md §6): attention's
``Q·Kᵀ`` and ``A·V``, which no Conv2d or Linear layer computes.

:class:`MatmulCounter` is a ``TorchFunctionMode``: while it is active, every call of
``F.scaled_dot_product_attention`` counts ``B·H·L·S·(E + Eᵥ)`` (query ``(B, H, L, E)``, key ``(…, S, E)``,
value ``(…, S, Eᵥ)``: the two products of the fused kernel), and every ``torch.matmul`` / ``@`` / ``bmm`` /
``mm`` / ``baddbmm`` / ``addmm`` call counts ``batch·n·k·m`` for a
``(…, n, k) × (…, k, m)`` product (batch dims broadcast). timm's attention with its fused kernel on or off
(``timm.layers.set_fused_attn``) counts the same. Conv2d and Linear layers call ``F.conv2d`` / ``F.linear``,
which it does not count (their MACs come from the layers' shapes). ``torch.einsum`` is not counted.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_PRODUCTS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm,
             torch.mm, torch.Tensor.mm}
_ADD_PRODUCTS = {torch.baddbmm, torch.Tensor.baddbmm, torch.addmm, torch.Tensor.addmm}  # (input, a, b)


def product_macs(a: torch.Size, b: torch.Size) -> int:
    """MACs of ``a @ b`` (``torch.matmul``'s broadcasting; a 1-d operand is a row or column vector)."""
    a = (1, *a) if len(a) == 1 else tuple(a)
    b = (*b, 1) if len(b) == 1 else tuple(b)
    batch = torch.broadcast_shapes(a[:-2], b[:-2])
    return math.prod(batch) * a[-2] * a[-1] * b[-1]


def attention_macs(q: torch.Size, k: torch.Size, v: torch.Size) -> int:
    """MACs of ``softmax(Q·Kᵀ)·V``: ``Q·Kᵀ`` is ``(…, L, E) × (…, E, S)``, the product with ``V``
    ``(…, L, S) × (…, S, Eᵥ)``."""
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


class MatmulCounter(TorchFunctionMode):
    """Counts, in ``macs``, the MACs of the activation products run while it is active (all inputs together)."""

    def __init__(self):
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PRODUCTS:
            b = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
            self.macs += product_macs(args[0].shape, b.shape)
        elif func is torch.Tensor.__rmatmul__:
            self.macs += product_macs(args[1].shape, args[0].shape)
        elif func in _ADD_PRODUCTS:
            names = ("batch1", "batch2") if "bmm" in func.__name__ else ("mat1", "mat2")
            a = args[1] if len(args) > 1 else kwargs[names[0]]
            b = args[2] if len(args) > 2 else kwargs[names[1]]
            self.macs += product_macs(a.shape, b.shape)
        elif func is F.scaled_dot_product_attention:
            q, k, v = (list(args[:3]) + [kwargs.get(n) for n in ("query", "key", "value")[len(args):]])[:3]
            self.macs += attention_macs(q.shape, k.shape, v.shape)
        return func(*args, **kwargs)
