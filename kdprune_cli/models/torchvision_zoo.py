"""torchvision models adapted to small images (the usual "CIFAR stem").

ResNet: 3×3 stride-1 first conv, no max-pool. VGG: max-pools that would shrink a map below 1×1 are
dropped, global average pooling and one linear classifier. MobileNetV2: stride 1 in the first conv and
in the first stride-2 block (total stride 8 instead of 32).
"""
from __future__ import annotations

import torchvision
from torch import nn


def tv_resnet(arch: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def tv_vgg(arch: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    model = getattr(torchvision.models, arch)(weights=None)
    layers, size = [], image_size
    for layer in model.features:
        if isinstance(layer, nn.Conv2d) and layer.in_channels == 3:
            layer = nn.Conv2d(in_channels, layer.out_channels, 3, 1, 1)
        if isinstance(layer, nn.MaxPool2d):
            if size < 2:
                continue
            size //= 2
        layers.append(layer)
    model.features = nn.Sequential(*layers)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Linear(512, num_classes)
    return model


def tv_mobilenet_v2(num_classes: int, in_channels: int = 3) -> nn.Module:
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)
    first = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, 1, 1, bias=False)
    # features[2] is the first inverted-residual block with stride 2: make it stride 1.
    model.features[2].conv[1][0].stride = (1, 1)
    return model
