"""`nn.Module` forms: `SoftProposal` and SPN's `SpatialSumPool`."""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_backend, check_detach, check_walk_options
from .coupling import sum_pool
from .functional import soft_proposal
from .presets import Epsilon, resolve_epsilon

__all__ = ["SoftProposal", "SpatialSumPool"]


class SoftProposal(nn.Module):
    r"""Soft Proposal module: couples features with their proposal map, V = U * M.

    A drop-in layer after a convolutional feature map. It has no parameters; the options
    are those of `spn.soft_proposal`, and `SoftProposal(**spn.RELEASED)` reproduces the
    authors' released code.

    Args:
        epsilon, iterations, tolerance, detach, backend: as in `spn.soft_proposal`.

    Shape:
        - Input: (B, K, H, W)
        - Output: (B, K, H, W); with ``return_proposal=True`` also M, (B, H, W).

    Example:
        >>> sp = SoftProposal()
        >>> u = torch.rand(4, 16, 14, 14)
        >>> v = sp(u)                                  # coupled features only
        >>> v, m = sp(u, return_proposal=True)         # and the proposal maps
        >>> SpatialSumPool()(v).shape                  # SPN's pooling
        torch.Size([4, 16])
    """

    def __init__(
        self,
        epsilon: Epsilon = None,
        iterations: int | None = None,
        tolerance: float = 0.0,
        detach: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_walk_options(iterations, tolerance)
        check_detach(detach)
        check_backend(backend)
        if epsilon is not None and not callable(epsilon):
            resolve_epsilon(epsilon, 1, 1)  # a bad number fails here, not at the first forward
        self.epsilon = epsilon
        self.iterations = iterations
        self.tolerance = tolerance
        self.detach = detach
        self.backend = backend

    def forward(self, features: torch.Tensor, return_proposal: bool = False):
        coupled, proposal = soft_proposal(
            features,
            epsilon=self.epsilon,
            iterations=self.iterations,
            tolerance=self.tolerance,
            detach=self.detach,
            backend=self.backend,
        )
        return (coupled, proposal) if return_proposal else coupled

    def extra_repr(self) -> str:
        epsilon = getattr(self.epsilon, "__name__", self.epsilon)
        return (
            f"epsilon={epsilon}, iterations={self.iterations}, tolerance={self.tolerance}, "
            f"detach={self.detach}, backend={self.backend!r}"
        )


class SpatialSumPool(nn.Module):
    """SPN's pooling: the sum over locations, (B, K, H, W) -> (B, K)."""

    def forward(self, coupled: torch.Tensor) -> torch.Tensor:
        return sum_pool(coupled)
