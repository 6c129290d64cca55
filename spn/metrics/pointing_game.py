"""Pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from spn._convert import ArrayLike, BoxesLike

from ._geometry import boxes_of_class, linf_box_distance, pixel_distance
from ._inputs import as_box_list, as_label_list, as_labels, as_points, check_num_classes
from .base import ClassTally, Metric, MetricResult, check_evaluated

__all__ = ["PointingGame", "PointingProtocol", "pointing_game"]

PointingProtocol = Literal["torchray", "released"]


class PointingGame(Metric):
    """Pointing-game accuracy, per class, then the mean over classes.

    A query is an (image, class) pair with one predicted point (the peak of the class's map in
    image coordinates, :func:`spn.localize.peak_points`). It is a hit when the point is within
    ``radius`` pixels of a ground-truth box of the queried class (Zhang et al. and TorchRay
    call this radius the pointing game's "tolerance"); a query whose class has no
    box in its image is a miss. The accuracy of a class is ``hits / max(queries, 1)``.

    Two protocols, each reproducing a reference implementation exactly:

    * ``"torchray"`` (default; TorchRay's ``PointingGame``, the field's re-implementation of
      Zhang et al.'s benchmark): a hit when some pixel of the box lies at Euclidean distance
      **strictly less** than ``radius`` from the point (TorchRay tests
      ``(u - x)^2 + (v - y)^2 < tolerance^2`` over the box's pixels); the result is the mean
      over **all** ``num_classes`` classes, a class without any query counting 0.
    * ``"released"`` (the released SPN code, ``pointing`` in ``demo/experiment/util.py``; the
      SPN paper's Table 2): each box is enlarged by ``radius`` on every side and the point
      must lie inside, ends included: an L-infinity distance ``<= radius``; the mean over
      the classes that have at least one query (the released code divides by the query count,
      so it has a number only when every class has queries; then the two means agree).

    Args:
        num_classes: the number of classes (labels must lie in ``[0, num_classes)``).
        radius: pixels (default 15, both references' default "tolerance").
        protocol: ``"torchray"`` or ``"released"``.

    Example:
        >>> game = PointingGame(num_classes=1)
        >>> game.update([[31.0, 31.0]], [[[10, 10, 20, 20]]], [0])  # corner at sqrt(242) = 15.6
        >>> game.compute().value
        0.0
    """

    name = "pointing_game"

    def __init__(self, num_classes: int, radius: float = 15.0, protocol: PointingProtocol = "torchray") -> None:
        self.num_classes = check_num_classes(num_classes, required=True)
        self.radius = float(radius)
        if not (np.isfinite(self.radius) and self.radius >= 0):
            raise ValueError(f"radius must be a finite number of pixels >= 0, got {radius!r}")
        if protocol not in ("torchray", "released"):
            raise ValueError(f"protocol must be 'torchray' or 'released', got {protocol!r}")
        self.protocol: PointingProtocol = protocol
        self.reset()

    def _config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "radius": self.radius, "protocol": self.protocol}

    def reset(self) -> None:
        self.tally = ClassTally()

    def update(
        self, points: ArrayLike, gt_boxes: BoxesLike, labels: ArrayLike, box_labels: BoxesLike | None = None
    ) -> None:
        """Score a batch of queries.

        Args:
            points: ``(B, 2)`` predicted ``(x, y)`` points in image coordinates.
            gt_boxes: ``B`` arrays ``(m_i, 4)``: the ground-truth boxes of each query's image.
            labels: ``(B,)`` the class of each query.
            box_labels: ``B`` arrays ``(m_i,)``, the class of each box, or None when every box
                is of its query's class.
        """
        point_array = as_points(points)
        batch_size = len(point_array)
        box_list = as_box_list(gt_boxes, batch_size)
        classes = as_labels(labels, batch_size, "labels", self.num_classes)
        label_list = None if box_labels is None else as_label_list(box_labels, box_list)
        hits = np.zeros(batch_size, dtype=bool)
        for index in range(batch_size):
            boxes = boxes_of_class(box_list[index], None if label_list is None else label_list[index], classes[index])
            hits[index] = len(boxes) > 0 and self._is_hit(point_array[index : index + 1], boxes)
        self.tally.add(classes, hits)

    def _is_hit(self, point: np.ndarray, boxes: np.ndarray) -> bool:
        if self.protocol == "torchray":
            return bool((pixel_distance(point, boxes) < self.radius).any())
        return bool((linf_box_distance(point, boxes) <= self.radius).any())

    def compute(self) -> MetricResult:
        """``value``: the mean class accuracy; ``per_class``; ``details``: ``hits``, ``protocol``.

        Raises:
            ValueError: no query was added.
        """
        check_evaluated(self.tally.samples, "no pointing-game query")
        per_class = self.tally.per_class(self.num_classes) if self.protocol == "torchray" else self.tally.per_class()
        return MetricResult(
            name=self.name,
            value=float(np.mean(list(per_class.values()))),
            count=self.tally.samples,
            per_class=per_class,
            details={"hits": self.tally.hits, "protocol": self.protocol, "radius": self.radius},
        )

    def _state(self) -> dict[str, Any]:
        return self.tally.counts()

    def _add_state(self, state: Any) -> None:
        self.tally.add_counts(state["correct"], state["total"])


def pointing_game(
    points: ArrayLike,
    gt_boxes: BoxesLike,
    labels: ArrayLike,
    box_labels: BoxesLike | None = None,
    *,
    num_classes: int,
    radius: float = 15.0,
    protocol: PointingProtocol = "torchray",
) -> MetricResult:
    """One-shot :class:`PointingGame` over one batch of queries (same arguments, same result).

    Example:
        >>> pointing_game([[31, 31]], [[[10, 10, 20, 20]]], [0], num_classes=1, protocol="released").value
        1.0
    """
    metric = PointingGame(num_classes=num_classes, radius=radius, protocol=protocol)
    metric.update(points, gt_boxes, labels, box_labels)
    return metric.compute()
