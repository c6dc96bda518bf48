"""Losses: CE, Hinton KD, logit standardisation and CA-KLD (docs/methods.md §1).

Every loss here takes logits and returns a scalar averaged over the batch. The training objectives
(what the trainer calls with a model and a batch) are built on top of these in ``objectives.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS_STD = 1e-7


def standardise(z: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Logit standardisation (Sun et al., CVPR 2024, arXiv 2403.01427, Eq. 3).

    ``z ↦ (z − mean_c z) / (std_c z + 1e-7)`` per sample over the class dimension. ``unbiased`` (default):
    the N−1 std, torch's default, which the authors' code (logit-standardization-KD) uses;
    ``unbiased=False``: the population (N) std of the paper's formula.
    """
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True, unbiased=unbiased)
    return (z - mean) / (std + EPS_STD)


def upcast(z: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (autocast) to float32; float32/float64 stay as they are."""
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def _log_probs(z: torch.Tensor, temperature: float, logit_norm: bool, unbiased: bool = True) -> torch.Tensor:
    z = upcast(z)
    if logit_norm:
        z = standardise(z, unbiased)
    return F.log_softmax(z / temperature, dim=-1)


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_c p (log p − log q), mean over the batch."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
            logit_norm: bool = False) -> torch.Tensor:
    """Hinton et al. 2015 (arXiv 1503.02531): ``T²·KL(softmax(z_T/T) ‖ softmax(z_S/T))``, batch mean
    (:func:`cakld_loss` with ``gamma=0``)."""
    return cakld_loss(student_logits, teacher_logits, 0.0, temperature, logit_norm)


def cakld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, gamma: float,
               temperature: float = 2.0, logit_norm: bool = True, unbiased: bool = True) -> torch.Tensor:
    """CA-KLD (arXiv 2511.16653, distillation loss; the blend is CAKLD of BitDistiller arXiv 2402.10631).

    ``T²·[γ·KL(p_S ‖ p_T) + (1−γ)·KL(p_T ‖ p_S)]`` with ``p = softmax(standardise(z)/T)`` (``unbiased``:
    the std of :func:`standardise`); ``gamma=0`` with ``logit_norm=False`` is :func:`kd_loss`.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    log_ps = _log_probs(student_logits, temperature, logit_norm, unbiased)
    log_pt = _log_probs(teacher_logits, temperature, logit_norm, unbiased)
    loss = (1.0 - gamma) * kl(log_pt, log_ps)
    if gamma > 0:
        loss = loss + gamma * kl(log_ps, log_pt)
    return temperature ** 2 * loss


def total_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
               alpha: float, gamma: float, temperature: float, logit_norm: bool,
               unbiased: bool = True) -> torch.Tensor:
    """docs/methods.md §1: ``L_total = α·L_CA-KLD + (1−α)·CE(z_S, y)`` (CE on raw logits)."""
    distill = cakld_loss(student_logits, teacher_logits, gamma, temperature, logit_norm, unbiased)
    return alpha * distill + (1.0 - alpha) * F.cross_entropy(upcast(student_logits), targets)


@torch.no_grad()
def teacher_confidence(teacher: torch.nn.Module, batches) -> float:
    """γ for ``gamma: auto``: the teacher's mean max-probability (softmax of raw logits, T=1).

    ``batches`` yields ``(x, y)`` pairs; the caller decides how many (``gamma_batches``).
    """
    total, n = 0.0, 0
    for x, _ in batches:
        p = F.softmax(teacher(x).float(), dim=-1)
        total += p.max(dim=-1).values.sum().item()
        n += x.shape[0]
    if n == 0:
        raise ValueError("gamma: auto needs at least one batch")
    return total / n
