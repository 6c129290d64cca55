"""The one place where ``spn`` turns tensors into NumPy arrays.

The rule of the WSOL layer: tensors until :mod:`spn.localize` (models, maps, upsampling
are torch operations), NumPy after it (boxes, metrics, pictures). Every conversion goes
through :func:`to_numpy`, once, at that border.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch

__all__ = ["to_numpy"]


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
