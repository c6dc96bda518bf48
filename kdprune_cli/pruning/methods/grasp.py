"""GraSP: gradient signal preservation (Wang, Zhang & Grosse, ICLR 2020, arXiv 2002.07376; docs/methods.md §4).

At initialisation, keep the largest ``θ ⊙ (H g)`` (:mod:`kdprune_cli.pruning.scores.grasp`) on a class-balanced
batch, logits divided by ``temperature``; ``batching: halves`` (the reference's) or ``shuffled`` in chunks.
Float32 always, also with ``amp=true`` (docs/methods.md §0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from kdprune_cli.config.schema import ConfigError, MethodConfig, TrainRecipe, choice, follow_student, option
from kdprune_cli.pruning.procedures.one_shot import OneShot, scoring_params
from kdprune_cli.pruning.scores.grasp import balanced_batch, grasp
from kdprune_cli.pruning.scores.saliency import scoring_copy


@dataclass
class GraSPConfig(MethodConfig):
    temperature: float = option("positive")
    samples_per_class: int = option("count")
    batching: str = choice("halves", "shuffled")  # halves (the reference) | shuffled
    chunk_size: Optional[int] = option("count_or_null")  # shuffled: forward the batch in chunks (null: whole)
    bn_mode: str = choice("train", "eval")
    retrain: TrainRecipe = field(default_factory=follow_student)  # our choice: the dense student's budget

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batching == "halves" and self.chunk_size is not None:
            raise ConfigError("method.chunk_size splits the shuffled batch: set method.batching=shuffled "
                              "or chunk_size=null (with halves each half is one forward)")


class GraSP(OneShot):
    """GraSP (Wang et al. 2020, arXiv 2002.07376, eq. 8 and Algorithm 1): keep the largest ``θ ⊙ (H g)``."""

    name = "grasp"
    Config = GraSPConfig
    at_init = True

    def score_budget(self, b) -> None:
        """Two passes (the gradient, then the Hessian-gradient product) over the class-balanced batch."""
        per_class = b.n // b.classes
        b.forward("score", samples=2 * b.classes * min(self.cfg.samples_per_class, per_class))
        if self.cfg.samples_per_class > per_class:
            b.approximate("score", "the balanced batch assumes classes of equal size")

    def score(self, ctx, model):
        c = self.cfg
        halves = c.batching == "halves"
        x, y = balanced_batch(ctx.data, c.samples_per_class, ctx.seeds.generator("grasp"), by_class=halves)
        net = scoring_copy(model, c.bn_mode)
        return grasp(net, scoring_params(ctx, net), x, y, c.temperature, c.chunk_size, halves)
