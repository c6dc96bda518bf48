"""The one-shot procedure: score once → select (:class:`~kdprune_cli.pruning.selection.Pruner`) → retrain.

A one-shot method subclasses :class:`OneShot` and says which network it scores (``at_init``) and how its
scorer (a pure function of :mod:`kdprune_cli.pruning.scores`) is fed (:meth:`OneShot.score`). The procedure
books the scoring to the ``score`` stage (forwards through the scored network and its copies included); the
selection alone knows ``prune.granularity``: every one-shot method prunes weights and channel groups alike.
"""
from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from kdprune_cli.models.masks import Scores, prunable_params
from kdprune_cli.pruning.methods.base import Method, Result


class OneShot(Method):
    """Score once, keep the top ``(1−s)·|P|`` scores (or remove the least important channel groups:
    ``prune.granularity=channel``), retrain with the mask fixed (or the smaller model)."""

    granularities = ("weight", "channel")
    at_init = False  # score the fresh seeded initialisation (True) or the trained dense student

    def base_model(self, ctx) -> nn.Module:
        """The network to score and prune."""
        return ctx.seeds.new_model("student") if self.at_init else ctx.artifacts.dense_student()

    def score(self, ctx, model: nn.Module) -> Scores:
        """The scores of ``model``'s prunable weights (higher = keep): the scorer fed from ``ctx``."""
        raise NotImplementedError

    def retrain_objective(self, ctx):
        return ctx.trainer.objective()

    def facts(self) -> dict:
        """Facts of this run for the record (none by default)."""
        return {}

    def run(self, ctx) -> Result:
        model = self.base_model(ctx)
        t = time.perf_counter()
        with ctx.costs.count(stage="score"), ctx.costs.count(model):  # the stage; forwards through model and copies
            scores = self.score(ctx, model)
        pruned = ctx.pruner.prune(model, scores)
        ctx.log({"stage": "score", "round": 1, "sparsity": ctx.pruner.sparsity, "seconds": time.perf_counter() - t})
        ctx.evaluator.record_metrics("pruned", pruned.model)
        ctx.trainer.train(pruned.model, self.cfg.retrain, self.retrain_objective(ctx), stage="retrain",
                          masks=pruned.masks)
        return Result(pruned.model, pruned.masks, {**pruned.facts, **self.facts()})

    def budget(self, b) -> None:
        """The ``score`` stage (:meth:`score_budget`), then the retraining with :meth:`retrain_rates`."""
        self.score_budget(b)
        b.train("retrain", self.cfg.retrain, "method.retrain", self.retrain_rates())

    def score_budget(self, b) -> None:
        """What scoring pushes through the network (nothing for a scorer that reads only the weights)."""

    def retrain_rates(self):
        """The retraining objective's class (its ``teacher_rate``, ``extra_rate``); None: cross-entropy."""
        return None


def scoring_params(ctx, model: nn.Module) -> dict:
    """The prunable parameters of ``model`` (``prune.exclude`` left out): what a scorer scores."""
    return prunable_params(model, ctx.pruner.exclude)


def amp_autocast(ctx):
    """``autocast()`` for a first-order scorer: bf16 on CUDA with ``amp=true`` as training, else nothing."""
    on = bool(ctx.cfg.get("amp", False)) and ctx.device.type == "cuda"
    return lambda: torch.autocast("cuda", dtype=torch.bfloat16) if on else contextlib.nullcontext()
