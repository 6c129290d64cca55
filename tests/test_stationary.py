"""spn.stationary: the exact stationary Soft Proposal and its exact gradient as one autograd node.

Its gradient must be the composed form's (degrees, stationary state, product: three nodes whose
gradients autograd adds) in every case, and it must run only where it applies.
"""

import pytest
import torch

import spn
from spn import graph, stationary
from strategies import distances_kept

EPSILON = 0.15 * 30**0.5  # the paper's rule for 5 x 6 maps


def features(shape=(3, 40, 5, 6), dtype=torch.float64, seed=0, constant=True):
    """ReLU features (repeated zero vectors); with `constant`, image 1 is constant (all its degrees
    are 0: the uniform map)."""
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed)).relu()
    if constant:
        x[1] = 0.5
    return x.requires_grad_()


def cotangents(x, seed=1):
    generator = torch.Generator().manual_seed(seed)
    batch, _, height, width = x.shape
    return (
        torch.randn(x.shape, dtype=x.dtype, generator=generator),
        torch.randn((batch, height, width), dtype=x.dtype, generator=generator),
    )


def grad_fn_name(x) -> str:
    return type(spn.soft_proposal(x, detach=False, backend="torch")[0].grad_fn).__name__


def test_one_node_only_where_it_applies(monkeypatch):
    x = features()
    assert graph.keeps_distances(x.shape)
    assert grad_fn_name(x) == "_ExactStationaryBackward"
    with distances_kept(False):  # maps too large to keep the distances: the composed form
        assert grad_fn_name(x) == "_CoupleBackward"
    assert type(spn.soft_proposal(x, backend="torch")[0].grad_fn).__name__ == "MulBackward0"  # detach=True
    with torch.no_grad():
        assert spn.soft_proposal(x, detach=False, backend="torch")[0].grad_fn is None
    calls = []
    original = stationary._ExactStationary.apply
    monkeypatch.setattr(stationary._ExactStationary, "apply", lambda *args: calls.append(1) or original(*args))
    spn.soft_proposal(x, detach=False, backend="torch")
    assert calls == [1]  # the patch is seen

    def proposal(u):
        return spn.soft_proposal(u, detach=False, backend="torch")[1]

    torch.compile(proposal, fullgraph=True, backend="eager")(x).sum().backward()
    torch.func.vmap(proposal)(x.detach()[:, None])
    torch.func.grad(lambda u: proposal(u).square().sum())(x.detach()[:1])
    with torch.autograd.forward_ad.dual_level():
        proposal(torch.autograd.forward_ad.make_dual(x.detach(), torch.ones_like(x)))
    torch.jit.trace(proposal, (x.detach(),), check_trace=False)
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("outputs", ["coupled", "proposal", "both"])
def test_gradient_is_the_composed_forms(dtype, outputs):
    x = features(dtype=dtype)
    grad_coupled, grad_proposal = cotangents(x)
    pick = {"coupled": [0], "proposal": [1], "both": [0, 1]}[outputs]
    ours = spn.soft_proposal(x, detach=False, backend="torch")
    assert type(ours[0].grad_fn).__name__ == "_ExactStationaryBackward"
    composed = stationary._composed(x, EPSILON)
    for a, b in zip(ours, composed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    grads = [(grad_coupled, grad_proposal)[i] for i in pick]
    (got,) = torch.autograd.grad([ours[i] for i in pick], x, grads)
    (expected,) = torch.autograd.grad([composed[i] for i in pick], x, grads)
    tolerance = 1e-13 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def test_any_layout_of_features_and_cotangent():
    # channels-last features, and a cotangent with stride 0 (what .sum().backward() sends)
    x = features().detach().to(memory_format=torch.channels_last).requires_grad_()
    coupled, _ = spn.soft_proposal(x, detach=False, backend="torch")
    assert type(coupled.grad_fn).__name__ == "_ExactStationaryBackward"
    coupled.sum().backward()
    y = features()
    stationary._composed(y, EPSILON)[0].sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-13, atol=1e-13)


