"""First-order connection saliency ``|θ ⊙ ∂L/∂θ|`` over a stream of batches.

- :func:`snip`: SNIP's (Lee et al., ICLR 2019, arXiv 1810.02340, eq. 5–6) with the gradient of the mean
  loss over the batches;
- :func:`summed_saliency`: the sum over batches of each batch's ``|θ ⊙ ∇L_b|`` (CA-KLD, arXiv 2511.16653,
  step 4), BatchNorm in eval mode.

``autocast()`` wraps each forward (bf16 on CUDA with ``amp``); the gradients and their float32 sums are not
narrowed. :func:`scoring_copy` makes the copy a scorer may run on, so the scored network stays untouched.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterable

import torch
from torch import nn

from kdprune_cli.models.masks import Scores
from kdprune_cli.pruning.scores.accumulate import accumulate_, accumulate_saliency_


def scoring_copy(model: nn.Module, bn_mode: str) -> nn.Module:
    """A copy of ``model`` to score on, BatchNorm in ``train`` (batch statistics) or ``eval`` mode, every
    parameter requiring a gradient (the network that will be pruned keeps its BN running statistics)."""
    m = copy.deepcopy(model)
    m.train(bn_mode == "train")
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def snip(model: nn.Module, params: dict, batches: Iterable, loss_fn: Callable,
         autocast: Callable = contextlib.nullcontext) -> tuple[Scores, int]:
    """``|θ ⊙ ḡ|`` with ``ḡ`` the gradient of the mean of ``loss_fn(model(x), y)`` over ``batches`` of
    ``(x, y)``; ``params`` maps names to parameters of ``model``. Returns (scores, samples used)."""
    names, plist = list(params), list(params.values())
    acc = [torch.zeros_like(p) for p in plist]
    n_batches, samples = 0, 0
    for x, y in batches:
        with autocast():
            loss = loss_fn(model(x.to(plist[0].dtype)), y)
        accumulate_(acc, torch.autograd.grad(loss, plist, allow_unused=True), plist)  # fused Σ_b ∇L_b
        n_batches += 1
        samples += x.shape[0]
    if n_batches == 0:
        raise ValueError("SNIP got no batches to score on")
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        out = torch._foreach_mul(plist, acc)
        torch._foreach_div_(out, n_batches)
        torch._foreach_abs_(out)
    return dict(zip(names, out)), samples


def summed_saliency(model: nn.Module, params: dict, batches: Iterable, loss_fn: Callable,
                    autocast: Callable = contextlib.nullcontext) -> Scores:
    """``Σ_b |θ ⊙ ∇θ L_b|`` over ``batches`` of ``(x, y, idx)``, ``loss_fn(model, x, y, idx) -> (loss, logits)``,
    with ``model`` in eval mode; ``model`` is left in train mode without gradients."""
    names, plist = list(params), list(params.values())
    acc = [torch.zeros_like(p) for p in plist]  # float32 accumulators, also under bf16 autocast
    model.eval()
    for x, y, idx in batches:
        with autocast():
            loss, _ = loss_fn(model, x, y, idx)
        grads = torch.autograd.grad(loss, plist, allow_unused=True)
        accumulate_saliency_(acc, plist, grads)  # Σ_b |θ ⊙ ∇L_b|, fused over the tensors
    model.zero_grad(set_to_none=True)
    model.train()
    return dict(zip(names, acc))
