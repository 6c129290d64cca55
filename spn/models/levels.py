"""`FeatureLevels`: a backbone that returns the feature maps of its last few stages.

Methods that read more than the last feature map (DANet's hierarchical heads on conv3, conv4
and conv5; ICL's attention consistency between layers) wrap the ``--model`` backbone in
`FeatureLevels`; its output is a list, shallowest first, whose last entry is what the bare
backbone returns. A stage is: a block of `SmallBackbone` (conv-norm-ReLU), a conv stage of
`VGG16Backbone` (conv1_x .. conv5_x, taken at its last ReLU, before its pooling), a layer of
`ResNet50Backbone` (layer1 .. layer4).
"""

from __future__ import annotations

import torch
from torch import nn

from .backbones import SmallBackbone, VGG16Backbone
from .resnet import ResNet50Backbone

__all__ = ["FeatureLevels"]


class FeatureLevels(nn.Module):
    """Wraps a backbone to return its last ``levels`` stage outputs, shallowest first.

    Args:
        backbone: a `SmallBackbone`, `VGG16Backbone` or `ResNet50Backbone`.
        levels: how many stages, counted from the last (at most the backbone's stage count).

    Attributes:
        out_channels: channels of each returned level, shallowest first.

    Shape:
        - Input: (B, 3, H, W)
        - Output: a list of ``levels`` tensors (B, C_i, h_i, w_i); the last equals
          ``backbone(images)``.

    Example:
        >>> from spn.models import SmallBackbone
        >>> levels = FeatureLevels(SmallBackbone(widths=(8, 16, 32)), levels=2)
        >>> [tuple(x.shape) for x in levels(torch.rand(1, 3, 32, 32))]
        [(1, 16, 16, 16), (1, 32, 8, 8)]
    """

    def __init__(self, backbone: nn.Module, levels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self._ends, channels = _stage_ends(backbone)
        if not 1 <= levels <= len(self._ends):
            raise ValueError(f"levels must be in 1..{len(self._ends)} for {type(backbone).__name__}, got {levels}")
        self.levels = int(levels)
        self.out_channels = channels[-self.levels :]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        backbone = self.backbone
        outputs: list[torch.Tensor] = []
        if isinstance(backbone, ResNet50Backbone):
            x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(images))))
            for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
                x = layer(x)
                outputs.append(x)
        else:
            x = images
            ends = set(self._ends)
            features = backbone.features
            assert isinstance(features, nn.Sequential)
            for index, module in enumerate(features):
                x = module(x)
                if index in ends:
                    outputs.append(x)
        return outputs[-self.levels :]


def _stage_ends(backbone: nn.Module) -> tuple[list[int], list[int]]:
    """Indices in ``backbone.features`` whose outputs end a stage, and the stages' channels."""
    if isinstance(backbone, ResNet50Backbone):
        return [0, 1, 2, 3], [256, 512, 1024, 2048]
    if not isinstance(backbone, (SmallBackbone, VGG16Backbone)):
        raise TypeError(f"FeatureLevels takes a SmallBackbone, VGG16Backbone or ResNet50Backbone, got {type(backbone)}")
    modules = list(backbone.features)
    ends: list[int] = []
    channels: list[int] = []
    width = 0
    for index, module in enumerate(modules):
        if isinstance(module, nn.Conv2d):
            width = module.out_channels
        if not isinstance(module, nn.ReLU):
            continue
        following = modules[index + 1] if index + 1 < len(modules) else None
        if isinstance(backbone, SmallBackbone) or following is None or isinstance(following, nn.MaxPool2d):
            ends.append(index)
            channels.append(width)
    return ends, channels
