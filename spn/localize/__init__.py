"""Localisation from response maps: peak points and boxes, batched, on tensors or arrays.

Conventions used throughout ``spn``:

* A batch of maps has shape ``(B, H, W)``; a single map is ``map[None]``. Maps may be
  ``torch.Tensor`` (any device) or anything ``numpy.asarray`` accepts. This is the border
  of the WSOL layer: tensors come in, NumPy arrays go out, converted once
  (``spn._convert.to_numpy``); upsampling is a torch operation and lives with the models
  (:func:`spn.models.upsample_maps`).
* Image coordinates: ``x`` is the column, ``y`` the row, both 0-based; pixel ``(x, y)`` has
  its centre at ``(x, y)`` and covers ``[x - 0.5, x + 0.5] x [y - 0.5, y + 0.5]``.
* Boxes are pixel-inclusive ``(x0, y0, x1, y1)``: columns ``x0 .. x1`` and rows ``y0 .. y1``,
  both ends included, so a one-pixel box has ``x0 == x1`` and ``y0 == y1`` and area
  ``(x1 - x0 + 1) * (y1 - y0 + 1) = 1`` (PASCAL VOC, the released SPN code, wsolevaluation).
* Sizes are ``(H, W)`` and the argument is called ``size``.
* NaN or infinite maps raise ``ValueError`` naming the image; maps are never silently repaired.

Every rule that turns maps into boxes lives here:

* :func:`boxes_from_maps` (``boxes.py``): the SPN paper's ``map >= mean(map)`` box (one box,
  or one per connected component as in the released code);
* :func:`wsol_boxes` / :func:`iter_wsol_boxes` (``wsol.py``): wsolevaluation's threshold
  sweep, which :class:`spn.metrics.BoxAccuracy` scores;
* :func:`peak_points` (``points.py``): the pointing game's points.
"""

from __future__ import annotations

from .boxes import ScoreMode, ThresholdMode, boxes_from_maps, foreground_masks, resize_boxes
from .points import cell_centres, peak_points
from .wsol import LargestRule, iter_wsol_boxes, normalize_scoremap, quantize_scoremap, threshold_cuts, wsol_boxes

__all__ = [
    "LargestRule",
    "ScoreMode",
    "ThresholdMode",
    "boxes_from_maps",
    "cell_centres",
    "foreground_masks",
    "iter_wsol_boxes",
    "normalize_scoremap",
    "peak_points",
    "quantize_scoremap",
    "resize_boxes",
    "threshold_cuts",
    "wsol_boxes",
]
