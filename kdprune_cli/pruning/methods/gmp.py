"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune", arXiv 1710.01878, Eq. 1;
docs/methods.md §4): magnitudes on the cubic schedule of :mod:`~kdprune_cli.pruning.procedures.gradual`, then
optional fine-tuning with the mask fixed."""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from kdprune_cli.config.schema import ConfigError, MethodConfig, TrainRecipe, choice, option
from kdprune_cli.models.masks import prunable_params
from kdprune_cli.pruning.methods.base import Method, Result
from kdprune_cli.pruning.procedures.gradual import prune_gradually
from kdprune_cli.pruning.scores.magnitude import magnitude as magnitudes


@dataclass
class GMPConfig(MethodConfig):
    start_from: str = choice("dense", "init")
    initial_sparsity: float = option("sparsity")
    start: float = MISSING  # t₀ as a fraction of the train steps
    end: float = MISSING
    frequency: int = option("count")  # Δt in optimizer steps
    train: TrainRecipe = MISSING
    retrain: TrainRecipe = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ConfigError(f"method.start and method.end must satisfy 0 <= start < end <= 1, got "
                              f"{self.start}, {self.end}")


class GMP(Method):
    """Gradual magnitude pruning with the cubic schedule (Zhu & Gupta 2017, arXiv 1710.01878, Eq. 1).

    Trains the dense student (``start_from: dense``) or a fresh init (``init``) with ``train`` while
    :func:`~kdprune_cli.pruning.procedures.gradual.prune_gradually` removes weights by |θ|, then ``retrain``
    fine-tunes with the mask fixed (0 epochs = none).

    ``pruned`` metrics (our choice): measured inside the hook right after the final pruning step, i.e. the
    weights at the moment the mask first reaches the target, before the remaining steps of ``train`` and
    before ``retrain``. Their evaluation time is booked under ``evaluate``, not ``gmp``.
    """

    name = "gmp"
    Config = GMPConfig
    granularities = ("weight", "channel")  # channel: the schedule removes channel groups (docs/methods.md §7)

    def run(self, ctx) -> Result:
        c = self.cfg
        s_f, s_i = ctx.pruner.sparsity, c.initial_sparsity
        if s_i > s_f:
            raise ConfigError(f"method.initial_sparsity={s_i} is above the target sparsity {s_f}")
        model = ctx.artifacts.dense_student() if c.start_from == "dense" else ctx.seeds.new_model("student", name="init")
        params = prunable_params(model, ctx.pruner.exclude)
        progress, _ = prune_gradually(ctx, model, c.train, "gmp", lambda: magnitudes(params), s_i, c.start, c.end,
                                      c.frequency)
        ctx.trainer.train(model, c.retrain, ctx.trainer.objective(), stage="retrain", masks=progress.masks)
        return progress.finish(model)

    def budget(self, b) -> None:
        b.train("gmp", self.cfg.train, "method.train")
        b.train("retrain", self.cfg.retrain, "method.retrain")
