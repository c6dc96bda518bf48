"""SNIP: single-shot network pruning based on connection sensitivity (Lee et al., ICLR 2019, arXiv 1810.02340).

At initialisation, the connection sensitivity of weight j is ``|θ_j · ∂L(θ; D)/∂θ_j|`` (the paper's
eq. 5–6, written for a mask c=1 as ``|∂L(c⊙θ)/∂c_j|``; the normalisation by the sum does not change the
ranking). ``D`` is ``batches`` training mini-batches of ``batch_size`` (the paper: one mini-batch);
with several batches we use the gradient of the mean loss over them (a larger ``D``), not a sum of
per-batch saliencies — our choice. The network is scored as it is built (the fresh seeded initialisation),
the top ``(1−s)·|P|`` are kept, and the sparse network is trained from that initialisation with CE for
``retrain`` (the method's full training budget).

BatchNorm scores in eval mode (running statistics) by default, as the reference implementations do:
snip-public feeds ``is_train: False`` while pruning and Synaptic-Flow's ``prune_loop`` calls
``model.eval()`` unless asked otherwise; ``bn_mode: train`` (batch statistics) is the option
(docs/methods.md §4).
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
