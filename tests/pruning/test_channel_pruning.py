"""Channel granularity (docs/methods.md §7): coupled groups, exact counts, physical removal, the model file,
kdprune-eval and the ONNX export."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import SAFETY_S
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdprune_cli.config.schema import ConfigError
from kdprune_cli.experiment.job import run_job
from kdprune_cli.models import build_model
from kdprune_cli.models.cifar import BasicBlock
from kdprune_cli.models.masks import prunable_params
from kdprune_cli.models.modelfile import ModelFileError, load_pruned
from kdprune_cli.pruning.structure.channels import ChannelGroups
from kdprune_cli.training.evaluate import count_flops

warnings.filterwarnings("ignore", message="Unwrapped parameters")


def magnitude(model):
    return {n: p.detach().abs() for n, p in prunable_params(model).items()}


def prunable_size(model):
    return sum(p.numel() for p in prunable_params(model).values())


def one_channel_bound(groups: ChannelGroups, target: str) -> float:
    """The largest fraction one channel can move the count (removing it from the dense model)."""
    dense = groups.counts([0] * len(groups.groups))[target]
    worst = 0
    for g in range(len(groups.groups)):
        one = [torch.tensor([0]) if i == g else torch.tensor([], dtype=torch.long) for i in range(len(groups.groups))]
        worst = max(worst, dense - groups.counts(one)[target])
    return worst / dense


CASES = [("resnet56", 32, "params", 0.5), ("resnet56", 32, "macs", 0.3), ("mobilenetv2", 32, "macs", 0.5),
         ("timm/vit_tiny_patch16_224", 224, "params", 0.4)]


@pytest.mark.parametrize("name,size,target,sparsity", CASES)
def test_physical_model_counts_are_exact_and_on_target(request, name, size, target, sparsity):
    if name.startswith("timm/"):  # attention as explicit matmuls, which torch's counter sees
        request.getfixturevalue("explicit_attention")
    torch.manual_seed(0)
    model = build_model(name, 10, 3, size)
    dense_params, dense_macs = prunable_size(model), count_flops(model, (3, size, size))["dense"]
    x = torch.randn(2, 3, size, size)
    groups = ChannelGroups(model, x[:1])
    bound = one_channel_bound(groups, target)
    plan = groups.plan(magnitude(model), sparsity, target=target)
    groups.remove(plan)
    model.eval()
    assert model(x).shape == (2, 10)  # runs; the classifier keeps its 10 outputs
    params, macs = prunable_size(model), count_flops(model, (3, size, size))["dense"]
    f = plan.facts
    assert f["params_removed"] == pytest.approx(1 - params / dense_params, abs=1e-12)
    assert f["macs_removed"] == pytest.approx(1 - macs / dense_macs, abs=1e-12)
    with FlopCounterMode(display=False) as fc:  # the independent counter: torch's own (FLOPs = 2·MACs)
        model(x[:1])
    assert fc.get_total_flops() == 2 * macs  # ViTs: attention's Q·Kᵀ and A·V included
    assert abs(f["achieved"] - sparsity) <= bound  # within one channel of the target
    assert f["achieved"] == pytest.approx(sparsity, abs=0.02)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 3  # input channels are never removed


def test_residual_channels_are_removed_together_and_the_sum_still_adds():
    torch.manual_seed(0)
    model = build_model("resnet56", 10, 3, 32)
    scores = magnitude(model)
    scores = {n: s * (0.01 if "layer2" in n else 1.0) for n, s in scores.items()}  # make stage 2 the cheap one
    groups = ChannelGroups(model, torch.zeros(1, 3, 32, 32))
    groups.remove(groups.plan(scores, 0.3, reduce="mean"))
    widths = set()
    for blk in model.layer2:
        assert isinstance(blk, BasicBlock)
        assert blk.bn1.num_features == blk.conv1.out_channels == blk.conv2.in_channels
        widths.add(blk.conv2.out_channels)  # every block writes into the same residual sum
        widths.add(blk.bn2.num_features)
    widths.add(model.layer2[0].shortcut[0].out_channels)
    widths.add(model.layer3[0].conv1.in_channels)
    assert len(widths) == 1 and widths.pop() < 32  # the stage's shared channels went, all together
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_channel_importance_is_the_sum_over_the_group_weights():
    """Inner channel c of a basic block owns conv1's row c and conv2's column c: its importance is the
    sum of their scores (BN has no score), and the mean divides by their count."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32)
    scores = magnitude(model)
    groups = ChannelGroups(model, torch.zeros(1, 3, 32, 32))
    gi = next(i for i, g in enumerate(groups.groups) if g.root is model.layer1[1].conv1)
    w1, w2 = model.layer1[1].conv1.weight.abs(), model.layer1[1].conv2.weight.abs()
    expect = w1.flatten(1).sum(1) + w2.transpose(0, 1).flatten(1).sum(1)
    imp = groups.importance(scores, "sum")[gi]
    torch.testing.assert_close(imp.float(), expect, rtol=1e-5, atol=1e-6)
    mean = groups.importance(scores, "mean")[gi]
    torch.testing.assert_close(mean.float(), expect / (w1[0].numel() + w2[:, 0].numel()), rtol=1e-5, atol=1e-7)
    # the least important channels go first: zero one channel's scores, it is the one removed
    scores["layer1.1.conv1.weight"][5] = 0
    scores["layer1.1.conv2.weight"][:, 5] = 0
    plan = groups.plan(scores, 0.001)
    assert plan.removed[gi].tolist() == [5] and sum(len(r) for r in plan.removed) == 1


