"""The CUDA kernels and their launch code, run on the CPU by tests/cuda_emulator.py.

The .cu sources are compiled as C++ with one fiber per CUDA thread, and driven by
the same spn/cuda/function.py that drives them on a GPU; each launch's arguments are
checked against the kernel's C signature and every array is surrounded by guard cells.
This checks the arithmetic, the indexing, the block synchronisation and the launch
plan against the NumPy reference without a GPU; it cannot check CuPy, DLPack, streams,
speed, or anything the hardware does differently (see tests/cuda_emulator.py).

Each test gets its own emulator (the `emulator` fixture), seeded from the test's node id:
the thread orders a test sees are the same alone (`pytest -k`) as in the whole suite, which
the last tests of this file check.

Shapes are small because the emulator is slow, but they cover several
tiles of locations (n > 64, partial tiles) and several chunks of channels (K > 16).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from batched_reference import reference_grad, reference_map
from cuda_emulator import ENV_SEED, Emulator, compiler, launch_seed, library, seed_for
from cuda_plain_float32 import plain_float32_soft_proposal
from spn.cuda import function
from spn.functional import torch_soft_proposal
from strategies import feature_maps

pytestmark = [
    pytest.mark.skipif(compiler() is None, reason="the CUDA emulator needs a C++ compiler (g++)"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CUDA emulator uses glibc's ucontext"),
]

TIGHT = 1e-12
ROOT = Path(__file__).resolve().parents[1]
INTEGER_MAP = np.array([[[3.0, -1.0, 0.0], [2.0, 2.0, -4.0]], [[1.0, 0.0, 5.0], [1.0, 1.0, -2.0]]])
ENV_TRACE = "SPN_EMULATOR_TRACE"  # a file: each test's launches are appended to it as a JSON line


@pytest.fixture
def emulator(request):
    """A fresh emulator for each test, seeded from the test's node id (see cuda_emulator.seed_for)."""
    emu = Emulator(seed_for(request.node.nodeid))
    yield emu
    trace = os.environ.get(ENV_TRACE)
    if trace:
        launches = [[x.name, x.seed, x.order] for x in emu.launches]
        record = {"test": request.node.nodeid, "seed": emu.seed, "launches": launches}
        with open(trace, "a") as file:
            file.write(json.dumps(record) + "\n")


def run(emulator, u, eps, iterations=None, tolerance=0.0, detach=True):
    return function.soft_proposal(u, eps, iterations, tolerance, detach, emulator.make_launcher)


def grad_of(fn, u, g):
    x = u.detach().clone().requires_grad_(True)
    coupled = fn(x)[0]
    (coupled * g).sum().backward()
    return x.grad


@pytest.fixture(scope="module", autouse=True)
def _build():
    library()


MODES = [(None, 0.0), (4, 0.0), (6, 1e-3)]


