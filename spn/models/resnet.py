"""ResNet50 as wsolevaluation builds it for CAM (Choe et al., CVPR 2020, ``wsol/resnet.py``).

The standard bottleneck ResNet50 (He et al., 2016: blocks [3, 4, 6, 3], widths 64 to 512, x4
expansion) whose ``layer4`` keeps stride 1, so the features of a 224 x 224 image are 14 x 14
(output stride 16) instead of 7 x 7; with ``large_feature_map=True`` ``layer3`` keeps stride 1
too (28 x 28, output stride 8). Parameter names are torchvision's (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.downsample.0``, ...), so ImageNet weights saved from torchvision
load with :func:`load_resnet50_features` (``fc.*`` is ignored); nothing is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from .backbones import copy_backbone_weights

__all__ = ["ResNet50Backbone", "load_resnet50_features"]


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand (x4), with a projected shortcut when
    the shape changes; ReLU after the sum."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + shortcut)


class ResNet50Backbone(nn.Module):
    """wsolevaluation's ResNet50 feature extractor (everything before the average pooling).

    Args:
        large_feature_map: ``layer3`` with stride 1 too (output stride 8 instead of 16).

    Shape:
        - Input: (B, 3, H, W)
        - Output: (B, 2048, H / 16, W / 16), or (B, 2048, H / 8, W / 8) with ``large_feature_map``.

    Example:
        >>> ResNet50Backbone()(torch.rand(1, 3, 64, 64)).shape
        torch.Size([1, 2048, 4, 4])
    """

    out_channels = 2048

    def __init__(self, large_feature_map: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = 64
        layers = []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 1 if large_feature_map else 2), (512, 3, 1)):
            stage = []
            for index in range(blocks):
                stage.append(Bottleneck(channels, width, stride if index == 0 else 1))
                channels = width * Bottleneck.expansion
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.output_stride = 8 if large_feature_map else 16
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def load_resnet50_features(model: nn.Module, state_dict: Mapping[str, torch.Tensor] | str | os.PathLike) -> nn.Module:
    """Copy torchvision ResNet50 weights (a state dict or a file saved with ``torch.save``) into
    a `ResNet50Backbone` or a network whose ``backbone`` is one; ``fc.*`` is ignored and any
    other mismatch is named before anything changes. Returns ``model``.

    Example:
        >>> import torchvision  # doctest: +SKIP
        >>> torch.save(torchvision.models.resnet50(weights="IMAGENET1K_V1").state_dict(), "r50.pth")  # doctest: +SKIP
        >>> net = load_resnet50_features(resnet50_cam(200), "r50.pth")  # doctest: +SKIP
    """
    backbone = model if isinstance(model, ResNet50Backbone) else getattr(model, "backbone", None)
    if not isinstance(backbone, ResNet50Backbone):
        name = type(model).__name__
        raise TypeError(f"load_resnet50_features needs a ResNet50Backbone or a model with one, got {name}")
    what = "ResNet50 weights (torchvision's resnet50 keys"
    copy_backbone_weights(backbone, state_dict, ignored_prefix="fc.", what=what)
    return model
