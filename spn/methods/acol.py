r"""ACoL, online adversarial erasing (Zhang et al., "Adversarial Complementary Learning for
Weakly Supervised Object Localization", CVPR 2018).

Two classifier branches A and B read the same backbone features F. Each branch is a 3x3
conv (1024) + ReLU, a 3x3 conv (1024) + ReLU and a 1x1 conv to the N classes, whose output
S (B, N, h, w) is the branch's class maps; the branch's logits are the spatial mean of S.
B reads F with the positions where A's min-max normalised map of class c is >= delta set to
zero, so B must find the evidence of c that A did not use:

.. math::

    \hat S^A_c = \frac{S^A_c - \min S^A_c}{\max S^A_c - \min S^A_c}, \qquad
    F^B = F \odot [\hat S^A_c < \delta], \qquad
    \mathcal L = \mathrm{CE}(\bar S^A, y) + \mathrm{CE}(\bar S^B, y),

with c the ground-truth class y during training. The localization map of class c is
:math:`\max(\hat S^A_c, \hat S^B_c)` and the class scores are A's logits (the authors' test
script and wsolevaluation both classify with branch A).

The pieces: `normalize_maps`, `erase_features`, `acol_branch`, `acol_loss`, `ACoLHead` (a
`spn.models.WSOLHead` for any backbone's last features) and `ACoL`, the `spn train --method
acol` method. See ``docs/methods/acol.md`` for the defaults and their sources.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from spn.models.heads import HeadOutput, HeadState, WSOLHead
from spn.models.maps import ClassSpec, resolve_classes, upsample_maps

from .base import Method, MethodError, MethodOutput, Step, classification_loss

__all__ = ["ACoL", "ACoLHead", "ACoLOutput", "acol_branch", "acol_loss", "erase_features", "normalize_maps"]


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise every map over its last two dimensions to [0, 1].

    ``(m - min m) / (max m - min m)`` per map, as the authors' ``normalize_atten_maps`` and
    wsolevaluation's ``normalize_tensor``; a constant map becomes zeros (where theirs give NaN).

    Args:
        maps: (..., h, w) floating tensor.

    Returns:
        A tensor of the same shape and dtype, in [0, 1].

    Shape:
        - Input: (..., h, w)
        - Output: (..., h, w)

    Example:
        >>> normalize_maps(torch.tensor([[[2.0, 4.0, 3.0]], [[1.0, 1.0, 1.0]]]))
        tensor([[[0.0000, 1.0000, 0.5000]],
        <BLANKLINE>
                [[0.0000, 0.0000, 0.0000]]])
    """
    if not isinstance(maps, torch.Tensor) or maps.ndim < 2 or not maps.is_floating_point():
        got = f"{maps.dtype} tensor of shape {tuple(maps.shape)}" if isinstance(maps, torch.Tensor) else type(maps)
        raise ValueError(f"maps must be a floating tensor (..., h, w), got {got}")
    if maps.numel() == 0:
        return maps.clone()
    flat = maps.flatten(-2)
    low = flat.amin(dim=-1, keepdim=True)
    spread = flat.amax(dim=-1, keepdim=True) - low
    safe = torch.where(spread > 0, spread, torch.ones_like(spread))
    normalized = torch.where(spread > 0, (flat - low) / safe, torch.zeros_like(flat))
    return normalized.view_as(maps)


def erase_features(features: torch.Tensor, attention: torch.Tensor, delta: float) -> torch.Tensor:
    """Zero the feature positions where the normalised attention is >= ``delta``.

    Args:
        features: (B, C, h, w).
        attention: (B, h, w) maps in [0, 1] (`normalize_maps` of branch A's class maps).
        delta: the erasing threshold.

    Returns:
        ``features * (attention < delta)``, differentiable in ``features``.

    Shape:
        - features: (B, C, h, w)
        - attention: (B, h, w)
        - output: (B, C, h, w)

    Example:
        >>> erase_features(torch.ones(1, 2, 1, 3), torch.tensor([[[0.2, 0.6, 0.9]]]), 0.6)
        tensor([[[[1., 0., 0.]],
        <BLANKLINE>
                 [[1., 0., 0.]]]])
    """
    if features.ndim != 4 or attention.shape != (features.shape[0], *features.shape[2:]):
        raise ValueError(
            f"features must be (B, C, h, w) and attention (B, h, w) of the same B, h, w; "
            f"got {tuple(features.shape)} and {tuple(attention.shape)}"
        )
    keep = (attention.detach() < delta).to(features.dtype)
    return features * keep[:, None]


