"""Peak points of maps, in map or image coordinates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from spn._convert import ArrayLike, as_map_batch, check_size

__all__ = ["cell_centres", "peak_points"]


def cell_centres(indices: Any, map_length: int, image_length: int) -> np.ndarray:
    """Image coordinate of the centre of cells ``indices`` of a map spanning the image.

    ``(index + 0.5) * image_length / map_length - 0.5``; e.g. a 7-cell map over 224 pixels
    puts cell 0 at 15.5 (between pixels 15 and 16): where
    ``upsample_maps(..., align_corners=False)`` reproduces the cell's value.

    Example:
        >>> cell_centres([0, 6], 7, 224)
        array([ 15.5, 207.5])
    """
    return (np.asarray(indices, dtype=np.float64) + 0.5) * (image_length / map_length) - 0.5


def peak_points(maps: ArrayLike, size: Sequence[int] | None = None) -> np.ndarray:
    """Location of the maximum of each map, as ``(x, y)`` coordinates.

    Ties go to the first maximum in row-major order (smallest row, then smallest column).

    Two ways to get image coordinates from a feature-resolution ``(h, w)`` map; they do
    **not** agree in general (differences of up to half a stride):

    * ``peak_points(maps, size=(H, W))``: the map spans the whole image and the result is
      the centre of the peak cell (:func:`cell_centres`); 7 cells over 224 pixels: cell 0 ->
      15.5, cell 6 -> 207.5.
    * ``peak_points(upsample_maps(maps, (H, W), align_corners=...))`` (``size=None``: the
      map is at image resolution): the integer pixel ``(column, row)`` of the maximum of the
      upsampled map. With ``align_corners=False`` an interior peak cell gives a pixel next
      to its centre (with an even stride the one toward the larger neighbouring cell, the
      first on a tie) and a border cell gives the first pixel of the clamped plateau (cell
      0 -> 0, cell 6 -> 208). With ``align_corners=True`` cell ``j`` gives the pixel nearest
      ``j * (W - 1) / (w - 1)``: the released SPN code's route (``localize_from_map`` on a
      map upsampled by PyTorch <= 0.3's bilinear ``F.upsample``; see ``docs/metrics.md``).

    Args:
        maps: ``(B, h, w)`` tensor or array, finite.
        size: the image size ``(H, W)``, or None for coordinates in the map's own pixels.

    Returns:
        float64 array of ``(x, y)`` rows.

    Shape:
        - Input: :math:`(B, h, w)`.
        - Output: :math:`(B, 2)`.

    Example:
        >>> peak_points(np.array([[[0, 5, 5], [1, 2, 3]]]))
        array([[1., 0.]])
        >>> peak_points(np.zeros((1, 7, 7)), size=(224, 224))
        array([[15.5, 15.5]])
    """
    array = as_map_batch(maps)
    batch, height, width = array.shape
    if batch == 0:
        return np.zeros((0, 2), dtype=np.float64)
    flat_index = array.reshape(batch, -1).argmax(axis=1)  # first maximum in row-major order
    rows, cols = np.divmod(flat_index, width)
    if size is None:
        return np.stack([cols, rows], axis=1).astype(np.float64)
    image_height, image_width = check_size(size)
    return np.stack([cell_centres(cols, width, image_width), cell_centres(rows, height, image_height)], axis=1)
