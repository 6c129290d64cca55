"""backend='cupy' on a real GPU: results, gradients, streams, dtypes and memory.

Every test but the last is marked `gpu` and skipped unless CuPy imports and torch sees a
CUDA device: run them with `pytest -m gpu`. The same kernels and launch code are checked
on the CPU by tests/test_cuda_emulated.py; what only a GPU can show is checked here
(CuPy's compilation and launches, DLPack, streams, torch.compile, memory).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spn
from batched_reference import reference_grad, reference_map
from cuda_plain_float32 import plain_float32_soft_proposal
from spn import cuda
from spn.functional import torch_soft_proposal

requires_gpu = pytest.mark.skipif(not cuda.is_available(), reason="needs CuPy and a CUDA device")


def gpu(test):
    return pytest.mark.gpu(requires_gpu(test))


TIGHT = 1e-10
DEVICE = "cuda"
MODES = [(None, 0.0), (5, 0.0), (20, 1e-4)]


def cupy_run(u, eps, iterations=None, tolerance=0.0, detach=True):
    return cuda.cupy_soft_proposal(u, eps, iterations, tolerance, detach)


def torch_run(u, eps, iterations=None, tolerance=0.0, detach=True):
    return torch_soft_proposal(u, eps, iterations, tolerance, detach)


def grad_of(fn, u, g):
    x = u.detach().clone().requires_grad_(True)
    (fn(x)[0] * g).sum().backward()
    return x.grad


def as_numpy(t):
    return t.detach().double().cpu().numpy()


# -- agreement with the reference and the torch path ------------------------------------------


@gpu
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 40),
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    eps=st.floats(0.2, 8.0),
    seed=st.integers(0, 2**31 - 1),
    mode=st.sampled_from(MODES),
    detach=st.booleans(),
)
def test_property_float64_matches_the_reference_and_the_torch_path(
    batch, channels, height, width, eps, seed, mode, detach
):
    iterations, tolerance = mode
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, channels, height, width, dtype=torch.float64, generator=generator).to(DEVICE)
    g = torch.randn(batch, channels, height, width, dtype=torch.float64, generator=generator).to(DEVICE)
    coupled, proposal, converged = cupy_run(u, eps, iterations, tolerance, detach)
    expected, flags = reference_map(u, eps, iterations, tolerance)
    np.testing.assert_allclose(as_numpy(proposal).reshape(batch, -1), expected, rtol=0, atol=TIGHT)
    np.testing.assert_allclose(as_numpy(coupled), as_numpy(u) * as_numpy(proposal)[:, None], rtol=0, atol=TIGHT)
    theirs = torch_run(u, eps, iterations, tolerance, detach)
    torch.testing.assert_close(proposal, theirs[1], rtol=0, atol=TIGHT)
    if iterations is not None and tolerance > 0:
        np.testing.assert_array_equal(converged.cpu().numpy(), flags)
    grad = grad_of(lambda x: cupy_run(x, eps, iterations, tolerance, detach), u, g)
    ref = reference_grad(u, g, eps, iterations, tolerance, detach)
    np.testing.assert_allclose(as_numpy(grad), ref, rtol=0, atol=TIGHT * max(1.0, np.abs(ref).max()))


@gpu
@pytest.mark.parametrize(("iterations", "tolerance"), MODES)
@pytest.mark.parametrize("shape", [(4, 64, 14, 14), (2, 17, 28, 28), (1, 3, 9, 70)])
def test_several_tiles_and_chunks_match_the_torch_path(shape, iterations, tolerance):
    torch.manual_seed(sum(shape))
    u = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    g = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    eps = spn.default_epsilon(shape[2], shape[3])
    mine, theirs = cupy_run(u, eps, iterations, tolerance), torch_run(u, eps, iterations, tolerance)
    torch.testing.assert_close(mine[1], theirs[1], rtol=0, atol=TIGHT)
    if iterations is not None:
        assert torch.equal(mine[2], theirs[2])
    for detach in (True, False):
        a = grad_of(lambda x, detach=detach: cupy_run(x, eps, iterations, tolerance, detach), u, g)
        b = grad_of(lambda x, detach=detach: torch_run(x, eps, iterations, tolerance, detach), u, g)
        torch.testing.assert_close(a, b, rtol=0, atol=TIGHT * max(1.0, b.abs().max().item()))


@gpu
@pytest.mark.parametrize(("iterations", "tolerance"), MODES)
def test_float32_error_is_at_most_twice_plain_float32s(iterations, tolerance):
    """flash-attention's rule: against the float64 reference (which sees the same float32
    inputs), the kernels' float32 error, of the map and of the exact gradient, is at most
    twice that of a plain float32 evaluation of the same formula (tests/cuda_plain_float32.py),
    plus one unit in the last place of the largest value. The offset of 100 makes distances
    by a matrix product (|a|^2 + |c|^2 - 2 a.c) lose digits that direct differences keep."""
    torch.manual_seed(0)
    u = (torch.randn(3, 48, 12, 12, dtype=torch.float64) * 2 + 100).float().to(DEVICE)
    g = torch.randn(3, 48, 12, 12).to(DEVICE)
    eps = spn.default_epsilon(12, 12)
    expected, _ = reference_map(u, eps, iterations, tolerance)
    mine = as_numpy(cupy_run(u, eps, iterations, tolerance)[1]).reshape(3, -1)
    plain = as_numpy(plain_float32_soft_proposal(u, eps, iterations, tolerance)[1]).reshape(3, -1)
    mine_error, plain_error = np.abs(mine - expected).max(), np.abs(plain - expected).max()
    assert plain_error > 0  # a plain float32 evaluation does round: the bound is not the floor alone
    assert mine_error <= 2 * plain_error + 2.0**-24 * np.abs(expected).max(), (mine_error, plain_error)
    ref = reference_grad(u, g, eps, iterations, tolerance, False)
    mine = as_numpy(grad_of(lambda x: cupy_run(x, eps, iterations, tolerance, False), u, g))
    plain = as_numpy(grad_of(lambda x: plain_float32_soft_proposal(x, eps, iterations, tolerance), u, g))
    mine_error, plain_error = np.abs(mine - ref).max(), np.abs(plain - ref).max()
    assert plain_error > 0
    assert mine_error <= 2 * plain_error + 2.0**-24 * np.abs(ref).max(), (mine_error, plain_error)


@gpu
@pytest.mark.parametrize("iterations", [None, 4])
def test_gradcheck_exact_gradient(iterations):
    torch.manual_seed(1)
    u = torch.randn(2, 3, 3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    fn = lambda x: cupy_run(x, 1.3, iterations, 0.0, False)[:2]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (u,), eps=1e-6, atol=1e-8, rtol=1e-6)


@gpu
@pytest.mark.parametrize("iterations", [None, 4])
def test_gradgradcheck_exact_gradient(iterations):
    torch.manual_seed(1)
    u = torch.randn(1, 2, 2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    fn = lambda x: cupy_run(x, 1.3, iterations, 0.0, False)[:2]  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (u,), eps=1e-6, atol=1e-6, rtol=1e-5)


@gpu
@pytest.mark.parametrize("iterations", [None, 4])
@pytest.mark.parametrize(
    ("dtype", "scale"), [(torch.float32, s) for s in (1e20, 3e37, 1e-30, 1e-38)] + [(torch.bfloat16, 1e30)]
)
def test_any_scale_of_low_precision_features(dtype, scale, iterations):
    """Float32 squares neither overflow nor underflow: each image is scaled by a power of two first."""
    rng = np.random.default_rng(1)
    x = (torch.from_numpy(rng.standard_normal((2, 20, 9, 9))) * scale).to(dtype).to(DEVICE)
    proposal = cupy_run(x, 1.3, iterations)[1]
    expected, _ = reference_map(x.double(), 1.3, iterations)
    rtol = 1e-5 if dtype == torch.float32 else 2.0**-7
    np.testing.assert_allclose(as_numpy(proposal).reshape(2, -1), expected, rtol=rtol, atol=0)


@gpu
@pytest.mark.parametrize("iterations", [None, 4])
def test_detached_gradient_is_g_times_m(iterations):
    torch.manual_seed(2)
    u = torch.randn(2, 5, 6, 7, dtype=torch.float64, device=DEVICE)
    g = torch.randn_like(u)
    _, proposal, _ = cupy_run(u, 1.5, iterations)
    grad = grad_of(lambda x: cupy_run(x, 1.5, iterations, 0.0, True), u, g)
    assert torch.equal(grad, g * proposal[:, None])
    x = u.clone().requires_grad_(True)
    _, m, _ = cupy_run(x, 1.5, iterations, 0.0, True)
    assert not m.requires_grad  # as the torch path: M is a constant


# -- degenerate inputs --------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("iterations", [None, 3])
def test_all_equal_features_give_a_uniform_map(iterations):
    u = torch.full((2, 4, 5, 6), 0.3, dtype=torch.float64, device=DEVICE)
    _, proposal, _ = cupy_run(u, 1.0, iterations)
    torch.testing.assert_close(proposal, torch.full_like(proposal, 1 / 30), rtol=0, atol=1e-15)


@gpu
def test_two_valued_periodic_map():
    u = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64, device=DEVICE).reshape(1, 1, 1, 3)
    _, proposal, _ = cupy_run(u, 1.0)
    torch.testing.assert_close(proposal.reshape(-1).cpu(), torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))
    _, walked, converged = cupy_run(u, 1.0, 5, 1e-6)
    assert not converged.any()
    torch.testing.assert_close(walked, torch_run(u, 1.0, 5, 1e-6)[1], rtol=0, atol=TIGHT)


@gpu
@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (2, 3, 1, 2), (2, 1, 3, 4), (2, 0, 3, 4)])
@pytest.mark.parametrize("iterations", [None, 3])
@pytest.mark.parametrize("detach", [True, False])
def test_small_maps_and_channel_counts(shape, iterations, detach):
    torch.manual_seed(3)
    u = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    g = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    mine, theirs = cupy_run(u, 1.0, iterations), torch_run(u, 1.0, iterations)
    for a, b in zip(mine[:2], theirs[:2], strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=TIGHT)
    a = grad_of(lambda x: cupy_run(x, 1.0, iterations, 0.0, detach), u, g)
    b = grad_of(lambda x: torch_run(x, 1.0, iterations, 0.0, detach), u, g)
    torch.testing.assert_close(a, b, rtol=0, atol=TIGHT)


@gpu
@pytest.mark.parametrize("eps", [1e-3, 1e-200])
@pytest.mark.parametrize("iterations", [None, 4])
def test_tiny_epsilon(eps, iterations):
    torch.manual_seed(4)
    u = torch.randn(2, 3, 6, 5, dtype=torch.float64, device=DEVICE)
    g = torch.randn_like(u)
    _, proposal, _ = cupy_run(u, eps, iterations)
    expected, _ = reference_map(u, eps, iterations)
    np.testing.assert_allclose(as_numpy(proposal).reshape(2, -1), expected, rtol=0, atol=TIGHT)
    grad = grad_of(lambda x: cupy_run(x, eps, iterations, 0.0, False), u, g)
    np.testing.assert_allclose(as_numpy(grad), reference_grad(u, g, eps, iterations, 0.0, False), rtol=0, atol=TIGHT)


@gpu
@pytest.mark.parametrize("iterations", [None, 3])
def test_nan_stays_in_its_image(iterations):
    torch.manual_seed(5)
    u = torch.randn(2, 3, 4, 4, dtype=torch.float64, device=DEVICE)
    u[1, 0, 2, 2] = float("nan")
    tolerance = 1e-3 if iterations else 0.0
    coupled, proposal, converged = cupy_run(u, 1.0, iterations, tolerance)
    assert torch.isnan(proposal[1]).all() and torch.isnan(coupled[1]).all()
    torch.testing.assert_close(proposal[0], cupy_run(u[:1], 1.0, iterations, tolerance)[1][0], rtol=0, atol=0)
    if iterations:
        assert not converged[1]
    grad = grad_of(lambda x: cupy_run(x, 1.0, iterations, 0.0, False), u, torch.ones_like(u))
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[0]).all()


# -- dtypes, layouts, streams, compilation, memory ----------------------------------------------


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    torch.manual_seed(6)
    x = torch.randn(2, 8, 7, 7, device=DEVICE).to(dtype).requires_grad_(True)
    coupled, proposal = spn.soft_proposal(x, detach=False, backend="cupy")
    assert coupled.dtype == proposal.dtype == dtype
    assert torch.equal(proposal, cupy_run(x.detach().float(), spn.default_epsilon(7, 7))[1].to(dtype))
    coupled.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


@gpu
def test_channels_last_input():
    torch.manual_seed(7)
    u = torch.randn(2, 6, 5, 7, dtype=torch.float64, device=DEVICE)
    g = torch.randn_like(u)
    expected = cupy_run(u, 1.0)
    got = cupy_run(u.to(memory_format=torch.channels_last), 1.0)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    a = grad_of(lambda x: cupy_run(x.to(memory_format=torch.channels_last), 1.0, None, 0.0, False), u, g)
    b = grad_of(lambda x: cupy_run(x, 1.0, None, 0.0, False), u, g)
    assert torch.equal(a, b)


@gpu
@pytest.mark.parametrize(("iterations", "tolerance"), MODES)
def test_non_default_stream_is_followed(iterations, tolerance):
    """The kernels run on torch's current stream: data written there just before is seen."""
    torch.manual_seed(8)
    u = torch.randn(2, 16, 14, 14, dtype=torch.float64, device=DEVICE)
    expected = cupy_run(u, 2.0, iterations, tolerance)
    target = torch.zeros_like(u)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keeps `side` busy, so a kernel on another stream would see zeros
        target.copy_(u)
        got = cupy_run(target, 2.0, iterations, tolerance)
        x = target.clone().requires_grad_(True)
        (cupy_run(x, 2.0, iterations, tolerance, False)[0].sum()).backward()
    side.synchronize()
    for a, b in zip(got, expected, strict=True):
        if a is not None:
            assert torch.equal(a, b)
    reference = grad_of(lambda y: cupy_run(y, 2.0, iterations, tolerance, False), u, torch.ones_like(u))
    assert x.grad is not None and torch.equal(x.grad, reference)


