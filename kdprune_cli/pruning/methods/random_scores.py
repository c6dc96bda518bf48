"""Random pruning (docs/methods.md §4), the sanity baseline (:mod:`kdprune_cli.pruning.scores.random`).

Each weight gets an i.i.d. U[0,1) score drawn from the seeded generator ``random``; the selection then removes
exactly ``round(s·|P|)`` weights, so in ``layer`` scope every tensor loses the same fraction and in ``global``
scope each weight survives with probability ≈ 1−s independently of its layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from kdprune_cli.config.schema import MethodConfig, TrainRecipe, follow_student
from kdprune_cli.pruning.procedures.one_shot import OneShot, scoring_params
from kdprune_cli.pruning.scores.random import uniform


@dataclass
class RandomConfig(MethodConfig):
    at_init: bool = MISSING
    retrain: TrainRecipe = field(default_factory=follow_student)  # our choice: the dense student's budget


class RandomPrune(OneShot):
    """i.i.d. random scores; ``at_init`` (default true, our choice) prunes the fresh initialisation,
    ``at_init=false`` the trained dense student."""

    name = "random"
    Config = RandomConfig
    at_init = property(lambda self: self.cfg.at_init)

    def score(self, ctx, model):
        return uniform(scoring_params(ctx, model), ctx.seeds.generator("random"))
