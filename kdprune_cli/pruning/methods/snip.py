"""SNIP: single-shot network pruning based on connection sensitivity (Lee et al., ICLR 2019, arXiv 1810.02340;
docs/methods.md §4): at initialisation keep the largest ``|θ ⊙ ∂L/∂θ|``, the gradient of the mean CE loss over
``batches`` mini-batches, BatchNorm in eval mode as the references (``bn_mode``), then train the sparse network.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.nn.functional as F

from kdprune_cli.config.schema import MethodConfig, TrainRecipe, choice, follow_student, option
from kdprune_cli.pruning.procedures.one_shot import OneShot, amp_autocast, scoring_params
from kdprune_cli.pruning.scores.saliency import scoring_copy, snip


@dataclass
class SNIPConfig(MethodConfig):
    batches: Optional[int] = option("count_or_null")  # null: one pass over the training set
    batch_size: int = option("count")
    bn_mode: str = choice("train", "eval")  # eval (the references) | train
    retrain: TrainRecipe = field(default_factory=follow_student)  # our choice: the dense student's budget


class SNIP(OneShot):
    """SNIP (Lee et al. 2019, arXiv 1810.02340, eq. 6): keep the largest ``|θ ⊙ ∂L/∂θ|`` at init."""

    name = "snip"
    Config = SNIPConfig
    at_init = True

    def score_budget(self, b) -> None:
        b.forward("score", samples=b.pass_samples(self.cfg.batch_size, self.cfg.batches))

    def score(self, ctx, model):
        c = self.cfg
        net = scoring_copy(model, c.bn_mode)
        batches = ((x, y) for x, y, _ in ctx.data.batches("train", c.batch_size, shuffle=True,
                                                          gen=ctx.seeds.generator("snip"), max_batches=c.batches))
        return snip(net, scoring_params(ctx, net), batches, F.cross_entropy, autocast=amp_autocast(ctx))[0]