@gpu
def test_zero_size_batch():
    u = torch.zeros(0, 3, 4, 4, device=DEVICE)
    coupled, proposal, converged = cupy_run(u, 1.0, 3, 1e-3)
    assert coupled.shape == (0, 3, 4, 4) and proposal.shape == (0, 4, 4) and converged.shape == (0,)
    coupled, proposal = spn.soft_proposal(u, backend="cupy")
    assert coupled.shape == (0, 3, 4, 4)


@gpu
def test_torch_compile_breaks_the_graph_and_agrees():
    torch.manual_seed(9)
    u = torch.randn(2, 8, 7, 7, device=DEVICE)

    def pooled(x):
        coupled, _ = spn.soft_proposal(x * 1.0, backend="cupy")
        return spn.sum_pool(coupled)

    compiled = torch.compile(pooled, backend="eager")
    torch.testing.assert_close(compiled(u), pooled(u), rtol=0, atol=0)


@gpu
def test_auto_backend_uses_the_kernels_for_cuda_tensors():
    from spn.functional import _select_backend

    assert _select_backend("auto", torch.zeros(1, 1, 2, 2, device=DEVICE)) is cuda.cupy_soft_proposal
    assert _select_backend("auto", torch.zeros(1, 1, 2, 2)) is torch_soft_proposal


