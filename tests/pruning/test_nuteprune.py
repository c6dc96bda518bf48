"""NutePrune (docs/methods.md §5): the hard-concrete gates, the expected size, the teacher schedule of the
source, and an export that folds the gates and merged adapters in and removes the pruned channels exactly."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from kdprune_cli.errors import DivergedError
from kdprune_cli.experiment.job import run_job
from kdprune_cli.models import build_model
from kdprune_cli.pruning.procedures import gates as G
from kdprune_cli.pruning.structure import conv_gates as C
from kdprune_cli.pruning.structure.channels import ChannelGroups

warnings.filterwarnings("ignore", message="Unwrapped parameters")


def test_open_probability_is_the_sampled_frequency_of_open_gates():
    """P(z>0) from the stretched-concrete CDF equals how often sampled gates are non-zero (per log α)."""
    gen = torch.Generator().manual_seed(0)
    gates = G.HardConcrete([5], droprate_init=0.5, beta=2 / 3, gen=gen)
    with torch.no_grad():
        gates.log_alpha[0].copy_(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]))
    draws = torch.stack([gates.sample(gen)[0] for _ in range(20000)])
    freq = (draws > 0).float().mean(0)
    torch.testing.assert_close(freq, gates.open_prob()[0].detach(), atol=0.012, rtol=0)
    assert draws.min() == 0 and draws.max() == 1  # hard: stretched to (−0.1, 1.1), clipped to [0, 1]
    # the source's initialisation and clamp
    g2 = G.HardConcrete([1000], droprate_init=0.01, beta=2 / 3, gen=gen)
    assert float(g2.log_alpha[0].detach().mean()) == pytest.approx(math.log(99), abs=0.01)
    with torch.no_grad():
        g2.log_alpha[0].mul_(10)
    g2.clamp_()
    assert float(g2.log_alpha[0].detach().abs().max()) == pytest.approx(math.log(100), abs=1e-6)


def test_deterministic_gates_zero_the_expected_number_and_keep_soft_values():
    gen = torch.Generator().manual_seed(1)
    gates = G.HardConcrete([64], 0.5, 2 / 3, gen)
    with torch.no_grad():
        gates.log_alpha[0].copy_(torch.linspace(-4, 4, 64))
    z = gates.deterministic()[0]
    zeros = round(64 - float(gates.open_prob()[0].detach().sum()))
    assert int((z == 0).sum()) == zeros
    a = gates.log_alpha[0].detach()
    kept = z > 0
    torch.testing.assert_close(z[kept], torch.sigmoid(a / (2 / 3) * 0.8)[kept])  # soft values, not 1
    assert torch.all(a[~kept].max() <= a[kept].min())  # the least open go


def test_expected_size_matches_exact_counts_on_resnet56():
    """With hard 0/1 keep probabilities the expected size is the exact size after removal; with 1 the dense."""
    torch.manual_seed(0)
    model = build_model("resnet56", 10, 3, 32)
    groups = ChannelGroups(model, torch.zeros(1, 3, 32, 32))
    dense = groups.counts([0] * len(groups.groups))
    ones = [torch.ones(g.channels) for g in groups.groups]
    assert groups.expected(ones)["params"] == pytest.approx(dense["params"])
    gen = torch.Generator().manual_seed(0)
    keep = [(torch.rand(g.channels, generator=gen) > 0.4).float() for g in groups.groups]
    for k in keep:
        k[0] = 1
    exact = groups.counts([torch.nonzero(k == 0).flatten() for k in keep])
    got = groups.expected(keep)
    assert float(got["params"]) == pytest.approx(exact["params"]) and float(got["macs"]) == pytest.approx(exact["macs"])
    probs = [torch.full((g.channels,), 0.5, requires_grad=True) for g in groups.groups]
    groups.expected(probs)["params"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in probs)  # differentiable in every gate


def test_teacher_schedule_follows_the_source():
    s = G.Snapshots(target=0.1, delta=0.01, ahead=3)
    assert s.marks == pytest.approx([0.01 * i for i in range(1, 10)])
    total = 1000
    taken = iter(range(100))
    step = 0
    for step, sp in enumerate([0.005, 0.011, 0.02, 0.021, 0.035]):
        s.update(sp, total - step - 1, lambda: next(taken))
    assert s.taken == [0, 1, 2]  # one snapshot per step, at each 1% passed
    assert s.teacher(900) == 0  # 3 snapshots: the one 3 back
    for sp in [0.04, 0.05, 0.06, 0.07, 0.08, 0.09]:
        s.update(sp, 800, lambda: next(taken))
    assert len(s.taken) == 9 and s.teacher(800) == 6 and not s.reached
    s.update(0.1, 600, lambda: next(taken))
    assert s.reached and s.steps_at_target == 600
    interval = 600 // 10
    assert s.teacher(600) == min(600 // interval - 3, 8)  # walks back from the latest ...
    assert s.teacher(5 * interval) == 2
    assert s.teacher(3 * interval - 1) is None  # ... to the intact model, which teaches the last intervals
    order = [s.teacher(r) for r in range(600, -1, -1)]
    assert all(a is None or b is None or a >= b for a, b in zip(order, order[1:]))


def test_the_lagrangian_target_ramps_over_its_steps_and_without_a_ramp_is_full_from_the_first_step():
    """The source ramps the target only with a Lagrangian warm-up; without one the target holds from step 0."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(mask_lr=0.1, lambda_lr=0.1, delta=0.01, teacher_ahead=1)
    structures = SimpleNamespace(sizes=[4], counts=lambda removed, exclude: {"params": 100.0})
    gates = G.HardConcrete([4], 0.01, 2 / 3, torch.Generator().manual_seed(0))

    def targets(ramp, steps):
        obj = G.NuteObjective(cfg, nn.Linear(2, 2), structures, gates, 100, ramp, 0.6,
                              "params", (), torch.Generator(), lambda row: None, {})
        out = []
        for s in steps:
            obj.steps = s
            out.append(obj.target_now())
        return out

    assert targets(0, [0, 1, 99]) == [0.6, 0.6, 0.6]
    assert targets(10, [0, 5, 10, 50]) == pytest.approx([0.0, 0.3, 0.6, 0.6])


