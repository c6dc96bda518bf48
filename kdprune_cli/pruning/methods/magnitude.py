"""Magnitude pruning (docs/methods.md §4): score ``|θ|``, one shot, then retrain with the mask fixed.

The classic baseline (Han et al. 2015, arXiv 1506.02626; as a one-shot score, e.g. Frankle & Carbin 2019,
arXiv 1803.03635, and Blalock et al. 2020, arXiv 2003.03033). ``at_init=false`` (default) prunes the trained
dense student; ``at_init=true`` the fresh seeded initialisation (the "magnitude at init" baseline).
"""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from kdprune_cli.config.schema import MethodConfig, TrainRecipe
from kdprune_cli.pruning.procedures.one_shot import OneShot, scoring_params
from kdprune_cli.pruning.scores.magnitude import magnitude


@dataclass
class MagnitudeConfig(MethodConfig):
    at_init: bool = MISSING
    retrain: TrainRecipe = MISSING


class Magnitude(OneShot):
    """Global (or per-layer) magnitude pruning: score ``|θ_j|`` (Han et al. 2015, arXiv 1506.02626, §3)."""

    name = "magnitude"
    Config = MagnitudeConfig
    at_init = property(lambda self: self.cfg.at_init)

    def score(self, ctx, model):
        return magnitude(scoring_params(ctx, model))
