"""Hypothesis strategies for feature maps that reach the degenerate cases of Soft Proposal."""

import contextlib

import numpy as np
from hypothesis import strategies as st

KINDS = ("grid", "normal", "constant", "two_valued")


@st.composite
def feature_maps(draw, kinds=KINDS, max_channels=4, max_side=5, min_locations=1):
    """(K, H, W) float64 arrays.

    grid: values in {-2, -1.75, ..., 2}: exact duplicates and well-separated distinct vectors.
    normal: Gaussian with a random scale and a large random offset (tests the centring).
    constant: every location has the same vector (all distances 0).
    two_valued: two vectors placed by a random mask (the periodic walks live here).
    """
    k = draw(st.integers(1, max_channels))
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    if h * w < min_locations:
        w = -(-min_locations // h)
    kind = draw(st.sampled_from(kinds))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "grid":
        return rng.integers(-8, 9, size=(k, h, w)) / 4.0
    if kind == "normal":
        scale = 10.0 ** draw(st.integers(-3, 3))
        offset = draw(st.sampled_from([0.0, 1.0, -50.0, 1e3]))
        return rng.standard_normal((k, h, w)) * scale + offset
    if kind == "constant":
        return np.broadcast_to(rng.standard_normal((k, 1, 1)), (k, h, w)).copy()
    a, b = rng.standard_normal((2, k, 1, 1))
    mask = rng.integers(0, 2, size=(1, h, w)).astype(bool)
    return np.where(mask, a, b)


def epsilons():
    """None (the default rule), ordinary widths, and widths whose kernel underflows."""
    return st.one_of(
        st.none(),
        st.floats(0.3, 20.0),
        st.sampled_from([1e-3, 0.05, 1e-200]),
    )


@contextlib.contextmanager
def distances_kept(keep: bool):
    """Force the exact gradient of the stationary mode to keep the forward's distances (True) or
    to recompute them (False), whatever `spn.graph.keeps_distances` would decide for the shape:
    both paths must give the same gradient."""
    from spn import graph

    original = graph.keeps_distances
    graph.keeps_distances = lambda shape: keep
    try:
        yield
    finally:
        graph.keeps_distances = original
