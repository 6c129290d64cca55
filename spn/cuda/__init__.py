"""CUDA kernels for Soft Proposal, compiled by CuPy (NVRTC) and driven from torch."""

from __future__ import annotations

import torch


def is_available() -> bool:
    """True when CuPy imports and sees a CUDA device."""
    return False


def require(features: torch.Tensor) -> None:
    """Raise a RuntimeError saying what is missing for backend='cupy'."""
    raise RuntimeError("backend='cupy' is not implemented yet; use backend='torch'")
