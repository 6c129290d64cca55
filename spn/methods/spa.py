r"""SPA: Structure-Preserving Activation (Pan et al., CVPR 2021).

Two pieces on a CAM network whose class maps are a 1x1 classifier over the last features
(logits = the spatial mean of the class maps):

- **Restricted activation** (training): a per-location softmax over the classes of the class
  maps, its variance over the classes, min-max normalised per image, splits the map into
  background (``v < theta``) and foreground (``v > theta + gap``); the sigmoid of the
  ground-truth class's map is pushed down on the background and up on the foreground:
  :math:`L_{ra} = \text{mean}(m \cdot bg + (1 - m) \cdot fg)`, :math:`m = \sigma(\text{CAM}_y)`.
  The total loss is :math:`CE + \lambda L_{ra}` from ``start_epoch`` on
  (`restricted_activation_loss`).
- **Self-correlation map generation** (inference): first and high order self-correlation of
  the L2-normalised features (`self_correlation`), combined over the last feature levels;
  the CAM's object and background seeds pick columns of it, whose difference is the map
  (`self_correlation_maps`). `SPAHead.forward_with_maps` returns these maps instead of the CAM.

Defaults are those of the authors' CUB scripts (github.com/Panxjia/SPA_CVPR2021,
``scripts/train_spa.sh``, ``scripts/val_spa.sh``); see ``docs/methods/spa.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from spn.models import FeatureLevels, HeadOutput, HeadState, Network, WSOLHead, resolve_classes, upsample_maps
from spn.models.maps import ClassSpec

from .base import Method, MethodError, MethodOutput, Step

__all__ = [
    "SPA",
    "RestrictedActivationLoss",
    "SPAHead",
    "SPATrainOutput",
    "combine_self_correlation",
    "restricted_activation_loss",
    "self_correlation",
    "self_correlation_maps",
]

_NORM_EPS = 1e-10  # the authors' eps of the feature L2 norm, of min-max normalisations, of the combined S
_FO_EPS = 1e-5  # their eps of the first order column normalisation (and of the high order base)
_VAR_EPS = 1e-15  # their eps of the variance map's min-max normalisation


def _check_maps(maps: torch.Tensor, name: str) -> None:
    if not isinstance(maps, torch.Tensor) or maps.dim() != 4 or not maps.is_floating_point():
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"{name} must be a float tensor (B, C, h, w), got {shape}")


def _check_labels(labels: torch.Tensor, batch: int, classes: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (B,) of class indices, got {labels!r:.80}")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got values in [{int(labels.min())}, {int(labels.max())}]")
    return labels.long()


def restricted_activation_loss(
    class_maps: torch.Tensor, labels: torch.Tensor, bg_threshold: float = 0.1, gap: float = 0.2
) -> torch.Tensor:
    r"""SPA's restricted activation loss :math:`L_{ra}` (paper eq. 1-3).

    p = softmax over the classes at each location; v = variance of p over the classes
    (unbiased, as ``torch.var``), min-max normalised over each image's locations
    (``(v - min) / (max - min + 1e-15)``); background ``v < bg_threshold``, foreground
    ``v > bg_threshold + gap``; m = sigmoid of the ground-truth class's map;
    :math:`L_{ra} = \text{mean}_{b,i,j}(m \cdot bg + (1 - m) \cdot fg)`. The masks carry no
    gradient; the loss reaches the network through m.

    Args:
        class_maps: raw class maps (B, N, h, w) whose spatial mean are the logits (bias included).
        labels: (B,) ground-truth classes.
        bg_threshold: theta of the background (authors: 0.1 CUB, 0.4 ILSVRC).
        gap: margin between background and foreground (authors: 0.2 CUB, 0.1 ILSVRC).

    Returns:
        The scalar loss, in [0, 1].

    Shape:
        - class_maps: (B, N, h, w)
        - labels: (B,)
        - output: ()

    Example:
        >>> maps = torch.zeros(1, 3, 2, 2)
        >>> maps[0, 0, 0, 0] = 5.0  # one confident location of class 0
        >>> restricted_activation_loss(maps, torch.tensor([0]))  # (3 * sigmoid(0) + 1 - sigmoid(5)) / 4
        tensor(0.3767)
    """
    _check_maps(class_maps, "class_maps")
    batch, classes = class_maps.shape[:2]
    labels = _check_labels(labels, batch, classes).to(class_maps.device)
    if not (math.isfinite(bg_threshold) and math.isfinite(gap)) or gap < 0:
        raise ValueError(f"bg_threshold must be finite and gap finite and >= 0, got {bg_threshold}, {gap}")
    with torch.no_grad():
        variance = F.softmax(class_maps.detach().float(), dim=1).var(dim=1)  # (B, h, w)
        flat = variance.flatten(1)
        low = flat.min(dim=1, keepdim=True).values
        high = flat.max(dim=1, keepdim=True).values
        normed = ((flat - low) / (high - low + _VAR_EPS)).view_as(variance)
        background = (normed < bg_threshold).to(class_maps.dtype)
        foreground = (normed > bg_threshold + gap).to(class_maps.dtype)
    chosen = torch.sigmoid(class_maps[torch.arange(batch, device=class_maps.device), labels])
    return (chosen * background + (1 - chosen) * foreground).mean()


class RestrictedActivationLoss(nn.Module):
    """`restricted_activation_loss` as a module.

    Args:
        bg_threshold: theta of the background.
        gap: margin between background and foreground.

    Example:
        >>> loss = RestrictedActivationLoss(0.1, 0.2)
        >>> loss(torch.zeros(2, 4, 3, 3), torch.tensor([0, 3]))  # constant maps: all background, sigmoid(0)
        tensor(0.5000)
    """

    def __init__(self, bg_threshold: float = 0.1, gap: float = 0.2) -> None:
        super().__init__()
        self.bg_threshold = float(bg_threshold)
        self.gap = float(gap)

    def forward(self, class_maps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return restricted_activation_loss(class_maps, labels, self.bg_threshold, self.gap)

    def extra_repr(self) -> str:
        return f"bg_threshold={self.bg_threshold}, gap={self.gap}"


def _column_normalise(matrix: torch.Tensor, eps: float) -> torch.Tensor:
    return matrix / (matrix.sum(dim=1, keepdim=True) + eps)


def self_correlation(
    features: torch.Tensor, fo_threshold: float = 0.1, so_threshold: float = 0.5, order: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""First and high order self-correlation of a feature map (SPA's HSC, paper eq. 4-6).

    With f the (HW, C) features, each location's vector L2-normalised (``/ (norm + 1e-10)``):

    - first order: :math:`S = \text{ReLU}(f f^T)`, entries below ``fo_threshold`` set to 0;
      ``first`` = S with each column divided by its sum (+ 1e-5).
    - high order: S with its diagonal zeroed and each column normalised (+ 1e-5) is the base
      P; :math:`P^{order}`, renormalising the columns (+ 1e-10) after each product; entries
      below ``so_threshold / (HW)`` set to 0.

    Columns index the reference location: ``first[b, i, j]`` is how much location i is like
    location j. Locations are in row-major order (i = y * w + x).

    Args:
        features: (B, C, h, w).
        fo_threshold: first order threshold (authors: 0.1 CUB, 0.2 ILSVRC).
        so_threshold: high order threshold, in units of 1 / (HW) (authors: 0.5 CUB, 0.2 ILSVRC).
        order: the power of the high order term (authors: 2); 1 is the base itself.

    Returns:
        ``(first, high)``, each (B, HW, HW), in the features' dtype.

    Shape:
        - features: (B, C, h, w)
        - first, high: (B, h * w, h * w)

    Example:
        >>> first, high = self_correlation(torch.rand(2, 8, 4, 4))
        >>> first.shape, bool(torch.allclose(first.sum(1), torch.ones(2, 16), atol=1e-4))
        (torch.Size([2, 16, 16]), True)
    """
    _check_maps(features, "features")
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an int >= 1, got {order!r}")
    if not (math.isfinite(fo_threshold) and math.isfinite(so_threshold)):
        raise ValueError(f"fo_threshold and so_threshold must be finite, got {fo_threshold}, {so_threshold}")
    height, width = features.shape[-2:]
    size = height * width
    flat = features.flatten(2).transpose(1, 2)  # (B, HW, C)
    flat = flat / (flat.norm(dim=2, keepdim=True) + _NORM_EPS)
    cosine = F.relu(flat @ flat.transpose(1, 2))
    cosine = torch.where(cosine < fo_threshold, torch.zeros_like(cosine), cosine)
    first = _column_normalise(cosine, _FO_EPS)
    eye = torch.eye(size, dtype=torch.bool, device=features.device)
    base = _column_normalise(cosine.masked_fill(eye, 0.0), _FO_EPS)
    high = base
    for _ in range(order - 1):
        high = _column_normalise(high @ base, _NORM_EPS)
    high = torch.where(high < so_threshold / size, torch.zeros_like(high), high)
    return first, high


