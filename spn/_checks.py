"""Argument checks shared by the functional API, the module and the backends."""

from __future__ import annotations

import numbers

import torch

BACKENDS = ("auto", "torch", "cupy")
_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The walk mixes in far fewer steps (the released code stops at 20); a bound catches a typo such
# as iterations=10**9 before it runs for hours or, with detach=False, keeps that many states.
MAX_ITERATIONS = 10_000


def check_features(features) -> None:
    """Raise unless `features` is a 4-D floating tensor (B, K, H, W) with H, W >= 1."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor of shape (B, K, H, W), got {type(features).__name__}")
    if features.dim() != 4:
        raise ValueError(f"features must be 4-D (B, K, H, W), got shape {tuple(features.shape)}")
    if features.dtype not in _FLOATING:
        raise TypeError(f"features must be float16, bfloat16, float32 or float64, got {features.dtype}")
    if features.shape[2] < 1 or features.shape[3] < 1:
        raise ValueError(f"feature maps must be at least 1 x 1, got H x W = {features.shape[2]} x {features.shape[3]}")


def check_walk_options(iterations, tolerance) -> None:
    """Raise a clear error for an iteration count or tolerance of the wrong kind."""
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral)):
        raise TypeError(f"iterations must be None (exact stationary state) or an int >= 0, got {iterations!r}")
    if iterations is not None and not 0 <= int(iterations) <= MAX_ITERATIONS:
        raise ValueError(
            f"iterations must be between 0 and {MAX_ITERATIONS}, got {iterations} "
            "(iterations=None gives the exact stationary state, the limit of the walk)"
        )
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real):
        raise TypeError(f"tolerance must be a number >= 0, got {tolerance!r}")
    if not (0 <= float(tolerance) < float("inf")):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    if iterations is None and float(tolerance) > 0:
        raise ValueError("tolerance applies to an iterative walk: pass iterations=k as well")


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")


def check_detach(detach) -> None:
    """`detach` must be a bool: 'False' or None would otherwise pick a gradient silently."""
    if not isinstance(detach, bool):
        raise TypeError(f"detach must be True or False, got {detach!r}")
