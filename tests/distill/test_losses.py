"""KD, logit standardisation and CA-KLD against values computed independently with numpy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdprune_cli.distill import losses

ZS = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
ZT = np.array([[2.0, 1.0, 0.0], [1.0, 1.0, 4.0]])
Y = np.array([1, 2])


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def kl(p, q):  # KL(p‖q), batch mean
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))


def std_np(z, ddof=1):
    """Logit standardisation; ddof=1 is torch's default std, which the reference code of Sun et al. uses."""
    return (z - z.mean(axis=1, keepdims=True)) / (z.std(axis=1, keepdims=True, ddof=ddof) + 1e-7)


def t(a):
    return torch.tensor(a, dtype=torch.float64)


def test_standardise_uses_the_unbiased_std_by_default():
    """logit-standardization-KD divides by ``logit.std(dim=-1)``: torch's default, unbiased (N−1) std."""
    z = t(ZS)
    got = losses.standardise(z)
    want = (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-7)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got.numpy(), std_np(ZS), rtol=1e-12)
    # Literal hand values: row [1, 2, 0.5] has mean 7/6, squared deviations summing to 7/6, so the unbiased
    # std is sqrt(7/12) and the population std sqrt(7/18).
    assert float(got[0, 1]) == pytest.approx((2 - 7 / 6) / (math.sqrt(7 / 12) + 1e-7), rel=1e-12)
    pop = losses.standardise(z, unbiased=False)
    assert float(pop[0, 1]) == pytest.approx((2 - 7 / 6) / (math.sqrt(7 / 18) + 1e-7), rel=1e-12)
    np.testing.assert_allclose(pop.numpy(), std_np(ZS, ddof=0), rtol=1e-12)


def test_std_choice_changes_the_standardised_kd_loss_by_the_expected_amount():
    """With C classes the unbiased std is sqrt(C/(C−1)) times the population std, so the standardised logits
    shrink by that factor: at T=2, about 11% lower loss with 10 classes, about 1% with 100."""
    g = torch.Generator().manual_seed(0)
    for c, lo, hi in ((10, 0.07, 0.16), (100, 0.005, 0.02)):
        zs, zt = (torch.randn(64, c, generator=g, dtype=torch.float64) * 3 for _ in range(2))
        unb = float(losses.cakld_loss(zs, zt, 0.0, 2.0))
        pop = float(losses.cakld_loss(zs, zt, 0.0, 2.0, unbiased=False))
        ps, pt = softmax(std_np(zs.numpy(), 0) / 2), softmax(std_np(zt.numpy(), 0) / 2)
        assert pop == pytest.approx(4 * kl(pt, ps), rel=1e-9)
        ps, pt = softmax(std_np(zs.numpy()) / 2), softmax(std_np(zt.numpy()) / 2)
        assert unb == pytest.approx(4 * kl(pt, ps), rel=1e-9)
        assert lo < 1 - unb / pop < hi


def test_cakld_method_threads_logit_std_from_its_config(tiny_cfg):
    """conf/method/cakld.yaml (and cakld_ce, which inherits it) defaults to the reference's unbiased std;
    ``method.logit_std=population`` reaches the loss."""
    from types import SimpleNamespace

    from conftest import TinyNet

    from kdprune_cli.config.schema import ConfigError
    from kdprune_cli.pruning.methods import get_method

    for name in ("cakld", "cakld_ce"):
        assert tiny_cfg(f"method={name}").method.logit_std == "unbiased"
    torch.manual_seed(0)
    teacher, student = TinyNet(classes=3).double(), TinyNet(classes=3).double()
    x, y = torch.randn(5, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    zs, zt = student(x).detach().numpy(), teacher(x).detach().numpy()
    for std, ddof in (("unbiased", 1), ("population", 0)):
        m = get_method("cakld")(tiny_cfg("method=cakld", "method.gamma=0.3", f"method.logit_std={std}").method)
        ctx = SimpleNamespace(extra={}, artifacts=SimpleNamespace(teacher=lambda: teacher))
        loss, _ = m.distill_objective(ctx)(student, x, y, None)
        ps, pt = softmax(std_np(zs, ddof) / 2), softmax(std_np(zt, ddof) / 2)
        ce = float(np.mean(-np.log(softmax(zs)[np.arange(5), y.numpy()])))
        want = 0.9 * 4 * (0.3 * kl(ps, pt) + 0.7 * kl(pt, ps)) + 0.1 * ce
        assert float(loss.detach()) == pytest.approx(want, rel=1e-9), std
    with pytest.raises(ConfigError, match="logit_std"):
        get_method("cakld")(tiny_cfg("method=cakld", "method.logit_std=sample").method)


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
