"""NutePrune on timm ViTs (docs/methods.md §5): head, MLP-channel and hidden-width gates with a LayerNorm over
the kept dims, sizes from the real layer shapes, LoRA on q and v only, snapshot teachers on one copy of the
weights, and an export that removes heads, channels and width exactly."""
from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import torch_macs
from torch import nn

from kdprune_cli.experiment.job import run_job
from kdprune_cli.models import build_model
from kdprune_cli.models.masks import prunable_params
from kdprune_cli.models.modelfile import build_from, model_file
from kdprune_cli.pruning.procedures import gates as G
from kdprune_cli.pruning.structure.vit import ViTGates
from kdprune_cli.training.evaluate import count_flops

warnings.filterwarnings("ignore", message="Unwrapped parameters")
VIT = "timm/vit_tiny_patch16_224"


def vit(**kwargs) -> nn.Module:
    """ViT-Tiny (12 blocks, width 192, 3 heads of 64, MLP 768) built for 32×32 images: 4 patches + CLS."""
    torch.manual_seed(0)
    return build_model(VIT, 10, 3, 32, kwargs)


def size(model) -> int:
    return sum(p.numel() for p in prunable_params(model).values())


def random_gates(sizes, seed, soft=True):
    gen = torch.Generator().manual_seed(seed)
    z = [(torch.rand(n, generator=gen) if soft else torch.ones(n)) * (torch.rand(n, generator=gen) > 0.35)
         for n in sizes]
    for v in z:
        v[0] = 0.6 if soft else 1.0  # every structure keeps one unit
    return z


def test_expected_size_is_the_size_of_the_exported_model():
    model = vit().eval()
    x = torch.randn(1, 3, 32, 32)
    g = ViTGates(model, x)
    assert g.sizes == [192] + [3] * 12 + [768] * 12
    dense = g.counts([0] * len(g.sizes))
    assert dense["params"] == size(model) and dense["macs"] == count_flops(model, (3, 32, 32))["dense"]
    # per head 4·d_head·D, per MLP channel 2·D (a structure's own share of the prunable weights)
    one_head = [torch.tensor([]).long()] * len(g.sizes)
    one_head[1] = torch.tensor([2])
    assert dense["params"] - g.counts(one_head)["params"] == 4 * 64 * 192
    one_channel = [torch.tensor([]).long()] * len(g.sizes)
    one_channel[13] = torch.tensor([5])
    assert dense["params"] - g.counts(one_channel)["params"] == 2 * 192
    keep = random_gates(g.sizes, 0, soft=False)
    expected = g.expected(keep)
    removed = [torch.nonzero(k == 0).flatten() for k in keep]
    g.remove_hooks()
    g.export(keep)
    assert float(expected["params"]) == g.counts(removed)["params"] == size(model)
    assert float(expected["macs"]) == pytest.approx(count_flops(model, (3, 32, 32))["dense"], rel=1e-12)
    probs = [torch.full((n,), 0.5, requires_grad=True) for n in g.sizes]
    g.expected(probs)["params"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in probs)  # every gate moves the size


@pytest.mark.parametrize("shape,patch", [((1, 8, 8), 2), ((3, 32, 32), 4)])  # 17 and 65 tokens
def test_expected_macs_of_a_gated_vit_are_torchs_count_of_the_exported_model(explicit_attention, shape, patch):
    """Heads, MLP channels and width closed: the expected MACs (attention's Q·Kᵀ and A·V per kept head
    included) equal ``torch.utils.flop_counter``'s count of the exported model, FLOPs/2."""
    torch.manual_seed(0)
    model = build_model(VIT, 10, shape[0], shape[1], {"patch_size": patch, "depth": 2}).eval()
    g = ViTGates(model, torch.zeros(1, *shape))
    keep = random_gates(g.sizes, 5, soft=False)
    keep[1], keep[2] = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 1.0])  # 2 heads and 1 head left
    assert int((keep[0] == 0).sum()) > 0 and all(int((k == 0).sum()) > 0 for k in keep[3:])
    expected = float(g.expected(keep)["macs"])
    dense = g.counts([0] * len(g.sizes))["macs"]
    assert dense == torch_macs(model, torch.zeros(1, *shape))
    g.export(keep)
    assert [blk.attn.num_heads for blk in model.blocks] == [2, 1]
    assert expected == pytest.approx(torch_macs(model, torch.randn(2, *shape)), rel=0.005)
    assert expected == pytest.approx(count_flops(model, shape)["dense"], rel=1e-9)
    one_head = [torch.tensor([]).long()] * len(g.sizes)
    one_head[1] = torch.tensor([0])
    tokens = 1 + (shape[1] // patch) ** 2
    attn_share = 2 * tokens ** 2 * 64  # Q·Kᵀ and A·V of one head: whatever the width
    layers_share = 4 * 64 * 192 * tokens  # its q, k, v rows and proj columns over the tokens
    assert dense - g.counts(one_head)["macs"] == attn_share + layers_share


def test_export_removes_heads_channels_and_width_exactly_and_the_file_reloads():
    model = vit(init_values=0.5).eval()  # with LayerScale
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    x = torch.randn(4, 3, 32, 32)
    g = ViTGates(model, x[:1])
    model = G.add_lora(model, 4, 8)
    g.attach()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    z = random_gates(g.sizes, 3)
    g.z = z
    with torch.no_grad():
        gated = model(x)
    g.remove_hooks()
    model = G.merge_lora(model)
    facts = g.export(z)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, gated, atol=1e-4, rtol=1e-4)
    kept = [int((v != 0).sum()) for v in z]
    for b, blk in enumerate(model.blocks):
        assert blk.attn.num_heads == kept[1 + b] and blk.attn.qkv.out_features == 3 * 64 * kept[1 + b]
        assert blk.mlp.fc1.out_features == kept[13 + b] and blk.norm1.normalized_shape == (kept[0],)
    assert model.head.in_features == kept[0] and model.pos_embed.shape[-1] == kept[0]
    assert facts["widths"]["hidden"] == kept[0] and facts["params_removed"] > 0.3
    obj = model_file(model, {"name": VIT, "num_classes": 10, "in_channels": 3, "image_size": 32,
                             "kwargs": {"init_values": 0.5}})
    again = build_from(obj, "memory").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), out)


