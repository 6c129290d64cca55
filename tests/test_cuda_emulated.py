"""The CUDA kernels and their launch code, run on the CPU by spn/cuda/emulate.py.

The .cu sources are compiled as C++ with one fiber per CUDA thread, and driven by
the same spn/cuda/function.py that drives them on a GPU; each launch's arguments are
checked against the kernel's C signature and every array is surrounded by guard cells.
This checks the arithmetic, the indexing, the block synchronisation and the launch
plan against the NumPy reference without a GPU; it cannot check CuPy, DLPack, streams,
speed, or anything the hardware does differently (see spn/cuda/emulate.py).

Shapes are small because the emulator is slow, but they cover several
tiles of locations (n > 64, partial tiles) and several chunks of channels (K > 16).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spn.cuda import emulate, function
from spn.functional import torch_soft_proposal

pytestmark = [
    pytest.mark.skipif(emulate.compiler() is None, reason="the CUDA emulator needs a C++ compiler (g++)"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CUDA emulator uses glibc's ucontext"),
]

from batched_reference import reference_grad, reference_map  # noqa: E402

TIGHT = 1e-12
LAUNCHER = emulate.EmulatedLauncher


def run(u, eps, iterations=None, tolerance=0.0, detach=True):
    return function.soft_proposal(u, eps, iterations, tolerance, detach, LAUNCHER)


def grad_of(fn, u, g):
    x = u.detach().clone().requires_grad_(True)
    coupled = fn(x)[0]
    (coupled * g).sum().backward()
    return x.grad


@pytest.fixture(scope="module", autouse=True)
def _build():
    emulate.library()


MODES = [(None, 0.0), (4, 0.0), (6, 1e-3)]


@pytest.mark.parametrize(("iterations", "tolerance"), MODES)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 37, 3, 3), (2, 2, 11, 13)])
def test_forward_matches_the_reference(shape, iterations, tolerance):
    torch.manual_seed(sum(shape))
    u = torch.randn(shape, dtype=torch.float64)
    eps = 0.15 * (shape[2] * shape[3]) ** 0.5 + 0.4
    coupled, proposal, converged = run(u, eps, iterations, tolerance)
    expected, flags = reference_map(u, eps, iterations, tolerance)
    np.testing.assert_allclose(proposal.reshape(shape[0], -1).numpy(), expected, rtol=0, atol=TIGHT)
    np.testing.assert_allclose(coupled.numpy(), (u * proposal[:, None]).numpy(), rtol=0, atol=0)
    if iterations is None:
        assert converged is None
    else:
        assert converged.dtype == torch.bool and converged.shape == (shape[0],)
        if tolerance > 0:
            np.testing.assert_array_equal(converged.numpy(), flags)


@pytest.mark.parametrize(("iterations", "tolerance"), [*MODES, (0, 0.0)])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 18, 9, 8)])
def test_gradients_match_the_reference(shape, iterations, tolerance, detach):
    torch.manual_seed(7 + sum(shape))
    u = torch.randn(shape, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    eps = 1.7
    grad = grad_of(lambda x: run(x, eps, iterations, tolerance, detach), u, g)
    expected = reference_grad(u, g, eps, iterations, tolerance, detach)
    scale = max(1.0, np.abs(expected).max())
    np.testing.assert_allclose(grad.numpy(), expected, rtol=0, atol=TIGHT * scale)
    if detach:  # the paper's gradient: exactly G * M
        _, proposal, _ = run(u, eps, iterations, tolerance)
        assert torch.equal(grad, g * proposal[:, None])


@pytest.mark.parametrize("iterations", [None, 3])
def test_the_returned_map_carries_its_own_gradient(iterations):
    """A loss on M as well as on V: dE/dM from the map adds to the coupling's."""
    torch.manual_seed(3)
    u = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    w = torch.randn(1, 4, 4, dtype=torch.float64)
    grads = []
    for fn in (run, torch_soft_proposal):
        x = u.clone().requires_grad_(True)
        coupled, proposal, _ = fn(x, 1.1, iterations, 0.0, False)
        (coupled.sum() + (proposal * w).sum()).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("iterations", [None, 3])