def combine_self_correlation(first: torch.Tensor, high: torch.Tensor, so_weight: float = 2.0) -> torch.Tensor:
    """SPA's combined self-correlation ``S = max(first, so_weight * high)``, each column
    renormalised to sum 1 (+ 1e-10), as the authors' ``--scg_com``.

    Args:
        first, high: (B, HW, HW) from `self_correlation`.
        so_weight: weight of the high order term (authors: 2 CUB, 1 ILSVRC).

    Returns:
        (B, HW, HW).

    Example:
        >>> s = combine_self_correlation(*self_correlation(torch.rand(1, 4, 3, 3)))
        >>> s.shape
        torch.Size([1, 9, 9])
    """
    if first.shape != high.shape or first.dim() != 3 or first.shape[1] != first.shape[2]:
        raise ValueError(f"first and high must both be (B, HW, HW), got {tuple(first.shape)}, {tuple(high.shape)}")
    return _column_normalise(torch.maximum(first, so_weight * high), _NORM_EPS)


def _min_max(values: torch.Tensor) -> torch.Tensor:
    """Min-max normalise over the last dim: ``(x - min) / (max - min + 1e-10)``."""
    low = values.min(dim=-1, keepdim=True).values
    high = values.max(dim=-1, keepdim=True).values
    return (values - low) / (high - low + _NORM_EPS)


