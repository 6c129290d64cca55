"""Soft Proposal Coupling and SPN's pooling, batched in torch (mirrors spn/reference/coupling.py)."""

from __future__ import annotations

import torch

__all__ = ["couple", "sum_pool"]


def couple(features: torch.Tensor, proposal: torch.Tensor) -> torch.Tensor:
    """V_k = U_k * M for every channel: (B, K, H, W) x (B, H, W) -> (B, K, H, W)."""
    if features.dim() != 4 or proposal.dim() != 3 or (
        features.shape[0],
        *features.shape[2:],
    ) != tuple(proposal.shape):
        raise ValueError(
            f"couple expects features (B, K, H, W) and a proposal (B, H, W) with the same B, H, W; "
            f"got {tuple(features.shape)} and {tuple(proposal.shape)}"
        )
    return features * proposal.unsqueeze(1)


def sum_pool(coupled: torch.Tensor) -> torch.Tensor:
    """SPN's spatial pooling, the sum over locations: (B, K, H, W) -> (B, K).

    M sums to 1, so on coupled features this is the M-weighted average of each channel.
    """
    return coupled.sum(dim=(-2, -1))
