"""The graph of Soft Proposal Generation, batched in torch (mirrors spn/reference/graph.py).

Everything the walk needs from the features is a set of pairwise distances d_ab = ||u_a - u_b||:
their kernel-weighted row sums (the degrees, for the exact stationary state) or the whole
(B, n, n) matrix (for k steps of the walk). This module computes them with matrix products
and keeps them as accurate as direct differences:

1. Scale. Each image is multiplied by an exact power of two 2^-e that brings its largest |u|
   near 1. M does not depend on it (D is column normalised), and squared norms can then
   neither overflow nor underflow, for every finite input of every dtype.
2. Centre. Each channel of each image is shifted by its mean: distances do not change, and
   squared norms lose the common offset that the matrix-product form would cancel.
3. Matrix product. With v the centred vectors, d_ab^2 = |v_a|^2 + |v_b|^2 - 2 v_a.v_b comes out
   of one GEMM of [v, |v|^2, 1] and [-2 v, 1, |v|^2] in the input's precision, over the blocks
   i <= j of the symmetric distance matrix only: half the products of a full evaluation.
4. Near pairs. That GEMM's error is about gamma_K (|v_a|^2 + |v_b|^2), gamma_K ~ sqrt(K) u. A
   pair is near when d_ab^2 < tau (|v_a|^2 + |v_b|^2); only there is the error large against
   d_ab^2. Rows that hold a near pair are recomputed (NEAR below): from float32 input, by a
   float64 GEMM of the exactly scaled features (error ~1e-16 / tau, relative); pairs below the
   second threshold, and every such pair of float64 input, by direct differences in float64,
   exact for float32 input: identical vectors get distance exactly 0.

The backward pass splits the pairs the same way: the far pairs contribute sum_b C_ab (v_a - v_b)
= v_a sum_b C_ab - (C v)_a through two GEMMs in the input's precision (the cancellation there is
at most 1 / sqrt(tau)), the recomputed rows through float64 GEMMs, the nearest pairs through
direct differences. The stationary mode never holds an n x n matrix: degrees and their gradient
are accumulated block by block and the backward pass recomputes the blocks, so its extra memory
is O(B n K + one block).

The numerical kernels are custom operators (``torch.ops.spn.*``): torch.compile, torch.export
(and its save/load) and torch.jit.trace see one opaque node each, with a shape function,
autograd and vmap rules. Where an operator cannot go (torch.func's grad and jvp transforms,
forward-mode AD, double backward) a dense composite of differentiable torch operations
computes the same function; it holds B K n^2 elements and refuses more than DENSE_ELEMENTS.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# Elements of one (B, rows, cols) block of the distance matrix; a few such temporaries are alive at once.
BLOCK_ELEMENTS = 1 << 21
# Per input dtype, (tau, tau_direct): rows with a pair below tau (|v_a|^2 + |v_b|^2) are recomputed
# by a float64 GEMM, pairs below tau_direct (|v_a|^2 + |v_b|^2) by direct differences in float64.
# The GEMM form's relative error on d^2 is about gamma_K / tau for the pairs it keeps: float32,
# gamma ~ sqrt(K) 2^-24; the float64 recomputation, gamma ~ sqrt(K) 2^-53, against tau_direct.
NEAR = {torch.float32: (2.0**-5, 2.0**-20), torch.float64: (2.0**-10, 2.0**-10)}
# The dense composite (torch.func transforms, forward-mode AD, double backward) holds a few
# (B, K, n, n) tensors: it refuses more elements than this (2^26: 512 MiB in float64 each).
DENSE_ELEMENTS = 1 << 26


# ----------------------------------------------------------------------------- kernel


def _inverse_width(epsilon: float) -> float:
    denominator = 2.0 * epsilon * epsilon
    return 1.0 / denominator if denominator > 0 else math.inf


def _kernel(width: int, rows: torch.Tensor, cols: torch.Tensor, epsilon: float, dtype) -> torch.Tensor:
    """L~ between the locations `rows` and `cols` (1-D index tensors): (len(rows), len(cols))."""
    dy = torch.div(rows, width, rounding_mode="floor")[:, None] - torch.div(cols, width, rounding_mode="floor")[None, :]
    dx = (rows % width)[:, None] - (cols % width)[None, :]
    r2 = (dy * dy + dx * dx).to(dtype)
    kernel = torch.exp(-(r2 - 1.0) * _inverse_width(epsilon))  # 2 eps^2 may underflow: -inf * 0 = NaN at r2 = 1
    return torch.where(r2 <= 1, torch.ones_like(kernel), kernel)


def spatial_kernel(
    height: int, width: int, epsilon: float, rows: slice | None = None, *, device=None, dtype=torch.float64
) -> torch.Tensor:
    """L~_ab = exp(-(r_ab^2 - 1) / (2 eps^2)), 1 where r_ab^2 <= 1: shape (rows, n).

    The paper's kernel divided by its nearest-neighbour value; the column normalisation of
    D removes the factor (see spn/reference/graph.py). Made on every call, never cached: it
    costs n^2 exponentials against the B K n^2 operations of the distances.
    """
    n = height * width
    rows = rows or slice(0, n)
    index = torch.arange(n, device=device)
    return _kernel(width, index[rows], index, epsilon, dtype)


# ----------------------------------------------------------------------------- scale


# Exponents of the smallest and the largest normal powers of two.
_NORMAL_EXPONENTS = {torch.float32: (-126, 127), torch.float64: (-1022, 1023)}


def _power_of_two(exponent: torch.Tensor, dtype) -> torch.Tensor:
    """2^exponent, exactly, built from its bits (exponent within the normal range of dtype)."""
    if dtype == torch.float64:
        return torch.bitwise_left_shift(exponent.to(torch.int64) + 1023, 52).view(torch.float64)
    return torch.bitwise_left_shift(exponent.to(torch.int32) + 127, 23).view(torch.float32)


def unit_scale(vectors: torch.Tensor) -> torch.Tensor:
    """Per image, an exact power of two 2^-e that brings max|u| into [1/2, 1): (B,) in vectors' dtype.

    e is clamped so that 2^-e is a normal number; max|u| 2^-e then lies in [2^-25, 4) for
    float32 and [2^-54, 4) for float64, for every finite input. An all-zero or non-finite
    image gets a factor of 1.
    """
    if vectors[0].numel() == 0:
        return torch.ones(vectors.shape[0], dtype=vectors.dtype, device=vectors.device)
    peak = vectors.abs().amax(dim=tuple(range(1, vectors.dim())))
    smallest, largest = _NORMAL_EXPONENTS[vectors.dtype]
    exponent = torch.frexp(peak).exponent.clamp(-largest, -smallest)
    return _power_of_two(-exponent, vectors.dtype)


# ----------------------------------------------------------------------------- blocked engine


class _Rows(NamedTuple):
    """Recomputed rows of one block: images and local rows (R,), their d^2 (R, c) float64,
    and the pairs among them computed by direct differences, as (index into R, local column)."""

    image: torch.Tensor
    row: torch.Tensor
    squared: torch.Tensor
    direct: tuple[torch.Tensor, torch.Tensor]


class _Prepared:
    """The per-call tensors of the blocked engine, locations in dim 1.

    With x = u 2^-e (exact) and v = x - mean (per image and channel): left = [v, |v|^2, 1] and
    right = [-2 v, 1, |v|^2], (B, n, K + 2), so that left_a . right_b = d_ab^2; squares |v|^2
    (B, n) float64. x and v in float64 are made only when some row needs recomputing.
    """

    def __init__(self, features: torch.Tensor):
        batch, channels, height, width = features.shape
        self.shape = (batch, channels, height, width)
        self.n = n = height * width
        self.width = width
        self.channels = channels
        self.dtype = features.dtype
        self.tau, self.tau_direct = NEAR[self.dtype]
        self.features = features.reshape(batch, channels, n)
        self.scale = unit_scale(self.features)[:, None, None]
        # The mean of x per channel, (B, 1, K), as a product with scale / n: no overflow on the
        # way, whatever the features' magnitude. Any centre near the mean will do.
        weights = (self.scale / n).expand(batch, n, 1)
        self.centre = torch.bmm(self.features, weights).transpose(1, 2)
        self.left = features.new_empty(batch, n, channels + 2)
        self.right = features.new_empty(batch, n, channels + 2)
        centred = self.left[..., :channels]
        torch.addcmul(-self.centre, self.features.transpose(1, 2), self.scale, out=centred)
        squares = torch.linalg.vector_norm(centred, dim=-1).square_()
        self.squares = squares.to(torch.float64)
        self.left[..., channels] = squares
        self.left[..., channels + 1] = 1.0
        torch.mul(centred, -2.0, out=self.right[..., :channels])
        self.right[..., channels] = 1.0
        self.right[..., channels + 1] = squares
        self._centred64 = None

    # -- pieces

    def centred(self, rows: slice) -> torch.Tensor:
        return self.left[:, rows, : self.channels]

    def centred64(self) -> tuple[torch.Tensor, torch.Tensor]:
        """v in float64 from the exact x (B, n, K), and |v|^2 (B, n): made on first use."""
        if self._centred64 is None:
            if self.dtype == torch.float64:
                self._centred64 = (self.left[..., : self.channels], self.squares)
            else:
                v = self.features.transpose(1, 2).to(torch.float64) * self.scale.to(torch.float64)
                v -= self.centre.to(torch.float64)
                self._centred64 = (v, v.square().sum(-1))
        return self._centred64

    def kernel(self, rows: slice, cols: slice, epsilon: float) -> torch.Tensor:
        device = self.left.device
        index_rows = torch.arange(rows.start, rows.stop, device=device)
        index_cols = torch.arange(cols.start, cols.stop, device=device)
        return _kernel(self.width, index_rows, index_cols, epsilon, self.dtype)

    def blocks(self) -> list[slice]:
        batch, n = self.shape[0], self.n
        size = max(1, min(n, math.isqrt(max(1, BLOCK_ELEMENTS // max(1, batch)))))
        count = -(-n // size)
        size = -(-n // count)
        return [slice(start, min(n, start + size)) for start in range(0, n, size)]

    def _chunks(self, count: int):
        chunk = max(1, BLOCK_ELEMENTS // max(1, self.channels))
        return [slice(start, start + chunk) for start in range(0, count, chunk)]

    def _differences(self, image, a, b) -> torch.Tensor:
        """x_a - x_b in float64 (exact for float32 input), for index tensors of pairs: (P, K)."""
        scale = self.scale[image, 0].to(torch.float64)
        return self.features[image, :, a].to(torch.float64) * scale - self.features[image, :, b].to(torch.float64) * scale

    def exact_squared_distances(self, image, a, b) -> torch.Tensor:
        """sum_k (x_ak - x_bk)^2 in float64 by direct differences, for index tensors of pairs."""
        parts = [self._differences(image[c], a[c], b[c]).square().sum(-1) for c in self._chunks(image.numel())]
        return torch.cat(parts) if parts else self.squares.new_empty(0)

    def add_direct(self, grad, coefficients, image, a, b) -> None:
        """grad[image, a] += C (x_a - x_b) by direct differences, for index tensors of pairs."""
        flat = grad.view(-1, self.channels)
        for c in self._chunks(image.numel()):
            contribution = coefficients[c].to(torch.float64)[:, None] * self._differences(image[c], a[c], b[c])
            flat.index_add_(0, image[c] * self.n + a[c], contribution.to(grad.dtype))

    def _per_image(self, image: torch.Tensor):
        """(image b, slice of the sorted index tensor `image` equal to b) for the images present."""
        start = 0
        for b, count in enumerate(torch.bincount(image, minlength=self.shape[0]).tolist()):
            if count:
                yield b, slice(start, start + count)
                start += count

    # -- distances

    def squared_distances(self, rows: slice, cols: slice) -> tuple[torch.Tensor, _Rows | None]:
        """d^2 from `rows` to `cols`, (B, r, c) in the input's dtype, and the recomputed rows or None."""
        block = torch.bmm(self.left[:, rows], self.right[:, cols].transpose(1, 2))
        diagonal = rows == cols
        if diagonal:
            block.diagonal(dim1=1, dim2=2).fill_(math.inf)  # not a near pair; exactly 0 below
        squares_rows, squares_cols = self.squares[:, rows], self.squares[:, cols]
        # A row can hold a near pair only if its smallest d^2 is below tau (|v_a|^2 + max_b |v_b|^2).
        bound = self.tau * (squares_rows + squares_cols.amax(-1, keepdim=True))
        candidates = block.amin(-1).to(torch.float64) < bound
        if diagonal:
            block.diagonal(dim1=1, dim2=2).fill_(0.0)
        if not bool(candidates.any()):
            return block, None
        recomputed = self.recompute_rows(*candidates.nonzero(as_tuple=True), rows.start, cols)
        if diagonal:
            # Close the set under symmetry, so that a near pair (a, b) has both rows recomputed
            # (the backward pass of a diagonal block is one-sided: row a gives a's gradient).
            while True:
                near = recomputed.squared < self.tau * (self.squares[recomputed.image, rows.start + recomputed.row][:, None]
                                                          + squares_cols[recomputed.image])
                mark = torch.zeros_like(candidates)
                mark[recomputed.image[near.nonzero()[:, 0]], near.nonzero()[:, 1]] = True
                mark &= ~candidates
                if not bool(mark.any()):
                    break
                candidates |= mark
                recomputed = self.recompute_rows(*candidates.nonzero(as_tuple=True), rows.start, cols)
        block[recomputed.image, recomputed.row] = recomputed.squared.to(block.dtype)
        return block, recomputed

    def recompute_rows(self, image, row, start: int, cols: slice) -> _Rows:
        """d^2 of the rows (image, start + row) to `cols` by a float64 GEMM, nearest pairs by direct differences."""
        v, squares = self.centred64()
        products = v.new_empty(image.numel(), cols.stop - cols.start)
        for b, part in self._per_image(image):
            products[part] = v[b, start + row[part]] @ v[b, cols].T
        sums = squares[image, start + row][:, None] + squares[image, cols]
        squared = sums - 2.0 * products
        which, col = (squared < self.tau_direct * sums).nonzero(as_tuple=True)
        squared[which, col] = self.exact_squared_distances(image[which], start + row[which], cols.start + col)
        return _Rows(image, row, squared, (which, col))

    # -- gradients

    def add_recomputed(self, grad, coefficients, recomputed: _Rows, rows: slice, cols: slice, both_sides: bool) -> None:
        """grad += the contributions of the recomputed rows' pairs, with coefficients (R, c) float64:
        float64 GEMMs, direct differences for the nearest pairs. The column side too if `both_sides`."""
        image, row, _, (which, col) = recomputed
        a, b = rows.start + row[which], cols.start + col
        direct = coefficients[which, col]
        coefficients[which, col] = 0.0
        self.add_direct(grad, direct, image[which], a, b)
        if both_sides:
            self.add_direct(grad, direct, image[which], b, a)
        v, _ = self.centred64()
        for image_b, part in self._per_image(image):
            c, v_rows, v_cols = coefficients[part], v[image_b, rows.start + row[part]], v[image_b, cols]
            grad[image_b].index_add_(0, rows.start + row[part], (v_rows * c.sum(-1, keepdim=True) - c @ v_cols).to(grad.dtype))
            if both_sides:
                grad[image_b, cols] += (v_cols * c.sum(0)[:, None] - c.T @ v_rows).to(grad.dtype)

    def new_gradient(self) -> torch.Tensor:
        return self.left.new_zeros(self.shape[0], self.n, self.channels)

    def to_features(self, grad: torch.Tensor) -> torch.Tensor:
        """A gradient with respect to the scaled vectors (B, n, K), as one for the features (B, K, H, W)."""
        batch, channels, height, width = self.shape
        return (grad * self.scale).transpose(1, 2).contiguous().view(batch, channels, height, width)


