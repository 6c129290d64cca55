"""Weakly supervised object localisation (WSOL) metrics, streaming and one-shot.

Every metric is a small accumulator class (``update(...)`` once per batch, then
``compute()``) plus a one-shot function over a single batch; :func:`evaluate` runs an
accumulator over an iterator of batches. ``compute()`` returns a dict of plain Python
numbers (``float`` / ``int``), with per-class values where the field reports them.
All accuracies are fractions in ``[0, 1]`` (wsolevaluation prints percentages: multiply
by 100 to compare). ``compute()`` raises ``ValueError`` when nothing was evaluated (an
empty batch is fine, an empty run is not), so an empty data loader cannot pass for a score.

Input conventions (see ``spn.localize`` and ``docs/metrics.md``):

* maps: ``(B, H, W)`` tensor or array, finite (NaN / infinity raise ``ValueError``);
* boxes: pixel-inclusive ``(x0, y0, x1, y1)``, 0-based, ``x`` = column, ``y`` = row;
  ground truth comes as a list of ``B`` arrays of shape ``(m_i, 4)`` (``m_i`` may differ
  and may be 0), or a ``(B, 4)`` / ``(B, m, 4)`` array; labels as a list of ``B`` arrays
  of shape ``(m_i,)``. PASCAL VOC annotations are 1-based: subtract 1 first.
* IoU uses the pixel-inclusive ``+1`` convention of wsolevaluation and of the released SPN
  code: ``area = (x1 - x0 + 1) * (y1 - y0 + 1)``.

Metrics and sources:

* :class:`PointingGame` - Zhang et al., "Top-down Neural Attention by Excitation
  Backprop", ECCV 2016; SPN paper (Zhu et al., ICCV 2017) Table 2.
* :class:`CorLoc` - Deselaers et al., IJCV 2012; released SPN code ``corloc``.
* :class:`BoxAccuracy` - MaxBoxAcc and MaxBoxAccV2, Choe et al., "Evaluating Weakly
  Supervised Object Localization Methods Right", CVPR 2020 (clovaai/wsolevaluation).
* :class:`LocalizationAccuracy` - GT-known and top-1 localisation (ILSVRC protocol,
  Russakovsky et al. 2015; as used by CAM, Zhou et al. CVPR 2016).
* :class:`ObjectEnergy` - SPN paper section 4.1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol

import numpy as np
import torch

from spn.localize import as_map_batch, check_size, component_boxes, label_components, mask_box, upsample_maps

Norm = Literal["euclidean", "linf", "released"]

# --------------------------------------------------------------------------------------
# Input checking
# --------------------------------------------------------------------------------------


def to_numpy(value) -> np.ndarray:
    """A tensor (detached, on the CPU) or array-like as a NumPy array."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def as_boxes(boxes, name: str = "boxes") -> np.ndarray:
    """Return boxes as a float64 ``(m, 4)`` array of valid pixel-inclusive boxes.

    A single box ``(4,)`` becomes ``(1, 4)``; an empty list becomes ``(0, 4)``.

    Raises:
        ValueError: wrong shape, NaN / infinite coordinates, ``x1 < x0`` or ``y1 < y0``.
    """
    array = to_numpy(boxes)
    if array.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if array.ndim == 1 and array.shape[0] == 4:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{name} must have shape (m, 4) as (x0, y0, x1, y1) rows, got shape {array.shape}")
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite coordinates")
    reversed_rows = np.flatnonzero((array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1]))
    if reversed_rows.size:
        row = int(reversed_rows[0])
        raise ValueError(
            f"{name}[{row}] = {array[row].tolist()} is not a valid (x0, y0, x1, y1) box: "
            "boxes need x1 >= x0 and y1 >= y0 (pixel-inclusive, x = column, y = row)"
        )
    return array


def as_box_list(boxes, batch_size: int, name: str = "gt_boxes") -> list[np.ndarray]:
    """Per-image boxes as a list of ``batch_size`` float64 ``(m_i, 4)`` arrays.

    Accepts a sequence of per-image boxes, a ``(B, 4)`` array (one box per image) or a
    ``(B, m, 4)`` array.
    """
    if isinstance(boxes, (torch.Tensor, np.ndarray)):
        array = to_numpy(boxes)
        if array.ndim == 2 and array.shape[1] == 4:
            boxes = [row[None] for row in array]
        elif array.ndim == 3 and array.shape[2] == 4:
            boxes = list(array)
        elif array.size == 0 and batch_size == 0:
            boxes = []
        else:
            raise ValueError(
                f"{name} must be a list of B arrays (m_i, 4), a (B, 4) or a (B, m, 4) array; got shape {array.shape}"
            )
    if not isinstance(boxes, Sequence):
        raise TypeError(f"{name} must be a list of B arrays of shape (m_i, 4), got {type(boxes).__name__}")
    if len(boxes) != batch_size:
        raise ValueError(f"{name} must hold one entry per image: expected {batch_size}, got {len(boxes)}")
    return [as_boxes(entry, f"{name}[{index}]") for index, entry in enumerate(boxes)]


def box_batch_size(boxes, name: str = "pred_boxes") -> int:
    """Number of images in per-image boxes: ``len`` of a list, first axis of an array."""
    if isinstance(boxes, (torch.Tensor, np.ndarray)):
        return int(boxes.shape[0]) if boxes.ndim >= 1 else 0
    if not isinstance(boxes, Sequence):
        raise TypeError(f"{name} must be a list of B arrays of shape (k_i, 4), got {type(boxes).__name__}")
    return len(boxes)


def label_batch_size(labels, name: str) -> int:
    """Length of a 1-D label vector; raise ``ValueError`` for any other shape."""
    array = to_numpy(labels)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector with one class per sample, got shape {array.shape}")
    return int(array.shape[0])


def as_labels(labels, batch_size: int, name: str) -> np.ndarray:
    """Return one integer class label per sample as an int64 ``(B,)`` array."""
    array = to_numpy(labels)
    if array.ndim != 1 or array.shape[0] != batch_size:
        raise ValueError(f"{name} must have shape ({batch_size},), one class per sample; got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not (np.issubdtype(array.dtype, np.floating) and np.all(array == np.round(array))):
            raise ValueError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    return array.astype(np.int64)


def as_label_list(labels, box_list: list[np.ndarray], name: str = "gt_labels") -> list[np.ndarray]:
    """Per-image box labels as a list of int64 ``(m_i,)`` arrays matching ``box_list``."""
    if isinstance(labels, (torch.Tensor, np.ndarray)):
        array = to_numpy(labels)
        labels = [row.reshape(-1) for row in (array[:, None] if array.ndim == 1 else array)]
    if not isinstance(labels, Sequence) or len(labels) != len(box_list):
        count = len(labels) if isinstance(labels, Sequence) else type(labels).__name__
        raise ValueError(f"{name} must be a list of {len(box_list)} arrays (one label per box); got {count}")
    result = []
    for index, (entry, boxes) in enumerate(zip(labels, box_list)):
        result.append(as_labels(to_numpy(entry).reshape(-1), len(boxes), f"{name}[{index}]"))
    return result


def as_points(points, name: str = "points") -> np.ndarray:
    """Return points as a finite float64 ``(B, 2)`` array of ``(x, y)``."""
    array = to_numpy(points)
    if array.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name} must have shape (B, 2) as (x, y) rows, got shape {array.shape}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite coordinates")
    return array


