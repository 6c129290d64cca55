"""GT-known and top-1 localisation accuracy (the ILSVRC protocol, Russakovsky et al. 2015, as
used by CAM, Zhou et al. CVPR 2016, and wsolevaluation)."""

from __future__ import annotations

from typing import Any

import numpy as np

from spn._convert import ArrayLike, BoxesLike

from ._geometry import best_iou
from ._inputs import as_box_list, as_labels, batch_size_of, check_fraction, check_max_boxes
from .base import Metric, MetricResult, check_evaluated

__all__ = ["LocalizationAccuracy", "localization_accuracy"]


class LocalizationAccuracy(Metric):
    """GT-known localisation (``value``) and top-1 localisation (``details["top1_loc"]``).

    Each image has predicted boxes (usually one, from the map of the ground-truth class at a
    fixed map threshold), best first. Only the first ``max_boxes`` count (default 1, as the
    ILSVRC protocol and the SPN paper score it); the image's box is right when one of them has
    IoU ``>= iou_threshold`` (0.5) with a ground-truth box. ``max_boxes=None`` counts every
    predicted box, as ``locerr`` in the released SPN code.

    * GT-known: the fraction of images whose box is right.
    * Top-1: the fraction whose box is right *and* whose predicted class is the true class
      (needs ``pred_labels`` and ``labels`` in every update; None otherwise).

    Args:
        iou_threshold: IoU needed (default 0.5).
        max_boxes: how many predicted boxes of each image count (default 1), or None for all.

    Example:
        >>> result = localization_accuracy([[0, 0, 9, 9]], [[[0, 0, 9, 9]]], pred_labels=[2], labels=[1])
        >>> result.value, result.details["top1_loc"]
        (1.0, 0.0)
    """

    name = "gt_known_loc"

    def __init__(self, iou_threshold: float = 0.5, max_boxes: int | None = 1) -> None:
        self.iou_threshold = check_fraction(iou_threshold, "iou_threshold")
        self.max_boxes = check_max_boxes(max_boxes)
        self.reset()

    def _config(self) -> dict[str, Any]:
        return {"iou_threshold": self.iou_threshold, "max_boxes": self.max_boxes}

    def reset(self) -> None:
        self.num_images = 0
        self.num_box_correct = 0
        self.num_top1_correct = 0
        self.with_classes: bool | None = None

    def update(
        self,
        pred_boxes: BoxesLike,
        gt_boxes: BoxesLike,
        *,
        pred_labels: ArrayLike | None = None,
        labels: ArrayLike | None = None,
    ) -> None:
        """Add a batch.

        Args:
            pred_boxes: ``B`` arrays ``(k_i, 4)`` (best first) or a ``(B, 4)`` array.
            gt_boxes: ``B`` arrays ``(m_i, 4)``.
            pred_labels: ``(B,)`` predicted class per image, for top-1 (with ``labels``).
            labels: ``(B,)`` true class per image.
        """
        batch_size = batch_size_of(pred_boxes, "pred_boxes")
        pred_list = as_box_list(pred_boxes, batch_size, "pred_boxes")
        box_list = as_box_list(gt_boxes, batch_size)
        with_classes = pred_labels is not None
        if with_classes and labels is None:
            raise ValueError("top-1 localisation needs labels (B,) together with pred_labels")
        if self.with_classes is not None and with_classes != self.with_classes:
            raise ValueError("pass pred_labels in every update or in none (top-1 needs them for every image)")
        true_classes = None if labels is None else as_labels(labels, batch_size, "labels")
        predicted = None if pred_labels is None else as_labels(pred_labels, batch_size, "pred_labels")
        pairs = zip(pred_list, box_list, strict=True)
        box_correct = np.array([best_iou(p[: self.max_boxes], g) >= self.iou_threshold for p, g in pairs], dtype=bool)
        self.with_classes = with_classes
        self.num_images += batch_size
        self.num_box_correct += int(box_correct.sum())
        if with_classes:
            self.num_top1_correct += int((box_correct & (predicted == true_classes)).sum())

    def compute(self) -> MetricResult:
        """``value``: GT-known localisation; ``details``: ``top1_loc`` (None without labels).

        Raises:
            ValueError: no image was added.
        """
        check_evaluated(self.num_images, "LocalizationAccuracy saw no image")
        top1 = self.num_top1_correct / self.num_images if self.with_classes else None
        return MetricResult(
            name=self.name,
            value=self.num_box_correct / self.num_images,
            count=int(self.num_images),
            details={"top1_loc": top1, "correct": self.num_box_correct},
        )

    def _state(self) -> dict[str, Any]:
        return {
            "num_images": self.num_images,
            "num_box_correct": self.num_box_correct,
            "num_top1_correct": self.num_top1_correct,
            "with_classes": self.with_classes,
        }

    def _add_state(self, state: Any) -> None:
        if state["num_images"] == 0:
            return
        if self.with_classes is not None and state["with_classes"] != self.with_classes:
            raise ValueError("cannot merge top-1 counts with counts made without pred_labels")
        self.with_classes = state["with_classes"]
        self.num_images += int(state["num_images"])
        self.num_box_correct += int(state["num_box_correct"])
        self.num_top1_correct += int(state["num_top1_correct"])


def localization_accuracy(
    pred_boxes: BoxesLike,
    gt_boxes: BoxesLike,
    *,
    pred_labels: ArrayLike | None = None,
    labels: ArrayLike | None = None,
    iou_threshold: float = 0.5,
    max_boxes: int | None = 1,
) -> MetricResult:
    """One-shot :class:`LocalizationAccuracy` over one batch (same arguments and result)."""
    metric = LocalizationAccuracy(iou_threshold=iou_threshold, max_boxes=max_boxes)
    metric.update(pred_boxes, gt_boxes, pred_labels=pred_labels, labels=labels)
    return metric.compute()
