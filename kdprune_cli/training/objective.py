"""What the training loop calls: an objective turns a batch into ``(loss, logits)`` and owns every forward
(the student's, a teacher's, a self-teacher's), so distillation and self-distillation fit the one loop.

:class:`Objective` is the protocol the loop relies on; :class:`BaseObjective` gives its quiet defaults (no
teacher, no counted forwards, no epoch or step work, no state), so an objective states only what it adds.
"""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Objective(Protocol):
    """The members the loop and its compiled forward use.

    ``teacher`` is a frozen module (or None) whose forwards the compiled loop may swap for a compiled one;
    ``teacher_samples`` counts samples pushed forward through a teacher (or the network as its own teacher,
    under ``no_grad``), ``extra_samples`` samples pushed forward *and* backward beyond the loop's batch (both
    cumulative; the loop books the difference). ``eager_only``: the objective hooks into the model, so the
    loop never compiles it. ``state_dict``/``load_state_dict`` carry what a resumed training needs."""

    teacher: Optional[nn.Module]
    teacher_samples: int
    extra_samples: int
    eager_only: bool

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def on_epoch_start(self, epoch: int) -> None:
        ...

    def on_epoch_end(self, epoch: int) -> None:
        ...

    def step(self) -> None:
        """After the loop's optimizer step: an objective with parameters of its own steps them."""

    def state_dict(self) -> dict:
        ...

    def load_state_dict(self, state: dict) -> None:
        ...


class BaseObjective:
    """Defaults of every :class:`Objective` member but ``__call__``."""

    teacher: Optional[nn.Module] = None
    teacher_samples = 0
    extra_samples = 0
    eager_only = False

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