@pytest.mark.parametrize(("iterations", "tolerance"), MODES)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 37, 3, 3), (2, 2, 11, 13)])
def test_forward_matches_the_reference(emulator, shape, iterations, tolerance):
    torch.manual_seed(sum(shape))
    u = torch.randn(shape, dtype=torch.float64)
    eps = 0.15 * (shape[2] * shape[3]) ** 0.5 + 0.4
    coupled, proposal, converged = run(emulator, u, eps, iterations, tolerance)
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
def test_gradients_match_the_reference(emulator, shape, iterations, tolerance, detach):
    torch.manual_seed(7 + sum(shape))
    u = torch.randn(shape, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    eps = 1.7
    grad = grad_of(lambda x: run(emulator, x, eps, iterations, tolerance, detach), u, g)
    expected = reference_grad(u, g, eps, iterations, tolerance, detach)
    scale = max(1.0, np.abs(expected).max())
    np.testing.assert_allclose(grad.numpy(), expected, rtol=0, atol=TIGHT * scale)
    if detach:  # the paper's gradient: exactly G * M
        _, proposal, _ = run(emulator, u, eps, iterations, tolerance)
        assert torch.equal(grad, g * proposal[:, None])


@pytest.mark.parametrize("iterations", [None, 3])
def test_the_returned_map_carries_its_own_gradient(emulator, iterations):
    """A loss on M as well as on V: dE/dM from the map adds to the coupling's."""
    torch.manual_seed(3)
    u = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    w = torch.randn(1, 4, 4, dtype=torch.float64)
    grads = []
    for fn in (lambda *args: run(emulator, *args), torch_soft_proposal):
        x = u.clone().requires_grad_(True)
        coupled, proposal, _ = fn(x, 1.1, iterations, 0.0, False)
        (coupled.sum() + (proposal * w).sum()).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("iterations", [None, 3])
def test_gradcheck(emulator, iterations):
    torch.manual_seed(11)
    u = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda x: run(emulator, x, 1.3, iterations, 0.0, False)[:2]  # noqa: E731
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
    emulator = Emulator(seed)  # hypothesis draws the seed: an example replays with its own thread orders
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, channels, height, width, dtype=torch.float64, generator=generator)
    g = torch.randn(batch, channels, height, width, dtype=torch.float64, generator=generator)
    _, proposal, _ = run(emulator, u, eps, iterations)
    expected, _ = reference_map(u, eps, iterations)
    np.testing.assert_allclose(proposal.reshape(batch, -1).numpy(), expected, rtol=0, atol=TIGHT)
    grad = grad_of(lambda x: run(emulator, x, eps, iterations, 0.0, False), u, g)
    ref = reference_grad(u, g, eps, iterations, 0.0, False)
    np.testing.assert_allclose(grad.numpy(), ref, rtol=0, atol=TIGHT * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize(("iterations", "tolerance"), [*MODES, (5, 0.0)])
def test_float32_error_is_at_most_twice_plain_float32s(emulator, iterations, tolerance):
    """flash-attention's rule: against the float64 reference (which sees the same float32
    inputs), the kernels' float32 error, of the map and of the exact gradient, is at most
    twice that of a plain float32 evaluation of the same formula (tests/cuda_plain_float32.py),
    plus one unit in the last place of the largest value. The offset of 100 makes distances
    by a matrix product (|a|^2 + |c|^2 - 2 a.c) lose digits that direct differences keep."""
    torch.manual_seed(5)
    u = (torch.randn(2, 20, 9, 9) * 3 + 100).float()
    g = torch.randn(2, 20, 9, 9).float()
    eps = 2.0
    expected, _ = reference_map(u, eps, iterations, tolerance)
    mine = run(emulator, u, eps, iterations, tolerance)[1].reshape(2, -1).double().numpy()
    plain = plain_float32_soft_proposal(u, eps, iterations, tolerance)[1].reshape(2, -1).double().numpy()
    mine_error, plain_error = np.abs(mine - expected).max(), np.abs(plain - expected).max()
    assert plain_error > 0  # a plain float32 evaluation does round: the bound is not the floor alone
    assert mine_error <= 2 * plain_error + 2.0**-24 * np.abs(expected).max(), (mine_error, plain_error)
    ref = reference_grad(u, g, eps, iterations, tolerance, False)
    mine = grad_of(lambda x: run(emulator, x, eps, iterations, tolerance, False), u, g).double().numpy()
    plain = grad_of(lambda x: plain_float32_soft_proposal(x, eps, iterations, tolerance), u, g).double().numpy()
    mine_error, plain_error = np.abs(mine - ref).max(), np.abs(plain - ref).max()
    assert plain_error > 0
    assert mine_error <= 2 * plain_error + 2.0**-24 * np.abs(ref).max(), (mine_error, plain_error)


# -- degenerate inputs -----------------------------------------------------------------------


@pytest.mark.parametrize("iterations", [None, 3])
def test_all_equal_features_give_a_uniform_map(emulator, iterations):
    u = torch.full((2, 3, 4, 5), 0.7, dtype=torch.float64)
    _, proposal, _ = run(emulator, u, 1.0, iterations)
    torch.testing.assert_close(proposal, torch.full_like(proposal, 1 / 20), rtol=0, atol=1e-15)
    g = torch.randn_like(u)
    grad = grad_of(lambda x: run(emulator, x, 1.0, iterations, 0.0, False), u, g)
    np.testing.assert_allclose(grad.numpy(), reference_grad(u, g, 1.0, iterations, 0.0, False), rtol=0, atol=TIGHT)


def test_two_valued_periodic_map(emulator):
    u = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64).reshape(1, 1, 1, 3)
    _, proposal, _ = run(emulator, u, 1.0)
    torch.testing.assert_close(proposal.reshape(-1), torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))
    _, walked, converged = run(emulator, u, 1.0, 5, 1e-6)  # alternates forever: never converges
    assert not converged.any()
    expected, _ = reference_map(u, 1.0, 5)
    np.testing.assert_allclose(walked.reshape(1, -1).numpy(), expected, rtol=0, atol=TIGHT)


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (2, 3, 1, 2), (2, 1, 3, 4), (2, 0, 3, 4)])
@pytest.mark.parametrize("iterations", [None, 3])
def test_small_maps_and_channel_counts(emulator, shape, iterations):
    torch.manual_seed(1)
    u = torch.randn(shape, dtype=torch.float64)
    coupled, proposal, _ = run(emulator, u, 1.0, iterations)
    mine, theirs = (coupled, proposal), torch_soft_proposal(u, 1.0, iterations, 0.0, True)[:2]
    for a, b in zip(mine, theirs, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=TIGHT)
    g = torch.randn(shape, dtype=torch.float64)
    grad = grad_of(lambda x: run(emulator, x, 1.0, iterations, 0.0, False), u, g)
    expected = grad_of(lambda x: torch_soft_proposal(x, 1.0, iterations, 0.0, False), u, g)
    torch.testing.assert_close(grad, expected, rtol=0, atol=TIGHT)