def self_correlation_maps(
    cams: torch.Tensor, correlation: torch.Tensor, object_seed: float = 0.1, background_seed: float = 0.05
) -> torch.Tensor:
    r"""SPA's self-correlation maps (SCM) from class maps and a self-correlation matrix.

    Each CAM is made ``ReLU``, min-max normalised; its object seeds are the locations with
    value ``>= object_seed``, its background seeds those ``<= background_seed``. Every column
    of ``correlation`` is min-max normalised over its rows; the columns of the object seeds are
    summed and the sum min-max normalised (0 when there is no seed), likewise for the
    background seeds; the map is ``ReLU(object - background)``, min-max normalised. All
    normalisations add 1e-10 to the range, so a constant map gives zeros, never NaN.

    Args:
        cams: class maps (B, K, h, w) (raw; e.g. the ground-truth class's map with K = 1).
        correlation: (B, hw, hw), e.g. `combine_self_correlation`'s, or the sum of several
            levels' (the authors sum conv4's and conv5's).
        object_seed: object seed threshold on the normalised CAM (authors: 0.1).
        background_seed: background seed threshold (authors: 0.05).

    Returns:
        Maps in [0, 1], (B, K, h, w).

    Shape:
        - cams: (B, K, h, w)
        - correlation: (B, h * w, h * w)
        - output: (B, K, h, w)

    Example:
        >>> feats = torch.rand(2, 8, 5, 5)
        >>> s = combine_self_correlation(*self_correlation(feats))
        >>> self_correlation_maps(torch.randn(2, 3, 5, 5), s).shape
        torch.Size([2, 3, 5, 5])
    """
    _check_maps(cams, "cams")
    batch, count, height, width = cams.shape
    size = height * width
    if correlation.shape != (batch, size, size):
        raise ValueError(
            f"correlation must have shape ({batch}, {size}, {size}) for cams of shape {tuple(cams.shape)}, "
            f"got {tuple(correlation.shape)}"
        )
    normed = _min_max(F.relu(cams).flatten(2))  # (B, K, hw)
    columns = _min_max(correlation.transpose(1, 2)).to(cams.dtype)  # (B, j, i): column j normalised over i

    def seeded(mask: torch.Tensor) -> torch.Tensor:
        summed = torch.einsum("bkj,bji->bki", mask.to(cams.dtype), columns)
        return torch.where(mask.any(dim=2, keepdim=True), _min_max(summed), torch.zeros_like(summed))

    difference = F.relu(seeded(normed >= object_seed) - seeded(normed <= background_seed))
    return _min_max(difference).view(batch, count, height, width)


