"""CA-KLD teacher-guided one-shot pruning (arXiv 2511.16653; docs/methods.md §2).

1–2. dense teacher and dense student (cached artifacts of the job);
3.   teacher-guided fine-tuning of the dense student with ``L_total = α·L_CA-KLD + (1−α)·CE`` (§1);
4.   importance ``S_j = Σ_b |θ_j · ∂L_total(x_b, y_b)/∂θ_j|`` over ``score_batches`` batches, BN in eval
     mode, teacher in eval mode under no_grad (:func:`kdprune_cli.pruning.scores.saliency.summed_saliency`);
5.   one global threshold keeps the top ``(1−s)·|P|`` scores;
6.   sparsity-aware retraining with the mask fixed, with KD (``L_total``) or without (CE): ``retrain.kd``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING

from kdprune_cli.config.schema import ConfigError, KDRecipe, MethodConfig, TrainRecipe, choice, option
from kdprune_cli.distill import losses
from kdprune_cli.distill.objectives import LOGIT_STDS, Distill
from kdprune_cli.pruning.procedures.one_shot import OneShot, amp_autocast, scoring_params
from kdprune_cli.pruning.scores.saliency import summed_saliency


@dataclass
class CAKLDConfig(MethodConfig):
    temperature: float = option("positive")
    alpha: float = option("unit")  # L_total = α·L_CA-KLD + (1−α)·CE
    gamma: Any = MISSING  # "auto" or a number in [0, 1]
    gamma_batches: int = option("count")
    logit_norm: bool = MISSING
    logit_std: str = choice(*LOGIT_STDS)  # unbiased | population
    score_batches: Optional[int] = option("count_or_null")  # null: one pass
    score_batch_size: int = option("count")
    finetune: TrainRecipe = MISSING
    retrain: KDRecipe = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        g = self.gamma
        if g != "auto" and not (isinstance(g, (int, float)) and not isinstance(g, bool) and 0.0 <= g <= 1.0):
            raise ConfigError(f"method.gamma must be 'auto' or a number in [0, 1], got {g!r}")


class CAKLD(OneShot):
    name = "cakld"
    Config = CAKLDConfig
    _gamma = None  # measured once per job (gamma: auto), then a fact of the result

    @property
    def retrain_kd(self) -> bool:
        return self.cfg.retrain.kd

    def gamma(self, ctx) -> float:
        """γ: fixed, or the teacher's mean max-probability over ``gamma_batches`` training batches."""
        if self.cfg.gamma != "auto":
            self._gamma = float(self.cfg.gamma)
        if self._gamma is None:
            teacher = ctx.artifacts.teacher()
            batches = ((x, y) for x, y, _ in ctx.data.batches(
                "train", self.cfg.finetune.batch_size, shuffle=True, gen=ctx.seeds.generator("gamma"),
                max_batches=self.cfg.gamma_batches))
            with ctx.costs.count(teacher, stage="gamma"):
                self._gamma = losses.teacher_confidence(teacher, batches)
        return self._gamma

    def facts(self) -> dict:
        return {"gamma": self._gamma}

    def distill_objective(self, ctx):
        c, gamma = self.cfg, self.gamma(ctx)
        return Distill(ctx.artifacts.teacher(), alpha=c.alpha, gamma=gamma, temperature=c.temperature,
                       logit_norm=c.logit_norm, logit_std=c.logit_std)

    def base_model(self, ctx):
        """Step 3: the dense student fine-tuned with L_total (a cached artifact)."""
        art, c = ctx.artifacts, self.cfg
        spec = {"student": art.spec("student"), "teacher": art.spec("teacher"), "gamma": self.gamma(ctx),
                "alpha": c.alpha, "temperature": c.temperature, "logit_norm": c.logit_norm,
                "logit_std": c.logit_std, "recipe": art.recipe_spec(c.finetune, "method.finetune"),
                "seed": ctx.seeds.seed}
        return art.cached_model("finetune", spec, art.dense_student,
                                lambda m, ck: ctx.trainer.train(m, c.finetune, self.distill_objective(ctx),
                                                                stage="finetune", record=False, checkpoint=ck))

    def score(self, ctx, model):
        """Step 4: Σ over batches of |θ ⊙ ∇θ L_total|, BN in eval mode."""
        objective, n = self.distill_objective(ctx), self.cfg.score_batches
        batches = ctx.data.batches("train", self.cfg.score_batch_size, shuffle=n is not None,
                                   gen=ctx.seeds.generator("score"), max_batches=n)
        return summed_saliency(model, scoring_params(ctx, model), batches, objective, autocast=amp_autocast(ctx))

    def retrain_objective(self, ctx):
        return self.distill_objective(ctx) if self.retrain_kd else ctx.trainer.objective()

    def score_budget(self, b) -> None:
        c = self.cfg
        if c.gamma == "auto":
            b.forward("gamma", teacher_samples=b.pass_samples(c.finetune.batch_size, c.gamma_batches))
        spec = (c.gamma, c.gamma_batches, c.alpha, c.temperature, c.logit_norm, c.logit_std, b.cfg.seed)
        if b.first("finetune", b.dense_key("student"), b.dense_key("teacher"), spec,
                   b.recipe_key(c.finetune, "method.finetune")):
            b.train("finetune", c.finetune, "method.finetune", Distill)
        n = b.pass_samples(c.score_batch_size, c.score_batches)
        b.forward("score", samples=n, teacher_samples=n)

    def retrain_rates(self):
        return Distill if self.retrain_kd else None