def test_the_hidden_layernorm_normalises_over_the_kept_dims_only():
    model = vit(depth=1).eval()
    x = torch.randn(2, 3, 32, 32)
    g = ViTGates(model, x[:1])
    g.attach()
    z = [torch.ones(n) for n in g.sizes]
    z[0][torch.arange(0, 192, 3)] = 0  # a third of the width off
    g.z = z
    seen = {}
    model.blocks[0].norm1.register_forward_hook(lambda m, i, o: seen.update(i=i[0], o=o))
    with torch.no_grad():
        model(x)
    keep = z[0] != 0
    ln = model.blocks[0].norm1
    assert torch.all(seen["i"][..., ~keep] == 0)  # the residual stream is zero on the gated-off dims
    ref = nn.functional.layer_norm(seen["i"][..., keep], (int(keep.sum()),), ln.weight[keep], ln.bias[keep], ln.eps)
    torch.testing.assert_close(seen["o"][..., keep], ref)
    assert torch.all(seen["o"][..., ~keep] == 0)


def test_lora_adapts_q_and_v_only_as_two_rank_r_adapters():
    model = G.add_lora(vit(depth=2), r=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".attn.qkv.lora_" in n for n in trainable)  # only q/v adapters train
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3, 32, 32)).pow(2).sum().backward()
        opt.step()
    merged = G.merge_lora(model)
    for b, blk in enumerate(merged.blocks):
        delta = blk.attn.qkv.weight.detach() - before[f"blocks.{b}.attn.qkv.base_layer.weight"]
        q, k, v = delta.split(192)
        assert k.abs().max() == 0 and q.abs().max() > 0 and v.abs().max() > 0
        assert torch.linalg.matrix_rank(q) <= 4 and torch.linalg.matrix_rank(v) <= 4  # rank r each, scale α/r


def objective(model, g, gates, lora=True, target=0.5, total=100, ramp=50, teachers="snapshots"):
    cfg = SimpleNamespace(mask_lr=0.1, lambda_lr=0.1, delta=0.01, teacher_ahead=1, teachers=teachers,
                          lora=lora, temperature=2 / 3, kd_weight=0.1, hidden_weight=0.9)
    intact = {n: p.detach().clone() for n, p in model.named_parameters()}
    if lora:
        model = G.add_lora(model, 4, 8)
    g.attach()
    obj = G.NuteObjective(cfg, model, g, gates, total, ramp, target, "params", (),
                          torch.Generator().manual_seed(0), lambda row: None, intact)
    return model, obj


def test_a_snapshot_teacher_reproduces_the_model_at_the_snapshot_on_one_copy_of_the_weights():
    model = vit(depth=2).eval()
    x = torch.randn(4, 3, 32, 32)
    g = ViTGates(model, x[:1])
    gates = G.HardConcrete(g.sizes, 0.01, 2 / 3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a in gates.log_alpha:
            a.uniform_(-2, 3)
    model, obj = objective(model, g, gates)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    snap = obj.take()
    g.z = snap[0]
    with torch.no_grad():
        at_snapshot = model(x)
    g.z = None
    with torch.no_grad():  # the student moves on: adapters and gates change
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)
        for a in gates.log_alpha:
            a.add_(torch.randn_like(a))
    now = {n: p.detach().clone() for n, p in obj.trainable}
    obj.snapshots.taken = [snap]
    logits, hidden, which = obj.teacher_forward(x)
    assert which == 0
    torch.testing.assert_close(logits, at_snapshot, atol=0, rtol=0)
    assert len(hidden) == 2  # the block outputs
    for n, p in obj.trainable:  # the student's own adapters are back
        assert torch.equal(p, now[n])
    # one copy of the base weights: a snapshot holds adapters only
    base = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert set(snap[1]) == {n for n, _ in obj.trainable} and all("lora_" in n for n in snap[1])
    ptrs = [p.untyped_storage().data_ptr() for p in base]
    assert len(set(ptrs)) == len(ptrs)
    snap_bytes = sum(t.numel() * t.element_size() for t in snap[1].values())
    assert snap_bytes < 0.1 * sum(p.numel() * p.element_size() for p in base)


