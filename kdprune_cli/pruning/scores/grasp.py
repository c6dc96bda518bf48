"""GraSP scores (Wang, Zhang & Grosse, ICLR 2020, arXiv 2002.07376): ``θ ⊙ (H g)``, higher = keep — the
negation of the paper's ``S(−θ) = −θ ⊙ H g`` (eq. 8), whose largest it removes; ``H g`` by double backprop on a
class-balanced batch (:func:`balanced_batch`), logits divided by ``temperature``, float32 always
(docs/methods.md §4 and §0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdprune_cli.models.masks import Scores


def balanced_batch(data, samples_per_class: int, gen: torch.Generator, which: str = "train",
                   by_class: bool = False):
    """``samples_per_class`` random images of every class (all of a class's images if it has fewer),
    normalised: ``(x, y)``. ``by_class``: class after class (the reference's order); otherwise shuffled.
    The random draws of the samples are the same either way."""
    split = data.split(which)
    y_cpu = split.y.to("cpu")
    picks = []
    for c in range(data.num_classes):
        idx = torch.nonzero(y_cpu == c).flatten()
        if idx.numel() == 0:
            continue
        picks.append(idx[torch.randperm(idx.numel(), generator=gen)[:samples_per_class]])
    idx = torch.cat(picks)
    if not by_class:
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
    idx = idx.to(split.y.device)
    return data.normalise(split.x[idx]), split.y[idx]


def hessian_gradient_product(model: nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor,
                             temperature: float = 200.0, chunk_size: int | None = None, halves: bool = False):
    """``(g, Hg)``: the gradient of the loss over ``params`` and the Hessian–gradient product ``H g`` by
    double backprop, with ``g`` detached. Dicts keyed like ``params``.

    The loss is ``CE(model(x)/T, y)``, the mean over the batch, forwarded in chunks of ``chunk_size``; with
    ``halves`` it is ``L₁ + L₂``, the sum of the mean losses of ``x[:n//2]`` and ``x[n//2:]``, each one
    forward (the reference's batching; ``chunk_size`` is then not used)."""
    names = list(params)
    plist = [params[n] for n in names]
    n = y.shape[0]
    step = int(chunk_size) if chunk_size else n
    bounds = [(0, n // 2), (n // 2, n)] if halves else [(s, min(s + step, n)) for s in range(0, n, step)]
    x = x.to(plist[0].dtype)

    def chunks():
        for a, b in bounds:
            if b > a:
                yield x[a:b], y[a:b], 1.0 if halves else (b - a) / n

    def grads(out, create_graph=False):
        gs = torch.autograd.grad(out, plist, create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(p) if gi is None else gi for p, gi in zip(plist, gs)]

    g = [torch.zeros_like(p) for p in plist]
    for xc, yc, w in chunks():
        loss = F.cross_entropy(model(xc) / temperature, yc) * w
        torch._foreach_add_(g, grads(loss))  # fused over the tensors (no graph: create_graph=False)
    hg = [torch.zeros_like(p) for p in plist]
    for xc, yc, w in chunks():
        loss = F.cross_entropy(model(xc) / temperature, yc) * w
        gl = grads(loss, create_graph=True)
        z = sum((a * b).sum() for a, b in zip(gl, g) if a.requires_grad)
        if not isinstance(z, torch.Tensor):  # no gradient depends on the weights (a linear model)
            continue
        torch._foreach_add_(hg, grads(z))
    return dict(zip(names, g)), dict(zip(names, hg))


def grasp(model: nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor, temperature: float = 200.0,
          chunk_size: int | None = None, halves: bool = False) -> Scores:
    """``θ ⊙ (H g)`` for ``params`` of ``model`` on the batch ``(x, y)`` (:func:`hessian_gradient_product`)."""
    _, hg = hessian_gradient_product(model, params, x, y, temperature, chunk_size, halves)
    with torch.no_grad():
        return {n: p.detach() * hg[n] for n, p in params.items()}
