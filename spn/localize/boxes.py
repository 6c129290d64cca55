"""Boxes from maps by the SPN paper's rule, and boxes moved between resolutions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from spn._convert import ArrayLike, as_map_batch, check_size, to_numpy

from ._regions import component_boxes, label_components, mask_box, region_scores

__all__ = ["ScoreMode", "ThresholdMode", "boxes_from_maps", "foreground_masks", "resize_boxes"]

ThresholdMode = Literal["mean", "max"]
ScoreMode = Literal["mean", "sum", "max"]


def _check_ratio(ratio: Any) -> float:
    number = isinstance(ratio, (int, float, np.integer, np.floating)) and not isinstance(ratio, bool)
    if not number or not np.isfinite(ratio):
        raise ValueError(f"ratio must be a finite number, got {ratio!r}")
    return float(ratio)


def foreground_masks(maps: ArrayLike, threshold: ThresholdMode = "mean", ratio: float = 1.0) -> np.ndarray:
    """Foreground of each map: ``map >= ratio * mean(map)`` or ``map >= ratio * max(map)``.

    ``threshold="mean"`` with ``ratio=1`` is the SPN paper's rule. The comparison is ``>=`` as
    in the released SPN code, so with ``ratio <= 1`` a constant map is entirely foreground. A
    mask may be empty (e.g. ``ratio > 1`` on a constant positive map).

    Args:
        maps: ``(B, H, W)`` tensor or array.
        threshold: ``"mean"`` or ``"max"``: what ``ratio`` multiplies, per map.
        ratio: the factor.

    Returns:
        Boolean array.

    Shape:
        - Input: :math:`(B, H, W)`.
        - Output: :math:`(B, H, W)`.

    Example:
        >>> foreground_masks(np.array([[[0.0, 1.0, 3.0]]]))  # mean 4/3
        array([[[False, False,  True]]])
    """
    array = as_map_batch(maps)
    ratio = _check_ratio(ratio)
    if threshold not in ("mean", "max"):
        raise ValueError(f"threshold must be 'mean' or 'max', got {threshold!r}")
    if array.size == 0:
        return np.zeros(array.shape, dtype=bool)
    reduce = np.mean if threshold == "mean" else np.max
    return array >= ratio * reduce(array, axis=(1, 2), keepdims=True)


def boxes_from_maps(
    maps: ArrayLike,
    threshold: ThresholdMode = "mean",
    ratio: float = 1.0,
    per_component: bool = False,
    score: ScoreMode = "mean",
    connectivity: int = 8,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Boxes around the foreground of each map (see :func:`foreground_masks`): the SPN paper's
    rule (for wsolevaluation's threshold sweep see :func:`spn.localize.wsol_boxes`).

    * ``per_component=False`` (the SPN paper): one box, the tightest box around all
      foreground pixels, scored with the ``score`` of the map over the foreground pixels.
      (The released SPN code's single-box mode scores it with the mean of the *whole* map.)
    * ``per_component=True`` (the released SPN code's multi-object mode): one box per
      connected component of the foreground (``connectivity`` 8 by default; 4 as the released
      code, whose ``scipy.ndimage.label`` call uses scipy's default structure), scored with
      the ``score`` of the map over that component, sorted by score, highest first (equal
      scores keep row-major order of the components' first pixels).

    The map is used at its own resolution: pass maps upsampled to the image size
    (:func:`spn.models.upsample_maps`) to get boxes in image pixels.

    Args:
        maps: ``(B, H, W)`` tensor or array.
        threshold: ``"mean"`` or ``"max"``.
        ratio: foreground is ``map >= ratio * mean`` (or ``* max``).
        per_component: one box per connected component instead of one box in all.
        score: ``"mean"``, ``"sum"`` or ``"max"`` of the map over the pixels the box was made from.
        connectivity: 8 or 4 (the released code), used with ``per_component=True``.

    Returns:
        ``(boxes, scores)``: two lists of length ``B``; ``boxes[i]`` is an int64 ``(k_i, 4)``
        array of pixel-inclusive ``(x0, y0, x1, y1)``, best first, ``scores[i]`` a float64
        ``(k_i,)`` array. ``k_i`` is 0 when map ``i`` has no foreground.

    Example:
        >>> m = np.zeros((1, 4, 6)); m[0, 0, 0] = m[0, 1, 1] = 1; m[0, 3, 5] = 2
        >>> boxes, scores = boxes_from_maps(m, per_component=True)
        >>> boxes[0].tolist(), scores[0].tolist()
        ([[5, 3, 5, 3], [0, 0, 1, 1]], [2.0, 1.0])
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    if score not in ("mean", "sum", "max"):
        raise ValueError(f"score must be 'mean', 'sum' or 'max', got {score!r}")
    array = as_map_batch(maps)
    masks = foreground_masks(array, threshold, ratio)
    all_boxes: list[np.ndarray] = []
    all_scores: list[np.ndarray] = []
    for values, mask in zip(array, masks, strict=True):
        if per_component:
            labels, count = label_components(mask, connectivity=connectivity)
            boxes = component_boxes(labels, count)
            scores = region_scores(values, labels, count, score)
            order = np.argsort(-scores, kind="stable")
            boxes, scores = boxes[order], scores[order]
        else:
            boxes = mask_box(mask)
            scores = region_scores(values, mask.astype(np.int32), len(boxes), score)
        all_boxes.append(boxes)
        all_scores.append(scores)
    return all_boxes, all_scores


def resize_boxes(boxes: Any, size: Sequence[int], new_size: Sequence[int]) -> np.ndarray:
    """Boxes of an ``(H, W)`` image moved to the same image resized to ``new_size``.

    Each coordinate is scaled by the size ratio of its axis and truncated to an integer:
    ``int(x * W' / W)`` and ``int(y * H' / H)``, wsolevaluation's ``resize_bbox`` (how it maps
    ground-truth boxes to its 224 x 224 evaluation maps; note that it takes sizes as
    ``(width, height)``, while ``spn`` takes ``(H, W)`` everywhere).

    Args:
        boxes: ``(m, 4)`` pixel-inclusive ``(x0, y0, x1, y1)`` (or one ``(4,)`` box).
        size: ``(H, W)`` of the image the boxes are in.
        new_size: ``(H', W')`` of the resized image.

    Returns:
        int64 ``(m, 4)`` array.

    Example:
        >>> resize_boxes([[1, 2, 4, 3]], size=(20, 10), new_size=(10, 35)).tolist()
        [[3, 1, 14, 1]]
    """
    height, width = check_size(size)
    new_height, new_width = check_size(new_size, "new_size")
    array = np.asarray(to_numpy(boxes), dtype=np.float64)
    if array.ndim == 1 and array.shape == (4,):
        array = array[None]
    if array.size == 0:
        return np.zeros((0, 4), dtype=np.int64)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must have shape (m, 4) as (x0, y0, x1, y1) rows, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("boxes contain NaN or infinite coordinates")
    scale = np.array([new_width, new_height, new_width, new_height], dtype=np.float64)
    original = np.array([width, height, width, height], dtype=np.float64)
    return np.trunc(array * scale / original).astype(np.int64)