def test_the_lagrangian_drives_expected_sparsity_to_the_target():
    model = vit(depth=2).eval()
    x = torch.randn(8, 3, 32, 32)
    g = ViTGates(model, x[:1])
    gates = G.HardConcrete(g.sizes, 0.01, 2 / 3, torch.Generator().manual_seed(0))
    model, obj = objective(model, g, gates, total=400, ramp=150, target=0.5)
    for _ in range(400):
        loss, _ = obj(model, x, None, None)
        loss.backward()
        for _, p in obj.trainable:
            p.grad = None
        obj.step()
    assert obj.last["target"] == 0.5
    assert abs(float(obj.expected_sparsity().detach()) - 0.5) <= 0.02


FAST = ["method=nuteprune", "method.prune.epochs=2", "method.ramp_epochs=1", "method.teacher_ahead=2",
        "method.retrain.epochs=1", "max_batches=6", "student=timm", f"student.name={VIT}",
        "+student.kwargs.patch_size=2", "+student.kwargs.depth=2"]


def test_a_vit_runs_end_to_end_and_the_exported_model_reloads(tiny_cfg, tmp_path, request):
    from kdprune_cli.models.modelfile import load_pruned

    rec = run_job(tiny_cfg(*FAST, "sparsity=0.5", "prune.granularity=channel", "prune.target=macs"), tmp_path / "r",
                  summary=False)
    assert rec["status"] == "ok" and rec["granularity"] == "channel"
    s = rec["structure"]
    assert s["export_max_abs_diff"] < 1e-4 and set(s["widths"]) >= {"hidden", "blocks.1.attn.heads"}
    assert rec["params"]["total"] < rec["params"]["total_dense"]
    assert s["macs_removed"] == pytest.approx(1 - rec["flops"]["executed"] / rec["flops"]["dense"], abs=1e-9)
    request.getfixturevalue("explicit_attention")  # the recorded MACs are torch's count (8×8 digits, 17 tokens)
    model = load_pruned(tmp_path / "r")
    assert sum(p.numel() for p in model.parameters()) == rec["params"]["total"]
    assert math.isclose(rec["sparsity_actual"], s["params_removed"], abs_tol=1e-9)
    x = torch.zeros(1, 1, 8, 8)
    assert rec["flops"]["executed"] == pytest.approx(torch_macs(model, x), rel=0.005)
    dense = build_model(VIT, 10, 1, 8, {"patch_size": 2, "depth": 2})
    assert rec["flops"]["dense"] == pytest.approx(torch_macs(dense, x), rel=0.005)


def test_prune_exclude_keeps_the_structures_an_excluded_layer_produces():
    model = vit(depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    g = ViTGates(model, x[:1], exclude=["blocks.0.mlp.fc1"])
    g.attach()
    z = random_gates(g.sizes, 4)
    mlp0 = 1 + 2  # hidden, 2 head groups, then the MLP groups
    assert int((z[mlp0] == 0).sum()) > 0
    full = g.expected([torch.ones(n) for n in g.sizes], ["blocks.0.mlp.fc1"])
    dropped = [torch.ones(n) for n in g.sizes]
    dropped[mlp0][:100] = 0
    assert float(g.expected(dropped, ["blocks.0.mlp.fc1"])["params"]) == float(full["params"])  # its gates count as open
    g.z = z
    with torch.no_grad():
        gated = model(x)
    g.remove_hooks()
    g.export(z)
    assert model.blocks[0].mlp.fc1.out_features == 768 and model.blocks[1].mlp.fc1.out_features < 768
    with torch.no_grad():
        torch.testing.assert_close(model(x), gated, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad", [["+teacher.kwargs.patch_size=4"],  # kwargs on a non-timm model
                                 ["student=timm", f"student.name={VIT}", "+student.kwargs.bogus=1"]])
def test_bad_model_kwargs_fail_with_one_line_before_any_training(tiny_cfg, tmp_path, bad):
    from kdprune_cli.config.schema import ConfigError

    with pytest.raises(ConfigError, match="kwargs|timm model") as e:
        run_job(tiny_cfg("method=magnitude", *bad), tmp_path / "r", summary=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "store" / "teacher").exists()
