"""Scoring at training speed (docs/methods.md §0 "Scoring precision and speed").

- :func:`scoring_autocast`: the scoring forwards of the first-order saliencies (CA-KLD, SNIP, EPSD/EPG) run
  under bf16 autocast on CUDA when ``amp`` is on, as training does. The parameters, their gradients and
  the score accumulators stay float32. GraSP (a Hessian–gradient product of a loss whose logits are divided
  by 200) and SynFlow (float64: its products overflow float32) never use it. On CPU it does nothing.
- :func:`accumulate_saliency_` / :func:`accumulate_`: fused ``torch._foreach_*`` accumulation over all
  prunable tensors at once instead of one Python-level kernel launch per parameter per batch; the same
  float operations in the same order as the per-parameter loop, so the results are bit-identical.
"""
from __future__ import annotations

import contextlib
from typing import List, Sequence

import torch


def scoring_autocast(ctx):
    """bf16 autocast for a scoring forward on CUDA with ``amp=true``; a no-op elsewhere."""
    if bool(ctx.cfg.get("amp", False)) and ctx.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