def check_fraction(value: float, name: str) -> float:
    """Return ``value`` as a float in ``[0, 1]``; raise ``ValueError`` otherwise."""
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def check_max_boxes(max_boxes: int | None) -> int | None:
    """Return ``max_boxes`` as a positive int, or None (every box); raise ``ValueError`` otherwise."""
    if max_boxes is None:
        return None
    if isinstance(max_boxes, bool) or not isinstance(max_boxes, (int, np.integer)) or max_boxes < 1:
        raise ValueError(f"max_boxes must be a positive integer or None (every box), got {max_boxes!r}")
    return int(max_boxes)


def check_evaluated(count: int, what: str) -> None:
    """Raise ``ValueError`` when a metric is computed with nothing evaluated (``count == 0``)."""
    if count == 0:
        raise ValueError(
            f"no images were evaluated ({what}): there is no score to compute; "
            "check that the data loader or list of batches is not empty"
        )


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------


def box_iou(boxes_a, boxes_b) -> np.ndarray:
    """IoU of every pair of pixel-inclusive boxes, with the ``+1`` area convention.

    ``intersection = max(0, min(x1) - max(x0) + 1) * max(0, min(y1) - max(y0) + 1)`` and
    ``area = (x1 - x0 + 1) * (y1 - y0 + 1)``, exactly as wsolevaluation's
    ``calculate_multiple_iou`` and the released SPN code's ``ious``; a pair whose union is
    not positive gets IoU 0 (wsolevaluation's rule; it cannot happen with valid boxes).

    Args:
        boxes_a: ``(n, 4)`` boxes.
        boxes_b: ``(m, 4)`` boxes.

    Returns:
        float64 ``(n, m)`` array.

    Example:
        >>> box_iou([[0, 0, 9, 9]], [[0, 0, 9, 4]])  # 50 of 100 pixels
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
    return float(box_iou(pred_boxes, gt_boxes).max())


def point_box_distance(points, boxes, norm: Norm = "euclidean") -> np.ndarray:
    """Distance from each point to the nearest point of each box (0 inside the box).

    With ``dx = max(x0 - x, 0, x - x1)`` and ``dy = max(y0 - y, 0, y - y1)`` (boxes as the
    closed rectangles ``[x0, x1] x [y0, y1]`` of pixel centres):
    ``"euclidean"`` gives ``sqrt(dx^2 + dy^2)``; ``"linf"`` (alias ``"released"``) gives
    ``max(dx, dy)``.

    Returns:
        float64 ``(n, m)`` array for ``n`` points and ``m`` boxes.

    Example:
        >>> point_box_distance([[31, 31]], [[10, 10, 20, 20]], "linf")
        array([[11.]])
    """
    norm = check_norm(norm)
    p = as_points(points)[:, None, :]
    b = as_boxes(boxes)[None, :, :]
    dx = np.maximum(np.maximum(b[..., 0] - p[..., 0], 0.0), p[..., 0] - b[..., 2])
    dy = np.maximum(np.maximum(b[..., 1] - p[..., 1], 0.0), p[..., 1] - b[..., 3])
    if norm == "linf":
        return np.maximum(dx, dy)
    return np.sqrt(dx * dx + dy * dy)


def check_norm(norm: str) -> Literal["euclidean", "linf"]:
    """Map ``"released"`` to ``"linf"``; raise ``ValueError`` on unknown names."""
    if norm == "released":
        return "linf"
    if norm not in ("euclidean", "linf"):
        raise ValueError(f"norm must be 'euclidean', 'linf' or 'released', got {norm!r}")
    return norm  # type: ignore[return-value]


def boxes_of_class(boxes: np.ndarray, labels: np.ndarray | None, cls: int) -> np.ndarray:
    """The rows of ``boxes`` whose label is ``cls`` (all of them when ``labels`` is None)."""
    return boxes if labels is None else boxes[labels == cls]


# --------------------------------------------------------------------------------------
# Per-class bookkeeping
# --------------------------------------------------------------------------------------


class ClassTally:
    """Counts of correct / total samples per class; the mean over classes of the ratios."""

    def __init__(self) -> None:
        self.correct: dict[int, int] = {}
        self.total: dict[int, int] = {}

    def add(self, classes: np.ndarray, is_correct: np.ndarray) -> None:
        """Count one sample of class ``classes[i]``, correct when ``is_correct[i]``."""
        for cls, ok in zip(classes.tolist(), np.asarray(is_correct, dtype=bool).tolist()):
            self.total[cls] = self.total.get(cls, 0) + 1
            self.correct[cls] = self.correct.get(cls, 0) + int(ok)

    def per_class(self) -> dict[int, float]:
        """``correct / total`` for every class seen, sorted by class."""
        return {cls: self.correct[cls] / self.total[cls] for cls in sorted(self.total)}

    def class_mean(self) -> float:
        """Mean over the classes seen of their accuracy; 0.0 when nothing was seen."""
        per_class = self.per_class()
        return float(np.mean(list(per_class.values()))) if per_class else 0.0


# --------------------------------------------------------------------------------------
# Pointing game
# --------------------------------------------------------------------------------------


class PointingGame:
    """Pointing game accuracy (Zhang et al., ECCV 2016; SPN paper Table 2).

    One query is an (image, cued class) pair with one predicted point (the maximum of the
    class's map, in image coordinates: see :func:`spn.localize.peak_points`). The query is a
    hit when the point lies within ``tolerance`` pixels of a ground-truth box of the cued
    class, otherwise a miss. Accuracy per class is ``hits / (hits + misses)``; the result
    is the mean over the classes that have at least one query.

    * ``norm="euclidean"`` (the paper): the Euclidean distance from the point to the
      nearest point of the box is ``<= tolerance``.
    * ``norm="linf"`` or ``"released"`` (the released SPN code, ``pointing`` in
      ``demo/experiment/util.py``): each box is enlarged by ``tolerance`` on every side and
      the point must lie inside, i.e. an L-infinity distance ``<= tolerance``. It accepts
      more points near box corners.

    Pixel convention: points are pixel centres (``spn.localize``: pixel ``(x, y)`` has its
    centre at ``(x, y)``), and a box ``(x0, y0, x1, y1)`` is the closed rectangle
    ``[x0, x1] x [y0, y1]`` through the centres of its outermost pixels, *not* the area
    ``[x0 - 0.5, x1 + 0.5] x [y0 - 0.5, y1 + 0.5]`` that its pixels cover. Distances are
    measured from that rectangle: a point on the outer edge of the box's last column
    (``x = x1 + 0.5``, ``y0 <= y <= y1``) is 0.5 away, and with ``tolerance=0`` only points
    in ``[x0, x1] x [y0, y1]`` hit. This is the released code's rule (it compares integer
    argmax pixels with the integer box coordinates, ``x0 - tol <= x <= x1 + tol``); neither
    the SPN paper nor Zhang et al. define the distance below one pixel.

    A query whose cued class has no box in its image counts as a miss.

    Labels: ``cue_labels`` holds one class per *query*; ``gt_labels`` one class per
    ground-truth *box* (``B`` arrays ``(m_i,)``), unlike :class:`LocalizationAccuracy`,
    whose ``gt_labels`` is one class per image.

    Args:
        tolerance: pixels (default 15).
        norm: ``"euclidean"``, ``"linf"`` or ``"released"``.

    Example:
        >>> game = PointingGame()
        >>> game.update([[31.0, 31.0]], [0], [np.array([[10, 10, 20, 20]])])
        >>> game.compute()["accuracy"]  # corner distance sqrt(11^2 + 11^2) = 15.6 > 15
        0.0
    """

    def __init__(self, tolerance: float = 15.0, norm: Norm = "euclidean") -> None:
        self.tolerance = float(tolerance)
        if not (np.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
        self.norm = check_norm(norm)
        self.reset()

    def reset(self) -> None:
        """Forget every query seen so far."""
        self.tally = ClassTally()

    def update(self, points, cue_labels, gt_boxes, gt_labels=None) -> None:
        """Score a batch of queries. Every argument is checked before anything is counted,
        so an update that raises leaves the metric as it was.

        Args:
            points: ``(B, 2)`` predicted ``(x, y)`` points in image coordinates.
            cue_labels: ``(B,)`` class of each query.
            gt_boxes: ``B`` arrays ``(m_i, 4)``: the ground-truth boxes of each query's image.
            gt_labels: ``B`` arrays ``(m_i,)``, the class of each *box*, or None when every
                box is of the cued class.
        """
        point_array = as_points(points)
        batch_size = len(point_array)
        classes = as_labels(cue_labels, batch_size, "cue_labels")
        box_list = as_box_list(gt_boxes, batch_size)
        label_list = None if gt_labels is None else as_label_list(gt_labels, box_list)
        hits = np.zeros(batch_size, dtype=bool)
        for index in range(batch_size):
            labels = None if label_list is None else label_list[index]
            boxes = boxes_of_class(box_list[index], labels, int(classes[index]))
            hits[index] = self.is_hit(point_array[index], boxes)
        self.tally.add(classes, hits)

    def is_hit(self, point: np.ndarray, boxes: np.ndarray) -> bool:
        """Whether ``point`` lies within ``tolerance`` of one of ``boxes``."""
        if len(boxes) == 0:
            return False
        distance = point_box_distance(point[None], boxes, self.norm)
        return bool((distance <= self.tolerance).any())

    def compute(self) -> dict[str, Any]:
        """Returns ``{"accuracy": mean over classes, "per_class": {class: accuracy},
        "hits": int, "queries": int}``.

        Raises:
            ValueError: no query was added (e.g. an empty data loader).
        """
        queries = int(sum(self.tally.total.values()))
        check_evaluated(queries, "no pointing-game query")
        return {
            "accuracy": self.tally.class_mean(),
            "per_class": self.tally.per_class(),
            "hits": int(sum(self.tally.correct.values())),
            "queries": queries,
        }


def pointing_game(
    points, cue_labels, gt_boxes, gt_labels=None, *, tolerance: float = 15.0, norm: Norm = "euclidean"
) -> dict[str, Any]:
    """One-shot :class:`PointingGame` over one batch of queries (same arguments, same result).

    Example:
        >>> pointing_game([[31, 31]], [0], [[[10, 10, 20, 20]]], norm="released")["accuracy"]
        1.0
    """
    metric = PointingGame(tolerance=tolerance, norm=norm)
    metric.update(points, cue_labels, gt_boxes, gt_labels)
    return metric.compute()


# --------------------------------------------------------------------------------------
# CorLoc
# --------------------------------------------------------------------------------------


class CorLoc:
    """Correct localisation (CorLoc; Deselaers et al., IJCV 2012), per class then averaged.

    One query is an (image, class present in the image) pair with the boxes predicted for
    that class, best first (:func:`spn.localize.boxes_from_maps` sorts them by score). Only
    the first ``max_boxes`` of them count: with the default 1, the query's single best box,
    as in the SPN paper (section 4.3) and the field. The query is correct when one counted
    box has IoU ``>= iou_threshold`` (0.5) with a ground-truth box of that class
    (pixel-inclusive IoU, :func:`box_iou`). CorLoc of a class is the fraction of its queries
    that are correct; the result is the mean over classes with at least one query. A query
    without any predicted box, or whose class has no box in the image, is incorrect.

    ``max_boxes=None`` counts every predicted box ("any of k"), as ``corloc`` in the
    released SPN code does with its one box per connected component; it rewards predicting
    many boxes, so it is not comparable with single-box CorLoc.

    Labels: ``cue_labels`` holds one class per *query*; ``gt_labels`` one class per
    ground-truth *box* (``B`` arrays ``(m_i,)``), unlike :class:`LocalizationAccuracy`,
    whose ``gt_labels`` is one class per image.

    Args:
        iou_threshold: IoU needed (default 0.5).
        max_boxes: how many predicted boxes of each query count (default 1), or None for all.

    Example:
        >>> corloc([[[0, 0, 9, 9]]], [3], [[[0, 0, 9, 4]]])["corloc"]  # IoU 50/100
        1.0
        >>> two_boxes = [[[20, 20, 29, 29], [0, 0, 9, 9]]]  # the first (best) box misses
        >>> corloc(two_boxes, [3], [[[0, 0, 9, 9]]])["corloc"]
        0.0
        >>> corloc(two_boxes, [3], [[[0, 0, 9, 9]]], max_boxes=None)["corloc"]  # any box
        1.0
    """

    def __init__(self, iou_threshold: float = 0.5, max_boxes: int | None = 1) -> None:
        self.iou_threshold = check_fraction(iou_threshold, "iou_threshold")
        self.max_boxes = check_max_boxes(max_boxes)
        self.reset()

    def reset(self) -> None:
        """Forget every query seen so far."""
        self.tally = ClassTally()

    def update(self, pred_boxes, cue_labels, gt_boxes, gt_labels=None) -> None:
        """Score a batch of queries. Every argument is checked before anything is counted,
        so an update that raises leaves the metric as it was.

        Args:
            pred_boxes: ``B`` arrays ``(k_i, 4)`` (or a ``(B, 4)`` array) of predicted
                boxes, best first.
            cue_labels: ``(B,)`` class of each query.
            gt_boxes: ``B`` arrays ``(m_i, 4)``.
            gt_labels: ``B`` arrays ``(m_i,)``, the class of each *box*, or None when every
                box is of the cued class.
        """
        batch_size = label_batch_size(cue_labels, "cue_labels")
        classes = as_labels(cue_labels, batch_size, "cue_labels")
        pred_list = as_box_list(pred_boxes, batch_size, "pred_boxes")
        box_list = as_box_list(gt_boxes, batch_size)
        label_list = None if gt_labels is None else as_label_list(gt_labels, box_list)
        correct = np.zeros(batch_size, dtype=bool)
        for index in range(batch_size):
            labels = None if label_list is None else label_list[index]
            boxes = boxes_of_class(box_list[index], labels, int(classes[index]))
            counted = pred_list[index][: self.max_boxes]
            correct[index] = best_iou(counted, boxes) >= self.iou_threshold
        self.tally.add(classes, correct)

    def compute(self) -> dict[str, Any]:
        """Returns ``{"corloc": mean over classes, "per_class": {class: CorLoc},
        "correct": int, "queries": int}``.

        Raises:
            ValueError: no query was added (e.g. an empty data loader).
        """
        queries = int(sum(self.tally.total.values()))
        check_evaluated(queries, "no CorLoc query")
        return {
            "corloc": self.tally.class_mean(),
            "per_class": self.tally.per_class(),
            "correct": int(sum(self.tally.correct.values())),
            "queries": queries,
        }


def corloc(
    pred_boxes, cue_labels, gt_boxes, gt_labels=None, *, iou_threshold: float = 0.5, max_boxes: int | None = 1
) -> dict[str, Any]:
    """One-shot :class:`CorLoc` over one batch of queries (same arguments, same result)."""
    metric = CorLoc(iou_threshold=iou_threshold, max_boxes=max_boxes)
    metric.update(pred_boxes, cue_labels, gt_boxes, gt_labels)
    return metric.compute()


# --------------------------------------------------------------------------------------
# MaxBoxAcc / MaxBoxAccV2 (wsolevaluation)
# --------------------------------------------------------------------------------------


def normalize_scoremap(scoremap: np.ndarray) -> np.ndarray:
    """Min-max normalise one finite ``(H, W)`` map to ``[0, 1]`` (wsolevaluation's rule).

    ``(m - min(m)) / max(m - min(m))``, as wsolevaluation's ``normalize_scoremap``
    (``inference.py``). That function works in place, so in the map's own dtype; so does
    this one: a float32 map is normalised in float32, a float64 map in float64, anything
    else in float64. (The rounding differs: a float32 map normalised in float64 quantises a
    few pixels in a million one step differently.) A constant map becomes all zeros. A
    finite map whose range ``max - min`` overflows (values near ``+-1.8e308`` in float64,
    ``+-3.4e38`` in float32) is halved first, which is exact, so it normalises correctly
    instead of turning into NaN. (wsolevaluation also turns a NaN map into zeros; here NaN
    maps are rejected earlier.)

    Example:
        >>> normalize_scoremap(np.array([[2.0, 4.0, 3.0]]))
        array([[0. , 1. , 0.5]])
        >>> normalize_scoremap(np.array([[-1e308, 0.0, 1e308]]))  # range 2e308 > float64 max
        array([[0. , 0.5, 1. ]])
    """
    array = np.asarray(scoremap)
    if array.dtype != np.float32:
        array = array.astype(np.float64, copy=False)
    low, high = array.min(), array.max()
    if low == high:
        return np.zeros_like(array)
    with np.errstate(over="ignore"):
        overflows = not np.isfinite(high - low)
    if overflows:
        half = array.dtype.type(0.5)
        array, low = array * half, low * half
    shifted = array - low
    return shifted / shifted.max()


def quantize_scoremap(normalized: np.ndarray) -> np.ndarray:
    """``uint8(255 * m)`` of a ``[0, 1]`` map, truncating (``astype``), as wsolevaluation.

    The product is computed in the map's dtype (float32 stays float32), as wsolevaluation.

    Example:
        >>> quantize_scoremap(np.array([[0.0, 0.5, 1.0]]))
        array([[  0, 127, 255]], dtype=uint8)
    """
    return (normalized * 255).astype(np.uint8)


def threshold_cuts(thresholds: np.ndarray, quantized_max: int) -> np.ndarray:
    """Integer cut of each threshold: ``int(threshold * max(uint8 map))`` (truncation).

    A pixel is foreground at that threshold when its uint8 value is strictly greater than
    the cut (``cv2.threshold`` with ``THRESH_BINARY``).
    """
    return (np.asarray(thresholds, dtype=np.float64) * float(quantized_max)).astype(np.int64)


def canonical_cuts(quantized: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Replace each cut by the smallest cut with the same foreground ``quantized > cut``.

    The foreground only changes when the cut passes a value present in the uint8 map (at
    most 256 of them), so a cut and the largest present value ``<= cut`` (or -1 when there
    is none) give the same foreground. Thresholds of a fine step share far fewer
    foregrounds than they have cuts; boxes are computed once per foreground.

    Example:
        >>> canonical_cuts(np.array([[0, 3, 3, 200]], dtype=np.uint8), np.array([0, 2, 3, 150, 250]))
        array([  0,   0,   3,   3, 200])
    """
    present = np.flatnonzero(np.bincount(quantized.ravel(), minlength=256))
    below = np.concatenate([[-1], present])
    return below[np.searchsorted(below, np.asarray(cuts), side="right") - 1]


def euler_number_8(mask: np.ndarray) -> int:
    """Euler number of a 2-D mask with 8-connected foreground and 4-connected background.

    It equals (8-connected components) - (holes), so it tells whether a mask has holes
    without labelling the background. Gray's bit-quad formula: over every 2 x 2 window of
    the zero-padded mask, ``E = (Q1 - Q3 - 2 QD) / 4`` with Q1 / Q3 the windows holding one /
    three foreground pixels and QD those holding two diagonal ones.
    """
    padded = np.pad(mask, 1).astype(np.int8)
    top_left, top_right = padded[:-1, :-1], padded[:-1, 1:]
    bottom_left, bottom_right = padded[1:, :-1], padded[1:, 1:]
    window_sum = top_left + top_right + bottom_left + bottom_right
    one = np.count_nonzero(window_sum == 1)
    three = np.count_nonzero(window_sum == 3)
    diagonal = np.count_nonzero((window_sum == 2) & (top_left == bottom_right))
    return (one - three - 2 * diagonal) // 4


def hole_labels(mask: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """Holes of a foreground mask: 4-connected background regions not touching the border.

    (OpenCV, like Suzuki and Abe's border following, pairs 8-connected foreground with
    4-connected background.)

    Returns:
        ``(background_labels, count, is_hole)``: the ``(H, W)`` labels of the 4-connected
        background regions, their count, and a boolean ``(count + 1,)`` flag per label
        (label 0, the foreground, is never a hole).
    """
    background_labels, count = label_components(~mask, connectivity=4)
    border_labels = np.concatenate(
        [background_labels[0], background_labels[-1], background_labels[:, 0], background_labels[:, -1]]
    )
    is_hole = np.ones(count + 1, dtype=bool)
    is_hole[0] = False
    is_hole[border_labels] = False
    return background_labels, count, is_hole


def to_wsol_boxes(extents: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixel extents ``(c0, r0, c1, r1)`` to wsolevaluation boxes.

    ``cv2.boundingRect`` gives ``(x, y, w, h)`` with ``w = c1 - c0 + 1``; wsolevaluation then
    takes ``(x, y, x + w, y + h)`` and clips ``x1`` to ``W - 1`` and ``y1`` to ``H - 1``.
    So the right and bottom edges sit one pixel past the region (under the ``+1`` IoU),
    except on the right / bottom border of the map.
    """
    boxes = extents.astype(np.int64).copy()
    boxes[:, 2] = np.minimum(boxes[:, 2] + 1, width - 1)
    boxes[:, 3] = np.minimum(boxes[:, 3] + 1, height - 1)
    return boxes


def last_argmax(values: np.ndarray) -> int:
    """Index of the last maximum of a non-empty 1-D array."""
    return len(values) - 1 - int(np.argmax(values[::-1]))


def largest_region_extent(mask: np.ndarray) -> np.ndarray:
    """Pixel extent ``(1, 4)`` of the largest region of a non-empty mask.

    A region is an 8-connected component with its holes filled (the area inside its outer
    contour); size is its pixel count. Equal sizes go to the *last* region in row-major
    order of first pixels, as in wsolevaluation: OpenCV lists contours in reverse scan
    order and Python's ``max`` keeps the first maximum of that list.
    """
    labels, count = label_components(mask, connectivity=8)
    if count == 1:
        return mask_box(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    extents = component_boxes(labels, count)
    if euler_number_8(mask) != count:
        # Some holes. Filling adds pixels only inside a component's box, so a component can
        # end up largest only if its box holds as many pixels as the largest one has now;
        # when that component is alone in this, filling cannot change the answer.
        box_areas = (extents[:, 2] - extents[:, 0] + 1) * (extents[:, 3] - extents[:, 1] + 1)
        if np.count_nonzero(box_areas >= sizes.max()) > 1:
            background_labels, _, is_hole = hole_labels(mask)
            labels, count = label_components(mask | is_hole[background_labels], connectivity=8)
            sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
            extents = component_boxes(labels, count)
    largest = last_argmax(sizes)
    return extents[largest : largest + 1]


def all_region_extents(mask: np.ndarray, include_holes: bool) -> np.ndarray:
    """Pixel extents of every 8-connected component and (optionally) of every hole border.

    The border of a hole (what OpenCV's ``RETR_TREE`` returns as an inner contour) runs
    over the foreground pixels around the hole, so its extent is the hole's extent grown
    by one pixel on each side.
    """
    labels, count = label_components(mask, connectivity=8)
    extents = mask_box(mask) if count == 1 else component_boxes(labels, count)
    if include_holes and euler_number_8(mask) != count:
        background_labels, background_count, is_hole = hole_labels(mask)
        hole_extents = component_boxes(background_labels, background_count)[is_hole[1:]]
        extents = np.concatenate([extents, hole_extents + np.array([-1, -1, 1, 1])], axis=0)
    return extents


def wsol_boxes_at_cut(
    quantized: np.ndarray, cut: int, multi_contour: bool = False, include_holes: bool = True
) -> np.ndarray:
    """wsolevaluation's boxes of a uint8 map at one integer cut (foreground ``> cut``).

    * no foreground pixel: the single box ``[0, 0, 0, 0]`` (wsolevaluation's rule; under
      the ``+1`` IoU it is the top-left pixel, not an empty box);
    * ``multi_contour=False`` (MaxBoxAcc): the box of the largest region;
    * ``multi_contour=True`` (MaxBoxAccV2): a box per region, plus a box per hole border
      when ``include_holes`` (as OpenCV's ``RETR_TREE``).

    Returns:
        int64 ``(k, 4)`` boxes ``(x0, y0, x1, y1)`` in wsolevaluation's convention
        (see :func:`to_wsol_boxes`).
    """
    mask = quantized > cut
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return np.zeros((1, 4), dtype=np.int64)
    cols = np.flatnonzero(mask.any(axis=0))
    # Work inside the foreground's bounding box: same components, same holes (background
    # on the crop's edge touches the outside), less to label.
    crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    if multi_contour:
        extents = all_region_extents(crop, include_holes)
    else:
        extents = largest_region_extent(crop)
    extents = extents + np.array([cols[0], rows[0], cols[0], rows[0]])
    height, width = mask.shape
    return to_wsol_boxes(extents, height, width)


def wsol_boxes(
    scoremap, thresholds: Sequence[float], multi_contour: bool = False, include_holes: bool = True
) -> list[np.ndarray]:
    """wsolevaluation's estimated boxes of one map at each threshold.

    The map is min-max normalised (:func:`normalize_scoremap`, in float32 for a float32
    map), quantised to uint8 (:func:`quantize_scoremap`), and at threshold ``t`` the
    foreground is ``uint8 > int(t * max(uint8))``; boxes as :func:`wsol_boxes_at_cut`.

    Args:
        scoremap: one ``(H, W)`` map (tensor or array), finite.
        thresholds: values in ``[0, 1)``, e.g. ``np.arange(0, 1, 0.001)``.
        multi_contour: every region (V2) instead of the largest one.
        include_holes: with ``multi_contour``, also the boxes of hole borders.

    Returns:
        One int64 ``(k_t, 4)`` array per threshold.

    Example:
        >>> m = np.zeros((4, 6)); m[1:3, 1:3] = 1.0
        >>> wsol_boxes(m, [0.0])[0].tolist()  # region columns 1..2, rows 1..2
        [[1, 1, 3, 3]]
    """
    array = as_map_batch(to_numpy(scoremap)[None], "scoremap", keep_float32=True)[0]
    quantized = quantize_scoremap(normalize_scoremap(array))
    cuts = canonical_cuts(quantized, threshold_cuts(np.asarray(thresholds), int(quantized.max())))
    cache: dict[int, np.ndarray] = {}
    for cut in cuts.tolist():
        if cut not in cache:
            cache[cut] = wsol_boxes_at_cut(quantized, cut, multi_contour, include_holes)
    return [cache[cut] for cut in cuts.tolist()]


class BoxAccuracy:
    """MaxBoxAcc and MaxBoxAccV2 (Choe et al., CVPR 2020; clovaai/wsolevaluation).

    For every image, the map is min-max normalised to ``[0, 1]`` (a constant map becomes
    zeros; float32 maps in float32, as wsolevaluation), quantised to uint8
    (``uint8(255 * m)``, truncation), and for every threshold ``t`` of
    ``np.arange(0, 1, interval)`` the foreground is ``uint8 > int(t * max(uint8))``.
    The boxes at ``t`` are those of the largest foreground region (MaxBoxAcc) or of every
    region (V2); with no foreground the box is ``[0, 0, 0, 0]``. The image is correct at
    ``t`` and IoU threshold ``delta`` when the best IoU over its boxes x its ground-truth
    boxes is ``>= delta``. ``BoxAcc(t, delta)`` is the fraction of correct images;
    ``MaxBoxAcc = max_t BoxAcc(t, 0.5)``; ``MaxBoxAccV2`` is the mean over
    ``delta in {0.3, 0.5, 0.7}`` of ``max_t BoxAcc(t, delta)`` (each delta its own best t).

    Defaults: this class defaults to **version 2** (MaxBoxAccV2, the metric wsolevaluation
    recommends), whereas the one-shot :func:`max_box_acc` is **version 1** (MaxBoxAcc) and
    :func:`max_box_acc_v2` version 2. The threshold step ``interval`` defaults to 0.001, the
    default of wsolevaluation's ``config.py`` (its train + evaluate runs) and of its
    ``evaluate_wsol``; its ``evaluation.py`` command line uses 0.01. A coarser step can
    only skip thresholds, so it can only lower the result. Thresholds whose cuts give the
    same foreground share one computation (a uint8 map has at most 255 foregrounds), so
    0.001 costs about 2 to 2.5 times what 0.01 does, not 10 times (``docs/metrics.md``).

    Box convention: a region with pixel extent columns ``c0..c1`` and rows ``r0..r1`` gets
    the box ``(c0, r0, min(c1 + 1, W - 1), min(r1 + 1, H - 1))`` (``cv2.boundingRect`` then
    wsolevaluation's clipping); IoU is pixel-inclusive (:func:`box_iou`). Ground-truth boxes
    are used as given, in the map's pixel frame: maps must be at the resolution of the
    boxes (wsolevaluation resizes maps to 224 x 224 with bicubic interpolation and rescales
    the boxes; use :func:`spn.localize.upsample_maps`).

    Differences from wsolevaluation's OpenCV contours (see ``docs/metrics.md``): regions are
    ``scipy.ndimage.label`` 8-connected components, which are exactly the regions bounded by
    OpenCV's outer contours, so all boxes agree; but (1) for MaxBoxAcc the largest region is
    the one with most pixels (holes filled), not the largest ``cv2.contourArea`` (polygon
    through boundary pixel centres, 0 for one-pixel-wide regions); equal sizes go to the
    last region in row-major order of first pixels, as OpenCV's contour order (reverse scan
    order) with Python's ``max`` gives; (2) V2 adds hole boxes (OpenCV's inner contours)
    when ``include_holes`` is True (the default) to match ``RETR_TREE``. NaN maps raise
    ``ValueError`` (wsolevaluation zeroes them).

    Args:
        version: 1 (MaxBoxAcc: largest region, delta 0.5) or 2 (MaxBoxAccV2: every region,
            deltas 0.3, 0.5, 0.7).
        interval: threshold step; thresholds are ``np.arange(0, 1, interval)`` (default
            0.001, wsolevaluation's ``config.py``).
        iou_thresholds: override the deltas.
        multi_contour: override the region rule (True: every region).
        include_holes: with every region, also box the holes' borders (OpenCV RETR_TREE).

    Example:
        >>> metric = BoxAccuracy(version=2)
        >>> maps = np.zeros((1, 10, 10)); maps[0, 2:5, 2:5] = 1.0
        >>> metric.update(maps, [np.array([[2, 2, 4, 4]])])  # predicted [2, 2, 5, 5]: IoU 9/16
        >>> metric.compute()["per_iou"]
        {0.3: 1.0, 0.5: 1.0, 0.7: 0.0}
    """

    def __init__(
        self,
        version: int = 2,
        *,
        interval: float = 0.001,
        iou_thresholds: Sequence[float] | None = None,
        multi_contour: bool | None = None,
        include_holes: bool = True,
    ) -> None:
        if version not in (1, 2):
            raise ValueError(f"version must be 1 (MaxBoxAcc) or 2 (MaxBoxAccV2), got {version!r}")
        interval = float(interval)
        if not 0 < interval <= 1:
            raise ValueError(f"interval must lie in (0, 1], got {interval}")
        default_deltas = (0.5,) if version == 1 else (0.3, 0.5, 0.7)
        deltas = default_deltas if iou_thresholds is None else tuple(iou_thresholds)
        if len(deltas) == 0:
            raise ValueError("iou_thresholds must not be empty")
        self.iou_thresholds = tuple(check_fraction(delta, "iou_thresholds") for delta in deltas)
        self.multi_contour = (version == 2) if multi_contour is None else bool(multi_contour)
        self.include_holes = bool(include_holes)
        self.thresholds = np.arange(0, 1, interval)
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        self.num_correct = np.zeros((len(self.iou_thresholds), len(self.thresholds)), dtype=np.int64)
        self.num_images = 0

    def update(self, maps, gt_boxes) -> None:
        """Add a batch of maps ``(B, H, W)`` and their ground-truth boxes (``B`` arrays
        ``(m_i, 4)``, in the maps' pixel frame). An image without a box is never correct.
        Every argument is checked before anything is counted, so an update that raises
        leaves the metric as it was."""
        array = as_map_batch(maps, keep_float32=True)
        box_list = as_box_list(gt_boxes, len(array))
        deltas = np.asarray(self.iou_thresholds)[:, None]
        num_correct = np.zeros_like(self.num_correct)
        for scoremap, boxes in zip(array, box_list):
            num_correct += self.best_ious(scoremap, boxes)[None, :] >= deltas
        self.num_correct += num_correct
        self.num_images += len(array)

    def best_ious(self, scoremap: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
        """Best IoU of the map's boxes with ``gt_boxes`` at every threshold, ``(T,)``."""
        quantized = quantize_scoremap(normalize_scoremap(scoremap))
        if len(gt_boxes) == 0:
            return np.zeros(len(self.thresholds), dtype=np.float64)
        cuts = canonical_cuts(quantized, threshold_cuts(self.thresholds, int(quantized.max())))
        distinct, inverse = np.unique(cuts, return_inverse=True)
        boxes = [wsol_boxes_at_cut(quantized, cut, self.multi_contour, self.include_holes) for cut in distinct.tolist()]
        starts = np.cumsum([0] + [len(entry) for entry in boxes[:-1]])
        ious = box_iou(np.concatenate(boxes), gt_boxes).max(axis=1)
        return np.maximum.reduceat(ious, starts)[inverse.reshape(-1)]

    def compute(self) -> dict[str, Any]:
        """Returns a dict:

        * ``"max_box_acc"``: mean over the IoU thresholds of ``max_t BoxAcc`` (MaxBoxAcc
          for version 1, MaxBoxAccV2 for version 2), a fraction;
        * ``"per_iou"``: ``{delta: max_t BoxAcc(t, delta)}``;
        * ``"best_threshold"``: ``{delta: the first t reaching the maximum}``;
        * ``"box_acc"``: ``{delta: [BoxAcc(t, delta) for t in thresholds]}``;
        * ``"thresholds"``: the map thresholds; ``"images"``: the image count.

        Raises:
            ValueError: no image was added (e.g. an empty data loader).
        """
        check_evaluated(self.num_images, "BoxAccuracy saw no map")
        accuracies = self.num_correct / self.num_images
        best = accuracies.argmax(axis=1)
        per_iou = {delta: float(accuracies[i].max()) for i, delta in enumerate(self.iou_thresholds)}
        return {
            "max_box_acc": float(np.mean(list(per_iou.values()))),
            "per_iou": per_iou,
            "best_threshold": {delta: float(self.thresholds[best[i]]) for i, delta in enumerate(self.iou_thresholds)},
            "box_acc": {delta: accuracies[i].tolist() for i, delta in enumerate(self.iou_thresholds)},
            "thresholds": self.thresholds.tolist(),
            "images": int(self.num_images),
        }


def max_box_acc(maps, gt_boxes, *, interval: float = 0.001, iou_threshold: float = 0.5) -> float:
    """MaxBoxAcc (**version 1**: largest region, one IoU threshold) of one batch, a fraction.

    Note that :class:`BoxAccuracy` defaults to version 2; this function is version 1, and
    :func:`max_box_acc_v2` version 2.

    Example:
        >>> maps = np.zeros((1, 10, 10)); maps[0, 2:5, 2:5] = 1.0
        >>> max_box_acc(maps, [[[2, 2, 4, 4]]])  # IoU 9/16 >= 0.5
        1.0
    """
    metric = BoxAccuracy(version=1, interval=interval, iou_thresholds=(iou_threshold,))
    metric.update(maps, gt_boxes)
    return metric.compute()["max_box_acc"]


def max_box_acc_v2(
    maps, gt_boxes, *, interval: float = 0.001, iou_thresholds: Sequence[float] = (0.3, 0.5, 0.7)
) -> float:
    """MaxBoxAccV2 (version 2: every region, mean over IoU thresholds) of one batch, a fraction."""
    metric = BoxAccuracy(version=2, interval=interval, iou_thresholds=iou_thresholds)
    metric.update(maps, gt_boxes)
    return metric.compute()["max_box_acc"]


# --------------------------------------------------------------------------------------
# GT-known and top-1 localisation
# --------------------------------------------------------------------------------------


class LocalizationAccuracy:
    """GT-known and top-1 localisation accuracy (ILSVRC protocol).

    Each image has predicted boxes (usually one, from the map of the ground-truth class),
    best first, and ground-truth boxes. Only the first ``max_boxes`` predicted boxes count
    (default 1: one box per image, as the ILSVRC protocol and the SPN paper score it); the
    image's box is right when one of them has IoU ``>= iou_threshold`` (0.5) with a
    ground-truth box (pixel-inclusive IoU). ``max_boxes=None`` counts every predicted box
    ("any of k"), as ``locerr`` in the released SPN code; it rewards predicting many boxes.

    * GT-known: fraction of images whose box is right.
    * Top-1: fraction of images whose box is right *and* whose predicted class equals the
      ground-truth class (needs ``pred_labels`` and ``gt_labels`` in every update).

    Labels: ``gt_labels`` and ``pred_labels`` hold one class per *image* (``(B,)``), unlike
    :class:`PointingGame` and :class:`CorLoc`, whose ``gt_labels`` is one class per box.

    Args:
        iou_threshold: IoU needed (default 0.5).
        max_boxes: how many predicted boxes of each image count (default 1), or None for all.

    Example:
        >>> loc_accuracy([[0, 0, 9, 9]], [[[0, 0, 9, 9]]], gt_labels=[1], pred_labels=[2])
        {'gt_known': 1.0, 'top1': 0.0, 'images': 1}
    """

    def __init__(self, iou_threshold: float = 0.5, max_boxes: int | None = 1) -> None:
        self.iou_threshold = check_fraction(iou_threshold, "iou_threshold")
        self.max_boxes = check_max_boxes(max_boxes)
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        self.num_images = 0
        self.num_box_correct = 0
        self.num_top1_correct = 0
        self.with_classes: bool | None = None

    def update(self, pred_boxes, gt_boxes, gt_labels=None, pred_labels=None) -> None:
        """Add a batch. Every argument is checked before anything is counted, so an update
        that raises leaves the metric as it was.

        Args:
            pred_boxes: ``B`` arrays ``(k_i, 4)`` (best first) or a ``(B, 4)`` array.
            gt_boxes: ``B`` arrays ``(m_i, 4)``.
            gt_labels: ``(B,)`` ground-truth class per *image* (needed for top-1).
            pred_labels: ``(B,)`` predicted class per image (top-1), or None.
        """
        batch_size = box_batch_size(pred_boxes, "pred_boxes")
        pred_list = as_box_list(pred_boxes, batch_size, "pred_boxes")
        box_list = as_box_list(gt_boxes, batch_size)
        with_classes = pred_labels is not None
        if with_classes and gt_labels is None:
            raise ValueError("top-1 localisation needs gt_labels (B,) together with pred_labels")
        if self.with_classes is not None and with_classes != self.with_classes:
            raise ValueError("pass pred_labels in every update or in none (top-1 needs them for every image)")
        true_classes = None if gt_labels is None else as_labels(gt_labels, batch_size, "gt_labels")
        predicted_classes = None if pred_labels is None else as_labels(pred_labels, batch_size, "pred_labels")
        box_correct = np.array(
            [best_iou(p[: self.max_boxes], g) >= self.iou_threshold for p, g in zip(pred_list, box_list)], dtype=bool
        )
        # every argument is valid: only now change the state
        self.with_classes = with_classes
        self.num_images += batch_size
        self.num_box_correct += int(box_correct.sum())
        if with_classes:
            self.num_top1_correct += int((box_correct & (predicted_classes == true_classes)).sum())

    def compute(self) -> dict[str, Any]:
        """Returns ``{"gt_known": float, "top1": float or None, "images": int}``.

        Raises:
            ValueError: no image was added (e.g. an empty data loader).
        """
        check_evaluated(self.num_images, "LocalizationAccuracy saw no image")
        return {
            "gt_known": self.num_box_correct / self.num_images,
            "top1": self.num_top1_correct / self.num_images if self.with_classes else None,
            "images": int(self.num_images),
        }


def loc_accuracy(
    pred_boxes,
    gt_boxes,
    gt_labels=None,
    pred_labels=None,
    *,
    iou_threshold: float = 0.5,
    max_boxes: int | None = 1,
) -> dict[str, Any]:
    """One-shot :class:`LocalizationAccuracy` over one batch (same arguments and result)."""
    metric = LocalizationAccuracy(iou_threshold=iou_threshold, max_boxes=max_boxes)
    metric.update(pred_boxes, gt_boxes, gt_labels, pred_labels)
    return metric.compute()


# --------------------------------------------------------------------------------------
# Object energy
# --------------------------------------------------------------------------------------


def box_union_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the pixels inside at least one pixel-inclusive box.

    Pixel ``(row, col)`` is inside ``(x0, y0, x1, y1)`` when ``x0 <= col <= x1`` and
    ``y0 <= row <= y1``; parts outside the image are dropped.
    """
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        col_start, row_start = max(int(np.ceil(x0)), 0), max(int(np.ceil(y0)), 0)
        col_stop, row_stop = min(int(np.floor(x1)), width - 1) + 1, min(int(np.floor(y1)), height - 1) + 1
        if col_start < col_stop and row_start < row_stop:
            mask[row_start:row_stop, col_start:col_stop] = True
    return mask


def energy_share(energy_map: np.ndarray, inside: np.ndarray) -> float:
    """Share of the non-negative energy of ``energy_map`` that falls on ``inside`` pixels.

    The map is clipped at 0 and normalised to sum 1; a map with no positive energy (all
    zero or all negative) is taken as uniform, so its share is the fraction of pixels inside.
    A map whose sum overflows is divided by its maximum first, so the share stays exact.
    """
    energy = np.clip(energy_map, 0.0, None)
    with np.errstate(over="ignore"):
        total = energy.sum()
    if not np.isfinite(total):
        energy = energy / energy.max()
        total = energy.sum()
    if total <= 0:
        return float(inside.mean())
    return float(energy[inside].sum() / total)


class ObjectEnergy:
    """Object energy (SPN paper, section 4.1): the share of a map's energy inside the boxes.

    Each map (a proposal map or a response map) is rescaled to the image size (bilinear,
    :func:`spn.localize.upsample_maps`) when ``image_size`` is given, clipped at 0 and
    normalised to sum 1 (normalised by the sum of its non-negative energy); its object
    energy is the sum over the pixels inside the union of the ground-truth boxes (a pixel
    covered by several boxes counts once). The result is the mean over images. A map with
    no positive energy counts as uniform (share = fraction of image pixels in the boxes).

    Args:
        image_size: ``(H, W)`` to rescale maps to, or None when maps are at image size.

    Example:
        >>> object_energy(np.array([[[1.0, 3.0], [0.0, 4.0]]]), [[[1, 0, 1, 1]]])["object_energy"]
        0.875
    """

    def __init__(self, image_size: Sequence[int] | None = None) -> None:
        self.image_size = None if image_size is None else check_size(image_size, "image_size")
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        self.shares: list[float] = []

    def update(self, maps, gt_boxes) -> None:
        """Add a batch of maps ``(B, h, w)`` and ground-truth boxes (``B`` arrays ``(m_i, 4)``
        in image pixels). Every argument is checked before anything is counted, so an
        update that raises leaves the metric as it was."""
        array = as_map_batch(maps)
        box_list = as_box_list(gt_boxes, len(array))
        if self.image_size is not None and array.shape[1:] != self.image_size and len(array):
            array = upsample_maps(array, self.image_size)
        shares = [
            energy_share(energy_map, box_union_mask(boxes, *energy_map.shape))
            for energy_map, boxes in zip(array, box_list)
        ]
        self.shares.extend(shares)  # only once every map of the batch went through

    def compute(self) -> dict[str, Any]:
        """Returns ``{"object_energy": mean over images, "per_image": [float], "images": int}``.

        Raises:
            ValueError: no image was added (e.g. an empty data loader).
        """
        check_evaluated(len(self.shares), "ObjectEnergy saw no map")
        return {
            "object_energy": float(np.mean(self.shares)),
            "per_image": list(self.shares),
            "images": len(self.shares),
        }


def object_energy(maps, gt_boxes, *, image_size: Sequence[int] | None = None) -> dict[str, Any]:
    """One-shot :class:`ObjectEnergy` over one batch (same arguments and result)."""
    metric = ObjectEnergy(image_size=image_size)
    metric.update(maps, gt_boxes)
    return metric.compute()


# --------------------------------------------------------------------------------------
# Iterating over batches
# --------------------------------------------------------------------------------------


class Metric(Protocol):
    """Anything with ``update(...)`` and ``compute() -> dict``."""

    def update(self, *args: Any, **kwargs: Any) -> None: ...

    def compute(self) -> dict[str, Any]: ...


def evaluate(metric: Metric, batches: Iterable[Sequence[Any] | Mapping[str, Any]]) -> dict[str, Any]:
    """Feed every batch to ``metric.update`` and return ``metric.compute()``.

    A batch is a tuple of positional arguments or a dict of keyword arguments of the
    metric's ``update``. An empty ``batches`` (or one of empty batches only) raises
    ``ValueError`` from ``compute()``: no images were evaluated.

    Example:
        >>> batches = [([[0.0, 0.0]], [1], [[[0, 0, 1, 1]]]), ([[50.0, 50.0]], [1], [[[0, 0, 1, 1]]])]
        >>> evaluate(PointingGame(), batches)["accuracy"]
        0.5
    """
    for batch in batches:
        if isinstance(batch, Mapping):
            metric.update(**batch)
        else:
            metric.update(*batch)
    return metric.compute()
