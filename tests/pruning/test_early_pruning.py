"""EPSD / EPG (docs/methods.md §3): ProsPr's saliency and the self-distillation objectives CS-KD, PS-KD, DLB
(kdprune_cli/distill/self_distillation.py)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet
from torch import nn

from kdprune_cli.distill.self_distillation import CSKD, DLB, PSKD
from kdprune_cli.models.masks import prunable_params, sparsity_report
from kdprune_cli.pruning.methods import get_method
from kdprune_cli.pruning.scores.prospr import prospr_scores


def ce64(model, x, y, idx):
    """CE that keeps float64 (the library objectives may up-/down-cast)."""
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def fixed_batches(n_batches, n=6, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        x = torch.randn(n, 1, 5, 5, generator=g, dtype=dtype)
        y = torch.randint(0, classes, (n,), generator=g)
        out.append((x, y, torch.arange(b * n, (b + 1) * n)))
    return out


def tiny64():
    torch.manual_seed(0)
    return TinyNet().double()


# --- ProsPr saliency ---------------------------------------------------------------------------------

def manual_forward(p, x):
    """TinyNet's forward written out by hand from a parameter dict (independent of the module)."""
    h = torch.relu(F.conv2d(x, p["conv.weight"], padding=1)).mean(dim=(2, 3))
    return F.linear(h, p["fc.weight"], p["fc.bias"])


def unrolled_loss(theta0, m, batches, lr):
    """L(θ₁; B₁) with θ₁ = θ₀′ − lr·∇L(θ₀′; B₀) and θ₀′ = θ₀ ⊙ m (mil-ad/prospr), written out explicitly."""
    th = {k: (v * m[k] if k in m else v).clone().requires_grad_(True) for k, v in theta0.items()}
    (x0, y0, _), (x1, y1, _) = batches
    g0 = torch.autograd.grad(F.cross_entropy(manual_forward(th, x0), y0), list(th.values()))
    th1 = {k: (th[k] - lr * g).detach() for k, g in zip(th, g0)}
    return F.cross_entropy(manual_forward(th1, x1), y1).item()


def test_one_inner_step_matches_finite_differences():
    net = tiny64()
    names = list(prunable_params(net))
    batches = fixed_batches(2)
    lr = 0.5
    scores, samples = prospr_scores(net, ce64, iter(batches), inner_steps=1, inner_lr=lr, names=names)
    assert samples == 12
    theta0 = {k: v.detach().clone() for k, v in net.named_parameters()}
    ones = {n: torch.ones_like(theta0[n]) for n in names}
    eps = 1e-6
    for n in names:
        fd = torch.zeros_like(theta0[n])
        for j in range(fd.numel()):
            mp = {k: v.clone() for k, v in ones.items()}
            mm = {k: v.clone() for k, v in ones.items()}
            mp[n].view(-1)[j] += eps
            mm[n].view(-1)[j] -= eps
            diff = unrolled_loss(theta0, mp, batches, lr) - unrolled_loss(theta0, mm, batches, lr)
            fd.view(-1)[j] = diff / (2 * eps)
        torch.testing.assert_close(scores[n], fd.abs(), rtol=1e-5, atol=1e-8)
    # the inner step matters: the score is not the one-step-free SNIP score on the second batch
    snip, _ = prospr_scores(net, ce64, iter(batches[1:]), inner_steps=0, inner_lr=lr, names=names)
    assert not torch.allclose(snip["conv.weight"], scores["conv.weight"])


def half_mse(f, x, t, idx):
    """``L(W) = ½·mean_i ‖W x_i − t_i‖²``: quadratic, so the ProsPr score has a closed form."""
    out = f(x)
    return 0.5 * ((out - t) ** 2).sum(1).mean(), out