def test_gradcheck(iterations):
    torch.manual_seed(11)
    u = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda x: run(x, 1.3, iterations, 0.0, False)[:2]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (u,), eps=1e-6, atol=1e-8, rtol=1e-6)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 2),
    channels=st.integers(1, 20),
    height=st.integers(1, 6),
    width=st.integers(1, 6),
    eps=st.floats(0.3, 5.0),
    seed=st.integers(0, 2**16),
    iterations=st.sampled_from([None, 2]),
)
def test_property_forward_and_backward(batch, channels, height, width, eps, seed, iterations):
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, channels, height, width, dtype=torch.float64, generator=generator)
    g = torch.randn(batch, channels, height, width, dtype=torch.float64, generator=generator)
    _, proposal, _ = run(u, eps, iterations)
    expected, _ = reference_map(u, eps, iterations)
    np.testing.assert_allclose(proposal.reshape(batch, -1).numpy(), expected, rtol=0, atol=TIGHT)
    grad = grad_of(lambda x: run(x, eps, iterations, 0.0, False), u, g)
    ref = reference_grad(u, g, eps, iterations, 0.0, False)
    np.testing.assert_allclose(grad.numpy(), ref, rtol=0, atol=TIGHT * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("iterations", [None, 5])
def test_float32_error_is_at_most_twice_the_torch_paths(iterations):
    torch.manual_seed(5)
    u = (torch.randn(2, 20, 9, 9) * 3 + 10).float()
    g = torch.randn(2, 20, 9, 9).float()
    eps = 2.0
    expected, _ = reference_map(u, eps, iterations)
    mine = run(u, eps, iterations)[1].reshape(2, -1).double().numpy()
    theirs = torch_soft_proposal(u, eps, iterations, 0.0, True)[1].reshape(2, -1).double().numpy()
    floor = 4 * 2.0**-24 * np.abs(expected).max()
    assert np.abs(mine - expected).max() <= 2 * np.abs(theirs - expected).max() + floor
    ref = reference_grad(u, g, eps, iterations, 0.0, False)
    mine = grad_of(lambda x: run(x, eps, iterations, 0.0, False), u, g).double().numpy()
    theirs = grad_of(lambda x: torch_soft_proposal(x, eps, iterations, 0.0, False), u, g).double().numpy()
    floor = 64 * 2.0**-24 * np.abs(ref).max()
    assert np.abs(mine - ref).max() <= 2 * np.abs(theirs - ref).max() + floor


# -- degenerate inputs -----------------------------------------------------------------------


@pytest.mark.parametrize("iterations", [None, 3])
def test_all_equal_features_give_a_uniform_map(iterations):
    u = torch.full((2, 3, 4, 5), 0.7, dtype=torch.float64)
    _, proposal, _ = run(u, 1.0, iterations)
    torch.testing.assert_close(proposal, torch.full_like(proposal, 1 / 20), rtol=0, atol=1e-15)
    g = torch.randn_like(u)
    grad = grad_of(lambda x: run(x, 1.0, iterations, 0.0, False), u, g)
    np.testing.assert_allclose(grad.numpy(), reference_grad(u, g, 1.0, iterations, 0.0, False), rtol=0, atol=TIGHT)


def test_two_valued_periodic_map():
    u = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64).reshape(1, 1, 1, 3)
    _, proposal, _ = run(u, 1.0)
    torch.testing.assert_close(proposal.reshape(-1), torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))
    _, walked, converged = run(u, 1.0, 5, 1e-6)  # alternates forever: never converges
    assert not converged.any()
    expected, _ = reference_map(u, 1.0, 5)
    np.testing.assert_allclose(walked.reshape(1, -1).numpy(), expected, rtol=0, atol=TIGHT)


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (2, 3, 1, 2), (2, 1, 3, 4), (2, 0, 3, 4)])
@pytest.mark.parametrize("iterations", [None, 3])
def test_small_maps_and_channel_counts(shape, iterations):
    torch.manual_seed(1)
    u = torch.randn(shape, dtype=torch.float64)
    coupled, proposal, _ = run(u, 1.0, iterations)
    mine, theirs = (coupled, proposal), torch_soft_proposal(u, 1.0, iterations, 0.0, True)[:2]
    for a, b in zip(mine, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=TIGHT)
    g = torch.randn(shape, dtype=torch.float64)
    grad = grad_of(lambda x: run(x, 1.0, iterations, 0.0, False), u, g)
    expected = grad_of(lambda x: torch_soft_proposal(x, 1.0, iterations, 0.0, False), u, g)
    torch.testing.assert_close(grad, expected, rtol=0, atol=TIGHT)


@pytest.mark.parametrize("eps", [1e-3, 1e-200])
@pytest.mark.parametrize("iterations", [None, 4])
def test_tiny_epsilon_keeps_the_nearest_neighbours(eps, iterations):
    torch.manual_seed(2)
    u = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    _, proposal, _ = run(u, eps, iterations)
    expected, _ = reference_map(u, eps, iterations)
    np.testing.assert_allclose(proposal.reshape(1, -1).numpy(), expected, rtol=0, atol=TIGHT)
    g = torch.randn_like(u)
    grad = grad_of(lambda x: run(x, eps, iterations, 0.0, False), u, g)
    np.testing.assert_allclose(grad.numpy(), reference_grad(u, g, eps, iterations, 0.0, False), rtol=0, atol=TIGHT)


@pytest.mark.parametrize("iterations", [None, 3])
def test_nan_stays_in_its_image(iterations):
    torch.manual_seed(4)
    u = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    u[1, 2, 1, 3] = float("nan")
    coupled, proposal, converged = run(u, 1.0, iterations, 1e-3 if iterations else 0.0)
    assert torch.isnan(proposal[1]).all() and torch.isnan(coupled[1]).all()
    assert torch.isfinite(proposal[0]).all()
    expected, _ = reference_map(u[:1], 1.0, iterations, 1e-3 if iterations else 0.0)
    np.testing.assert_allclose(proposal[0].reshape(1, -1).numpy(), expected, rtol=0, atol=TIGHT)
    if iterations:
        assert not converged[1]
    grad = grad_of(lambda x: run(x, 1.0, iterations, 0.0, False), u, torch.ones_like(u))
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[0]).all()


