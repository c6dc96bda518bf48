"""Classic pruning scores (docs/methods.md §4): random, magnitude, SNIP, GraSP, SynFlow.

Each test checks a property that fails if the algorithm is wrong: exact removed counts in both scopes,
hand-computed SNIP and magnitude scores, GraSP's Hessian–gradient product against a finite difference of
the gradient, SynFlow's independence of the data and its iterative schedule avoiding layer collapse.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet
from torch import nn

from kdprune_cli.config.schema import ConfigError
from kdprune_cli.models.masks import prunable_params, select, sparsity_report
from kdprune_cli.pruning.methods import get_method
from kdprune_cli.pruning.methods.synflow import linearised_copy, schedule, synflow_scores
from kdprune_cli.pruning.scores.grasp import balanced_batch, hessian_gradient_product

METHODS = ["random", "magnitude", "snip", "grasp", "synflow"]


@pytest.fixture(autouse=True)
def one_thread():
    """This 2-core machine is shared; one intra-op thread avoids oversubscription (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def method_of(ctx):
    """The method as the job makes it: its config is checked when it is made."""
    return get_method(ctx.cfg.method.name)(ctx.cfg.method)


def scored(ctx, net):
    """The method's scores of ``net``, the forwards booked as the one-shot procedure books them."""
    with ctx.costs.count(net):
        return method_of(ctx).score(ctx, net)


# --- exact counts and scope ------------------------------------------------------------------------

@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("name", METHODS)
def test_exact_count_and_scope(make_ctx, name, scope):
    extra = {"magnitude": ["method.at_init=true"], "synflow": ["method.rounds=4"]}.get(name, [])
    ctx = make_ctx(f"method={name}", "method.retrain.epochs=0", "sparsity=0.9", f"prune.scope={scope}", *extra)
    model, masks = method_of(ctx).run(ctx)
    sizes = {n: p.numel() for n, p in prunable_params(model).items()}
    total = sum(sizes.values())
    k = round(0.9 * total)
    assert set(masks) == set(sizes)
    assert sum(int((~m).sum()) for m in masks.values()) == k
    rep = sparsity_report(model)
    assert rep["prunable"] - rep["nonzero"] == k  # counted from the weights themselves
    if scope == "layer":
        for n, m in masks.items():
            removed = int((~m).sum())
            assert abs(removed - 0.9 * sizes[n]) < 1.0, n
    else:  # one threshold: the per-layer ratios differ (except for random, whose ratios are ≈ s)
        ratios = [float((~m).float().mean()) for m in masks.values()]
        if name != "random":
            assert max(ratios) - min(ratios) > 0.05
    assert "pruned" in ctx.evaluator.metrics and ctx.costs.stages["score"].samples >= 0


@pytest.mark.parametrize("name", ["snip", "synflow"])
def test_exclude_is_left_dense(make_ctx, name):
    ctx = make_ctx(f"method={name}", "method.retrain.epochs=0", "prune.exclude=[conv1,fc]", "method.rounds=3"
                   if name == "synflow" else "method.batches=1")
    model, masks = method_of(ctx).run(ctx)
    assert "conv1.weight" not in masks and "fc.weight" not in masks
    assert bool((model.conv1.weight != 0).all()) and bool((model.fc.weight != 0).all())
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(ctx.pruner.sparsity * total)


# --- random and magnitude --------------------------------------------------------------------------

def test_random_is_seeded_and_layer_blind(make_ctx):
    def masks_for(seed):
        ctx = make_ctx("method=random", f"seed={seed}")
        m = method_of(ctx)
        model = m.base_model(ctx)
        return select(m.score(ctx, model), ctx.pruner.sparsity, "global")

    a, b, c = masks_for(0), masks_for(0), masks_for(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    for n, m in a.items():  # i.i.d. scores: every big layer keeps ≈ 1−s whatever its weights
        if m.numel() >= 9000:
            assert abs(float(m.float().mean()) - 0.1) < 0.02, n


def test_magnitude_scores_and_base_model(make_ctx):
    ctx = make_ctx("method=magnitude")
    net = TinyNet(in_ch=1, classes=10)
    m = method_of(ctx)
    scores = m.score(ctx, net)
    assert torch.equal(scores["conv.weight"], net.conv.weight.detach().abs())
    assert torch.equal(scores["fc.weight"], net.fc.weight.detach().abs())
    masks = select(scores, 0.5, "global")
    w = torch.cat([net.conv.weight.detach().flatten(), net.fc.weight.detach().flatten()]).abs()
    keep = torch.cat([masks["conv.weight"].flatten(), masks["fc.weight"].flatten()])
    assert int((~keep).sum()) == round(0.5 * w.numel()) and w[keep].min() >= w[~keep].max()
    # at_init=false prunes the trained dense student, at_init=true the fresh initialisation
    dense, init = ctx.artifacts.dense_student(), ctx.seeds.new_model("student")
    trained = m.base_model(ctx)
    assert torch.equal(trained.conv1.weight, dense.conv1.weight)
    assert not torch.equal(trained.conv1.weight, init.conv1.weight)
    ctx2 = make_ctx("method=magnitude", "method.at_init=true")
    assert torch.equal(method_of(ctx2).base_model(ctx2).conv1.weight, init.conv1.weight)


# --- SNIP ------------------------------------------------------------------------------------------

def tinynet_grads_by_hand(net: TinyNet, x, y):
    """∂CE/∂W for TinyNet written out (im2col convolution, ReLU mask, mean pool, softmax), no autograd."""
    b = x.shape[0]
    wc = net.conv.weight.detach().reshape(2, -1)  # 2×9
    cols = F.unfold(x, 3, padding=1)  # b×9×64
    pre = torch.einsum("ck,bkp->bcp", wc, cols)  # b×2×64
    h = pre.clamp_min(0).mean(2)  # b×2
    wf, bf = net.fc.weight.detach(), net.fc.bias.detach()
    p = torch.softmax(h @ wf.T + bf, 1)
    dz = (p - F.one_hot(y, wf.shape[0]).to(p.dtype)) / b
    g_fc = dz.T @ h
    dpre = (dz @ wf)[:, :, None] / pre.shape[2] * (pre > 0).to(p.dtype)
    g_conv = torch.einsum("bcp,bkp->ck", dpre, cols).reshape(net.conv.weight.shape)
    return {"conv.weight": g_conv, "fc.weight": g_fc}


def test_snip_scores_match_hand_computation(make_ctx):
    ctx = make_ctx("method=snip", "method.batches=3", "method.batch_size=16")
    torch.manual_seed(1)
    net = TinyNet(in_ch=1, classes=10)
    scores = scored(ctx, net)
    batches = [(x, y) for x, y, _ in ctx.data.batches("train", 16, shuffle=True, gen=ctx.seeds.generator("snip"),
                                                       max_batches=3)]
    assert len(batches) == 3
    grads = [tinynet_grads_by_hand(net, x, y) for x, y in batches]
    for n, p in (("conv.weight", net.conv.weight), ("fc.weight", net.fc.weight)):
        g = sum(gr[n] for gr in grads) / 3
        expected = (p.detach() * g).abs()
        torch.testing.assert_close(scores[n], expected, rtol=1e-4, atol=1e-7)
    assert set(scores) == {"conv.weight", "fc.weight"}
    assert ctx.costs.current.samples == 48


def test_snip_scores_with_bn_in_eval_mode_by_default(make_ctx):
    """snip-public (is_train=False) and Synaptic-Flow's prune_loop (model.eval()) score with BN running
    statistics; batch statistics are the option. On ResNet-56 the two modes give different scores."""
    from kdprune_cli.models import build_model

    def snip_by_hand(net, x, y, train_mode):
        net = copy.deepcopy(net).train(train_mode)
        params = prunable_params(net)
        g = torch.autograd.grad(F.cross_entropy(net(x), y), list(params.values()))
        return {n: (p.detach() * gi).abs() for (n, p), gi in zip(params.items(), g)}

    torch.manual_seed(0)
    net = build_model("resnet56", 10, 1, 8)
    before = copy.deepcopy(net.state_dict())
    got = {}
    for mode in ("default", "train"):
        ctx = make_ctx("method=snip", "method.batch_size=8", *([] if mode == "default" else ["method.bn_mode=train"]))
        got[mode] = method_of(ctx).score(ctx, net)
    x, y, _ = next(iter(ctx.data.batches("train", 8, shuffle=True, gen=ctx.seeds.generator("snip"), max_batches=1)))
    want = {"default": snip_by_hand(net, x, y, False), "train": snip_by_hand(net, x, y, True)}
    for mode in got:
        for n in want[mode]:
            torch.testing.assert_close(got[mode][n], want[mode][n], rtol=1e-4, atol=1e-9 * float(want[mode][n].max()))
    assert not torch.allclose(want["default"]["conv1.weight"], want["train"]["conv1.weight"], rtol=1e-2)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # BN statistics untouched


# --- GraSP -----------------------------------------------------------------------------------------

def fd_hessian_vector(net, params, x, y, v, temperature, eps):
    """(g(θ+εv) − g(θ−εv)) / 2ε by plain first-order autograd at two shifted points."""
    names = list(params)

    def grad_at(sign):
        with torch.no_grad():
            for n in names:
                params[n].add_(sign * eps * v[n])
        g = torch.autograd.grad(F.cross_entropy(net(x) / temperature, y), [params[n] for n in names])
        with torch.no_grad():
            for n in names:
                params[n].sub_(sign * eps * v[n])
        return dict(zip(names, g))

    gp, gm = grad_at(1.0), grad_at(-1.0)
    return {n: (gp[n] - gm[n]) / (2 * eps) for n in names}


@pytest.mark.parametrize("temperature", [200.0, 1.0])
def test_grasp_hg_matches_finite_difference(temperature):
    torch.manual_seed(0)
    net = TinyNet(in_ch=1, classes=3).double()
    x, y = torch.randn(12, 1, 5, 5, dtype=torch.float64), torch.arange(12) % 3
    params = prunable_params(net)
    g, hg = hessian_gradient_product(net, params, x, y, temperature)
    ref_g = torch.autograd.grad(F.cross_entropy(net(x) / temperature, y), list(params.values()))
    for (n, a), b in zip(g.items(), ref_g):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    v = {n: t.detach().clone() for n, t in g.items()}
    gnorm = torch.sqrt(sum((t ** 2).sum() for t in v.values()))
    fd = fd_hessian_vector(net, params, x, y, v, temperature, eps=1e-5 / float(gnorm))
    scale = max(float(t.abs().max()) for t in hg.values())
    assert scale > 0
    for n in hg:
        assert float((hg[n] - fd[n]).abs().max()) <= 1e-6 * scale, n
    # chunking is only a memory knob: the same L (mean over the batch) and the same Hg
    _, hg_chunked = hessian_gradient_product(net, params, x, y, temperature, chunk_size=5)
    for n in hg:
        torch.testing.assert_close(hg_chunked[n], hg[n], rtol=1e-10, atol=1e-14 * scale)


def test_grasp_score_is_theta_times_hg_on_a_balanced_batch(make_ctx):
    """The ``shuffled`` option: one shuffled class-balanced batch, the mean loss over it."""
    ctx = make_ctx("method=grasp", "method.samples_per_class=4", "method.temperature=50", "method.batching=shuffled")
    x, y = balanced_batch(ctx.data, 4, ctx.seeds.generator("grasp"))
    assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 4))
    torch.manual_seed(3)
    net = TinyNet(in_ch=1, classes=10).double()
    scores = scored(ctx, net)
    params = prunable_params(net)
    x = x.double()
    g = dict(zip(params, torch.autograd.grad(F.cross_entropy(net(x) / 50.0, y), list(params.values()))))
    gnorm = torch.sqrt(sum((t ** 2).sum() for t in g.values()))
    fd = fd_hessian_vector(net, params, x, y, g, 50.0, eps=1e-5 / float(gnorm))
    scale = max(float((params[n].detach() * fd[n]).abs().max()) for n in fd)
    for n, p in params.items():  # higher = keep: +θ⊙Hg (GraSP removes the largest −θ⊙Hg)
        assert float((scores[n] - p.detach() * fd[n]).abs().max()) <= 1e-5 * scale, n
    assert ctx.costs.current.samples == 2 * 40


