"""EPSD and EPG: early pruning with a ProsPr-form saliency, then sparse training (docs/methods.md §3).

Both methods share :func:`prospr_scores`, the saliency of ProsPr (Alizadeh et al., ICLR 2022,
arXiv 2202.08132, Eq. 3–5) taken at (near) initialisation, as its reference code (mil-ad/prospr,
``prospr.py``) computes it:

1. masks ``m = 1`` multiply the initial prunable weights once: ``θ₀′ = θ₀ ⊙ m``;
2. ``i = inner_steps`` differentiable SGD steps on a loss ``L`` update the weights directly, keeping the
   graph: ``θ_{k+1} = θ_k − lr·∇_θ L(θ_k; B_k)`` (``create_graph=True``; every trainable parameter is
   updated — biases and BN affine too; the masks are not applied again);
3. ``S = |∂L(θ_i; B_i)/∂m|`` at ``m = 1``; global (or per-layer, ``prune.scope``) top-k through
   :func:`~kdprune_cli.pruning.masks.select`.

Batches (``inner_batches``): ``fresh`` (default, ProsPr's library default ``new_data_in_inner=True``) draws
a new training batch for every inner step and one more for the final loss, ``inner_steps + 1`` batches of
``score_batch_size`` from one seeded shuffle of the training set (cycling over passes if it is smaller);
``same`` uses one batch for every step and the final loss (the ProsPr command line's default). BN runs in
train mode (batch statistics, as the reference) on copies of the running buffers, so scoring leaves the
model exactly as it was. With ``inner_steps = 0`` the score is SNIP's ``|θ ⊙ ∂L/∂θ|`` (since
∂L/∂m = θ ⊙ ∂L/∂θ at m = 1).
"""
from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
from omegaconf import MISSING
from torch import nn
from torch.func import functional_call

from kdprune_cli.distill import self_distillation as sd
from kdprune_cli.config.schema import ConfigError, MethodConfig, TrainRecipe, follow_student, recipe
from kdprune_cli.pruning.methods.base import OneShot
from kdprune_cli.pruning.masks import Scores, prunable_params
from kdprune_cli.pruning.scores.batches import scoring_autocast

INNER_BATCHES = ("fresh", "same")


def prospr_scores(model: nn.Module, objective: Callable, batches: Iterable, inner_steps: int, inner_lr: float,
                  names: Sequence[str], fresh_batches: bool = True,
                  autocast: Callable = contextlib.nullcontext) -> tuple[Scores, int]:
    """ProsPr meta-gradient saliency ``|∂L(θ_i)/∂m|`` at ``m = 1``, ``θ₀′ = θ₀ ⊙ m``, for the parameters ``names``.

    ``objective(f, x, y, idx) -> (loss, logits)`` is any training objective; ``f`` is the functional
    network (``f(inputs)`` → logits). ``batches`` yields ``(x, y, idx)``; ``inner_steps + 1`` are consumed
    with ``fresh_batches``, one without. Returns the scores and the number of samples pushed forward and
    backward. The model is not changed. ``autocast()`` wraps each forward (bf16 on CUDA with ``amp``); the
    weights θ_k, the masks and the meta-gradient stay float32.
    """
    if inner_steps < 0:
        raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
    named = dict(model.named_parameters())
    names = list(names)
    trainable = [n for n, p in named.items() if p.requires_grad]
    masks = {n: torch.ones_like(named[n], requires_grad=True) for n in names}
    theta = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in named.items()}
    theta = {n: t * masks[n] if n in masks else t for n, t in theta.items()}  # θ₀′ = θ₀ ⊙ m, once
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # BN running stats: copies
    was_training = model.training
    model.train()
    it: Iterator = iter(batches)
    samples = 0

    def loss_at(params, batch):
        x, y, idx = batch
        with autocast():
            loss, _ = objective(lambda inp: functional_call(model, {**params, **buffers}, (inp,)), x, y, idx)
        return loss, x.shape[0]

    try:
        batch = next(it)
        for _ in range(inner_steps):
            loss, n = loss_at(theta, batch)
            grads = torch.autograd.grad(loss, [theta[k] for k in trainable], create_graph=True, allow_unused=True)
            theta = {**theta, **{k: theta[k] - inner_lr * g for k, g in zip(trainable, grads) if g is not None}}
            samples += n
            if fresh_batches:
                batch = next(it)
        loss, n = loss_at(theta, batch)
        samples += n
        gm = torch.autograd.grad(loss, [masks[k] for k in names], allow_unused=True)
    finally:
        model.train(was_training)
    scores = {k: (g.detach().abs() if g is not None else torch.zeros_like(masks[k]).detach())
              for k, g in zip(names, gm)}
    return scores, samples


