"""GraSP: gradient signal preservation (Wang, Zhang & Grosse, ICLR 2020, arXiv 2002.07376).

At initialisation, GraSP removes the weights whose removal least reduces the gradient norm after pruning:
``S(−θ) = −θ ⊙ H g`` (the paper's eq. 8), with ``g = ∇L`` and ``H`` the Hessian of the loss, both over
the prunable weights, and removes the largest ``S(−θ)`` (Algorithm 1). Equivalently, with our "higher =
keep" convention, the score is ``θ ⊙ (H g)`` (signed) and the largest are kept. As in the paper:

- ``H g`` by double backprop: ``g`` is computed and detached, then ``H g = ∇_θ (gᵀ ∇_θ L)``;
- the logits are divided by ``temperature`` (``T = 200``) in both passes;
- the batch is class-balanced: ``samples_per_class`` (10) training images of every class.

Batching (``batching``, docs/methods.md §4). ``halves`` (default, as the reference alecwangcq/GraSP): the
batch is sorted by class and split in two halves (classes ``0..C/2−1`` and the rest when the classes are
balanced and C is even); each half is one forward, so with BN in train mode each half has its own batch
statistics, and the loss is the sum of the two halves' mean losses, ``L = L₁ + L₂``, for both ``g`` and
``H g``. ``shuffled`` (our former default): one shuffled batch whose loss is the mean over all of it,
processed in chunks of ``chunk_size`` (each chunk's loss weighted by its share; a memory knob, though with
BN in train mode each chunk has its own statistics). BatchNorm scores in train mode by default
(``bn_mode``), as the reference, which scores a copy of the freshly built network. The sparse network is
then trained from that initialisation with CE for ``retrain``.

Precision: float32 always, also with ``amp=true`` (no bf16 autocast, unlike the first-order saliencies): ``H g``
is a second-order quantity of a loss whose logits are divided by ``T = 200`` (docs/methods.md §0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import nn

from kdprune_cli.config.schema import ConfigError, MethodConfig, TrainRecipe, follow_student
from kdprune_cli.pruning.methods.base import params_for_scoring
from kdprune_cli.pruning.methods.snip import PruneAtInit, bn_mode, scoring_copy


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


@dataclass
class GraSPConfig(MethodConfig):
    temperature: float = MISSING
    samples_per_class: int = MISSING
    batching: str = MISSING  # halves (the reference) | shuffled
    chunk_size: Optional[int] = MISSING
    bn_mode: str = MISSING
    retrain: TrainRecipe = field(default_factory=follow_student)  # our choice: the dense student's budget

class GraSP(PruneAtInit):
    """GraSP (Wang et al. 2020, arXiv 2002.07376, eq. 8 and Algorithm 1): keep the largest ``θ ⊙ (H g)``."""

    name = "grasp"
    Config = GraSPConfig

    def validate(self) -> None:
        c = self.cfg
        if float(c.temperature) <= 0:
            raise ConfigError(f"method.temperature must be > 0, got {c.temperature}")
        if int(c.samples_per_class) <= 0:
            raise ConfigError(f"method.samples_per_class must be > 0, got {c.samples_per_class}")
        if c.chunk_size is not None and int(c.chunk_size) <= 0:
            raise ConfigError(f"method.chunk_size must be > 0 or null (whole batch), got {c.chunk_size}")
        if c.batching not in ("halves", "shuffled"):
            raise ConfigError(f"method.batching must be halves or shuffled, got {c.get('batching')!r}")
        if c.batching == "halves" and c.chunk_size is not None:
            raise ConfigError("method.chunk_size splits the shuffled batch: set method.batching=shuffled "
                              "or chunk_size=null (with halves each half is one forward)")
        bn_mode(c)

    def score(self, ctx, model):
        c = self.cfg
        halves = c.batching == "halves"
        x, y = balanced_batch(ctx.data, int(c.samples_per_class), ctx.seeds.generator("grasp"),
                              by_class=halves)
        scorer = scoring_copy(model, bn_mode(c))
        params = params_for_scoring(ctx, scorer)
        with ctx.costs.count(scorer):
            _, hg = hessian_gradient_product(scorer, params, x, y, float(c.temperature), c.chunk_size, halves)
        with torch.no_grad():
            return {n: p.detach() * hg[n] for n, p in params.items()}