class SPATrainOutput(NamedTuple):
    """What `SPAHead` returns when given the labels: ``logits`` (B, N) and the raw class maps
    (B, N, h, w), bias included, whose spatial mean are the logits."""

    logits: torch.Tensor
    class_maps: torch.Tensor


class SPAHead(WSOLHead):
    r"""SPA's head: a CAM classifier whose maps at inference are self-correlation maps.

    ``conv`` (e.g. a 3x3 conv + ReLU, or identity) -> U; class maps
    :math:`A_c = \sum_k W_{c,k} U_k + b_c` (the classifier as a 1x1 conv); logits = spatial
    mean of A (= ``classifier(mean U)``). `forward_with_maps` returns
    `self_correlation_maps` of the chosen classes' maps with the combined self-correlation of
    the feature levels (each level max-pooled to the last level's size, as the authors take
    conv4 after pool4), or the class maps when ``scg`` is False.

    Args:
        conv: module applied to the last level's features (``nn.Identity()`` for none).
        classifier: ``nn.Linear(K, N)``.
        scg: whether `forward_with_maps` gives self-correlation maps (True) or the CAM.
        fo_threshold, so_threshold, order, so_weight: of `self_correlation` /
            `combine_self_correlation`.
        object_seed, background_seed: of `self_correlation_maps`.

    Shape:
        - Input: features (B, C, h, w), or a list of levels, shallowest first, the last being
          what the classifier reads (`spn.models.FeatureLevels`' output)
        - Output: logits (B, N); `SPATrainOutput` when given ``target``

    Example:
        >>> head = SPAHead(nn.Identity(), nn.Linear(16, 4)).eval()
        >>> logits, maps, proposal = head.forward_with_maps(torch.rand(2, 16, 6, 6), size=(24, 24))
        >>> logits.shape, maps.shape, proposal
        (torch.Size([2, 4]), torch.Size([2, 24, 24]), None)
    """

    def __init__(
        self,
        conv: nn.Module,
        classifier: nn.Linear,
        *,
        scg: bool = True,
        fo_threshold: float = 0.1,
        so_threshold: float = 0.5,
        order: int = 2,
        so_weight: float = 2.0,
        object_seed: float = 0.1,
        background_seed: float = 0.05,
    ) -> None:
        super().__init__()
        if not isinstance(classifier, nn.Linear):
            raise TypeError(f"classifier must be an nn.Linear, got {type(classifier).__name__}")
        self.conv = conv
        self.classifier = classifier
        first_conv = next((module for module in conv.modules() if isinstance(module, nn.Conv2d)), None)
        self.in_channels = first_conv.in_channels if first_conv is not None else classifier.in_features
        self.num_classes = classifier.out_features
        self.scg = bool(scg)
        self.fo_threshold = float(fo_threshold)
        self.so_threshold = float(so_threshold)
        self.order = int(order)
        self.so_weight = float(so_weight)
        self.object_seed = float(object_seed)
        self.background_seed = float(background_seed)

    @staticmethod
    def _levels(features: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        levels = [features] if isinstance(features, torch.Tensor) else list(features)
        if not levels or not all(isinstance(level, torch.Tensor) and level.dim() == 4 for level in levels):
            raise ValueError("SPAHead takes features (B, C, h, w) or a non-empty list of them")
        return levels

    def class_maps(self, features: torch.Tensor) -> torch.Tensor:
        """Raw class maps (B, N, h, w), bias included, of the last level's features."""
        units = self.conv(features)
        weight = self.classifier.weight.to(units.dtype)
        maps = torch.einsum("nk,bkhw->bnhw", weight, units)
        if self.classifier.bias is not None:
            maps = maps + self.classifier.bias.to(units.dtype)[:, None, None]
        return maps

    def compute(self, features: torch.Tensor) -> HeadState:
        units = self.conv(self._levels(features)[-1])
        return HeadState(self.classifier(units.mean(dim=(-2, -1))), units, None)

    def map_weight(self) -> torch.Tensor:
        return self.classifier.weight

    def forward(self, features: Any, target: torch.Tensor | None = None) -> Any:
        maps = self.class_maps(self._levels(features)[-1])
        logits = maps.mean(dim=(-2, -1))
        return logits if target is None else SPATrainOutput(logits, maps)

    def correlation(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """The sum over ``levels`` of each one's combined self-correlation (B, hw, hw), every
        level max-pooled to the last level's (h, w) first."""
        size = tuple(levels[-1].shape[-2:])
        total: torch.Tensor | None = None
        for level in levels:
            if tuple(level.shape[-2:]) != size:
                if level.shape[-2] < size[0] or level.shape[-1] < size[1]:
                    raise ValueError(f"feature level of size {tuple(level.shape[-2:])} is smaller than the last {size}")
                level = F.adaptive_max_pool2d(level, size)
            first, high = self_correlation(level, self.fo_threshold, self.so_threshold, self.order)
            combined = combine_self_correlation(first, high, self.so_weight)
            total = combined if total is None else total + combined
        assert total is not None
        return total

    def forward_with_maps(
        self, features: Any, classes: ClassSpec = "predicted", size: tuple[int, int] | None = None
    ) -> HeadOutput:
        """Logits and the chosen classes' maps (self-correlation maps unless ``scg`` is off);
        ``classes`` and ``size`` as in `WSOLHead.forward_with_maps`."""
        levels = self._levels(features)
        all_maps = self.class_maps(levels[-1])
        logits = all_maps.mean(dim=(-2, -1))
        chosen = resolve_classes(logits, classes)
        if chosen is None:
            maps = all_maps
        else:
            index = chosen if chosen.dim() == 2 else chosen[:, None]
            maps = all_maps[torch.arange(len(index), device=index.device)[:, None], index]  # (B, k, h, w)
        if self.scg and maps.shape[1] > 0:
            maps = self_correlation_maps(maps, self.correlation(levels), self.object_seed, self.background_seed)
        if chosen is not None and chosen.dim() == 1:
            maps = maps[:, 0]
        if size is not None:
            maps = upsample_maps(maps, size)
        return HeadOutput(logits, maps, None)


class SPA(Method):
    """SPA in the harness: the network's head becomes an `SPAHead` (its conv and classifier
    kept; a SoftProposal head loses its SoftProposal), the backbone returns its last
    ``scg_levels`` stages, the loss is CE + ``ra_weight`` * `restricted_activation_loss`
    from epoch ``start_epoch`` (counted from 0) on. Defaults: the authors' CUB scripts."""

    name = "spa"
    defaults: ClassVar[dict[str, Any]] = {
        "ra_weight": 0.5,  # --ra_loss_weight (CUB and ILSVRC)
        "start_epoch": 20,  # --ram_start (CUB; ILSVRC 5)
        "bg_threshold": 0.1,  # --ram_th_bg (CUB; ILSVRC 0.4)
        "gap": 0.2,  # --ram_bg_fg_gap (CUB; ILSVRC 0.1)
        "scg": True,  # --scg: self-correlation maps at inference
        "scg_levels": 2,  # --scg_blocks=4,5: the last two stages
        "fo_threshold": 0.1,  # --scg_fosc_th (CUB; ILSVRC 0.2)
        "so_threshold": 0.5,  # --scg_sosc_th (CUB; ILSVRC 0.2)
        "so_weight": 2.0,  # --scg_so_weight (CUB; ILSVRC 1)
        "order": 2,  # --scg_order
        "object_seed": 0.1,  # --scg_fg_th
        "background_seed": 0.05,  # --scg_bg_th
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        for key in ("ra_weight", "gap", "start_epoch"):
            if not o[key] >= 0:
                raise MethodError(f"method 'spa': option {key} must be >= 0, got {o[key]!r}")
        for key in ("bg_threshold", "fo_threshold", "so_threshold", "so_weight", "object_seed", "background_seed"):
            if not math.isfinite(o[key]):
                raise MethodError(f"method 'spa': option {key} must be a finite number, got {o[key]!r}")
        for key in ("scg_levels", "order"):
            if o[key] < 1:
                raise MethodError(f"method 'spa': option {key} must be an int >= 1, got {o[key]!r}")
        if o["background_seed"] >= o["object_seed"]:
            raise MethodError(
                f"method 'spa': background_seed ({o['background_seed']}) must be below object_seed ({o['object_seed']})"
            )

    def head(self, conv: nn.Module, classifier: nn.Linear) -> SPAHead:
        """The `SPAHead` of this method's options."""
        o = self.options
        return SPAHead(
            conv, classifier, scg=o["scg"], fo_threshold=o["fo_threshold"], so_threshold=o["so_threshold"],
            order=o["order"], so_weight=o["so_weight"], object_seed=o["object_seed"],
            background_seed=o["background_seed"],
        )  # fmt: skip

    def build(self, network: Network, config: Any) -> Network:
        if getattr(config, "dataset", None) == "voc":
            raise MethodError("method 'spa' needs single-label data (its loss uses the ground-truth class's map)")
        head = network.head
        conv, classifier = getattr(head, "conv", None), getattr(head, "classifier", None)
        if not isinstance(conv, nn.Module) or not isinstance(classifier, nn.Linear):
            raise MethodError(
                f"method 'spa' needs a head with a conv and a linear classifier, got {type(head).__name__}"
            )
        backbone = network.backbone
        levels = int(self.options["scg_levels"])
        if levels > 1:
            try:
                backbone = FeatureLevels(backbone, levels)
            except (TypeError, ValueError) as error:
                raise MethodError(f"method 'spa': scg_levels={levels}: {error}") from None
        return Network(backbone, self.head(conv, classifier))

    def loss(self, model: nn.Module, images: torch.Tensor, batch: Any, step: Step) -> MethodOutput:
        if "labels" in batch:
            raise MethodError("method 'spa' needs single-label data (its loss uses the ground-truth class's map)")
        labels = batch["label"].to(images.device)
        out = model(images, target=labels)
        classification = F.cross_entropy(out.logits, labels)
        total = classification
        if step.epoch >= self.options["start_epoch"]:
            ra = restricted_activation_loss(out.class_maps, labels, self.options["bg_threshold"], self.options["gap"])
            total = classification + self.options["ra_weight"] * ra
        else:
            ra = classification.new_zeros(())
        return MethodOutput(total, out.logits, {"cls": classification.detach(), "ra": ra.detach()})
