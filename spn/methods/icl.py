r"""ICL: in-sample contrastive learning and consistent attention (Ki et al., ACCV 2020), ``--method icl``.

The authors published no code; this follows the paper's description, and every choice the
paper leaves open is ours and documented in ``docs/methods/icl.md``. On the backbone's last
few stage outputs (`spn.models.FeatureLevels`):

- a non-local block (`NonLocalAttention`, Wang et al., CVPR 2018) per level; a level's
  attention map is the channel mean of the block's output (`attention_map`), "non-local
  attention in place of ADL's channel-pooled attention";
- in training, ADL-style random selection (`random_selection`) on the last level: with
  probability ``drop_rate`` a drop mask (the most discriminative part dropped, or the
  background dropped, the latter a ``background_share`` of the drops), otherwise the
  sigmoid importance map; the wrapped head (CAM, SPN) then classifies the result;
- a contrastive attention loss (`region_features`, `contrastive_attention_loss`): the
  last level's features pooled over the foreground, over the foreground with its most
  discriminative part dropped, and over the background, projected and L2-normalised; a
  margin loss pulls the dropped version towards the foreground and away from the background;
- a foreground consistency loss (`foreground_consistency_loss`): each earlier level's
  normalised attention is pushed (squared error) towards the last level's, which is detached.

Loss: :math:`\text{CE} + w_{cal} L_{cal} + w_{fcl} L_{fcl}`. Maps: the wrapped head's maps
of the last level's non-local output (no selection at evaluation, as in ADL).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from spn.models.heads import HeadOutput, HeadState, WSOLHead
from spn.models.maps import ClassSpec

from .base import Method, MethodError, MethodOutput, Step, classification_loss

__all__ = [
    "ICL",
    "ICLHead",
    "ICLOutput",
    "NonLocalAttention",
    "attention_map",
    "contrastive_attention_loss",
    "foreground_consistency_loss",
    "normalize_attention",
    "random_selection",
    "region_features",
    "selection_masks",
]

Anchor = Literal["dropped", "foreground"]


class NonLocalAttention(nn.Module):
    r"""An embedded-Gaussian non-local block (Wang et al., CVPR 2018) with a residual connection.

    :math:`z_i = x_i + W_z \sum_j \operatorname{softmax}_j(\theta(x_i)^\top \phi(x_j))\, g(x_j)`
    with 1x1 convolutions :math:`\theta, \phi, g` (C -> C') and :math:`W_z` (C' -> C).
    :math:`W_z` starts at zero (as Wang et al. zero-initialise the block's last BN), so the
    block starts as the identity. With ``subsample`` (Wang et al.'s subsampling trick), the
    keys and values :math:`\phi(x), g(x)` are max-pooled 2x2 (stride 2, floor) before the sum,
    so j runs over a quarter of the positions (maps smaller than 2x2 are not pooled).

    Args:
        channels: C.
        inter_channels: C' (default C // 2, at least 1, Wang et al.'s).
        subsample: pool the keys and values (default True).

    Shape:
        - Input: (B, C, h, w)
        - Output: (B, C, h, w)

    Example:
        >>> block = NonLocalAttention(8)
        >>> x = torch.rand(2, 8, 4, 4)
        >>> torch.equal(block(x), x)
        True
    """

    def __init__(self, channels: int, inter_channels: int | None = None, subsample: bool = True) -> None:
        super().__init__()
        self.subsample = bool(subsample)
        inner = inter_channels if inter_channels is not None else max(channels // 2, 1)
        if channels < 1 or inner < 1:
            raise ValueError(f"channels and inter_channels must be >= 1, got {channels} and {inner}")
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.out = nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.out.weight)
        assert self.out.bias is not None
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"NonLocalAttention takes (B, C, h, w), got {tuple(x.shape)}")
        queries = self.theta(x).flatten(2).transpose(1, 2)  # (B, hw, C')
        keys, values = self.phi(x), self.g(x)
        if self.subsample and min(x.shape[-2:]) >= 2:
            keys, values = F.max_pool2d(keys, 2), F.max_pool2d(values, 2)
        keys = keys.flatten(2)  # (B, C', n)
        values = values.flatten(2).transpose(1, 2)  # (B, n, C')
        weights = torch.softmax(queries @ keys, dim=-1)  # (B, hw, n), rows sum to 1
        mixed = (weights @ values).transpose(1, 2).reshape(x.shape[0], -1, *x.shape[-2:])
        return x + self.out(mixed)


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """The channel mean of features: (B, C, h, w) -> (B, h, w) (ADL's self-attention map).

    Example:
        >>> attention_map(torch.tensor([[[[1.0]], [[3.0]]]]))
        tensor([[[2.]]])
    """
    if features.dim() != 4:
        raise ValueError(f"features must have shape (B, C, h, w), got {tuple(features.shape)}")
    return features.mean(dim=1)


def normalize_attention(attention: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each (h, w) map to [0, 1]; a constant map becomes all zeros.

    Example:
        >>> normalize_attention(torch.tensor([[[2.0, 4.0]], [[1.0, 1.0]]]))
        tensor([[[0., 1.]],
        <BLANKLINE>
                [[0., 0.]]])
    """
    if attention.dim() != 3:
        raise ValueError(f"attention must have shape (B, h, w), got {tuple(attention.shape)}")
    flat = attention.flatten(1)
    low = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - low
    normed = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return normed.view(attention.shape)


def selection_masks(
    attention: torch.Tensor, drop_threshold: float = 0.8, background_threshold: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ADL-style masks from an attention map, with ICL's background drop.

    With ``a`` the normalised attention (`normalize_attention`):

    - drop-discriminative mask: ``a < drop_threshold`` (the most attended part set to 0);
    - drop-background mask: ``a >= background_threshold`` (the background set to 0);
    - importance map: ``sigmoid(attention)`` (of the raw attention, as ADL).

    A constant attention map marks nothing: both drop masks are all ones there.

    Args:
        attention: (B, h, w) raw attention (`attention_map`); the masks are not differentiated.
        drop_threshold, background_threshold: in [0, 1].

    Returns:
        (drop_discriminative, drop_background, importance), each (B, 1, h, w), to multiply
        (B, C, h, w) features with.

    Example:
        >>> drop, background, importance = selection_masks(torch.tensor([[[0.0, 1.0, 10.0]]]))
        >>> drop.flatten().tolist(), background.flatten().tolist()
        ([1.0, 1.0, 0.0], [0.0, 0.0, 1.0])
    """
    _check_unit("drop_threshold", drop_threshold)
    _check_unit("background_threshold", background_threshold)
    a = normalize_attention(attention.detach())
    flat = attention.detach().flatten(1)
    informative = (flat.amax(dim=1) > flat.amin(dim=1))[:, None, None]
    drop = torch.where(informative, a < drop_threshold, True).to(attention.dtype)
    background = torch.where(informative, a >= background_threshold, True).to(attention.dtype)
    return drop[:, None], background[:, None], torch.sigmoid(attention)[:, None]


def random_selection(
    features: torch.Tensor,
    attention: torch.Tensor,
    drop_rate: float = 0.75,
    background_share: float = 0.5,
    drop_threshold: float = 0.8,
    background_threshold: float = 0.2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, str]:
    """Multiply features by one randomly chosen map of `selection_masks` (one draw per batch).

    With probability ``drop_rate * (1 - background_share)`` the drop-discriminative mask, with
    ``drop_rate * background_share`` the drop-background mask, otherwise the importance map.

    Args:
        features: (B, C, h, w).
        attention: (B, h, w) their attention map.
        drop_rate: the probability of a drop mask (ADL's 0.75).
        background_share: the share of the drops that drop the background (ours: 0.5).
        drop_threshold, background_threshold: see `selection_masks`.
        generator: the random generator (default: torch's global one).

    Returns:
        (selected features (B, C, h, w), which: ``"drop"``, ``"background"`` or ``"importance"``).

    Example:
        >>> feats, att = torch.rand(2, 4, 3, 3), torch.rand(2, 3, 3)
        >>> out, which = random_selection(feats, att, drop_rate=0.0)
        >>> which, torch.allclose(out, feats * torch.sigmoid(att)[:, None])
        ('importance', True)
    """
    _check_unit("drop_rate", drop_rate)
    _check_unit("background_share", background_share)
    drop, background, importance = selection_masks(attention, drop_threshold, background_threshold)
    draw = float(torch.rand((), generator=generator))
    if draw < drop_rate * (1 - background_share):
        return features * drop, "drop"
    if draw < drop_rate:
        return features * background, "background"
    return features * importance, "importance"


def region_features(
    features: torch.Tensor, attention: torch.Tensor, drop_threshold: float = 0.8, background_threshold: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features averaged over the foreground, the dropped foreground and the background.

    With ``a`` the normalised attention (`normalize_attention`, detached): background
    ``a < background_threshold``, foreground the rest, dropped foreground the foreground where
    ``a < drop_threshold`` (its most discriminative part removed). Each region's feature is
    the mean of the features over its positions (0 for an empty region).

    Args:
        features: (B, C, h, w).
        attention: (B, h, w) raw attention of those features.
        drop_threshold, background_threshold: in [0, 1].

    Returns:
        (foreground, dropped, background) features, each (B, C), and ``valid`` (B,) bool: the
        images whose dropped foreground and background are both non-empty.

    Example:
        >>> feats = torch.tensor([[[[1.0, 2.0, 3.0]]]])
        >>> fg, dropped, bg, valid = region_features(feats, feats[:, 0])
        >>> fg.item(), dropped.item(), bg.item(), valid.item()
        (2.5, 2.0, 1.0, True)
    """
    _check_unit("drop_threshold", drop_threshold)
    _check_unit("background_threshold", background_threshold)
    if features.dim() != 4 or attention.shape != (features.shape[0], *features.shape[-2:]):
        raise ValueError(
            f"expected features (B, C, h, w) and attention (B, h, w), got {tuple(features.shape)} "
            f"and {tuple(attention.shape)}"
        )
    a = normalize_attention(attention.detach())
    back = a < background_threshold
    fore = ~back
    dropped = fore & (a < drop_threshold)

    def pooled(mask: torch.Tensor) -> torch.Tensor:
        weights = mask.to(features.dtype)[:, None]
        return (features * weights).sum(dim=(-2, -1)) / weights.sum(dim=(-2, -1)).clamp_min(1)

    valid = dropped.flatten(1).any(dim=1) & back.flatten(1).any(dim=1)
    return pooled(fore), pooled(dropped), pooled(back), valid


def contrastive_attention_loss(
    foreground: torch.Tensor,
    dropped: torch.Tensor,
    background: torch.Tensor,
    valid: torch.Tensor | None = None,
    margin: float = 1.0,
    anchor: Anchor = "dropped",
) -> torch.Tensor:
    r"""Contrastive attention loss: a triplet margin loss on L2-normalised region embeddings.

    With :math:`u, v, w` the L2-normalised foreground, dropped and background embeddings and
    :math:`d` the squared Euclidean distance, per image
    :math:`\max(0, d(v, u) - d(v, w) + m)` (``anchor="dropped"``: the dropped version near the
    foreground and far from the background, the paper's abstract) or
    :math:`\max(0, d(u, v) - d(u, w) + m)` (``anchor="foreground"``); the mean over the
    ``valid`` images, 0 when there is none.

    Args:
        foreground, dropped, background: (B, D) embeddings (e.g. projected `region_features`).
        valid: (B,) bool, the images to count (default: all).
        margin: m >= 0 (ours: 1.0; normalised embeddings are at squared distance 0..4).
        anchor: ``"dropped"`` or ``"foreground"``.

    Returns:
        A scalar.

    Example:
        >>> u, v, w = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> contrastive_attention_loss(u, v, w, margin=1.0), contrastive_attention_loss(u, v, w, margin=3.0)
        (tensor(0.), tensor(1.))
    """
    if anchor not in ("dropped", "foreground"):
        raise ValueError(f"anchor must be 'dropped' or 'foreground', got {anchor!r}")
    if not float(margin) >= 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    if foreground.dim() != 2 or foreground.shape != dropped.shape or foreground.shape != background.shape:
        raise ValueError(
            "foreground, dropped and background must be (B, D) each, got "
            f"{tuple(foreground.shape)}, {tuple(dropped.shape)}, {tuple(background.shape)}"
        )
    u, v, w = (F.normalize(x, dim=1) for x in (foreground, dropped, background))
    if anchor == "dropped":
        losses = F.relu((v - u).pow(2).sum(1) - (v - w).pow(2).sum(1) + margin)
    else:
        losses = F.relu((u - v).pow(2).sum(1) - (u - w).pow(2).sum(1) + margin)
    if valid is None:
        return losses.mean()
    kept = torch.where(valid, losses, torch.zeros_like(losses))
    return kept.sum() / valid.sum().clamp_min(1)


def foreground_consistency_loss(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""Foreground consistency: earlier levels' attention towards the last level's (detached).

    :math:`L_{fcl} = \frac{1}{L - 1} \sum_{l < L} \operatorname{mean}_{b,i,j}
    (\operatorname{resize}(\hat a_l) - \operatorname{sg}(\hat a_L))^2` with
    :math:`\hat a` the normalised attention (`normalize_attention`) and resize bilinear
    (align_corners=False) to the last level's size; 0 for a single level.

    Args:
        attentions: (B, h_l, w_l) raw attention maps, shallowest first.

    Returns:
        A scalar (differentiable in the earlier levels' attention only).

    Example:
        >>> early, last = torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[1.0, 0.0]]])
        >>> foreground_consistency_loss([early, last])
        tensor(1.)
    """
    if len(attentions) == 0:
        raise ValueError("foreground_consistency_loss needs at least one attention map")
    reference = normalize_attention(attentions[-1].detach())
    if len(attentions) == 1:
        return attentions[-1].sum() * 0.0
    total = reference.new_zeros(())
    for attention in attentions[:-1]:
        normed = normalize_attention(attention)
        if normed.shape[-2:] != reference.shape[-2:]:
            size = reference.shape[-2:]
            normed = F.interpolate(normed[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        total = total + (normed - reference).pow(2).mean()
    return total / (len(attentions) - 1)


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


class ICLOutput(NamedTuple):
    """What `ICLHead` returns in training (given a target).

    Attributes:
        logits: (B, N) class scores (of the randomly selected last-level features).
        contrastive: the contrastive attention loss.
        consistency: the foreground consistency loss.
    """

    logits: torch.Tensor
    contrastive: torch.Tensor
    consistency: torch.Tensor


class ICLHead(WSOLHead):
    """ICL on several feature levels, in front of a WSOL head (CAM, SPN, ...).

    Takes the list of levels of `spn.models.FeatureLevels` (shallowest first; the last is
    what the wrapped head was made for), applies a `NonLocalAttention` per level, random
    selection on the last level in training mode, then the wrapped head. Given a target,
    returns `ICLOutput` with the two losses; otherwise the logits. ``forward_with_maps`` gives
    the wrapped head's maps of the last level's non-local output, with no selection.

    Args:
        level_channels: channels of each level, shallowest first.
        inner: the WSOL head (its ``in_channels`` equal the last level's).
        projection_dim: output size of the contrastive loss's linear projection (ours: 128).
        margin, anchor: see `contrastive_attention_loss`.
        drop_rate, background_share: see `random_selection`.
        drop_threshold, background_threshold: see `selection_masks` and `region_features`.

    Shape:
        - Input: a list of (B, C_l, h_l, w_l), or one (B, C, h, w) for a single level
        - Output: (B, N) logits, or `ICLOutput` given a target

    Example:
        >>> from spn.models import CAMHead
        >>> head = ICLHead([4, 8], CAMHead(8, num_classes=3))
        >>> levels = [torch.rand(2, 4, 6, 6), torch.rand(2, 8, 3, 3)]
        >>> out = head(levels, torch.tensor([0, 2]))
        >>> out.logits.shape, out.contrastive.shape, head.forward_with_maps(levels).maps.shape
        (torch.Size([2, 3]), torch.Size([]), torch.Size([2, 3, 3]))
    """

    def __init__(
        self,
        level_channels: Sequence[int],
        inner: WSOLHead,
        *,
        projection_dim: int = 128,
        margin: float = 1.0,
        anchor: Anchor = "dropped",
        drop_rate: float = 0.75,
        background_share: float = 0.5,
        drop_threshold: float = 0.8,
        background_threshold: float = 0.2,
    ) -> None:
        super().__init__()
        if not isinstance(inner, WSOLHead):
            raise TypeError(f"inner must be a WSOLHead, got {type(inner).__name__}")
        channels = [int(c) for c in level_channels]
        if not channels or channels[-1] != inner.in_channels:
            raise ValueError(
                f"the last level's channels ({channels[-1] if channels else None}) must be the head's in_channels "
                f"({inner.in_channels})"
            )
        if projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1, got {projection_dim}")
        for name, value in (
            ("drop_rate", drop_rate),
            ("background_share", background_share),
            ("drop_threshold", drop_threshold),
            ("background_threshold", background_threshold),
        ):
            _check_unit(name, value)
        contrastive_attention_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), None, margin, anchor)
        self.inner = inner
        self.in_channels = inner.in_channels
        self.num_classes = inner.num_classes
        self.level_channels = channels
        self.blocks = nn.ModuleList(NonLocalAttention(c) for c in channels)
        self.projection = nn.Linear(channels[-1], projection_dim)
        self.margin, self.anchor = float(margin), anchor
        self.drop_rate, self.background_share = float(drop_rate), float(background_share)
        self.drop_threshold, self.background_threshold = float(drop_threshold), float(background_threshold)

    def levels(
        self, features: torch.Tensor | Sequence[torch.Tensor], last_only: bool = False
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The non-local outputs of the levels and their attention maps, shallowest first
        (only the last level's with ``last_only``: the maps and logits need no other)."""
        levels = [features] if isinstance(features, torch.Tensor) else list(features)
        if len(levels) != len(self.blocks):
            raise ValueError(f"ICLHead was made for {len(self.blocks)} feature levels, got {len(levels)}")
        pairs = list(zip(self.blocks, levels, strict=True))
        outputs = [block(level) for block, level in (pairs[-1:] if last_only else pairs)]
        return outputs, [attention_map(z) for z in outputs]

    def compute(self, features: Any) -> HeadState:
        """The wrapped head on the last level's non-local output (no selection)."""
        outputs, _ = self.levels(features, last_only=True)
        return self.inner.compute(outputs[-1])

    def map_weight(self) -> torch.Tensor:
        return self.inner.map_weight()

    def forward_with_maps(
        self, features: Any, classes: ClassSpec = "predicted", size: tuple[int, int] | None = None
    ) -> HeadOutput:
        outputs, _ = self.levels(features, last_only=True)
        return self.inner.forward_with_maps(outputs[-1], classes=classes, size=size)

    def forward(self, features: Any, target: torch.Tensor | None = None) -> Any:
        outputs, attentions = self.levels(features, last_only=target is None)
        last, attention = outputs[-1], attentions[-1]
        selected = last
        if self.training:
            selected, _ = random_selection(
                last, attention, self.drop_rate, self.background_share, self.drop_threshold, self.background_threshold
            )
        logits = self.inner.compute(selected).logits
        if target is None:
            return logits
        foreground, dropped, background, valid = region_features(
            last, attention, self.drop_threshold, self.background_threshold
        )
        contrastive = contrastive_attention_loss(
            self.projection(foreground),
            self.projection(dropped),
            self.projection(background),
            valid=valid,
            margin=self.margin,
            anchor=self.anchor,
        )
        return ICLOutput(logits, contrastive, foreground_consistency_loss(attentions))


class ICL(Method):
    """ICL training (`ICLHead` on `spn.models.FeatureLevels`): CE + cal_weight * L_cal + fcl_weight * L_fcl.

    Options (the paper publishes no code; where it gives no value, the default is ours, see
    ``docs/methods/icl.md``): ``levels`` (2), ``cal_weight`` (1.0), ``fcl_weight`` (1.0),
    ``margin`` (1.0), ``anchor`` ("dropped"), ``projection_dim`` (128), ``drop_rate`` (0.75,
    ADL's), ``background_share`` (0.5), ``drop_threshold`` (0.8, ADL's), ``background_threshold`` (0.2).

    Example:
        >>> ICL(anchor="foreground").options["anchor"]
        'foreground'
    """

    name = "icl"
    defaults: ClassVar[dict[str, Any]] = {
        "levels": 2,
        "cal_weight": 1.0,
        "fcl_weight": 1.0,
        "margin": 1.0,
        "anchor": "dropped",
        "projection_dim": 128,
        "drop_rate": 0.75,
        "background_share": 0.5,
        "drop_threshold": 0.8,
        "background_threshold": 0.2,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if o["levels"] < 1:
            raise MethodError(f"method 'icl': option levels must be >= 1, got {o['levels']!r}")
        if o["projection_dim"] < 1:
            raise MethodError(f"method 'icl': option projection_dim must be >= 1, got {o['projection_dim']!r}")
        for key in ("cal_weight", "fcl_weight", "margin"):
            if not o[key] >= 0:
                raise MethodError(f"method 'icl': option {key} must be >= 0, got {o[key]!r}")
        for key in ("drop_rate", "background_share", "drop_threshold", "background_threshold"):
            if not 0 <= o[key] <= 1:
                raise MethodError(f"method 'icl': option {key} must be in [0, 1], got {o[key]!r}")
        if o["anchor"] not in ("dropped", "foreground"):
            raise MethodError(f"method 'icl': option anchor must be 'dropped' or 'foreground', got {o['anchor']!r}")

    def build(self, network: Any, config: Any) -> Any:
        from spn.models import FeatureLevels, Network

        o = self.options
        try:
            backbone = FeatureLevels(network.backbone, o["levels"])
        except (TypeError, ValueError) as error:
            raise MethodError(f"method 'icl': option levels: {error}") from None
        head = ICLHead(
            backbone.out_channels,
            network.head,
            projection_dim=o["projection_dim"],
            margin=o["margin"],
            anchor=o["anchor"],
            drop_rate=o["drop_rate"],
            background_share=o["background_share"],
            drop_threshold=o["drop_threshold"],
            background_threshold=o["background_threshold"],
        )
        return Network(backbone, head)

    def loss(self, model: torch.nn.Module, images: torch.Tensor, batch: Mapping[str, Any], step: Step) -> MethodOutput:
        target = batch["labels"] if "labels" in batch else batch["label"]
        out = model(images, target=target.to(images.device))
        cls = classification_loss(out.logits, batch)
        loss = cls + self.options["cal_weight"] * out.contrastive + self.options["fcl_weight"] * out.consistency
        parts = {"cls": cls.detach(), "cal": out.contrastive.detach(), "fcl": out.consistency.detach()}
        return MethodOutput(loss, out.logits, parts)