def acol_branch(classifier: nn.Module, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One ACoL branch: class maps ``S = classifier(features)`` (B, N, h, w) and logits
    ``mean_{h,w} S`` (B, N)."""
    maps = classifier(features)
    return maps, maps.mean(dim=(-2, -1))


def acol_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``CE(logits_a, labels) + CE(logits_b, labels)`` (each the batch mean).

    Example:
        >>> acol_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([0, 3]))
        tensor(2.7726)
    """
    return F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels)


class ACoLOutput(NamedTuple):
    """What `ACoLHead` returns when given the training labels.

    Attributes:
        logits_a, logits_b: (B, N) logits of branches A and B.
        maps_a, maps_b: (B, N, h, w) class maps of the branches (B's on the erased features).
    """

    logits_a: torch.Tensor
    logits_b: torch.Tensor
    maps_a: torch.Tensor
    maps_b: torch.Tensor


def _classifier(in_channels: int, num_maps: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, num_maps, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(num_maps, num_maps, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(num_maps, num_classes, kernel_size=1),
    )


class ACoLHead(WSOLHead):
    r"""The ACoL head: two classifier branches, B on features erased by A's map.

    ``head(features)`` gives A's logits; ``head(features, target)`` gives an `ACoLOutput`
    with both branches' logits and maps, B erased with the target classes' maps of A.
    ``forward_with_maps`` gives :math:`\max(\hat S^A_c, \hat S^B_c)` for the requested
    classes c, B erased by class c's map of A (one pass of B per requested class column;
    ``"all"`` runs B once per class), and ``"predicted"`` erases with A's top class.

    Args:
        in_channels: channels C of the backbone features (the last of a list of levels).
        num_classes: N.
        num_maps: channels of each branch's two 3x3 convs (the authors': 1024).
        delta: erasing threshold on A's normalised map (authors' scripts 0.6,
            wsolevaluation 0.7).
        smooth: a 3x3 average pooling (stride 1, padding 1, zeros counted) of the features
            before the branches, as the authors' VGG model and wsolevaluation's do.

    Shape:
        - Input: (B, C, h, w)
        - Output: (B, N)

    Example:
        >>> head = ACoLHead(8, num_classes=3, num_maps=16)
        >>> feats = torch.rand(2, 8, 5, 5)
        >>> head(feats).shape
        torch.Size([2, 3])
        >>> head(feats, torch.tensor([0, 2])).logits_b.shape
        torch.Size([2, 3])
        >>> head.forward_with_maps(feats, classes=torch.tensor([1, 2]), size=(20, 20)).maps.shape
        torch.Size([2, 20, 20])
    """

    def __init__(
        self, in_channels: int, num_classes: int, num_maps: int = 1024, *, delta: float = 0.6, smooth: bool = True
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("num_maps", num_maps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ACoLHead: {name} must be a positive int, got {value!r}")
        if not 0.0 <= float(delta) <= 1.0:
            raise ValueError(
                f"ACoLHead: delta must lie in [0, 1] (a threshold on a min-max normalised map), got {delta}"
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.num_maps = num_maps
        self.delta = float(delta)
        self.smooth = bool(smooth)
        self.classifier_a = _classifier(in_channels, num_maps, num_classes)
        self.classifier_b = _classifier(in_channels, num_maps, num_classes)

    def _features(self, features: Any) -> torch.Tensor:
        if isinstance(features, (list, tuple)):
            features = features[-1]
        if not isinstance(features, torch.Tensor) or features.ndim != 4 or features.shape[1] != self.in_channels:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"ACoLHead expects features (B, {self.in_channels}, h, w), got {got}")
        if self.smooth:
            features = F.avg_pool2d(features, kernel_size=3, stride=1, padding=1)
        return features

    def _branch_b(self, features: torch.Tensor, maps_a: torch.Tensor, classes: torch.Tensor) -> tuple[Any, Any]:
        attention = normalize_maps(maps_a[torch.arange(len(classes), device=maps_a.device), classes])
        return acol_branch(self.classifier_b, erase_features(features, attention, self.delta))

    def compute(self, features: torch.Tensor) -> HeadState:
        """Branch A only: logits and class maps (``map_weight`` is the identity)."""
        maps_a, logits_a = acol_branch(self.classifier_a, self._features(features))
        return HeadState(logits_a, maps_a, None)

    def map_weight(self) -> torch.Tensor:
        """The identity (N, N): `compute`'s activations are already A's class maps."""
        return torch.eye(self.num_classes, device=next(self.parameters()).device)

    def forward(self, features: torch.Tensor, target: torch.Tensor | None = None) -> Any:
        """A's logits (B, N); with ``target`` (B,) the `ACoLOutput` of training."""
        feats = self._features(features)
        maps_a, logits_a = acol_branch(self.classifier_a, feats)
        if target is None:
            return logits_a
        target = resolve_classes(logits_a, target)
        if target is None or target.ndim != 1:
            raise ValueError("ACoLHead: target must be the (B,) class labels of a single-label batch")
        maps_b, logits_b = self._branch_b(feats, maps_a, target)
        return ACoLOutput(logits_a, logits_b, maps_a, maps_b)

    def forward_with_maps(
        self, features: torch.Tensor, classes: ClassSpec = "predicted", size: tuple[int, int] | None = None
    ) -> HeadOutput:
        """A's logits and ``max(norm A_c, norm B_c)`` for the requested classes c (see
        `spn.models.WSOLHead.forward_with_maps` for ``classes`` and ``size``); no proposal."""
        feats = self._features(features)
        maps_a, logits_a = acol_branch(self.classifier_a, feats)
        chosen = resolve_classes(logits_a, classes)
        batch = torch.arange(len(logits_a), device=logits_a.device)
        if chosen is None:
            chosen = torch.arange(self.num_classes, device=logits_a.device).expand(len(logits_a), -1)
        columns = chosen[:, None] if chosen.ndim == 1 else chosen
        fused = []
        for column in columns.unbind(1):
            maps_b, _ = self._branch_b(feats, maps_a, column)
            fused.append(torch.maximum(normalize_maps(maps_a[batch, column]), normalize_maps(maps_b[batch, column])))
        maps = torch.stack(fused, 1) if fused else maps_a.new_zeros((len(logits_a), 0, *maps_a.shape[-2:]))
        if chosen.ndim == 1:
            maps = maps[:, 0]
        if size is not None:
            maps = upsample_maps(maps, size)
        return HeadOutput(logits_a, maps, None)


class ACoL(Method):
    """``spn train --method acol``: the `ACoLHead` on the backbone's last features, trained
    with `acol_loss` (B erased with the ground-truth class's map of A).

    Options (``--method-option KEY=VALUE``):
        delta: erasing threshold (0.6, the authors' scripts; wsolevaluation uses 0.7).
        num_maps: channels of each branch's 3x3 convs; None (default): 1024 (the authors')
            on vgg16_* / resnet50_* models, the run's ``num_maps`` (128) on small_* models.
        smooth: 3x3 average pooling of the features before the branches (True, as both
            reference codes do on VGG16).

    Example:
        >>> ACoL(delta=0.7).options["delta"]
        0.7
    """

    name = "acol"
    defaults: ClassVar[dict[str, Any]] = {"delta": 0.6, "num_maps": None, "smooth": True}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        delta = self.options["delta"]
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 <= float(delta) <= 1.0:
            raise MethodError(f"method 'acol': option delta must be a number in [0, 1], got {delta!r}")
        self.options["delta"] = float(delta)
        maps = self.options["num_maps"]
        if maps is not None and (isinstance(maps, bool) or not isinstance(maps, int) or maps < 1):
            raise MethodError(f"method 'acol': option num_maps must be a positive int or null, got {maps!r}")

    def _num_maps(self, config: Any) -> int:
        if self.options["num_maps"] is not None:
            return int(self.options["num_maps"])
        model = str(getattr(config, "model", ""))
        small = getattr(config, "num_maps", None)
        return int(small) if model.startswith("small") and small else 1024

    def build(self, network: Any, config: Any) -> Any:
        """Replace the network's head by an `ACoLHead` on the same features."""
        if getattr(config, "dataset", None) == "voc":
            raise MethodError("method 'acol' erases with one class per image; multi-label VOC is not supported")
        old = network.head
        network.head = ACoLHead(
            old.in_channels, old.num_classes, self._num_maps(config),
            delta=self.options["delta"], smooth=self.options["smooth"],
        )  # fmt: skip
        return network

    def loss(self, model: nn.Module, images: torch.Tensor, batch: Mapping[str, Any], step: Step) -> MethodOutput:
        """``CE_A + CE_B`` with B erased by the labels' maps of A; the accuracy is A's."""
        if "labels" in batch:
            raise MethodError("method 'acol' needs single-label batches (batch['label']), not multi-hot labels")
        labels = batch["label"].to(images.device)
        out = model(images, target=labels)
        loss_a = classification_loss(out.logits_a, batch)
        loss_b = classification_loss(out.logits_b, batch)
        return MethodOutput(loss_a + loss_b, out.logits_a, {"cls_a": loss_a.detach(), "cls_b": loss_b.detach()})
