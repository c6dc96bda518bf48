"""KD, logit standardisation and CA-KLD against values computed independently with numpy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdprune_cli import losses

ZS = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
ZT = np.array([[2.0, 1.0, 0.0], [1.0, 1.0, 4.0]])
Y = np.array([1, 2])


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def kl(p, q):  # KL(p‖q), batch mean
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))


def std_np(z):
    return (z - z.mean(axis=1, keepdims=True)) / (z.std(axis=1, keepdims=True) + 1e-7)


def t(a):
    return torch.tensor(a, dtype=torch.float64)


def test_standardise_matches_definition():
    got = losses.standardise(t(ZS)).numpy()
    np.testing.assert_allclose(got, std_np(ZS), rtol=1e-12)
    # A literal hand value: row [1, 2, 0.5] has mean 7/6 and population std sqrt(7/18).
    assert got[0, 1] == pytest.approx((2 - 7 / 6) / (math.sqrt(7 / 18) + 1e-7), rel=1e-12)


def test_kd_is_t2_kl_teacher_student():
    T = 4.0
    want = T * T * kl(softmax(ZT / T), softmax(ZS / T))
    assert float(losses.kd_loss(t(ZS), t(ZT), T)) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_cakld_blends_both_directions(gamma):
    T = 2.0
    ps, pt = softmax(std_np(ZS) / T), softmax(std_np(ZT) / T)
    want = T * T * (gamma * kl(ps, pt) + (1 - gamma) * kl(pt, ps))
    got = float(losses.cakld_loss(t(ZS), t(ZT), gamma, T, logit_norm=True))
    assert got == pytest.approx(want, rel=1e-6)


def test_gamma_zero_without_standardisation_is_plain_kd():
    for T in (1.0, 2.0, 4.0):
        assert float(losses.cakld_loss(t(ZS), t(ZT), 0.0, T, logit_norm=False)) == \
            pytest.approx(float(losses.kd_loss(t(ZS), t(ZT), T)), rel=1e-12)


def test_total_loss_mixes_distillation_and_ce_on_raw_logits():
    T, alpha, gamma = 2.0, 0.9, 0.4
    ps, pt = softmax(std_np(ZS) / T), softmax(std_np(ZT) / T)
    distill = T * T * (gamma * kl(ps, pt) + (1 - gamma) * kl(pt, ps))
    ce = float(np.mean(-np.log(softmax(ZS)[np.arange(2), Y])))
    got = losses.total_loss(t(ZS), t(ZT), torch.tensor(Y), alpha=alpha, gamma=gamma, temperature=T, logit_norm=True)
    assert float(got) == pytest.approx(alpha * distill + (1 - alpha) * ce, rel=1e-6)


def test_gamma_auto_is_the_teachers_mean_max_probability():
    teacher = torch.nn.Linear(2, 3, bias=False).double()
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    xs = [torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64), torch.tensor([[3.0, -1.0]], dtype=torch.float64)]
    z = np.array([[1, 2, 3], [0, 0, 0], [3, -1, 2]], dtype=float)
    want = softmax(z).max(axis=1).mean()
    got = losses.teacher_confidence(teacher, ((x, None) for x in xs))
    assert got == pytest.approx(want, rel=1e-6)


def test_gamma_out_of_range_is_refused():
    with pytest.raises(ValueError):
        losses.cakld_loss(t(ZS), t(ZT), 1.5)