@pytest.mark.parametrize("eps", [1e-3, 1e-200])
@pytest.mark.parametrize("iterations", [None, 4])
def test_tiny_epsilon_keeps_the_nearest_neighbours(emulator, eps, iterations):
    torch.manual_seed(2)
    u = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    _, proposal, _ = run(emulator, u, eps, iterations)
    expected, _ = reference_map(u, eps, iterations)
    np.testing.assert_allclose(proposal.reshape(1, -1).numpy(), expected, rtol=0, atol=TIGHT)
    g = torch.randn_like(u)
    grad = grad_of(lambda x: run(emulator, x, eps, iterations, 0.0, False), u, g)
    np.testing.assert_allclose(grad.numpy(), reference_grad(u, g, eps, iterations, 0.0, False), rtol=0, atol=TIGHT)


@pytest.mark.parametrize("iterations", [None, 3])
def test_nan_stays_in_its_image(emulator, iterations):
    torch.manual_seed(4)
    u = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    u[1, 2, 1, 3] = float("nan")
    coupled, proposal, converged = run(emulator, u, 1.0, iterations, 1e-3 if iterations else 0.0)
    assert torch.isnan(proposal[1]).all() and torch.isnan(coupled[1]).all()
    assert torch.isfinite(proposal[0]).all()
    expected, _ = reference_map(u[:1], 1.0, iterations, 1e-3 if iterations else 0.0)
    np.testing.assert_allclose(proposal[0].reshape(1, -1).numpy(), expected, rtol=0, atol=TIGHT)
    if iterations:
        assert not converged[1]
    grad = grad_of(lambda x: run(emulator, x, 1.0, iterations, 0.0, False), u, torch.ones_like(u))
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[0]).all()


def test_half_precision_is_computed_in_float32(emulator):
    torch.manual_seed(6)
    u = torch.randn(1, 4, 3, 5)
    for dtype in (torch.float16, torch.bfloat16):
        x = u.to(dtype).requires_grad_(True)
        coupled, proposal, _ = run(emulator, x, 1.0, None, 0.0, False)
        assert coupled.dtype == proposal.dtype == dtype
        expected = run(emulator, x.detach().float(), 1.0)[1].to(dtype)
        assert torch.equal(proposal, expected)
        coupled.sum().backward()
        assert x.grad is not None and x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


def test_channels_last_and_sliced_inputs(emulator):
    torch.manual_seed(8)
    u = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    expected = run(emulator, u, 1.0)
    for x in (u.to(memory_format=torch.channels_last), torch.stack([u, u], -1)[..., 0]):
        got = run(emulator, x, 1.0)
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
    g = torch.randn_like(u)
    torch.testing.assert_close(
        grad_of(lambda x: run(emulator, x.to(memory_format=torch.channels_last), 1.0, None, 0.0, False), u, g),
        grad_of(lambda x: run(emulator, x, 1.0, None, 0.0, False), u, g),
        rtol=0,
        atol=0,
    )


