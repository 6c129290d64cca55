"""WSOL heads: the layers after a backbone's feature map that give logits and class maps.

Every head derives from `WSOLHead`: ``head(features)`` gives logits, and
``head.forward_with_maps(features, classes=..., size=...)`` gives logits, class response
maps and (for SPN) the proposal map from the same forward pass, for a whole batch, without
hooks. A new method (adversarial erasing, ACoL, SPA, I2C, ...) adds a head by implementing
`WSOLHead.compute` and `WSOLHead.map_weight`, or by overriding `forward_with_maps`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from ..modules import SoftProposal, SpatialSumPool
from .maps import ClassSpec, class_response_maps, resolve_classes, upsample_maps

__all__ = ["CAMHead", "HeadOutput", "HeadState", "SPNHead", "WSOLHead"]

SOFT_PROPOSAL_OPTIONS = ("epsilon", "iterations", "tolerance", "detach", "backend")


class HeadState(NamedTuple):
    """What a head computes in one pass: the logits and what its maps are made from.

    Attributes:
        logits: (B, N) class scores.
        activations: (B, K, h, w) per-channel maps A with R_c = sum_k W[c, k] A_k, where W is
            `WSOLHead.map_weight` (CAM: A = U; SPN: A = U * M).
        proposal: (B, h, w) proposal map M, or None for heads without one.
    """

    logits: torch.Tensor
    activations: torch.Tensor
    proposal: torch.Tensor | None


class HeadOutput(NamedTuple):
    """Result of ``forward_with_maps``: ``logits, maps, proposal = head.forward_with_maps(...)``.

    Attributes:
        logits: (B, N) class scores.
        maps: class response maps, (B, h, w), (B, k, h, w) or (B, N, h, w) depending on
            ``classes`` (see `resolve_classes`); (H, W) instead of (h, w) when resized.
        proposal: (B, h, w) proposal map M at feature resolution, or None (CAM).
    """

    logits: torch.Tensor
    maps: torch.Tensor
    proposal: torch.Tensor | None


class WSOLHead(nn.Module):
    """Base class of WSOL heads: ``forward(features) -> logits`` plus `forward_with_maps`.

    Subclasses implement `compute` (one pass: logits, activations, proposal) and
    `map_weight` (the (N, K) weight that combines activations into class maps); the base
    class derives ``forward`` and ``forward_with_maps`` from them.

    Attributes:
        in_channels: channels of the backbone features the head takes.
        num_classes: N, the number of outputs.
    """

    in_channels: int
    num_classes: int

    def compute(self, features: torch.Tensor) -> HeadState:
        """One pass of the head over backbone features (B, C, h, w)."""
        raise NotImplementedError

    def map_weight(self) -> torch.Tensor:
        """The (N, K) weight of the class response maps (the classifier's, no bias)."""
        raise NotImplementedError

    def forward(self, features: torch.Tensor, target: torch.Tensor | None = None) -> Any:
        """Logits (B, N) from backbone features (B, C, h, w).

        ``target`` (B,) are the training labels, for heads that use them during training
        (ACoL erases with the ground-truth class's map); such a head may then return a richer
        training output that its method's loss reads. Plain heads ignore it.
        """
        return self.compute(features).logits

    def forward_with_maps(
        self,
        features: torch.Tensor,
        classes: ClassSpec = "predicted",
        size: tuple[int, int] | None = None,
    ) -> HeadOutput:
        """Logits, class response maps and proposal from one pass over a batch.

        Args:
            features: backbone features (B, C, h, w).
            classes: ``"predicted"`` (argmax of the logits; maps (B, h, w)), ``"all"`` (maps
                (B, N, h, w)), a LongTensor of class indices (B,) (e.g. the ground truth;
                maps (B, h, w)) or (B, k) (maps (B, k, h, w)), or a callable logits ->
                indices such as ``spn.models.top_k(5)`` (maps (B, 5, h, w), best first).
            size: (H, W) to resize the maps to (bilinear, align_corners=False), e.g. the
                image size; None keeps the feature resolution.

        Returns:
            `HeadOutput` (logits, maps, proposal). The maps keep their autograd graph.

        Shape:
            - features: (B, C, h, w)
            - logits: (B, N)
            - maps: (B, [k or N,] h, w), or (B, [k or N,] H, W) with ``size``
            - proposal: (B, h, w) or None
        """
        state = self.compute(features)
        chosen = resolve_classes(state.logits, classes)
        maps = class_response_maps(state.activations, self.map_weight(), chosen)
        if size is not None:
            maps = upsample_maps(maps, size)
        return HeadOutput(state.logits, maps, state.proposal)


def _conv_relu(in_channels: int, num_maps: int | None, groups: int) -> tuple[nn.Module, int]:
    if num_maps is None:
        return nn.Identity(), in_channels
    layer = nn.Sequential(nn.Conv2d(in_channels, num_maps, kernel_size=3, padding=1, groups=groups), nn.ReLU())
    return layer, num_maps


def _soft_proposal_options(options: Mapping[str, Any] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    merged = dict(options or {})
    twice = sorted(set(merged) & set(kwargs))
    if twice:
        raise TypeError(f"SoftProposal option(s) {twice} given both in proposal_options and as keywords")
    merged.update(kwargs)
    unknown = sorted(set(merged) - set(SOFT_PROPOSAL_OPTIONS))
    if unknown:
        raise TypeError(f"unknown SoftProposal option(s) {unknown}; expected some of {list(SOFT_PROPOSAL_OPTIONS)}")
    return merged


class SPNHead(WSOLHead):
    r"""Soft Proposal Network head (Zhu et al., ICCV 2017) for any backbone's feature map.

    conv 3x3 (padding 1) to ``num_maps`` channels + ReLU -> U; SoftProposal -> V = U * M;
    spatial sum pooling; dropout; linear classifier. Since M sums to 1 over each image, the
    pooled vector is the M-weighted average of U.

    Class response maps (paper section 3.3): :math:`R_c = \sum_k w_{k,c} U_k M`, with w the
    classifier weight (no bias). The maps skip dropout, which is the identity at eval; so at
    eval :math:`\sum_{h,w} R_c = \text{logit}_c - \text{bias}_c`.

    Args:
        in_channels: channels C of the backbone features.
        num_classes: N.
        num_maps: K, channels of the head's conv (the paper's SP-VGG16: 1024, groups=2);
            None skips the conv and uses the backbone features as U.
        groups: groups of the conv.
        dropout: dropout probability before the classifier (the paper's: 0.5).
        proposal_options: SoftProposal options as a mapping, e.g. ``spn.RELEASED``.
        **soft_proposal_kwargs: the same options as keywords (epsilon, iterations,
            tolerance, detach, backend; see `spn.soft_proposal`).

    Shape:
        - Input: (B, C, h, w)
        - Output: (B, N)

    Example:
        >>> head = SPNHead(64, num_classes=5, num_maps=32).eval()
        >>> feats = torch.rand(2, 64, 8, 8)
        >>> head(feats).shape
        torch.Size([2, 5])
        >>> logits, maps, proposal = head.forward_with_maps(feats, classes="all", size=(32, 32))
        >>> maps.shape, proposal.shape
        (torch.Size([2, 5, 32, 32]), torch.Size([2, 8, 8]))
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_maps: int | None = 1024,
        *,
        groups: int = 1,
        dropout: float = 0.5,
        proposal_options: Mapping[str, Any] | None = None,
        **soft_proposal_kwargs: Any,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.conv, self.num_maps = _conv_relu(in_channels, num_maps, groups)
        self.sp = SoftProposal(**_soft_proposal_options(proposal_options, soft_proposal_kwargs))
        self.pool = SpatialSumPool()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.num_maps, num_classes)

    def compute(self, features: torch.Tensor) -> HeadState:
        """U = relu(conv(features)); V, M = SoftProposal(U); logits = fc(dropout(sum V))."""
        units = self.conv(features)
        coupled, proposal = self.sp(units, return_proposal=True)
        logits = self.classifier(self.dropout(self.pool(coupled)))
        return HeadState(logits, coupled, proposal)

    def map_weight(self) -> torch.Tensor:
        return self.classifier.weight


class CAMHead(WSOLHead):
    r"""Class Activation Mapping head (Zhou et al., CVPR 2016), the WSOL baseline.

    Optional conv 3x3 (padding 1) + ReLU to ``num_maps`` channels (CAM's VGG16-GAP adds
    one with 1024 units) -> U; global average pooling; dropout; linear classifier.
    Class response maps: :math:`R_c = \sum_k w_{k,c} U_k` (no bias); at eval
    :math:`\text{mean}_{h,w} R_c + \text{bias}_c = \text{logit}_c`.

    Args:
        in_channels: channels C of the backbone features.
        num_classes: N.
        num_maps: channels of the extra conv, or None (default) for pooling the backbone
            features directly.
        groups: groups of the extra conv.
        dropout: dropout probability before the classifier (default 0: none).

    Shape:
        - Input: (B, C, h, w)
        - Output: (B, N)

    Example:
        >>> head = CAMHead(64, num_classes=5)
        >>> logits, maps, proposal = head.forward_with_maps(torch.rand(2, 64, 8, 8))
        >>> logits.shape, maps.shape, proposal
        (torch.Size([2, 5]), torch.Size([2, 8, 8]), None)
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_maps: int | None = None,
        *,
        groups: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.conv, self.num_maps = _conv_relu(in_channels, num_maps, groups)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.num_maps, num_classes)

    def compute(self, features: torch.Tensor) -> HeadState:
        """U = relu(conv(features)) (or the features); logits = fc(dropout(mean U))."""
        units = self.conv(features)
        logits = self.classifier(self.dropout(units.mean(dim=(-2, -1))))
        return HeadState(logits, units, None)

    def map_weight(self) -> torch.Tensor:
        return self.classifier.weight
