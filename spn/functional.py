"""`soft_proposal`: the functional form of the Soft Proposal module, and its dispatch."""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch

from . import graph, walk
from ._checks import check_backend, check_detach, check_features, check_walk_options
from .coupling import couple
from .presets import Epsilon, resolve_epsilon

__all__ = ["ConvergenceWarning", "soft_proposal", "torch_soft_proposal"]


class ConvergenceWarning(RuntimeWarning):
    """An iterative walk with a tolerance ran out of iterations before it was stable."""


def soft_proposal(
    features: torch.Tensor,
    *,
    epsilon: Epsilon = None,
    iterations: int | None = None,
    tolerance: float = 0.0,
    detach: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Soft Proposal (Zhu et al., ICCV 2017): the proposal map M of each image and V = U * M.

    Builds the graph D'_ab = ||u_a - u_b|| exp(-|p_a - p_b|^2 / (2 eps^2)) over the locations
    of each image, finds the state of the random walk M <- D M (D = D' with columns
    normalised), and couples it back: V_k = U_k * M.

    Args:
        features: deep features U, (B, K, H, W), any floating dtype; float16 and bfloat16 are
            computed in float32 and returned in their dtype; autocast is ignored inside.
        epsilon: width of the spatial kernel in feature-map cells: a number, a rule
            f(H, W) -> number, or None for 0.15 * sqrt(H * W).
        iterations: None (default) for the exact stationary state deg / sum(deg), which needs
            no n x n matrix; an int k for k steps of the walk from the uniform start. That
            builds D, (B, n, n) float64 (8 B n^2 bytes: 1.2 GiB for B = 16 at 56 x 56), and
            with detach=False autograd keeps a few such tensors for the backward pass.
        tolerance: with iterations=k, an image stops once a step moves its M by less than
            this (L2). A `ConvergenceWarning` says when some image never got there.
        detach: True (default) treats M as a constant in the backward pass, the paper's
            Eq. 6: dU = dV * M. False also differentiates through M (exact gradient).
        backend: "torch" (any device), "cupy" (CUDA kernels, CUDA tensors), or "auto": the
            CUDA kernels for CUDA tensors when CuPy is installed, otherwise torch.

    Returns:
        (coupled, proposal): V with the input's shape and dtype, and M, (B, H, W) in the
        input's dtype, summing to 1 over each image.

    Shape:
        - features: (B, K, H, W)
        - coupled: (B, K, H, W)
        - proposal: (B, H, W)

    Example:
        >>> u = torch.rand(2, 8, 7, 7)
        >>> v, m = soft_proposal(u)
        >>> v.shape, m.shape
        (torch.Size([2, 8, 7, 7]), torch.Size([2, 7, 7]))
        >>> torch.allclose(m.sum(dim=(1, 2)), torch.ones(2))
        True
    """
    check_features(features)
    check_walk_options(iterations, tolerance)
    check_detach(detach)
    check_backend(backend)
    batch, _, height, width = features.shape
    eps = resolve_epsilon(epsilon, height, width)
    if batch == 0:
        proposal = features.new_empty((0, height, width))
        return couple(features, proposal), proposal
    run = _select_backend(backend, features)
    coupled, proposal, converged = run(features, eps, iterations, tolerance, detach)
    if converged is not None and tolerance > 0 and walk.can_read(converged) and not bool(converged.all()):
        failed = int((~converged).sum())
        warnings.warn(
            f"{failed} of {batch} random walks did not reach tolerance {tolerance} in {iterations} steps",
            ConvergenceWarning,
            stacklevel=2,
        )
    return coupled, proposal


def _select_backend(backend: str, features: torch.Tensor):
    if backend == "torch" or (backend == "auto" and not features.is_cuda):
        return torch_soft_proposal
    from . import cuda  # imported only for CUDA tensors or backend="cupy": it loads torch._dynamo

    if backend == "cupy":
        cuda.require(features)
        return cuda.cupy_soft_proposal
    return cuda.cupy_soft_proposal if cuda.is_available() else torch_soft_proposal


def torch_soft_proposal(features, epsilon: float, iterations, tolerance: float, detach: bool):
    """The portable backend: (coupled, proposal, converged or None). Arguments checked by the caller."""
    batch, _, height, width = features.shape
    compute = features.float() if features.dtype in (torch.float16, torch.bfloat16) else features
    if torch.jit.is_tracing():
        compute = _same_size_as_traced(compute, height, width)
    converged = None
    # Autocast would run the walk's float32 products in bfloat16 on the CPU; it is switched off
    # only where it is on, so that exported programs carry no autocast region otherwise.
    off = (
        torch.autocast(features.device.type, enabled=False)
        if torch.amp.is_autocast_available(features.device.type) and torch.is_autocast_enabled(features.device.type)
        else nullcontext()
    )
    with off:
        source = compute.detach() if detach else compute
        if iterations is None:
            state = walk.stationary_state(graph.degrees(source, epsilon))
        else:
            state, converged = walk.power_iteration(graph.transfer_matrix(source, epsilon), iterations, tolerance)
        proposal = state.to(compute.dtype).reshape(batch, height, width)
        coupled = couple(compute, proposal)
    return coupled.to(features.dtype), proposal.to(features.dtype), converged


_size_guard = None


def _same_size_as_traced(features: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Under torch.jit.trace: a scripted check, kept in the trace, that later inputs have the traced H x W.

    The trace fixes epsilon (and the loop over blocks) for the traced size; at another size it
    would give a wrong map without a word, so it raises instead.
    """
    global _size_guard
    if _size_guard is None:

        def same_size(features: torch.Tensor, height: int, width: int) -> torch.Tensor:
            if features.size(2) != height or features.size(3) != width:
                raise RuntimeError(
                    "spn.soft_proposal was traced by torch.jit.trace at another H x W, and a trace fixes "
                    "epsilon for the traced size: trace once per size, or use torch.export with dynamic "
                    "shapes or torch.compile"
                )
            return features

        _size_guard = torch.jit.script(same_size)
    return _size_guard(features, height, width)