def test_zero_size_batch_launches_nothing(emulator):
    coupled, proposal, converged = run(emulator, torch.zeros(0, 3, 4, 4), 1.0, 3)
    assert coupled.shape == (0, 3, 4, 4) and proposal.shape == (0, 4, 4) and converged.shape == (0,)
    assert emulator.count == 0 and not emulator.launches


# -- the launch plan --------------------------------------------------------------------------


def _launched(emulator, fn):
    before = emulator.count
    fn()
    return [launch.name for launch in emulator.launches if launch.number >= before]


def test_launch_plan_stationary_and_walk(emulator):
    torch.manual_seed(12)
    u = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    stationary = ["sp_unit_scale_f64", "sp_degree_f64", "sp_normalize_f64", "sp_couple_f64"]
    assert _launched(emulator, lambda: run(emulator, u, 1.0)) == stationary
    walk = _launched(emulator, lambda: run(emulator, u.float(), 1.0, 3, 1e-4))
    steps = ["sp_walk_matvec", "sp_walk_update"] * 3
    assert walk == ["sp_unit_scale_f32", "sp_weights_f32", "sp_normalize_columns", *steps, "sp_couple_f32"]
    exact = lambda x: run(emulator, x, 1.0, None, 0.0, False)  # noqa: E731
    backward = _launched(emulator, lambda: grad_of(exact, u, torch.ones_like(u)))
    assert backward[4:] == ["sp_grad_m_f64", "sp_stationary_grad_deg", "sp_distance_vjp_f64", "sp_grad_finish_f64"]
    assert _launched(emulator, lambda: run(emulator, u, 1.0, 0)) == ["sp_couple_f64"]  # M uniform: no distances


def test_grid_stride_loops_cover_every_image(emulator, monkeypatch):
    """With 2 images per grid dimension for 3 images and one block for every 1-D kernel, the
    kernels' image and grid-stride loops must do all the work; the tile grids are not capped."""
    torch.manual_seed(9)
    u = torch.randn(3, 18, 9, 8, dtype=torch.float64)  # n = 72: two tiles of locations
    g = torch.randn_like(u)
    modes = {None: 0.0, 2: 1e-3}

    def outputs(it):
        got = run(emulator, u, 1.5, it, modes[it])
        return got, grad_of(lambda x: run(emulator, x, 1.5, it, 0.0, False), u, g)

    expected = {it: outputs(it) for it in modes}
    monkeypatch.setattr(function, "_GRID_YZ_LIMIT", 2)
    monkeypatch.setattr(function, "_MAX_GRID_X", 1)
    for it, (values, grad) in expected.items():
        before = emulator.count
        got, got_grad = outputs(it)
        grids = {launch.name: launch.grid for launch in emulator.launches if launch.number >= before}
        assert max(max(grid[1:]) for grid in grids.values()) == 2  # the cap was in force
        assert grids["sp_couple_f64"][0] == 1
        for a, b in zip(got, values, strict=True):
            if a is not None:
                assert torch.equal(a, b)
        assert torch.equal(got_grad, grad)


def test_the_emulator_checks_launch_arguments(emulator):
    launch = emulator.make_launcher("cpu")
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
    with pytest.raises(ValueError, match="CPU tensors"):
        emulator.make_launcher(torch.device("cuda", 0))


# -- the emulator's thread orders: seeded per test ---------------------------------------------


def _normalize_launch(emulator):
    """One launch of a kernel with many barriers (a block-wide sum), on fixed data."""
    deg = torch.arange(1.0, 301.0, dtype=torch.float64).reshape(1, 300)
    m = torch.zeros(1, 300, dtype=torch.float64)
    emulator.launch("sp_normalize_f64", (1, 1, 1), (256, 1, 1), deg, m, np.int32(1), np.int32(300))
    return emulator.launches[-1]


