"""The torch path under the ways people run models: export, inference mode, compile, tracing,
torch.func, forward-mode AD and higher-order gradients (issue 9, "Safe under the ways people run models")."""

import io
import warnings

import numpy as np
import pytest
import torch

import spn
from spn import graph, walk
from spn import reference as R
from strategies import distances_kept


class ProposalOnly(torch.nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.sp = spn.SoftProposal(**options)

    def forward(self, x):
        coupled, proposal = self.sp(x, return_proposal=True)
        return coupled, proposal


def reference_maps(features, **options):
    return np.stack([R.proposal_map(u, **options) for u in features.double().numpy()])


def features_of(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- nothing traced is kept


def test_export_first_then_eager_gives_the_right_maps():
    # A shape first seen under torch.export is computed on fake tensors; nothing of that may
    # survive into later eager calls (the old kernel cache kept a FakeTensor: error 0.95).
    x = features_of(2, 3, 7, 9, seed=1)
    torch.export.export(ProposalOnly(), (x,))
    for _ in range(3):
        _, proposal = spn.soft_proposal(x)
        np.testing.assert_allclose(proposal.numpy(), reference_maps(x), rtol=1e-10, atol=1e-13)
    torch.export.export(ProposalOnly(), (x,))  # a later export still works


def test_inference_mode_first_then_exact_gradient_training():
    # A validation pass before training: nothing made under inference_mode may be reused.
    x = features_of(2, 3, 6, 11, seed=2)
    with torch.inference_mode():
        spn.soft_proposal(x, detach=False)
        spn.soft_proposal(x, iterations=3, detach=False)
    for iterations in (None, 3):
        y = x.clone().requires_grad_()
        coupled, _ = spn.soft_proposal(y, iterations=iterations, detach=False)
        coupled.sum().backward()
        expected = R.soft_proposal_vjp(x[0].numpy(), np.ones(x.shape[1:]), iterations=iterations, detach=False)
        np.testing.assert_allclose(y.grad[0].numpy(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("options", [{}, {"detach": False}, dict(spn.RELEASED), {"iterations": 3, "detach": False}])
def test_meta_tensors_give_shapes_without_reading_data(options):
    # Shape inference on device="meta" (a model built under torch.device("meta")): no autocast
    # query for a device that has none, no convergence check of values that do not exist.
    x = torch.empty(2, 8, 5, 7, device="meta", requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConvergenceWarning either: nothing was computed
        coupled, proposal = spn.SoftProposal(**options)(x, return_proposal=True)
    assert coupled.device.type == proposal.device.type == "meta"
    assert coupled.shape == x.shape and proposal.shape == (2, 5, 7)
    coupled.sum().backward()
    assert x.grad.device.type == "meta" and x.grad.shape == x.shape


# ---------------------------------------------------------------- export, compile, trace


@pytest.mark.parametrize("options", [{}, dict(spn.RELEASED), {"detach": False}])
def test_export_save_load_round_trip(options):
    x = features_of(2, 4, 5, 6, seed=3, dtype=torch.float32)
    model = ProposalOnly(**options)
    program = torch.export.export(model, (x,))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    other = features_of(2, 4, 5, 6, seed=4, dtype=torch.float32)
    for got, expected in zip(loaded(other), model(other), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)


def test_export_keeps_no_distances_for_a_backward_it_does_not_have():
    # features that require grad (a conv's output) at a size where training keeps the distances
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1), spn.SoftProposal(detach=False))
    x = features_of(2, 3, 3, 3, seed=20, dtype=torch.float32)
    assert graph.keeps_distances((2, 16, 3, 3))
    targets = {str(node.target) for node in torch.export.export(model, (x,)).graph.nodes}
    assert "spn.degrees.default" in targets and "spn.degrees_keeping.default" not in targets, targets


def test_export_under_autocast_round_trip():
    x = features_of(2, 4, 5, 6, seed=5, dtype=torch.float32)
    model = ProposalOnly()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        program = torch.export.export(model, (x,))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.export.load(buffer).module()(x)[1], model(x)[1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("iterations", [None, 20])
def test_released_preset_under_export_and_fullgraph_compile(iterations):
    # tolerance > 0: no data-dependent host check (the ConvergenceWarning test, the early stop) while tracing.
    options = dict(spn.RELEASED, iterations=iterations) if iterations else {}
    x = features_of(3, 4, 5, 5, seed=6, dtype=torch.float32)
    model = ProposalOnly(**options)
    eager = model(x)
    exported = torch.export.export(model, (x,)).module()(x)
    compiled = torch.compile(model, fullgraph=True)(x)
    for got in (exported, compiled):
        for a, b in zip(got, eager, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("detach", [True, False])
def test_training_under_fullgraph_compile_and_strict_export(detach):
    # features that need a gradient (a conv's output): the whole step compiles without a graph
    # break, and a model with parameters exports strictly (spn.couple's eager-only Function
    # does not reach Dynamo)
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 1), torch.nn.ReLU(), spn.SoftProposal(detach=detach))
    x = features_of(2, 3, 5, 5, seed=22, dtype=torch.float32)
    eager_out = model(x)
    eager_out.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled_out = torch.compile(model, fullgraph=True)(x)
    compiled_out.sum().backward()
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-7)
    for got, expected in zip((p.grad for p in model.parameters()), eager_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    exported = torch.export.export(model, (x,), strict=True).module()
    torch.testing.assert_close(exported(x), eager_out, rtol=1e-5, atol=1e-7)


def test_compile_emits_no_cache_warning():
    torch._dynamo.reset()
    x = features_of(2, 3, 6, 6, seed=7, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(ProposalOnly(), fullgraph=True)(x)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "lru_cache" in m or "spn" in m], messages


def test_jit_trace_refuses_another_size_and_is_right_at_its_own():
    model = ProposalOnly().eval()
    x = features_of(1, 3, 4, 5, seed=8, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (x,))
    same = features_of(2, 3, 4, 5, seed=9, dtype=torch.float32)
    torch.testing.assert_close(traced(same)[1], model(same)[1])
    with pytest.raises(Exception, match=r"traced by torch\.jit\.trace at another H x W"):
        traced(features_of(1, 3, 6, 6, seed=10, dtype=torch.float32))


@pytest.mark.parametrize("op, args", [("degrees", (2.0,)), ("degrees_keeping", (2.0,)), ("distances", ())])
def test_custom_operators_pass_opcheck(op, args):
    features = features_of(2, 3, 4, 5, seed=11).requires_grad_()
    torch.library.opcheck(getattr(torch.ops.spn, op).default, (features, *args))


# ---------------------------------------------------------------- higher-order gradients


@pytest.mark.parametrize("iterations", [None, 3])
def test_double_backward_of_the_exact_gradient(iterations):
    x = features_of(2, 3, 3, 3, seed=12).requires_grad_()

    def both(t):
        return spn.soft_proposal(t, iterations=iterations, detach=False)

    assert torch.autograd.gradgradcheck(both, (x,))


def test_double_backward_of_the_paper_gradient():
    # detach=True holds M constant (Eq. 6), so the backward is by design not the derivative of
    # the forward; V / M(U), with M held, is the identity, and its second derivative is 0.
    x = features_of(1, 2, 3, 4, seed=13).requires_grad_()

    def held(t):
        coupled, proposal = spn.soft_proposal(t)
        return (coupled / proposal.unsqueeze(1)).square()

    assert torch.autograd.gradgradcheck(held, (x,))


# ---------------------------------------------------------------- torch.func and forward-mode AD


def autograd_jacobian(function, x):
    return torch.autograd.functional.jacobian(function, x)


@pytest.mark.parametrize("iterations", [None, 3])
def test_vmap_equals_a_loop(iterations):
    stacked = features_of(3, 2, 3, 4, 5, seed=14)
    mapped = torch.func.vmap(lambda t: spn.soft_proposal(t, iterations=iterations)[1])(stacked)
    looped = torch.stack([spn.soft_proposal(t, iterations=iterations)[1] for t in stacked])
    torch.testing.assert_close(mapped, looped, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("iterations, keep", [(None, True), (None, False), (3, False)])
def test_vmap_then_backward_equals_a_loop(iterations, keep, monkeypatch):
    # reverse mode through the operators' vmap rules (the kept distances fold into the batch too)
    stacked = features_of(3, 2, 3, 4, 5, seed=16)
    g = features_of(3, 2, 4, 5, seed=17)
    x = stacked.clone().requires_grad_()
    y = stacked.clone().requires_grad_()
    kept_calls = []
    original = graph._degrees_keeping_op
    monkeypatch.setattr(graph, "_degrees_keeping_op", lambda *args: kept_calls.append(1) or original(*args))
    with distances_kept(keep):
        mapped = torch.func.vmap(lambda t: spn.soft_proposal(t, iterations=iterations, detach=False)[1])(x)
        assert bool(kept_calls) == (keep and iterations is None)  # a BatchedTensor hides requires_grad
        (mapped * g).sum().backward()
        looped = torch.stack([spn.soft_proposal(t, iterations=iterations, detach=False)[1] for t in y])
        (looped * g).sum().backward()
    torch.testing.assert_close(mapped, looped, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("iterations", [None, 3])
@pytest.mark.parametrize("detach", [True, False])
def test_func_grad_equals_autograd(iterations, detach):
    x = features_of(2, 3, 3, 4, seed=15)
    weights = features_of(2, 3, 3, 4, seed=16)

    def loss(t):
        return (spn.soft_proposal(t, iterations=iterations, detach=detach)[0] * weights).sum()

    y = x.clone().requires_grad_()
    loss(y).backward()
    torch.testing.assert_close(torch.func.grad(loss)(x), y.grad, rtol=1e-10, atol=1e-13)


def test_per_sample_gradients_with_vmap_of_grad():
    x = features_of(4, 1, 2, 3, 3, seed=17)

    def loss(t):
        return spn.soft_proposal(t, detach=False)[1].square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss))(x)
    for sample, grad in zip(x, per_sample, strict=True):
        y = sample.clone().requires_grad_()
        loss(y).backward()
        torch.testing.assert_close(grad, y.grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("transform", [torch.func.jacrev, torch.func.jacfwd])
@pytest.mark.parametrize("iterations", [None, 2])
def test_jacobians_equal_autograd(transform, iterations):
    x = features_of(1, 2, 3, 3, seed=18)

    def proposal(t):
        return spn.soft_proposal(t, iterations=iterations, detach=False)[1]

    torch.testing.assert_close(transform(proposal)(x), autograd_jacobian(proposal, x), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("iterations", [None, 2])
def test_forward_mode_ad_equals_jacobian_times_tangent(iterations):
    x = features_of(1, 2, 3, 3, seed=19)
    tangent = features_of(1, 2, 3, 3, seed=20)

    def proposal(t):
        return spn.soft_proposal(t, iterations=iterations, detach=False)[1]

    expected = torch.einsum("...ijkl,ijkl->...", autograd_jacobian(proposal, x), tangent)
    _, jvp = torch.func.jvp(proposal, (x,), (tangent,))
    torch.testing.assert_close(jvp, expected, rtol=1e-9, atol=1e-12)
    from torch.autograd import forward_ad

    with forward_ad.dual_level():
        out = proposal(forward_ad.make_dual(x, tangent))
        torch.testing.assert_close(forward_ad.unpack_dual(out).tangent, expected, rtol=1e-9, atol=1e-12)


def test_dense_path_refuses_large_inputs_with_a_clear_error(monkeypatch):
    monkeypatch.setattr(graph, "DENSE_ELEMENTS", 100)
    x = features_of(1, 2, 4, 4, seed=21)
    with pytest.raises(RuntimeError, match=r"torch.func transforms.*DENSE_ELEMENTS.*loss.backward\(\)"):
        torch.func.grad(lambda t: spn.soft_proposal(t, detach=False)[1].square().sum())(x)
    spn.soft_proposal(x.requires_grad_(), detach=False)[1].square().sum().backward()  # no dense tensor here


# ---------------------------------------------------------------- the k-step walk


def test_walk_refuses_a_transfer_matrix_over_the_budget(monkeypatch):
    monkeypatch.setattr(graph, "TRANSFER_BYTES", 16 * 16 * 4 * 2 - 1)
    with pytest.raises(RuntimeError, match=r"\(B, n, n\) = \(2, 16, 16\).*TRANSFER_BYTES.*iterations=None"):
        spn.soft_proposal(torch.rand(2, 3, 4, 4), iterations=3)
    spn.soft_proposal(torch.rand(1, 3, 4, 4), iterations=3)  # 1 KiB: within


def test_walk_stops_once_every_image_converged(monkeypatch):
    calls = []
    matmul = torch.matmul

    def counting(a, b):
        calls.append(1)
        return matmul(a, b)

    monkeypatch.setattr(walk.torch, "matmul", counting)
    x = features_of(3, 2, 4, 4, seed=22)
    _, proposal = spn.soft_proposal(x, iterations=5000, tolerance=1e-8)
    assert 0 < len(calls) < 200
    np.testing.assert_allclose(proposal.numpy(), reference_maps(x, iterations=5000, tolerance=1e-8), rtol=1e-10)


@pytest.mark.parametrize("iterations, keep", [(None, True), (None, False), (3, False)])
@pytest.mark.parametrize("scale", [1.0, 4.0, 1e3, 1e-3, 2.0**600])
def test_create_graph_gives_the_exact_first_order_gradient(iterations, keep, scale):
    # with create_graph=True the backward goes through the dense composite; its distances must be
    # in the units of the forward's (which scales features by a power of two only when needed),
    # else the gradient is off by that power of two (found by the CUDA work: error 0.045 at scale 1)
    # (2^600: the features are scaled inside; V = U M(U) is homogeneous of degree 1, so the gradient
    # is the unscaled map's, which the float64 reference can evaluate)
    u = torch.randn(1, 3, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    g = torch.randn(1, 3, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    x = (u * scale).requires_grad_()
    with distances_kept(keep):
        coupled, _ = spn.soft_proposal(x, iterations=iterations, detach=False)
        (grad,) = torch.autograd.grad(coupled, x, g, create_graph=True)
    expected = R.soft_proposal_vjp(u[0].numpy(), g[0].numpy(), iterations=iterations, detach=False)
    np.testing.assert_allclose(grad[0].detach().numpy(), expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())


def test_create_graph_uses_the_units_of_the_forward_that_kept_its_distances(monkeypatch):
    # The forward that keeps its distances groups images by its own strips; the fast path scales
    # a whole group when one of its images needs it, so the dense composite must group the same
    # way. Here the kept forward takes the two images one at a time (the second, alone, is not
    # scaled) while the default grouping would take them together (and scale the second by 2^-2).
    monkeypatch.setattr(graph, "STRIP_ELEMENTS", 24)
    monkeypatch.setattr(graph, "BLOCK_ELEMENTS", 24)
    u = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(18))
    u[1] *= 3.0 / u[1].abs().max()
    g = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(19))
    scales = torch.tensor([2.0**600, 1.0], dtype=torch.float64)[:, None, None, None]
    assert [s.stop - s.start for s in graph._batches(u, graph._kept_layout(12, 4)[0])] == [1, 1]
    assert [s.stop - s.start for s in graph._batches(u)] == [2]
    x = (u * scales).requires_grad_()
    with distances_kept(True):
        coupled, _ = spn.soft_proposal(x, detach=False)
        (grad,) = torch.autograd.grad(coupled, x, g, create_graph=True)
    for image in range(2):
        expected = R.soft_proposal_vjp(u[image].numpy(), g[image].numpy(), detach=False)
        np.testing.assert_allclose(grad[image].detach().numpy(), expected, rtol=1e-9, atol=1e-12)


def test_kept_gradient_uses_the_forwards_units_whatever_its_grouping(monkeypatch):
    # The forward scales a whole group of images when one of them needs it, and keeps, per image,
    # whether it did; the kept backward takes images in its own, smaller groups (here one at a
    # time), so it must read that, not decide again: alone, the second image (max |u| = 3) would
    # not be scaled, and its gradient would be off by the square of 2^-2.
    monkeypatch.setattr(graph, "_KEPT_GROUP_ELEMENTS", 1)
    u = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(20))
    u[1] *= 3.0 / u[1].abs().max()
    g = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(21))
    assert [s.stop - s.start for s in graph._batches(u, graph._kept_layout(12, 4)[0])] == [2]
    x = (u * torch.tensor([2.0**600, 1.0], dtype=torch.float64)[:, None, None, None]).requires_grad_()
    with distances_kept(True):
        coupled, _ = spn.soft_proposal(x, detach=False)
        (grad,) = torch.autograd.grad(coupled, x, g)
    for image in range(2):
        expected = R.soft_proposal_vjp(u[image].numpy(), g[image].numpy(), detach=False)
        np.testing.assert_allclose(grad[image].numpy(), expected, rtol=1e-9, atol=1e-12)