def linear_problem(n_batches, n=5, d_in=4, d_out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    net = nn.Linear(d_in, d_out, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(torch.randn(d_out, d_in, generator=g, dtype=torch.float64))
    batches = [(torch.randn(n, d_in, generator=g, dtype=torch.float64),
                torch.randn(n, d_out, generator=g, dtype=torch.float64), torch.arange(n)) for _ in range(n_batches)]
    return net, batches


def closed_form_grad(w, x, t):
    """∇L(W) = (W Xᵀ − Tᵀ) X / n for rows x_i of X; the Hessian acts as V ↦ V·A with A = XᵀX/n."""
    return (x @ w.T - t).T @ x / x.shape[0]


def test_prospr_one_step_closed_form_with_fresh_batches():
    """mil-ad/prospr: W₀′ = W₀ ⊙ m, W₁ = W₀′ − lr·∇L_{B₀}(W₀′); S = |∂L_{B₁}(W₁)/∂m| at m = 1
    = |W₀ ⊙ (G₁ − lr·G₁·A₀)| with G₁ = ∇L_{B₁}(W₁), A₀ = X₀ᵀX₀/n. Masking again at every step (a
    plausible misreading) adds −2·lr·(G₀ ⊙ G₁) inside the absolute value."""
    net, batches = linear_problem(2)
    lr = 0.3
    scores, samples = prospr_scores(net, half_mse, iter(batches), 1, lr, ["weight"])
    assert samples == 10
    w0 = net.weight.detach()
    (x0, t0, _), (x1, t1, _) = batches
    g0 = closed_form_grad(w0, x0, t0)
    w1 = w0 - lr * g0
    g1 = closed_form_grad(w1, x1, t1)
    want = w0 * (g1 - lr * g1 @ (x0.T @ x0 / 5))
    torch.testing.assert_close(scores["weight"], want.abs(), rtol=1e-12, atol=1e-14)
    remasked = want - 2 * lr * g0 * g1
    assert float((remasked.abs() - want.abs()).abs().max()) > 1e-3


def test_prospr_two_steps_closed_form_with_the_same_batch():
    """``inner_batches: same`` (the ProsPr command line's default): every step and the final loss use B₀, so
    S = |W₀ ⊙ (G₂·(I − lr·A)²)| with G₂ = ∇L(W₂); three passes over the one batch."""
    net, batches = linear_problem(3)
    lr = 0.2
    scores, samples = prospr_scores(net, half_mse, iter(batches), 2, lr, ["weight"], fresh_batches=False)
    assert samples == 15
    w0 = net.weight.detach()
    x, t, _ = batches[0]
    w2 = w0
    for _ in range(2):
        w2 = w2 - lr * closed_form_grad(w2, x, t)
    step = torch.eye(4, dtype=torch.float64) - lr * x.T @ x / 5
    want = w0 * (closed_form_grad(w2, x, t) @ step @ step)
    torch.testing.assert_close(scores["weight"], want.abs(), rtol=1e-12, atol=1e-14)
    fresh, _ = prospr_scores(net, half_mse, iter(batches), 2, lr, ["weight"])
    assert not torch.allclose(fresh["weight"], scores["weight"])


def test_prospr_on_resnet56_matches_the_unrolled_reference():
    """One inner step of CE on ResNet-56 (float64, BN in train mode, every parameter updated): with
    θ₁ = θ₀ − lr·g₀ the reference's score is |θ₀ ⊙ (g₁ − lr·H₀g₁)| on the prunable weights, H₀ the Hessian
    of L_{B₀} over all parameters at θ₀ (double backprop, no masks involved)."""
    from torch.func import functional_call

    from kdprune_cli.models import build_model

    torch.manual_seed(0)
    net = build_model("resnet56", 10, 1, 8).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g),
                torch.arange(4)) for _ in range(2)]
    lr = 0.1
    names = list(prunable_params(net))
    scores, _ = prospr_scores(net, ce64, iter(batches), 1, lr, names)

    ref = copy.deepcopy(net).train()
    theta0 = dict(ref.named_parameters())
    (x0, y0, _), (x1, y1, _) = batches
    g0 = torch.autograd.grad(F.cross_entropy(ref(x0), y0), list(theta0.values()), create_graph=True)
    theta1 = {k: (p - lr * gi).detach().requires_grad_(True) for (k, p), gi in zip(theta0.items(), g0)}
    g1 = torch.autograd.grad(F.cross_entropy(functional_call(ref, theta1, (x1,)), y1), list(theta1.values()))
    hg1 = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g0, g1)), list(theta0.values()))
    want = {k: (p.detach() * (a - lr * h)).abs() for (k, p), a, h in zip(theta0.items(), g1, hg1) if k in names}
    scale = max(float(v.max()) for v in want.values())
    for k in names:
        torch.testing.assert_close(scores[k], want[k], rtol=1e-7, atol=1e-10 * scale)