def test_thread_orders_depend_on_the_seed_and_the_launch_index_only():
    first, other, again = Emulator(seed=123), Emulator(seed=124), Emulator(seed=123)
    a = [_normalize_launch(first) for _ in range(3)]
    for _ in range(5):  # launches elsewhere change nothing for `again`
        _normalize_launch(other)
    b = [_normalize_launch(again) for _ in range(3)]
    assert a == b
    assert [x.seed for x in a] == [launch_seed(123, i) for i in range(3)]
    assert len({x.order for x in a}) == 3  # each launch of a test shuffles differently
    assert _normalize_launch(Emulator(seed=124)).order != a[0].order  # another test, other orders
    assert other.count == 5 and len(other.launches) == 5


def test_the_launch_record_is_bounded():
    emulator = Emulator(seed=1, keep=4)
    for _ in range(6):
        _normalize_launch(emulator)
    assert emulator.count == 6 and len(emulator.launches) == 4
    assert [(x.number, x.seed) for x in emulator.launches] == [(i, launch_seed(1, i)) for i in range(2, 6)]


def test_the_seed_comes_from_the_node_id(emulator, request, monkeypatch):
    assert emulator.seed == seed_for(request.node.nodeid)
    assert "test_cuda_emulated.py::test_the_seed_comes_from_the_node_id" in request.node.nodeid
    assert seed_for("a::b") != seed_for("a::c")
    monkeypatch.setenv(ENV_SEED, "7")  # another family of thread orders, for a longer hunt
    assert seed_for("a::b") != seed_for("a::b", salt="") == seed_for("a::b", salt="")
    assert seed_for("a::b") == seed_for("a::b", salt="7")


def _traced_runs(tmp_path, selections):
    """Run pytest on this file once per -k selection (in parallel); each test's launches, per run."""
    env = {k: v for k, v in os.environ.items() if k != ENV_SEED}
    runs = []
    for number, selection in enumerate(selections):
        trace = tmp_path / f"run{number}.jsonl"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda_emulated.py",
                   "-k", selection]
        process = subprocess.Popen(command, cwd=ROOT, env={**env, ENV_TRACE: str(trace)}, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        runs.append((process, trace))
    records = []
    for process, trace in runs:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-3000:]
        records.append([json.loads(line) for line in trace.read_text().splitlines()])
    return records


def test_a_test_sees_the_same_thread_orders_alone_and_after_others(tmp_path):
    """Run one test alone (as `pytest -k` does), and after another test that launches kernels:
    it gets the same seed and every one of its launches resumes the threads in the same orders."""
    target = "test_launch_plan_stationary_and_walk"
    alone, together = _traced_runs(tmp_path, [target, f"{target} or test_two_valued_periodic_map"])
    assert [record["test"] for record in alone] == [f"tests/test_cuda_emulated.py::{target}"]
    assert [record["test"].split("::")[1] for record in together] == ["test_two_valued_periodic_map", target]
    assert together[0]["launches"]  # the other test launched kernels first
    assert together[1] == alone[0]
    assert len(alone[0]["launches"]) > 10


# -- every scale: each image is scaled by an exact power of two near its largest |u| ------------
#
# M does not depend on the scale of U and V = U M(U) is homogeneous of degree 1, so neither does
# the exact gradient for a given dE/dV. The expected values are the float64 reference on the
# unscaled map (or on the float64 values of the input, which it evaluates without overflow).

NORMAL_EXPONENTS = {torch.float64: (-1022, 1024), torch.float32: (-126, 128)}  # 2^e normal for lo <= e < hi


def power_of_two_range(values: np.ndarray, dtype) -> tuple[int, int]:
    """The k for which values * 2^k keeps every nonzero entry normal (so exact and finite) in dtype."""
    lo, hi = NORMAL_EXPONENTS[dtype]
    nonzero = np.abs(values[values != 0])
    if nonzero.size == 0:
        return lo - 60, hi + 60
    return lo - int(np.floor(np.log2(nonzero.min()))), hi - 1 - int(np.floor(np.log2(nonzero.max())))


def times_power_of_two(values: np.ndarray, k: int, dtype) -> torch.Tensor:
    """values * 2^k in dtype, exactly (two factors, each a normal number)."""
    half = k // 2
    return torch.from_numpy(values).to(dtype) * 2.0**half * 2.0 ** (k - half)