def test_export_folds_gates_and_merged_adapters_and_removes_channels_exactly():
    torch.manual_seed(0)
    model = build_model("resnet56", 10, 3, 32).eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(4, 3, 32, 32)
    groups = ChannelGroups(model, x[:1])
    points = C.gate_points(model, groups)
    assert sum(len(p) for p in points) == sum(1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    gen = torch.Generator().manual_seed(3)
    z = [torch.rand(g.channels, generator=gen) * (torch.rand(g.channels, generator=gen) > 0.3) for g in groups.groups]
    for zg in z:
        zg[0] = 0.7
    gating = C.ConvGates(model, groups)
    gating.attach()
    model = G.add_lora(model, 4, 8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # adapters that change the function
        gating.z = z
        gated = model(x)
    gating.remove_hooks()
    model = G.merge_lora(model)
    assert not G._lora_layers(model)
    facts = gating.export(z)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, gated, atol=1e-4, rtol=1e-4)
    assert facts["channels_removed"] == sum(int((zg == 0).sum()) for zg in z) > 0
    assert model.layer2[0].conv2.out_channels < 32 and facts["params_removed"] > 0


def test_pre_activation_wrn_is_gated_at_its_batchnorms_and_exports_exactly():
    """WRN (BN-ReLU-conv): the stage channels are gated at every BN that reads the stream and at the convs that
    write into the additions; closed channels are zero in the block outputs and the export is exact."""
    from kdprune_cli.models.cifar import WideResNet

    torch.manual_seed(0)
    model = WideResNet(16, 2, 10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.randn(4, 3, 32, 32)
    groups = ChannelGroups(model, x[:1])
    points = C.gate_points(model, groups)
    gated_modules = [m for pts in points for m, _ in pts]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in gated_modules) == \
        sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.blocks[0].conv2 in gated_modules and model.blocks[0].conv1 not in gated_modules
    gen = torch.Generator().manual_seed(5)
    z = [torch.rand(g.channels, generator=gen) * (torch.rand(g.channels, generator=gen) > 0.3) for g in groups.groups]
    for zg in z:
        zg[0] = 0.7
    gating = C.ConvGates(model, groups)
    model = G.add_lora(model, 4, 8)
    gating.attach()  # a conv under an adapter is gated at the adapter's output
    outs = []
    model.blocks[1].register_forward_hook(lambda m, i, o: outs.append(o))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        gating.z = z
        gated = model(x)
    stage = next(g for g, grp in enumerate(groups.groups) if any(it.module == "blocks.1.conv2" for it in grp.items))
    closed = torch.nonzero(z[stage] == 0).flatten()
    assert len(closed) and outs[0][:, closed].abs().max() == 0  # the stream is zero on closed channels
    gating.remove_hooks()
    model = G.merge_lora(model)
    facts = gating.export(z)
    with torch.no_grad():
        torch.testing.assert_close(model(x), gated, atol=1e-4, rtol=1e-4)
    assert facts["channels_removed"] == sum(int((zg == 0).sum()) for zg in z) and facts["params_removed"] > 0.2


FAST = ["method=nuteprune", "method.prune.epochs=2", "method.ramp_epochs=1", "method.teacher_ahead=2",
        "method.retrain.epochs=1", "max_batches=6"]


@pytest.mark.parametrize("extra", [[], ["method.lora=false", "method.teachers=intact"]])
def test_runs_end_to_end_and_the_exported_model_reloads(tiny_cfg, tmp_path, extra):
    from kdprune_cli.models.modelfile import load_pruned

    rec = run_job(tiny_cfg(*FAST, "sparsity=0.5", *extra), tmp_path / "r", summary=False)
    assert rec["status"] == "ok" and rec["granularity"] == "channel"
    s = rec["structure"]
    assert s["method"] == "nuteprune" and s["export_max_abs_diff"] < 1e-4
    assert rec["params"]["total"] <= rec["params"]["total_dense"]
    assert rec["sparsity_actual"] == pytest.approx(s["params_removed"], abs=1e-9)
    assert rec["cost"]["stages"]["prune"]["teacher_samples"] > 0  # every step has a teacher forward
    # the ablation is its own variant of the method (its own report row); every stage books its memory (CPU:
    # the process's peak resident set, bytes)
    assert rec["method"] == "nuteprune"
    assert rec["method_variant"] == ("intact teacher" if "method.teachers=intact" in extra else None)
    for name, st in rec["cost"]["stages"].items():
        assert st["memory_kind"] == "process_rss" and "peak_memory_bytes" not in st, name
        assert isinstance(st["peak_rss_bytes"], int) and st["peak_rss_bytes"] > 0, name
    assert {"data", "teacher", "student", "prune", "retrain"} <= set(rec["cost"]["stages"])
    steps = [r for r in map(__import__("json").loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())
             if r.get("stage") == "nuteprune"]
    assert steps and {"expected_sparsity", "target", "lambda1", "lambda2", "teacher", "kd", "hidden"} <= set(steps[-1])
    model = load_pruned(tmp_path / "r")
    assert sum(p.numel() for p in model.parameters()) == rec["params"]["total"]


@pytest.mark.parametrize("student", [["student=timm", "student.name=timm/vit_tiny_patch16_224",
                                      "+student.kwargs.patch_size=4",  # runs on 8×8 digits
                                      "+student.kwargs.pre_norm=true"],  # a CLIP-style pre-norm: not a plain ViT
                                     ["student=timm", "student.name=timm/vit_tiny_patch16_224",
                                      "+student.kwargs.patch_size=4",
                                      "+student.kwargs.global_pool=map"]])  # attention pooling
def test_unsupported_students_fail_before_any_training(tiny_cfg, tmp_path, student):
    from kdprune_cli.config.schema import ConfigError

    with pytest.raises(ConfigError, match="nuteprune"):
        run_job(tiny_cfg("method=nuteprune", *student), tmp_path / "r", summary=False)
    assert not (tmp_path / "store" / "teacher").exists()


def test_quickstart_nuteprune_ends_physically_smaller_and_accurate(tmp_path):
    """As a user runs it: `kdprune experiment=quickstart method=nuteprune sparsity=0.5`
    (the teacher cut to a 2-epoch ResNet-20: NutePrune's teachers are the student's own snapshots)."""
    import json

    from runs import kdprune

    r = kdprune(["experiment=quickstart", "progress=false", "method=nuteprune", "sparsity=0.5", "teacher=resnet20",
                 "teacher.train.epochs=2"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "run" / "results.json").read_text())
    assert rec["status"] == "ok" and rec["structure"]["export_max_abs_diff"] < 1e-4
    assert rec["params"]["total"] < 0.7 * rec["params"]["total_dense"]  # physically smaller
    assert abs(rec["sparsity_actual"] - 0.5) < 0.1
    assert rec["metrics"]["final"]["top1"] >= 90.0


def test_a_non_finite_loss_stops_with_one_line():
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    structures = C.ConvGates(model, ChannelGroups(model, x[:1]))
    structures.attach()
    gates = G.HardConcrete(structures.sizes, 0.01, 2 / 3, torch.Generator().manual_seed(0))
    cfg = SimpleNamespace(mask_lr=0.1, lambda_lr=0.1, delta=0.01, teacher_ahead=1, teachers="intact", lora=False,
                          temperature=2 / 3, kd_weight=0.1, hidden_weight=0.9)
    obj = G.NuteObjective(cfg, model, structures, gates, 10, 5, 0.5, "params", (),
                          torch.Generator().manual_seed(0), lambda r: None, {})
    obj(model, x, None, None)  # finite
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(DivergedError, match=r"diverged in stage prune \(step 0\): the loss is not finite"):
        obj(model, x, None, None)