def test_zero_inner_steps_is_snip():
    net = tiny64()
    names = list(prunable_params(net))
    batches = fixed_batches(1)
    scores, _ = prospr_scores(net, ce64, iter(batches), inner_steps=0, inner_lr=0.1, names=names)
    x, y, _ = batches[0]
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    for n, p in prunable_params(net).items():
        torch.testing.assert_close(scores[n], (p * p.grad).abs().detach(), rtol=1e-10, atol=1e-12)


def test_saliency_depends_on_inner_steps_and_leaves_model_untouched():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 25, 3)).double()
    before = copy.deepcopy(net.state_dict())
    names = list(prunable_params(net))
    batches = fixed_batches(4)
    s1, _ = prospr_scores(net, ce64, iter(batches), 1, 0.1, names)
    s2, _ = prospr_scores(net, ce64, iter(batches), 2, 0.1, names)
    s3, _ = prospr_scores(net, ce64, iter(batches), 3, 0.1, names)
    assert not torch.allclose(s1["0.weight"], s2["0.weight"])
    assert not torch.allclose(s2["4.weight"], s3["4.weight"])
    for k, v in net.state_dict().items():  # parameters and BN running statistics unchanged
        assert torch.equal(v, before[k]), k


# --- self-distillation objectives --------------------------------------------------------------------

@pytest.fixture
def digits(make_ctx):
    return make_ctx().data


def spy_fetch(obj) -> list:
    """Record the ``(indices, samples)`` of every fetch of the objective from ``data.train``."""
    fetched, fetch = [], obj.fetch

    def spy(idx, like):
        fetched.append((idx, fetch(idx, like)))
        return fetched[-1][1]
    obj.fetch = spy
    return fetched


def test_cskd_partners_share_class_and_kl_uses_detached_partner(digits):
    obj = CSKD(digits, temperature=4.0, lam=1.0, augment=True, gen=torch.Generator().manual_seed(1))
    idx = torch.arange(0, 200, 3)
    y = digits.train.y[idx]
    p = obj.partners(idx, y)
    assert torch.equal(digits.train.y[p], y)
    assert (p != idx).all()
    assert len(set(obj.partners(idx, y).tolist()) ^ set(p.tolist())) > 0  # fresh draws each call

    torch.manual_seed(0)
    net = TinyNet(classes=10)
    x = digits.normalise(digits.train.x[idx])
    fetched = spy_fetch(obj)
    loss, logits = obj(net, x, y, idx)
    (pidx, xp), = fetched
    assert torch.equal(digits.train.y[pidx], y)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    # reference: the partner prediction as a constant
    with torch.no_grad():
        zp = net(xp)
    z = net(x)
    T = 4.0
    ref = F.cross_entropy(z, y) + T ** 2 * F.kl_div(F.log_softmax(z / T, 1), F.softmax(zp / T, 1),
                                                     reduction="batchmean")
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, torch.autograd.grad(ref, list(net.parameters()))):
        torch.testing.assert_close(g, r)
    # a non-detached partner would give other gradients: the check above can fail
    zp_live = net(xp)
    live = F.cross_entropy(net(x), y) + T ** 2 * F.kl_div(F.log_softmax(net(x) / T, 1), F.softmax(zp_live / T, 1),
                                                         reduction="batchmean")
    g_live = torch.autograd.grad(live, list(net.parameters()))
    assert any(not torch.allclose(a, b) for a, b in zip(grads, g_live))
    assert obj.teacher_samples == len(idx)


