"""The NumPy reference applied image by image to a torch batch (any device), for the backend tests."""

import numpy as np

from spn.reference import backward as ref_backward
from spn.reference import graph as ref_graph
from spn.reference import walk as ref_walk


def reference_map(u, eps, iterations=None, tolerance=0.0):
    """(B, n) M of the reference, and (B,) the converged flags of its walk (False when stationary)."""
    maps, flags = [], []
    for image in u.detach().double().cpu().numpy():
        if iterations is None:
            maps.append(ref_walk.stationary_state(image, eps))
            flags.append(False)
        else:
            walk = ref_walk.power_iteration(ref_graph.transfer_matrix(image, eps), iterations, tolerance)
            maps.append(walk.proposal)
            flags.append(walk.converged)
    return np.stack(maps), np.array(flags)


def reference_grad(u, g, eps, iterations, tolerance, detach):
    """(B, K, H, W) dE/dU of the reference, given dE/dV."""
    return np.stack(
        [
            ref_backward.soft_proposal_vjp(image, grad, eps, iterations, detach=detach, tolerance=tolerance)
            for image, grad in zip(u.detach().double().cpu().numpy(), g.double().cpu().numpy(), strict=True)
        ]
    )