@gpu
def test_results_are_deterministic():
    torch.manual_seed(10)
    u = torch.randn(3, 32, 20, 20, device=DEVICE)
    g = torch.randn_like(u)
    for iterations in (None, 5):
        first = grad_of(lambda x, it=iterations: cupy_run(x, 3.0, it, 0.0, False), u, g)
        second = grad_of(lambda x, it=iterations: cupy_run(x, 3.0, it, 0.0, False), u, g)
        assert torch.equal(first, second)


@gpu
def test_stationary_mode_needs_no_n_by_n_memory():
    """(2, 8, 56, 56): one n x n double matrix per image would be 2 * 78 MB."""
    u = torch.randn(2, 8, 56, 56, device=DEVICE, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    coupled, _ = spn.soft_proposal(u, detach=False, backend="cupy")
    coupled.square().sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 16 * u.numel() * 8, extra  # O(B K n) doubles, far below 2 * 3136^2 * 8


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2 if torch.cuda.is_available() else True, reason="needs two GPUs")
def test_second_device():
    torch.manual_seed(11)
    u = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    a = cupy_run(u.to("cuda:1"), 1.0)
    b = cupy_run(u.to("cuda:0"), 1.0)
    assert a[1].device == torch.device("cuda:1")
    torch.testing.assert_close(a[1].cpu(), b[1].cpu(), rtol=0, atol=0)


# -- without a GPU ------------------------------------------------------------------------------


def test_cupy_backend_on_a_cpu_tensor_raises_a_clear_error():
    pytest.importorskip("cupy", reason="CuPy is not installed")
    with pytest.raises(RuntimeError, match="move the tensor to a CUDA device or use backend='torch'"):
        spn.soft_proposal(torch.rand(1, 2, 3, 3), backend="cupy")
