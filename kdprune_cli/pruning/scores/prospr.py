"""ProsPr's saliency (Alizadeh et al., ICLR 2022, arXiv 2202.08132, Eq. 3–5) at (near) initialisation, as its
reference code (mil-ad/prospr, ``prospr.py``) computes it: masks ``m = 1`` multiply the initial weights once,
``inner_steps`` differentiable SGD steps update the weights, then ``S = |∂L(θ_i)/∂m|`` at ``m = 1``; the steps,
the batches (``fresh_batches``) and BatchNorm's handling are in docs/methods.md §3 (EPSD).
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call

from kdprune_cli.models.masks import Scores


def prospr_scores(model: nn.Module, objective: Callable, batches: Iterable, inner_steps: int, inner_lr: float,
                  names: Sequence[str], fresh_batches: bool = True,
                  autocast: Callable = contextlib.nullcontext) -> tuple[Scores, int]:
    """ProsPr meta-gradient saliency ``|∂L(θ_i)/∂m|`` at ``m = 1``, ``θ₀′ = θ₀ ⊙ m``, for the parameters ``names``.

    ``objective(f, x, y, idx) -> (loss, logits)`` is any training objective; ``f`` is the functional
    network (``f(inputs)`` → logits). ``batches`` yields ``(x, y, idx)``; ``inner_steps + 1`` are consumed
    with ``fresh_batches``, one without. Returns the scores and the number of samples pushed forward and
    backward. The model is not changed. ``autocast()`` wraps each forward (bf16 on CUDA with ``amp``); the
    weights θ_k, the masks and the meta-gradient stay float32.
    """
    if inner_steps < 0:
        raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
    named = dict(model.named_parameters())
    names = list(names)
    trainable = [n for n, p in named.items() if p.requires_grad]
    masks = {n: torch.ones_like(named[n], requires_grad=True) for n in names}
    theta = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in named.items()}
    theta = {n: t * masks[n] if n in masks else t for n, t in theta.items()}  # θ₀′ = θ₀ ⊙ m, once
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # BN running stats: copies
    was_training = model.training
    model.train()
    it: Iterator = iter(batches)
    samples = 0

    def loss_at(params, batch):
        x, y, idx = batch
        with autocast():
            loss, _ = objective(lambda inp: functional_call(model, {**params, **buffers}, (inp,)), x, y, idx)
        return loss, x.shape[0]

    try:
        batch = next(it)
        for _ in range(inner_steps):
            loss, n = loss_at(theta, batch)
            grads = torch.autograd.grad(loss, [theta[k] for k in trainable], create_graph=True, allow_unused=True)
            theta = {**theta, **{k: theta[k] - inner_lr * g for k, g in zip(trainable, grads) if g is not None}}
            samples += n
            if fresh_batches:
                batch = next(it)
        loss, n = loss_at(theta, batch)
        samples += n
        gm = torch.autograd.grad(loss, [masks[k] for k in names], allow_unused=True)
    finally:
        model.train(was_training)
    scores = {k: (g.detach().abs() if g is not None else torch.zeros_like(masks[k]).detach())
              for k, g in zip(names, gm)}
    return scores, samples


def cycle_batches(data, batch_size: int, augment: bool, gen: torch.Generator) -> Iterator:
    """Endless shuffled training batches (full batches only), one seeded stream across passes."""
    for _ in itertools.count():
        yield from data.batches("train", batch_size, shuffle=True, augment=augment, gen=gen, drop_last=True)
