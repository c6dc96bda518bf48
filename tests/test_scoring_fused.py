"""Scoring at training speed (issue #12 part 2, docs/methods.md §0): the fused torch._foreach_* accumulation
gives exactly the numbers of the per-parameter loop it replaced (fp32, CPU)."""
from __future__ import annotations

import torch
from torch import nn

from kdprune_cli.pruning.methods import get_method
from kdprune_cli.pruning.methods.base import params_for_scoring
from kdprune_cli.pruning.scores.batches import accumulate_, accumulate_saliency_, scoring_autocast
from kdprune_cli.pruning.methods.snip import snip_scores


def tensors(gen, shapes):
    return [torch.randn(s, generator=gen) for s in shapes]


def test_fused_accumulation_equals_the_per_parameter_loop_exactly():
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 3, 3, 3), (32, 16, 3, 3), (10, 32), (7,)]
    params = tensors(gen, shapes)
    fused_s, loop_s = [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes]
    fused_g, loop_g = [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes]
    for b in range(5):
        grads = tensors(gen, shapes)
        if b == 2:
            grads[3] = None  # a parameter without a gradient in this batch counts as zero
        accumulate_saliency_(fused_s, params, grads)
        accumulate_(fused_g, grads, params)
        for s, g, p, gg in zip(loop_s, loop_g, params, grads):  # the loops the scorers used to run
            if gg is not None:
                s += (p * gg).abs()
                g += gg
    assert all(torch.equal(a, b) for a, b in zip(fused_s, loop_s))
    assert all(torch.equal(a, b) for a, b in zip(fused_g, loop_g))
    assert all(s.dtype == torch.float32 for s in fused_s)


def test_snip_scores_equal_the_per_parameter_loop(tiny_net):
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(3)]
    params = dict(tiny_net.named_parameters())
    got, samples = snip_scores(tiny_net, params, iter(batches), nn.functional.cross_entropy)
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in batches:  # the former implementation
        tiny_net.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(tiny_net(x), y).backward()
        for n, p in params.items():
            acc[n] += p.grad
    want = {n: (p * acc[n] / 3).abs() for n, p in params.items()}
    assert samples == 24 and all(torch.equal(got[n], want[n].detach()) for n in params)


def test_cakld_score_equals_the_per_parameter_loop(make_ctx):
    ctx = make_ctx("method=cakld", "method.score_batches=3", "method.gamma_batches=1", "method.gamma=0.5")
    method = get_method("cakld")(ctx.cfg.method)
    model = ctx.seeds.new_model("student")
    got = method.score(ctx, model)
    assert model.training  # left in train mode, no gradients kept
    assert all(p.grad is None for p in model.parameters())

    objective = method.distill_objective(ctx)
    params = params_for_scoring(ctx, model)
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for x, y, idx in ctx.data.batches("train", int(ctx.cfg.method.score_batch_size), shuffle=True,
                                      gen=ctx.seeds.generator("score"), max_batches=3):
        model.zero_grad(set_to_none=True)
        loss, _ = objective(model, x, y, idx)
        loss.backward()
        with torch.no_grad():
            for n, p in params.items():
                want[n] += (p * p.grad).abs()
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


def test_no_autocast_on_cpu(make_ctx):
    ctx = make_ctx("amp=true")
    with scoring_autocast(ctx):
        assert not torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")
