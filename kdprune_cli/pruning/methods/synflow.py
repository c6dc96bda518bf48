"""SynFlow: iterative synaptic flow pruning, data-free (Tanaka, Kunin, Yamins & Ganguli, NeurIPS 2020,
arXiv 2006.05467; docs/methods.md §4, its precision there too).

The score ``|θ ⊙ ∂R/∂θ|`` of ``R = 1ᵀ (∏_l |W^[l]|) 1`` is taken on a float64 copy of the network with every
parameter and buffer replaced by its absolute value (float32 where the device has no float64, e.g. MPS), so
the network that is pruned keeps its signs and dtype untouched — equivalent to linearising in place and
restoring the signs afterwards; after round ``k`` the density is ``(1−s)^(k/rounds)``, earlier removals kept.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from omegaconf import MISSING
from torch import nn

from kdprune_cli.config.schema import MethodConfig, TrainRecipe, follow_student, option
from kdprune_cli.models.masks import Scores, apply_masks
from kdprune_cli.pruning.methods.base import Result
from kdprune_cli.pruning.procedures.one_shot import OneShot, scoring_params


def linearised_copy(model: nn.Module, double: bool = True) -> nn.Module:
    """A copy of ``model`` with every floating parameter and buffer replaced by its absolute value,
    BatchNorm (and everything else) in eval mode, in float64 where the device supports it."""
    m = copy.deepcopy(model)
    device = next(m.parameters()).device
    if double and device.type != "mps":
        m = m.double()
    m.eval()
    with torch.no_grad():
        for t in m.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def synflow_scores(model: nn.Module, params: dict, input_shape) -> Scores:
    """One round of ``|θ ⊙ ∂R/∂θ|`` on an already linearised network (``params`` are its weights)."""
    p0 = next(iter(params.values()))
    ones = torch.ones((1, *input_shape), dtype=p0.dtype, device=p0.device)
    model.zero_grad(set_to_none=True)
    r = model(ones).sum()
    r.backward()
    with torch.no_grad():
        out = {n: (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    return out


def schedule(sparsity: float, rounds: int) -> list[float]:
    """Sparsity after each round: ``1 − (1−s)^(k/rounds)``, the last exactly ``s``."""
    return [1.0 - (1.0 - sparsity) ** (k / rounds) for k in range(1, rounds)] + [sparsity]


@dataclass
class SynFlowConfig(MethodConfig):
    rounds: int = option("count")
    double: bool = MISSING  # score in float64
    retrain: TrainRecipe = field(default_factory=follow_student)  # our choice: the dense student's budget


class SynFlow(OneShot):
    """SynFlow (Tanaka et al. 2020, arXiv 2006.05467, Algorithm 1): iterative, data-free ``|θ ⊙ ∂R/∂θ|``."""

    granularities = ("weight", "channel")  # channel: each round re-plans channel groups (docs/methods.md §7)

    name = "synflow"
    Config = SynFlowConfig
    at_init = True

    def prune(self, ctx, model: nn.Module):
        """The iterative schedule on a linearised copy of ``model`` (not changed); returns the selection
        (:meth:`~kdprune_cli.pruning.selection.Pruner.progress`) to finish ``model`` with."""
        lin = linearised_copy(model, self.cfg.double)
        params = scoring_params(ctx, lin)
        shape = (ctx.data.channels, ctx.data.image_size, ctx.data.image_size)
        progress = ctx.pruner.progress(lin)
        for k, s_k in enumerate(schedule(ctx.pruner.sparsity, self.cfg.rounds), start=1):
            t = time.perf_counter()
            with ctx.costs.count(lin):
                scores = synflow_scores(lin, params, shape)
            progress.select(scores, s_k)  # removed weights (channels) stay removed
            apply_masks(lin, progress.masks)
            ctx.log({"stage": "score", "round": k, "sparsity": s_k, "seconds": time.perf_counter() - t})
        return progress

    def score(self, ctx, model):
        """One round of synaptic saliency on the unpruned network (what ``rounds=1`` prunes with)."""
        lin = linearised_copy(model, self.cfg.double)
        with ctx.costs.count(lin):
            return synflow_scores(lin, scoring_params(ctx, lin),
                                  (ctx.data.channels, ctx.data.image_size, ctx.data.image_size))

    def score_budget(self, b) -> None:
        b.forward("score", samples=int(self.cfg.rounds))  # one all-ones input per round

    def run(self, ctx) -> Result:
        model = self.base_model(ctx)
        with ctx.costs.count(stage="score"):
            progress = self.prune(ctx, model)
        pruned = progress.finish(model)
        ctx.evaluator.record_metrics("pruned", model)
        ctx.trainer.train(model, self.cfg.retrain, self.retrain_objective(ctx), stage="retrain", masks=pruned.masks)
        return pruned
