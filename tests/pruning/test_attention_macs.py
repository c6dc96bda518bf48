"""MACs (docs/methods.md §6) include the products between activations, attention's Q·Kᵀ and A·V: for timm
ViTs the count equals ``torch.utils.flop_counter``'s (FLOPs/2) with the attention run as explicit matmuls,
and the fused kernel counts the same; the products have no weights, so they count in dense, sparse and
executed MACs alike."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import torch_macs
from torch.utils.flop_counter import FlopCounterMode

from kdprune_cli.models import build_model
from kdprune_cli.models.masks import prunable_modules
from kdprune_cli.models.matmuls import MatmulCounter, product_macs
from kdprune_cli.training.evaluate import count_flops

VIT = "timm/vit_tiny_patch16_224"  # width 192, 3 heads of 64
# (input shape, patch, tokens): 8×8 digits with patch 2 → 16 patches + CLS; 32×32 with patch 4 → 64 + CLS
SHAPES = [((1, 8, 8), 2, 17), ((3, 32, 32), 4, 65)]


def vit(shape, patch, depth=2):
    torch.manual_seed(0)
    return build_model(VIT, 10, shape[0], shape[1], {"patch_size": patch, "depth": depth}).eval()


def attention(tokens, depth=2, width=192):
    """Q·Kᵀ and A·V of every block: 2·N²·d_head per head, 2·N²·width per block."""
    return depth * 2 * tokens ** 2 * width


@pytest.mark.parametrize("shape,patch,tokens", SHAPES)
def test_vit_macs_equal_torch_flop_counter_with_explicit_attention(explicit_attention, shape, patch, tokens):
    model = vit(shape, patch)
    assert all(not m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    x = torch.randn(2, *shape)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    assert fc.get_flop_counts()["Global"][torch.ops.aten.bmm] / 2 / 2 == attention(tokens)  # the tokens we think
    f = count_flops(model, shape)
    assert f["dense"] == pytest.approx(torch_macs(model, x), rel=0.005)
    assert f["dense"] == torch_macs(model, x)  # in fact exactly


@pytest.mark.parametrize("shape,patch,tokens", SHAPES)
def test_the_fused_attention_kernel_counts_the_same_products(request, shape, patch, tokens):
    fused = vit(shape, patch)
    assert any(m.fused_attn for m in fused.modules() if hasattr(m, "fused_attn"))  # timm's default here
    request.getfixturevalue("explicit_attention")
    explicit = vit(shape, patch)
    assert count_flops(fused, shape) == count_flops(explicit, shape)


@pytest.mark.parametrize("shape,patch,tokens", SHAPES[:1])
def test_attention_products_count_in_dense_and_sparse_macs(shape, patch, tokens):
    model = vit(shape, patch)
    dense = count_flops(model, shape)
    with torch.no_grad():
        for m in prunable_modules(model).values():
            m.weight.zero_()  # every weight gone: only the products between activations are left
    f = count_flops(model, shape)
    assert f["dense"] == dense["dense"] and f["sparse"] == attention(tokens)


def test_the_counter_counts_products_as_torch_does():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 6)
    w, b = torch.randn(6, 8), torch.randn(8)

    def explicit():
        a = (q @ k.transpose(-2, -1)).softmax(-1)
        y = torch.matmul(a, v)
        y = torch.baddbmm(torch.zeros(6, 5, 6), y.flatten(0, 1), torch.randn(6, 6, 6))
        return torch.addmm(b, y.flatten(0, 1), w).mm(torch.randn(8, 2))

    with MatmulCounter() as mine:
        explicit()
    with FlopCounterMode(display=False) as fc:
        explicit()
    assert mine.macs == fc.get_total_flops() / 2 > 0
    with MatmulCounter() as fused:
        F.scaled_dot_product_attention(q, k, v)
    assert fused.macs == 2 * 3 * 5 * 7 * (4 + 6)  # Q·Kᵀ (L·S·E) and A·V (L·S·Eᵥ) per batch and head
    with MatmulCounter() as plain:
        q @ k.transpose(-2, -1)
    assert plain.macs == 2 * 3 * 5 * 4 * 7
    assert product_macs(torch.Size([4]), torch.Size([3, 4, 5])) == 3 * 4 * 5  # a vector, broadcast batch
    assert product_macs(torch.Size([2, 1, 5, 4]), torch.Size([3, 4, 6])) == 2 * 3 * 5 * 4 * 6
