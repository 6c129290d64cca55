"""Soft Proposal Coupling (paper section 3.2, Eq. 3) and SPN's pooling (section 3.3)."""

from __future__ import annotations

import numpy as np

from .graph import check_features

__all__ = ["couple", "sum_pool"]


def couple(features, proposal) -> np.ndarray:
    """V_k = U_k * M for every channel k: (K, H, W)."""
    u = check_features(features)
    m = np.asarray(proposal, dtype=np.float64)
    if m.shape != u.shape[1:]:
        raise ValueError(f"proposal must have shape {u.shape[1:]}, got {m.shape}")
    return u * m[None]


def sum_pool(coupled) -> np.ndarray:
    """SPN's spatial pooling: the sum over locations, (K, H, W) -> (K,).

    M sums to 1, so this is the M-weighted average of every channel.
    """
    return np.asarray(coupled, dtype=np.float64).sum(axis=(1, 2))