def test_grasp_default_is_the_references_two_class_sorted_halves(make_ctx):
    """alecwangcq/GraSP: the class-balanced batch is concatenated class after class and split in two halves;
    each half is one forward (BN in train mode: its own batch statistics), ``g = ∇L₁ + ∇L₂`` and
    ``Hg = Σ_h ∇(gᵀ∇L_h)``. Re-derived here on ResNet-56 (float64); one shuffled batch (``batching:
    shuffled``) scores differently, beyond the constant factor that the ranking ignores."""
    from kdprune_cli.models import build_model

    spc, T = 3, 200.0
    ctx = make_ctx("method=grasp", f"method.samples_per_class={spc}")
    torch.manual_seed(0)
    net = build_model("resnet56", 10, 1, 8).double()
    got = scored(ctx, net)
    assert ctx.costs.current.samples == 2 * 10 * spc
    # the same draws as the method's; sorted by class, the halves are classes 0–4 and 5–9
    x, y = balanced_batch(ctx.data, spc, ctx.seeds.generator("grasp"))
    order = torch.argsort(y, stable=True)
    x, y = x[order].double(), y[order]
    half = len(y) // 2
    assert set(y[:half].tolist()) == set(range(5)) and set(y[half:].tolist()) == set(range(5, 10))
    ref = copy.deepcopy(net).train()
    weights = list(prunable_params(ref).values())
    halves = [(x[:half], y[:half]), (x[half:], y[half:])]
    g = [sum(gs) for gs in zip(*(torch.autograd.grad(F.cross_entropy(ref(xh) / T, yh), weights) for xh, yh in halves))]
    hg = [torch.zeros_like(w) for w in weights]
    for xh, yh in halves:
        gf = torch.autograd.grad(F.cross_entropy(ref(xh) / T, yh), weights, create_graph=True)
        for a, b in zip(hg, torch.autograd.grad(sum((gi * fi).sum() for gi, fi in zip(g, gf)), weights)):
            a += b
    want = torch.cat([(w.detach() * h).flatten() for w, h in zip(weights, hg)])
    ours = torch.cat([v.flatten() for v in got.values()])
    torch.testing.assert_close(ours, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))
    ctx2 = make_ctx("method=grasp", f"method.samples_per_class={spc}", "method.batching=shuffled")
    shuffled = torch.cat([v.flatten() for v in method_of(ctx2).score(ctx2, net).values()])
    scale = float(want @ shuffled) / float(shuffled @ shuffled)  # best constant factor
    assert float((scale * shuffled - want).abs().max()) > 0.1 * float(want.abs().max())


