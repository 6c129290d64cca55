"""Backbones: VGG16's convolutions (torchvision layout, offline weight loading) and a small CNN.

A backbone is an ``nn.Module`` images (B, 3, H, W) -> features (B, C, H/s, W/s) with the
attributes ``out_channels`` (C) and ``output_stride`` (s).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["VGG16_CONFIG", "SmallBackbone", "VGG16Backbone", "load_vgg16_features"]

VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512
)  # fmt: skip
"""VGG16's conv layers ("M": 2x2 max pool) up to conv5_3, without the final pool."""


class VGG16Backbone(nn.Module):
    """VGG16's 13 conv layers without the last max pool (conv5_3 + ReLU), output stride 16.

    ``self.features`` is an ``nn.Sequential`` with torchvision's indices (conv 0, ReLU 1,
    conv 2, ReLU 3, pool 4, ..., conv 28, ReLU 29; torchvision's pool 30 is left out), so a
    torchvision ``vgg16`` state dict's ``features.*`` keys fit it; see `load_vgg16_features`.
    Weights are initialised as torchvision does (Kaiming normal, fan-out; zero biases);
    nothing is downloaded.

    Shape:
        - Input: (B, 3, H, W)
        - Output: (B, 512, H // 16, W // 16)

    Example:
        >>> VGG16Backbone()(torch.rand(1, 3, 64, 64)).shape
        torch.Size([1, 512, 4, 4])
    """

    out_channels = 512
    output_stride = 16

    def __init__(self, config: Sequence[int | str] = VGG16_CONFIG) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        for module in self.features:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)



def load_vgg16_features(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor] | str | os.PathLike
) -> nn.Module:
    """Copy VGG16 conv weights saved from torchvision into a `VGG16Backbone` (or a network
    whose ``backbone`` is one), without downloading anything.

    The ``features.{i}.weight`` / ``features.{i}.bias`` keys of a torchvision ``vgg16``
    state dict are copied (converted to the model's dtype and device); ``classifier.*``
    keys are ignored. Anything else is an error, checked before any weight is changed.
    Torchvision's weights expect RGB images in [0, 1] normalised with the ImageNet mean
    (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).

    Args:
        model: a `VGG16Backbone`, or a module with a ``backbone`` attribute that is one
            (e.g. ``vgg16_sp(...)``).
        state_dict: the mapping, or a path to a file saved with ``torch.save``.

    Returns:
        ``model``, with its backbone weights replaced.

    Raises:
        ValueError: naming the missing keys, unexpected keys (e.g. a ``vgg16_bn`` dict's
            batch-norm entries) and mis-shaped tensors (expected vs found shapes).
        TypeError: ``model`` has no VGG16 backbone, or a value is not a tensor.

    Example:
        >>> import torchvision  # doctest: +SKIP
        >>> sd = torchvision.models.vgg16(weights="IMAGENET1K_V1").state_dict()  # doctest: +SKIP
        >>> torch.save(sd, "vgg16.pth")  # doctest: +SKIP
        >>> net = load_vgg16_features(vgg16_sp(20), "vgg16.pth")  # doctest: +SKIP
    """
    backbone = model if isinstance(model, VGG16Backbone) else getattr(model, "backbone", None)
    if not isinstance(backbone, VGG16Backbone):
        raise TypeError(
            f"load_vgg16_features needs a VGG16Backbone or a model with one as .backbone, got {type(model).__name__}"
        )
    what = "VGG16 conv weights (torchvision's vgg16 'features.*' keys"
    copy_backbone_weights(backbone, state_dict, ignored_prefix="classifier.", what=what)
    return model


def copy_backbone_weights(
    backbone: nn.Module, state_dict: Mapping[str, torch.Tensor] | str | os.PathLike, ignored_prefix: str, what: str
) -> None:
    """Copy a torchvision-layout state dict (or a file of one, read with ``weights_only=True``)
    into ``backbone``, ignoring the keys that start with ``ignored_prefix`` (the classifier).
    Every problem (missing, unexpected, mis-shaped keys) is named, before any weight changes."""
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = torch.load(state_dict, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping or a path, got {type(state_dict).__name__}")
    targets = backbone.state_dict(keep_vars=True)
    given = {key: value for key, value in state_dict.items() if not str(key).startswith(ignored_prefix)}
    missing = [key for key in targets if key not in given]
    unexpected = [key for key in given if key not in targets]
    not_tensors = [key for key in given if key in targets and not isinstance(given[key], torch.Tensor)]
    if not_tensors:
        raise TypeError(f"state dict values must be tensors; not for: {', '.join(map(str, not_tensors))}")
    misshaped = [
        f"{key}: expected {tuple(targets[key].shape)}, got {tuple(given[key].shape)}"
        for key in targets
        if key in given and tuple(given[key].shape) != tuple(targets[key].shape)
    ]
    if missing or unexpected or misshaped:
        problems = []
        if missing:
            problems.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {', '.join(map(str, unexpected))}")
        if misshaped:
            problems.append(f"mis-shaped tensors: {'; '.join(misshaped)}")
        raise ValueError(
            f"cannot load the {what} are expected, '{ignored_prefix}*' keys are ignored): " + " | ".join(problems)
        )
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(given[key])


class SmallBackbone(nn.Module):
    """A small CNN for tests and offline benchmarks: conv3x3-norm-ReLU blocks with 2x2 max
    pools after the first log2(output_stride) blocks.

    Trains in minutes on a couple of CPU cores on 32..64 px images.

    Args:
        in_channels: image channels.
        widths: output channels of the blocks (default 32, 64, 128, 128).
        output_stride: 1, 2, 4 (default) or 8, ..., at most 2 ** len(widths).
        norm: ``"batch"`` (default), ``"group"`` (GroupNorm with up to 8 channels a group) or
            ``"none"``. BatchNorm's statistics couple the images of a batch, so data-parallel
            training on CPU (where ``SyncBatchNorm`` does not work) differs from one process;
            GroupNorm and no normalisation are per image, so there the two agree.

    Shape:
        - Input: (B, in_channels, H, W)
        - Output: (B, widths[-1], H // output_stride, W // output_stride)

    Example:
        >>> SmallBackbone()(torch.rand(2, 3, 64, 64)).shape
        torch.Size([2, 128, 16, 16])
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 64, 128, 128),
        output_stride: int = 4,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"norm must be 'batch', 'group' or 'none', got {norm!r}")
        pools = output_stride.bit_length() - 1
        if output_stride < 1 or 2**pools != output_stride or pools > len(widths):
            raise ValueError(f"output_stride must be a power of 2 up to 2 ** {len(widths)}, got {output_stride}")
        layers: list[nn.Module] = []
        channels = in_channels
        for index, width in enumerate(widths):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=norm == "none"), _norm(norm, width), nn.ReLU()]
            if index < pools:
                layers.append(nn.MaxPool2d(2))
            channels = width
        self.features = nn.Sequential(*layers)
        self.out_channels = channels
        self.output_stride = output_stride
        for module in self.features:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(max(1, channels // 8), channels)
    return nn.Identity()
