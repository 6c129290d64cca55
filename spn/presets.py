"""Epsilon rules and named option sets.

`PAPER` is this library's default: the exact stationary state of the walk (what the
paper's "until stable" means) with eps = 0.15 * sqrt(H * W), the paper's 0.15 N on N x N maps.

`RELEASED` reproduces the authors' released code: eps = 0.15 * H * W, at most 20 steps of
the walk from the uniform start, stopping once a step changes M by less than 1e-4 (L2),
M renormalised to sum 1 after each step. One difference remains: the released code
discards the step that falls below the tolerance, this library keeps it; the two maps
differ by less than the tolerance.

Use either as keyword arguments:  ``spn.soft_proposal(u, **spn.RELEASED)``,
``spn.SoftProposal(**spn.RELEASED)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from types import MappingProxyType

__all__ = ["PAPER", "RELEASED", "default_epsilon", "released_epsilon", "resolve_epsilon"]

Epsilon = float | Callable[[int, int], float] | None


def default_epsilon(height: int, width: int) -> float:
    """The paper's eps = 0.15 N on N x N maps, as 0.15 * sqrt(H * W) for any H x W."""
    return 0.15 * math.sqrt(height * width)


def released_epsilon(height: int, width: int) -> float:
    """The released code's eps = 0.15 * H * W."""
    return 0.15 * height * width


def resolve_epsilon(epsilon: Epsilon, height: int, width: int) -> float:
    """Turn None (the default rule), a number, or a rule f(H, W) into a positive float."""
    if epsilon is None:
        epsilon = default_epsilon
    if callable(epsilon):
        epsilon = epsilon(height, width)
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise TypeError(
            f"epsilon must be None, a positive number or a callable (H, W) -> number; got {type(epsilon).__name__}"
        )
    epsilon = float(epsilon)
    if not epsilon > 0:  # also catches NaN
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    return epsilon


PAPER = MappingProxyType({"epsilon": None, "iterations": None, "tolerance": 0.0})
RELEASED = MappingProxyType({"epsilon": released_epsilon, "iterations": 20, "tolerance": 1e-4})
