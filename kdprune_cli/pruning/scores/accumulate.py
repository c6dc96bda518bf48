"""Fused accumulation for the first-order scorers (docs/methods.md §0 "Scoring precision and speed").

:func:`accumulate_saliency_` / :func:`accumulate_`: ``torch._foreach_*`` accumulation over all prunable tensors
at once instead of one Python-level kernel launch per parameter per batch; the same float operations in the
same order as a per-parameter loop, so the results are bit-identical. (The scoring forwards themselves run
under bf16 autocast on CUDA with ``amp``, as training does: the procedure passes that ``autocast``; GraSP
and SynFlow never use it.)
"""
from __future__ import annotations

from typing import List, Sequence

import torch


def _grads(params: Sequence[torch.Tensor], grads: Sequence) -> List[torch.Tensor]:
    """``grads`` with a zero tensor where a parameter got no gradient (None)."""
    if all(g is not None for g in grads):
        return list(grads)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@torch.no_grad()
def accumulate_saliency_(scores: List[torch.Tensor], params: Sequence[torch.Tensor], grads: Sequence) -> None:
    """``scores[i] += |params[i] · grads[i]|`` for every i, fused (``None`` gradients count as zero)."""
    prod = torch._foreach_mul(list(params), _grads(params, grads))
    torch._foreach_abs_(prod)
    torch._foreach_add_(scores, prod)


@torch.no_grad()
def accumulate_(acc: List[torch.Tensor], grads: Sequence, params: Sequence[torch.Tensor]) -> None:
    """``acc[i] += grads[i]`` for every i, fused (``None`` gradients count as zero)."""
    torch._foreach_add_(acc, _grads(params, grads))
