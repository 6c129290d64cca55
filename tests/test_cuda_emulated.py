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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batched_reference import reference_grad, reference_map
from cuda_emulator import ENV_SEED, Emulator, compiler, launch_seed, library, seed_for
from cuda_plain_float32 import plain_float32_soft_proposal
from spn.cuda import function
from spn.functional import torch_soft_proposal

pytestmark = [
    pytest.mark.skipif(compiler() is None, reason="the CUDA emulator needs a C++ compiler (g++)"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CUDA emulator uses glibc's ucontext"),
]

TIGHT = 1e-12
ROOT = Path(__file__).resolve().parents[1]
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
    assert _launched(emulator, lambda: run(emulator, u, 1.0)) == ["sp_degree_f64", "sp_normalize_f64", "sp_couple_f64"]
    walk = _launched(emulator, lambda: run(emulator, u.float(), 1.0, 3, 1e-4))
    steps = ["sp_walk_matvec", "sp_walk_update"] * 3
    assert walk == ["sp_weights_f32", "sp_normalize_columns", *steps, "sp_couple_f32"]
    exact = lambda x: run(emulator, x, 1.0, None, 0.0, False)  # noqa: E731
    backward = _launched(emulator, lambda: grad_of(exact, u, torch.ones_like(u)))
    assert backward[3:] == ["sp_grad_m_f64", "sp_stationary_grad_deg", "sp_distance_vjp_f64", "sp_grad_finish_f64"]


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
