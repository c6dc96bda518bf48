"""The method interface and the shared one-shot flow (score → global threshold → retrain).

A method is a subclass of :class:`Method` with a ``name``; ``run(ctx)`` returns a :class:`Result`: the final
pruned model, its masks and the facts the record needs (e.g. CA-KLD's ``gamma``). ``ctx`` is the runner's
:class:`~kdprune_cli.experiment.services.Context`: ``ctx.data`` and services (``costs``, ``seeds``, ``trainer``, ``evaluator``,
``artifacts``, ``pruner``) that book the cost of each stage. One-shot methods only implement :meth:`OneShot.score`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from torch import nn

from kdprune_cli.config.schema import MethodConfig
from kdprune_cli.pruning.masks import Masks, Scores, prunable_params

REGISTRY: Dict[str, type["Method"]] = {}


@dataclass
class Result:
    """What a method hands back to the runner (``model, masks = result`` unpacks the first two)."""

    model: nn.Module
    masks: Masks
    facts: dict = field(default_factory=dict)  # top-level record keys, e.g. {"gamma": 0.97}

    def __iter__(self):
        return iter((self.model, self.masks))


class Method:
    name: ClassVar[str] = ""
    Config: ClassVar[type] = MethodConfig  # typed config, registered as schema/method/<name>
    granularities: ClassVar[tuple] = ("weight",)  # prune.granularity values the method supports
    plans_channels: ClassVar[bool] = True  # channel granularity: ranks channels by Pruner.plan (prune.* caps bind)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.name:
            REGISTRY[cls.name] = cls
            ConfigStore.instance().store(group="schema/method", name=cls.name, node=cls.Config)

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    @property
    def retrain_kd(self) -> bool | None:
        """Whether retraining distils from the teacher (None where the method has no such switch)."""
        return None

    def variant(self) -> Optional[str]:
        """A short name for a setting that makes this run another variant of the method, to be reported in its
        own row (NutePrune's ``teachers=intact``: ``"intact teacher"``); None: the method as it is. Written to
        the record as ``method_variant``; ``kdprune-report`` labels the row ``<method> [<variant>]``."""
        return None

    def validate(self) -> None:
        """Check method-specific options; raise ConfigError."""

    @classmethod
    def check_model(cls, model: nn.Module, example) -> None:
        """Check that the method can prune this student (built for the dataset's shape); raise ValueError."""

    def run(self, ctx) -> Result:
        raise NotImplementedError


class OneShot(Method):
    """Score once, keep the top ``(1−s)·|P|`` scores (or remove the least important channel groups:
    ``prune.granularity=channel``), retrain with the mask fixed (or the smaller model)."""

    granularities = ("weight", "channel")

    def base_model(self, ctx) -> nn.Module:
        """The network to score and prune (default: the trained dense student)."""
        return ctx.artifacts.dense_student()

    def score(self, ctx, model: nn.Module) -> Scores:
        raise NotImplementedError

    def retrain_objective(self, ctx):
        return ctx.trainer.objective()

    def facts(self) -> dict:
        """Facts of this run for the record (none by default)."""
        return {}

    def run(self, ctx) -> Result:
        model = self.base_model(ctx)
        with ctx.costs.count(stage="score"):
            scores = self.score(ctx, model)
        pruned = ctx.pruner.prune(model, scores)
        ctx.evaluator.record_metrics("pruned", pruned.model)
        ctx.trainer.train(pruned.model, self.cfg.retrain, self.retrain_objective(ctx), stage="retrain", masks=pruned.masks)
        return Result(pruned.model, pruned.masks, {**pruned.facts, **self.facts()})


def params_for_scoring(ctx, model: nn.Module) -> Dict[str, nn.Parameter]:
    return prunable_params(model, ctx.pruner.exclude)
