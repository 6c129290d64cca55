"""CorLoc: correct localisation (Deselaers et al., IJCV 2012), per class then averaged."""

from __future__ import annotations

from typing import Any

import numpy as np

from spn._convert import ArrayLike, BoxesLike

from ._geometry import best_iou, boxes_of_class
from ._inputs import as_box_list, as_label_list, as_labels, batch_size_of, check_fraction, check_max_boxes
from .base import ClassTally, Metric, MetricResult, check_evaluated

__all__ = ["CorLoc", "corloc"]


class CorLoc(Metric):
    """Correct localisation, per class then averaged over classes with at least one query.

    A query is an (image, class present in the image) pair with the boxes predicted for that
    class, best first (:func:`spn.localize.boxes_from_maps` sorts them). Only the first
    ``max_boxes`` count: with the default 1, the query's single best box, as in the SPN paper
    (section 4.3) and the field. The query is correct when a counted box has IoU
    ``>= iou_threshold`` with a ground-truth box of that class (pixel-inclusive IoU,
    :func:`spn.metrics.pixel_box_iou`). A query without a predicted box, or whose class has no
    box in the image, is incorrect.

    ``max_boxes=None`` counts every predicted box ("any of k"), as ``corloc`` in the released
    SPN code does with its one box per connected component; it rewards predicting many boxes.

    Args:
        iou_threshold: IoU needed (default 0.5).
        max_boxes: how many predicted boxes of each query count (default 1), or None for all.

    Example:
        >>> corloc([[[0, 0, 9, 9]]], [[[0, 0, 9, 4]]], [3]).value  # IoU 50/100
        1.0
        >>> two = [[[20, 20, 29, 29], [0, 0, 9, 9]]]  # the first (best) box misses
        >>> corloc(two, [[[0, 0, 9, 9]]], [3]).value, corloc(two, [[[0, 0, 9, 9]]], [3], max_boxes=None).value
        (0.0, 1.0)
    """

    name = "corloc"

    def __init__(self, iou_threshold: float = 0.5, max_boxes: int | None = 1) -> None:
        self.iou_threshold = check_fraction(iou_threshold, "iou_threshold")
        self.max_boxes = check_max_boxes(max_boxes)
        self.reset()

    def _config(self) -> dict[str, Any]:
        return {"iou_threshold": self.iou_threshold, "max_boxes": self.max_boxes}

    def reset(self) -> None:
        self.tally = ClassTally()

    def update(
        self, pred_boxes: BoxesLike, gt_boxes: BoxesLike, labels: ArrayLike, box_labels: BoxesLike | None = None
    ) -> None:
        """Score a batch of queries.

        Args:
            pred_boxes: ``B`` arrays ``(k_i, 4)`` (or a ``(B, 4)`` array), best first.
            gt_boxes: ``B`` arrays ``(m_i, 4)``.
            labels: ``(B,)`` the class of each query.
            box_labels: ``B`` arrays ``(m_i,)``, the class of each box, or None when every box
                is of its query's class.
        """
        batch_size = batch_size_of(pred_boxes, "pred_boxes")
        pred_list = as_box_list(pred_boxes, batch_size, "pred_boxes")
        box_list = as_box_list(gt_boxes, batch_size)
        classes = as_labels(labels, batch_size, "labels")
        label_list = None if box_labels is None else as_label_list(box_labels, box_list)
        correct = np.zeros(batch_size, dtype=bool)
        for index in range(batch_size):
            boxes = boxes_of_class(box_list[index], None if label_list is None else label_list[index], classes[index])
            correct[index] = best_iou(pred_list[index][: self.max_boxes], boxes) >= self.iou_threshold
        self.tally.add(classes, correct)

    def compute(self) -> MetricResult:
        """``value``: the mean over classes of CorLoc; ``per_class``; ``details``: ``correct``.

        Raises:
            ValueError: no query was added.
        """
        check_evaluated(self.tally.samples, "no CorLoc query")
        per_class = self.tally.per_class()
        return MetricResult(
            name=self.name,
            value=float(np.mean(list(per_class.values()))),
            count=self.tally.samples,
            per_class=per_class,
            details={"correct": self.tally.hits},
        )

    def _state(self) -> dict[str, Any]:
        return self.tally.counts()

    def _add_state(self, state: Any) -> None:
        self.tally.add_counts(state["correct"], state["total"])


def corloc(
    pred_boxes: BoxesLike,
    gt_boxes: BoxesLike,
    labels: ArrayLike,
    box_labels: BoxesLike | None = None,
    *,
    iou_threshold: float = 0.5,
    max_boxes: int | None = 1,
) -> MetricResult:
    """One-shot :class:`CorLoc` over one batch of queries (same arguments, same result)."""
    metric = CorLoc(iou_threshold=iou_threshold, max_boxes=max_boxes)
    metric.update(pred_boxes, gt_boxes, labels, box_labels)
    return metric.compute()