def test_half_precision_is_computed_in_float32():
    torch.manual_seed(6)
    u = torch.randn(1, 4, 3, 5)
    for dtype in (torch.float16, torch.bfloat16):
        x = u.to(dtype).requires_grad_(True)
        coupled, proposal, _ = run(x, 1.0, None, 0.0, False)
        assert coupled.dtype == proposal.dtype == dtype
        expected = run(x.detach().float(), 1.0)[1].to(dtype)
        assert torch.equal(proposal, expected)
        coupled.sum().backward()
        assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


def test_channels_last_and_sliced_inputs():
    torch.manual_seed(8)
    u = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    expected = run(u, 1.0)
    for x in (u.to(memory_format=torch.channels_last), torch.stack([u, u], -1)[..., 0]):
        got = run(x, 1.0)
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
    g = torch.randn_like(u)
    torch.testing.assert_close(
        grad_of(lambda x: run(x.to(memory_format=torch.channels_last), 1.0, None, 0.0, False), u, g),
        grad_of(lambda x: run(x, 1.0, None, 0.0, False), u, g),
        rtol=0,
        atol=0,
    )


def test_zero_size_batch_launches_nothing():
    before = len(LAUNCHER.launches)
    coupled, proposal, converged = run(torch.zeros(0, 3, 4, 4), 1.0, 3)
    assert coupled.shape == (0, 3, 4, 4) and proposal.shape == (0, 4, 4) and converged.shape == (0,)
    assert len(LAUNCHER.launches) == before


# -- the launch plan --------------------------------------------------------------------------


def _launched(fn):
    before = len(LAUNCHER.launches)
    fn()
    return [name for name, _, _ in LAUNCHER.launches[before:]]


def test_launch_plan_stationary_and_walk():
    u = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert _launched(lambda: run(u, 1.0)) == ["sp_degree_f64", "sp_normalize_f64", "sp_couple_f64"]
    walk = _launched(lambda: run(u.float(), 1.0, 3, 1e-4))
    assert walk == ["sp_weights_f32", "sp_normalize_columns"] + ["sp_walk_matvec", "sp_walk_update"] * 3 + ["sp_couple_f32"]
    backward = _launched(lambda: grad_of(lambda x: run(x, 1.0, None, 0.0, False), u, torch.ones_like(u)))
    assert backward[3:] == ["sp_grad_m_f64", "sp_stationary_grad_deg", "sp_distance_vjp_f64", "sp_grad_finish_f64"]


def test_grid_stride_loops_cover_every_image(monkeypatch):
    """With one block per grid dimension, the kernels' image loops must do all the work."""
    torch.manual_seed(9)
    u = torch.randn(3, 18, 9, 8, dtype=torch.float64)
    g = torch.randn_like(u)
    expected = {it: (run(u, 1.5, it, 1e-3 if it else 0.0), grad_of(lambda x: run(x, 1.5, it, 0.0, False), u, g)) for it in (None, 2)}
    monkeypatch.setattr(function, "_MAX_GRID_YZ", 1)
    monkeypatch.setattr(function, "_MAX_GRID_X", 1)
    for it, (outputs, grad) in expected.items():
        got = run(u, 1.5, it, 1e-3 if it else 0.0)
        for a, b in zip(got, outputs):
            if a is not None:
                assert torch.equal(a, b)
        assert torch.equal(grad_of(lambda x: run(x, 1.5, it, 0.0, False), u, g), grad)


def test_the_emulator_checks_launch_arguments():
    launch = LAUNCHER()
    deg = torch.zeros(1, 4, dtype=torch.float64)
    m = torch.zeros(1, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="int32"):
        launch("sp_normalize_f64", (1, 1, 1), (256, 1, 1), deg, m, np.int64(1), np.int32(4))
    with pytest.raises(TypeError, match="float32"):
        launch("sp_normalize_f32", (1, 1, 1), (256, 1, 1), deg, m, np.int32(1), np.int32(4))
    with pytest.raises(TypeError, match="takes 4 arguments"):
        launch("sp_normalize_f64", (1, 1, 1), (256, 1, 1), deg, m, np.int32(1))
    with pytest.raises(RuntimeError, match="invalid launch"):
        launch("sp_normalize_f64", (1, 1, 1), (2048, 1, 1), deg, m, np.int32(1), np.int32(4))
    # a launch that claims more locations than the arrays hold writes past them: caught
    with pytest.raises(RuntimeError, match="outside the array"):
        launch("sp_normalize_f64", (1, 1, 1), (256, 1, 1), deg, m, np.int32(1), np.int32(8))
