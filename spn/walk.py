"""The random walk, batched in torch (mirrors spn/reference/walk.py).

`stationary_state` is the exact stationary state deg / sum(deg); `power_iteration` runs k
steps of M <- D M for the whole batch. Neither synchronises with the device: the
tolerance test freezes each image's M once a step moves it by less than the tolerance,
and all k steps run (no data-dependent loop), so the work is the same for every batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class WalkInfo(NamedTuple):
    """Per image: steps taken (B,), whether the tolerance was met (B,), last change (B,)."""

    steps: torch.Tensor
    converged: torch.Tensor
    change: torch.Tensor


def stationary_state(deg: torch.Tensor) -> torch.Tensor:
    """deg / sum(deg) per image, uniform where every degree is 0: (B, n) -> (B, n)."""
    total = deg.sum(-1, keepdim=True)
    safe = torch.where(total == 0, torch.ones_like(total), total)
    return torch.where(total == 0, torch.full_like(deg, 1.0 / deg.shape[-1]), deg / safe)


def power_iteration(transfer: torch.Tensor, iterations: int, tolerance: float = 0.0) -> tuple[torch.Tensor, WalkInfo]:
    """k steps of M <- D M (renormalised) from M = 1/n for a (B, n, n) batch of D."""
    batch, n, _ = transfer.shape
    m = transfer.new_full((batch, n), 1.0 / n)
    active = torch.ones(batch, dtype=torch.bool, device=transfer.device)
    steps = torch.zeros(batch, dtype=torch.long, device=transfer.device)
    change = transfer.new_full((batch,), float("nan"))
    for _ in range(iterations):
        new = torch.matmul(transfer, m.unsqueeze(-1)).squeeze(-1)
        new = new / new.sum(-1, keepdim=True)
        step_change = (new - m).norm(dim=-1)
        m = torch.where(active[:, None], new, m)
        change = torch.where(active, step_change, change)
        steps = steps + active.long()
        if tolerance > 0:
            active = active & ~(step_change < tolerance)
    converged = ~active if tolerance > 0 else torch.zeros_like(active)
    return m, WalkInfo(steps, converged, change)
