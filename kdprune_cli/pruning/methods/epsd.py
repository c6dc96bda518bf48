"""EPSD and EPG: early pruning with a ProsPr-form saliency, then sparse training (docs/methods.md §3).

Both score the fresh seeded initialisation with ProsPr's saliency (arXiv 2202.08132,
:mod:`kdprune_cli.pruning.scores.prospr`; ``inner_batches``: ``fresh`` or ``same`` batches, drawn from one
seeded shuffle of the training set): EPSD of its self-distillation loss, EPG of plain CE.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from kdprune_cli.config.schema import MethodConfig, TrainRecipe, choice, follow_student, option
from kdprune_cli.distill import self_distillation as sd
from kdprune_cli.pruning.procedures.one_shot import OneShot, amp_autocast, scoring_params
from kdprune_cli.pruning.scores.prospr import cycle_batches, prospr_scores


@dataclass
class EPGConfig(MethodConfig):
    inner_steps: int = option("steps")  # ProsPr inner SGD steps (0: SNIP's score)
    inner_lr: float = option("positive")
    inner_batches: str = choice("fresh", "same")
    score_batch_size: int = option("count")
    score_augment: bool = MISSING
    retrain: TrainRecipe = field(default_factory=follow_student)  # our choice: the dense student's budget


@dataclass
class CSKDConfig:
    temperature: float = option("positive")
    lam: float = option("nonnegative")


@dataclass
class PSKDConfig:
    alpha_T: float = option("unit")


@dataclass
class DLBConfig:
    temperature: float = option("positive")
    alpha: float = option("nonnegative")


@dataclass
class EPSDConfig(EPGConfig):
    sd: str = choice(*sd.SD_NAMES)
    cs_kd: CSKDConfig = field(default_factory=CSKDConfig)
    ps_kd: PSKDConfig = field(default_factory=PSKDConfig)
    dlb: DLBConfig = field(default_factory=DLBConfig)


class EPSD(OneShot):
    """EPSD — Early Pruning with Self-Distillation (Chen et al., AAAI 2024, arXiv 2402.00084; docs/methods.md §3).

    Prune the fresh seeded initialisation once by the ProsPr-form saliency (arXiv 2202.08132) of the SD loss
    ``method.sd`` (``cs_kd``, ``ps_kd`` or ``dlb``, :mod:`kdprune_cli.distill.self_distillation`), then train the
    sparse network with the same loss and the mask fixed (``retrain``). What each SD loss means at
    initialisation (our choice) is in docs/methods.md §3; the scoring uses a fresh objective that runs
    statefully along the ``inner_steps + 1`` scoring passes. No pretrained teacher is used.
    """

    name = "epsd"
    Config = EPSDConfig
    at_init = True

    @property
    def sd_name(self) -> str:
        return self.cfg.sd

    def make_objective(self, ctx, purpose: str, epochs: int, augment: bool):
        """A fresh SD objective; ``purpose`` names its seeded generator (``score`` or ``retrain``)."""
        return sd.make_sd(self.sd_name, ctx.data, self.cfg, epochs=epochs, augment=augment,
                          gen=ctx.seeds.generator(f"{self.name}/{purpose}/sd"))

    def retrain_objective(self, ctx):
        return self.make_objective(ctx, "retrain", epochs=self.cfg.retrain.epochs, augment=self.cfg.retrain.augment)

    def score(self, ctx, model):
        c = self.cfg
        objective = self.make_objective(ctx, "score", epochs=1, augment=c.score_augment)
        batches = cycle_batches(ctx.data, c.score_batch_size, c.score_augment, ctx.seeds.generator("score"))
        scores, _ = prospr_scores(model, objective, batches, c.inner_steps, c.inner_lr,
                                  list(scoring_params(ctx, model)), fresh_batches=c.inner_batches == "fresh",
                                  autocast=amp_autocast(ctx))
        return scores

    def score_budget(self, b) -> None:
        """``inner_steps + 1`` objective calls on batches of ``score_batch_size`` (with the SD objective's own
        forwards), through hooks on the scored network."""
        c = self.cfg
        b.steps("score", c.inner_steps + 1, c.score_batch_size, self.retrain_rates())

    def retrain_rates(self):
        return {"cs_kd": sd.CSKD, "ps_kd": sd.PSKD, "dlb": sd.DLB}[self.sd_name]


class EPG(EPSD):
    """EPG — early pruning by gradient saliency (our reading; named as a baseline by arXiv 2511.16653).

    The paper's reference for EPG could not be read: EPSD's ProsPr-form saliency (arXiv 2202.08132) with plain
    CE, ProsPr's own scoring, then CE training with the mask fixed, i.e. EPSD (arXiv 2402.00084) without
    self-distillation (docs/methods.md §3). Our reading of the acronym, not a published recipe.
    """

    name = "epg"
    Config = EPGConfig
    sd_name = "ce"

    def make_objective(self, ctx, purpose: str, epochs: int, augment: bool):
        return ctx.trainer.objective()

    def retrain_rates(self):
        return None