# --- SynFlow ---------------------------------------------------------------------------------------

def test_synflow_score_by_hand_on_a_linear_chain():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))
    before = [p.detach().clone() for p in net.parameters()]
    lin = linearised_copy(net)
    s = synflow_scores(lin, {"0.weight": lin[0].weight, "1.weight": lin[1].weight}, (4,))
    w1, w2 = before[0].double().abs(), before[1].double().abs()
    # R = 1ᵀ|W2||W1|1: ∂R/∂|W1|_ij = Σ_k |W2|_ki, ∂R/∂|W2|_ki = Σ_j |W1|_ij
    torch.testing.assert_close(s["0.weight"], w1 * w2.sum(0)[:, None], rtol=1e-12, atol=0)
    torch.testing.assert_close(s["1.weight"], w2 * w1.sum(1)[None, :], rtol=1e-12, atol=0)
    assert s["0.weight"].dtype == torch.float64
    for p, b in zip(net.parameters(), before):  # the pruned network keeps its signs and dtype
        assert torch.equal(p, b)


def test_synflow_ignores_the_data(make_ctx):
    ctx_a = make_ctx("method=synflow", "method.rounds=3")
    ctx_b = make_ctx("method=synflow", "method.rounds=3")
    g = torch.Generator().manual_seed(0)
    for split in (ctx_b.data.train, ctx_b.data.test):
        split.x = torch.randint(0, 256, split.x.shape, generator=g, dtype=torch.uint8)
        split.y = split.y[torch.randperm(len(split.y), generator=g)]
    ctx_b.data.mean, ctx_b.data.std = ctx_b.data.mean + 0.3, ctx_b.data.std * 2
    ma, mb = method_of(ctx_a), method_of(ctx_b)
    model_a, model_b = ma.base_model(ctx_a), mb.base_model(ctx_b)
    sa, sb = ma.score(ctx_a, model_a), mb.score(ctx_b, model_b)
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    with ctx_a.costs.stage("score"), ctx_b.costs.stage("score"):
        pa, pb = ma.prune(ctx_a, model_a).masks, mb.prune(ctx_b, model_b).masks
    assert all(torch.equal(pa[n], pb[n]) for n in pa)