def test_round_to_and_layer_scope():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 3, 32)
    groups = ChannelGroups(model, torch.zeros(1, 3, 32, 32))
    plan = groups.plan(magnitude(model), 0.5, target="macs", round_to=16, scope="layer")
    sizes = {groups.names[g.root]: g.channels for g in groups.groups}
    for root, width in plan.facts["widths"].items():
        assert width % 16 == 0 and 0 < width <= sizes[root]
        assert width / sizes[root] == pytest.approx(plan.facts["widths"]["conv1"] / sizes["conv1"], abs=0.2)
    groups.remove(plan)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels % 16 == 0


def run(tiny_cfg, tmp_path, *overrides, name="r"):
    cfg = tiny_cfg("method=magnitude", "method.retrain.epochs=1", "prune.granularity=channel", *overrides)
    return run_job(cfg, tmp_path / name, summary=False), tmp_path / name


def test_run_retrains_the_smaller_model_and_the_file_reloads(tiny_cfg, tmp_path):
    rec, run_dir = run(tiny_cfg, tmp_path, "sparsity=0.5", "prune.target=macs", "eval.latency=true",
                       "eval.latency_batch=4", "eval.latency_iters=3")
    assert rec["status"] == "ok" and rec["granularity"] == "channel"
    lat = rec["latency"]  # CPU: fp32, eager only (compiled is auto: CUDA), batch 1 and latency_batch
    assert lat["device"] == "cpu" and lat["dtype"] == "float32" and lat["iters"] == 3
    for key in ("dense_student", "final"):
        assert [(r["batch"], r["mode"]) for r in lat[key]] == [(1, "eager"), (4, "eager")]
        assert all(r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] for r in lat[key])
    s = rec["structure"]
    assert s["achieved"] == pytest.approx(0.5, abs=0.03) and s["macs_removed"] == s["achieved"]
    assert rec["flops"]["executed"] == pytest.approx(rec["flops"]["dense"] * (1 - s["macs_removed"]), rel=1e-9)
    assert rec["sparsity_actual"] == pytest.approx(s["params_removed"], abs=1e-12)
    assert rec["params"]["total"] < rec["params"]["total_dense"]
    model = load_pruned(run_dir)  # no config needed: the widths come from the file
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for root, w in s["widths"].items():
        assert widths[root] == w  # retraining kept the smaller shape
    assert rec["model_file"]["bytes"] == (run_dir / "model.pt").stat().st_size
    # kdprune-eval in a fresh process gives the record's final metrics exactly
    out = subprocess.run([sys.executable, "-m", "kdprune_cli.cli.eval", str(run_dir), "--json"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=SAFETY_S)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["metrics"] == rec["metrics"]["final"] and got["record_matches"] is True
    assert got["macs"] == rec["flops"]["executed"]


def test_weight_granularity_file_reloads_masked(tiny_cfg, tmp_path):
    cfg = tiny_cfg("method=magnitude", "method.retrain.epochs=1", "sparsity=0.7")
    rec = run_job(cfg, tmp_path / "w", summary=False)
    assert rec["granularity"] == "weight" and rec["flops"]["executed"] == rec["flops"]["dense"]
    model = load_pruned(tmp_path / "w")
    zeros = sum(int((p == 0).sum()) for p in prunable_params(model).values())
    assert zeros / prunable_size(model) == pytest.approx(rec["sparsity_actual"], abs=1e-12)


def test_onnx_export_matches_and_damaged_file_is_one_line(tiny_cfg, tmp_path):
    pytest.importorskip("onnxruntime")
    rec, run_dir = run(tiny_cfg, tmp_path, "sparsity=0.4", "prune.round_to=4")
    out = subprocess.run([sys.executable, "-m", "kdprune_cli.cli.eval", str(run_dir), "--onnx",
                          str(tmp_path / "m.onnx"), "--latency", "--latency-batch", "4", "--iters", "3"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=SAFETY_S)
    assert out.returncode == 0, out.stderr
    assert "matches the model's" in out.stdout and (tmp_path / "m.onnx").is_file()
    assert sorted(p.name for p in tmp_path.glob("m.onnx*")) == ["m.onnx"]  # one file, no m.onnx.data beside it
    assert "batch    4 eager" in out.stdout
    bad = tmp_path / "bad.pt"
    bad.write_bytes((run_dir / "model.pt").read_bytes()[:2000])
    out = subprocess.run([sys.executable, "-m", "kdprune_cli.cli.eval", str(bad)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=SAFETY_S)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "damaged" in out.stderr
    with pytest.raises(ModelFileError, match="does not fit"):  # weights of another architecture
        obj = torch.load(run_dir / "model.pt", weights_only=True)
        obj["arch"]["name"] = "resnet32"
        torch.save(obj, tmp_path / "other.pt")
        load_pruned(tmp_path / "other.pt")


@pytest.mark.parametrize("overrides,match", [
    (["prune.target=macs"], "apply to prune.granularity=channel only"),
    (["prune.granularity=filter"], "prune.granularity must be weight or channel"),
    (["prune.granularity=channel", "prune.round_to=0"], "prune.round_to must be"),
])
def test_bad_structured_options_fail_before_work(tiny_cfg, tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        run_job(tiny_cfg(*overrides), tmp_path / "r", summary=False)
    assert not (tmp_path / "store" / "teacher").exists()


@pytest.mark.parametrize("ds", ["cifar10", "cifar100", "tinyimagenet"])
def test_structured_presets_compose_and_validate(ds):
    from hydra import compose, initialize_config_dir

    from kdprune_cli.cli.main import config_dir
    from kdprune_cli.experiment.validate import validate

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment=structured_{ds}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params.method == "cakld,cakld_ce,magnitude,snip,random,nuteprune,nuteprune_intact"
    assert params.sparsity == "0.3,0.5,0.7"
    assert cfg.prune.granularity == "channel" and cfg.prune.target == "macs"
    for method in params.method.split(","):
        for sparsity in params.sparsity.split(","):  # the jobs the sweep runs (the channel caps reach each)
            with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
                validate(compose("config", overrides=[f"experiment=structured_{ds}", f"method={method}",
                                                      f"sparsity={sparsity}"]))


def test_channel_masks_compute_what_the_removed_model_computes():
    """Masking the rows and columns removed channels own (what iterative methods train with) gives the same
    outputs as removing them physically, on ResNet-56 (residual sums) and MobileNetV2 (depthwise)."""
    import copy

    from kdprune_cli.models.masks import apply_masks

    for name in ("resnet56", "mobilenetv2"):
        torch.manual_seed(0)
        model = build_model(name, 10, 3, 32).eval()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.data.uniform_(-0.3, 0.3)  # non-zero shifts: a masked channel's BN still outputs them
        x = torch.randn(3, 3, 32, 32)
        groups = ChannelGroups(model, x[:1])
        first = groups.plan(magnitude(model), 0.2)
        plan = groups.plan(magnitude(model), 0.5, keep_removed=first.removed)
        for a, b in zip(first.removed, plan.removed):
            assert set(a.tolist()) <= set(b.tolist())  # removed channels stay removed
        masked = copy.deepcopy(model)
        apply_masks(masked, {n: m for n, m in groups.masks(plan.removed).items()})
        groups.remove(plan)
        with torch.no_grad():
            torch.testing.assert_close(model(x), masked(x), atol=1e-4, rtol=1e-4)


def test_gmp_prunes_channel_groups_on_its_schedule_and_removes_them(tiny_cfg, tmp_path):
    rec = run_job(tiny_cfg("method=gmp", "prune.granularity=channel", "sparsity=0.5", "method.train.epochs=2",
                           "method.retrain.epochs=1"), tmp_path / "g", summary=False)
    assert rec["status"] == "ok" and rec["granularity"] == "channel"
    s = rec["structure"]
    assert s["achieved"] == pytest.approx(0.5, abs=0.03) and rec["params"]["total"] < rec["params"]["total_dense"]
    assert rec["sparsity_actual"] == pytest.approx(s["params_removed"], abs=1e-9)
    steps = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    sp = [r["sparsity"] for r in steps if r.get("stage") == "gmp" and "sparsity" in r]
    assert len(sp) > 2 and sp == sorted(sp)  # gradual: channel sparsity rises on the cubic schedule


@pytest.mark.parametrize("method,extra", [("imp", ["method.rate=0.3", "method.round.epochs=1"]),
                                          ("synflow", ["method.rounds=5"]),
                                          ("colt", ["method.rate=0.3", "method.round.epochs=1"])])
def test_iterative_methods_prune_channel_groups_round_by_round(tiny_cfg, tmp_path, method, extra):
    rec = run_job(tiny_cfg(f"method={method}", "prune.granularity=channel", "sparsity=0.5", "method.retrain.epochs=1",
                           *extra), tmp_path / method, summary=False)
    assert rec["status"] == "ok" and rec["granularity"] == "channel"
    s = rec["structure"]
    assert s["achieved"] == pytest.approx(0.5, abs=0.03) and rec["params"]["total"] < rec["params"]["total_dense"]
    logs = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    sp = [r["sparsity"] for r in logs if "round" in r and "sparsity" in r]
    assert len(sp) >= 2 and sp == sorted(sp)  # several rounds, removed channels stay removed


def test_a_method_without_channel_granularity_is_refused_before_work(tiny_cfg, tmp_path, monkeypatch):
    from kdprune_cli.pruning.methods import get_method

    monkeypatch.setattr(get_method("colt"), "granularities", ("weight",))
    with pytest.raises(ConfigError, match="does not prune at prune.granularity=channel"):
        run_job(tiny_cfg("method=colt", "prune.granularity=channel"), tmp_path / "r", summary=False)
    assert not (tmp_path / "store" / "teacher").exists()
