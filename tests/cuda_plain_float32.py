"""Soft Proposal in plain float32, as a user would write it in torch: the baseline of the
float32 accuracy tests of the CUDA kernels (tests/test_cuda_emulated.py, tests/test_cuda_gpu.py).

flash-attention's rule: the path under test may be at most twice as far from the float64
reference as a plain float32 evaluation of the same formula. "Plain" means every step in
float32: distances by direct differences summed over all channels, the dense (B, n, n)
weights, degrees or the column-normalised transfer matrix, the walk, all float32; autograd
gives its exact gradient (detach=False). The library's torch path cannot be the baseline: it
computes in float64 and rounds once, so its error is about one rounding and the bound would
collapse to the floor.
"""

from __future__ import annotations

import torch

__all__ = ["plain_float32_soft_proposal"]


def plain_float32_soft_proposal(u: torch.Tensor, epsilon: float, iterations: int | None = None, tolerance: float = 0.0):
    """(coupled (B, K, H, W), proposal (B, H, W)), both float32, on u's device.

    iterations=None: the stationary state deg / sum(deg); iterations=k: k steps of the walk
    from the uniform start, renormalised after each step, an image frozen once a step moves
    it by less than `tolerance` (> 0), keeping that step (as spn's walk). A column (or an
    image) whose weights sum to 0 is uniform. Zero distances have a zero gradient.
    """
    batch, channels, height, width = u.shape
    n = height * width
    x = u.float().reshape(batch, channels, n)
    squared = (x[:, :, :, None] - x[:, :, None, :]).square().sum(1)  # (B, n, n), float32
    positive = squared > 0
    distances = torch.where(positive, torch.where(positive, squared, 1.0).sqrt(), 0.0)
    index = torch.arange(n, device=u.device)
    rows, cols = (index // width).float(), (index % width).float()
    r2 = (rows[:, None] - rows[None]).square() + (cols[:, None] - cols[None]).square()
    # the kernel scaled so that nearest neighbours weigh 1, as the library's (same D)
    kernel = torch.where(r2 <= 1, 1.0, torch.exp(-(r2 - 1) / (2 * float(epsilon) ** 2)))
    weights = distances * kernel
    uniform = torch.full((batch, n), 1.0 / n, device=u.device)
    if iterations is None:
        deg = weights.sum(1)
        total = deg.sum(-1, keepdim=True)
        m = torch.where(total > 0, deg / torch.where(total > 0, total, 1.0), uniform)
    else:
        sums = weights.sum(1, keepdim=True)
        transfer = torch.where(sums > 0, weights / torch.where(sums > 0, sums, 1.0), 1.0 / n)
        m = uniform
        active = torch.ones(batch, 1, dtype=torch.bool, device=u.device)
        for _ in range(iterations):
            new = (transfer @ m[..., None])[..., 0]
            new = new / new.sum(-1, keepdim=True)
            change = (new - m).detach().norm(dim=-1, keepdim=True)
            m = torch.where(active, new, m)
            if tolerance > 0:
                active = active & (change >= tolerance)
    proposal = m.reshape(batch, height, width)
    return u.float() * proposal[:, None], proposal
