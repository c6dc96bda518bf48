"""Every zoo model runs forward on every dataset shape and is a teacher and student option; timm models by name;
FLOPs of a known layer."""
from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg

from kdprune_cli.data import DATASETS
from kdprune_cli.models import ZOO, build_model, is_known
from kdprune_cli.models.masks import prunable_params
from kdprune_cli.training.evaluate import count_flops


@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize("arch", sorted(ZOO) + ["timm/resnet10t"])
def test_forward_on_every_dataset_shape(arch, dataset):
    classes, ch, size = DATASETS[dataset]
    torch.manual_seed(0)
    model = build_model(arch, classes, ch, size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, ch, size, size))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()
    assert len(prunable_params(model)) >= 2


def test_known_names_and_errors():
    assert is_known("resnet56") and is_known("timm/resnet18") and not is_known("resnet57")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet57", 10)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_every_zoo_entry_is_a_config_option(role):
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from kdprune_cli.cli.main import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        assert GlobalHydra.instance().config_loader().get_group_options(role) == sorted([*ZOO, "timm"])
    cfg = compose_cfg([f"{role}=wrn28_10"])
    assert cfg[role].name == "wrn28_10" and cfg[role].train.epochs == 200  # the option names it; the recipe stays
    cfg = compose_cfg([f"{role}=timm", f"{role}.name=timm/resnet10t"])  # any timm model
    assert cfg[role].name == "timm/resnet10t"
    assert compose_cfg([f"{role}=timm"])[role].name == "timm/resnet18"


def test_cifar_resnet_sizes():
    # He et al.: ResNet-20 has 0.27M parameters, ResNet-56 0.85M (with our 1×1 projection shortcuts a bit more)
    n20 = sum(p.numel() for p in build_model("resnet20", 10).parameters())
    n56 = sum(p.numel() for p in build_model("resnet56", 10).parameters())
    assert 0.26e6 < n20 < 0.29e6 and 0.84e6 < n56 < 0.88e6


def test_flops_of_one_conv_and_linear_by_hand():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 2))
    f = count_flops(net, (3, 5, 5))
    conv = 4 * 5 * 5 * 3 * 3 * 3
    assert f["dense"] == conv + 100 * 2
    with torch.no_grad():
        net[0].weight[:2].zero_()  # half the conv weights
    f = count_flops(net, (3, 5, 5))
    assert f["sparse"] == conv // 2 + 200 and f["dense"] == conv + 200
