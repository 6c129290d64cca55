"""The graph of Soft Proposal Generation, batched in torch (mirrors spn/reference/graph.py).

Everything the walk needs from the features is a set of pairwise distances d_ab = ||u_a - u_b||:
their kernel-weighted row sums (the degrees, for the exact stationary state) or the whole
(B, n, n) matrix (for k steps of the walk). This module computes them with matrix products
and keeps them as accurate as direct differences:

1. Scale. Each image is multiplied by an exact power of two 2^-e that brings its largest |u|
   near 1. M does not depend on it (D is column normalised), and squared norms can then
   neither overflow nor underflow, for every finite input of every dtype.
2. Centre. Each channel of each image is shifted by the mean of a sample of its values:
   distances do not change, and squared norms lose the common offset that the matrix-product
   form would cancel.
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
direct differences. The stationary mode never holds a (B, n, n) matrix: degrees and their
gradient are accumulated block by block, and the backward pass either recomputes the blocks or,
for maps whose upper triangle takes no more memory than the features (keeps_distances), reuses
what the forward kept, a few images' (n, n) coefficients at a time: extra memory O(B n K + one
block).

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

from .coupling import _channel_dot

__all__ = [
    "BLOCK_ELEMENTS",
    "CENTRE_SAMPLES",
    "DENSE_ELEMENTS",
    "NEAR",
    "SAFE_SQUARES",
    "STRIP_ELEMENTS",
    "TRANSFER_BYTES",
    "degrees",
    "distances",
    "keeps_distances",
    "spatial_kernel",
    "transfer_matrix",
    "unit_scale",
]

# Elements of one strip (images, rows, columns) of the distance matrix; a few such temporaries are
# alive at once (8M: 32 MiB in float32). Images are taken in groups that fit.
BLOCK_ELEMENTS = 1 << 23
# Elements a strip aims at (2M: 8 MiB in float32, cache-sized); see _strip_rows. More strips
# come closer to half the products, shorter ones make less efficient GEMMs.
STRIP_ELEMENTS = 1 << 21
# Locations sampled for the centre of each image (see _Prepared._setup).
CENTRE_SAMPLES = 64
# Squared norms within which the features are used unscaled (no overflow of d^2, no loss to
# subnormals); outside, every image is scaled by the exact power of two of `unit_scale`.
SAFE_SQUARES = {torch.float32: (2.0**-60, 2.0**60), torch.float64: (2.0**-800, 2.0**800)}
# Per input dtype, (tau forward, tau backward, tau_direct): rows with a pair below
# tau (|v_a|^2 + |v_b|^2) are recomputed by float64 GEMMs, pairs below tau_direct (|v_a|^2 + |v_b|^2)
# by direct differences in float64. The GEMM form's relative error on d^2 is about gamma_K / tau
# for the pairs it keeps (float32: gamma ~ sqrt(K) 2^-24; float64: sqrt(K) 2^-53). The forward
# pass tolerates a little more error on near pairs (they are short, and M sums them with all the
# others) than the gradient, whose terms C_ab (v_a - v_b) grow like 1 / d_ab: 2^-6 is the largest
# forward threshold that kept M within a plain float32 evaluation's error on the test maps, and
# spatially smooth features need no recomputation there.
NEAR = {torch.float32: (2.0**-6, 2.0**-5, 2.0**-20), torch.float64: (2.0**-10, 2.0**-10, 2.0**-10)}
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
    peak = vectors.reshape(vectors.shape[0], -1).abs().amax(1)
    smallest, largest = _NORMAL_EXPONENTS[vectors.dtype]
    exponent = torch.frexp(peak).exponent.clamp(-largest, -smallest)
    return _power_of_two(-exponent, vectors.dtype)


# ----------------------------------------------------------------------------- blocked engine


class _Rows(NamedTuple):
    """Rows of a strip recomputed in float64 over the columns `cols` (absolute, a range that holds
    every near pair of these rows): images and rows local to the strip (R,), d^2 (R, len(cols))
    float64, and the pairs computed by direct differences, as (index into R, column in cols)."""

    image: torch.Tensor
    row: torch.Tensor
    cols: slice
    squared: torch.Tensor
    direct: tuple[torch.Tensor, torch.Tensor]


def _strip_rows(batch: int, n: int, width: int) -> int:
    """Locations per strip: about STRIP_ELEMENTS / (B n), kept within n/40..n/4 (closer to half
    the products / longer GEMMs), whole image rows, and at most BLOCK_ELEMENTS / n."""
    rows = min(max(STRIP_ELEMENTS // max(1, batch * n), n // 40), max(1, n // 4))
    if rows >= width:
        rows = -(-rows // width) * width
    return max(1, min(n, rows, BLOCK_ELEMENTS // n))


def _batches(features: torch.Tensor, strip: int | None = None):
    """Slices of images whose strips hold at most BLOCK_ELEMENTS elements (at least one image)."""
    batch, _, height, width = features.shape
    n = height * width
    size = max(1, BLOCK_ELEMENTS // ((strip or _strip_rows(batch, n, width)) * n))
    return [slice(start, min(batch, start + size)) for start in range(0, batch, size)]


def _squared_norms(vectors: torch.Tensor) -> torch.Tensor:
    """sum over dim 1 of vectors^2, (B, K, n) -> (B, n), a few channels at a time (no (B, K, n)
    temporary, whose allocation and release to the system cost as much as the sum)."""
    return _channel_dot(vectors, vectors)


class _Prepared:
    """The tensors of the blocked engine for some images, in the features' layout (B, ., n).

    The distance matrix is visited in strips: the rows `rows` against the columns from
    rows.start to n, the upper triangle only (its first r columns are the strip's own rows).

    x = u s, with s = 1 when the squared norms come out comfortably inside the dtype's range
    (the common case: no pass over the features to find their scale) and otherwise the exact
    power of two of `unit_scale`; v = x - centre, per image and channel; squares |v|^2 (B, n).
    For maps with at least 2K locations, left = [v; |v|^2; 1] and right = [-2 v; 1; |v|^2],
    (B, K + 2, n), so that left_a . right_b = d_ab^2 (one GEMM per strip); smaller maps keep
    only v, and a strip is |v_a|^2 + |v_b|^2 - 2 v_a . v_b by baddbmm, which spares the copy.
    x and v in float64 are made only when some row needs recomputing.
    """

    def __init__(
        self,
        features: torch.Tensor,
        backward: bool = False,
        strip: int | None = None,
        scaled: torch.Tensor | None = None,
    ):
        batch, channels, height, width = features.shape
        self.shape = (batch, channels, height, width)
        self.n = n = height * width
        self.width = width
        self.channels = channels
        self.dtype = features.dtype
        forward_tau, backward_tau, self.tau_direct = NEAR[self.dtype]
        self.tau = backward_tau if backward else forward_tau
        self.features = features.reshape(batch, channels, n)
        self.augmented = n >= 2 * channels
        self.strip = strip or _strip_rows(batch, n, width)
        self._centred64: tuple[torch.Tensor, torch.Tensor] | None = None
        self._kernel: torch.Tensor | None = None
        self._candidate_bounds: torch.Tensor | None = None
        x = self.features
        if scaled is not None:  # per image, whether an earlier pass (the forward) scaled it
            scale = torch.where(scaled, unit_scale(x), 1.0)[:, None, None] if bool(scaled.any()) else None
            self._setup(scale, check=False)
        elif not self._setup(None, check=True):
            self._setup(unit_scale(x)[:, None, None], check=False)

    def _setup(self, scale: torch.Tensor | None, check: bool) -> bool:
        """Centre (and scale) the features; False if `check` and the unscaled squared norms are out
        of SAFE_SQUARES."""
        batch, channels, n = self.features.shape
        x = self.features
        self.scale: torch.Tensor | None = scale
        # The centre, (B, K, 1): per channel, the mean of at most CENTRE_SAMPLES locations (any
        # centre inside the data does; a median, which would sit in a background's group of
        # similar vectors, costs as much as the rest of a small map's pass). If x is huge, the
        # mean and the squares overflow, and the features are scaled.
        sample = x[:, :, :: max(1, n // CENTRE_SAMPLES)]
        self.centre = (sample * scale if scale is not None else sample).mean(-1, keepdim=True)
        self.left = x.new_empty(batch, channels + 2 if self.augmented else channels, n)
        centred = self.left[:, :channels]
        if scale is not None:
            torch.addcmul(-self.centre, x, scale, out=centred)
        else:
            torch.sub(x, self.centre, out=centred)
        self._squares: torch.Tensor | None = None
        self._squares64: torch.Tensor | None = None
        self.right = None
        if not (check or self.augmented):
            return True  # the squares are made on first use (a kept gradient may not need them)
        squares = self._squares = _squared_norms(centred)
        if check:
            low, high = SAFE_SQUARES[self.dtype]
            peak = squares.amax(-1)
            # NaN, or 0 (a constant image, or squares lost to underflow): scaled, to be sure.
            if not bool(((peak <= high) & (peak >= low)).all()):
                return False
        if self.augmented:
            self.left[:, channels] = squares
            self.left[:, channels + 1] = 1.0
            self.right = x.new_empty(batch, channels + 2, n)
            torch.mul(centred, -2.0, out=self.right[:, :channels])
            self.right[:, channels] = 1.0
            self.right[:, channels + 1] = squares
        return True

    # -- pieces

    @property
    def squares_input(self) -> torch.Tensor:
        """|v|^2 (B, n) in the input's dtype."""
        if self._squares is None:
            self._squares = _squared_norms(self.centred(slice(0, self.n)))
        return self._squares

    @property
    def squares(self) -> torch.Tensor:
        """|v|^2 (B, n) in float64."""
        if self._squares64 is None:
            self._squares64 = self.squares_input.to(torch.float64)
        return self._squares64

    def strips(self) -> list[slice]:
        return [slice(start, min(self.n, start + self.strip)) for start in range(0, self.n, self.strip)]

    def centred(self, rows: slice) -> torch.Tensor:
        """v of the locations `rows`: (B, K, r)."""
        return self.left[:, : self.channels, rows]

    def centred64(self) -> tuple[torch.Tensor, torch.Tensor]:
        """v in float64 from the exact x, row-major (B, n, K), and |v|^2 (B, n): made on first use."""
        if self._centred64 is None:
            v = self.features.transpose(1, 2).to(torch.float64, memory_format=torch.contiguous_format, copy=True)
            if self.scale is not None:
                v *= self.scale.to(torch.float64)
            v -= self.centre.transpose(1, 2).to(torch.float64)
            self._centred64 = (v, _squared_norms(v.transpose(1, 2)))
        return self._centred64

    def kernel(self, rows: slice, epsilon: float) -> torch.Tensor:
        """L~ from `rows` to the locations rows.start..n. When strips start on image rows the kernel
        of every strip is a slice of the first one's (it depends on offsets only): made once."""
        device = self.left.device
        if self.strip % self.width == 0:
            if self._kernel is None:
                index = torch.arange(self.n, device=device)
                self._kernel = _kernel(self.width, index[: self.strip], index, epsilon, self.dtype)
            return self._kernel[: rows.stop - rows.start, : self.n - rows.start]
        index = torch.arange(self.n, device=device)
        return _kernel(self.width, index[rows], index[rows.start :], epsilon, self.dtype)

    def _chunks(self, count: int):
        chunk = max(1, BLOCK_ELEMENTS // max(1, self.channels))
        return [slice(start, start + chunk) for start in range(0, count, chunk)]

    def _differences(self, image, a, b) -> torch.Tensor:
        """x_a - x_b in float64 (exact for float32 input), for index tensors of pairs: (P, K)."""
        x_a, x_b = self.features[image, :, a].to(torch.float64), self.features[image, :, b].to(torch.float64)
        if self.scale is None:
            return x_a - x_b
        scale = self.scale[image, 0].to(torch.float64)
        return x_a * scale - x_b * scale

    def exact_squared_distances(self, image, a, b) -> torch.Tensor:
        """sum_k (x_ak - x_bk)^2 in float64 by direct differences, for index tensors of pairs."""
        parts = [self._differences(image[c], a[c], b[c]).square().sum(-1) for c in self._chunks(image.numel())]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64, device=self.features.device)

    def add_direct(self, grad, coefficients, image, a, b) -> None:
        """grad[image, :, a] += C (x_a - x_b) by direct differences, for index tensors of pairs."""
        transposed = grad.transpose(1, 2)
        for c in self._chunks(image.numel()):
            contribution = coefficients[c].to(torch.float64)[:, None] * self._differences(image[c], a[c], b[c])
            transposed.index_put_((image[c], a[c]), contribution.to(grad.dtype), accumulate=True)

    def _per_image(self, image: torch.Tensor):
        """(image b, slice of the sorted index tensor `image` equal to b) for the images present."""
        start = 0
        for b, count in enumerate(torch.bincount(image, minlength=self.shape[0]).tolist()):
            if count:
                yield b, slice(start, start + count)
                start += count

    # -- distances

    def _gemm(self, rows: slice) -> torch.Tensor:
        if self.augmented:
            assert self.right is not None  # made by _setup whenever augmented
            return torch.bmm(self.left[:, :, rows].transpose(1, 2), self.right[:, :, rows.start :])
        squares = self.squares_input
        sums = squares[:, rows, None] + squares[:, None, rows.start :]
        return torch.baddbmm(
            sums, self.centred(rows).transpose(1, 2), self.centred(slice(rows.start, self.n)), alpha=-2.0
        )

    def squared_distances(
        self, rows: slice, backward_near: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, _Rows | None]:
        """d^2 from `rows` to rows.start..n, (B, r, w) in the input's dtype, and the recomputed rows
        or None. With `backward_near` (B,), writes there whether each image's strip fails the
        backward pass's test (a row may hold a pair nearer than its tau, or d = 0 off the diagonal)."""
        block = self._gemm(rows)
        r = rows.stop - rows.start
        diagonal = block[:, :, :r].diagonal(dim1=1, dim2=2)
        diagonal.fill_(math.inf)  # not a near pair; exactly 0 below
        # A row can hold a near pair only if its smallest d^2 is below tau (|v_a|^2 + max_b |v_b|^2).
        nearest = block.amin(-1)
        candidates = nearest < self._bounds(rows)
        if backward_near is not None:
            # `<=`: a zero bound (the strip's vectors all equal) with d = 0 is flagged too
            backward_near.copy_((nearest <= self._bounds(rows, NEAR[self.dtype][1])).any(-1))
        if not bool(candidates.any()):
            diagonal.fill_(0.0)
            return block, None
        squares = self.squares_input
        columns = slice(rows.start, self.n)
        while True:
            image, row = candidates.nonzero(as_tuple=True)
            near = block[image, row] < self.tau * (squares[image, rows.start + row][:, None] + squares[image, columns])
            which, col = near.nonzero(as_tuple=True)
            # Close the set under symmetry within the strip's own rows, so that a near pair (a, b)
            # there has both rows recomputed (the backward pass is one-sided there).
            mark = torch.zeros_like(candidates)
            inside = col < r
            mark[image[which[inside]], col[inside]] = True
            mark &= ~candidates
            if not bool(mark.any()):
                break
            candidates |= mark
        diagonal.fill_(0.0)
        if which.numel() == 0:  # only the diagonal was below the bound
            return block, None
        first, last = (int(c) for c in torch.aminmax(col))
        recomputed = self.recompute_rows(image, row, rows.start, slice(rows.start + first, rows.start + last + 1))
        block[image[:, None], row[:, None], torch.arange(first, last + 1, device=block.device)] = recomputed.squared.to(
            block.dtype
        )
        return block, recomputed

    def _bounds(self, rows: slice, tau: float | None = None) -> torch.Tensor:
        """tau (|v_a|^2 + the largest |v_b|^2 of a's strip's columns) for a in `rows`, (B, r) in the
        input's dtype; tau is this pass's unless given. The sums are made once, for every strip."""
        if self._candidate_bounds is None:
            squares = self.squares_input
            largest = squares.flip(-1).cummax(-1).values.flip(-1)  # max over b >= a
            starts = torch.arange(self.n, device=squares.device) // self.strip * self.strip
            self._candidate_bounds = squares + largest[:, starts]
        return self._candidate_bounds[:, rows] * (self.tau if tau is None else tau)

    def recompute_rows(self, image, row, start: int, cols: slice) -> _Rows:
        """d^2 of the rows (image, start + row) to `cols` by float64 GEMMs, nearest pairs by direct differences."""
        v, squares = self.centred64()
        rows = start + row
        products = v.new_empty(image.numel(), cols.stop - cols.start)
        for b, part in self._per_image(image):
            products[part] = v[b, rows[part]] @ v[b, cols].T
        sums = squares[image, rows][:, None] + squares[image, cols]
        squared = sums - 2.0 * products
        own = (rows >= cols.start) & (rows < cols.stop)  # a location against itself: exactly 0
        squared[own.nonzero()[:, 0], rows[own] - cols.start] = 0.0
        nearest = squared < self.tau_direct * sums
        nearest[own.nonzero()[:, 0], rows[own] - cols.start] = False
        which, col = nearest.nonzero(as_tuple=True)
        squared[which, col] = self.exact_squared_distances(image[which], rows[which], cols.start + col)
        return _Rows(image, row, cols, squared, (which, col))

    # -- gradients

    def add_recomputed(self, grad, coefficients, recomputed: _Rows, rows: slice, one_sided: int) -> None:
        """grad += the contributions of the recomputed rows' pairs over recomputed.cols, coefficients
        (R, len(cols)) float64: float64 GEMMs, direct differences for the nearest pairs; the rows'
        side for every column, the columns' side too for columns from `one_sided` (absolute) on."""
        image, row, cols, _, (which, col) = recomputed
        rows_abs = rows.start + row
        a, b = rows_abs[which], cols.start + col
        direct = coefficients[which, col]
        coefficients[which, col] = 0.0
        self.add_direct(grad, direct, image[which], a, b)
        far = b >= one_sided
        self.add_direct(grad, direct[far], image[which][far], b[far], a[far])
        v, _ = self.centred64()
        split = min(max(one_sided - cols.start, 0), cols.stop - cols.start)
        for image_b, part in self._per_image(image):
            c, v_rows, v_cols = coefficients[part], v[image_b, rows_abs[part]], v[image_b, cols]
            grad[image_b].index_add_(
                1, rows_abs[part], (v_rows * c.sum(-1, keepdim=True) - c @ v_cols).T.to(grad.dtype)
            )
            c, v_cols = c[:, split:], v_cols[split:]
            if c.shape[1]:
                grad[image_b, :, cols.start + split : cols.stop] += (v_cols * c.sum(0)[:, None] - c.T @ v_rows).T.to(
                    grad.dtype
                )

    def new_gradient(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero accumulators of a gradient with respect to the centred vectors, sum_b C_ab (v_a - v_b)
        = v_a S_a - (v C^T)_a: the products (B, K, n) and the coefficients' sums S (B, n)."""
        batch, channels, n = self.features.shape
        return self.left.new_zeros(batch, channels, n), self.left.new_zeros(batch, n)

    def add_products(self, grad, sums, coefficients, rows: slice, columns: slice) -> None:
        """The pairs (a in rows, b in columns), coefficients (B, r, w), on the rows' side."""
        sums[:, rows] += coefficients.sum(-1)
        grad[:, :, rows].baddbmm_(self.centred(columns), coefficients.transpose(1, 2), alpha=-1.0)

    def add_products_transposed(self, grad, sums, coefficients, rows: slice, columns: slice) -> None:
        """The same pairs on the columns' side."""
        sums[:, columns] += coefficients.sum(-2)
        grad[:, :, columns].baddbmm_(self.centred(rows), coefficients, alpha=-1.0)

    def to_features(self, grad: torch.Tensor, sums: torch.Tensor, units: torch.Tensor | None = None) -> torch.Tensor:
        """v S - (v C^T), the gradient with respect to the scaled vectors, as one for the features (B, K, H, W);
        times `units` too if given (float64 (B, 1, 1), powers of two: see _unit_gradient)."""
        grad.addcmul_(self.centred(slice(0, self.n)), sums[:, None, :])
        _times_powers_of_two(grad, self.factors(units))
        return grad.view(self.shape)

    def factors(self, units: torch.Tensor | None = None) -> torch.Tensor | None:
        """The scale times `units`, float64 (B, 1, 1), or None when both are 1."""
        if self.scale is None:
            return units
        scale = self.scale.to(torch.float64)
        return scale if units is None else scale * units


def _kept_layout(n: int, width: int) -> tuple[int, int]:
    """The strip (locations) and the elements per image of what the forward pass keeps for the exact
    gradient: L~_ab / d_ab over the upper triangle, strip by strip (0 on the diagonal), then one flag
    per strip (1 where the backward pass must recompute the strip: see _kept_strips), then 1 if the
    forward scaled the image (see _Prepared), else 0. The layout depends on the map's shape only
    (not on the batch), so that a shape function and the vmap rule can state it."""
    strip = _strip_rows(1, n, width)
    starts = range(0, n, strip)
    return strip, sum(min(strip, n - start) * (n - start) for start in starts) + len(starts) + 1


def keeps_distances(shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether the exact gradient of `degrees` keeps what it needs of the forward's distances (per
    image, about n^2 / 2 + n r / 2 elements: the kernel over the distances) instead of recomputing
    them: when that takes no more memory than the features themselves, n K, which keeps the extra
    memory O(B n K) (maps up to about 1.6 K locations)."""
    _, channels, height, width = shape
    return height * width > 0 and _kept_layout(height * width, width)[1] <= height * width * channels


def _kept_strips(prepared: _Prepared, kept: torch.Tensor | None, images: slice):
    """(rows, kept L~/d of these rows (b, r, n - rows.start), their flags (b,)) over the strips, or
    (rows, None, None) without `kept`. A strip is flagged when one of its rows may hold a pair
    nearer than the backward pass's tau (or d = 0 off the diagonal): the forward's test, with the
    backward's threshold, on the forward's smallest d^2 of each row."""
    strips = prepared.strips()
    offset = 0
    for index, rows in enumerate(strips):
        if kept is None:
            yield rows, None, None
            continue
        r, w = rows.stop - rows.start, prepared.n - rows.start
        flag = kept.shape[1] - 1 - len(strips) + index
        yield rows, kept[images, offset : offset + r * w].view(-1, r, w), kept[images, flag]
        offset += r * w


def _degrees_impl(features: torch.Tensor, epsilon: float, kept: torch.Tensor | None = None) -> torch.Tensor:
    """deg (B, n) float64; with `kept` (B, T) also writes there what the exact gradient reuses (see
    _kept_layout)."""
    batch, _, height, width = features.shape
    strip = _kept_layout(height * width, width)[0] if kept is not None else None
    deg = torch.zeros(batch, height * width, dtype=torch.float64, device=features.device)
    for images in _batches(features, strip):
        prepared = _Prepared(features[images], strip=strip)
        part = deg[images]
        if kept is not None:
            kept[images, -1] = 0.0 if prepared.scale is None else 1.0
        for rows, keep, flag in _kept_strips(prepared, kept, images):
            r = rows.stop - rows.start
            block, _ = prepared.squared_distances(rows, backward_near=flag)
            kernel = prepared.kernel(rows, epsilon)
            block.sqrt_()
            if keep is not None:
                # L~/d, 0 on the diagonal; d = 0 elsewhere only in flagged strips, which the
                # backward pass recomputes (their infinities are never read)
                torch.div(kernel, block, out=keep)
                keep[:, :, :r].diagonal(dim1=1, dim2=2).fill_(0.0)
            block.mul_(kernel)
            part[:, rows] += block.sum(-1)
            part[:, rows.stop :] += block[:, :, r:].sum(-2)
    return deg


def _degree_coefficients(prepared: _Prepared, g: torch.Tensor, rows: slice, epsilon: float, out=None):
    """C_ab = (g_a + g_b) L_ab / d_ab (d deg_a / d d_ab = d deg_b / d d_ab = L_ab), 0 where d_ab = 0,
    for a strip (B, r, n - rows.start), distances recomputed, in `out` if given. Returns C and the
    recomputed rows (or None), whose coefficients over the recomputed span are taken out of C and
    returned in float64 beside them."""
    block, recomputed = prepared.squared_distances(rows)
    distances = block.sqrt_()
    coefficients = torch.add(g[:, rows, None], g[:, None, rows.start :], out=out)
    coefficients.mul_(prepared.kernel(rows, epsilon))
    coefficients.div_(distances).masked_fill_(distances == 0, 0.0)
    if recomputed is None:
        return coefficients, None
    image, row, span = recomputed.image, recomputed.row, recomputed.cols
    local = torch.arange(span.start - rows.start, span.stop - rows.start, device=coefficients.device)
    exact = coefficients[image[:, None], row[:, None], local].to(torch.float64)
    coefficients[image[:, None], row[:, None], local] = 0.0
    return coefficients, (exact, recomputed)


def _degrees_backward_impl(
    grad_deg: torch.Tensor, features: torch.Tensor, epsilon: float, kept: torch.Tensor | None = None
) -> torch.Tensor:
    """The gradient of deg with respect to the features: sum_b C_ab (v_a - v_b) = v_a S_a - (v C)_a,
    with the symmetric C held as its upper triangle in strips.

    Without `kept`, strip by strip: the distances are recomputed, and each strip's products go to
    its own rows and, transposed, to the columns beyond (one strip's coefficients alive at a time).
    With `kept` (see _kept_layout), the whole of C for a few images at a time and one GEMM.
    """
    if kept is not None:
        return _degrees_backward_kept(grad_deg, features, epsilon, kept)
    grads = []
    for images in _batches(features):
        prepared = _Prepared(features[images], backward=True)
        g, units = _unit_gradient(grad_deg[images], prepared.dtype)
        grad, sums = prepared.new_gradient()
        for rows in prepared.strips():
            coefficients, exact = _degree_coefficients(prepared, g, rows, epsilon)
            if exact is not None:
                prepared.add_recomputed(grad, exact[0], exact[1], rows, one_sided=rows.stop)
            # The strip's own pairs appear in both orders in its first r columns; the columns
            # beyond get the other side of their pairs.
            r = rows.stop - rows.start
            prepared.add_products(grad, sums, coefficients, rows, slice(rows.start, prepared.n))
            prepared.add_products_transposed(grad, sums, coefficients[:, :, r:], rows, slice(rows.stop, prepared.n))
        grads.append(prepared.to_features(grad, sums, units))
    return torch.cat(grads) if len(grads) > 1 else grads[0]


def _unit_gradient(grad_deg: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The degrees' gradient (b, n) float64, times a power of two per image that brings its
    largest |value| into [1/2, 1), in `dtype`, and the inverse factors (b, 1, 1) in float64: the
    gradient is linear in it, and unscaled it can be near float32's largest (features near 2^100),
    where C = (g_a + g_b) L / d over the scaled distances overflows."""
    scale = unit_scale(grad_deg)  # 1 for an all-zero or non-finite gradient
    return (grad_deg * scale[:, None]).to(dtype), scale.reciprocal()[:, None, None]


def _times_powers_of_two(values: torch.Tensor, factors: torch.Tensor | None) -> torch.Tensor:
    """values *= factors, in place: powers of two, float64 (b, 1, 1), or None for 1. Exact (up to
    the result's own overflow or underflow): in values' dtype where every factor is a normal
    number of it, else through float64 (the scale of features near 2^-100 times the inverse unit
    of a gradient near float32's largest can exceed float32's range: inf times 0 was NaN)."""
    if factors is None:
        return values
    info = torch.finfo(values.dtype)
    if bool(((factors >= info.tiny) & (factors <= info.max)).all()):
        return values.mul_(factors.to(values.dtype))
    return values.copy_(values.to(torch.float64).mul_(factors))


# Elements (centred features and C) of the group of images that the kept gradient takes at a
# time: small enough that its temporaries come back from the allocator already mapped (fresh
# pages, zeroed by the kernel, cost as much as a pass over them), large enough for few launches:
# 2^22 timed best of 2^19..2^23 at (64, 512, 14, 14) and (16, 512, 28, 28) on 2 CPU cores.
_KEPT_GROUP_ELEMENTS = 1 << 22


def _degrees_backward_kept(grad_deg, features, epsilon: float, kept: torch.Tensor) -> torch.Tensor:
    """The gradient with the forward's L~/d: for a few images at a time, the whole matrix, negated,
    with the coefficients' row sums on its diagonal: sum_b C_ab (v_a - v_b) = sum_b (S_a delta_ab -
    C_ab) v_b, one GEMM v (S - C)^T into the gradient, which ran 1.4 to 2 times as fast as the
    strips' products (2 CPU cores). Its upper triangle is made strip by strip, then mirrored.

    Row a holds exactly the pairs that a's side takes from the product: the recomputed rows'
    pairs are zero in their rows (add_recomputed gives those rows' side), not in their columns, so
    the matrix is not symmetric there, and it is row a, not column a, that a's gradient reads.
    """
    batch, channels, height, width = features.shape
    n = height * width
    strip = _kept_layout(n, width)[0]
    grad = features.new_empty(batch, channels, n)
    size = max(1, _KEPT_GROUP_ELEMENTS // (n * (channels + n)))
    for start in range(0, batch, size):
        images = slice(start, min(batch, start + size))
        prepared = _Prepared(features[images], backward=True, strip=strip, scaled=kept[images, -1] != 0)
        g, units = _unit_gradient(grad_deg[images], prepared.dtype)
        minus_g = g.neg_()
        negated = prepared.left.new_empty(prepared.shape[0], n, n)
        sums = minus_g.new_zeros(minus_g.shape)  # -S_a = sum_b -C_ab
        exacts = []
        count = len(prepared.strips())  # the strips' flags, read at once (one host sync per group)
        flagged = (kept[images, kept.shape[1] - 1 - count : kept.shape[1] - 1] != 0).any(0).tolist()
        for (rows, ratios, _), recompute in zip(_kept_strips(prepared, kept, images), flagged, strict=True):
            part = negated[:, rows, rows.start :]
            if not recompute:  # -C_ab = -(g_a + g_b) L~_ab / d_ab
                torch.add(minus_g[:, rows, None], minus_g[:, None, rows.start :], out=part).mul_(ratios)
            else:
                _, exact = _degree_coefficients(prepared, minus_g, rows, epsilon, out=part)
                if exact is not None:
                    exacts.append((rows, (exact[0].neg_(), exact[1])))
            # mirrored and summed while the strip is in cache
            beyond = part[:, :, rows.stop - rows.start :]
            negated[:, rows.stop :, rows] = beyond.transpose(1, 2)
            sums[:, rows] += part.sum(-1)
            sums[:, rows.stop :] += beyond.sum(-2)
        negated.diagonal(dim1=1, dim2=2).copy_(sums.neg_())  # the diagonal held 0 (d_aa = 0)
        out = grad[images]
        torch.bmm(prepared.centred(slice(0, n)), negated.transpose(1, 2), out=out)
        for rows, (exact_coefficients, recomputed) in exacts:
            prepared.add_recomputed(out, exact_coefficients, recomputed, rows, one_sided=rows.stop)
        _times_powers_of_two(out, prepared.factors(units))
    return grad.view(features.shape)


def _distances_impl(features: torch.Tensor) -> torch.Tensor:
    batch, _, height, width = features.shape
    n = height * width
    out = features.new_empty(batch, n, n)
    for images in _batches(features):
        prepared = _Prepared(features[images])
        part = out[images]
        for rows in prepared.strips():
            r = rows.stop - rows.start
            block, _ = prepared.squared_distances(rows)
            block.sqrt_()
            part[:, rows, rows.start :] = block
            part[:, rows.stop :, rows] = block[:, :, r:].transpose(1, 2)
    return out


def _distances_backward_impl(
    grad_distances: torch.Tensor, features: torch.Tensor, distances: torch.Tensor
) -> torch.Tensor:
    grads = []
    for images in _batches(features):
        prepared = _Prepared(features[images], backward=True)
        grad, sums = prepared.new_gradient()
        everything = slice(0, prepared.n)
        for rows in prepared.strips():
            d = distances[images, rows]
            symmetric = grad_distances[images, rows] + grad_distances[images, :, rows].transpose(1, 2)
            coefficients = symmetric.div_(d).masked_fill_(d == 0, 0.0)
            # The forward pass's split, decided on the distances it returned: rows with a near pair in float64.
            bound = prepared.tau * (prepared.squares[:, rows, None] + prepared.squares[:, None, :])
            near = (d.to(torch.float64).square() < bound) & (d > 0)
            if bool(near.any()):
                image, row = near.any(-1).nonzero(as_tuple=True)
                first, last = (int(c) for c in torch.aminmax(near[image, row].nonzero()[:, 1]))
                span = slice(first, last + 1)
                recomputed = prepared.recompute_rows(image, row, rows.start, span)
                local = torch.arange(first, last + 1, device=grad.device)
                exact = coefficients[image[:, None], row[:, None], local].to(torch.float64)
                coefficients[image[:, None], row[:, None], local] = 0.0
                prepared.add_recomputed(grad, exact, recomputed, rows, one_sided=prepared.n)
            prepared.add_products(grad, sums, coefficients, rows, everything)
        grads.append(prepared.to_features(grad, sums))
    return torch.cat(grads) if len(grads) > 1 else grads[0]


# ----------------------------------------------------------------------------- dense composite


def _dense_distances(features: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """d_ab of the features scaled by ``scales`` (B,) (default `unit_scale`), by direct
    differences, differentiable at any order: (B, n, n). The double backward of the fast
    operators passes their own scales (`_forward_scales`), so that the units agree.

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
    if scales is None:  # the composite's own forward (torch.func, forward-mode AD): its own units
        with torch.no_grad():
            scales = unit_scale(vectors)
    vectors = vectors * scales[:, None, None]
    difference = vectors[:, :, :, None] - vectors[:, :, None, :]
    squared = difference.square().sum(1)
    positive = squared > 0
    safe = torch.where(positive, squared, torch.ones_like(squared))
    return torch.where(positive, safe.sqrt(), torch.zeros_like(squared))


def _forward_scales(features: torch.Tensor) -> torch.Tensor:
    """The power of two (B,) by which the fast operators scale each image (1 where they do not):
    their outputs are in the units of the scaled features, and a composite that recomputes them
    (double backward) must use the same units, or its gradient is off by that factor. The fast
    path decides per chunk of images (`_batches`): scaled when some squared norm of the chunk is
    outside the safe range. (The forward that keeps its distances records its decision instead.)"""
    with torch.no_grad():
        parts = []
        for images in _batches(features):
            scale = _Prepared(features[images].detach()).scale
            count = images.stop - images.start
            parts.append(features.new_ones(count) if scale is None else scale.reshape(count).to(features.dtype))
        return torch.cat(parts)


def _dense_degrees(features: torch.Tensor, epsilon: float, scales: torch.Tensor | None = None) -> torch.Tensor:
    _, _, height, width = features.shape
    kernel = spatial_kernel(height, width, epsilon, device=features.device, dtype=features.dtype)
    return (_dense_distances(features, scales) * kernel).sum(-1).to(torch.float64)


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
        scales = _forward_scales(features)  # the units of the forward's degrees
        return _composite_vjp(lambda x: _dense_degrees(x, ctx.epsilon, scales), features, grad_deg), None
    return _degrees_backward_op(grad_deg, features, ctx.epsilon), None


_degrees_op.register_autograd(_degrees_backward, setup_context=_degrees_setup)


# The same with the distances kept for the exact gradient (see keeps_distances): a second output,
# (B, T) in the features' dtype, not differentiable.
@torch.library.custom_op("spn::degrees_keeping", mutates_args=())
def _degrees_keeping_op(features: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, height, width = features.shape
    kept = features.new_empty(features.shape[0], _kept_layout(height * width, width)[1])
    with torch.autocast(features.device.type, enabled=False):
        return _degrees_impl(features, epsilon, kept), kept


@_degrees_keeping_op.register_fake
def _(features, epsilon):
    batch, _, height, width = features.shape
    deg = features.new_empty((batch, height * width), dtype=torch.float64)
    return deg, features.new_empty((batch, _kept_layout(height * width, width)[1]))


@torch.library.custom_op("spn::degrees_backward_kept", mutates_args=())
def _degrees_backward_kept_op(
    grad_deg: torch.Tensor, features: torch.Tensor, kept: torch.Tensor, epsilon: float
) -> torch.Tensor:
    with torch.autocast(features.device.type, enabled=False):
        return _degrees_backward_impl(grad_deg, features, epsilon, kept)


@_degrees_backward_kept_op.register_fake
def _(grad_deg, features, kept, epsilon):
    return features.new_empty(features.shape)


def _degrees_keeping_setup(ctx, inputs, output):
    features, epsilon = inputs
    ctx.save_for_backward(features, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.epsilon = epsilon


def _degrees_keeping_backward(ctx, grad_deg, _grad_kept):
    features, kept = ctx.saved_tensors
    if torch.is_grad_enabled():  # the forward's units, as it kept them per image (see _kept_layout)
        with torch.no_grad():
            scales = torch.where(kept[:, -1] != 0, unit_scale(features), 1.0)
        return _composite_vjp(lambda x: _dense_degrees(x, ctx.epsilon, scales), features, grad_deg), None
    return _degrees_backward_kept_op(grad_deg, features, kept, ctx.epsilon), None


_degrees_keeping_op.register_autograd(_degrees_keeping_backward, setup_context=_degrees_keeping_setup)


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
        scales = _forward_scales(features)
        return _composite_vjp(lambda x: _dense_distances(x, scales), features, grad)
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


def _degrees_keeping_vmap(info, in_dims, features, epsilon):
    deg, kept = _degrees_keeping_op(_fold(features, in_dims[0], info.batch_size), epsilon)
    size = info.batch_size
    return (deg.reshape(size, -1, deg.shape[-1]), kept.reshape(size, -1, kept.shape[-1])), (0, 0)


def _degrees_backward_kept_vmap(info, in_dims, grad_deg, features, kept, epsilon):
    size = info.batch_size
    folded = (_fold(t, d, size) for t, d in zip((grad_deg, features, kept), in_dims[:3], strict=True))
    out = _degrees_backward_kept_op(*folded, epsilon)
    return out.reshape(size, -1, *out.shape[1:]), 0


def _distances_vmap(info, in_dims, features):
    out = _distances_op(_fold(features, in_dims[0], info.batch_size))
    return out.reshape(info.batch_size, -1, *out.shape[1:]), 0


def _distances_backward_vmap(info, in_dims, grad, features, distances):
    size = info.batch_size
    folded = (_fold(t, d, size) for t, d in zip((grad, features, distances), in_dims, strict=True))
    out = _distances_backward_op(*folded)
    return out.reshape(size, -1, *out.shape[1:]), 0


_degrees_op.register_vmap(_degrees_vmap)
_degrees_backward_op.register_vmap(_degrees_backward_vmap)
_degrees_keeping_op.register_vmap(_degrees_keeping_vmap)
_degrees_backward_kept_op.register_vmap(_degrees_backward_kept_vmap)
_distances_op.register_vmap(_distances_vmap)
_distances_backward_op.register_vmap(_distances_backward_vmap)


# ----------------------------------------------------------------------------- entry points


def _requires_grad(tensor: torch.Tensor) -> bool:
    """tensor.requires_grad, seen through vmap: a BatchedTensor reports False even when the tensor
    it wraps requires grad (then the operators' vmap rules run under autograd)."""
    from torch._C._functorch import get_unwrapped, is_batchedtensor

    while is_batchedtensor(tensor):
        tensor = get_unwrapped(tensor)
    return tensor.requires_grad


def _needs_dense(features: torch.Tensor) -> bool:
    """True under torch.func's grad or jvp transforms and under forward-mode AD (the operators' autograd
    rules do not reach there); vmap alone uses the operators' vmap rules."""
    if torch.compiler.is_compiling():
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    if any(i.key() in (TransformType.Grad, TransformType.Jvp) for i in retrieve_all_functorch_interpreters()):
        return True
    from torch.autograd import forward_ad

    return forward_ad._current_level >= 0 and forward_ad.unpack_dual(features).tangent is not None


def degrees(features: torch.Tensor, epsilon: float) -> torch.Tensor:
    """deg_a = sum_b d_ab L~_ab of the features scaled by 2^-e per image: float64 (B, n), differentiable.

    The scale does not change deg / sum(deg). No n x n tensor is made; when a gradient will be
    needed and `keeps_distances`, the forward keeps the distances' upper triangle for it.
    """
    if _needs_dense(features):
        return _dense_degrees(features, epsilon)
    # (an exported program has no backward: nothing to keep for)
    gradient = torch.is_grad_enabled() and _requires_grad(features) and not torch.compiler.is_exporting()
    if gradient and keeps_distances(features.shape):
        return _degrees_keeping_op(features, float(epsilon))[0]
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
    # In place only when no gradient can flow (under vmap, .requires_grad alone said False and the
    # in-place product broke the distances saved for the backward)
    in_place = not (torch.is_grad_enabled() and _requires_grad(weights))
    weights = weights.mul_(kernel) if in_place else weights * kernel
    column_sums = weights.sum(dim=1, keepdim=True)
    # `== 0`, not `> 0`: a NaN column must stay NaN, not turn uniform.
    empty = column_sums == 0
    safe_sums = torch.where(empty, torch.ones_like(column_sums), column_sums)
    if in_place:
        return weights.div_(safe_sums).masked_fill_(empty, 1.0 / n)
    return torch.where(empty, torch.full_like(weights, 1.0 / n), weights / safe_sums)
