"""The backward pass of Soft Proposal (paper section 3.3).

The forward pass is V_k = U_k * M(U). Given G = dE/dV (K, H, W):

* detach=True, the paper's Eq. 6: M is a constant, so dE/dU = G * M.
* detach=False, the exact gradient: add the path through M. With g_a = sum_k G_ka U_ka
  (= dE/dM_a), walk back through M(U) to dE/dD'_ab, then through D'_ab = d_ab L_ab and
  d_ab = ||u_a - u_b|| to dE/du_a = sum_b (dE/dd_ab + dE/dd_ba) (u_a - u_b) / d_ab.
  Where u_a = u_b the distance has no derivative; we take 0 (the minimum-norm subgradient).
"""

from __future__ import annotations

import numpy as np

from .graph import Epsilon, check_features, edge_weights, pairwise_distances, spatial_kernel, transfer_matrix
from .walk import check_walk_options, power_iteration, stationary_state

__all__ = ["soft_proposal_vjp"]


def soft_proposal_vjp(
    features,
    grad_coupled,
    epsilon: Epsilon = None,
    iterations: int | None = None,
    detach: bool = True,
    tolerance: float = 0.0,
) -> np.ndarray:
    """dE/dU for one image, given dE/dV: (K, H, W) -> (K, H, W).

    Args:
        features: (K, H, W) deep features U.
        grad_coupled: (K, H, W) gradient of the loss with respect to V = U * M.
        epsilon, iterations: as in `proposal_map`.
        detach: True for the paper's gradient (M constant), False for the exact one.
        tolerance: as in `proposal_map` (the walk's early stop; its steps are the ones differentiated).
    """
    u = check_features(features)
    check_walk_options(iterations, tolerance)
    g = np.asarray(grad_coupled, dtype=np.float64)
    if g.shape != u.shape:
        raise ValueError(f"grad_coupled must have the features' shape {u.shape}, got {g.shape}")
    k, h, w = u.shape
    vectors, grads = u.reshape(k, -1), g.reshape(k, -1)
    if iterations is None:
        m = stationary_state(u, epsilon)
    else:
        m = power_iteration(transfer_matrix(u, epsilon), iterations, tolerance).proposal
    grad_features = grads * m  # Eq. 6
    if not detach:
        grad_m = (grads * vectors).sum(axis=0)
        if iterations is None:
            grad_weights = _stationary_vjp(edge_weights(u, epsilon), grad_m)
        else:
            grad_weights = _walk_vjp(edge_weights(u, epsilon), grad_m, iterations, tolerance)
        grad_distances = grad_weights * spatial_kernel(h, w, epsilon)
        grad_features += _distances_vjp(vectors, pairwise_distances(u), grad_distances)
    return grad_features.reshape(k, h, w)


def _stationary_vjp(weights: np.ndarray, grad_m: np.ndarray) -> np.ndarray:
    """dE/dD'_ab through M = deg / sum(deg), deg_b = sum_a D'_ab (column sums)."""
    deg = weights.sum(axis=0)
    total = deg.sum()
    if total == 0:  # M is uniform whatever D' is (near here): no gradient
        return np.zeros_like(weights)
    m = deg / total
    grad_deg = (grad_m - grad_m @ m) / total
    return np.broadcast_to(grad_deg[None, :], weights.shape).copy()


def _walk_vjp(weights: np.ndarray, grad_m: np.ndarray, iterations: int, tolerance: float) -> np.ndarray:
    """dE/dD'_ab through the steps M_{t+1} = D M_t that the forward walk took.

    The forward walk also renormalises M after each step. That adds -1 (M'.g) to the
    gradient of each M_t, a multiple of the all-ones vector, and the column normalisation
    of D maps any such term to zero below (1' dD = 0 for columns that sum to 1), so it is
    left out here; the tests check the result against autograd of the renormalised walk.
    """
    n = weights.shape[0]
    column_sums = weights.sum(axis=0)
    positive = column_sums > 0
    transfer = np.full((n, n), 1.0 / n)
    transfer[:, positive] = weights[:, positive] / column_sums[positive]
    steps = power_iteration(transfer, iterations, tolerance).steps
    states = [np.full(n, 1.0 / n)]
    for _ in range(steps):
        states.append(transfer @ states[-1])  # renormalisation is a no-op in exact arithmetic
    grad_transfer = np.zeros((n, n))
    grad_state = grad_m
    for t in range(steps, 0, -1):
        grad_transfer += np.outer(grad_state, states[t - 1])
        grad_state = transfer.T @ grad_state
    # D_ab = D'_ab / s_b for columns with s_b > 0; zero columns are the constant 1/n.
    grad_weights = np.zeros((n, n))
    inner = (grad_transfer * transfer).sum(axis=0)  # sum_c dE/dD_cb D_cb
    grad_weights[:, positive] = (grad_transfer[:, positive] - inner[positive]) / column_sums[positive]
    return grad_weights


def _distances_vjp(vectors: np.ndarray, distances: np.ndarray, grad_distances: np.ndarray) -> np.ndarray:
    """dE/du_a = sum_b (dE/dd_ab + dE/dd_ba) (u_a - u_b) / d_ab, by direct differences: (K, n)."""
    symmetric = grad_distances + grad_distances.T
    with np.errstate(divide="ignore", invalid="ignore"):
        coefficients = np.where(distances > 0, symmetric / distances, 0.0)
    grad = np.empty_like(vectors)
    for a in range(vectors.shape[1]):
        grad[:, a] = ((vectors[:, a : a + 1] - vectors) * coefficients[a]).sum(axis=1)
    return grad
