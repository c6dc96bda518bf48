"""CA-KLD teacher-guided one-shot pruning (arXiv 2511.16653; docs/methods.md §2).

1–2. dense teacher and dense student (cached artifacts of the runner);
3.   teacher-guided fine-tuning of the dense student with ``L_total = α·L_CA-KLD + (1−α)·CE`` (§1);
4.   importance ``S_j = Σ_b |θ_j · ∂L_total(x_b, y_b)/∂θ_j|`` over ``score_batches`` batches, BN in eval
     mode, teacher in eval mode under no_grad;
5.   one global threshold keeps the top ``(1−s)·|P|`` scores;
6.   sparsity-aware retraining with the mask fixed, with KD (``L_total``) or without (CE): ``retrain.kd``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from omegaconf import MISSING

from kdprune_cli.distill import losses
from kdprune_cli.config.schema import ConfigError, KDRecipe, MethodConfig, TrainRecipe
from kdprune_cli.distill.objectives import LOGIT_STDS, Distill
from kdprune_cli.pruning.methods.base import OneShot, params_for_scoring
from kdprune_cli.pruning.scores.batches import accumulate_saliency_, scoring_autocast


@dataclass
class CAKLDConfig(MethodConfig):
    temperature: float = MISSING
    alpha: float = MISSING  # L_total = α·L_CA-KLD + (1−α)·CE
    gamma: Any = MISSING  # "auto" or a number in [0, 1]
    gamma_batches: int = MISSING
    logit_norm: bool = MISSING
    logit_std: str = MISSING  # unbiased | population
    score_batches: Optional[int] = MISSING  # null: one pass
    score_batch_size: int = MISSING
    finetune: TrainRecipe = MISSING
    retrain: KDRecipe = MISSING

class CAKLD(OneShot):
    name = "cakld"
    _gamma = None  # measured once per job (gamma: auto), then a fact of the result
    Config = CAKLDConfig

    @property
    def retrain_kd(self) -> bool:
        return bool(self.cfg.retrain.kd)

    def validate(self) -> None:
        c = self.cfg
        if not 0.0 <= c.alpha <= 1.0:
            raise ConfigError(f"method.alpha must be in [0, 1], got {c.alpha}")
        if c.temperature <= 0:
            raise ConfigError(f"method.temperature must be > 0, got {c.temperature}")
        if c.gamma != "auto" and not (isinstance(c.gamma, (int, float)) and 0.0 <= c.gamma <= 1.0):
            raise ConfigError(f"method.gamma must be 'auto' or a number in [0, 1], got {c.gamma!r}")
        if self.logit_std not in LOGIT_STDS:
            raise ConfigError(f"method.logit_std must be one of {', '.join(LOGIT_STDS)}, got {self.logit_std!r}")
        if c.score_batches is not None and c.score_batches <= 0:
            raise ConfigError(f"method.score_batches must be > 0 or null (one pass), got {c.score_batches}")

    def gamma(self, ctx) -> float:
        """γ: fixed, or the teacher's mean max-probability over ``gamma_batches`` training batches."""
        if self.cfg.gamma != "auto":
            self._gamma = float(self.cfg.gamma)
        if self._gamma is None:
            teacher = ctx.artifacts.teacher()
            batches = ((x, y) for x, y, _ in ctx.data.batches(
                "train", self.cfg.finetune.batch_size, shuffle=True, gen=ctx.seeds.generator("gamma"),
                max_batches=int(self.cfg.gamma_batches)))
            with ctx.costs.count(teacher, stage="gamma"):
                self._gamma = losses.teacher_confidence(teacher, batches)
        return self._gamma

    def facts(self) -> dict:
        return {"gamma": self._gamma}

    @property
    def logit_std(self) -> str:
        """The std of the logit standardisation: ``unbiased`` (the reference code's) or ``population``."""
        return str(self.cfg.logit_std)

    def distill_objective(self, ctx):
        gamma = self.gamma(ctx)
        return Distill(ctx.artifacts.teacher(), alpha=self.cfg.alpha, gamma=gamma, temperature=self.cfg.temperature,
                       logit_norm=self.cfg.logit_norm, logit_std=self.logit_std)

    def base_model(self, ctx):
        """Step 3: the dense student fine-tuned with L_total (a cached artifact)."""
        art = ctx.artifacts
        spec = {"student": art.spec("student"), "teacher": art.spec("teacher"), "gamma": self.gamma(ctx),
                "alpha": self.cfg.alpha, "temperature": self.cfg.temperature, "logit_norm": self.cfg.logit_norm,
                "logit_std": self.logit_std,
                "recipe": art.recipe_spec(self.cfg.finetune, "method.finetune"), "seed": ctx.seeds.seed}
        return art.cached_model("finetune", spec, art.dense_student,
                                lambda m, ck: ctx.trainer.train(m, self.cfg.finetune, self.distill_objective(ctx),
                                                                stage="finetune", record=False, checkpoint=ck))

    def score(self, ctx, model):
        """Step 4: Σ over batches of |θ ⊙ ∇θ L_total|, BN in eval mode."""
        objective = self.distill_objective(ctx)
        params = params_for_scoring(ctx, model)
        names, plist = list(params), list(params.values())
        acc = [torch.zeros_like(p) for p in plist]  # float32 accumulators, also under bf16 autocast
        model.eval()
        n_batches = self.cfg.score_batches
        bs = int(self.cfg.score_batch_size)
        with ctx.costs.count(model):
            for x, y, idx in ctx.data.batches("train", bs, shuffle=n_batches is not None,
                                              gen=ctx.seeds.generator("score"), max_batches=n_batches):
                with scoring_autocast(ctx):
                    loss, _ = objective(model, x, y, idx)
                grads = torch.autograd.grad(loss, plist, allow_unused=True)
                accumulate_saliency_(acc, plist, grads)  # Σ_b |θ ⊙ ∇L_b|, fused over the tensors
        model.zero_grad(set_to_none=True)
        model.train()
        return dict(zip(names, acc))

    def retrain_objective(self, ctx):
        return self.distill_objective(ctx) if self.retrain_kd else ctx.trainer.objective()
