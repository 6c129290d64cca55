"""Connected regions of 2-D masks: labels, boxes, scores, holes and contour areas (private).

Everything here works on one ``(H, W)`` boolean mask at a time with ``scipy.ndimage``.
The foreground is 8-connected and the background 4-connected unless stated otherwise, the
pairing of OpenCV's border following (Suzuki and Abe, 1985) that wsolevaluation relies on.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """``(labels, n)``: int32 labels ``1 .. n`` of the components (0 is background), numbered
    in row-major order of each component's first pixel, and their count."""
    if connectivity == 8:
        structure = EIGHT_CONNECTED
    elif connectivity == 4:
        structure = FOUR_CONNECTED
    else:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    labels, count = ndimage.label(mask, structure=structure)
    return labels, int(count)


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tightest pixel-inclusive box ``(1, 4)`` around the True pixels, ``(0, 4)`` when none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return np.zeros((0, 4), dtype=np.int64)
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([[cols[0], rows[0], cols[-1], rows[-1]]], dtype=np.int64)


def component_boxes(labels: np.ndarray, count: int) -> np.ndarray:
    """Pixel-inclusive boxes ``(count, 4)`` of components ``1 .. count``, in label order."""
    # One pass of ufunc.at over the labelled pixels: ndimage.find_objects builds a slice pair
    # per label in Python objects and is ~10x slower on noisy maps with thousands of regions.
    flat = labels.ravel()
    where = np.flatnonzero(flat)
    owner = flat[where].astype(np.intp) - 1
    rows, cols = np.divmod(where, labels.shape[1])
    boxes = np.empty((count, 4), dtype=np.int64)
    boxes[:, :2] = np.iinfo(np.int64).max
    boxes[:, 2:] = -1
    np.minimum.at(boxes[:, 0], owner, cols)
    np.minimum.at(boxes[:, 1], owner, rows)
    np.maximum.at(boxes[:, 2], owner, cols)
    np.maximum.at(boxes[:, 3], owner, rows)
    return boxes


def region_scores(values: np.ndarray, labels: np.ndarray, count: int, score: str) -> np.ndarray:
    """Mean, sum or max of ``values`` over each labelled region ``1 .. count`` (float64)."""
    if count == 0:
        return np.zeros(0, dtype=np.float64)
    index = np.arange(1, count + 1)
    if score == "mean":
        scores = ndimage.mean(values, labels, index)
    elif score == "sum":
        scores = ndimage.sum_labels(values, labels, index)
    elif score == "max":
        scores = ndimage.maximum(values, labels, index)
    else:
        raise ValueError(f"score must be 'mean', 'sum' or 'max', got {score!r}")
    return np.asarray(scores, dtype=np.float64).reshape(count)


def euler_number_8(mask: np.ndarray) -> int:
    """(8-connected components) - (holes) of a mask, by Gray's bit quads.

    Over every 2 x 2 window of the zero-padded mask, ``E = (Q1 - Q3 - 2 QD) / 4`` with Q1 / Q3
    the windows holding one / three foreground pixels and QD those holding two diagonal ones.
    It tells whether a mask has holes without labelling its background.
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
    """Holes: 4-connected background regions that do not touch the border of the mask.

    Returns:
        ``(background_labels, count, is_hole)``: the labels of the 4-connected background
        regions, their count, and a boolean ``(count + 1,)`` flag per label (label 0, the
        foreground, is never a hole).
    """
    background_labels, count = label_components(~mask, connectivity=4)
    border = np.concatenate(
        [background_labels[0], background_labels[-1], background_labels[:, 0], background_labels[:, -1]]
    )
    is_hole = np.ones(count + 1, dtype=bool)
    is_hole[0] = False
    is_hole[border] = False
    return background_labels, count, is_hole


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every hole (see :func:`hole_labels`) set to True."""
    background_labels, _, is_hole = hole_labels(mask)
    return mask | is_hole[background_labels]


def doubled_contour_areas(labels: np.ndarray, count: int) -> np.ndarray:
    """Twice ``cv2.contourArea`` of the outer contour of each component ``1 .. count``.

    ``labels`` must label the 8-connected components of a mask whose holes are filled.
    OpenCV's outer contour of a component is the closed path through the centres of its
    border pixels; its area (shoelace formula) is the area enclosed by the lattice polygon.
    Cut the plane into unit squares whose corners are pixel centres: a square whose four
    corners are in the filled component lies inside the polygon (area 1), a square with
    three corners has its diagonal on the contour (area 1/2), and any other square
    contributes nothing (a one-pixel-wide part is walked out and back and encloses no
    area). So twice the area is ``2 * (#4-corner squares) + (#3-corner squares)``, an
    integer. Any two pixels of a 2 x 2 window are 8-neighbours, so a window's pixels
    belong to one component.

    Example: a lone pixel or a line has area 0; an L of three pixels 1/2; a 3 x 3 block 4.
    """
    padded = np.pad(labels, 1)
    corners = np.stack([padded[:-1, :-1], padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:]])
    inside = np.count_nonzero(corners, axis=0)
    weight = np.where(inside == 4, 2, np.where(inside == 3, 1, 0))
    owner = corners.max(axis=0)
    return np.bincount(owner.ravel(), weights=weight.ravel(), minlength=count + 1)[1:].astype(np.int64)


def last_argmax(values: np.ndarray) -> int:
    """Index of the last maximum of a non-empty 1-D array."""
    return len(values) - 1 - int(np.argmax(values[::-1]))
