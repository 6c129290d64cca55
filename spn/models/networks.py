"""`Network` (backbone + WSOL head) and the ready-made SPN and CAM networks."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from spn._convert import check_size

from .backbones import SmallBackbone, VGG16Backbone, load_vgg16_features
from .heads import CAMHead, HeadOutput, SPNHead, WSOLHead
from .maps import ClassSpec
from .resnet import ResNet50Backbone, load_resnet50_features

__all__ = ["Network", "resnet50_cam", "resnet50_sp", "small_cam", "small_sp", "vgg16_cam", "vgg16_sp"]


class Network(nn.Module):
    """A backbone followed by a WSOL head: logits, and class response maps at image size.

    Args:
        backbone: images (B, 3, H, W) -> features (B, C, h, w).
        head: a `WSOLHead` taking those features.

    Shape:
        - Input: (B, 3, H, W)
        - Output: (B, N)

    Example:
        >>> net = small_sp(num_classes=4).eval()
        >>> images = torch.rand(2, 3, 64, 64)
        >>> net(images).shape
        torch.Size([2, 4])
        >>> logits, maps, proposal = net.forward_with_maps(images, classes=torch.tensor([0, 3]))
        >>> maps.shape, proposal.shape
        (torch.Size([2, 64, 64]), torch.Size([2, 16, 16]))
    """

    def __init__(self, backbone: nn.Module, head: WSOLHead) -> None:
        super().__init__()
        if not isinstance(head, WSOLHead):
            raise TypeError(f"head must be a WSOLHead, got {type(head).__name__}")
        self.backbone = backbone
        self.head = head

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward(self, images: torch.Tensor, target: torch.Tensor | None = None) -> Any:
        """Logits (B, N); ``target`` (training labels) is passed to heads that use it (see
        `WSOLHead.forward`), which may then return their method's training output."""
        if target is None:
            return self.head(self.backbone(images))
        return self.head(self.backbone(images), target)

    def forward_with_maps(
        self,
        images: torch.Tensor,
        classes: ClassSpec = "predicted",
        size: Sequence[int] | Literal["image"] | None = "image",
    ) -> HeadOutput:
        """Logits, class response maps and proposal from one forward pass.

        Args:
            images: (B, 3, H, W).
            classes: which classes to map; see `WSOLHead.forward_with_maps` (``"predicted"``,
                ``"all"``, a LongTensor (B,) or (B, k), or ``spn.models.top_k(k)``).
            size: the size ``(H, W)`` to resize the maps to (bilinear, align_corners=False):
                ``"image"`` (default) the images' size, None the feature resolution (h, w).

        Returns:
            `HeadOutput` (logits (B, N), maps, proposal (B, h, w) or None).
        """
        if isinstance(size, str):
            if size != "image":
                raise ValueError(f"size must be (H, W), 'image' or None, got {size!r}")
            size = (int(images.shape[-2]), int(images.shape[-1]))
        target = None if size is None else check_size(size)
        return self.head.forward_with_maps(self.backbone(images), classes=classes, size=target)


def _vgg16_backbone(backbone_state_dict: Mapping[str, torch.Tensor] | str | os.PathLike | None) -> VGG16Backbone:
    backbone = VGG16Backbone()
    if backbone_state_dict is not None:
        load_vgg16_features(backbone, backbone_state_dict)
    return backbone


def vgg16_sp(
    num_classes: int,
    num_maps: int = 1024,
    *,
    groups: int = 2,
    dropout: float = 0.5,
    backbone_state_dict: Mapping[str, torch.Tensor] | str | os.PathLike | None = None,
    proposal_options: Mapping[str, Any] | None = None,
    **soft_proposal_kwargs: Any,
) -> Network:
    """SP-VGG16 (Zhu et al., 2017): VGG16 conv1_1..conv5_3 (no pool5, stride 16), then an
    `SPNHead` with a 3x3 conv to 1024 maps in 2 groups, SoftProposal, sum pooling,
    dropout 0.5 and a linear classifier.

    Args:
        num_classes: N.
        num_maps: channels of the head's conv.
        groups: groups of the head's conv.
        dropout: dropout before the classifier.
        backbone_state_dict: torchvision ``vgg16`` weights (a state dict or a path to one)
            for the backbone; see `load_vgg16_features`. None keeps the random init.
        proposal_options, **soft_proposal_kwargs: SoftProposal options (see `SPNHead`).

    Returns:
        A `Network`; images (B, 3, H, W) -> logits (B, N), maps at (H / 16, W / 16).

    Example:
        >>> net = vgg16_sp(20).eval()
        >>> net(torch.rand(1, 3, 64, 64)).shape
        torch.Size([1, 20])
    """
    head = SPNHead(
        VGG16Backbone.out_channels,
        num_classes,
        num_maps,
        groups=groups,
        dropout=dropout,
        proposal_options=proposal_options,
        **soft_proposal_kwargs,
    )
    return Network(_vgg16_backbone(backbone_state_dict), head)