def test_nan_stays_in_its_image():
    x = features().detach()
    x[0, 3, 2, 2] = float("nan")
    x.requires_grad_()
    spn.soft_proposal(x, detach=False, backend="torch")[0].sum().backward()
    assert x.grad[0].isnan().any() and x.grad[1:].isfinite().all()


def test_double_backward_and_batched_gradients():
    x = features(shape=(2, 20, 4, 4), constant=False)  # M jumps where an image stops being constant

    def both(u):
        return spn.soft_proposal(u, detach=False, backend="torch")

    assert grad_fn_name(x) == "_ExactStationaryBackward"
    assert torch.autograd.gradcheck(both, (x,))
    assert torch.autograd.gradgradcheck(both, (x,))  # create_graph: the composed form, differentiated
    coupled, _ = both(x)
    many = torch.randn(3, *coupled.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(4))
    (batched,) = torch.autograd.grad(coupled, x, many, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        (one,) = torch.autograd.grad(coupled, x, many[i], retain_graph=True)
        torch.testing.assert_close(batched[i], one, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("exponent", [0, 40, -40])
def test_kept_gradient_accumulates_and_scales_in_every_range(monkeypatch, dtype, exponent):
    # graph._degrees_backward_kept(out=...) adds the gradient to `out`; the factor that undoes the
    # unit-scaled gradient multiplies v before the GEMM inside _FACTOR_RANGE, the product outside.
    # A near pair (the rows recomputed in float64) takes the same factor.
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 40, 5, 6, dtype=dtype, generator=generator)
    x[:, :, 0, 1] = x[:, :, 0, 0] + 1e-4 * torch.randn(2, 40, dtype=dtype, generator=generator)
    grad_deg = torch.randn(2, 30, dtype=torch.float64, generator=generator) * 2.0**exponent
    _, kept = torch.ops.spn.degrees_keeping(x, EPSILON)
    assert kept[:, -len(range(0, 30, graph._kept_layout(30, 6)[0])) - 1 : -1].any()  # a strip is recomputed
    exact = torch.from_numpy(
        __import__("numpy").stack([_reference_degrees_vjp(x[b], grad_deg[b]) for b in range(2)])
    ).to(dtype)
    start = torch.randn(x.shape, dtype=dtype, generator=generator) * exact.abs().max()  # of the gradient's size
    for factor_range in (graph._FACTOR_RANGE[dtype], (2.0**200, 2.0**201)):
        monkeypatch.setitem(graph._FACTOR_RANGE, dtype, factor_range)
        fresh = graph._degrees_backward_kept(grad_deg, x, EPSILON, kept)
        into = start.clone()
        returned = graph._degrees_backward_kept(grad_deg, x, EPSILON, kept, out=into)
        assert returned is into
        tolerance = (1e-12 if dtype == torch.float64 else 1e-4) * exact.abs().max().item()
        torch.testing.assert_close(fresh, exact, rtol=0, atol=tolerance)
        torch.testing.assert_close(into - start, exact, rtol=0, atol=2 * tolerance)


def _reference_degrees_vjp(features: torch.Tensor, grad_deg: torch.Tensor):
    """sum_b (g_a + g_b) L_ab (u_a - u_b) / d_ab by direct differences in float64 (NumPy), 0 at d = 0."""
    import numpy as np

    from spn import reference as R

    u = features.detach().double().numpy().reshape(features.shape[0], -1).T  # (n, K)
    height, width = features.shape[1:]
    kernel = R.spatial_kernel(height, width, EPSILON)
    differences = u[:, None, :] - u[None, :, :]
    distances = np.sqrt((differences**2).sum(-1))
    g = grad_deg.numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        coefficients = np.where(distances > 0, (g[:, None] + g[None, :]) * kernel / distances, 0.0)
    return (coefficients[:, :, None] * differences).sum(1).T.reshape(features.shape)
