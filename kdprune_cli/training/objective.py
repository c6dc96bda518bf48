"""What the training loop calls: an objective turns a batch into ``(loss, logits)`` and owns every forward (the
student's, a teacher's, a self-teacher's), so distillation and self-distillation fit the one loop."""
from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import nn


class Objective(Protocol):
    """The members the loop and its compiled forward use; an objective subclasses it for their quiet defaults
    (no teacher, no counted forwards, no epoch or step work, no state) and states only what it adds.

    ``teacher``: a frozen module (or None) whose forward the compiled loop swaps for a compiled one.
    ``teacher_samples``: samples pushed forward through a teacher (or the network as its own teacher, under
    ``no_grad``); ``extra_samples``: samples pushed forward *and* backward beyond the loop's batch (both
    cumulative; the loop books the difference). ``teacher_rate`` and ``extra_rate`` say the same before any
    training: per trained sample, how many go through a teacher and how many more forward and backward (after
    the training's first ``extra_skip`` batches), for ``kdprune-estimate``; ``self_teacher``: the teacher
    forwards go through the network itself (self-distillation, snapshots). ``eager_only``: the objective hooks
    into the model, so the loop never compiles it. ``graph_step``: the objective is :meth:`loss`, a function of
    the batch alone, plus :meth:`count` of its teacher forwards, so ``compile=step`` may trace the loss with the
    backward and the optimizer update into one graph and book the forwards outside it. ``step`` runs after the
    loop's optimizer step (an objective with parameters of its own); ``state_dict``/``load_state_dict`` carry
    what a resumed training needs."""

    teacher: Optional[nn.Module] = None
    teacher_samples: int = 0
    extra_samples: int = 0
    teacher_rate: int = 0
    extra_rate: int = 0
    extra_skip: int = 0
    self_teacher: bool = False
    eager_only: bool = False
    graph_step: bool = False

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.count(x.shape[0])
        return self.loss(model, x, y, idx)

    def loss(self, model, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, logits)`` of a batch, with no Python state changed (an objective with ``graph_step``)."""
        raise NotImplementedError

    def count(self, n: int) -> None:
        """Book the teacher forwards of a batch of ``n`` trained samples."""
        self.teacher_samples += self.teacher_rate * n

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
