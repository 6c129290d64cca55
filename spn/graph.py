"""The graph of Soft Proposal Generation, batched in torch (mirrors spn/reference/graph.py).

Distances use the GEMM form ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b, which is an order of
magnitude faster than direct differences on a CPU, and guard its accuracy three ways:

1. it runs in float64 whatever the input dtype (float32 products are exact in float64);
2. features are centred per image and channel first (distances do not change, and |a|^2
   no longer carries a large common offset that the subtraction would cancel);
3. a squared distance within the rounding bound of the GEMM form, 2 (K + 2) 2^-53 (|a|^2 +
   |b|^2), is taken as exactly 0: identical feature vectors (all-equal maps, two-valued
   maps, the zero vectors after a ReLU) get distance 0, as direct differences give them.

No (B, n, n, K) tensor is ever made. The stationary mode needs only degrees, which are
accumulated over blocks of rows of the (B, n, n) distance matrix, and its backward pass
recomputes the blocks instead of storing them: memory O(B n K + block).
"""

from __future__ import annotations

import functools
import math

import torch

# Elements of one (B, rows, n) float64 block; a handful of such temporaries are alive at once.
BLOCK_ELEMENTS = 1 << 22


def _block_rows(batch: int, n: int) -> int:
    return max(1, min(n, BLOCK_ELEMENTS // max(1, batch * n)))


def _inverse_width(epsilon: float) -> float:
    denominator = 2.0 * epsilon * epsilon
    return 1.0 / denominator if denominator > 0 else math.inf


def spatial_kernel(height: int, width: int, epsilon: float, rows: slice | None = None, *, device=None) -> torch.Tensor:
    """L~_ab = exp(-(r_ab^2 - 1) / (2 eps^2)), 1 where r_ab^2 <= 1, float64, shape (rows, n).

    The paper's kernel divided by its nearest-neighbour value; the column normalisation of
    D removes the factor (see spn/reference/graph.py). Kernels of up to CACHED_KERNEL_ELEMENTS
    entries are made once per (H, W, eps, device) and kept (a training loop asks for the
    same one at every step); larger ones are made block by block, as asked.
    """
    n = height * width
    rows = rows or slice(0, n)
    if n * n <= CACHED_KERNEL_ELEMENTS:
        return _cached_kernel(height, width, float(epsilon), torch.device(device or "cpu"))[rows]
    return _kernel_rows(height, width, epsilon, rows, device)


# Up to 2^20 float64 entries (8 MiB) per cached kernel: maps of up to 32 x 32.
CACHED_KERNEL_ELEMENTS = 1 << 20


@functools.lru_cache(maxsize=16)
def _cached_kernel(height: int, width: int, epsilon: float, device: torch.device) -> torch.Tensor:
    return _kernel_rows(height, width, epsilon, slice(0, height * width), device)


def _kernel_rows(height: int, width: int, epsilon: float, rows: slice, device) -> torch.Tensor:
    n = height * width
    index = torch.arange(n, device=device)
    y, x = index // width, index % width
    r2 = ((y[rows, None] - y[None, :]) ** 2 + (x[rows, None] - x[None, :]) ** 2).to(torch.float64)
    kernel = torch.exp(-(r2 - 1.0) * _inverse_width(epsilon))
    return torch.where(r2 <= 1, torch.ones_like(kernel), kernel)


def _distance_block(vectors: torch.Tensor, squares: torch.Tensor, rows: slice) -> torch.Tensor:
    """Distances from the locations `rows` to all: (B, r, n), from centred float64 (B, K, n)."""
    k = vectors.shape[1]
    sum_of_squares = squares[:, rows, None] + squares[:, None, :]
    d2 = sum_of_squares - 2.0 * torch.matmul(vectors[:, :, rows].transpose(1, 2), vectors)
    same = d2 <= (2.0 * (k + 2) * 2.0**-53) * sum_of_squares  # NaN compares False and stays NaN
    return torch.where(same, torch.zeros_like(d2), d2).sqrt()


def _distances_vjp_block(vectors, coefficients, rows: slice) -> torch.Tensor:
    """sum_b C_ab (u_a - u_b) for a in `rows`, C symmetric: (B, K, r)."""
    return vectors[:, :, rows] * coefficients.sum(-1)[:, None, :] - torch.matmul(vectors, coefficients.transpose(1, 2))


def _centred(features: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) -> float64 (B, K, n), each channel of each image centred."""
    batch, channels, height, width = features.shape
    vectors = features.reshape(batch, channels, height * width).to(torch.float64)
    return vectors - vectors.mean(dim=-1, keepdim=True)


class _Degrees(torch.autograd.Function):
    """deg_a = sum_b ||u_a - u_b|| L~_ab from centred (B, K, n); backward recomputes blocks."""

    @staticmethod
    def forward(ctx, vectors, height, width, epsilon):
        batch, _, n = vectors.shape
        squares = (vectors * vectors).sum(1)
        deg = vectors.new_empty(batch, n)
        step = _block_rows(batch, n)
        for start in range(0, n, step):
            rows = slice(start, min(n, start + step))
            kernel = spatial_kernel(height, width, epsilon, rows, device=vectors.device)
            deg[:, rows] = (_distance_block(vectors, squares, rows) * kernel).sum(-1)
        ctx.save_for_backward(vectors)
        ctx.shape = (height, width, epsilon)
        return deg

    @staticmethod
    def backward(ctx, grad_deg):
        (vectors,) = ctx.saved_tensors
        height, width, epsilon = ctx.shape
        batch, _, n = vectors.shape
        squares = (vectors * vectors).sum(1)
        grad = torch.empty_like(vectors)
        step = _block_rows(batch, n)
        for start in range(0, n, step):
            rows = slice(start, min(n, start + step))
            kernel = spatial_kernel(height, width, epsilon, rows, device=vectors.device)
            distances = _distance_block(vectors, squares, rows)
            # d deg_a / d d_ab = L_ab and d deg_b / d d_ab = L_ab: C_ab = (g_a + g_b) L_ab / d_ab
            pair = (grad_deg[:, rows, None] + grad_deg[:, None, :]) * kernel
            coefficients = torch.where(distances > 0, pair / distances, torch.zeros_like(pair))
            grad[:, :, rows] = _distances_vjp_block(vectors, coefficients, rows)
        return grad, None, None, None


class _Distances(torch.autograd.Function):
    """The full (B, n, n) distance matrix from centred (B, K, n), for the iterative walk."""

    @staticmethod
    def forward(ctx, vectors):
        batch, _, n = vectors.shape
        squares = (vectors * vectors).sum(1)
        distances = vectors.new_empty(batch, n, n)
        step = _block_rows(batch, n)
        for start in range(0, n, step):
            rows = slice(start, min(n, start + step))
            distances[:, rows] = _distance_block(vectors, squares, rows)
        ctx.save_for_backward(vectors, distances)
        return distances

    @staticmethod
    def backward(ctx, grad_distances):
        vectors, distances = ctx.saved_tensors
        symmetric = grad_distances + grad_distances.transpose(1, 2)
        coefficients = torch.where(distances > 0, symmetric / distances, torch.zeros_like(symmetric))
        return _distances_vjp_block(vectors, coefficients, slice(None))


def degrees(features: torch.Tensor, epsilon: float) -> torch.Tensor:
    """deg_a = sum_b D'_ab, float64 (B, n), differentiable, without an n x n tensor in memory."""
    _, _, height, width = features.shape
    return _Degrees.apply(_centred(features), height, width, epsilon)


def transfer_matrix(features: torch.Tensor, epsilon: float) -> torch.Tensor:
    """D: D' with columns normalised to sum 1, zero columns uniform; float64 (B, n, n)."""
    _, _, height, width = features.shape
    n = height * width
    weights = _Distances.apply(_centred(features)) * spatial_kernel(height, width, epsilon, device=features.device)
    column_sums = weights.sum(dim=1, keepdim=True)
    # `== 0`, not `> 0`: a NaN column must stay NaN, not turn uniform.
    safe_sums = torch.where(column_sums == 0, torch.ones_like(column_sums), column_sums)
    return torch.where(column_sums == 0, torch.full_like(weights, 1.0 / n), weights / safe_sums)