def vgg16_cam(
    num_classes: int,
    num_maps: int | None = 1024,
    *,
    groups: int = 1,
    dropout: float = 0.0,
    backbone_state_dict: Mapping[str, torch.Tensor] | str | os.PathLike | None = None,
) -> Network:
    """VGG16-GAP of CAM (Zhou et al., 2016) on the same backbone as `vgg16_sp`: VGG16
    conv1_1..conv5_3 (no pool5), a 3x3 conv with 1024 units + ReLU, global average pooling,
    linear classifier.

    Args:
        num_classes: N.
        num_maps: channels of the extra conv; None pools conv5_3 directly.
        groups: groups of the extra conv.
        dropout: dropout before the classifier.
        backbone_state_dict: torchvision ``vgg16`` weights; see `load_vgg16_features`.

    Returns:
        A `Network` with a `CAMHead`.

    Example:
        >>> vgg16_cam(10)(torch.rand(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    head = CAMHead(VGG16Backbone.out_channels, num_classes, num_maps, groups=groups, dropout=dropout)
    return Network(_vgg16_backbone(backbone_state_dict), head)


def small_sp(
    num_classes: int,
    num_maps: int | None = 128,
    *,
    in_channels: int = 3,
    widths: Sequence[int] = (32, 64, 128, 128),
    output_stride: int = 4,
    norm: str = "batch",
    dropout: float = 0.0,
    proposal_options: Mapping[str, Any] | None = None,
    **soft_proposal_kwargs: Any,
) -> Network:
    """A small SPN for tests and CPU benchmarks: `SmallBackbone` + `SPNHead`.

    Args:
        num_classes: N.
        num_maps: channels of the head's 3x3 conv (None: no conv).
        in_channels, widths, output_stride, norm: of the `SmallBackbone`.
        dropout: dropout before the classifier.
        proposal_options, **soft_proposal_kwargs: SoftProposal options (see `SPNHead`).

    Example:
        >>> small_sp(3)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 3])
    """
    backbone = SmallBackbone(in_channels, widths, output_stride, norm)
    head = SPNHead(
        backbone.out_channels,
        num_classes,
        num_maps,
        dropout=dropout,
        proposal_options=proposal_options,
        **soft_proposal_kwargs,
    )
    return Network(backbone, head)


def small_cam(
    num_classes: int,
    num_maps: int | None = 128,
    *,
    in_channels: int = 3,
    widths: Sequence[int] = (32, 64, 128, 128),
    output_stride: int = 4,
    norm: str = "batch",
    dropout: float = 0.0,
) -> Network:
    """The CAM baseline matching `small_sp`: `SmallBackbone` + `CAMHead` with the same
    3x3 conv, so the two differ only in SoftProposal + sum pooling vs average pooling.

    Example:
        >>> small_cam(3)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 3])
    """
    backbone = SmallBackbone(in_channels, widths, output_stride, norm)
    head = CAMHead(backbone.out_channels, num_classes, num_maps, dropout=dropout)
    return Network(backbone, head)


def _resnet50_backbone(
    backbone_state_dict: Mapping[str, torch.Tensor] | str | os.PathLike | None, large_feature_map: bool
) -> ResNet50Backbone:
    backbone = ResNet50Backbone(large_feature_map)
    if backbone_state_dict is not None:
        load_resnet50_features(backbone, backbone_state_dict)
    return backbone


def resnet50_cam(
    num_classes: int,
    *,
    large_feature_map: bool = False,
    dropout: float = 0.0,
    backbone_state_dict: Mapping[str, torch.Tensor] | str | os.PathLike | None = None,
) -> Network:
    """wsolevaluation's ResNet50-CAM: `ResNet50Backbone` (layer4 stride 1, output stride 16)
    then global average pooling and a linear classifier on its 2048 channels (no extra conv).

    Example:
        >>> resnet50_cam(10)(torch.rand(1, 3, 64, 64)).shape
        torch.Size([1, 10])
    """
    head = CAMHead(ResNet50Backbone.out_channels, num_classes, None, dropout=dropout)
    return Network(_resnet50_backbone(backbone_state_dict, large_feature_map), head)


def resnet50_sp(
    num_classes: int,
    num_maps: int = 1024,
    *,
    large_feature_map: bool = False,
    dropout: float = 0.0,
    backbone_state_dict: Mapping[str, torch.Tensor] | str | os.PathLike | None = None,
    proposal_options: Mapping[str, Any] | None = None,
    **soft_proposal_kwargs: Any,
) -> Network:
    """Soft Proposal on wsolevaluation's ResNet50: `ResNet50Backbone`, then an `SPNHead` (3x3
    conv to ``num_maps`` maps, SoftProposal, sum pooling, linear classifier). The SPN paper
    has no ResNet variant; this one is ours, built like `vgg16_sp` on ResNet50's features.

    Example:
        >>> resnet50_sp(10)(torch.rand(1, 3, 64, 64)).shape
        torch.Size([1, 10])
    """
    head = SPNHead(
        ResNet50Backbone.out_channels,
        num_classes,
        num_maps,
        dropout=dropout,
        proposal_options=proposal_options,
        **soft_proposal_kwargs,
    )
    return Network(_resnet50_backbone(backbone_state_dict, large_feature_map), head)