def test_pskd_targets_use_previous_epoch_predictions(digits):
    epochs, aT = 4, 0.8
    obj = PSKD(digits, epochs=epochs, alpha_T=aT)
    torch.manual_seed(0)
    net = TinyNet(classes=10)
    idx = torch.tensor([5, 17, 300, 901])
    y = digits.train.y[idx]
    x = digits.normalise(digits.train.x[idx])
    obj.on_epoch_start(0)
    loss0, z0 = obj(net, x, y, idx)
    torch.testing.assert_close(loss0, F.cross_entropy(z0, y))  # first epoch: CE
    p_prev = F.softmax(z0.detach(), 1)
    torch.testing.assert_close(obj.prev[idx], p_prev)
    with torch.no_grad():  # the model moves on: its current predictions differ from the stored ones
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    obj.on_epoch_start(1)
    loss1, z1 = obj(net, x, y, idx)
    a = aT * 2 / epochs
    t = (1 - a) * F.one_hot(y, 10).float() + a * p_prev
    torch.testing.assert_close(loss1, -(t * F.log_softmax(z1, 1)).sum(1).mean())
    assert not torch.allclose(F.softmax(z1.detach(), 1), p_prev)
    torch.testing.assert_close(obj.prev[idx], F.softmax(z1.detach(), 1))  # replaced for the next epoch
    assert obj.prev[0].sum() == 1 and obj.prev[0].max() == 1  # unseen samples keep their one-hot label


def test_dlb_consistency_uses_last_batch_predictions(digits):
    obj = DLB(digits, temperature=3.0, alpha=1.0, augment=False)
    fetched = spy_fetch(obj)
    torch.manual_seed(0)
    net = TinyNet(classes=10)
    i1, i2 = torch.arange(0, 8), torch.arange(40, 48)
    x1, y1 = digits.normalise(digits.train.x[i1]), digits.train.y[i1]
    x2, y2 = digits.normalise(digits.train.x[i2]), digits.train.y[i2]
    loss1, z1 = obj(net, x1, y1, i1)
    torch.testing.assert_close(loss1, F.cross_entropy(z1, y1))  # no last batch yet
    z1 = z1.detach()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    loss2, z2 = obj(net, x2, y2, i2)
    torch.testing.assert_close(fetched[-1][1], x1)  # the last batch's samples, fetched by index
    zp = net(x1)
    T = 3.0
    ref = (F.cross_entropy(torch.cat([zp, z2]), torch.cat([y1, y2]))
           + T ** 2 * F.kl_div(F.log_softmax(zp / T, 1), F.softmax(z1 / T, 1), reduction="batchmean"))
    torch.testing.assert_close(loss2, ref)
    kl_now = F.kl_div(F.log_softmax(zp / T, 1), F.softmax(zp.detach() / T, 1), reduction="batchmean")
    assert kl_now.abs() < 1e-6 < (ref - F.cross_entropy(torch.cat([zp, z2]), torch.cat([y1, y2]))).abs()
    assert obj.extra_samples == 8


# --- the methods end to end ----------------------------------------------------------------------------

def _run(ctx):
    method = get_method(ctx.cfg.method.name)(ctx.cfg.method)
    return method, method.run(ctx)


