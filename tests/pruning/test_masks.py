"""Mask selection (exact count, deterministic ties, layer scope), enforcement during training, counting."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from kdprune_cli.config.schema import TrainRecipe
from kdprune_cli.distill.objectives import CrossEntropy
from kdprune_cli.models.masks import apply_masks, assert_masked, check_exclude, prunable_params, select, sparsity_report
from kdprune_cli.training.loop import train


def removed(masks):
    return sum(int((~m).sum()) for m in masks.values())


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.9, 0.97, 0.999])
def test_global_removes_exactly_round_s_p(s):
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(7, 3, generator=g), "b": torch.rand(50, generator=g),
              "c": torch.rand(2, 2, 3, generator=g)}
    total = 7 * 3 + 50 + 12
    masks = select(scores, s)
    assert removed(masks) == round(s * total)
    kept = torch.cat([scores[n][masks[n]].flatten() for n in scores])
    gone = torch.cat([scores[n][~masks[n]].flatten() for n in scores])
    if len(kept) and len(gone):
        assert gone.max() <= kept.min()  # one global threshold


def test_ties_are_broken_deterministically_by_position():
    scores = {"a": torch.ones(4), "b": torch.ones(4)}
    masks = select(scores, 0.5)
    assert masks["a"].tolist() == [False] * 4 and masks["b"].tolist() == [True] * 4
    scores = {"a": torch.tensor([1.0, 0.5, 0.5, 0.5])}
    assert select(scores, 0.5)["a"].tolist() == [True, False, False, True]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_are_an_error_naming_the_layer(bad):
    scores = {"a": torch.tensor([0.1, 0.2]), "layer3.conv2.weight": torch.tensor([0.1, bad, 0.2, 0.3])}
    with pytest.raises(ValueError, match="layer3.conv2.weight"):
        select(scores, 0.25)
    # an already-pruned weight's score decides nothing and is not checked
    keep = {"a": torch.ones(2, dtype=torch.bool), "layer3.conv2.weight": torch.tensor([True, False, True, True])}
    m = select(scores, 0.5, keep=keep)
    assert m["a"].tolist() == [False, True] and m["layer3.conv2.weight"].tolist() == [False, False, True, True]


def test_scores_are_ranked_in_their_own_precision():
    # float32 would turn these into +inf (and the stable sort would prune in parameter order) ...
    f64 = torch.float64
    big = {"a": torch.tensor([1e300, 1e301], dtype=f64), "b": torch.tensor([1e302, 1e299], dtype=f64)}
    m = select(big, 0.5)
    assert m["a"].tolist() == [False, True] and m["b"].tolist() == [True, False]
    # ... or make these equal (1 + 1e-12 rounds to 1 in float32)
    close = {"a": torch.tensor([1.0 + 2e-12, 1.0 + 1e-12], dtype=f64), "b": torch.tensor([1.0 + 3e-12], dtype=f64)}
    m = select(close, 1 / 3)
    assert m["a"].tolist() == [True, False] and m["b"].tolist() == [True]
    assert select(close, 1 / 3, scope="layer")["a"].tolist() == [True, False]
    # mixed dtypes are promoted to the widest, never narrowed
    mixed = {"a": torch.tensor([1.0 + 2e-12, 1.0 + 1e-12], dtype=f64), "b": torch.tensor([1.0])}
    m = select(mixed, 1 / 3)
    assert m["a"].tolist() == [True, True] and m["b"].tolist() == [False]


def test_layer_scope_same_ratio_per_tensor_and_exact_total():
    g = torch.Generator().manual_seed(1)
    scores = {"a": torch.rand(10, generator=g) * 100, "b": torch.rand(30, generator=g), "c": torch.rand(7, generator=g)}
    masks = select(scores, 0.5, scope="layer")
    assert removed(masks) == round(0.5 * 47)
    for n, sc in scores.items():
        r = int((~masks[n]).sum())
        assert abs(r - 0.5 * sc.numel()) < 1  # per-tensor ratio up to rounding
        assert sc[~masks[n]].max() <= sc[masks[n]].min()
    # global scope would remove only from the small-score tensors
    gm = select(scores, 0.5)
    assert int((~gm["a"]).sum()) == 0


def test_keep_forces_earlier_pruning_and_counts_towards_target():
    scores = {"a": torch.arange(10.0)}
    keep = {"a": torch.tensor([True] * 9 + [False])}  # the best-scored weight already pruned
    m = select(scores, 0.3, keep=keep)
    assert removed(m) == 3 and not m["a"][9] and m["a"][2:9].all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="sparsity"):
        select({"a": torch.rand(3)}, 1.0)
    with pytest.raises(ValueError, match="scope"):
        select({"a": torch.rand(3)}, 0.5, scope="row")


def test_prunable_set_and_exclude(tiny_net):
    assert list(prunable_params(tiny_net)) == ["conv.weight", "fc.weight"]
    assert list(prunable_params(tiny_net, ["fc"])) == ["conv.weight"]
    with pytest.raises(ValueError, match="exclude"):
        check_exclude(tiny_net, ["nope"])


def test_sparsity_is_counted_from_the_weights(tiny_net):
    with torch.no_grad():
        tiny_net.conv.weight[0].zero_()
    rep = sparsity_report(tiny_net)
    assert rep["per_layer"]["conv.weight"] == 0.5 and rep["prunable"] == 18 + 6
    assert rep["nonzero"] == 24 - 9 and rep["global"] == pytest.approx(9 / 24)


class _Data:
    """Minimal stand-in with the DeviceData batching interface."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 1, 5, 5, generator=g)
        self.y = torch.randint(0, 3, (32,), generator=g)

    def num_batches(self, which, bs, drop_last=False):
        return 32 // bs

    def batches(self, which, bs, shuffle=False, augment=False, gen=None, drop_last=False, max_batches=None):
        order = torch.randperm(32, generator=gen)
        for i in range(0, 32, bs):
            idx = order[i:i + bs]
            yield self.x[idx], self.y[idx], idx


