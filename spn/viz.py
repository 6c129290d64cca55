"""Pictures: maps blended over images, boxes and points drawn on them, PNG files.

Images come as ``uint8`` ``(H, W, 3)`` arrays or as float ``(3, H, W)`` tensors / arrays
with values in ``[0, 1]`` (also accepted: float ``(H, W, 3)`` in ``[0, 1]`` and ``(H, W)``
grey images); every function returns a new ``uint8`` ``(H, W, 3)`` array and leaves its
input alone. Boxes are pixel-inclusive ``(x0, y0, x1, y1)`` (x = column, y = row), points
``(x, y)``, as everywhere in ``spn``.

Maps and images may be tensors (any device) or NumPy arrays. A tensor map is resized in
torch (:func:`spn.models.upsample_maps`) and converted to NumPy once, at the end, by
:func:`spn._convert.to_numpy`; a NumPy map enters torch through ``torch.from_numpy`` (no copy).
Sizes are ``size = (H, W)``.

matplotlib (colour maps only) and Pillow (drawing, PNG) come with the ``pictures`` extra
(``pip install 'spn-wsol[pictures]'``); they are imported inside the functions that need
them, so ``import spn`` and ``import spn.viz`` import neither, and a missing one raises
``ModuleNotFoundError`` naming that extra.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spn._convert import to_numpy
from spn._io import atomic_path
from spn.models.maps import upsample_maps

__all__ = [
    "GT_COLOR",
    "POINT_COLOR",
    "PRED_COLOR",
    "Color",
    "as_box_rows",
    "draw_boxes",
    "draw_points",
    "map_to_unit",
    "overlay",
    "resize_map",
    "save_png",
    "show_localization",
    "to_uint8_image",
]

PICTURES_EXTRA = "pip install 'spn-wsol[pictures]'"
_PICTURE_MODULES = ("matplotlib", "PIL")

Color = tuple[int, int, int]

PRED_COLOR: Color = (255, 0, 0)
GT_COLOR: Color = (0, 255, 0)
POINT_COLOR: Color = (255, 255, 0)


@contextlib.contextmanager
def _pictures_extra(what: str = "spn.viz") -> Iterator[None]:
    """Turn a missing matplotlib or Pillow into an error that says what to install."""
    try:
        yield
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in _PICTURE_MODULES:
            raise
        raise ModuleNotFoundError(
            f"{what} needs matplotlib and Pillow, and {error.name} is not installed: {PICTURES_EXTRA}",
            name=error.name,
        ) from error


def _require_pictures(what: str) -> None:
    """Raise the error of :func:`_pictures_extra` now, before any work, if a picture module is missing."""
    with _pictures_extra(what):
        import matplotlib  # noqa: F401
        import PIL  # noqa: F401


def _write_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(temporary)`` to a file beside ``path``, then rename it to ``path`` (readers never
    see a half-written file; a failed write leaves ``path`` as it was)."""
    with atomic_path(path) as temporary:
        write(temporary)
    return Path(path)


def to_uint8_image(image: Any) -> np.ndarray:
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
    array = to_numpy(image)
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


def resize_map(response_map: Any, size: Sequence[int]) -> np.ndarray:
    """One ``(h, w)`` map resized to ``size = (H, W)`` (bilinear, ``align_corners=False``), as float64.

    The resizing is :func:`spn.models.upsample_maps` on the map's tensor (on its device); the
    result is converted to NumPy once.

    Raises:
        ValueError: the map is not 2-D, or holds NaN or infinite values.

    Example:
        >>> resize_map(torch.tensor([[1.0, 3.0]]), (1, 4))
        array([[1. , 1.5, 2.5, 3. ]])
    """
    if isinstance(response_map, torch.Tensor):
        tensor = response_map
    else:
        array = np.asarray(response_map)
        # no copy, except of a read-only array (torch.from_numpy would warn about it)
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    if tensor.ndim != 2:
        raise ValueError(f"map must have shape (h, w), got shape {tuple(tensor.shape)}")
    if tuple(tensor.shape) != tuple(size):
        tensor = upsample_maps(tensor[None], size)[0]
    array = to_numpy(tensor, np.float64)
    if not np.isfinite(array).all():
        raise ValueError("map contains NaN or infinite values")
    return array


def overlay(image: Any, response_map: Any, cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
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
    with _pictures_extra():
        import matplotlib  # lazy: only pictures need it

    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    rgb = to_uint8_image(image)
    values = map_to_unit(resize_map(response_map, rgb.shape[:2]))
    colours = matplotlib.colormaps[cmap](values)[..., :3] * 255.0
    blended = (1.0 - alpha) * rgb + alpha * colours
    return np.round(np.clip(blended, 0, 255)).astype(np.uint8)


def as_box_rows(boxes: Any) -> np.ndarray:
    """Boxes as a float64 ``(k, 4)`` array (a single ``(4,)`` box becomes one row)."""
    array = to_numpy(boxes, np.float64)
    array = array.reshape(-1, 4) if array.size else np.zeros((0, 4))
    if ((array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1])).any():
        raise ValueError("boxes need x1 >= x0 and y1 >= y0 (pixel-inclusive (x0, y0, x1, y1))")
    return array


def draw_boxes(image: Any, boxes: Any, color: Color = PRED_COLOR, width: int = 2) -> np.ndarray:
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
    with _pictures_extra():
        from PIL import Image, ImageDraw  # lazy: only pictures need it

    canvas = Image.fromarray(to_uint8_image(image))
    pen = ImageDraw.Draw(canvas)
    for x0, y0, x1, y1 in as_box_rows(boxes):
        pen.rectangle((x0, y0, x1, y1), outline=tuple(color), width=int(width))
    return np.asarray(canvas).copy()


def draw_points(image: Any, points: Any, color: Color = POINT_COLOR, radius: int = 3) -> np.ndarray:
    """Draw each point ``(x, y)`` as a filled disc of ``radius`` pixels.

    Returns:
        ``uint8`` ``(H, W, 3)`` array.

    Example:
        >>> draw_points(np.zeros((9, 9, 3), np.uint8), [[4, 4]], (255, 255, 0))[4, 4].tolist()
        [255, 255, 0]
    """
    with _pictures_extra():
        from PIL import Image, ImageDraw  # lazy: only pictures need it

    canvas = Image.fromarray(to_uint8_image(image))
    pen = ImageDraw.Draw(canvas)
    for x, y in to_numpy(points, np.float64).reshape(-1, 2):
        pen.ellipse((x - radius, y - radius, x + radius, y + radius), fill=tuple(color))
    return np.asarray(canvas).copy()


def show_localization(
    image: Any,
    response_map: Any = None,
    pred_boxes: Any = None,
    gt_boxes: Any = None,
    points: Any = None,
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


def save_png(path: str | Path, image: Any) -> Path:
    """Write an image (see :func:`to_uint8_image`) as a PNG file; return its path.

    The file is written beside ``path`` under a temporary name and renamed into place, so
    ``path`` never holds a half-written picture.

    Example:
        >>> save_png("/tmp/picture.png", np.zeros((4, 4, 3), np.uint8))  # doctest: +SKIP
    """
    with _pictures_extra():
        from PIL import Image  # lazy: only pictures need it

    picture = Image.fromarray(to_uint8_image(image))
    return _write_atomically(path, lambda temporary: picture.save(temporary, format="PNG"))
