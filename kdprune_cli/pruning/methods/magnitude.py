"""Magnitude pruning (docs/methods.md §4): score ``|θ|``, one shot, then retrain with the mask fixed.

The classic baseline (Han et al. 2015, arXiv 1506.02626; as a one-shot score, e.g. Frankle & Carbin
2019, arXiv 1803.03635, and Blalock et al. 2020, arXiv 2003.03033): keep the largest ``|θ_j|``.
``at_init=false`` (default) prunes the trained dense student; ``at_init=true`` prunes the fresh
initialisation ``ctx.seeds.new_model("student")`` (the "magnitude at init" baseline of the pruning-at-
initialisation papers), after which ``retrain`` should be the full training budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import MISSING
from torch import nn

from kdprune_cli.config.schema import MethodConfig, TrainRecipe
from kdprune_cli.pruning.methods.base import OneShot, params_for_scoring
from kdprune_cli.pruning.masks import Scores


class MaybeAtInit(OneShot):
    """A one-shot method that prunes either the trained dense student or a fresh initialisation.

    Not registered (no ``name``); ``method.at_init`` chooses.
    """

    @property
    def at_init(self) -> bool:
        return bool(self.cfg.at_init)

    def base_model(self, ctx) -> nn.Module:
        """The fresh seeded initialisation (``at_init``) or the trained dense student."""
        return ctx.seeds.new_model("student") if self.at_init else ctx.artifacts.dense_student()


def magnitude_scores(params) -> Scores:
    """``{name: |θ|}`` for the given parameters."""
    return {n: p.detach().abs() for n, p in params.items()}


@dataclass
class MagnitudeConfig(MethodConfig):
    at_init: bool = MISSING
    retrain: TrainRecipe = MISSING

class Magnitude(MaybeAtInit):
    """Global (or per-layer) magnitude pruning: score ``|θ_j|`` (Han et al. 2015, arXiv 1506.02626, §3)."""

    name = "magnitude"
    Config = MagnitudeConfig

    @torch.no_grad()
    def score(self, ctx, model):
        return magnitude_scores(params_for_scoring(ctx, model))
