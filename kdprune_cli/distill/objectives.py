"""Training objectives with a pretrained teacher or none: plain cross-entropy and CA-KLD distillation.

Each is a :class:`~kdprune_cli.training.objective.Objective`: the loop calls it with ``(model, x, y, idx)`` to
get ``(loss, logits)``; it owns the student's forward and the teacher's, and counts the teacher's samples.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdprune_cli.distill import losses
from kdprune_cli.training.objective import Objective

LOGIT_STDS = ("unbiased", "population")


class CrossEntropy(Objective):
    graph_step = True

    def loss(self, model: nn.Module, x, y, idx):
        logits = model(x)
        return F.cross_entropy(logits.float(), y), logits


class Distill(Objective):
    """``L_total = α·L_CA-KLD + (1−α)·CE`` against a frozen teacher (docs/methods.md §1).

    ``logit_std``: ``unbiased`` (N−1, the reference code's, default) or ``population`` (N) std in the
    logit standardisation."""

    teacher_rate, graph_step = 1, True  # the teacher sees every batch

    def __init__(self, teacher: nn.Module, *, alpha: float, gamma: float, temperature: float, logit_norm: bool,
                 logit_std: str = "unbiased"):
        if logit_std not in LOGIT_STDS:
            raise ValueError(f"logit_std must be one of {', '.join(LOGIT_STDS)}, got {logit_std!r}")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.alpha, self.gamma, self.temperature, self.logit_norm = alpha, gamma, temperature, logit_norm
        self.unbiased = logit_std == "unbiased"

    def loss(self, model: nn.Module, x, y, idx):
        with torch.no_grad():
            t_logits = self.teacher(x)
        logits = model(x)
        loss = losses.total_loss(logits, t_logits, y, alpha=self.alpha, gamma=self.gamma,
                                 temperature=self.temperature, logit_norm=self.logit_norm, unbiased=self.unbiased)
        return loss, logits