@pytest.mark.parametrize("iterations", [None, 3])
@pytest.mark.parametrize(
    ("dtype", "scale"),
    [(torch.float32, s) for s in (1e20, 1e30, 3e37, 1e-30, 1e-38)] + [(torch.bfloat16, s) for s in (1e30, 1e-30)],
)
def test_issue_scales_low_precision(emulator, dtype, scale, iterations):
    """The issue: float32 features at 1e20 gave NaN and at 1e-30 a uniform map; bfloat16 NaN at 1e30."""
    rng = np.random.default_rng(1)
    x = (torch.from_numpy(rng.standard_normal((2, 3, 5, 6))) * scale).to(dtype)
    eps = 1.3
    proposal = run(emulator, x, eps, iterations)[1]
    expected, _ = reference_map(x.double(), eps, iterations)  # float64 squares do not overflow here
    rtol = 1e-5 if dtype == torch.float32 else 2.0**-7
    np.testing.assert_allclose(proposal.reshape(2, -1).double().numpy(), expected, rtol=rtol, atol=0)
    if dtype == torch.float32:
        g = torch.from_numpy(rng.standard_normal(x.shape)).float()
        grad = grad_of(lambda y: run(emulator, y, eps, iterations, 0.0, False), x, g)
        ref = reference_grad(x.double(), g, eps, iterations, 0.0, False)
        assert np.abs(grad.double().numpy() - ref).max() <= 1e-4 * np.abs(ref).max()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    features=feature_maps(max_channels=4, max_side=4),
    fraction=st.floats(0.0, 1.0),
    eps=st.sampled_from([0.3, 1.0, 1.7]),
    iterations=st.one_of(st.none(), st.integers(0, 3)),
    seed=st.integers(0, 2**16),
)
@example(features=INTEGER_MAP, fraction=0.0, eps=1.0, iterations=None, seed=0)  # entries down to 2^-1022
@example(features=INTEGER_MAP, fraction=1.0, eps=1.0, iterations=None, seed=0)  # the largest just below 2^1024
@example(features=INTEGER_MAP, fraction=1.0, eps=1.0, iterations=3, seed=0)
@example(features=np.full((2, 3, 3), 0.7), fraction=1.0, eps=1.0, iterations=None, seed=0)
def test_float64_map_and_gradient_do_not_depend_on_the_scale(features, fraction, eps, iterations, seed):
    emulator = Emulator(seed)
    lo, hi = power_of_two_range(features, torch.float64)
    k = round(lo + fraction * (hi - lo))
    x = times_power_of_two(features, k, torch.float64)[None]
    assert torch.isfinite(x).all()
    expected, _ = reference_map(torch.from_numpy(features)[None], eps, iterations)
    proposal = run(emulator, x, eps, iterations)[1]
    np.testing.assert_allclose(proposal.reshape(1, -1).numpy(), expected, rtol=1e-10, atol=1e-12)
    g = torch.from_numpy(np.random.default_rng(seed).standard_normal(x.shape))
    grad = grad_of(lambda y: run(emulator, y, eps, iterations, 0.0, False), x, g)
    ref = reference_grad(torch.from_numpy(features)[None], g, eps, iterations, 0.0, False)
    np.testing.assert_allclose(grad.numpy(), ref, rtol=1e-8, atol=1e-10 * max(1.0, np.abs(ref).max()))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    features=feature_maps(max_channels=4, max_side=4),
    fraction=st.floats(0.0, 1.0),
    iterations=st.one_of(st.none(), st.integers(1, 3)),
    seed=st.integers(0, 2**16),
)
@example(features=INTEGER_MAP, fraction=0.0, iterations=None, seed=0)
@example(features=INTEGER_MAP, fraction=1.0, iterations=None, seed=0)
@example(features=INTEGER_MAP, fraction=1.0, iterations=2, seed=0)
def test_float32_map_and_gradient_do_not_depend_on_the_scale(features, fraction, iterations, seed):
    """Within twice a plain float32 evaluation's error at a moderate scale (plus 1e-6 of the peak)."""
    emulator = Emulator(seed)
    moderate = torch.from_numpy(features).float()[None]  # the float32 values, exactly
    lo, hi = power_of_two_range(moderate.double().numpy(), torch.float32)
    k = round(lo + fraction * (hi - lo))
    x = times_power_of_two(moderate[0].double().numpy(), k, torch.float32)[None]
    assert torch.isfinite(x).all()
    eps = 1.0
    expected, _ = reference_map(moderate, eps, iterations)
    plain = plain_float32_soft_proposal(moderate, eps, iterations)[1].reshape(1, -1).double().numpy()
    mine = run(emulator, x, eps, iterations)[1].reshape(1, -1).double().numpy()
    peak = expected.max()
    error, plain_error = np.abs(mine - expected).max() / peak, np.abs(plain - expected).max() / peak
    assert error <= 2 * plain_error + 1e-6, (error, plain_error, k)
    g = torch.from_numpy(np.random.default_rng(seed).standard_normal(x.shape)).float()
    ref = reference_grad(moderate, g, eps, iterations, 0.0, False)
    grad = grad_of(lambda y: run(emulator, y, eps, iterations, 0.0, False), x, g).double().numpy()
    plain = grad_of(lambda y: plain_float32_soft_proposal(y, eps, iterations), moderate, g).double().numpy()
    scale = max(np.abs(ref).max(), 1e-30)
    error, plain_error = np.abs(grad - ref).max() / scale, np.abs(plain - ref).max() / scale
    assert error <= 2 * plain_error + 1e-6, (error, plain_error, k)


