"""Checking and converting the metrics' inputs (private): boxes, labels, points, masks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from spn._convert import to_numpy


def as_boxes(boxes: Any, name: str = "boxes") -> np.ndarray:
    """Boxes as a float64 ``(m, 4)`` array of valid pixel-inclusive boxes (``(4,)`` -> ``(1, 4)``,
    empty -> ``(0, 4)``); raise on a wrong shape, non-finite values or ``x1 < x0`` / ``y1 < y0``."""
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


def batch_size_of(value: Any, name: str) -> int:
    """Number of images in a per-image argument: ``len`` of a sequence, first axis of an array."""
    if hasattr(value, "shape"):
        return int(value.shape[0]) if len(value.shape) >= 1 else 0
    if not isinstance(value, Sequence):
        raise TypeError(f"{name} must hold one entry per image (a sequence or an array), got {type(value).__name__}")
    return len(value)


def as_box_list(boxes: Any, batch_size: int, name: str = "gt_boxes") -> list[np.ndarray]:
    """Per-image boxes as ``batch_size`` float64 ``(m_i, 4)`` arrays, from a sequence of
    per-image boxes, a ``(B, 4)`` array (one box per image) or a ``(B, m, 4)`` array."""
    if hasattr(boxes, "shape"):
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


def as_labels(labels: Any, batch_size: int, name: str, num_classes: int | None = None) -> np.ndarray:
    """One integer class per sample as int64 ``(B,)``; with ``num_classes``, each in ``[0, num_classes)``."""
    array = to_numpy(labels)
    if array.ndim != 1 or array.shape[0] != batch_size:
        raise ValueError(f"{name} must have shape ({batch_size},), one class per sample; got shape {array.shape}")
    integral = np.issubdtype(array.dtype, np.integer) or (
        np.issubdtype(array.dtype, np.floating) and bool(np.all(array == np.round(array)))
    )
    if array.size and not integral:
        raise ValueError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if num_classes is not None and array.size and (array.min() < 0 or array.max() >= num_classes):
        bad = int(np.flatnonzero((array < 0) | (array >= num_classes))[0])
        raise ValueError(f"{name}[{bad}] = {array[bad]} is not a class index in [0, {num_classes})")
    return array


def as_label_list(labels: Any, box_list: list[np.ndarray], name: str = "box_labels") -> list[np.ndarray]:
    """Per-box labels as int64 ``(m_i,)`` arrays matching ``box_list``."""
    if hasattr(labels, "shape"):
        array = to_numpy(labels)
        labels = [row.reshape(-1) for row in (array[:, None] if array.ndim == 1 else array)]
    if not isinstance(labels, Sequence) or len(labels) != len(box_list):
        count = len(labels) if isinstance(labels, Sequence) else type(labels).__name__
        raise ValueError(f"{name} must be a list of {len(box_list)} arrays (one label per box); got {count}")
    return [
        as_labels(to_numpy(entry).reshape(-1), len(boxes), f"{name}[{index}]")
        for index, (entry, boxes) in enumerate(zip(labels, box_list, strict=True))
    ]


def as_points(points: Any, name: str = "points") -> np.ndarray:
    """Points as a finite float64 ``(B, 2)`` array of ``(x, y)``."""
    array = to_numpy(points)
    if array.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name} must have shape (B, 2) as (x, y) rows, got shape {array.shape}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite coordinates")
    return array


def as_mask(mask: Any, shape: tuple[int, int], name: str) -> np.ndarray:
    """A boolean ``(H, W)`` mask from a ``(H, W)`` or instance-stacked ``(m, H, W)`` array.

    Numbers are binarised as ``> 0.5`` (wsolevaluation's rule for its mask PNGs, so 0/1 and
    0/255 masks both work); instance masks are united.
    """
    array = to_numpy(mask)
    if array.ndim == 3:
        array = array.reshape(-1, *array.shape[1:])
        if array.shape[1:] != shape:
            raise ValueError(f"{name} must have the map's size {shape}, got shape {array.shape}")
        array = np.asarray((array > 0.5).any(axis=0) if array.dtype != bool else array.any(axis=0))
    if array.ndim != 2 or array.shape != shape:
        raise ValueError(f"{name} must have shape {shape} (or (m, *{shape}) instance masks), got shape {array.shape}")
    if array.dtype == bool:
        return array.copy()
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{name} must hold booleans or numbers, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array > 0.5


def check_fraction(value: float, name: str) -> float:
    """``value`` as a float in ``[0, 1]``."""
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def check_max_boxes(max_boxes: int | None) -> int | None:
    """``max_boxes`` as a positive int, or None (every box)."""
    if max_boxes is None:
        return None
    if isinstance(max_boxes, bool) or not isinstance(max_boxes, (int, np.integer)) or max_boxes < 1:
        raise ValueError(f"max_boxes must be a positive integer or None (every box), got {max_boxes!r}")
    return int(max_boxes)


def check_num_classes(num_classes: int | None, required: bool = False) -> int | None:
    """``num_classes`` as a positive int (or None when not ``required``)."""
    if num_classes is None and not required:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)
