"""MaxBoxAcc and MaxBoxAccV2 (Choe et al., "Evaluating Weakly Supervised Object Localization
Methods Right", CVPR 2020; clovaai/wsolevaluation's ``BoxEvaluator``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from spn._convert import ArrayLike, BoxesLike, as_map_batch
from spn.localize.wsol import LargestRule, iter_wsol_boxes

from ._geometry import pixel_box_iou
from ._inputs import as_box_list, check_fraction
from .base import Metric, MetricResult, check_evaluated

__all__ = ["BoxAccuracy", "box_accuracy"]


class BoxAccuracy(Metric):
    """MaxBoxAcc (``version=1``) and MaxBoxAccV2 (``version=2``, the default), as wsolevaluation.

    For every image and every map threshold ``t`` of ``np.arange(0, 1, interval)``, the boxes
    of :func:`spn.localize.wsol_boxes` (the largest region for version 1, every region for
    version 2) are compared with the ground-truth boxes; the image is correct at ``(t, delta)``
    when the best IoU over its boxes x its ground-truth boxes is ``>= delta``.
    ``BoxAcc(t, delta)`` is the fraction of correct images; ``MaxBoxAcc = max_t BoxAcc(t, 0.5)``;
    ``MaxBoxAccV2`` is the mean over ``delta in {0.3, 0.5, 0.7}`` of ``max_t BoxAcc(t, delta)``
    (each delta its own best ``t``). An image without a ground-truth box is never correct.

    By default every number equals wsolevaluation's: its box rule (OpenCV contours, the largest
    ``cv2.contourArea`` for version 1), its normalisation (float32 maps in float32), its IoU,
    and its threshold step ``interval=0.001`` (its ``config.py``; its ``evaluation.py`` command
    line uses 0.01, which can only skip thresholds and so only lower the result). Named
    variants: ``largest="pixel_count"`` (version 1 ranks regions by pixel count) and
    ``include_holes=False`` (version 2 without the boxes of hole borders, which OpenCV's
    ``RETR_TREE`` returns). Maps must be at the ground-truth boxes' resolution: wsolevaluation
    resizes maps to 224 x 224 and the boxes with :func:`spn.localize.resize_boxes`.

    Images are streamed one distinct foreground at a time, so memory is
    ``O(H W + boxes of one cut)`` whatever the map size.

    Args:
        version: 1 (MaxBoxAcc: largest region, delta 0.5) or 2 (MaxBoxAccV2: every region,
            deltas 0.3, 0.5, 0.7).
        interval: the threshold step (default 0.001).
        iou_thresholds: override the deltas.
        largest: version 1's region rule, ``"contour_area"`` (default) or ``"pixel_count"``.
        include_holes: version 2 also boxes the borders of holes (default True).

    Example:
        >>> maps = np.zeros((1, 10, 10)); maps[0, 2:5, 2:5] = 1.0
        >>> result = box_accuracy(maps, [[[2, 2, 4, 4]]])  # predicted [2, 2, 5, 5]: IoU 9/16
        >>> result.name, result.details["per_iou"]
        ('max_box_acc_v2', {0.3: 1.0, 0.5: 1.0, 0.7: 0.0})
    """

    def __init__(
        self,
        version: int = 2,
        *,
        interval: float = 0.001,
        iou_thresholds: Sequence[float] | None = None,
        largest: LargestRule = "contour_area",
        include_holes: bool = True,
    ) -> None:
        if version not in (1, 2):
            raise ValueError(f"version must be 1 (MaxBoxAcc) or 2 (MaxBoxAccV2), got {version!r}")
        interval = float(interval)
        if not 0 < interval <= 1:
            raise ValueError(f"interval must lie in (0, 1], got {interval}")
        if largest not in ("contour_area", "pixel_count"):
            raise ValueError(f"largest must be 'contour_area' or 'pixel_count', got {largest!r}")
        deltas = ((0.5,) if version == 1 else (0.3, 0.5, 0.7)) if iou_thresholds is None else tuple(iou_thresholds)
        if len(deltas) == 0:
            raise ValueError("iou_thresholds must not be empty")
        self.version = version
        self.interval = interval
        self.iou_thresholds = tuple(check_fraction(delta, "iou_thresholds") for delta in deltas)
        self.largest: LargestRule = largest
        self.include_holes = bool(include_holes)
        self.thresholds = np.arange(0, 1, interval)
        self.name = "max_box_acc" if version == 1 else "max_box_acc_v2"
        self.reset()

    def _config(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "interval": self.interval,
            "iou_thresholds": self.iou_thresholds,
            "largest": self.largest,
            "include_holes": self.include_holes,
        }

    def reset(self) -> None:
        self.num_correct = np.zeros((len(self.iou_thresholds), len(self.thresholds)), dtype=np.int64)
        self.num_images = 0

    def update(self, maps: ArrayLike, gt_boxes: BoxesLike) -> None:
        """Add maps ``(B, H, W)`` and their ground-truth boxes (``B`` arrays ``(m_i, 4)`` in the
        maps' pixel frame)."""
        array = as_map_batch(maps, keep_float32=True)
        box_list = as_box_list(gt_boxes, len(array))
        deltas = np.asarray(self.iou_thresholds)[:, None]
        num_correct = np.zeros_like(self.num_correct)
        for scoremap, boxes in zip(array, box_list, strict=True):
            num_correct += self.best_ious(scoremap, boxes)[None, :] >= deltas
        self.num_correct += num_correct
        self.num_images += len(array)

    def best_ious(self, scoremap: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
        """Best IoU of one map's boxes with ``gt_boxes`` at every threshold, ``(T,)``."""
        best = np.zeros(len(self.thresholds), dtype=np.float64)
        if len(gt_boxes) == 0:
            return best
        for indices, boxes in iter_wsol_boxes(
            scoremap,
            self.thresholds,
            multi_contour=self.version == 2,
            largest=self.largest,
            include_holes=self.include_holes,
        ):
            best[indices] = pixel_box_iou(boxes, gt_boxes).max()
        return best

    def compute(self) -> MetricResult:
        """``value``: MaxBoxAcc (version 1) or MaxBoxAccV2 (version 2). ``details``:
        ``per_iou`` ``{delta: max_t BoxAcc}``, ``best_threshold`` ``{delta: first t reaching
        it}``, ``box_acc`` ``{delta: [BoxAcc(t, delta) for t]}``, ``thresholds``.

        Raises:
            ValueError: no image was added.
        """
        check_evaluated(self.num_images, "BoxAccuracy saw no map")
        accuracies = self.num_correct / self.num_images
        best = accuracies.argmax(axis=1)
        deltas = self.iou_thresholds
        per_iou = {delta: float(accuracies[i].max()) for i, delta in enumerate(deltas)}
        return MetricResult(
            name=self.name,
            value=float(np.mean(list(per_iou.values()))),
            count=int(self.num_images),
            details={
                "per_iou": per_iou,
                "best_threshold": {delta: float(self.thresholds[best[i]]) for i, delta in enumerate(deltas)},
                "box_acc": {delta: accuracies[i].tolist() for i, delta in enumerate(deltas)},
                "thresholds": self.thresholds.tolist(),
            },
        )

    def _state(self) -> dict[str, Any]:
        return {"num_correct": self.num_correct.copy(), "num_images": self.num_images}

    def _add_state(self, state: Any) -> None:
        self.num_correct += np.asarray(state["num_correct"], dtype=np.int64)
        self.num_images += int(state["num_images"])


def box_accuracy(
    maps: ArrayLike,
    gt_boxes: BoxesLike,
    *,
    version: int = 2,
    interval: float = 0.001,
    iou_thresholds: Sequence[float] | None = None,
    largest: LargestRule = "contour_area",
    include_holes: bool = True,
) -> MetricResult:
    """One-shot :class:`BoxAccuracy` over one batch (same arguments and result; version 2 by
    default, as the class)."""
    metric = BoxAccuracy(
        version, interval=interval, iou_thresholds=iou_thresholds, largest=largest, include_holes=include_holes
    )
    metric.update(maps, gt_boxes)
    return metric.compute()
