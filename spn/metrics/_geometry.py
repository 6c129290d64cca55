"""Box geometry for the metrics (private; :func:`pixel_box_iou` is re-exported by spn.metrics)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._inputs import as_boxes, as_points


def pixel_box_iou(boxes_a: Any, boxes_b: Any) -> np.ndarray:
    """IoU of every pair of **pixel-inclusive** boxes (the ``+1`` convention).

    ``intersection = max(0, min(x1) - max(x0) + 1) * max(0, min(y1) - max(y0) + 1)`` and
    ``area = (x1 - x0 + 1) * (y1 - y0 + 1)``: a box ``(x0, y0, x1, y1)`` covers the pixels
    ``x0..x1`` x ``y0..y1``, ends included. This is wsolevaluation's ``calculate_multiple_iou``
    and the released SPN code's ``ious``; a pair whose union is not positive gets 0
    (wsolevaluation's rule; it cannot happen with valid boxes). It is **not**
    ``torchvision.ops.box_iou``, whose boxes are continuous (area ``(x1 - x0) * (y1 - y0)``).

    Args:
        boxes_a: ``(n, 4)`` boxes.
        boxes_b: ``(m, 4)`` boxes.

    Returns:
        float64 ``(n, m)`` array.

    Example:
        >>> pixel_box_iou([[0, 0, 9, 9]], [[0, 0, 9, 4]])  # 50 of 100 pixels
        array([[0.5]])
    """
    a = as_boxes(boxes_a, "boxes_a")[:, None, :]
    b = as_boxes(boxes_b, "boxes_b")[None, :, :]
    inter_w = np.maximum(0.0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    inter_h = np.maximum(0.0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    intersection = inter_w * inter_h
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - intersection
    positive = union > 0
    return np.where(positive, intersection / np.where(positive, union, 1.0), 0.0)


def best_iou(pred_boxes: np.ndarray, gt_boxes: np.ndarray) -> float:
    """Largest IoU over all (predicted, ground-truth) pairs; 0.0 if either set is empty."""
    if len(pred_boxes) == 0 or len(gt_boxes) == 0:
        return 0.0
    return float(pixel_box_iou(pred_boxes, gt_boxes).max())


def linf_box_distance(points: Any, boxes: Any) -> np.ndarray:
    """``(n, m)`` L-infinity distance from each point to each box's rectangle ``[x0, x1] x [y0, y1]``
    of pixel centres (0 inside): ``max(dx, dy)`` with ``dx = max(x0 - x, 0, x - x1)``."""
    p = as_points(points)[:, None, :]
    b = as_boxes(boxes)[None, :, :]
    dx = np.maximum(np.maximum(b[..., 0] - p[..., 0], 0.0), p[..., 0] - b[..., 2])
    dy = np.maximum(np.maximum(b[..., 1] - p[..., 1], 0.0), p[..., 1] - b[..., 3])
    return np.maximum(dx, dy)


def pixel_distance(points: Any, boxes: Any) -> np.ndarray:
    """``(n, m)`` Euclidean distance from each point to the nearest pixel centre of each box.

    The pixels of a box are the integer ``(x, y)`` with ``x0 <= x <= x1``, ``y0 <= y <= y1``
    (TorchRay's occupancy mask of the box); a box without an integer pixel is infinitely far.
    Per axis the nearest such integer is the point's coordinate clamped to
    ``[ceil(x0), floor(x1)]`` and rounded, so the distance is exact for any real point.
    """
    p = as_points(points)[:, None, :]
    b = as_boxes(boxes)[None, :, :]
    low, high = np.ceil(b[..., :2]), np.floor(b[..., 2:])
    nearest = np.clip(np.round(p), low, high)
    # round() may step outside [low, high] only where clip brings it back; a point between two
    # pixels is equally far from both, so the rounding direction does not change the distance.
    squared = ((nearest - p) ** 2).sum(axis=-1)
    empty = (low > high).any(axis=-1)
    return np.where(empty, np.inf, np.sqrt(squared))


def box_union_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the pixels inside at least one pixel-inclusive box (parts
    outside the image are dropped)."""
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        col_start, row_start = max(int(np.ceil(x0)), 0), max(int(np.ceil(y0)), 0)
        col_stop, row_stop = min(int(np.floor(x1)), width - 1) + 1, min(int(np.floor(y1)), height - 1) + 1
        if col_start < col_stop and row_start < row_stop:
            mask[row_start:row_stop, col_start:col_stop] = True
    return mask


def boxes_of_class(boxes: np.ndarray, labels: np.ndarray | None, cls: int) -> np.ndarray:
    """The rows of ``boxes`` whose label is ``cls`` (all of them when ``labels`` is None)."""
    return boxes if labels is None else boxes[labels == cls]
