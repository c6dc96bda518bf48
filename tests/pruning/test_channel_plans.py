"""Channel plans keep every layer alive (docs/methods.md §7): group importances normalised per group
(Torch-Pruning's ``normalizer="mean"``), no group losing more than ``prune.max_group_ratio`` of its channels
or keeping fewer than ``prune.min_channels``, the target still met; the unnormalised sum without caps is
kept as an option and empties whole stages of ResNet-56."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from conftest import compose_cfg

from kdprune_cli.config.schema import ConfigError, PruneConfig
from kdprune_cli.experiment.identity import job_id
from kdprune_cli.experiment.job import run_job
from kdprune_cli.models import build_model
from kdprune_cli.models.masks import prunable_params
from kdprune_cli.pruning.selection import Pruner
from kdprune_cli.pruning.structure.channels import ChannelGroups
from kdprune_cli.pruning.structure.plan import normalize_importance

warnings.filterwarnings("ignore", message="Unwrapped parameters")

SUM_UNCAPPED = dict(reduce="sum", normalize="none", max_group_ratio=1.0, min_channels=1)


def magnitude(model):
    return {n: p.detach().abs() for n, p in prunable_params(model).items()}


@pytest.fixture(scope="module")
def resnet56():
    """ResNet-56 for CIFAR (3×32×32), seeded, its 30 channel groups and magnitude scores."""
    torch.manual_seed(0)
    model = build_model("resnet56", 10, 3, 32)
    return model, ChannelGroups(model, torch.zeros(1, 3, 32, 32)), magnitude(model)


def one_channel_bound(groups: ChannelGroups, target: str = "params") -> float:
    """The largest fraction one channel can move the count (removing it from the dense model)."""
    dense = groups.counts([0] * len(groups.groups))[target]
    empty = [torch.zeros(0, dtype=torch.long)] * len(groups.groups)
    worst = max(dense - groups.counts([torch.tensor([0]) if i == g else e for i, e in enumerate(empty)])[target]
                for g in range(len(groups.groups)))
    return worst / dense


def kept_widths(groups: ChannelGroups, removed) -> list:
    return [g.channels - len(r) for g, r in zip(groups.groups, removed)]


def test_resnet56_at_half_params_keeps_every_group_alive_by_default(resnet56):
    _, groups, scores = resnet56
    assert len(groups.groups) == 30
    plan = groups.plan(scores, 0.5)
    floor = PruneConfig.min_channels
    for g, r in zip(groups.groups, plan.removed):
        assert g.channels - len(r) >= floor  # no group below prune.min_channels
        assert len(r) / g.channels <= PruneConfig.max_group_ratio  # nor past prune.max_group_ratio
    assert abs(plan.facts["achieved"] - 0.5) <= one_channel_bound(groups)
    assert plan.facts["normalize"] == "mean" and plan.facts["reachable"] > 0.9


def test_the_unnormalised_sum_without_caps_empties_whole_stages(resnet56):
    _, groups, scores = resnet56
    plan = groups.plan(scores, 0.5, **SUM_UNCAPPED)
    widths = kept_widths(groups, plan.removed)
    assert sum(w == 1 for w in widths) >= 15  # more than half of the 30 groups cut to a single channel
    assert abs(plan.facts["achieved"] - 0.5) <= one_channel_bound(groups)


def test_caps_bind_and_the_target_is_still_met(resnet56):
    """The sum without normalisation would collapse groups; the caps stop each at its floor and the other
    groups make up the difference."""
    _, groups, scores = resnet56
    for sparsity in (0.3, 0.5, 0.7):
        plan = groups.plan(scores, sparsity, reduce="sum", normalize="none", max_group_ratio=0.8, min_channels=6)
        widths = kept_widths(groups, plan.removed)
        floors = [max(6, g.channels - int(0.8 * g.channels)) for g in groups.groups]
        assert all(w >= f for w, f in zip(widths, floors))
        assert sum(w == f for w, f in zip(widths, floors)) >= 5  # the caps did bind
        assert abs(plan.facts["achieved"] - sparsity) <= one_channel_bound(groups)


def test_caps_with_round_to_keep_multiples_above_the_floor(resnet56):
    _, groups, scores = resnet56
    plan = groups.plan(scores, 0.7, reduce="sum", normalize="none", min_channels=4, round_to=8)
    for g, w in zip(groups.groups, kept_widths(groups, plan.removed)):
        assert w >= 8 and w % 8 == 0 or w == g.channels  # the floor 4 rounds up to 8


def test_removed_channels_stay_removed_within_the_caps(resnet56):
    _, groups, scores = resnet56
    first = groups.plan(scores, 0.3, max_group_ratio=0.6, min_channels=5)
    masked = {n: s.clone() for n, s in scores.items()}
    for n, keep in groups.masks(first.removed).items():  # what an iterative method scores: the removed are zero
        if n in masked:
            masked[n][~keep] = 0
    second = groups.plan(masked, 0.6, max_group_ratio=0.6, min_channels=5, keep_removed=first.removed)
    for g, a, b in zip(groups.groups, first.removed, second.removed):
        assert set(a.tolist()) <= set(b.tolist())
        assert len(b) <= int(0.6 * g.channels) and g.channels - len(b) >= 5
    assert abs(second.facts["achieved"] - 0.6) <= one_channel_bound(groups)


def test_unreachable_target_is_reported_honestly(resnet56):
    _, groups, scores = resnet56
    most = groups.reachable("params", max_group_ratio=0.5, min_channels=4)
    plan = groups.plan(scores, 0.9, max_group_ratio=0.5, min_channels=4)
    assert plan.facts["reachable"] == pytest.approx(most) and most < 0.9
    assert plan.facts["achieved"] == pytest.approx(most)  # every group at its cap, no further
    assert all(len(r) == g.channels // 2 for g, r in zip(groups.groups, plan.removed))


def test_normalisers():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    torch.testing.assert_close(normalize_importance(x, "mean"), x / 3)
    torch.testing.assert_close(normalize_importance(x, "max"), x / 6)
    torch.testing.assert_close(normalize_importance(x, "sum"), x / 12)
    torch.testing.assert_close(normalize_importance(x, "standarization"), (x - 1) / 5)
    torch.testing.assert_close(normalize_importance(x, "none"), x)
    present = torch.tensor([False, True, True, True])  # the first channel was removed earlier
    torch.testing.assert_close(normalize_importance(x, "mean", present), x / (11 / 3))
    neg = torch.tensor([-3.0, -1.0, 2.0], dtype=torch.float64)  # GraSP-like scores keep their order
    assert torch.equal(normalize_importance(neg, "mean").argsort(), neg.argsort())
    assert torch.equal(normalize_importance(torch.zeros(3), "mean"), torch.zeros(3))  # no 0/0
    with pytest.raises(ValueError, match="prune.normalize"):
        normalize_importance(x, "l2")


def test_normalised_plans_agree_with_torch_pruning(resnet56):
    """Torch-Pruning's global pruning with its default importance (``GroupMagnitudeImportance()``: group
    reduction and normaliser ``"mean"``) brought to the same fraction of prunable weights: the channels it
    keeps overlap ours (Jaccard over all root channels) far more than the unnormalised sum's."""
    import torch_pruning as tp

    model, groups, scores = resnet56
    names = [groups.names[g.root] for g in groups.groups]
    dense = groups.counts([0] * len(names))["params"]

    def tp_removed(ratio):
        pruner = tp.pruner.BasePruner(model, torch.zeros(1, 3, 32, 32), global_pruning=True, pruning_ratio=ratio,
                                      importance=tp.importance.GroupMagnitudeImportance(), ignored_layers=[groups.head])
        out = {groups.names[g[0].dep.target.module]: torch.tensor(g[0].idxs) for g in pruner.step(interactive=True)}
        return [out.get(n, torch.zeros(0, dtype=torch.long)) for n in names]  # planned only: nothing is pruned

    lo, hi = 0.0, 0.95
    for _ in range(12):
        removed = tp_removed((lo + hi) / 2)
        lo, hi = ((lo + hi) / 2, hi) if 1 - groups.counts(removed)["params"] / dense < 0.5 else (lo, (lo + hi) / 2)
    assert 1 - groups.counts(removed)["params"] / dense == pytest.approx(0.5, abs=0.01)

    def kept(rem):
        return {(g, c) for g, (grp, r) in enumerate(zip(groups.groups, rem))
                for c in set(range(grp.channels)) - set(r.tolist())}

    theirs = kept(removed)

    def overlap(plan):
        ours = kept(plan.removed)
        return len(ours & theirs) / len(ours | theirs)

    assert min(kept_widths(groups, removed)) > 1  # Torch-Pruning collapses no group either
    default, old = overlap(groups.plan(scores, 0.5)), overlap(groups.plan(scores, 0.5, **SUM_UNCAPPED))
    assert default > 0.7 and default - old > 0.15