def test_retraining_with_momentum_and_weight_decay_keeps_pruned_weights_zero(tiny_net):
    masks = select({n: p.abs() for n, p in prunable_params(tiny_net).items()}, 0.5)
    apply_masks(tiny_net, masks)
    before = {n: p.detach().clone() for n, p in prunable_params(tiny_net).items()}
    # strong momentum and weight decay would move any pruned weight that got a gradient or decay step
    recipe = OmegaConf.merge(OmegaConf.structured(TrainRecipe), {"epochs": 3, "batch_size": 8, "lr": 0.5,
                                                                  "momentum": 0.9, "weight_decay": 0.1,
                                                                  "augment": False, "eval_every": 0})
    train(tiny_net, _Data(), recipe, CrossEntropy(), gen=torch.Generator().manual_seed(0), masks=masks,
          progress=False)
    assert_masked(tiny_net, masks)
    for n, p in prunable_params(tiny_net).items():
        assert (p[~masks[n]] == 0).all()
        assert not torch.equal(p[masks[n]], before[n][masks[n]])  # kept weights did train


def test_assert_masked_catches_a_revived_weight(tiny_net):
    masks = select({n: p.abs() for n, p in prunable_params(tiny_net).items()}, 0.5)
    apply_masks(tiny_net, masks)
    with torch.no_grad():
        tiny_net.conv.weight[~masks["conv.weight"]] = 1.0
    with pytest.raises(AssertionError, match="non-zero"):
        assert_masked(tiny_net, masks)


def test_layer_scope_with_keep_never_revives_a_pruned_weight():
    scores = {"a": torch.arange(10.0), "b": torch.arange(10.0)}
    keep = {"a": torch.tensor([True] * 4 + [False] * 6), "b": torch.ones(10, dtype=torch.bool)}  # a lost 6 > 5
    m = select(scores, 0.5, scope="layer", keep=keep)
    assert not m["a"][4:].any()
    assert int((~m["b"]).sum()) == 5
