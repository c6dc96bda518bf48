"""NutePrune: structured progressive pruning with numerous teachers (arXiv 2402.09773), mapped to vision:
hard-concrete gates on a CNN's coupled channel groups or on a timm ViT's heads, MLP channels and hidden width learn
under a Lagrangian, one copy of the weights serving as student and every teacher (with ``lora``: adapters on a
frozen base); the closed structures are then removed. The method, its constants (read from the source,
Lucius-lsr/NutePrune) and our mapping: docs/methods.md §5; the machinery is
:mod:`~kdprune_cli.pruning.procedures.gates`.
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