def cycle_batches(data, batch_size: int, augment: bool, gen: torch.Generator) -> Iterator:
    """Endless shuffled training batches (full batches only), one seeded stream across passes."""
    for _ in itertools.count():
        yield from data.batches("train", batch_size, shuffle=True, augment=augment, gen=gen, drop_last=True)


@dataclass
class EPGConfig(MethodConfig):
    inner_steps: int = MISSING  # ProsPr inner SGD steps (0: SNIP's score)
    inner_lr: float = MISSING
    inner_batches: str = MISSING  # fresh | same
    score_batch_size: int = MISSING
    score_augment: bool = MISSING
    retrain: TrainRecipe = field(default_factory=follow_student)  # our choice: the dense student's budget


@dataclass
class CSKDConfig:
    temperature: float = MISSING
    lam: float = MISSING


@dataclass
class PSKDConfig:
    alpha_T: float = MISSING


@dataclass
class DLBConfig:
    temperature: float = MISSING
    alpha: float = MISSING


@dataclass
class EPSDConfig(EPGConfig):
    sd: str = MISSING  # cs_kd | ps_kd | dlb
    cs_kd: CSKDConfig = field(default_factory=CSKDConfig)
    ps_kd: PSKDConfig = field(default_factory=PSKDConfig)
    dlb: DLBConfig = field(default_factory=DLBConfig)


