"""CUDA kernels for Soft Proposal, compiled by CuPy (NVRTC) and driven from torch.

`backend="cupy"` of `spn.soft_proposal` lands in `cupy_soft_proposal`, which has the
signature and the results of `spn.functional.torch_soft_proposal`. The kernels are CUDA
C++ files in spn/cuda/kernels (compiled at first use, see spn/cuda/compile.py); the
autograd Function that launches them is in spn/cuda/function.py; docs/cuda.md describes
the whole path. CuPy is imported only when a kernel is needed: `import spn` never needs it.
"""

from __future__ import annotations

import torch

__all__ = ["cupy_soft_proposal", "is_available", "require"]

_INSTALL = (
    "install CuPy for your CUDA version: pip install 'spn-wsol[cuda12]' (cupy-cuda12x) or "
    "pip install 'spn-wsol[cuda13]' (cupy-cuda13x); or use backend='torch'"
)


def _import_cupy():
    """(cupy, None), or (None, the error) when CuPy cannot be imported."""
    try:
        import cupy
    except Exception as error:  # ImportError, or a CUDA library that fails to load
        return None, error
    return cupy, None


def is_available() -> bool:
    """True when CuPy imports and torch sees a CUDA device. Never raises."""
    try:
        cupy, _ = _import_cupy()
        return cupy is not None and torch.cuda.is_available()
    except Exception:
        return False


def require(features: torch.Tensor) -> None:
    """Raise a RuntimeError that says what to install or change for backend='cupy'."""
    cupy, error = _import_cupy()
    if cupy is None:
        raise RuntimeError(f"backend='cupy' needs CuPy, which could not be imported ({error}): {_INSTALL}")
    if not isinstance(features, torch.Tensor) or not features.is_cuda:
        device = features.device if isinstance(features, torch.Tensor) else type(features).__name__
        message = (
            f"backend='cupy' runs on CUDA tensors, got a tensor on {device}: "
            "move the tensor to a CUDA device or use backend='torch'"
        )
        if not torch.cuda.is_available():
            message += " (torch sees no CUDA device on this machine)"
        raise RuntimeError(message)
    if not torch.cuda.is_available():
        raise RuntimeError("backend='cupy' needs a CUDA GPU, and torch sees none: use backend='torch'")


def _launcher(device: torch.device):
    from .function import CupyLauncher

    return CupyLauncher(device)


@torch.compiler.disable
def cupy_soft_proposal(features: torch.Tensor, epsilon: float, iterations, tolerance: float, detach: bool):
    """The CUDA backend: (coupled, proposal, converged or None), as `torch_soft_proposal`.

    Arguments are checked by the caller (`spn.soft_proposal`): features (B, K, H, W) with
    B, H, W >= 1, epsilon a positive float, iterations None or an int >= 0, tolerance >= 0.
    Runs outside torch.compile graphs (a graph break), on torch's current stream.
    """
    require(features)
    from .function import soft_proposal

    return soft_proposal(features, epsilon, iterations, tolerance, detach, _launcher)