@pytest.mark.parametrize("sd", ["cs_kd", "dlb"])
def test_epsd_exact_count_and_masked_training(make_ctx, sd):
    ctx = make_ctx("method=epsd", f"method.sd={sd}", "method.score_batch_size=32", "method.retrain.epochs=1",
                   "++method.retrain.eval_every=0", "sparsity=0.8")
    init = ctx.seeds.new_model("student")
    _, (model, masks) = _run(ctx)
    sizes = sum(m.numel() for m in masks.values())
    k = round(0.8 * sizes)
    assert sum(int((~m).sum()) for m in masks.values()) == k
    for n, p in prunable_params(model).items():  # pruned weights zero after training; kept ones moved
        assert (p[~masks[n]] == 0).all()
    rep = sparsity_report(model)
    assert rep["prunable"] - rep["nonzero"] == k
    assert not torch.equal(prunable_params(model)["fc.weight"], prunable_params(init)["fc.weight"])
    st = ctx.costs.stages["retrain"]
    n_train = ctx.data.num_batches("train", 64, drop_last=True) * 64
    if sd == "dlb":  # every step but the first re-forwards the last batch
        assert st.samples == 2 * n_train - 64
    else:  # CS-KD partners are forward-only self-teacher passes
        assert st.samples == n_train and st.teacher_samples == n_train
    assert ctx.costs.stages["score"].samples == 4 * 32 + (3 * 32 if sd == "dlb" else 0)


def test_epg_prunes_like_pskd_epsd_and_differs_from_cskd(make_ctx):
    from kdprune_cli.config.schema import ConfigError

    common = ("method.score_batch_size=32", "method.inner_steps=2")
    scores = {}
    for tag, over in {"epg": ("method=epg",), "ps_kd": ("method=epsd", "method.sd=ps_kd"),
                      "cs_kd": ("method=epsd", "method.sd=cs_kd")}.items():
        ctx = make_ctx(*over, *common)
        m = get_method(ctx.cfg.method.name)(ctx.cfg.method)
        with ctx.costs.stage("score"):
            scores[tag] = m.score(ctx, m.base_model(ctx))
    for n in scores["epg"]:  # PS-KD at initialisation is CE (our documented choice)
        torch.testing.assert_close(scores["epg"][n], scores["ps_kd"][n])
    assert any(not torch.allclose(scores["epg"][n], scores["cs_kd"][n]) for n in scores["epg"])
    ctx = make_ctx("method=epsd", "method.sd=kd")
    with pytest.raises(ConfigError, match="method.sd"):
        get_method("epsd")(ctx.cfg.method)


def test_inner_batches_option_reaches_the_saliency(make_ctx):
    """``inner_batches: same`` scores every inner step and the final loss on the first scoring batch."""
    import itertools

    from kdprune_cli.config.schema import ConfigError
    from kdprune_cli.distill.objectives import CrossEntropy
    from kdprune_cli.pruning.scores.prospr import cycle_batches

    ctx = make_ctx("method=epg", "method.score_batch_size=16", "method.inner_steps=2", "method.inner_batches=same")
    m = get_method("epg")(ctx.cfg.method)
    model = m.base_model(ctx)
    with ctx.costs.count(model, stage="score"):  # as the one-shot procedure books the scoring
        got = m.score(ctx, model)
    assert ctx.costs.stages["score"].samples == 3 * 16
    first = next(cycle_batches(ctx.data, 16, True, ctx.seeds.generator("score")))
    names = list(prunable_params(model))
    want, _ = prospr_scores(model, CrossEntropy(), itertools.repeat(first), 2, 0.1, names)
    fresh_batches = cycle_batches(ctx.data, 16, True, ctx.seeds.generator("score"))
    fresh, _ = prospr_scores(model, CrossEntropy(), fresh_batches, 2, 0.1, names)
    for n in names:
        torch.testing.assert_close(got[n], want[n])
    assert any(not torch.allclose(got[n], fresh[n]) for n in names)
    ctx = make_ctx("method=epsd", "method.inner_batches=new")
    with pytest.raises(ConfigError, match="inner_batches"):
        get_method("epsd")(ctx.cfg.method)