def test_synflow_schedule():
    s = schedule(0.99, 100)
    assert len(s) == 100 and s[-1] == 0.99
    for k in (1, 10, 50, 99):
        assert s[k - 1] == pytest.approx(1 - 0.01 ** (k / 100), rel=1e-12)
    assert all(a < b for a, b in zip(s, s[1:]))
    assert schedule(0.9, 1) == [0.9]


def test_synflow_iterative_avoids_layer_collapse(make_ctx):
    """At s=0.99 on ResNet-20, one-shot SynFlow empties whole layers; the iterative schedule does not."""
    def prune(rounds):
        ctx = make_ctx("method=synflow", f"method.rounds={rounds}", "sparsity=0.99")
        logged = []
        ctx.log = logged.append
        m = method_of(ctx)
        model = m.base_model(ctx)
        with ctx.costs.stage("score"):
            masks = m.prune(ctx, model).masks
        total = sum(v.numel() for v in masks.values())
        assert sum(int((~v).sum()) for v in masks.values()) == round(0.99 * total)
        assert [r["round"] for r in logged] == list(range(1, rounds + 1))
        assert ctx.costs.stages["score"].samples == rounds
        dens = [float(v.float().mean()) for v in masks.values()]
        return sum(d == 0 for d in dens), min(dens)

    collapsed_1, min_1 = prune(1)
    collapsed_n, min_n = prune(10)
    assert collapsed_1 >= 1 and collapsed_n == 0
    assert min_n > min_1