# -- double backward and torch.func -----------------------------------------------------------


@pytest.mark.parametrize("iterations", [None, 3])
def test_gradgradcheck(emulator, iterations):
    torch.manual_seed(13)
    u = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda x: run(emulator, x, 1.3, iterations, 0.0, False)[:2]  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (u,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("iterations", "tolerance"), [(None, 0.0), (4, 0.0), (10, 1e-3)])
@pytest.mark.parametrize("scale", [1.0, 2.0**-700])
def test_double_backward_is_not_dropped(emulator, iterations, tolerance, scale):
    """A gradient penalty: d/du <dE/du, w> = H w, against central differences of the reference VJP.
    dE/dV does not depend on u here, so a backward pass that ignores create_graph loses H w silently.
    At 2^-700 U, dE/dU is the same and H w is 2^700 times larger (dE/dU is homogeneous of degree 0)."""
    torch.manual_seed(14)
    u = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    g, w = torch.randn_like(u), torch.randn_like(u)
    if tolerance > 0:  # the walk's freezing rule is in play: the images stop after 6 and 5 of the 10 steps
        assert reference_map(u, 1.2, iterations, tolerance)[1].all()
    x = (u * scale).requires_grad_(True)
    coupled = run(emulator, x, 1.2, iterations, tolerance, False)[0]
    (first,) = torch.autograd.grad((coupled * g).sum(), x, create_graph=True)
    expected = reference_grad(u, g, 1.2, iterations, tolerance, False)
    np.testing.assert_allclose(first.detach().numpy(), expected, rtol=0, atol=1e-11)
    assert first.requires_grad
    (second,) = torch.autograd.grad((first * w).sum(), x)
    h = 1e-5
    plus = reference_grad(u + h * w, g, 1.2, iterations, tolerance, False)
    minus = reference_grad(u - h * w, g, 1.2, iterations, tolerance, False)
    np.testing.assert_allclose(second.numpy() * scale, (plus - minus) / (2 * h), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("iterations", [None, 3])
def test_create_graph_gives_the_first_order_gradient(emulator, iterations):
    """With a loss on M as well as on V, the differentiable gradient (create_graph=True) equals the
    kernels' (checked against the reference and the torch path above)."""
    torch.manual_seed(17)
    u = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    g, q = torch.randn_like(u), torch.randn(2, 3, 4, dtype=torch.float64)
    grads = []
    for create_graph in (False, True):
        x = u.clone().requires_grad_(True)
        coupled, proposal, _ = run(emulator, x, 1.2, iterations, 0.0, False)
        (grad,) = torch.autograd.grad((coupled * g).sum() + (proposal * q).sum(), x, create_graph=create_graph)
        grads.append(grad.detach())
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-12)


