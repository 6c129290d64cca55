"""wsolevaluation's boxes from a score map (Choe et al., CVPR 2020; clovaai/wsolevaluation).

What ``compute_bboxes_from_scoremaps`` in wsolevaluation's ``evaluation.py`` computes, with
OpenCV's contours replaced by ``scipy.ndimage`` regions that give the same boxes:

1. the map is min-max normalised to ``[0, 1]`` (:func:`normalize_scoremap`, wsolevaluation's
   ``normalize_scoremap`` in ``inference.py``) and quantised to ``uint8(255 * m)``
   (:func:`quantize_scoremap`);
2. at threshold ``t`` the foreground is ``uint8 > int(t * max(uint8))`` (``cv2.threshold``,
   ``THRESH_BINARY``);
3. its contours are found with ``cv2.findContours(RETR_TREE, CHAIN_APPROX_SIMPLE)``: one
   outer contour per 8-connected region and one inner contour per hole (a 4-connected
   background region enclosed by the foreground);
4. MaxBoxAcc keeps the contour of largest ``cv2.contourArea`` (``max`` keeps the first of
   equal areas in OpenCV's order, which is the *last* region in row-major order of first
   pixels); MaxBoxAccV2 (``multi_contour``) keeps them all;
5. each contour's ``cv2.boundingRect`` ``(x, y, w, h)`` becomes ``(x, y, x + w, y + h)``
   with ``x1`` clipped to ``W - 1`` and ``y1`` to ``H - 1``; no foreground gives the single
   box ``[0, 0, 0, 0]``.

The contour area of step 4 is computed exactly without tracing contours (see
``_regions.doubled_contour_areas``). ``largest="pixel_count"`` is a named variant that ranks
regions by pixel count (holes filled) instead: closer to "the largest connected component",
and different from wsolevaluation's box in about 2% of (map, threshold) pairs, mostly where
regions are thin (a one-pixel-wide region has contour area 0 whatever its length).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

from spn._convert import ArrayLike, as_map_batch, to_numpy

from ._regions import (
    component_boxes,
    doubled_contour_areas,
    euler_number_8,
    fill_holes,
    hole_labels,
    label_components,
    last_argmax,
    mask_box,
)

__all__ = [
    "LargestRule",
    "iter_wsol_boxes",
    "normalize_scoremap",
    "quantize_scoremap",
    "threshold_cuts",
    "wsol_boxes",
]

LargestRule = Literal["contour_area", "pixel_count"]
"""How MaxBoxAcc picks its one region: wsolevaluation's ``cv2.contourArea`` or pixel count."""


def normalize_scoremap(scoremap: np.ndarray) -> np.ndarray:
    """Min-max normalise one finite ``(H, W)`` map to ``[0, 1]`` (wsolevaluation's rule).

    ``(m - min(m)) / max(m - min(m))`` in the map's own dtype (wsolevaluation works in place:
    a float32 map is normalised in float32; anything else here in float64). A constant map
    becomes zeros. A finite map whose range overflows (values near the dtype's largest) is
    halved first, which is exact, so it normalises instead of turning into NaN.

    Example:
        >>> normalize_scoremap(np.array([[2.0, 4.0, 3.0]]))
        array([[0. , 1. , 0.5]])
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
    """``uint8(255 * m)`` of a ``[0, 1]`` map, truncating, in the map's dtype (wsolevaluation).

    Example:
        >>> quantize_scoremap(np.array([[0.0, 0.5, 1.0]]))
        array([[  0, 127, 255]], dtype=uint8)
    """
    return (normalized * 255).astype(np.uint8)


def check_thresholds(thresholds: Any) -> np.ndarray:
    """Map thresholds as a float64 1-D array; each must be finite and in ``[0, 1]``."""
    array = np.asarray(thresholds, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"thresholds must be a 1-D sequence of values in [0, 1], got shape {array.shape}")
    bad = np.flatnonzero(~(np.isfinite(array) & (array >= 0) & (array <= 1)))
    if bad.size:
        index = int(bad[0])
        raise ValueError(
            f"thresholds[{index}] = {array[index]!r} is not a map threshold: thresholds are fractions of the "
            "normalised map's maximum and must be finite values in [0, 1]"
        )
    return array


def threshold_cuts(thresholds: np.ndarray, quantized_max: int) -> np.ndarray:
    """Integer cut of each threshold, ``int(t * max(uint8 map))`` (truncation): a pixel is
    foreground when its uint8 value is strictly greater than the cut."""
    return (np.asarray(thresholds, dtype=np.float64) * float(quantized_max)).astype(np.int64)


def _canonical_cuts(quantized: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Each cut replaced by the largest value present in the map that is ``<= cut`` (-1 when
    none): same foreground, so thresholds of a fine step share one computation."""
    present = np.flatnonzero(np.bincount(quantized.ravel(), minlength=256))
    below = np.concatenate([[-1], present])
    return below[np.searchsorted(below, np.asarray(cuts), side="right") - 1]


