"""Training images with regions erased, erased as they are read (adversarial erasing's steps).

A folder of erasing masks:

    FOLDER/erasing.json          {"fill": [r, g, b], ...}: the value erased pixels take (0-255)
    FOLDER/masks/<path>.png      one 1-bit PNG per image, of the original image's size: the
                                 pixels to erase (``<path>`` is the image's path in the metadata)

A dataset given `ErasedRegions` returns each image with its mask's pixels set to the fill,
before any resize, crop or flip: exactly the pixels an erased copy of the image would hold,
without a copy of the training set on disk (a 1-bit mask of a 500 x 375 image holds a few
kilobytes where a lossless copy of it holds hundreds).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from ._errors import DataError

__all__ = ["ErasedRegions", "erase_pixels", "mask_file", "read_mask", "write_mask"]

MANIFEST = "erasing.json"


def erase_pixels(image: np.ndarray, mask: np.ndarray, fill: Sequence[int]) -> np.ndarray:
    """A copy of ``image`` (H, W, 3) uint8 with the pixels of ``mask`` (H, W) set to ``fill``.

    Example:
        >>> erase_pixels(np.zeros((1, 2, 3), np.uint8), np.array([[True, False]]), (9, 8, 7))[0]
        array([[9, 8, 7],
               [0, 0, 0]], dtype=uint8)
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if np.shape(mask) != image.shape[:2]:
        raise ValueError(f"mask must be (H, W) = {image.shape[:2]}, got {np.shape(mask)}")
    erased = image.copy()
    erased[np.asarray(mask, dtype=bool)] = np.asarray(fill, dtype=np.uint8)
    return erased


def mask_file(folder: str | os.PathLike[str], path: str) -> Path:
    """Where the erasing mask of the image at metadata path ``path`` lies in ``folder``: inside
    it, so a path must be relative and stay below the image root (no ``..``)."""
    parts = PurePosixPath(path.replace("\\", "/"))
    if parts.is_absolute() or PureWindowsPath(path).is_absolute() or ".." in parts.parts:
        raise DataError(
            f"{path!r}: an erased image's path must be relative to the image root, without '..' "
            "(its mask is kept under the same path inside the masks folder)"
        )
    return Path(folder) / "masks" / f"{path}.png"


def write_mask(path: str | os.PathLike[str], mask: np.ndarray) -> None:
    """Write a bool (H, W) mask as a 1-bit PNG (parent folders made)."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.bool_:
        raise ValueError(f"mask must be a bool (H, W) array, got {mask.dtype} {mask.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path, format="PNG")  # a bool array is Pillow's mode "1"


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """A mask written by `write_mask`, as a bool (H, W) array (any PNG: nonzero pixels)."""
    try:
        with Image.open(path) as image:
            if image.mode == "1":
                return np.array(image, dtype=bool)
            return np.asarray(image.convert("L")) > 0
    except FileNotFoundError:
        raise DataError(f"{path}: no such erasing mask") from None
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DataError(f"{path}: cannot decode the erasing mask ({error})") from None


class ErasedRegions:
    """The erasing masks in ``folder`` (see the module's docstring), checked when made.

    Args:
        folder: the folder holding ``erasing.json`` and ``masks/``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = (Path(folder) / "erasing.json").write_text('{"fill": [9, 8, 7]}')
        ...     write_mask(mask_file(folder, "a.jpg"), np.array([[True, False]]))
        ...     ErasedRegions(folder).erase("a.jpg", np.zeros((1, 2, 3), np.uint8))[0].tolist()
        [[9, 8, 7], [0, 0, 0]]
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        try:
            values = json.loads(manifest.read_text())
        except FileNotFoundError:
            raise DataError(f"{manifest}: no erasing manifest (a folder of erasing masks holds one)") from None
        except (OSError, ValueError) as error:
            raise DataError(f"{manifest}: cannot read the erasing manifest ({error})") from None
        fill = values.get("fill") if isinstance(values, dict) else None
        if (
            not isinstance(fill, list)
            or len(fill) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in fill)
        ):
            raise DataError(f"{manifest}: 'fill' must be three integers in 0..255 (an RGB value), got {fill!r}")
        self.fill: tuple[int, int, int] = (fill[0], fill[1], fill[2])

    def mask_path(self, path: str) -> Path:
        """Where the mask of the image at metadata path ``path`` lies."""
        return mask_file(self.folder, path)

    def erase(self, path: str, image: np.ndarray) -> np.ndarray:
        """``image`` (H, W, 3) uint8, the image at metadata path ``path``, with its mask erased."""
        mask = read_mask(self.mask_path(path))
        if mask.shape != image.shape[:2]:
            raise DataError(
                f"{self.mask_path(path)}: the erasing mask is {mask.shape[1]} x {mask.shape[0]}, "
                f"the image {path!r} is {image.shape[1]} x {image.shape[0]}"
            )
        return erase_pixels(image, mask, self.fill)
