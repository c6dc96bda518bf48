"""NutePrune: structured progressive pruning with numerous teachers (arXiv 2402.09773; docs/methods.md §5); the
machinery is :mod:`~kdprune_cli.pruning.procedures.gates`.

Vision adaptation for CNNs and timm ViTs (our mapping of the LLaMA source, Lucius-lsr/NutePrune, read for its
constants). For ViTs the structures are attention heads, MLP channels and the hidden width shared by all
blocks, with a LayerNorm over the kept dims (:mod:`~kdprune_cli.pruning.structure.vit`); LoRA adapts the q and
v blocks of the fused qkv only, as the source adapts q_proj and v_proj. For CNNs:

1. **Hard-concrete (L0) gates** on every coupled channel group
   (:class:`~kdprune_cli.pruning.structure.channels.ChannelGroups`): the inner channels of each residual block,
   one shared gate vector per residual stage for the channels the additions carry, every conv's outputs in VGG,
   MobileNetV2's expanded and block channels. A gate multiplies
   the output of every BatchNorm over its channels (after BN, before the activation; pre-activation nets also
   gate the convs that write into the additions, so the residual stream is zero on a closed channel). Constants
   as the source: β=2/3, l=−0.1, r=1.1, ``log α ~ N(log((1−d)/d), 0.01)`` with ``d = droprate_init``
   (0.01 as the source's script: the gates start open; its code default is 0.5), clamped to
   ``[log 1e-2, log 1e2]`` (±4.6) after each step; AdamW with lr 0.1 for ``log α``.
2. **Expected remaining size** from the gates' open probabilities ``P(z>0) = 1 − Q(0)`` with the
   architecture's real parameter (or MAC) counts, per layer ``E[out]·E[in]·k``, so ``sparsity`` means the
   fraction of prunable weights removed as everywhere (``prune.target=macs``: of MACs). Lagrangian
   ``λ1·(ŝ−t)+λ2·(ŝ−t)²``, ``t`` ramped linearly from 0 to the target over ``ramp_epochs``
   (``ramp_epochs=0``: the full target from the first step, as the source without a Lagrangian warm-up), λ by
   gradient ascent (AdamW, lr −0.1). ViT MACs include attention's ``Q·Kᵀ`` and ``A·V`` per kept head.
3. **One copy of the weights** serves as student and every teacher: the base is frozen and the student trains
   LoRA adapters (peft, on every Conv2d and Linear, r=8, α=8) by the one trainer; ``lora=false`` trains the
   weights directly and keeps snapshot copies of them. A snapshot (deterministic gates + the adapters) is
   taken each time the expected sparsity passes the next multiple of ``delta`` (1%) below the target. The
   teacher follows the source's schedule exactly: the intact model (no adapters, gates open) until
   ``teacher_ahead`` (10) snapshots exist, then the snapshot ``teacher_ahead`` back; once the target is
   reached, ``phase = remaining_steps // (steps_left_at_target // (N+1)) − teacher_ahead`` (clipped to
   ``N−1``) walks back toward the intact model, which teaches the last ``teacher_ahead`` intervals.
   ``teachers=intact`` is the ablation with the intact model as the only teacher.
4. **Loss**, distillation only: ``0.1·τ²·KL(p_T^τ ‖ p_S^τ)`` (τ=2/3) + ``0.9·Σ_blocks MSE`` of the block
   outputs over the positions where the student's output is non-zero (as the source), + the Lagrangian.
   BatchNorm stays in eval mode with its statistics frozen while the gates learn.
5. **Export**: the deterministic gates (the source's: ``sigmoid(log α/β·0.8)``, the expected number of zeros
   set to 0) keep their soft values and are folded into the BatchNorm scale and shift, the adapters are
   merged, and the channels with z=0 are removed physically (Torch-Pruning), so the saved model is
   really smaller; its outputs equal the gated model's. ``retrain`` (epochs 0 by default, as the source's
   pruning run) optionally fine-tunes the exported model with CE (our choice, like the source's separate
   LoRA fine-tuning step). Layers with no BatchNorm on their channels are refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from typing import Optional

from omegaconf import MISSING
from torch import nn

from kdprune_cli.config.schema import ConfigError, MethodConfig, TrainRecipe, choice, option
from kdprune_cli.pruning.methods.base import Method, Result
from kdprune_cli.pruning.procedures.gates import NuteObjective, export, learn_gates
from kdprune_cli.pruning.structure.channels import ChannelGroups
from kdprune_cli.pruning.structure.conv_gates import gate_points
from kdprune_cli.pruning.structure.vit import check_vit, is_vit


@dataclass
class NutePruneConfig(MethodConfig):
    prune: TrainRecipe = MISSING  # the recipe of the adapters (or weights) while the gates learn
    ramp_epochs: int = option("steps")  # the target ramps linearly from 0 over this many epochs (0: full from the start)
    mask_lr: float = option("positive")
    lambda_lr: float = option("positive")
    droprate_init: float = MISSING
    beta: float = MISSING  # hard-concrete temperature
    lora: bool = MISSING
    lora_r: int = option("count")
    lora_alpha: int = option("nonnegative")
    teachers: str = choice("snapshots", "intact")  # intact: the ablation, the intact model the only teacher
    teacher_ahead: int = option("steps")
    delta: float = MISSING
    temperature: float = option("positive")  # τ of the logit distillation
    kd_weight: float = option("nonnegative")
    hidden_weight: float = option("nonnegative")
    retrain: TrainRecipe = MISSING  # after export, CE retraining of the smaller model (epochs 0: none, as the source)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.droprate_init < 1:
            raise ConfigError(f"method.droprate_init must be in (0, 1), got {self.droprate_init}")
        if not 0 < self.delta < 1 or self.teacher_ahead < 1 or self.beta <= 0:
            raise ConfigError("method.delta must be in (0, 1), method.teacher_ahead >= 1, method.beta > 0, "
                              "method.ramp_epochs >= 0")
        if self.lora and find_spec("peft") is None:
            raise ConfigError("method=nuteprune with method.lora=true needs peft: pip install '.[nuteprune]' "
                              "(or method.lora=false)")


class NutePrune(Method):
    """NutePrune (arXiv 2402.09773), structured, progressive, many teachers; vision mapping for CNNs."""

    name = "nuteprune"
    Config = NutePruneConfig
    # Structured whatever prune.granularity says: the gates learn the widths and the export removes channels
    # (heads, widths on a ViT). Either setting is accepted and runs the same job; ``prunes`` is what it does.
    granularities = ("weight", "channel")
    prunes = "channel"
    plans_channels = False  # the gates learn the widths (each group keeps one channel), not Pruner.plan

    @classmethod
    def check_model(cls, model: nn.Module, example) -> None:
        """Plain timm ViTs, and CNNs with a BatchNorm after every producing conv (checked before any training)."""
        if is_vit(model):
            return check_vit(model)
        if any(type(m).__name__.endswith("Attention") for m in model.modules()):
            raise ValueError("method=nuteprune supports plain timm ViTs and CNNs with BN; this model has attention "
                             "outside a ViT")
        gate_points(model, ChannelGroups(model, example))  # raises for channels that pass through no BatchNorm

    def run(self, ctx) -> Result:
        c = self.cfg
        model, structures, objective = learn_gates(ctx, ctx.artifacts.dense_student(), c)
        model, facts = export(ctx, model, structures, objective, c.lora)
        if c.retrain.epochs > 0:
            ctx.trainer.train(model, c.retrain, ctx.trainer.objective(), stage="retrain")
        return Result(model, {}, {"structure": facts})

    def budget(self, b) -> None:
        """The gates' training (a teacher forward per batch), then the optional retraining."""
        b.train("prune", self.cfg.prune, "method.prune", NuteObjective)
        if self.cfg.retrain.epochs > 0:
            b.train("retrain", self.cfg.retrain, "method.retrain")

    def variant(self) -> Optional[str]:
        """``teachers=intact`` (the ablation) is reported as its own row: ``nuteprune [intact teacher]``."""
        return "intact teacher" if self.cfg.teachers == "intact" else None
