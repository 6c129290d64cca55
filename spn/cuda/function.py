"""The autograd Function behind backend='cupy': launches the kernels of spn/cuda/kernels.

Data flow. The features are made contiguous (B, K, H, W) (a channels_last or sliced input
is copied once) and handed to the kernels with DLPack, without copies; every output and
scratch buffer is allocated by torch (so torch's caching allocator owns all memory) and
handed over the same way. The kernels run on torch's current stream of the tensor's
device, so they are ordered with the torch operations around them as any torch operation
would be, and nothing here synchronises with the host.

Modes and their memory beyond the input and the outputs:

* stationary (iterations=None): deg (B, n) double; the backward pass recomputes distances
  tile by tile and adds O(B K n) double for the gradient: no n x n array at all.
* k-step (iterations=k): D (B, n, n) double, built once, and the walk's states
  (B, k + 1, n) double; with detach=False both are kept for the backward pass, which adds
  two more (B, n, n) double arrays (dE/dD and P = gW + gW^T) and does the walk's adjoint
  with torch.bmm on the device. The distance part of the gradient never builds
  (B, n, n, K): it is the same tile kernel as in the stationary mode.

Everything that is summed over locations is double whatever the input type; float16 and
bfloat16 inputs are computed in float32 (see `soft_proposal`).

The launches go through a *launcher*, `launcher(name, grid, block, *args)`: `CupyLauncher`
runs the compiled kernels on the GPU; the tests' emulator (tests/cuda_emulator.py) runs the
very same CUDA sources on the CPU (one fiber per CUDA thread), which is how the tests check
this file and the kernels on a machine without a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from . import compile as _compile

__all__ = [
    "CupyLauncher",
    "Launcher",
    "SoftProposalFunction",
    "check_sizes",
    "inverse_width",
    "soft_proposal",
    "under_transforms",
]

# The hardware's limit of gridDim.y and gridDim.z: images per grid dimension (the kernels
# loop over the images beyond it), and tiles per side of the k-step mode's n x n grid.
_GRID_YZ_LIMIT = 65535
_MAX_GRID_X = 1 << 20  # blocks of the 1-D kernels; their grid-stride loops cover the rest
_INT32_MAX = 2**31 - 1
_HALF = (torch.float16, torch.bfloat16)

Launcher = Callable[..., None]


def inverse_width(epsilon: float) -> float:
    """1 / (2 eps^2), or +inf when 2 eps^2 underflows to 0 (as spn/graph.py)."""
    denominator = 2.0 * epsilon * epsilon
    return 1.0 / denominator if denominator > 0 else math.inf


def _i32(value: int) -> np.int32:
    if not 0 <= value <= _INT32_MAX:
        raise ValueError(f"the CUDA kernels take sizes up to 2^31 - 1, got {value}")
    return np.int32(value)


def _blocks(total: int, threads: int, limit: int | None = None) -> int:
    """Blocks of `threads` for `total` items, at most `limit` (default _MAX_GRID_X, read at call time)."""
    return max(1, min(_MAX_GRID_X if limit is None else limit, -(-total // threads)))


def _tiles(n: int) -> int:
    """Tiles of SP_TILE locations for n locations: the x grid of the tile kernels, which do not
    loop over tiles (n <= 2^31 - 1 keeps it below the hardware's 2^31 - 1 blocks)."""
    return max(1, -(-n // _compile.constants()["SP_TILE"]))


def check_sizes(batch: int, channels: int, n: int, iterations: int | None) -> None:
    """Raise ValueError for shapes the kernels cannot index (each size must fit in int32)."""
    for name, value in (("batch", batch), ("channels", channels), ("H * W", n)):
        if value > _INT32_MAX:
            raise ValueError(f"backend='cupy' takes {name} up to 2^31 - 1, got {value}; use backend='torch'")
    if iterations is not None:
        if _tiles(n) > _GRID_YZ_LIMIT:
            raise ValueError(f"the k-step mode builds an n x n matrix; H * W = {n} is too large for it")
        if iterations + 1 > _INT32_MAX:
            raise ValueError(f"iterations must be below 2^31 - 1, got {iterations}")


class _StreamHandle:
    """A raw cudaStream_t behind the CUDA stream protocol (`__cuda_stream__`), for CuPy."""

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


class CupyLauncher:
    """Launches the compiled kernels on torch's current stream of `device`.

    Tensors are converted with `cupy.from_dlpack` (no copy) once per launcher, inside the
    stream's context, so that torch sees the consumer stream equal to its own and inserts
    no synchronisation. Scalars must already be NumPy scalars of the kernel's widths
    (np.int32 for int, np.int64 for long long, np.float64 for double).
    """

    def __init__(self, device: torch.device):
        import cupy

        self._cupy = cupy
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self._device = cupy.cuda.Device(self.index)
        handle = torch.cuda.current_stream(self.index).cuda_stream
        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        if from_external is not None:  # CuPy >= 14: the CUDA stream protocol
            self._stream = from_external(_StreamHandle(handle))
        else:  # older CuPy
            self._stream = cupy.cuda.ExternalStream(handle, self.index)
        self._arrays: dict[int, tuple[torch.Tensor, object]] = {}

    def _array(self, tensor: torch.Tensor):
        entry = self._arrays.get(id(tensor))
        if entry is None or entry[0] is not tensor:
            if not tensor.is_contiguous():
                raise RuntimeError("internal error: a kernel was given a non-contiguous tensor")
            entry = (tensor, self._cupy.from_dlpack(tensor.detach()))
            self._arrays[id(tensor)] = entry  # keeps the tensor alive, so its id stays unique
        return entry[1]

    def __call__(self, name: str, grid: tuple[int, int, int], block: tuple[int, int, int], *args) -> None:
        kernel = _compile.kernel(self.index, name)
        with self._device, self._stream:
            converted = tuple(self._array(a) if isinstance(a, torch.Tensor) else a for a in args)
            kernel(grid, block, converted)


# ---------------------------------------------------------------------------------------
# forward


def _unit_scale(launch: Launcher, u: torch.Tensor) -> torch.Tensor:
    """scale (B,) double: per image, the exact power of two that brings max |u| into [1/2, 1)
    (sp_unit_scale); the distance kernels see s u. 1 for every image when K == 0."""
    c = _compile.constants()
    batch, channels, height, width = u.shape
    if channels == 0:
        return torch.ones(batch, dtype=torch.float64, device=u.device)
    scale = torch.empty(batch, dtype=torch.float64, device=u.device)
    launch(
        _compile.typed_name("sp_unit_scale", u.dtype),
        (min(batch, _MAX_GRID_X), 1, 1),
        (c["SP_THREADS"], 1, 1),
        u, scale, _i32(batch), np.int64(channels * height * width),
    )
    return scale


def _degrees(launch: Launcher, u: torch.Tensor, scale: torch.Tensor, inv_width: float) -> torch.Tensor:
    """deg (B, n) double of the scaled features s u, from contiguous (B, K, H, W) u."""
    c = _compile.constants()
    batch, channels, height, width = u.shape
    n = height * width
    deg = torch.zeros((batch, n), dtype=torch.float64, device=u.device)
    if channels > 0:  # K == 0: every distance is 0, so is every degree
        launch(
            _compile.typed_name("sp_degree", u.dtype),
            (_tiles(n), min(batch, _GRID_YZ_LIMIT), 1),
            (c["SP_TX"], c["SP_TY"], 1),
            u, scale, deg, _i32(batch), _i32(channels), _i32(n), _i32(width), np.float64(inv_width),
        )
    return deg


def _normalize(launch: Launcher, deg: torch.Tensor, m: torch.Tensor) -> None:
    """m (B, H, W) in the input type = deg / sum(deg) per image, uniform when the sum is 0."""
    c = _compile.constants()
    batch, n = deg.shape
    launch(
        _compile.typed_name("sp_normalize", m.dtype),
        (min(batch, _MAX_GRID_X), 1, 1),
        (c["SP_THREADS"], 1, 1),
        deg, m, _i32(batch), _i32(n),
    )


def _transfer(
    launch: Launcher, u: torch.Tensor, scale: torch.Tensor, inv_width: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """D (B, n, n) double, columns normalised, and the column sums of D' (B, n) double (of s u)."""
    c = _compile.constants()
    batch, channels, height, width = u.shape
    n = height * width
    tiles = _tiles(n)  # at most _GRID_YZ_LIMIT: see check_sizes
    if channels > 0:
        transfer = torch.empty((batch, n, n), dtype=torch.float64, device=u.device)
        launch(
            _compile.typed_name("sp_weights", u.dtype),
            (tiles, tiles, min(batch, _GRID_YZ_LIMIT)),
            (c["SP_TX"], c["SP_TY"], 1),
            u, scale, transfer, _i32(batch), _i32(channels), _i32(n), _i32(width), np.float64(inv_width),
        )
    else:  # K == 0: every distance is 0
        transfer = torch.zeros((batch, n, n), dtype=torch.float64, device=u.device)
    column_sums = torch.empty((batch, n), dtype=torch.float64, device=u.device)
    launch(
        "sp_normalize_columns",
        (_blocks(batch * n, c["SP_THREADS"]), 1, 1),
        (c["SP_THREADS"], 1, 1),
        transfer, column_sums, _i32(batch), _i32(n),
    )
    return transfer, column_sums


def _walk(launch: Launcher, transfer: torch.Tensor, iterations: int, tolerance: float):
    """k steps of M <- D M / sum for the batch, freezing an image once a step moves it by
    less than `tolerance` (when > 0), as spn/walk.py. Returns states (B, k + 1, n) double
    (slot t is M after t steps; a frozen image repeats its state), steps (B,) int32 (the
    steps each image took) and active (B,) int32 (1 while not frozen)."""
    c = _compile.constants()
    batch, n, _ = transfer.shape
    states = torch.empty((batch, iterations + 1, n), dtype=torch.float64, device=transfer.device)
    states[:, 0] = 1.0 / n
    raw = torch.empty((batch, n), dtype=torch.float64, device=transfer.device)
    active = torch.ones(batch, dtype=torch.int32, device=transfer.device)
    steps = torch.zeros(batch, dtype=torch.int32, device=transfer.device)
    stride = np.int64((iterations + 1) * n)
    for t in range(iterations):
        launch(
            "sp_walk_matvec",
            (_blocks(n, c["SP_ROWS"], _INT32_MAX), min(batch, _GRID_YZ_LIMIT), 1),
            (c["SP_LANES"], c["SP_ROWS"], 1),
            transfer, states, raw, _i32(batch), _i32(n), stride, _i32(t),
        )
        launch(
            "sp_walk_update",
            (min(batch, _MAX_GRID_X), 1, 1),
            (c["SP_THREADS"], 1, 1),
            raw, states, active, steps, _i32(batch), _i32(n), stride, _i32(t), np.float64(tolerance),
        )
    return states, steps, active


def _couple(launch: Launcher, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x * m per channel, in the input type: (B, K, H, W) x (B, H, W)."""
    c = _compile.constants()
    _, channels, height, width = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    total = x.numel()
    if total > 0:
        launch(
            _compile.typed_name("sp_couple", x.dtype),
            (_blocks(total, c["SP_THREADS"]), 1, 1),
            (c["SP_THREADS"], 1, 1),
            x, m, out, np.int64(total), _i32(channels), _i32(height * width),
        )
    return out


# ---------------------------------------------------------------------------------------
# backward


def _walk_pair_gradient(transfer, column_sums, states, steps, grad_m, iterations: int) -> torch.Tensor:
    """P = gW + gW^T, gW = dE/dW (B, n, n) for W the unnormalised weights, through the walk
    and the column normalisation (reference/backward.py `_walk_vjp`), with torch ops.

    Reverse through the steps each image took: dE/dD = sum_t g_t M_{t-1}^T, g_{t-1} = D^T g_t;
    the renormalisation of M is left out (it changes nothing, see `_walk_vjp`). Then
    gW[:, c] = (dE/dD[:, c] - sum_r dE/dD_rc D_rc) / s_c, 0 for columns with s_c == 0.
    sum_r dE/dD_rc D_rc = sum_t M_{t-1}[c] (D^T g_t)[c] is gathered along the way, so no
    (B, n, n) temporary is needed for it.
    """
    batch, n, _ = transfer.shape
    transposed = transfer.transpose(1, 2)
    grads = grad_m.new_zeros((batch, iterations, n))  # g_t of the steps taken, 0 for the others
    inner = grad_m.new_zeros((batch, n))
    g = grad_m
    for t in range(iterations, 0, -1):
        live = (steps >= t).unsqueeze(1)  # did the image take step t?
        g_live = torch.where(live, g, torch.zeros_like(g))
        grads[:, t - 1] = g_live
        back = torch.bmm(transposed, g_live.unsqueeze(2)).squeeze(2)  # D^T g_t
        inner += states[:, t - 1] * back
        g = torch.where(live, back, g)
    grad_transfer = torch.bmm(grads.transpose(1, 2), states[:, :iterations])  # sum_t g_t M_{t-1}^T
    sums = column_sums.unsqueeze(1)
    zero = sums == 0
    grad_weights = grad_transfer.sub_(inner.unsqueeze(1)).div_(torch.where(zero, torch.ones_like(sums), sums))
    grad_weights.masked_fill_(zero, 0.0)
    return grad_weights + grad_weights.transpose(1, 2)


def _distance_vjp(
    launch: Launcher, u: torch.Tensor, scale: torch.Tensor, coefficients: torch.Tensor, inv_width: float
) -> torch.Tensor:
    """acc (B, K, n) double, acc[:, a] = sum_c C_ac (s u_a - s u_c), C from g (B, n) or P (B, n, n)."""
    c = _compile.constants()
    batch, channels, height, width = u.shape
    n = height * width
    acc = torch.zeros((batch, channels, n), dtype=torch.float64, device=u.device)
    base = "sp_distance_vjp_pairs" if coefficients.dim() == 3 else "sp_distance_vjp"
    launch(
        _compile.typed_name(base, u.dtype),
        (_tiles(n), min(batch, _GRID_YZ_LIMIT), 1),
        (c["SP_TX"], c["SP_TY"], 1),
        u, scale, coefficients, acc, _i32(batch), _i32(channels), _i32(n), _i32(width), np.float64(inv_width),
    )
    return acc


def _dense_soft_proposal(x: torch.Tensor, epsilon: float, iterations, tolerance: float):
    """(V, M) of (B, K, H, W) x by differentiable torch operations, at any order: the distances of
    the scaled features s x (s as sp_unit_scale, a constant) by direct differences in float64,
    densely ((B, K, n, n) elements), then the degrees or the walk with the kernels' freezing rule."""
    from ..graph import DENSE_ELEMENTS, spatial_kernel, unit_scale

    batch, channels, height, width = x.shape
    n = height * width
    if batch * channels * n * n > DENSE_ELEMENTS:
        raise RuntimeError(
            f"spn.soft_proposal: backend='cupy' computes a double backward (create_graph=True) densely, and "
            f"(B, K, n^2) = ({batch}, {channels}, {n * n}) is {batch * channels * n * n} elements, over "
            f"spn.graph.DENSE_ELEMENTS = {DENSE_ELEMENTS}. Use smaller inputs there; first-order reverse mode "
            "(loss.backward(), torch.autograd.grad without create_graph) runs the kernels and needs no dense tensor"
        )
    vectors = x.reshape(batch, channels, n).double()
    with torch.no_grad():
        scale = unit_scale(x.detach().reshape(batch, channels, n)).double() if channels else vectors.new_ones(batch)
    vectors = vectors * scale[:, None, None]
    squared = (vectors[:, :, :, None] - vectors[:, :, None, :]).square().sum(1)
    positive = squared > 0  # d = 0: every derivative 0, as the kernels
    distances = torch.where(positive, torch.where(positive, squared, 1.0).sqrt(), 0.0)
    weights = distances * spatial_kernel(height, width, epsilon, device=x.device, dtype=torch.float64)
    if iterations is None:
        deg = weights.sum(-1)
        total = deg.sum(-1, keepdim=True)
        m = torch.where(total == 0, 1.0 / n, deg / torch.where(total == 0, 1.0, total))
    else:
        sums = weights.sum(1, keepdim=True)
        transfer = torch.where(sums == 0, 1.0 / n, weights / torch.where(sums == 0, 1.0, sums))
        m = vectors.new_full((batch, n), 1.0 / n)
        active = torch.ones(batch, dtype=torch.bool, device=x.device)
        for _ in range(iterations):
            raw = torch.bmm(transfer, m.unsqueeze(2)).squeeze(2)
            new = raw / raw.sum(-1, keepdim=True)
            change = (new - m).detach().norm(dim=-1)
            m = torch.where(active[:, None], new, m)
            if tolerance > 0:
                active = active & ~(change < tolerance)
    proposal = m.reshape(batch, height, width).to(x.dtype)
    return x * proposal.unsqueeze(1), proposal


def _composite_vjp(features, epsilon, iterations, tolerance, grad_coupled, grad_proposal) -> torch.Tensor:
    """dE/dU as a differentiable function of U and of the incoming gradients (create_graph=True),
    by autograd through `_dense_soft_proposal` (the kernels are not differentiable)."""
    with torch.enable_grad():
        x = features if features.requires_grad else features.detach().requires_grad_()
        coupled, proposal = _dense_soft_proposal(x, epsilon, iterations, tolerance)
        outputs, grads = [coupled], [grad_coupled]
        if grad_proposal is not None:
            outputs.append(proposal)
            grads.append(grad_proposal)
        (grad,) = torch.autograd.grad(outputs, x, grads, create_graph=True)
    return grad


class SoftProposalFunction(torch.autograd.Function):
    """(U, ...) -> (V = U * M, M (B, H, W), converged (B,) bool) for float32 / float64 U.

    First-order backward passes run the kernels. With create_graph=True (double backward) the
    gradient is made differentiable: G * M by a torch product when M is a constant (detach=True,
    iterations=0), else autograd through a dense composite of torch operations recomputed from U
    (`_dense_soft_proposal`).
    """

    @staticmethod
    def forward(ctx, features, epsilon, iterations, tolerance, detach, make_launcher):
        u = features.detach().contiguous()
        batch, channels, height, width = u.shape
        n = height * width
        check_sizes(batch, channels, n, iterations)
        launch = make_launcher(u.device)
        inv = inverse_width(epsilon)
        through_m = bool(ctx.needs_input_grad[0]) and not detach and iterations != 0
        m = u.new_empty((batch, height, width))
        extras: tuple[torch.Tensor, ...] = ()
        if iterations == 0:  # M stays at the uniform start, whatever the features
            m.fill_(1.0 / n)
            converged = torch.zeros(batch, dtype=torch.bool, device=u.device)
        else:
            scale = _unit_scale(launch, u)
            if iterations is None:
                deg = _degrees(launch, u, scale, inv)
                _normalize(launch, deg, m)
                converged = torch.zeros(batch, dtype=torch.bool, device=u.device)
                if through_m:
                    extras = (scale, deg)
            else:
                transfer, column_sums = _transfer(launch, u, scale, inv)
                states, steps, active = _walk(launch, transfer, iterations, tolerance)
                m.view(batch, n).copy_(states[:, iterations])
                converged = active == 0 if tolerance > 0 else torch.zeros(batch, dtype=torch.bool, device=u.device)
                if through_m:
                    extras = (scale, transfer, column_sums, states, steps)
                del transfer
        coupled = _couple(launch, u, m)
        ctx.mark_non_differentiable(converged)
        if detach or iterations == 0:
            ctx.mark_non_differentiable(m)
        ctx.through_m = through_m
        ctx.iterations = iterations
        ctx.epsilon = epsilon
        ctx.tolerance = tolerance
        ctx.inv_width = inv
        ctx.make_launcher = make_launcher
        if ctx.needs_input_grad[0]:
            # features itself (not a detached copy) for the composite of a double backward
            ctx.save_for_backward(features if through_m else None, u if through_m else None, m, *extras)
        return coupled, m, converged

    @staticmethod
    def backward(ctx, grad_coupled, grad_proposal, _grad_converged):
        nothing = (None,) * 5
        if not ctx.needs_input_grad[0]:
            return (None, *nothing)
        features, u, m, *extras = ctx.saved_tensors
        dtype = m.dtype
        if torch.is_grad_enabled():  # create_graph=True: a gradient that can be differentiated again
            if not ctx.through_m:
                return (grad_coupled.to(dtype) * m.unsqueeze(1), *nothing)
            gp = None if grad_proposal is None else grad_proposal.to(dtype)
            grad = _composite_vjp(features, ctx.epsilon, ctx.iterations, ctx.tolerance, grad_coupled.to(dtype), gp)
            return (grad, *nothing)
        g = grad_coupled.to(dtype).contiguous()
        batch, channels, height, width = g.shape
        n = height * width
        launch = ctx.make_launcher(g.device)
        if g.numel() == 0:
            return (torch.zeros_like(g), *nothing)
        if not ctx.through_m:  # the paper's Eq. 6: M is a constant
            return (_couple(launch, g, m), *nothing)
        c = _compile.constants()
        if grad_proposal is None:
            grad_proposal = torch.zeros_like(m)
        gp = grad_proposal.to(dtype).contiguous()
        scale = extras[0]
        grad_m = torch.empty((batch, n), dtype=torch.float64, device=g.device)  # s dE/dM (see backward.cu)
        launch(
            _compile.typed_name("sp_grad_m", dtype),
            (_blocks(batch * n, c["SP_THREADS"]), 1, 1),
            (c["SP_THREADS"], 1, 1),
            g, u, scale, gp, grad_m, _i32(batch), _i32(channels), _i32(n),
        )
        if ctx.iterations is None:
            (_, deg) = extras
            coefficients = torch.empty((batch, n), dtype=torch.float64, device=g.device)
            launch(
                "sp_stationary_grad_deg",
                (min(batch, _MAX_GRID_X), 1, 1),
                (c["SP_THREADS"], 1, 1),
                deg, grad_m, coefficients, _i32(batch), _i32(n),
            )
        else:
            _, transfer, column_sums, states, steps = extras
            with torch.autocast(device_type=g.device.type, enabled=False):
                coefficients = _walk_pair_gradient(transfer, column_sums, states, steps, grad_m, ctx.iterations)
        acc = _distance_vjp(launch, u, scale, coefficients, ctx.inv_width)
        del coefficients
        grad = torch.empty_like(g)
        launch(
            _compile.typed_name("sp_grad_finish", dtype),
            (_blocks(g.numel(), c["SP_THREADS"]), 1, 1),
            (c["SP_THREADS"], 1, 1),
            g, m, acc, grad, np.int64(g.numel()), _i32(channels), _i32(n),
        )
        return (grad, *nothing)


def under_transforms(features: torch.Tensor) -> bool:
    """True under a torch.func transform (vmap, grad, jacrev, jacfwd, jvp, ...) or when `features`
    carries a forward-mode tangent: the kernels' autograd Function cannot run there."""
    if torch._C._are_functorch_transforms_active():
        return True
    from torch.autograd import forward_ad

    return forward_ad._current_level >= 0 and forward_ad.unpack_dual(features).tangent is not None


def soft_proposal(features: torch.Tensor, epsilon: float, iterations, tolerance: float, detach: bool,
                  make_launcher: Callable[[torch.device], Launcher]):
    """(coupled, proposal, converged or None) as spn.functional.torch_soft_proposal, through
    `SoftProposalFunction` with the given launcher. float16 and bfloat16 are computed in float32.

    Under torch.func transforms (vmap, grad, jacrev, jacfwd, jvp) and forward-mode AD, which the
    kernels' autograd Function does not support, the torch path computes the results (vmap by its
    operators' batching rules; the others by its dense composite, see spn/graph.py)."""
    if under_transforms(features):
        from ..functional import torch_soft_proposal

        return torch_soft_proposal(features, epsilon, iterations, tolerance, detach)
    batch, _, height, width = features.shape
    if batch == 0:
        proposal = features.new_empty((0, height, width))
        converged = None if iterations is None else torch.zeros(0, dtype=torch.bool, device=features.device)
        return features * proposal.unsqueeze(1), proposal, converged
    compute = features.float() if features.dtype in _HALF else features
    with torch.autocast(device_type=features.device.type, enabled=False):
        coupled, proposal, converged = SoftProposalFunction.apply(
            compute, float(epsilon), iterations, float(tolerance), bool(detach), make_launcher
        )
    return coupled.to(features.dtype), proposal.to(features.dtype), (None if iterations is None else converged)
