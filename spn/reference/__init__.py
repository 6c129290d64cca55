"""Plain NumPy/SciPy reference of the Soft Proposal module, to be read beside the paper.

Zhu, Zhou, Ye, Qiu, Jiao: "Soft Proposal Networks for Weakly Supervised Object
Localization", ICCV 2017, section 3. Everything here is float64, one image at a time,
features shaped (K, H, W). Speed is not a goal; being obviously right is.

    graph.py     section 3.1, the graph: spatial kernel L, distances, D' and D
    walk.py      section 3.1, the random walk M <- D M and its stationary state
    coupling.py  section 3.2, V_k = U_k * M, and SPN's spatial sum pooling
    backward.py  section 3.3, the backward pass: Eq. 6 (M detached) and the exact one

The torch path in `spn/` beside this folder mirrors this layout file by file. Nothing here
imports the rest of the library (only NumPy and SciPy), so it stays an independent check.
"""

from .backward import soft_proposal_vjp
from .coupling import couple, sum_pool
from .graph import (
    check_features,
    default_epsilon,
    degrees,
    edge_weights,
    pairwise_distances,
    released_epsilon,
    resolve_epsilon,
    spatial_kernel,
    transfer_matrix,
)
from .walk import (
    ConvergenceWarning,
    WalkResult,
    power_iteration,
    proposal_map,
    stationary_eigs,
    stationary_state,
)

__all__ = [
    "ConvergenceWarning",
    "WalkResult",
    "check_features",
    "couple",
    "default_epsilon",
    "degrees",
    "edge_weights",
    "pairwise_distances",
    "power_iteration",
    "proposal_map",
    "released_epsilon",
    "resolve_epsilon",
    "soft_proposal_vjp",
    "spatial_kernel",
    "stationary_eigs",
    "stationary_state",
    "sum_pool",
    "transfer_matrix",
]
