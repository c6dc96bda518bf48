"""Iterative magnitude pruning with rewinding — the lottery-ticket procedure (Frankle & Carbin, ICLR 2019,
arXiv 1803.03635, "Strategy 1: iterative pruning with resetting"; docs/methods.md §4)."""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING
from torch import nn

from kdprune_cli.config.schema import ConfigError, MethodConfig, TrainRecipe, option
from kdprune_cli.models.masks import prunable_params
from kdprune_cli.pruning.methods.base import Method, Result
from kdprune_cli.pruning.procedures.rounds import clone_state, rewind, round_spec, run_rounds
from kdprune_cli.pruning.scores.magnitude import magnitude as magnitudes
from kdprune_cli.training.loop import steps_per_epoch


class RewindPoint:
    """θ_rewind: θ₀ (``epoch`` 0), or the weights after epoch ``epoch`` of the first round (late rewinding,
    Frankle et al. 2019, arXiv 1903.01611), taken by a step hook while that round trains."""

    def __init__(self, model: nn.Module, epoch: int, steps_per_epoch: int):
        self.model, self.epoch, self.at = model, epoch, epoch * steps_per_epoch
        self.state = clone_state(model) if epoch == 0 else None

    def hook(self, step: int, total_steps: int) -> None:
        if self.state is None and step == self.at:
            self.state = clone_state(self.model)

    def trained(self) -> None:
        """After a round's training: ``epoch`` = the round's last epoch takes the weights after training."""
        if self.state is None:
            self.state = clone_state(self.model)

    def stored(self) -> dict:
        """What a shared round must bring besides its masks: the epoch-k weights (none for θ₀)."""
        return {k: v.cpu() for k, v in self.state.items()} if self.epoch > 0 else {}

    def check(self, state: dict) -> None:
        shapes = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        rw = state.get("rewind", {})
        if (self.epoch > 0) != bool(rw) or any(shapes.get(k) != tuple(v.shape) for k, v in rw.items()):
            raise ValueError("a rewind state of another model")


@dataclass
class IMPConfig(MethodConfig):
    rate: float = option("rate")  # fraction of the surviving weights removed per round
    rewind_epoch: int = option("steps")  # 0: rewind to θ₀; k: to the weights after epoch k of the first round
    round: TrainRecipe = MISSING
    retrain: TrainRecipe = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rewind_epoch > self.round.epochs:
            raise ConfigError(f"method.rewind_epoch={self.rewind_epoch} is past the end of a round "
                              f"({self.round.epochs} epochs)")


class IMP(Method):
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019, arXiv 1803.03635, Strategy 1).

    θ₀ = a fresh student init. Each round trains with the current mask (``round``), removes ``rate`` of the
    survivors by |θ| and rewinds the survivors to θ₀ or to the weights after epoch ``rewind_epoch`` of the first
    round, until the target (the last round clipped to it); then ``retrain`` with the mask fixed
    (docs/methods.md §4; channel groups: §7 item 5). Rounds cost and log to the ``imp`` stage.
    """

    name = "imp"
    granularities = ("weight", "channel")
    Config = IMPConfig

    def run(self, ctx) -> Result:
        c = self.cfg
        model = ctx.seeds.new_model("student", name="init")
        point = RewindPoint(model, c.rewind_epoch, steps_per_epoch(ctx.data, c.round.batch_size, ctx.cfg.max_batches))
        progress = ctx.pruner.progress(model)

        def kernel():
            """One round in this job: train with the mask, remove by magnitude, rewind (θ ← θ_rewind ⊙ M)."""
            ctx.trainer.train(model, c.round, ctx.trainer.objective(), stage="imp", masks=progress.masks,
                              step_hook=point.hook)
            point.trained()
            with ctx.costs.count(stage="imp"):
                full = progress.round(magnitudes(prunable_params(model, ctx.pruner.exclude)), c.rate)
                rewind(model, point.state, progress.masks)
            return {**progress.state(), "rewind": point.stored()} if full else None

        def restore(state):
            if point.epoch > 0:
                point.state = {k: v.to(ctx.device) for k, v in state["rewind"].items()}
            rewind(model, point.state, progress.masks)

        spec = round_spec(ctx, "imp", c.round, "method.round", rate=c.rate, rewind_epoch=c.rewind_epoch)
        run_rounds(ctx, "imp", progress, kernel, spec, c.rate, trainings=1, restore=restore, check=point.check)
        masks = progress.final_masks()
        ctx.evaluator.record_metrics("pruned", model)
        ctx.trainer.train(model, c.retrain, ctx.trainer.objective(), stage="retrain", masks=masks)
        return progress.finish(model)

    def budget(self, b) -> None:
        """A training per round (a full round once per sweep: shared), then the retraining."""
        c = self.cfg
        key = b.round_key("imp", c.round, rate=c.rate, rewind_epoch=c.rewind_epoch)
        for r, full in enumerate(b.rounds(c.rate), start=1):
            if not full or b.first(*key, r):
                b.train("imp", c.round, "method.round")
        b.train("retrain", c.retrain, "method.retrain")
