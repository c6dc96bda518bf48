"""The model zoo: one registry for teachers and students.

- CIFAR ResNet-20/32/56/110 and WRN-28-10 are written here (no maintained library ships them);
- ResNet-18/34/50, VGG-16/19-BN and MobileNetV2 are torchvision's classes with a CIFAR stem;
- ``timm/<name>`` is any timm model, created with the dataset's classes and input channels (and, for models
  with a fixed input size such as ViTs, ``img_size`` = the dataset's image size).

Classes, input channels and image size always come from the dataset. Each zoo entry is also an option of the
``teacher`` and ``student`` config groups (``teacher=resnet56``, registered with Hydra's ConfigStore), so adding an
architecture is one entry here.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

from hydra.core.config_store import ConfigStore
from torch import nn

from kdprune_cli.models.cifar import CifarResNet, WideResNet
from kdprune_cli.models.torchvision_zoo import tv_mobilenet_v2, tv_resnet, tv_vgg

Builder = Callable[[int, int, int], nn.Module]  # (num_classes, in_channels, image_size) -> model

ZOO: Dict[str, Builder] = {
    "resnet20": lambda c, ch, s: CifarResNet(20, c, ch),
    "resnet32": lambda c, ch, s: CifarResNet(32, c, ch),
    "resnet56": lambda c, ch, s: CifarResNet(56, c, ch),
    "resnet110": lambda c, ch, s: CifarResNet(110, c, ch),
    "resnet18": lambda c, ch, s: tv_resnet("resnet18", c, ch),
    "resnet34": lambda c, ch, s: tv_resnet("resnet34", c, ch),
    "resnet50": lambda c, ch, s: tv_resnet("resnet50", c, ch),
    "vgg16": lambda c, ch, s: tv_vgg("vgg16_bn", c, ch, s),
    "vgg19": lambda c, ch, s: tv_vgg("vgg19_bn", c, ch, s),
    "wrn28_10": lambda c, ch, s: WideResNet(28, 10, c, ch),
    "mobilenetv2": lambda c, ch, s: tv_mobilenet_v2(c, ch),
}

# The config option ``timm``: any timm model, ``teacher=timm teacher.name=timm/<model name>`` (random init; no
# weights are downloaded); this one unless ``.name`` says another.
TIMM_OPTION = "timm/resnet18"


def model_names() -> list[str]:
    return sorted(ZOO) + ["timm/<any timm model>"]


def is_known(name: str) -> bool:
    if name.startswith("timm/"):
        import timm

        return timm.is_model(name[len("timm/"):])
    return name in ZOO


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32,
                kwargs: Optional[dict] = None) -> nn.Module:
    """Build ``name`` for a dataset with ``num_classes`` classes, ``in_channels`` and ``image_size``;
    ``kwargs`` (timm models only) go to ``timm.create_model``."""
    kwargs = dict(kwargs or {})
    if kwargs and not name.startswith("timm/"):
        raise ValueError(f"model kwargs {sorted(kwargs)} apply to timm models only, not {name!r}")
    if name.startswith("timm/"):
        import timm

        arch = name[len("timm/"):]
        if not timm.is_model(arch):
            raise ValueError(f"unknown timm model {arch!r} (see timm.list_models())")
        # models with a fixed input size (ViTs) are built for the dataset's images; the others refuse img_size
        for size in ({"img_size": image_size}, {}):
            try:
                return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels,
                                         **{**size, **kwargs})
            except TypeError as e:
                if not size or "img_size" not in str(e) or "img_size" in kwargs:
                    raise ValueError(f"timm model {arch!r}: {e}") from None
    if name not in ZOO:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")
    return ZOO[name](num_classes, in_channels, image_size)


for _role in ("teacher", "student"):  # teacher=<arch> and student=<arch> for every zoo entry, and timm
    for _name in [*ZOO, "timm"]:
        ConfigStore.instance().store(group=_role, name=_name, node={"name": TIMM_OPTION if _name == "timm" else _name})
