"""The method interface: a :class:`Method` subclass with a ``name`` and a typed ``Config`` is a method.

``Method(node)`` makes the composed ``method`` node a checked ``Config`` instance (``self.cfg``); ``run(ctx)``
returns a :class:`Result`: the pruned model, its masks and the facts the record needs (e.g. CA-KLD's ``gamma``).
``ctx`` is the job's :class:`~kdprune_cli.experiment.services.Context`: ``ctx.data`` and services (``costs``,
``seeds``, ``trainer``, ``evaluator``, ``artifacts``, ``pruner``); procedures/ hold how methods run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional

from hydra.core.config_store import ConfigStore
from torch import nn

from kdprune_cli.config.schema import MethodConfig, method_config
from kdprune_cli.models.masks import Masks

REGISTRY: Dict[str, type["Method"]] = {}


@dataclass
class Result:
    """What a method hands back to the job (``model, masks = result`` unpacks the first two)."""

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
    prunes: ClassVar[Optional[str]] = None  # the granularity it always prunes at whatever the setting; None: the setting

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.name:
            REGISTRY[cls.name] = cls
            ConfigStore.instance().store(group="schema/method", name=cls.name, node=cls.Config)

    def __init__(self, cfg: Any):
        """``cfg``: the ``method`` node (or a ``Config`` instance); checked here, once (raises ConfigError)."""
        self.cfg = method_config(self.Config, cfg)

    @property
    def retrain_kd(self) -> bool | None:
        """Whether retraining distils from the teacher (None where the method has no such switch)."""
        return None

    def variant(self) -> Optional[str]:
        """A short name for a setting that makes this run another variant of the method, to be reported in its
        own row (NutePrune's ``teachers=intact``: ``"intact teacher"``); None: the method as it is. Written to
        the record as ``method_variant``; ``kdprune-report`` labels the row ``<method> [<variant>]``."""
        return None

    @classmethod
    def check_model(cls, model: nn.Module, example) -> None:
        """Check that the method can prune this student (built for the dataset's shape); raise ValueError."""

    def run(self, ctx) -> Result:
        raise NotImplementedError

    def budget(self, b) -> None:
        """Book to ``b`` (a :class:`~kdprune_cli.pruning.budget.Budget`) the samples each stage of :meth:`run` will
        push through its networks, without running it (``kdprune-estimate``); the job books the dense teacher
        and student. A method that cannot say leaves this unimplemented: the estimate names it as not counted."""
        raise NotImplementedError