def test_double_backward_of_the_detached_gradient(emulator):
    """detach=True: dE/dU = G M with M a constant, so d<dE/dU, w>/dG = w M."""
    torch.manual_seed(15)
    u = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(u).requires_grad_(True)
    w = torch.randn_like(u)
    coupled = run(emulator, u, 1.2, None, 0.0, True)[0]
    (first,) = torch.autograd.grad(coupled, u, g, create_graph=True)
    (second,) = torch.autograd.grad((first * w).sum(), g)
    expected, _ = reference_map(u, 1.2)
    np.testing.assert_allclose(second.numpy(), w.numpy() * expected.reshape(2, 1, 3, 4), rtol=0, atol=1e-15)


@pytest.mark.parametrize("iterations", [None, 2])
def test_torch_func_transforms_and_forward_mode(emulator, iterations):
    """vmap, grad, jacrev, jacfwd and forward-mode AD give the reference's values: the map, the VJP,
    and tangents t with <J t, g> = <t, J^T g>."""
    torch.manual_seed(16)
    u = torch.randn(2, 1, 2, 2, 3, dtype=torch.float64)  # a vmapped dim in front
    g, t = torch.randn_like(u[0]), torch.randn_like(u[0])
    eps = 1.1
    maps = torch.func.vmap(lambda x: run(emulator, x, eps, iterations)[1])(u)
    for i in range(2):
        np.testing.assert_allclose(maps[i].reshape(1, -1).numpy(), reference_map(u[i], eps, iterations)[0], atol=1e-12)
    x = u[0]
    vjp = reference_grad(x, g, eps, iterations, 0.0, False)
    energy = lambda y: (run(emulator, y, eps, iterations, 0.0, False)[0] * g).sum()  # noqa: E731
    np.testing.assert_allclose(torch.func.grad(energy)(x).numpy(), vjp, atol=1e-11)
    coupled = lambda y: run(emulator, y, eps, iterations, 0.0, False)[0]  # noqa: E731
    for jacobian in (torch.func.jacrev(coupled)(x), torch.func.jacfwd(coupled)(x)):
        np.testing.assert_allclose((jacobian * g[..., None, None, None, None]).sum((0, 1, 2, 3)).numpy(), vjp,
                                   atol=1e-11)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, t)
        tangent = torch.autograd.forward_ad.unpack_dual(coupled(dual)).tangent
    np.testing.assert_allclose((tangent * g).sum().item(), (t.numpy() * vjp).sum(), rtol=1e-9)


def test_unit_scale_kernel(emulator):
    """scale[b] = 2^-e for max |u| = f 2^e (f in [1/2, 1)), e clamped to T's normal powers of two;
    1 for an all-zero image or one with an infinite entry; NaN entries passed over."""
    import math

    def expected(image, smallest, largest):
        peak = 0.0
        for value in image.reshape(-1).tolist():
            if abs(value) > peak:  # False for NaN
                peak = abs(value)
        if peak == 0.0 or math.isinf(peak):
            return 1.0
        e = min(max(math.frexp(peak)[1], -largest), -smallest)
        return 2.0**-e

    f32 = torch.tensor([[1.0, -3.0], [0.5, 0.0]]).expand(9, 2, 2).clone()
    f32[1] *= 2.0**-140  # subnormal peak: clamped to 2^126
    f32[2] *= 2.0**100
    f32[3] = 0.0
    f32[4, 0, 0] = float("inf")
    f32[5, 1, 1] = float("nan")
    f32[6] = torch.tensor([[-0.5, 0.25], [0.0, 0.0]])  # peak exactly 1/2: scale 1
    f32[7] = torch.tensor([[2.0**-149, 0.0], [0.0, 0.0]])
    f32[8] *= 2.0**120
    f64 = f32.double()
    f64[1] = torch.tensor([[1.7e308, 1.0], [0.0, -1.0]], dtype=torch.float64)  # clamped to 2^-1022
    f64[7] = torch.tensor([[2.0**-1074, 0.0], [0.0, 0.0]], dtype=torch.float64)
    launch = emulator.make_launcher()
    for u, (smallest, largest), suffix in ((f32, (-126, 127), "f32"), (f64, (-1022, 1023), "f64")):
        scale = torch.zeros(9, dtype=torch.float64)
        launch(f"sp_unit_scale_{suffix}", (2, 1, 1), (256, 1, 1), u, scale, np.int32(9), np.int64(4))
        want = [expected(image.double().numpy(), smallest, largest) for image in u]
        assert scale.tolist() == want, (suffix, scale.tolist(), want)
