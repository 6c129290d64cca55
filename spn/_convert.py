"""The one place where ``spn`` turns tensors into NumPy arrays.

The rule of the WSOL layer: tensors until :mod:`spn.localize` (models, maps, upsampling
are torch operations), NumPy after it (boxes, metrics, pictures). Every conversion goes
through :func:`to_numpy`, once, at that border.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

__all__ = ["ArrayLike", "BoxesLike", "MasksLike", "as_map_batch", "check_finite_maps", "check_size", "to_numpy"]

ArrayLike = torch.Tensor | npt.ArrayLike
"""A tensor (any device) or anything ``numpy.asarray`` accepts: maps, points, labels."""

BoxesLike = torch.Tensor | np.ndarray | Sequence[ArrayLike]
"""Per-image boxes: a ``(B, 4)`` / ``(B, m, 4)`` tensor or array, or a sequence of ``B``
``(m_i, 4)`` ones (``m_i`` may differ); per-box labels likewise as ``B`` ``(m_i,)``."""

MasksLike = torch.Tensor | np.ndarray | Sequence[ArrayLike | None]
"""Per-image masks: a ``(B, H, W)`` tensor or array, or ``B`` ``(H, W)`` / ``(m, H, W)`` ones."""


def to_numpy(value: Any, dtype: npt.DTypeLike | None = None) -> np.ndarray:
    """``value`` as a NumPy array: a tensor is detached and copied to the CPU (once), anything
    else goes through ``numpy.asarray``. ``dtype`` converts on the way (a float64 request for a
    float32 tensor converts in torch before the copy, so there is one copy, not two)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if dtype is not None:
            target = torch.from_numpy(np.zeros(0, dtype=dtype)).dtype
            tensor = tensor.to(dtype=target)
        return tensor.cpu().numpy()
    return np.asarray(value, dtype=dtype)


def check_size(size: Sequence[int], name: str = "size") -> tuple[int, int]:
    """``(H, W)`` as two positive ints; raise ``ValueError`` naming ``name`` otherwise."""
    try:
        height, width = (int(value) for value in size)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (H, W), two positive integers; got {size!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"{name} must be (H, W), two positive integers; got {size!r}")
    return height, width


def as_map_batch(maps: Any, name: str = "maps", keep_float32: bool = False) -> np.ndarray:
    """A batch of maps as a new float64 ``(B, H, W)`` NumPy array; raise on anything else.

    Args:
        maps: ``torch.Tensor`` (any device; converted once by :func:`to_numpy`) or array-like.
        name: what to call the argument in error messages.
        keep_float32: keep float32 maps in float32 (everything else still becomes float64),
            for computations that must run in the input's precision, as wsolevaluation's
            normalisation does.

    Returns:
        A new float64 (or, with ``keep_float32``, float32) array, never a view of the input.

    Raises:
        ValueError: not 3-D, an empty spatial size, NaN or infinity (naming the image).
        TypeError: complex, boolean or non-numeric values.
    """
    array = to_numpy(maps)
    if array.ndim != 3:
        raise ValueError(
            f"{name} must have shape (B, H, W), got shape {array.shape}; for a single (H, W) map pass map[None]"
        )
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.shape[0] > 0 and (array.shape[1] == 0 or array.shape[2] == 0):
        raise ValueError(f"{name} must have H >= 1 and W >= 1, got shape {array.shape}")
    dtype = np.float32 if keep_float32 and array.dtype == np.float32 else np.float64
    array = np.array(array, dtype=dtype)  # always a copy
    check_finite_maps(array, name)
    return array


def check_finite_maps(maps: np.ndarray, name: str = "maps") -> None:
    """Raise ``ValueError`` naming the first image whose map holds NaN or infinity."""
    if maps.size == 0 or np.isfinite(maps).all():
        return
    index = int(np.flatnonzero(~np.isfinite(maps).all(axis=(1, 2)))[0])
    kind = "NaN" if np.isnan(maps[index]).any() else "infinite values"
    raise ValueError(
        f"{name}[{index}] contains {kind}; maps must be finite (check the network output, "
        "e.g. a division by zero in a normalisation)"
    )
