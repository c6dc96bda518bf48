"""SNIP: single-shot network pruning based on connection sensitivity (Lee et al., ICLR 2019, arXiv 1810.02340).

At initialisation, the connection sensitivity of weight j is ``|θ_j · ∂L(θ; D)/∂θ_j|`` (the paper's
eq. 5–6, written for a mask c=1 as ``|∂L(c⊙θ)/∂c_j|``; the normalisation by the sum does not change the
ranking). ``D`` is ``batches`` training mini-batches of ``batch_size`` (the paper: one mini-batch);
with several batches we use the gradient of the mean loss over them (a larger ``D``), not a sum of
per-batch saliencies — our choice. The network is scored as it is built (``ctx.seeds.new_model("student")``),
the top ``(1−s)·|P|`` are kept, and the sparse network is trained from that initialisation with CE for
``retrain`` (the method's full training budget).

BatchNorm scores in eval mode (running statistics) by default, as the reference implementations do:
snip-public feeds ``is_train: False`` while pruning and Synaptic-Flow's ``prune_loop`` calls
``model.eval()`` unless asked otherwise; ``bn_mode: train`` (batch statistics) is the option
(docs/methods.md §4).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
from omegaconf import MISSING
from torch import nn

from kdprune_cli.config.schema import ConfigError, MethodConfig, TrainRecipe, follow_student
from kdprune_cli.pruning.methods.base import OneShot, params_for_scoring
from kdprune_cli.pruning.scores.batches import accumulate_, scoring_autocast


def scoring_copy(model: nn.Module, bn_mode: str) -> nn.Module:
    """A copy of ``model`` to score on, BatchNorm in ``train`` (batch statistics) or ``eval`` mode.

    Scoring a copy leaves the network that will be pruned and trained untouched (BN running statistics
    included)."""
    m = copy.deepcopy(model)
    m.train(bn_mode == "train")
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def bn_mode(cfg) -> str:
    """``method.bn_mode`` (``train``: batch statistics | ``eval``: running statistics), checked; each method's
    YAML holds its reference's choice (docs/methods.md §4)."""
    mode = cfg.bn_mode
    if mode not in ("train", "eval"):
        raise ConfigError(f"method.bn_mode must be train or eval, got {mode!r}")
    return mode


class PruneAtInit(OneShot):
    """A one-shot method that scores the fresh seeded initialisation (not registered: no ``name``)."""

    def base_model(self, ctx) -> nn.Module:
        return ctx.seeds.new_model("student")


def snip_scores(model: nn.Module, params: dict, batches, loss_fn, autocast=contextlib.nullcontext) -> tuple[dict, int]:
    """``|θ ⊙ ḡ|`` with ``ḡ`` the gradient of the mean of ``loss_fn(model(x), y)`` over ``batches``.

    ``params`` maps names to parameters of ``model``. ``autocast()`` wraps each forward (bf16 on CUDA with
    ``amp``; the gradients and their float32 sum are not narrowed). Returns (scores, samples used).
    """
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


@dataclass
class SNIPConfig(MethodConfig):
    batches: Optional[int] = MISSING  # null: one pass over the training set
    batch_size: int = MISSING
    bn_mode: str = MISSING  # eval (the references) | train
    retrain: TrainRecipe = field(default_factory=follow_student)  # our choice: the dense student's budget

class SNIP(PruneAtInit):
    """SNIP (Lee et al. 2019, arXiv 1810.02340, eq. 6): keep the largest ``|θ ⊙ ∂L/∂θ|`` at init."""

    name = "snip"
    Config = SNIPConfig

    def validate(self) -> None:
        c = self.cfg
        if c.batches is not None and int(c.batches) <= 0:
            raise ConfigError(f"method.batches must be > 0 or null (one pass), got {c.batches}")
        if int(c.batch_size) <= 0:
            raise ConfigError(f"method.batch_size must be > 0, got {c.batch_size}")
        bn_mode(c)

    def score(self, ctx, model):
        c = self.cfg
        scorer = scoring_copy(model, bn_mode(c))
        params = params_for_scoring(ctx, scorer)
        nb = c.batches
        batches = ((x, y) for x, y, _ in ctx.data.batches(
            "train", int(c.batch_size), shuffle=True, gen=ctx.seeds.generator("snip"),
            max_batches=None if nb is None else int(nb)))
        with ctx.costs.count(scorer):
            scores, _ = snip_scores(scorer, params, batches, nn.functional.cross_entropy,
                                    autocast=lambda: scoring_autocast(ctx))
        return scores