def test_the_defaults_are_one_set():
    """The config's defaults are the plan's (a caller of ChannelGroups.plan gets what a run gets)."""
    cfg = compose_cfg()
    sig = inspect.signature(ChannelGroups.plan).parameters
    for key in ("reduce", "normalize", "max_group_ratio", "min_channels", "round_to"):
        assert cfg.prune[key] == getattr(PruneConfig, key) == sig[key].default, key
    assert (cfg.prune.reduce, cfg.prune.normalize) == ("mean", "mean")


def test_the_runner_plans_with_the_configured_options(resnet56):
    _, groups, scores = resnet56
    cfg = compose_cfg(["prune.granularity=channel", "prune.max_group_ratio=0.5", "prune.min_channels=12",
                       "prune.normalize=max", "prune.reduce=sum"])
    plan = Pruner(cfg, None, torch.device("cpu")).plan(groups, scores, 0.4)
    f = plan.facts
    assert (f["max_group_ratio"], f["min_channels"], f["normalize"], f["reduce"]) == (0.5, 12, "max", "sum")
    for g, w in zip(groups.groups, kept_widths(groups, plan.removed)):
        assert w >= max(12, g.channels // 2)


@pytest.mark.parametrize("overrides,match", [
    (["prune.max_group_ratio=0"], "prune.max_group_ratio must be in"),
    (["prune.max_group_ratio=1.5"], "prune.max_group_ratio must be in"),
    (["prune.min_channels=0"], "prune.min_channels must be"),
    (["prune.normalize=l2"], "prune.normalize must be mean, max, sum, standarization or none"),
    (["prune.reduce=max"], "prune.reduce must be mean or sum"),
    (["prune.granularity=channel", "sparsity=0.9", "prune.max_group_ratio=0.5"], "sparsity=0.9 cannot be reached"),
])
def test_bad_plan_options_fail_in_one_line_before_work(tiny_cfg, tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        run_job(tiny_cfg("method=magnitude", *overrides), tmp_path / "r", summary=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "store" / "teacher").exists()


def test_nuteprune_is_not_held_to_the_plan_caps(tiny_cfg, tmp_path):
    """NutePrune's gates learn the widths: a sparsity past the plan caps is not refused for it."""
    from kdprune_cli.experiment.validate import validate

    validate(tiny_cfg("method=nuteprune", "prune.granularity=channel", "sparsity=0.9", "prune.max_group_ratio=0.5"))


def test_job_ids_follow_the_channel_options_at_either_granularity():
    """The channel options are part of every job's identity: NutePrune reads ``prune.target`` whatever the
    granularity, so no granularity may treat them as changing no result."""
    options = ["prune.reduce=sum", "prune.normalize=none", "prune.max_group_ratio=1.0", "prune.min_channels=1",
               "prune.target=macs"]
    base = job_id(compose_cfg(), {})
    assert job_id(compose_cfg(), {}) == base  # deterministic
    for granularity in ("weight", "channel"):
        plain = job_id(compose_cfg([f"prune.granularity={granularity}"]), {})
        ids = {job_id(compose_cfg([f"prune.granularity={granularity}", o]), {}) for o in options}
        assert plain not in ids and len(ids) == len(options), granularity
    assert job_id(compose_cfg(["prune.granularity=channel"]), {}) != base


def test_colt_union_of_removals_stays_within_the_caps(tiny_cfg, tmp_path):
    """COLT keeps a channel only if every partition model keeps it; where that union would pass a group's cap
    the round is planned once on the summed magnitudes, so the caps hold for COLT too."""
    rec = run_job(tiny_cfg("method=colt", "prune.granularity=channel", "sparsity=0.2", "method.rate=0.1",
                           "method.round.epochs=1", "method.retrain.epochs=1", "prune.max_group_ratio=0.15"),
                  tmp_path / "colt", summary=False)
    assert rec["status"] == "ok"
    dense = {"conv1": 16, "layer1": 16, "layer2": 32, "layer3": 64}
    for root, width in rec["structure"]["widths"].items():
        n = dense[root.split(".")[0]]
        assert width >= n - int(0.15 * n), (root, width)
    assert rec["structure"]["achieved"] == pytest.approx(0.2, abs=0.03)
