"""Localisation from response maps: peak points and boxes, batched, on tensors or arrays.

Conventions used throughout ``spn``:

* A batch of maps has shape ``(B, H, W)``; a single map is ``map[None]``. Maps may be
  ``torch.Tensor`` (any device; they are detached and copied to the CPU) or anything
  ``numpy.asarray`` accepts. Results are NumPy arrays.
* Image coordinates: ``x`` is the column, ``y`` the row, both 0-based, and pixel ``(x, y)``
  has its centre at ``(x, y)`` and covers ``[x - 0.5, x + 0.5] x [y - 0.5, y + 0.5]``.
* Boxes are pixel-inclusive ``(x0, y0, x1, y1)``: the box covers the columns ``x0 .. x1`` and
  the rows ``y0 .. y1``, both ends included, so a one-pixel box has ``x0 == x1`` and
  ``y0 == y1`` and its area is ``(x1 - x0 + 1) * (y1 - y0 + 1) = 1``. This is the convention
  of PASCAL VOC, of the released SPN code and of wsolevaluation's IoU (see ``docs/metrics.md``).
* NaN or infinite maps are rejected with ``ValueError``; maps are never silently repaired.

The SPN paper (Zhu et al., ICCV 2017, section 4) localises with the peak of the class
response map, and boxes the foreground ``map >= ratio * mean(map)`` with ratio 1. The
released code (``localize_from_map`` in ``spnlib/spn/utils.py``) keeps ``>=``; in its
multi-object mode it labels connected components with ``scipy.ndimage.label`` and its
default structure, i.e. **4-connectivity** (``boxes_from_maps(..., connectivity=4)``), and
scores a component's box with the mean of the map over the component's pixels; in its
single-box mode it scores the box with the mean of the **whole map**. It takes its maps
from ``F.upsample(..., mode="bilinear")`` of PyTorch <= 0.3, which aligned corners
(``upsample_maps(..., align_corners=True)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

ThresholdMode = Literal["mean", "max"]
ScoreMode = Literal["mean", "sum", "max"]

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
"""Structuring element of 8-connectivity (diagonal neighbours join) for ``ndimage.label``."""

FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)
"""Structuring element of 4-connectivity (edge neighbours only) for ``ndimage.label``."""


def as_map_batch(maps, name: str = "maps", keep_float32: bool = False) -> np.ndarray:
    """Return a batch of maps as a float64 ``(B, H, W)`` NumPy array; raise on anything else.

    Args:
        maps: ``torch.Tensor`` or array-like of real numbers.
        name: what to call the argument in error messages.
        keep_float32: keep float32 maps in float32 (every other type still becomes
            float64); for computations that must run in the input's precision, as
            wsolevaluation's normalisation does.

    Returns:
        A new float64 (or, with ``keep_float32``, float32) array, never a view of the input.

    Raises:
        ValueError: wrong number of dimensions, an empty spatial size, NaN or infinity.
        TypeError: complex, boolean or non-numeric values.

    Shape:
        - Input: :math:`(B, H, W)`, ``B`` may be 0.
        - Output: :math:`(B, H, W)`.

    Example:
        >>> as_map_batch(torch.ones(2, 3, 4)).shape
        (2, 3, 4)
    """
    if isinstance(maps, torch.Tensor):
        target = torch.float32 if keep_float32 and maps.dtype == torch.float32 else torch.float64
        maps = maps.detach().to("cpu", target).numpy()
    array = np.asarray(maps)
    if array.ndim != 3:
        raise ValueError(
            f"{name} must have shape (B, H, W), got shape {array.shape}; "
            "for a single (H, W) map pass map[None]"
        )
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.shape[0] > 0 and (array.shape[1] == 0 or array.shape[2] == 0):
        raise ValueError(f"{name} must have H >= 1 and W >= 1, got shape {array.shape}")
    dtype = np.float32 if keep_float32 and array.dtype == np.float32 else np.float64
    array = array.astype(dtype)  # always a copy
    check_finite_maps(array, name)
    return array


def check_finite_maps(maps: np.ndarray, name: str = "maps") -> None:
    """Raise ``ValueError`` naming the first image whose map holds NaN or infinity."""
    if maps.size == 0 or np.isfinite(maps).all():
        return
    finite_per_image = np.isfinite(maps).all(axis=(1, 2))
    index = int(np.flatnonzero(~finite_per_image)[0])
    kind = "NaN" if np.isnan(maps[index]).any() else "infinite values"
    raise ValueError(
        f"{name}[{index}] contains {kind}; maps must be finite (check the network output, "
        "e.g. a division by zero in a normalisation)"
    )


def upsample_maps(maps, size: Sequence[int], align_corners: bool = False):
    """Resize maps ``(B, h, w) -> (B, H, W)`` (or ``(B, C, h, w) -> (B, C, H, W)``) bilinearly.

    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=align_corners)``. The two
    conventions place the map's cells differently in the image (column ``j`` of ``w``
    shown; rows likewise):

    * ``align_corners=False`` (default, current PyTorch and OpenCV): the map is ``h x w``
      cells tiling the image, so cell ``j`` takes its value exactly at its centre
      ``(j + 0.5) * W / w - 0.5`` (see :func:`cell_centres`; 15.5, 47.5, ... for 7 cells over
      224 pixels). Pixels beyond the outermost centres are clamped to the border cell's
      value, so a peak in a border cell becomes a plateau of half a stride (pixels 0..15 for
      cell 0) whose first pixel is the image border, not the cell centre.
    * ``align_corners=True``: cell ``j`` lands on image coordinate ``j * (W - 1) / (w - 1)``, so the
      corner cells land on the corner pixels (0 and 223 for 7 cells over 224 pixels) and
      nothing is clamped. This is what ``F.upsample(mode="bilinear")`` did in PyTorch <= 0.3,
      which the released SPN code used: pass True to reproduce its maps and points.

    With ``w == 1`` (or ``h == 1``) both give a constant row (column).

    Args:
        maps: ``torch.Tensor`` or NumPy array of shape ``(B, h, w)`` or ``(B, C, h, w)``.
        size: ``(H, W)``, the output (image) size.
        align_corners: see above.

    Returns:
        Same type as the input (a tensor keeps its device; integer tensors become float32;
        a NumPy array comes back as float64).

    Shape:
        - Input: :math:`(B, h, w)`.
        - Output: :math:`(B, H, W)`.

    Example:
        >>> upsample_maps(torch.tensor([[[1.0, 3.0]]]), (1, 4))
        tensor([[[1.0000, 1.5000, 2.5000, 3.0000]]])
        >>> upsample_maps(torch.tensor([[[1.0, 3.0]]]), (1, 4), align_corners=True)
        tensor([[[1.0000, 1.6667, 2.3333, 3.0000]]])
    """
    height, width = check_size(size)
    is_tensor = isinstance(maps, torch.Tensor)
    tensor = maps if is_tensor else torch.from_numpy(as_map_batch(maps))
    if tensor.ndim not in (3, 4):
        raise ValueError(f"maps must have shape (B, h, w) or (B, C, h, w), got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        tensor = tensor.float()
    stacked = tensor if tensor.ndim == 4 else tensor[:, None]
    if stacked.shape[0] == 0 or stacked.shape[1] == 0:
        resized = stacked.new_zeros((*stacked.shape[:2], height, width))
    else:
        resized = F.interpolate(stacked, size=(height, width), mode="bilinear", align_corners=bool(align_corners))
    resized = resized if tensor.ndim == 4 else resized[:, 0]
    return resized if is_tensor else resized.numpy()


def check_size(size: Sequence[int], name: str = "size") -> tuple[int, int]:
    """Return ``(H, W)`` as two positive ints; raise ``ValueError`` otherwise."""
    try:
        height, width = (int(value) for value in size)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (H, W), two positive integers; got {size!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"{name} must be (H, W), two positive integers; got {size!r}")
    return height, width


def cell_centres(indices: np.ndarray, map_length: int, image_length: int) -> np.ndarray:
    """Image coordinate of the centre of cells ``indices`` of a map spanning the image.

    ``(index + 0.5) * image_length / map_length - 0.5``; e.g. a 7-cell map over 224 pixels
    puts cell 0 at 15.5 (between pixels 15 and 16). This is where
    ``upsample_maps(..., align_corners=False)`` reproduces the cell's value; the argmax of
    the upsampled map can still sit elsewhere (see :func:`peak_points`).
    """
    return (np.asarray(indices, dtype=np.float64) + 0.5) * (image_length / map_length) - 0.5


def peak_points(maps, image_size: Sequence[int] | None = None) -> np.ndarray:
    """Location of the maximum of each map, as ``(x, y)`` image coordinates.

    Ties go to the first maximum in row-major order (smallest row, then smallest column).

    Two ways to get image coordinates from a feature-resolution ``(h, w)`` map; they do
    **not** agree in general (differences of up to half a stride):

    * ``peak_points(maps, image_size=(H, W))``: the map spans the whole image and the
      result is the centre of the peak cell, ``x = (column + 0.5) * W / w - 0.5`` and
      ``y = (row + 0.5) * H / h - 0.5`` (fractional when the stride is even); 7 cells over
      224 pixels: cell 0 -> 15.5, cell 6 -> 207.5.
    * ``peak_points(upsample_maps(maps, (H, W), align_corners=...))`` (``image_size=None``:
      the map is at image resolution): the integer pixel ``(column, row)`` of the maximum
      of the upsampled map. With ``align_corners=False`` an interior peak cell gives a
      pixel next to its centre (with an even stride the centre falls between two pixels;
      the one toward the larger neighbouring cell wins, the first on a tie: a lone peak in
      cell 3 of 7 over 224 -> 111, not 111.5) and a border cell gives the first pixel of the
      clamped plateau (cell 0 -> 0, cell 6 -> 208). With ``align_corners=True`` cell ``j`` gives
      the pixel nearest ``j * (W - 1) / (w - 1)`` (cell 0 -> 0, cell 6 -> 223). This route
      with ``align_corners=True`` is the released SPN code's (``localize_from_map`` on a
      map upsampled by PyTorch <= 0.3's bilinear ``F.upsample``; see ``docs/metrics.md``).

    Args:
        maps: ``(B, h, w)`` tensor or array.
        image_size: ``(H, W)`` or None.

    Returns:
        float64 array of ``(x, y)`` rows.

    Shape:
        - Input: :math:`(B, h, w)`.
        - Output: :math:`(B, 2)`.

    Example:
        >>> peak_points(np.array([[[0, 5, 5], [1, 2, 3]]]))
        array([[1., 0.]])
        >>> peak_points(np.zeros((1, 7, 7)), image_size=(224, 224))
        array([[15.5, 15.5]])
    """
    array = as_map_batch(maps)
    batch, height, width = array.shape
    if batch == 0:
        return np.zeros((0, 2), dtype=np.float64)
    flat_index = array.reshape(batch, -1).argmax(axis=1)  # first maximum in row-major order
    rows, cols = np.divmod(flat_index, width)
    if image_size is None:
        return np.stack([cols, rows], axis=1).astype(np.float64)
    image_height, image_width = check_size(image_size, "image_size")
    xs = cell_centres(cols, width, image_width)
    ys = cell_centres(rows, height, image_height)
    return np.stack([xs, ys], axis=1)


def foreground_masks(maps, threshold: ThresholdMode = "mean", ratio: float = 1.0) -> np.ndarray:
    """Foreground of each map: ``map >= ratio * mean(map)`` or ``map >= ratio * max(map)``.

    ``threshold="mean"`` with ``ratio=1`` is the SPN paper's rule. The comparison is ``>=``
    as in the released SPN code, so with ``ratio <= 1`` a constant map (including an all-zero
    map) is entirely foreground. A mask may be empty (e.g. ``ratio > 1`` on a constant
    positive map, or the ``"max"`` rule with ``ratio < 1`` on a map whose maximum is negative).

    Args:
        maps: ``(B, H, W)`` tensor or array.
        threshold: ``"mean"`` or ``"max"``: what ``ratio`` multiplies, per map.
        ratio: the factor.

    Returns:
        Boolean array.

    Shape:
        - Input: :math:`(B, H, W)`.
        - Output: :math:`(B, H, W)`.

    Example:
        >>> foreground_masks(np.array([[[0.0, 1.0, 3.0]]]))  # mean 4/3
        array([[[False, False,  True]]])
    """
    array = as_map_batch(maps)
    ratio = check_ratio(ratio)
    if threshold == "mean":
        reference = array.mean(axis=(1, 2), keepdims=True) if array.size else np.zeros((0, 1, 1))
    elif threshold == "max":
        reference = array.max(axis=(1, 2), keepdims=True) if array.size else np.zeros((0, 1, 1))
    else:
        raise ValueError(f"threshold must be 'mean' or 'max', got {threshold!r}")
    return array >= ratio * reference


def check_ratio(ratio: float) -> float:
    """Return ``ratio`` as a finite float; raise ``ValueError`` otherwise."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.integer, np.floating)):
        raise ValueError(f"ratio must be a finite number, got {ratio!r}")
    if not np.isfinite(ratio):
        raise ValueError(f"ratio must be a finite number, got {ratio!r}")
    return float(ratio)


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tightest pixel-inclusive box ``(x0, y0, x1, y1)`` around the True pixels of a 2-D mask.

    Returns:
        int64 array of shape ``(1, 4)``, or ``(0, 4)`` when the mask is empty.

    Example:
        >>> mask_box(np.array([[0, 0, 0], [0, 1, 1]], dtype=bool))
        array([[1, 1, 2, 1]])
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return np.zeros((0, 4), dtype=np.int64)
    return np.array([[cols[0], rows[0], cols[-1], rows[-1]]], dtype=np.int64)


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Label the connected components of a 2-D boolean mask with ``scipy.ndimage.label``.

    Labels ``1 .. n`` are numbered in row-major order of each component's first pixel.

    Args:
        mask: ``(H, W)`` boolean array.
        connectivity: 8 (diagonal neighbours join) or 4.

    Returns:
        ``(labels, n)``: int32 ``(H, W)`` labels (0 is background) and the component count.
    """
    if connectivity == 8:
        structure = EIGHT_CONNECTED
    elif connectivity == 4:
        structure = FOUR_CONNECTED
    else:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    labels, count = ndimage.label(mask, structure=structure)
    return labels, int(count)


def component_boxes(labels: np.ndarray, count: int) -> np.ndarray:
    """Pixel-inclusive boxes of components ``1 .. count`` of a label image, in label order.

    Returns:
        int64 array of shape ``(count, 4)``.
    """
    slices = ndimage.find_objects(labels, max_label=count)
    boxes = np.zeros((count, 4), dtype=np.int64)
    for index, (row_slice, col_slice) in enumerate(slices):
        boxes[index] = (col_slice.start, row_slice.start, col_slice.stop - 1, row_slice.stop - 1)
    return boxes


def region_scores(values: np.ndarray, labels: np.ndarray, count: int, score: ScoreMode) -> np.ndarray:
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


def boxes_from_maps(
    maps,
    threshold: ThresholdMode = "mean",
    ratio: float = 1.0,
    per_component: bool = False,
    score: ScoreMode = "mean",
    connectivity: int = 8,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Boxes around the foreground of each map (see :func:`foreground_masks`).

    * ``per_component=False`` (the SPN paper): one box, the tightest box around all
      foreground pixels; its score is the ``score`` of the map over the foreground pixels.
      (The released SPN code's single-box mode scores it with the mean of the *whole* map.)
    * ``per_component=True`` (the released SPN code's multi-object mode): one box per
      connected component of the foreground (``scipy.ndimage.label``; ``connectivity``
      8 by default, 4 as the released code, whose ``label`` call uses scipy's default
      4-connected structure), scored with the ``score`` of the map over that component's
      pixels (``"mean"``, as the released code, by default), sorted by score, highest first
      (equal scores keep row-major order of the components' first pixels). The first box
      of each map is therefore its best one.

    The map is used at its own resolution: pass maps upsampled to the image size
    (:func:`upsample_maps`) to get boxes in image pixels.

    Args:
        maps: ``(B, H, W)`` tensor or array.
        threshold: ``"mean"`` or ``"max"``.
        ratio: foreground is ``map >= ratio * mean`` (or ``* max``).
        per_component: one box per connected component instead of one box in all.
        score: ``"mean"``, ``"sum"`` or ``"max"`` of the map over the pixels the box was
            made from (the component's, or all foreground pixels), not over the whole box.
        connectivity: 8 (diagonal neighbours join) or 4 (the released code), used with
            ``per_component=True``.

    Returns:
        ``(boxes, scores)``: two lists of length ``B``; ``boxes[i]`` is an int64
        ``(k_i, 4)`` array of pixel-inclusive ``(x0, y0, x1, y1)``, ``scores[i]`` a float64
        ``(k_i,)`` array. ``k_i`` is 0 when map ``i`` has no foreground.

    Example:
        >>> m = np.zeros((1, 4, 6)); m[0, 0, 0] = m[0, 1, 1] = 1; m[0, 3, 5] = 2
        >>> boxes, scores = boxes_from_maps(m, per_component=True)
        >>> boxes[0].tolist(), scores[0].tolist()
        ([[5, 3, 5, 3], [0, 0, 1, 1]], [2.0, 1.0])
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    array = as_map_batch(maps)
    masks = foreground_masks(array, threshold, ratio)
    all_boxes: list[np.ndarray] = []
    all_scores: list[np.ndarray] = []
    for values, mask in zip(array, masks):
        if per_component:
            labels, count = label_components(mask, connectivity=connectivity)
            boxes = component_boxes(labels, count)
            scores = region_scores(values, labels, count, score)
            order = np.argsort(-scores, kind="stable")
            boxes, scores = boxes[order], scores[order]
        else:
            boxes = mask_box(mask)
            scores = region_scores(values, mask.astype(np.int32), len(boxes), score)
        all_boxes.append(boxes)
        all_scores.append(scores)
    return all_boxes, all_scores
