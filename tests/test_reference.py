"""The reference against itself: closed-form stationary state vs SciPy's eigs and long power iteration."""


import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from spn import reference as R
from strategies import epsilons, feature_maps


def test_periodic_walk_from_the_issue():
    features = np.array([[[1.0, 0.0, 1.0]]])
    np.testing.assert_allclose(R.proposal_map(features).ravel(), [0.25, 0.5, 0.25], rtol=1e-15)
    transfer = R.transfer_matrix(features)
    np.testing.assert_allclose(R.stationary_eigs(transfer), [0.25, 0.5, 0.25], rtol=1e-12)
    odd = R.power_iteration(transfer, 101)
    even = R.power_iteration(transfer, 100)
    np.testing.assert_allclose(odd.proposal, [1 / 6, 2 / 3, 1 / 6], rtol=1e-12)
    np.testing.assert_allclose(even.proposal, [1 / 3, 1 / 3, 1 / 3], rtol=1e-12)
    with pytest.warns(R.ConvergenceWarning, match="did not reach tolerance"):
        R.proposal_map(features, iterations=50, tolerance=1e-6)


@given(feature_maps(kinds=("normal", "grid"), min_locations=3), st.floats(0.3, 10.0))
def test_stationary_state_is_the_eigenvector_of_eigenvalue_one(features, epsilon):
    transfer = R.transfer_matrix(features, epsilon)
    np.testing.assert_allclose(transfer.sum(axis=0), 1.0, rtol=1e-12)
    closed = R.stationary_state(features, epsilon)
    assume(closed.min() > 0)  # every node reached: the chain is irreducible, eigenvalue 1 simple
    np.testing.assert_allclose(R.stationary_eigs(transfer), closed, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(transfer @ closed, closed, rtol=1e-12, atol=1e-15)


@given(feature_maps(kinds=("normal",), min_locations=3), st.floats(0.3, 10.0))
def test_stationary_state_is_the_limit_of_long_power_iteration(features, epsilon):
    walk = R.power_iteration(R.transfer_matrix(features, epsilon), 3000, tolerance=1e-14)
    assume(walk.converged)
    np.testing.assert_allclose(walk.proposal, R.stationary_state(features, epsilon), rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("n", [1, 2])
def test_eigs_falls_back_to_dense_for_tiny_graphs(n):
    features = np.arange(n, dtype=float).reshape(1, 1, n)
    np.testing.assert_allclose(R.stationary_eigs(R.transfer_matrix(features)), np.full(n, 1 / n))


@pytest.mark.parametrize("n", [2, 3, 4, 40])
def test_eigs_refuses_a_disconnected_graph(n):
    disconnected = np.eye(n)  # every node keeps its mass: eigenvalue 1 n times
    with pytest.raises(ValueError, match="eigenvalue 1 must be simple"):
        R.stationary_eigs(disconnected)


def test_eigs_refuses_two_components_in_a_large_graph():
    # Two disconnected blocks of 20 nodes: eigenvalue 1 twice, ARPACK's path (n > DENSE_EIGS).
    block = np.full((20, 20), 1 / 20)
    with pytest.raises(ValueError, match="eigenvalue 1 must be simple"):
        R.stationary_eigs(np.block([[block, np.zeros((20, 20))], [np.zeros((20, 20)), block]]))


def test_small_epsilon_keeps_nearest_neighbours():
    # A bright pixel on a dark 3 x 3 map. With the paper's kernel at eps = 1e-3 every weight
    # underflows and the map would be flat; the true small-eps limit weighs the 4 neighbours.
    features = np.zeros((1, 3, 3))
    features[0, 1, 1] = 1.0
    m = R.proposal_map(features, epsilon=1e-3)
    expected = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]]) / 8.0
    np.testing.assert_allclose(m, expected, rtol=1e-14)
    np.testing.assert_allclose(R.proposal_map(features, epsilon=1e-200), expected, rtol=1e-14)


@given(feature_maps(), epsilons())
def test_proposal_map_is_a_finite_distribution(features, epsilon):
    m = R.proposal_map(features, epsilon)
    assert np.isfinite(m).all() and (m >= 0).all()
    assert m.sum() == pytest.approx(1.0, abs=1e-12)


def test_degenerate_maps():
    np.testing.assert_allclose(R.proposal_map(np.full((3, 4, 5), 2.5)), np.full((4, 5), 1 / 20))
    assert R.proposal_map(np.zeros((1, 1, 1))).tolist() == [[1.0]]


def test_bad_input_is_rejected_clearly():
    with pytest.raises(ValueError, match=r"shape \(K, H, W\)"):
        R.proposal_map(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        R.proposal_map(np.full((1, 2, 2), np.nan))
    with pytest.raises(ValueError, match="epsilon must be positive"):
        R.proposal_map(np.zeros((1, 2, 2)), epsilon=0.0)
    with pytest.raises(ValueError, match="tolerance applies"):
        R.proposal_map(np.zeros((1, 2, 2)), tolerance=1e-3)
    with pytest.raises(TypeError, match="iterations"):
        R.proposal_map(np.zeros((1, 2, 2)), iterations=2.5)


def test_vjp_detached_is_grad_times_proposal():
    rng = np.random.default_rng(1)
    u, g = rng.standard_normal((2, 3, 4, 4))
    np.testing.assert_allclose(R.soft_proposal_vjp(u, g), g * R.proposal_map(u)[None], rtol=1e-15)


@pytest.mark.parametrize("iterations", [None, 4])
def test_vjp_exact_matches_finite_differences(iterations):
    rng = np.random.default_rng(2)
    u, g = rng.standard_normal((2, 2, 3, 3))
    grad = R.soft_proposal_vjp(u, g, iterations=iterations, detach=False)

    def loss(x):
        return float((R.couple(x, R.proposal_map(x, iterations=iterations)) * g).sum())

    step = 1e-6
    numeric = np.zeros_like(u)
    for index in np.ndindex(u.shape):
        plus, minus = u.copy(), u.copy()
        plus[index] += step
        minus[index] -= step
        numeric[index] = (loss(plus) - loss(minus)) / (2 * step)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_vjp_takes_the_issue_positional_order():
    # soft_proposal_vjp(features, grad_coupled, epsilon, iterations, detach): detach is 5th.
    rng = np.random.default_rng(3)
    u, g = rng.standard_normal((2, 2, 3, 3))
    positional = R.soft_proposal_vjp(u, g, None, 2, False)
    np.testing.assert_array_equal(positional, R.soft_proposal_vjp(u, g, iterations=2, detach=False))
    assert not np.allclose(positional, R.soft_proposal_vjp(u, g, iterations=2, detach=True))