def float64_synflow_masks(net, shape, sparsity, rounds):
    """SynFlow's loop with the ranking written out: one float64 argsort per round, pruned weights first."""
    lin = linearised_copy(net)
    params = prunable_params(lin)
    keep = torch.ones(sum(p.numel() for p in params.values()), dtype=torch.bool)
    for s_k in schedule(sparsity, rounds):
        flat = torch.cat([v.flatten() for v in synflow_scores(lin, params, shape).values()])
        assert flat.dtype == torch.float64 and torch.isfinite(flat).all()
        flat[~keep] = -float("inf")
        keep[torch.argsort(flat, stable=True)[:round(s_k * flat.numel())]] = False
        with torch.no_grad():
            for p, m in zip(params.values(), torch.split(keep, [p.numel() for p in params.values()])):
                p.mul_(m.view_as(p))
    return dict(zip(params, (m.view_as(p) for p, m in
                             zip(params.values(), torch.split(keep, [p.numel() for p in params.values()])))))


@pytest.mark.parametrize("arch,size,rounds", [("resnet56", 32, 20), ("resnet110", 32, 2), ("resnet34", 64, 2)])
def test_synflow_on_deep_networks_ranks_in_float64(arch, size, rounds):
    """ResNet-56/110 at 32×32 (scores up to ~4e67 / ~2e136) and ResNet-34 at 64×64 overflow float32: ranking
    in float32 kept nothing of conv1 and everything of the last block, cutting the input off. The masks must
    equal a float64 ranking, keep the input connected to the output and keep weights in every layer — except
    1×1 projection shortcuts, which SynFlow itself empties at these depths (their flow is orders of magnitude
    below the parallel 3×3 branch's; the residual branch still connects, so this is not a layer collapse)."""
    import contextlib
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from kdprune_cli.config.schema import TrainRecipe
    from kdprune_cli.models import build_model
    from kdprune_cli.models.masks import apply_masks
    from kdprune_cli.pruning.methods.synflow import SynFlow, SynFlowConfig
    from kdprune_cli.pruning.selection import Pruner

    torch.manual_seed(0)
    net = build_model(arch, 10, 3, size)
    cfg = OmegaConf.create({"sparsity": 0.9, "prune": {"scope": "global", "exclude": [], "granularity": "weight"}})
    ctx = SimpleNamespace(data=SimpleNamespace(channels=3, image_size=size), log=lambda rec: None,
                          pruner=Pruner(cfg, None, torch.device("cpu")),
                          costs=SimpleNamespace(count=lambda *m, **k: contextlib.nullcontext()))
    mcfg = SynFlowConfig(name="synflow", rounds=rounds, double=True, retrain=TrainRecipe())
    masks = SynFlow(mcfg).prune(ctx, net).masks
    want = float64_synflow_masks(net, (3, size, size), 0.9, rounds)
    assert list(masks) == list(want)
    for n, m in masks.items():
        assert torch.equal(m, want[n]), n
        projection = m.shape[2:] == (1, 1) and ("shortcut" in n or "downsample" in n)
        assert m.any() or projection, f"{n} lost every weight"
    assert float(masks["conv1.weight"].float().mean()) > 0.9  # the input layer stays (a float32 ranking: 0%)
    lin = linearised_copy(net)
    apply_masks(lin, masks)
    with torch.no_grad():  # the input still reaches the output
        assert float(lin(torch.ones(1, 3, size, size, dtype=torch.float64)).sum()) > 0


def test_synflow_in_float32_overflows_loudly():
    """Without float64 the deep network's scores are +inf: an error naming a layer, not a silent reorder."""
    from kdprune_cli.models import build_model

    torch.manual_seed(0)
    lin = linearised_copy(build_model("resnet56", 10, 3, 32), double=False)
    scores = synflow_scores(lin, prunable_params(lin), (3, 32, 32))
    with pytest.raises(ValueError, match=r"conv1\.weight.*non-finite"):
        select(scores, 0.9)


def test_invalid_options_raise(make_ctx):
    bad = [("snip", "method.batches=0"), ("snip", "method.bn_mode=foo"), ("grasp", "method.temperature=0"),
           ("grasp", "method.samples_per_class=0"), ("grasp", "method.batching=sorted"),
           ("grasp", "method.chunk_size=8"), ("synflow", "method.rounds=0")]
    # a wrong type (method.at_init=maybe) is refused by Hydra at composition: test_compose_and_validate
    for name, override in bad:
        ctx = make_ctx(f"method={name}", override)
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            method_of(ctx)
