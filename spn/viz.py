"""Pictures: maps blended over images, boxes and points drawn on them, PNG files.

Images come as ``uint8`` ``(H, W, 3)`` arrays or as float ``(3, H, W)`` tensors / arrays
with values in ``[0, 1]`` (also accepted: float ``(H, W, 3)`` in ``[0, 1]`` and ``(H, W)``
grey images); every function returns a new ``uint8`` ``(H, W, 3)`` array and leaves its
input alone. Boxes are pixel-inclusive ``(x0, y0, x1, y1)`` (x = column, y = row), points
``(x, y)``, as everywhere in ``spn``.

matplotlib (colour maps only) and Pillow (drawing, PNG) are imported inside the functions
that need them, so ``import spn`` imports neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from spn.localize import upsample_maps

Color = tuple[int, int, int]

PRED_COLOR: Color = (255, 0, 0)
GT_COLOR: Color = (0, 255, 0)
POINT_COLOR: Color = (255, 255, 0)


def to_uint8_image(image) -> np.ndarray:
    """Return ``image`` as a new ``uint8`` ``(H, W, 3)`` RGB array.

    Accepted: ``uint8`` ``(H, W, 3)``; float ``(3, H, W)`` (e.g. a tensor from
    ``torchvision.transforms.ToTensor``) or ``(H, W, 3)`` in ``[0, 1]``, scaled by 255 and
    rounded; ``(H, W)`` grey (uint8 or float in ``[0, 1]``), repeated over the channels.

    Raises:
        ValueError: any other shape, or NaN / infinite float values.

    Shape:
        - Input: :math:`(H, W, 3)`, :math:`(3, H, W)` or :math:`(H, W)`.
        - Output: :math:`(H, W, 3)`.

    Example:
        >>> to_uint8_image(torch.ones(3, 2, 4)).shape
        (2, 4, 3)
    """
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[0] == 3 and array.shape[2] != 3:
        array = np.transpose(array, (1, 2, 0))
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8 or (3, H, W) float in [0, 1]; got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.copy()
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("image contains NaN or infinite values")
        return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer) and array.min(initial=0) >= 0 and array.max(initial=0) <= 255:
        return array.astype(np.uint8)
    raise ValueError(f"image must be uint8 or float in [0, 1], got dtype {array.dtype}")


def map_to_unit(values: np.ndarray) -> np.ndarray:
    """Min-max scale a finite 2-D map to ``[0, 1]`` (a constant map becomes zeros)."""
    shifted = values - values.min()
    peak = shifted.max()
    return shifted / peak if peak > 0 else np.zeros_like(shifted)


def resize_map(response_map, size: Sequence[int]) -> np.ndarray:
    """One ``(h, w)`` map resized to ``size = (H, W)`` (bilinear), as float64."""
    array = response_map.detach().cpu().double().numpy() if isinstance(response_map, torch.Tensor) else response_map
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"map must have shape (h, w), got shape {array.shape}")
    if array.shape == tuple(size):
        if not np.isfinite(array).all():
            raise ValueError("map contains NaN or infinite values")
        return array
    return upsample_maps(array[None], size)[0]


def overlay(image, response_map, cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """Blend a colour-mapped response or proposal map over an image.

    The map (any size) is resized bilinearly to the image, min-max scaled to ``[0, 1]``
    (a constant map shows as the colour map's lowest colour), coloured with the matplotlib
    colour map ``cmap``, and blended: ``(1 - alpha) * image + alpha * colour``.

    Args:
        image: see :func:`to_uint8_image`.
        response_map: ``(h, w)`` tensor or array.
        cmap: matplotlib colour map name.
        alpha: weight of the map, in ``[0, 1]``.

    Returns:
        ``uint8`` ``(H, W, 3)`` array.

    Example:
        >>> picture = overlay(np.zeros((32, 32, 3), np.uint8), np.random.rand(7, 7))
        >>> picture.shape, picture.dtype
        ((32, 32, 3), dtype('uint8'))
    """
    import matplotlib  # lazy: only pictures need it

    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    rgb = to_uint8_image(image)
    values = map_to_unit(resize_map(response_map, rgb.shape[:2]))
    colours = matplotlib.colormaps[cmap](values)[..., :3] * 255.0
    blended = (1.0 - alpha) * rgb + alpha * colours
    return np.round(np.clip(blended, 0, 255)).astype(np.uint8)


def as_box_rows(boxes) -> np.ndarray:
    """Boxes as a float64 ``(k, 4)`` array (a single ``(4,)`` box becomes one row)."""
    array = boxes.detach().cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes, dtype=np.float64)
    array = np.asarray(array, dtype=np.float64).reshape(-1, 4) if array.size else np.zeros((0, 4))
    if ((array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1])).any():
        raise ValueError("boxes need x1 >= x0 and y1 >= y0 (pixel-inclusive (x0, y0, x1, y1))")
    return array


def draw_boxes(image, boxes, color: Color = PRED_COLOR, width: int = 2) -> np.ndarray:
    """Draw box outlines; the outline covers the box's edge pixels and grows inwards.

    Args:
        image: see :func:`to_uint8_image`.
        boxes: ``(k, 4)`` pixel-inclusive ``(x0, y0, x1, y1)``.
        color: RGB.
        width: outline thickness in pixels.

    Returns:
        ``uint8`` ``(H, W, 3)`` array.

    Example:
        >>> picture = draw_boxes(np.zeros((10, 10, 3), np.uint8), [[2, 2, 7, 7]], (255, 0, 0), 1)
        >>> picture[2, 5].tolist(), picture[5, 5].tolist()
        ([255, 0, 0], [0, 0, 0])
    """
    from PIL import Image, ImageDraw  # lazy: only pictures need it

    canvas = Image.fromarray(to_uint8_image(image))
    pen = ImageDraw.Draw(canvas)
    for x0, y0, x1, y1 in as_box_rows(boxes):
        pen.rectangle((x0, y0, x1, y1), outline=tuple(color), width=int(width))
    return np.asarray(canvas).copy()


def draw_points(image, points, color: Color = POINT_COLOR, radius: int = 3) -> np.ndarray:
    """Draw each point ``(x, y)`` as a filled disc of ``radius`` pixels.

    Returns:
        ``uint8`` ``(H, W, 3)`` array.

    Example:
        >>> draw_points(np.zeros((9, 9, 3), np.uint8), [[4, 4]], (255, 255, 0))[4, 4].tolist()
        [255, 255, 0]
    """
    from PIL import Image, ImageDraw  # lazy: only pictures need it

    canvas = Image.fromarray(to_uint8_image(image))
    pen = ImageDraw.Draw(canvas)
    array = points.detach().cpu().numpy() if isinstance(points, torch.Tensor) else np.asarray(points, dtype=np.float64)
    for x, y in np.asarray(array, dtype=np.float64).reshape(-1, 2):
        pen.ellipse((x - radius, y - radius, x + radius, y + radius), fill=tuple(color))
    return np.asarray(canvas).copy()


def show_localization(
    image,
    response_map=None,
    pred_boxes=None,
    gt_boxes=None,
    points=None,
    cmap: str = "jet",
    alpha: float = 0.5,
    width: int = 2,
) -> np.ndarray:
    """One picture: the map over the image, ground-truth boxes (green), predicted boxes
    (red) and points (yellow); every part is optional.

    Returns:
        ``uint8`` ``(H, W, 3)`` array.
    """
    picture = to_uint8_image(image) if response_map is None else overlay(image, response_map, cmap, alpha)
    if gt_boxes is not None:
        picture = draw_boxes(picture, gt_boxes, GT_COLOR, width)
    if pred_boxes is not None:
        picture = draw_boxes(picture, pred_boxes, PRED_COLOR, width)
    if points is not None:
        picture = draw_points(picture, points, POINT_COLOR, radius=max(2, width + 1))
    return picture


def save_png(path: str | Path, image) -> Path:
    """Write an image (see :func:`to_uint8_image`) as a PNG file; return its path.

    Example:
        >>> save_png("/tmp/picture.png", np.zeros((4, 4, 3), np.uint8))  # doctest: +SKIP
    """
    from PIL import Image  # lazy: only pictures need it

    path = Path(path)
    Image.fromarray(to_uint8_image(image)).save(path, format="PNG")
    return path
