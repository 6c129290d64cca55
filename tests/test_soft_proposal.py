"""The torch path against the NumPy reference, and its contract as a library function."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import spn
from spn import graph
from spn import reference as R
from strategies import distances_kept, epsilons, feature_maps


def batch_of(maps, dtype=torch.float64):
    return torch.from_numpy(np.stack(maps)).to(dtype)


def reference_proposals(features, **options):
    return np.stack([R.proposal_map(u, **options) for u in features.double().numpy()])


# The degenerate cases that every property test must see, whatever hypothesis draws.
DEGENERATE = [
    np.full((3, 2, 4), 0.7),  # all-equal features
    np.array([[[1.0, 0.0, 1.0]]]),  # two-valued: a periodic walk
    np.array([[[1.0, 0.0], [0.0, 1.0]]]),  # two-valued checkerboard, n = 4
    np.array([[[2.0]], [[-1.0]]]),  # n = 1
    np.array([[[0.5, -0.5]]]),  # n = 2, K = 1
]


def with_degenerate_examples(test):
    for features in DEGENERATE:
        for epsilon in (None, 1e-200):  # 1e-200: the kernel underflows beyond the nearest neighbours
            test = example([features], epsilon, None)(test)
            test = example([features], epsilon, 3)(test)
    return test


# ---------------------------------------------------------------- forward, float64


@given(st.lists(feature_maps(), min_size=1, max_size=1), epsilons(), st.one_of(st.none(), st.integers(0, 6)))
@with_degenerate_examples
def test_float64_equals_reference(maps, epsilon, iterations):
    features = batch_of(maps)
    coupled, proposal = spn.soft_proposal(features, epsilon=epsilon, iterations=iterations, backend="torch")
    expected = reference_proposals(features, epsilon=epsilon, iterations=iterations)
    np.testing.assert_allclose(proposal.numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(coupled.numpy(), features.numpy() * expected[:, None], rtol=1e-10, atol=1e-12)


def test_batch_is_independent_images():
    rng = np.random.default_rng(0)
    maps = [rng.standard_normal((3, 4, 5)) for _ in range(4)]
    together = spn.soft_proposal(batch_of(maps))[1]
    alone = torch.cat([spn.soft_proposal(batch_of([m]))[1] for m in maps])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- forward, float32 error bound


def plain_float32_proposal(features, epsilon, iterations):
    """The same formula as a user would write it in float32: direct differences, dense n x n."""
    b, k, h, w = features.shape
    u = features.reshape(b, k, h * w).float()
    distances = (u[:, :, :, None] - u[:, :, None, :]).pow(2).sum(1).sqrt()
    kernel = torch.from_numpy(R.spatial_kernel(h, w, epsilon)).float()
    weights = distances * kernel
    if iterations is None:
        deg = weights.sum(1)
        total = deg.sum(-1, keepdim=True)
        return torch.where(total == 0, torch.full_like(deg, 1 / (h * w)), deg / total)
    sums = weights.sum(1, keepdim=True)
    transfer = torch.where(sums == 0, torch.full_like(weights, 1 / (h * w)), weights / sums)
    m = torch.full((b, h * w), 1 / (h * w))
    for _ in range(iterations):
        m = (transfer @ m[..., None])[..., 0]
        m = m / m.sum(-1, keepdim=True)
    return m


@given(
    st.lists(feature_maps(max_channels=6, max_side=6), min_size=1, max_size=1), st.one_of(st.none(), st.integers(1, 5))
)
def test_float32_error_is_at_most_twice_plain_float32(maps, iterations):
    # flash-attention's rule: the path under test may be at most twice as far from the
    # float64 reference as a plain float32 evaluation of the same formula, plus a floor.
    features = batch_of(maps, torch.float32)  # the reference sees the same float32 values
    _, _, h, w = features.shape
    epsilon = R.default_epsilon(h, w)
    expected = reference_proposals(features, iterations=iterations).reshape(1, -1)
    scale = expected.max()
    ours = spn.soft_proposal(features, iterations=iterations, backend="torch")[1]
    plain = plain_float32_proposal(features, epsilon, iterations)
    assert ours.dtype == torch.float32
    our_error = np.abs(ours.reshape(1, -1).double().numpy() - expected).max() / scale
    plain_error = np.abs(plain.double().numpy() - expected).max() / scale
    assert our_error <= 2 * plain_error + 1e-6, (our_error, plain_error)


# ---------------------------------------------------------------- backward


@given(
    st.lists(feature_maps(kinds=("grid", "normal", "two_valued", "constant"), max_side=4), min_size=1, max_size=1),
    st.one_of(st.none(), st.integers(1, 5)),
    st.booleans(),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)
@example([DEGENERATE[0]], None, False, 0, True)
@example([DEGENERATE[0]], None, False, 0, False)
@example([DEGENERATE[1]], None, False, 0, True)
@example([DEGENERATE[1]], 3, False, 0, False)
@example([DEGENERATE[3]], None, False, 0, True)
@example([DEGENERATE[4]], 2, False, 0, False)
def test_gradients_equal_reference_vjp(maps, iterations, detach, seed, keep):
    features = batch_of(maps).requires_grad_()
    grad_coupled = torch.from_numpy(np.random.default_rng(seed).standard_normal(features.shape))
    with distances_kept(keep):
        coupled, _ = spn.soft_proposal(features, iterations=iterations, detach=detach, backend="torch")
        coupled.backward(grad_coupled)
    expected = R.soft_proposal_vjp(maps[0], grad_coupled[0].numpy(), iterations=iterations, detach=detach)
    scale = max(1.0, np.abs(expected).max())
    np.testing.assert_allclose(features.grad[0].numpy(), expected, rtol=1e-8, atol=1e-10 * scale)


@pytest.mark.parametrize("iterations, keep", [(None, True), (None, False), (3, False)])
def test_gradcheck_exact_gradient(iterations, keep):
    features = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    features.requires_grad_()

    def both_outputs(x):
        return spn.soft_proposal(x, iterations=iterations, detach=False, backend="torch")

    with distances_kept(keep):
        assert torch.autograd.gradcheck(both_outputs, (features,))  # second order: test_torch_path_safety.py


@pytest.mark.parametrize("iterations", [None, 3])
def test_gradcheck_detached_gradient(iterations):
    # With detach=True the backward is, by design, not the derivative of the forward: it holds
    # M constant (Eq. 6). Dividing V by M(U) computed without gradient leaves a function whose
    # derivative, with M held constant, is the identity: gradcheck checks exactly that.
    features = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    features.requires_grad_()

    def held(x):
        coupled, proposal = spn.soft_proposal(x, iterations=iterations, detach=True, backend="torch")
        assert not proposal.requires_grad
        return coupled / proposal.unsqueeze(1)

    assert torch.autograd.gradcheck(held, (features,))


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (3, 16, 3, 4)])  # n >= 2K: one augmented GEMM; n < 2K: baddbmm
@pytest.mark.parametrize("iterations, keep", [(None, True), (None, False), (2, False)])
def test_blocked_computation_equals_one_block(monkeypatch, shape, iterations, keep):
    features = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grad = torch.randn_like(features)
    results = []
    for block in (graph.BLOCK_ELEMENTS, 7):  # 7: strips of one location, one image at a time
        monkeypatch.setattr(graph, "BLOCK_ELEMENTS", block)
        x = features.clone().requires_grad_()
        with distances_kept(keep):
            coupled, proposal = spn.soft_proposal(x, iterations=iterations, detach=False, backend="torch")
            coupled.backward(grad)
        results.append((proposal, x.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-13, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-11, atol=1e-15)


@given(
    feature_maps(max_channels=3, max_side=4),
    st.sampled_from([torch.float32, torch.float64]),
    st.one_of(st.none(), st.integers(1, 3)),
)
@example(np.array([[[1.0, 0.0, 1.0]]]), torch.float64, None)  # K = 1: a transposed view is the input itself
def test_inputs_are_never_modified(features, dtype, iterations):
    x = torch.from_numpy(features).to(dtype)[None]
    original = x.clone()
    leaf = x.requires_grad_()
    coupled, _ = spn.soft_proposal(leaf, iterations=iterations, detach=False, backend="torch")
    coupled.backward(torch.ones_like(coupled))
    assert torch.equal(leaf.detach(), original)


# ---------------------------------------------------------------- degenerate input


@pytest.mark.parametrize(
    "features, expected",
    [
        (np.full((3, 4, 5), 2.5), np.full((4, 5), 1 / 20)),  # all equal: every degree 0
        (np.array([[[1.0, 0.0, 1.0]]]), np.array([[0.25, 0.5, 0.25]])),  # periodic walk
        (np.array([[[7.0]]]), np.array([[1.0]])),  # n = 1
        (np.array([[[0.0, 3.0]]]), np.array([[0.5, 0.5]])),  # n = 2
    ],
)
def test_degenerate_maps(features, expected):
    for dtype in (torch.float64, torch.float32):
        proposal = spn.soft_proposal(batch_of([features], dtype))[1]
        np.testing.assert_allclose(proposal[0].double().numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("epsilon", [1e-3, 1e-200])
def test_underflowing_kernel_keeps_nearest_neighbours(epsilon):
    features = torch.zeros(1, 1, 3, 3)
    features[0, 0, 1, 1] = 1.0
    proposal = spn.soft_proposal(features, epsilon=epsilon)[1][0]
    expected = torch.tensor([[0, 1, 0], [1, 4, 1], [0, 1, 0]]) / 8.0
    torch.testing.assert_close(proposal, expected)


def test_periodic_walk_is_reported_not_hung():
    features = torch.tensor([[[[1.0, 0.0, 1.0]]]])
    with pytest.warns(spn.ConvergenceWarning, match="1 of 1"):
        spn.soft_proposal(features, iterations=20, tolerance=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spn.soft_proposal(torch.rand(2, 3, 4, 4), iterations=200, tolerance=1e-6)


def test_tolerance_freezes_each_image_separately():
    rng = np.random.default_rng(3)
    maps = [
        rng.standard_normal((2, 4, 4)),
        np.array([[[1.0, 0.0, 1.0, 1.0]] * 4] * 2),
    ]  # bipartite, 3/4 of the start on one side: periodic
    features = batch_of(maps)
    with pytest.warns(spn.ConvergenceWarning, match="1 of 2"):
        proposal = spn.soft_proposal(features, iterations=30, tolerance=1e-5)[1]
    for image, m in zip(maps, proposal, strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", R.ConvergenceWarning)
            expected = R.proposal_map(image, iterations=30, tolerance=1e-5)
        np.testing.assert_allclose(m.numpy(), expected, rtol=1e-10)


def test_nan_propagates_within_its_image():
    features = torch.rand(2, 3, 4, 4)
    features[1, 0, 2, 2] = float("nan")
    for iterations in (None, 5):
        coupled, proposal = spn.soft_proposal(features, iterations=iterations)
        assert torch.isfinite(proposal[0]).all() and torch.isfinite(coupled[0]).all()
        assert torch.isnan(proposal[1]).all()


def test_empty_batch_and_no_channels():
    coupled, proposal = spn.soft_proposal(torch.rand(0, 3, 5, 4, requires_grad=True))
    assert coupled.shape == (0, 3, 5, 4) and proposal.shape == (0, 5, 4)
    coupled.sum().backward()
    coupled, proposal = spn.soft_proposal(torch.rand(2, 0, 3, 3))
    torch.testing.assert_close(proposal, torch.full((2, 3, 3), 1 / 9))


# ---------------------------------------------------------------- dtypes and layouts


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    features = torch.rand(2, 4, 6, 6).to(dtype)
    coupled, proposal = spn.soft_proposal(features)
    assert coupled.dtype == dtype and proposal.dtype == dtype
    _, expected = spn.soft_proposal(features.float())
    torch.testing.assert_close(proposal.float(), expected, rtol=1e-2, atol=1e-4)


def test_autocast_is_ignored_inside():
    features = torch.rand(2, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        coupled, proposal = spn.soft_proposal(features)
    assert coupled.dtype == torch.float32
    torch.testing.assert_close(proposal, spn.soft_proposal(features)[1])


def test_channels_last_and_strided_inputs_agree():
    features = torch.rand(2, 5, 6, 7)
    expected = spn.soft_proposal(features)
    channels_last = spn.soft_proposal(features.to(memory_format=torch.channels_last))
    strided = spn.soft_proposal(features.transpose(2, 3).contiguous().transpose(2, 3))
    for got in (channels_last, strided):
        torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: spn.soft_proposal(np.zeros((1, 1, 2, 2))), TypeError, "torch.Tensor"),
        (lambda: spn.soft_proposal(torch.zeros(1, 2, 2)), ValueError, r"4-D \(B, K, H, W\)"),
        (lambda: spn.soft_proposal(torch.zeros(1, 1, 2, 2, dtype=torch.long)), TypeError, "float16, bfloat16"),
        (lambda: spn.soft_proposal(torch.zeros(1, 1, 0, 2)), ValueError, "at least 1 x 1"),
        (lambda: spn.soft_proposal(torch.zeros(1, 1, 2, 2), backend="cuda"), ValueError, "unknown backend"),
        (lambda: spn.soft_proposal(torch.zeros(1, 1, 2, 2), iterations=-1), ValueError, "between 0 and"),
        (lambda: spn.soft_proposal(torch.zeros(1, 1, 2, 2), iterations=10**9), ValueError, "between 0 and 10000"),
        (lambda: spn.soft_proposal(torch.zeros(1, 1, 2, 2), detach="False"), TypeError, "detach must be True or False"),
        (lambda: spn.soft_proposal(torch.zeros(1, 1, 2, 2), detach=None), TypeError, "detach"),
        (lambda: spn.soft_proposal(torch.zeros(1, 1, 2, 2), detach=0), TypeError, "detach"),
        (lambda: spn.SoftProposal(detach="no"), TypeError, "detach"),
        (lambda: spn.couple(torch.zeros(2, 4, 4, 4), torch.zeros(2, 1, 4, 4)), ValueError, r"\(B, H, W\)"),
        (lambda: spn.couple(torch.zeros(2, 4, 4, 4), torch.zeros(1, 4, 4)), ValueError, "same B, H, W"),
        (lambda: spn.couple(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 3)), ValueError, "same B, H, W"),
        (lambda: spn.soft_proposal(torch.zeros(1, 1, 2, 2), iterations=True), TypeError, "iterations"),
        (lambda: spn.soft_proposal(torch.zeros(1, 1, 2, 2), tolerance=1e-3), ValueError, "iterations=k"),
        (lambda: spn.soft_proposal(torch.zeros(1, 1, 2, 2), iterations=3, tolerance=-1.0), ValueError, "tolerance"),
        (lambda: spn.soft_proposal(torch.zeros(1, 1, 2, 2), epsilon=-1.0), ValueError, "positive"),
        (lambda: spn.soft_proposal(torch.zeros(1, 1, 2, 2), epsilon="wide"), TypeError, "epsilon"),
        (lambda: spn.SoftProposal(iterations=2.0), TypeError, "iterations"),
        (lambda: spn.SoftProposal(epsilon=0), ValueError, "positive"),
    ],
)
def test_bad_input_gets_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ---------------------------------------------------------------- module and presets


def test_module_returns_coupled_and_optionally_the_proposal():
    features = torch.rand(3, 4, 5, 5)
    layer = spn.SoftProposal()
    coupled = layer(features)
    coupled_too, proposal = layer(features, return_proposal=True)
    torch.testing.assert_close(coupled, coupled_too)
    torch.testing.assert_close(coupled, spn.soft_proposal(features)[0])
    torch.testing.assert_close(spn.SpatialSumPool()(coupled), (features * proposal[:, None]).sum((2, 3)))
    assert "iterations=None" in repr(layer)


def test_released_preset_follows_the_released_code():
    rng = np.random.default_rng(4)
    image = rng.standard_normal((3, 5, 5))
    layer = spn.SoftProposal(**spn.RELEASED)
    assert "released_epsilon" in repr(layer)
    _, proposal = layer(batch_of([image]), return_proposal=True)
    expected = R.proposal_map(image, epsilon=0.15 * 25, iterations=20, tolerance=1e-4)
    np.testing.assert_allclose(proposal[0].numpy(), expected, rtol=1e-10)


def test_paper_preset_is_the_default():
    features = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(spn.soft_proposal(features, **spn.PAPER)[1], spn.soft_proposal(features)[1])


@pytest.mark.parametrize("keep", [True, False])
def test_torch_compile_gives_the_eager_result(keep):
    # A user's compiled training step: graph breaks are fine, errors and wrong values are not.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), spn.SoftProposal(detach=False), spn.SpatialSumPool()
    )
    images = torch.rand(2, 3, 6, 6)
    with distances_kept(keep):
        eager = model(images)
        (eager_grad,) = torch.autograd.grad(eager.sum(), model[0].weight)
        torch._dynamo.reset()
        compiled = torch.compile(model)(images)
        (compiled_grad,) = torch.autograd.grad(compiled.sum(), model[0].weight)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.parametrize("height, width, epsilon", [(1, 1, 0.15), (3, 7, 1.0), (40, 40, 6.0), (5, 5, 1e-200)])
def test_spatial_kernel_equals_reference(height, width, epsilon):
    # NumPy's and torch's exp may differ in the last bit; rows of the kernel are its rows.
    expected = R.spatial_kernel(height, width, epsilon)
    rows = slice(1, min(height * width, 37))
    whole = graph.spatial_kernel(height, width, epsilon)
    np.testing.assert_allclose(whole.numpy(), expected, rtol=1e-14, atol=0)
    assert torch.equal(graph.spatial_kernel(height, width, epsilon, rows), whole[rows])


@pytest.mark.parametrize("shape, keeps", [((2, 64, 6, 6), True), ((2, 2, 6, 6), False)])
def test_exact_gradient_reuses_the_forwards_distances_when_they_fit(monkeypatch, shape, keeps):
    # keeps_distances: when the distances' upper triangle takes no more memory than the features
    # (n <~ 1.6 K), the backward takes them from the forward instead of recomputing each strip
    # (unless a strip may hold a near pair: test_torch_path_scale.py).
    assert graph.keeps_distances(shape) is keeps
    n, width = shape[2] * shape[3], shape[3]
    assert (graph._kept_layout(n, width)[1] <= n * shape[1]) is keeps
    computed = []
    original = graph._Prepared.squared_distances

    def counted(self, rows, **options):
        computed.append(rows)
        return original(self, rows, **options)

    monkeypatch.setattr(graph._Prepared, "squared_distances", counted)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).relu().requires_grad_()
    coupled, _ = spn.soft_proposal(x, detach=False, backend="torch")
    forward = len(computed)
    coupled.sum().backward()
    assert forward > 0 and len(computed) - forward == (0 if keeps else forward)
    with torch.no_grad():  # no gradient needed: nothing kept
        assert spn.soft_proposal(x, detach=False, backend="torch")[1].shape == shape[:1] + shape[2:]
    expected = R.soft_proposal_vjp(x[0].detach().double().numpy(), np.ones(shape[1:]), detach=False)
    np.testing.assert_allclose(x.grad[0].double().numpy(), expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_kept_gradient_recomputes_what_the_backward_threshold_flags(monkeypatch):
    # The forward keeps L~/d and, per strip, the backward pass's near-pair test (its tau, larger
    # than the forward's) on the forward's own smallest d^2. A pair with rho = d^2 / (|v_a|^2 +
    # |v_b|^2) between the two thresholds is not recomputed by the forward, but the backward must
    # recompute it from the features, as the recomputing path does.
    forward_tau, backward_tau, _ = graph.NEAR[torch.float32]
    directions = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    directions /= directions.norm(dim=1, keepdim=True)
    vectors = torch.cat([directions, -directions])  # mean 0: centring leaves the norms at 1
    rho = (forward_tau * backward_tau) ** 0.5  # between the thresholds (|v_a|^2 + |v_b|^2 = 2)
    vectors[1] = vectors[0] + (2 * rho) ** 0.5 * torch.linalg.qr(torch.stack([vectors[0], vectors[2]]).T)[0][:, 1]
    x = vectors.T.reshape(1, 16, 4, 4).contiguous().requires_grad_()
    recomputed = []
    original = graph._Prepared.squared_distances

    def recorded(self, rows, **options):
        block, rows_recomputed = original(self, rows, **options)
        recomputed.append(rows_recomputed is not None)
        return block, rows_recomputed

    monkeypatch.setattr(graph._Prepared, "squared_distances", recorded)
    with distances_kept(True):
        coupled, _ = spn.soft_proposal(x, detach=False, backend="torch")
        forward = len(recomputed)
        assert forward > 0 and not any(recomputed)  # the forward found no pair below its tau
        coupled.sum().backward()
    assert recomputed[forward:] == [True]  # the strip of locations 0 and 1, recomputed and near
    expected = R.soft_proposal_vjp(x[0].detach().double().numpy(), np.ones((16, 4, 4)), detach=False)
    np.testing.assert_allclose(x.grad[0].double().numpy(), expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("keep", [True, False])
def test_the_proposal_is_an_input_of_the_coupled_features(keep):
    # V = U * M with M an intermediate of the graph, as written: dL/dM seen by M's hooks and
    # retain_grad holds the path through V, and grad(V, M) exists. (A one-node forward that
    # returned V and M side by side, tried for speed, broke all three; whether the distances
    # are kept must not change them.)
    x = torch.randn(2, 40, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).relu()
    x.requires_grad_()
    g = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    through_v = (g * x).sum(1).detach()
    with distances_kept(keep):
        coupled, proposal = spn.soft_proposal(x, detach=False, backend="torch")
        (grad_m,) = torch.autograd.grad(coupled, proposal, g, retain_graph=True)
        torch.testing.assert_close(grad_m, through_v, rtol=1e-14, atol=1e-14)
        proposal.retain_grad()
        coupled.backward(g)
        torch.testing.assert_close(proposal.grad, through_v, rtol=1e-14, atol=1e-14)
        x.grad = None
        coupled, proposal = spn.soft_proposal(x, detach=False, backend="torch")
        seen = []
        proposal.register_hook(lambda grad: seen.append(grad) or torch.zeros_like(grad))  # M held constant
        coupled.backward(g)
    torch.testing.assert_close(seen[0], through_v, rtol=1e-14, atol=1e-14)
    # with M's gradient zeroed by the hook, U's gradient is that of detach=True: dV * M
    torch.testing.assert_close(x.grad, g * proposal.detach().unsqueeze(1), rtol=1e-14, atol=1e-14)