class EPSD(OneShot):
    """EPSD — Early Pruning with Self-Distillation (Chen et al., AAAI 2024, arXiv 2402.00084).

    Step 1 (prune at initialisation): a fresh student ``ctx.seeds.new_model("student")`` is scored with the
    ProsPr-form saliency (arXiv 2202.08132) of the self-distillation loss: masks multiply the initial
    weights once (``θ₀ ⊙ m``), ``inner_steps`` (3) differentiable SGD steps (lr ``inner_lr`` = 0.1) on
    ``L_SD`` update the weights, then ``S = |∂L_SD(θ_i)/∂m|`` at m = 1 (:func:`prospr_scores`,
    ``inner_batches``); the top ``(1−s)·|P|`` scores are kept (``prune.scope``, exact count).
    Step 2: the sparse network is trained with the same SD loss and the mask fixed (``retrain``).

    ``method.sd``: ``cs_kd`` (default; arXiv 2003.13964), ``ps_kd`` (arXiv 2006.12000) or ``dlb``
    (arXiv 2203.16172), see :mod:`kdprune_cli.sd`. What the SD loss means for the saliency at
    initialisation (our choice; the scoring uses a fresh objective that runs statefully along the
    ``inner_steps + 1`` scoring passes):

    - CS-KD: fully defined (partners drawn from the data; the detached partner prediction uses the
      current inner-step weights θ_t);
    - PS-KD: no previous-epoch predictions exist, so the scoring is the first epoch, i.e. plain CE —
      EPSD with PS-KD prunes exactly like EPG and differs only in training;
    - DLB: the first scoring pass has no last batch (CE); every later pass, and the final loss, uses the
      previous pass's batch and predictions (from the previous inner-step weights, detached) as soft
      targets (with ``inner_batches: same`` that batch is the one scoring batch). With ``inner_steps = 0``
      this is CE.

    No pretrained teacher is used.
    """

    name = "epsd"
    Config = EPSDConfig

    @property
    def sd_name(self) -> str:
        return str(self.cfg.sd)

    def validate(self) -> None:
        c = self.cfg
        if self.sd_name not in sd.SD_NAMES:
            raise ConfigError(f"method.sd must be one of {', '.join(sd.SD_NAMES)}, got {self.sd_name!r}")
        self._validate_common()
        if c.cs_kd.temperature <= 0 or c.dlb.temperature <= 0:
            raise ConfigError("method.cs_kd.temperature and method.dlb.temperature must be > 0")
        if c.cs_kd.lam < 0 or c.dlb.alpha < 0:
            raise ConfigError("method.cs_kd.lam and method.dlb.alpha must be >= 0")
        if not 0.0 <= c.ps_kd.alpha_T <= 1.0:
            raise ConfigError(f"method.ps_kd.alpha_T must be in [0, 1], got {c.ps_kd.alpha_T}")

    def _validate_common(self) -> None:
        c = self.cfg
        if not isinstance(c.inner_steps, int) or c.inner_steps < 0:
            raise ConfigError(f"method.inner_steps must be an integer >= 0, got {c.inner_steps!r}")
        if c.inner_lr < 0:
            raise ConfigError(f"method.inner_lr must be >= 0, got {c.inner_lr}")
        if int(c.score_batch_size) <= 0:
            raise ConfigError(f"method.score_batch_size must be > 0, got {c.score_batch_size}")
        if c.inner_batches not in INNER_BATCHES:
            raise ConfigError(f"method.inner_batches must be one of {', '.join(INNER_BATCHES)}, "
                              f"got {c.inner_batches!r}")

    # --- objectives -----------------------------------------------------------------------------------
    def make_objective(self, ctx, purpose: str, epochs: int, augment: bool):
        """A fresh SD objective; ``purpose`` names its seeded generator (``score`` or ``retrain``)."""
        return sd.make_sd(self.sd_name, ctx.data, self.cfg, epochs=epochs, augment=augment,
                          gen=ctx.seeds.generator(f"{self.name}/{purpose}/sd"))

    def score_objective(self, ctx):
        return self.make_objective(ctx, "score", epochs=1, augment=bool(self.cfg.score_augment))

    def retrain_objective(self, ctx):
        r = recipe(self.cfg.retrain, "method.retrain")
        return self.make_objective(ctx, "retrain", epochs=int(r.epochs), augment=bool(r.augment))

    # --- the method -----------------------------------------------------------------------------------
    def base_model(self, ctx) -> nn.Module:
        """A freshly initialised student: EPSD prunes at initialisation."""
        return ctx.seeds.new_model("student")

    def score(self, ctx, model: nn.Module) -> Scores:
        objective = self.score_objective(ctx)
        names = list(prunable_params(model, ctx.pruner.exclude))
        batches = cycle_batches(ctx.data, int(self.cfg.score_batch_size),
                                bool(self.cfg.score_augment), ctx.seeds.generator("score"))
        with ctx.costs.count(model):
            scores, _ = prospr_scores(model, objective, batches, int(self.cfg.inner_steps),
                                      float(self.cfg.inner_lr), names,
                                      fresh_batches=self.cfg.inner_batches == "fresh",
                                      autocast=lambda: scoring_autocast(ctx))
        return scores

    def run(self, ctx):
        model = self.base_model(ctx)
        t = time.perf_counter()
        with ctx.costs.count(stage="score"):
            scores = self.score(ctx, model)
        pruned = ctx.pruner.prune(model, scores)
        ctx.log({"stage": "score", "round": 1, "sparsity": ctx.pruner.sparsity, "seconds": time.perf_counter() - t,
                 "inner_steps": int(self.cfg.inner_steps), "sd": self.sd_name})
        ctx.evaluator.record_metrics("pruned", pruned.model)
        objective = self.retrain_objective(ctx)
        ctx.trainer.train(pruned.model, self.cfg.retrain, objective, stage="retrain", masks=pruned.masks)
        return pruned


class EPG(EPSD):
    """EPG — early pruning by gradient saliency (our reading; named as a baseline by arXiv 2511.16653).

    The paper's reference for EPG could not be read; we implement it as early pruning by gradient
    saliency: the same ProsPr-form saliency as EPSD (arXiv 2202.08132; ``θ₀ ⊙ m``, ``inner_steps``
    differentiable SGD steps at initialisation, then ``|∂L(θ_i)/∂m|`` at m = 1) with plain CE — ProsPr's
    own loss, so EPG's scoring is ProsPr's (docs/methods.md §3) — followed by ordinary CE
    training of the sparse network with the mask fixed — i.e. EPSD (arXiv 2402.00084) without
    self-distillation. This is our reading of the acronym, not a published recipe.
    """

    name = "epg"
    Config = EPGConfig

    @property
    def sd_name(self) -> str:
        return "ce"

    def validate(self) -> None:  # epg has no method.sd: Hydra refuses the key (use method=epsd)
        self._validate_common()

    def make_objective(self, ctx, purpose: str, epochs: int, augment: bool):
        return ctx.trainer.objective()