def _block_pairs(blocks):
    for i, rows in enumerate(blocks):
        for cols in blocks[i:]:
            yield rows, cols


def _degrees_impl(features: torch.Tensor, epsilon: float) -> torch.Tensor:
    prepared = _Prepared(features)
    deg = torch.zeros(features.shape[0], prepared.n, dtype=torch.float64, device=features.device)
    for rows, cols in _block_pairs(prepared.blocks()):
        block, _ = prepared.squared_distances(rows, cols)
        block.sqrt_().mul_(prepared.kernel(rows, cols, epsilon))
        deg[:, rows] += block.sum(-1)
        if rows != cols:
            deg[:, cols] += block.sum(-2)
    return deg


def _degrees_backward_impl(grad_deg: torch.Tensor, features: torch.Tensor, epsilon: float) -> torch.Tensor:
    prepared = _Prepared(features)
    g = grad_deg.to(prepared.dtype)
    grad = prepared.new_gradient()
    for rows, cols in _block_pairs(prepared.blocks()):
        block, recomputed = prepared.squared_distances(rows, cols)
        distances = block.sqrt_()
        weights = torch.where(distances > 0, prepared.kernel(rows, cols, epsilon) / distances, torch.zeros_like(distances))
        # d deg_a / d d_ab = d deg_b / d d_ab = L_ab: C_ab = (g_a + g_b) L_ab / d_ab
        coefficients = weights.mul_(g[:, rows, None] + g[:, None, cols])
        if recomputed is not None:
            image, row = recomputed.image, recomputed.row
            exact = coefficients[image, row].to(torch.float64)
            coefficients[image, row] = 0.0
            prepared.add_recomputed(grad, exact, recomputed, rows, cols, both_sides=rows != cols)
        v_rows, v_cols = prepared.centred(rows), prepared.centred(cols)
        grad[:, rows] += v_rows * coefficients.sum(-1, keepdim=True) - torch.bmm(coefficients, v_cols)
        if rows != cols:
            grad[:, cols] += v_cols * coefficients.sum(-2)[..., None] - torch.bmm(coefficients.transpose(1, 2), v_rows)
    return prepared.to_features(grad)


