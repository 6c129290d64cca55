"""The graph of Soft Proposal Generation (paper section 3.1).

Every location a = i * W + j of the (K, H, W) feature map is a node, u_a its K-vector.
The edge between a = (i, j) and b = (p, q) weighs

    D'_ab = ||u_a - u_b||_2 * L(i - p, j - q),   L(x, y) = exp(-(x^2 + y^2) / (2 eps^2)),

and D is D' with every column normalised to sum 1 (a column that sums to 0 becomes 1/n).

One liberty, which changes no result: D is all that the walk uses, and the column
normalisation removes any constant factor of D'. We therefore scale L so that nearest
neighbours (distance 1) weigh exactly 1:  L~(x, y) = exp(-(x^2 + y^2 - 1) / (2 eps^2)).
For a small eps the paper's L underflows to 0 for every pair, every column becomes
uniform and M would come out flat; the scaled kernel keeps the nearest neighbours and
gives the true small-eps answer. Both kernels give the same D wherever neither underflows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.spatial.distance import cdist

__all__ = [
    "check_features",
    "default_epsilon",
    "degrees",
    "edge_weights",
    "pairwise_distances",
    "released_epsilon",
    "resolve_epsilon",
    "spatial_kernel",
    "transfer_matrix",
]

Epsilon = float | Callable[[int, int], float] | None


def default_epsilon(height: int, width: int) -> float:
    """The paper's eps = 0.15 N on N x N maps, as 0.15 * sqrt(H * W) for any H x W."""
    return 0.15 * math.sqrt(height * width)


def released_epsilon(height: int, width: int) -> float:
    """The released code's eps = 0.15 * H * W (it assumes square maps)."""
    return 0.15 * height * width


def resolve_epsilon(epsilon: Epsilon, height: int, width: int) -> float:
    """Turn None (the default rule), a number, or a rule f(H, W) into a positive float."""
    if epsilon is None:
        epsilon = default_epsilon
    if callable(epsilon):
        epsilon = epsilon(height, width)
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.floating, np.integer)):
        raise TypeError(
            f"epsilon must be None, a positive number or a callable (H, W) -> number; got {type(epsilon).__name__}"
        )
    epsilon = float(epsilon)
    if not epsilon > 0:  # also catches NaN
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    return epsilon


def check_features(features) -> np.ndarray:
    """Return `features` as a float64 (K, H, W) array; raise on anything else."""
    array = np.asarray(features)
    if array.ndim != 3:
        raise ValueError(f"features must have shape (K, H, W), got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"features must be real numbers, got dtype {array.dtype}")
    if 0 in array.shape:
        raise ValueError(f"features must have K, H, W >= 1, got shape {array.shape}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError("features contain NaN or infinity")
    return array


def spatial_kernel(height: int, width: int, epsilon: Epsilon = None) -> np.ndarray:
    """L~ between all pairs of locations, scaled so that nearest neighbours weigh 1.

    Returns:
        (n, n) array, n = H * W, with L~_ab = exp(-(r_ab^2 - 1) / (2 eps^2)) for r_ab^2 > 1
        and 1 for r_ab^2 <= 1 (the diagonal is multiplied by a zero distance anyway).
    """
    eps = resolve_epsilon(epsilon, height, width)
    rows, cols = np.divmod(np.arange(height * width), width)
    r2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
        exponent = -(r2 - 1.0) / (2.0 * eps * eps)  # 2 eps^2 may underflow to 0: -inf, fine
        return np.where(r2 <= 1, 1.0, np.exp(exponent))


def pairwise_distances(features) -> np.ndarray:
    """||u_a - u_b||_2 for all pairs of locations, by direct differences: (n, n)."""
    u = check_features(features)
    k = u.shape[0]
    vectors = u.reshape(k, -1).T  # (n, K), row a is u_a
    return cdist(vectors, vectors, metric="euclidean")


def edge_weights(features, epsilon: Epsilon = None) -> np.ndarray:
    """D' (up to the constant factor that the column normalisation removes): (n, n), symmetric."""
    u = check_features(features)
    _, h, w = u.shape
    return pairwise_distances(u) * spatial_kernel(h, w, epsilon)


def degrees(features, epsilon: Epsilon = None) -> np.ndarray:
    """deg_a = sum_b D'_ab: (n,). Also the column sums of D', since D' is symmetric."""
    return edge_weights(features, epsilon).sum(axis=0)


def transfer_matrix(features, epsilon: Epsilon = None) -> np.ndarray:
    """The transfer matrix D: D' with columns normalised to sum 1, zero columns uniform.

    Returns:
        (n, n) array whose every column sums to 1.
    """
    weights = edge_weights(features, epsilon)
    n = weights.shape[0]
    column_sums = weights.sum(axis=0)
    transfer = np.full((n, n), 1.0 / n)
    positive = column_sums > 0
    transfer[:, positive] = weights[:, positive] / column_sums[positive]
    return transfer
