"""The random walk of Soft Proposal Generation (paper section 3.1, Eq. 1-2).

M starts at 1/n everywhere and is updated by M <- D M "until stable". D' is symmetric, so
the walk is reversible: with deg_a = sum_b D'_ab, the vector pi = deg / sum(deg) satisfies

    (D pi)_a = sum_b D'_ab / deg_b * deg_b / sum(deg) = deg_a / sum(deg) = pi_a,

so pi is a stationary state, found without building D or iterating. Where some deg_b = 0,
column b of D is uniform, yet no positive-degree node sends mass to b (D'_ab = D'_ba = 0),
so b keeps none of it and pi_b = 0 is still right; if every degree is 0, D is uniform and
so is pi. `stationary_eigs` checks all this against SciPy's eigenvector of eigenvalue 1.

The walk can be periodic: on a 1 x 3 map with features [1, 0, 1] the middle node sends
all its mass to the ends and the ends send all of theirs to the middle, so from the
uniform start M alternates [1/6, 2/3, 1/6], [1/3, 1/3, 1/3], ... forever, while the
stationary state is [1/4, 1/2, 1/4]. `power_iteration` reports such a walk as unconverged.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.sparse.linalg import eigs

from .graph import Epsilon, check_features, degrees, transfer_matrix

__all__ = [
    "DENSE_EIGS",
    "ConvergenceWarning",
    "WalkResult",
    "check_walk_options",
    "power_iteration",
    "proposal_map",
    "stationary_eigs",
    "stationary_state",
]


class ConvergenceWarning(RuntimeWarning):
    """An iterative walk with a tolerance ran out of iterations before it was stable."""


@dataclass(frozen=True)
class WalkResult:
    """The outcome of `power_iteration`.

    Attributes:
        proposal: (n,) the last M, sums to 1.
        steps: how many steps M <- D M were taken.
        converged: True when tolerance > 0 and the last step changed M by less than it.
        change: ||M_last - M_before||_2 of the last step (NaN when no step was taken).
    """

    proposal: np.ndarray
    steps: int
    converged: bool
    change: float


def stationary_state(features, epsilon: Epsilon = None) -> np.ndarray:
    """The exact stationary state deg / sum(deg) (uniform when every degree is 0): (n,)."""
    deg = degrees(features, epsilon)
    total = deg.sum()
    if total > 0:
        return deg / total
    return np.full(deg.shape, 1.0 / deg.size)


# Up to this size every eigenvalue is computed (dense); above it, ARPACK's four largest.
DENSE_EIGS = 32


def stationary_eigs(transfer) -> np.ndarray:
    """The eigenvector of eigenvalue 1 of a column-stochastic matrix, scaled to sum 1.

    Uses ARPACK (`scipy.sparse.linalg.eigs`) for the few eigenvalues of largest real part, so
    the eigenvalue -1 of a periodic walk is never the one picked. A repeated eigenvalue 1 is
    seen only when at least two eigenvalues are computed, and ARPACK computes at most n - 2:
    matrices of up to DENSE_EIGS rows go to the dense `numpy.linalg.eig`, which sees them all.

    Raises:
        ValueError: when eigenvalue 1 is missing or not simple (no unique stationary state).
    """
    d = np.asarray(transfer, dtype=np.float64)
    n = d.shape[0]
    if d.shape != (n, n) or n == 0:
        raise ValueError(f"transfer must be a non-empty square matrix, got shape {d.shape}")
    if n <= DENSE_EIGS:
        values, vectors = np.linalg.eig(d)
    else:
        values, vectors = eigs(d, k=min(n - 2, 4), which="LR", v0=np.full(n, 1.0 / n))
    near_one = np.abs(values - 1.0) < 1e-8
    if near_one.sum() != 1:
        raise ValueError(f"eigenvalue 1 must be simple, found eigenvalues {np.sort_complex(values)}")
    vector = np.real(vectors[:, np.argmax(near_one)])
    return vector / vector.sum()


def power_iteration(transfer, iterations: int, tolerance: float = 0.0) -> WalkResult:
    """k steps of M <- D M from M = 1/n, stopping early when tolerance > 0 and a step moves M by less.

    M is renormalised to sum 1 after every step, as the released code does. D is column
    stochastic, so in exact arithmetic this changes nothing; it only stops rounding drift.
    """
    d = np.asarray(transfer, dtype=np.float64)
    n = d.shape[0]
    m = np.full(n, 1.0 / n)
    change, converged, steps = float("nan"), False, 0
    for steps in range(1, iterations + 1):  # noqa: B007 (steps is returned: how many were taken)
        new = d @ m
        new /= new.sum()
        change = float(np.linalg.norm(new - m))
        m = new
        if tolerance > 0 and change < tolerance:
            converged = True
            break
    return WalkResult(m, steps, converged, change)


def check_walk_options(iterations, tolerance) -> None:
    """Raise a clear error for an iteration count or tolerance of the wrong kind."""
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer))):
        raise TypeError(f"iterations must be None (exact stationary state) or an int >= 0, got {iterations!r}")
    if iterations is not None and iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float, np.floating)):
        raise TypeError(f"tolerance must be a number >= 0, got {tolerance!r}")
    if not (tolerance >= 0 and np.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    if iterations is None and tolerance > 0:
        raise ValueError("tolerance applies to an iterative walk: pass iterations=k as well")


def proposal_map(
    features, epsilon: Epsilon = None, iterations: int | None = None, tolerance: float = 0.0
) -> np.ndarray:
    """The proposal map M of one image: (K, H, W) features -> (H, W), sums to 1.

    Args:
        features: (K, H, W) deep features U.
        epsilon: the spatial kernel's width; None is 0.15 * sqrt(H * W).
        iterations: None for the exact stationary state (what "until stable" means), or k
            steps of the walk from the uniform start.
        tolerance: with iterations=k, stop once a step changes M by less than this (L2);
            a walk that never gets there raises a `ConvergenceWarning`.
    """
    u = check_features(features)
    check_walk_options(iterations, tolerance)
    _, h, w = u.shape
    if iterations is None:
        return stationary_state(u, epsilon).reshape(h, w)
    walk = power_iteration(transfer_matrix(u, epsilon), iterations, tolerance)
    if tolerance > 0 and not walk.converged:
        warnings.warn(
            f"the random walk did not reach tolerance {tolerance} in {iterations} steps "
            f"(last change {walk.change:.3g})",
            ConvergenceWarning,
            stacklevel=2,
        )
    return walk.proposal.reshape(h, w)