def _distances_impl(features: torch.Tensor) -> torch.Tensor:
    prepared = _Prepared(features)
    out = features.new_empty(features.shape[0], prepared.n, prepared.n)
    for rows, cols in _block_pairs(prepared.blocks()):
        block, _ = prepared.squared_distances(rows, cols)
        block.sqrt_()
        out[:, rows, cols] = block
        if rows != cols:
            out[:, cols, rows] = block.transpose(1, 2)
    return out


def _distances_backward_impl(grad_distances: torch.Tensor, features: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    prepared = _Prepared(features)
    grad = prepared.new_gradient()
    everything = slice(0, prepared.n)
    v_all = prepared.centred(everything)
    for rows in prepared.blocks():
        d = distances[:, rows]
        symmetric = grad_distances[:, rows] + grad_distances[:, :, rows].transpose(1, 2)
        coefficients = torch.where(d > 0, symmetric / d, torch.zeros_like(d))
        # The forward pass's split, decided on the distances it returned: rows with a near pair in float64.
        bound = prepared.tau * (prepared.squares[:, rows, None] + prepared.squares[:, None, :])
        candidates = ((d.to(torch.float64).square() < bound) & (d > 0)).any(-1)
        if bool(candidates.any()):
            image, row = candidates.nonzero(as_tuple=True)
            recomputed = prepared.recompute_rows(image, row, rows.start, everything)
            exact = coefficients[image, row].to(torch.float64)
            coefficients[image, row] = 0.0
            prepared.add_recomputed(grad, exact, recomputed, rows, everything, both_sides=False)
        grad[:, rows] += prepared.centred(rows) * coefficients.sum(-1, keepdim=True) - torch.bmm(coefficients, v_all)
    return prepared.to_features(grad)


# ----------------------------------------------------------------------------- dense composite


def _dense_distances(features: torch.Tensor) -> torch.Tensor:
    """d_ab of the scaled features by direct differences, differentiable at any order: (B, n, n).

    Where u_a = u_b the distance is 0 and so is every derivative (the minimum-norm subgradient).
    """
    batch, channels, height, width = features.shape
    elements = batch * channels * (height * width) ** 2
    if elements > DENSE_ELEMENTS:
        raise RuntimeError(
            f"spn.soft_proposal: under torch.func transforms (grad, jacrev, jacfwd, jvp), forward-mode AD and "
            f"double backward the torch path computes distances densely, and (B, K, n^2) = ({batch}, {channels}, "
            f"{(height * width) ** 2}) is {elements} elements, over spn.graph.DENSE_ELEMENTS = {DENSE_ELEMENTS}. "
            "Use smaller inputs there, or first-order reverse mode (loss.backward(), torch.autograd.grad), "
            "torch.func.vmap, torch.compile or torch.export, which need no dense tensor"
        )
    vectors = features.reshape(batch, channels, height * width)
    with torch.no_grad():
        scale = unit_scale(vectors)
    vectors = vectors * scale[:, None, None]
    difference = vectors[:, :, :, None] - vectors[:, :, None, :]
    squared = difference.square().sum(1)
    positive = squared > 0
    safe = torch.where(positive, squared, torch.ones_like(squared))
    return torch.where(positive, safe.sqrt(), torch.zeros_like(squared))


def _dense_degrees(features: torch.Tensor, epsilon: float) -> torch.Tensor:
    _, _, height, width = features.shape
    kernel = spatial_kernel(height, width, epsilon, device=features.device, dtype=features.dtype)
    return (_dense_distances(features) * kernel).sum(-1).to(torch.float64)


# ----------------------------------------------------------------------------- custom operators


@torch.library.custom_op("spn::degrees", mutates_args=())
def _degrees_op(features: torch.Tensor, epsilon: float) -> torch.Tensor:
    with torch.autocast(features.device.type, enabled=False):
        return _degrees_impl(features, epsilon)


@_degrees_op.register_fake
def _(features, epsilon):
    return features.new_empty((features.shape[0], features.shape[2] * features.shape[3]), dtype=torch.float64)


@torch.library.custom_op("spn::degrees_backward", mutates_args=())
def _degrees_backward_op(grad_deg: torch.Tensor, features: torch.Tensor, epsilon: float) -> torch.Tensor:
    with torch.autocast(features.device.type, enabled=False):
        return _degrees_backward_impl(grad_deg, features, epsilon)


@_degrees_backward_op.register_fake
def _(grad_deg, features, epsilon):
    return features.new_empty(features.shape)


def _degrees_setup(ctx, inputs, output):
    features, epsilon = inputs
    ctx.save_for_backward(features)
    ctx.epsilon = epsilon


def _degrees_backward(ctx, grad_deg):
    (features,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient, from the dense composite
        return _composite_vjp(lambda x: _dense_degrees(x, ctx.epsilon), features, grad_deg), None
    return _degrees_backward_op(grad_deg, features, ctx.epsilon), None


_degrees_op.register_autograd(_degrees_backward, setup_context=_degrees_setup)


@torch.library.custom_op("spn::distances", mutates_args=())
def _distances_op(features: torch.Tensor) -> torch.Tensor:
    with torch.autocast(features.device.type, enabled=False):
        return _distances_impl(features)


@_distances_op.register_fake
def _(features):
    n = features.shape[2] * features.shape[3]
    return features.new_empty((features.shape[0], n, n))


@torch.library.custom_op("spn::distances_backward", mutates_args=())
def _distances_backward_op(grad: torch.Tensor, features: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    with torch.autocast(features.device.type, enabled=False):
        return _distances_backward_impl(grad, features, distances)


@_distances_backward_op.register_fake
def _(grad, features, distances):
    return features.new_empty(features.shape)


def _distances_setup(ctx, inputs, output):
    (features,) = inputs
    ctx.save_for_backward(features, output)


def _distances_backward(ctx, grad):
    features, distances = ctx.saved_tensors
    if torch.is_grad_enabled():
        return _composite_vjp(_dense_distances, features, grad)
    return _distances_backward_op(grad.contiguous(), features, distances)


_distances_op.register_autograd(_distances_backward, setup_context=_distances_setup)


def _composite_vjp(function, features, grad):
    with torch.enable_grad():
        inner = features if features.requires_grad else features.detach().requires_grad_()
        (result,) = torch.autograd.grad(function(inner), inner, grad, create_graph=True)
    return result


def _fold(value, dim, size):
    """Move a vmapped dim to the front (or expand a missing one) and fold it into the batch."""
    value = value.movedim(dim, 0) if dim is not None else value.expand(size, *value.shape)
    return value.reshape(-1, *value.shape[2:])


def _degrees_vmap(info, in_dims, features, epsilon):
    out = _degrees_op(_fold(features, in_dims[0], info.batch_size), epsilon)
    return out.reshape(info.batch_size, -1, out.shape[-1]), 0


def _degrees_backward_vmap(info, in_dims, grad_deg, features, epsilon):
    size = info.batch_size
    out = _degrees_backward_op(_fold(grad_deg, in_dims[0], size), _fold(features, in_dims[1], size), epsilon)
    return out.reshape(size, -1, *out.shape[1:]), 0


def _distances_vmap(info, in_dims, features):
    out = _distances_op(_fold(features, in_dims[0], info.batch_size))
    return out.reshape(info.batch_size, -1, *out.shape[1:]), 0


def _distances_backward_vmap(info, in_dims, grad, features, distances):
    size = info.batch_size
    out = _distances_backward_op(*(_fold(t, d, size) for t, d in zip((grad, features, distances), in_dims)))
    return out.reshape(size, -1, *out.shape[1:]), 0


_degrees_op.register_vmap(_degrees_vmap)
_degrees_backward_op.register_vmap(_degrees_backward_vmap)
_distances_op.register_vmap(_distances_vmap)
_distances_backward_op.register_vmap(_distances_backward_vmap)


# ----------------------------------------------------------------------------- entry points


def _needs_dense(features: torch.Tensor) -> bool:
    """True under torch.func's grad or jvp transforms and under forward-mode AD (the operators' autograd
    rules do not reach there); vmap alone uses the operators' vmap rules."""
    if torch.compiler.is_compiling():
        return False
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    from torch._C._functorch import TransformType

    if any(i.key() in (TransformType.Grad, TransformType.Jvp) for i in retrieve_all_functorch_interpreters()):
        return True
    from torch.autograd import forward_ad

    return forward_ad._current_level >= 0 and forward_ad.unpack_dual(features).tangent is not None


def degrees(features: torch.Tensor, epsilon: float) -> torch.Tensor:
    """deg_a = sum_b d_ab L~_ab of the features scaled by 2^-e per image: float64 (B, n), differentiable.

    The scale does not change deg / sum(deg). No n x n tensor is made.
    """
    if _needs_dense(features):
        return _dense_degrees(features, epsilon)
    return _degrees_op(features, float(epsilon))


def distances(features: torch.Tensor) -> torch.Tensor:
    """d_ab of the features scaled by 2^-e per image: (B, n, n) in the features' dtype, differentiable."""
    if _needs_dense(features):
        return _dense_distances(features)
    return _distances_op(features)


# Bytes of the transfer matrix D, (B, n, n) in the compute dtype, that iterations=k may build.
TRANSFER_BYTES = 1 << 31


def transfer_matrix(features: torch.Tensor, epsilon: float) -> torch.Tensor:
    """D: D' with columns normalised to sum 1, zero columns uniform; (B, n, n) in the features' dtype.

    Refuses (RuntimeError) a D of more than TRANSFER_BYTES instead of swapping.
    """
    batch, _, height, width = features.shape
    n = height * width
    size = batch * n * n * features.element_size()
    if size > TRANSFER_BYTES:
        raise RuntimeError(
            f"spn.soft_proposal with iterations=k builds the transfer matrix D, (B, n, n) = ({batch}, {n}, {n}) "
            f"{features.dtype}: {size / 2**30:.2f} GiB, over the budget spn.graph.TRANSFER_BYTES = "
            f"{TRANSFER_BYTES / 2**30:.2f} GiB (with detach=False autograd keeps about three such tensors). "
            "Use iterations=None (the exact stationary state, which needs no n x n matrix), a smaller batch, "
            "or raise spn.graph.TRANSFER_BYTES"
        )
    weights = distances(features)
    kernel = spatial_kernel(height, width, epsilon, device=features.device, dtype=weights.dtype)
    in_place = not (torch.is_grad_enabled() and weights.requires_grad)
    weights = weights.mul_(kernel) if in_place else weights * kernel
    column_sums = weights.sum(dim=1, keepdim=True)
    # `== 0`, not `> 0`: a NaN column must stay NaN, not turn uniform.
    empty = column_sums == 0
    safe_sums = torch.where(empty, torch.ones_like(column_sums), column_sums)
    if in_place:
        return weights.div_(safe_sums).masked_fill_(empty, 1.0 / n)
    return torch.where(empty, torch.full_like(weights, 1.0 / n), weights / safe_sums)
