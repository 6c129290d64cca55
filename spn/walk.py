"""The random walk, batched in torch (mirrors spn/reference/walk.py).

`stationary_state` is the exact stationary state deg / sum(deg); `power_iteration` runs up to k
steps of M <- D M for the whole batch.

With a tolerance, each image's M is frozen once a step moves it by less than the tolerance,
and the loop stops when every image is frozen. Knowing that needs the device's answer on the
host. On the CPU that costs nothing, so the test runs after every step; on other devices it
runs every SYNC_EVERY steps (a frozen image does not change, so the extra steps change no
result, they only cost time). While tracing (torch.compile, torch.export, torch.jit.trace,
torch.func transforms, fake tensors) and on meta tensors no data-dependent host check is made:
all k steps run, masked, and the traced program is valid for every input.
"""

from __future__ import annotations

import torch

__all__ = ["SYNC_EVERY", "can_read", "is_tracing", "power_iteration", "stationary_state"]

# Steps between two convergence checks on devices other than the CPU.
SYNC_EVERY = 8


def stationary_state(deg: torch.Tensor) -> torch.Tensor:
    """deg / sum(deg) per image, uniform where every degree is 0: (B, n) -> (B, n)."""
    total = deg.sum(-1, keepdim=True)
    safe = torch.where(total == 0, torch.ones_like(total), total)
    return torch.where(total == 0, torch.full_like(deg, 1.0 / deg.shape[-1]), deg / safe)


def is_tracing() -> bool:
    """True while torch.compile, torch.export, torch.jit.trace, a torch.func transform or a
    dispatch mode (fake tensors, make_fx) records the computation: no host-side data checks."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return True
    if torch._C._len_torch_dispatch_stack() > 0:
        return True
    return torch._C._functorch.peek_interpreter_stack() is not None


def can_read(tensor: torch.Tensor) -> bool:
    """Whether the host may read `tensor`'s values: not while tracing (see is_tracing), and not
    from a meta tensor, which has a shape and no data (shape inference on device="meta")."""
    return tensor.device.type != "meta" and not is_tracing()


def power_iteration(
    transfer: torch.Tensor, iterations: int, tolerance: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Up to k steps of M <- D M (renormalised) from M = 1/n for a (B, n, n) batch of D.

    Returns M (B, n) and, when tolerance > 0, whether each image met it (B,) bool, else None.
    """
    batch, n, _ = transfer.shape
    m = transfer.new_full((batch, n), 1.0 / n)
    if tolerance <= 0:
        for _ in range(iterations):
            new = torch.matmul(transfer, m.unsqueeze(-1)).squeeze(-1)
            m = new / new.sum(-1, keepdim=True)
        return m, None
    active = torch.ones(batch, dtype=torch.bool, device=transfer.device)
    may_stop = can_read(transfer)
    check_every = 1 if transfer.device.type == "cpu" else SYNC_EVERY
    for step in range(iterations):
        new = torch.matmul(transfer, m.unsqueeze(-1)).squeeze(-1)
        new = new / new.sum(-1, keepdim=True)
        moved = (new - m).norm(dim=-1)
        m = torch.where(active[:, None], new, m)
        active = active & ~(moved < tolerance)
        if may_stop and (step + 1) % check_every == 0 and not bool(active.any()):
            break
    return m, ~active
