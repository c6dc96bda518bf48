"""GraSP: gradient signal preservation (Wang, Zhang & Grosse, ICLR 2020, arXiv 2002.07376).

At initialisation, GraSP removes the weights whose removal least reduces the gradient norm after pruning:
``S(−θ) = −θ ⊙ H g`` (the paper's eq. 8), with ``g = ∇L`` and ``H`` the Hessian of the loss, both over
the prunable weights, and removes the largest ``S(−θ)`` (Algorithm 1). Equivalently, with our "higher =
keep" convention, the score is ``θ ⊙ (H g)`` (signed) and the largest are kept. As in the paper:

- ``H g`` by double backprop: ``g`` is computed and detached, then ``H g = ∇_θ (gᵀ ∇_θ L)``;
- the logits are divided by ``temperature`` (``T = 200``) in both passes;
- the batch is class-balanced: ``samples_per_class`` (10) training images of every class.

The batch is processed in chunks of ``chunk_size`` (``L`` is still the mean over the whole batch: each
chunk's loss is weighted by its share), so that large datasets fit in memory; with ``bn_mode=train``
(default, as the reference code, which scores the network in training mode) BatchNorm uses each chunk's
statistics. The sparse network is then trained from that initialisation with CE for ``retrain``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from .base import params_for_scoring
from .snip import PruneAtInit, bn_mode, scoring_copy


def balanced_batch(data, samples_per_class: int, gen: torch.Generator, which: str = "train"):
    """``samples_per_class`` random images of every class (all of a class's images if it has fewer),
    normalised, in a random order (so that chunks mix the classes): ``(x, y)``."""
    split = data.split(which)
    y_cpu = split.y.to("cpu")
    picks = []
    for c in range(data.num_classes):
        idx = torch.nonzero(y_cpu == c).flatten()
        if idx.numel() == 0:
            continue
        picks.append(idx[torch.randperm(idx.numel(), generator=gen)[:samples_per_class]])
    idx = torch.cat(picks)
    idx = idx[torch.randperm(idx.numel(), generator=gen)].to(split.y.device)
    return data.normalise(split.x[idx]), split.y[idx]


def hessian_gradient_product(model: nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor,
                             temperature: float = 200.0, chunk_size: int | None = None):
    """``(g, Hg)``: the gradient of ``L = CE(model(x)/T, y)`` (mean over the batch) over ``params`` and the
    Hessian–gradient product ``H g`` by double backprop, with ``g`` detached. Dicts keyed like ``params``."""
    names = list(params)
    plist = [params[n] for n in names]
    n = y.shape[0]
    chunk = n if not chunk_size else int(chunk_size)
    dtype = plist[0].dtype
    x = x.to(dtype)

    def chunks():
        for s in range(0, n, chunk):
            yield x[s:s + chunk], y[s:s + chunk], min(chunk, n - s) / n

    def grads(out, create_graph=False):
        gs = torch.autograd.grad(out, plist, create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(p) if gi is None else gi for p, gi in zip(plist, gs)]

    g = [torch.zeros_like(p) for p in plist]
    for xc, yc, w in chunks():
        loss = F.cross_entropy(model(xc) / temperature, yc) * w
        for a, b in zip(g, grads(loss)):
            a += b.detach()
    hg = [torch.zeros_like(p) for p in plist]
    for xc, yc, w in chunks():
        loss = F.cross_entropy(model(xc) / temperature, yc) * w
        gl = grads(loss, create_graph=True)
        z = sum((a * b).sum() for a, b in zip(gl, g) if a.requires_grad)
        if not isinstance(z, torch.Tensor):  # no gradient depends on the weights (a linear model)
            continue
        for a, b in zip(hg, grads(z)):
            a += b.detach()
    return dict(zip(names, g)), dict(zip(names, hg))


class GraSP(PruneAtInit):
    """GraSP (Wang et al. 2020, arXiv 2002.07376, eq. 8 and Algorithm 1): keep the largest ``θ ⊙ (H g)``."""

    name = "grasp"

    def validate(self) -> None:
        c = self.cfg
        if float(c.get("temperature", 200.0)) <= 0:
            raise ConfigError(f"method.temperature must be > 0, got {c.temperature}")
        if int(c.get("samples_per_class", 10)) <= 0:
            raise ConfigError(f"method.samples_per_class must be > 0, got {c.samples_per_class}")
        if c.get("chunk_size") is not None and int(c.chunk_size) <= 0:
            raise ConfigError(f"method.chunk_size must be > 0 or null (whole batch), got {c.chunk_size}")
        bn_mode(c, "train")

    def score(self, ctx, model):
        c = self.cfg
        x, y = balanced_batch(ctx.data, int(c.get("samples_per_class", 10)), ctx.generator("grasp"))
        scorer = scoring_copy(model, bn_mode(c, "train"))
        params = params_for_scoring(ctx, scorer)
        _, hg = hessian_gradient_product(scorer, params, x, y, float(c.get("temperature", 200.0)),
                                         c.get("chunk_size"))
        ctx.current_stage.samples += 2 * y.shape[0]  # one gradient pass, one double-backprop pass
        with torch.no_grad():
            return {n: p.detach() * hg[n] for n, p in params.items()}