def _to_wsol_boxes(extents: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixel extents ``(c0, r0, c1, r1)`` to wsolevaluation boxes ``(c0, r0, min(c1 + 1, W - 1),
    min(r1 + 1, H - 1))`` (``boundingRect`` then its clipping)."""
    boxes = extents.astype(np.int64).copy()
    boxes[:, 2] = np.minimum(boxes[:, 2] + 1, width - 1)
    boxes[:, 3] = np.minimum(boxes[:, 3] + 1, height - 1)
    return boxes


def _largest_region_extent(mask: np.ndarray, largest: LargestRule) -> np.ndarray:
    """Pixel extent ``(1, 4)`` of the largest region (holes filled) of a non-empty mask; equal
    sizes go to the last region in row-major order of first pixels."""
    labels, count = label_components(mask, connectivity=8)
    if count == 1:
        return mask_box(mask)
    has_holes = euler_number_8(mask) != count
    if largest == "contour_area":
        if has_holes:
            labels, count = label_components(fill_holes(mask), connectivity=8)
        sizes = doubled_contour_areas(labels, count)
    else:
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        if has_holes:
            # Filling adds pixels only inside a component's box, so it can change the answer
            # only when more than one component's box holds as many pixels as the largest has.
            extents = component_boxes(labels, count)
            box_areas = (extents[:, 2] - extents[:, 0] + 1) * (extents[:, 3] - extents[:, 1] + 1)
            if np.count_nonzero(box_areas >= sizes.max()) > 1:
                labels, count = label_components(fill_holes(mask), connectivity=8)
                sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    winner = last_argmax(sizes)
    return component_boxes(labels, count)[winner : winner + 1]


def _all_region_extents(mask: np.ndarray, include_holes: bool) -> np.ndarray:
    """Pixel extents of every 8-connected region and (optionally) of every hole's border.

    The border of a hole (OpenCV's inner contour under ``RETR_TREE``) runs over the
    foreground pixels around it: the hole's extent grown by one pixel on each side.
    """
    labels, count = label_components(mask, connectivity=8)
    extents = mask_box(mask) if count == 1 else component_boxes(labels, count)
    if include_holes and euler_number_8(mask) != count:
        background_labels, background_count, is_hole = hole_labels(mask)
        hole_extents = component_boxes(background_labels, background_count)[is_hole[1:]]
        extents = np.concatenate([extents, hole_extents + np.array([-1, -1, 1, 1])], axis=0)
    return extents


def _boxes_at_cut(
    quantized: np.ndarray, cut: int, multi_contour: bool, largest: LargestRule, include_holes: bool
) -> np.ndarray:
    """wsolevaluation's boxes of a uint8 map whose foreground is ``quantized > cut``."""
    mask = quantized > cut
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return np.zeros((1, 4), dtype=np.int64)
    cols = np.flatnonzero(mask.any(axis=0))
    # Inside the foreground's bounding box the regions and holes are the same (background on
    # the crop's edge touches the outside) and there is less to label.
    crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    extents = _all_region_extents(crop, include_holes) if multi_contour else _largest_region_extent(crop, largest)
    extents = extents + np.array([cols[0], rows[0], cols[0], rows[0]])
    return _to_wsol_boxes(extents, *mask.shape)


def _check_largest(largest: str) -> LargestRule:
    if largest not in ("contour_area", "pixel_count"):
        raise ValueError(f"largest must be 'contour_area' (wsolevaluation) or 'pixel_count', got {largest!r}")
    return largest  # type: ignore[return-value]


def iter_wsol_boxes(
    scoremap: ArrayLike,
    thresholds: Sequence[float] | np.ndarray,
    *,
    multi_contour: bool = False,
    largest: LargestRule = "contour_area",
    include_holes: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """wsolevaluation's boxes of one map, one distinct foreground at a time.

    Thresholds whose cuts give the same foreground (a uint8 map has at most 256) share one
    computation; only one foreground's boxes are held at a time, so memory stays
    ``O(H W + boxes of one cut)`` however many thresholds and regions there are.

    Args:
        scoremap: one ``(H, W)`` map (tensor or array), finite; normalised here.
        thresholds: values in ``[0, 1]`` (e.g. ``np.arange(0, 1, 0.001)``); anything else raises.
        multi_contour: every region (MaxBoxAccV2) instead of the largest one.
        largest: with one region, ``"contour_area"`` (wsolevaluation, default) or ``"pixel_count"``.
        include_holes: with ``multi_contour``, also the boxes of hole borders (``RETR_TREE``).

    Yields:
        ``(indices, boxes)``: the int64 indices into ``thresholds`` that share this
        foreground, and its int64 ``(k, 4)`` boxes in wsolevaluation's convention.
    """
    largest = _check_largest(largest)
    values = check_thresholds(thresholds)
    single = to_numpy(scoremap)
    if single.ndim != 2:
        raise ValueError(f"scoremap must be one (H, W) map, got shape {single.shape}")
    array = as_map_batch(single[None], "scoremap", keep_float32=True)[0]
    quantized = quantize_scoremap(normalize_scoremap(array))
    cuts = _canonical_cuts(quantized, threshold_cuts(values, int(quantized.max())))
    distinct, inverse = np.unique(cuts, return_inverse=True)
    inverse = inverse.reshape(-1)
    for position, cut in enumerate(distinct.tolist()):
        yield np.flatnonzero(inverse == position), _boxes_at_cut(quantized, cut, multi_contour, largest, include_holes)


def wsol_boxes(
    scoremap: ArrayLike,
    thresholds: Sequence[float] | np.ndarray,
    *,
    multi_contour: bool = False,
    largest: LargestRule = "contour_area",
    include_holes: bool = True,
) -> list[np.ndarray]:
    """wsolevaluation's estimated boxes of one map at each threshold (see the module doc).

    Args:
        scoremap: one ``(H, W)`` map (tensor or array), finite.
        thresholds: values in ``[0, 1]``; a value outside it or non-finite raises ``ValueError``.
        multi_contour: every region (MaxBoxAccV2) instead of the largest one (MaxBoxAcc).
        largest: ``"contour_area"`` (wsolevaluation's ``cv2.contourArea``, default) or
            ``"pixel_count"`` (the named variant: most pixels, holes filled).
        include_holes: with ``multi_contour``, also the boxes of hole borders.

    Returns:
        One int64 ``(k_t, 4)`` array per threshold.

    Example:
        >>> m = np.zeros((4, 6)); m[1:3, 1:3] = 1.0
        >>> wsol_boxes(m, [0.0])[0].tolist()  # region columns 1..2, rows 1..2
        [[1, 1, 3, 3]]
    """
    result: list[np.ndarray] = [np.zeros((0, 4), dtype=np.int64)] * len(np.atleast_1d(np.asarray(thresholds)))
    for indices, boxes in iter_wsol_boxes(
        scoremap, thresholds, multi_contour=multi_contour, largest=largest, include_holes=include_holes
    ):
        for index in indices.tolist():
            result[index] = boxes
    return result
