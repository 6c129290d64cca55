"""spn.couple: V = U * M, and its derivatives in every mode (its backward sums over channels in chunks)."""

import pytest
import torch

import spn
from spn import coupling


def inputs(batch=2, channels=5, height=3, width=4, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, channels, height, width, dtype=dtype, generator=generator)
    m = torch.rand(batch, height, width, dtype=dtype, generator=generator)
    return u.requires_grad_(), m.requires_grad_()


@pytest.mark.parametrize("chunk", [1 << 20, 24, 30])  # one chunk; one channel at a time; 2 of 5 at a time
def test_gradients_are_those_of_the_plain_product(monkeypatch, chunk):
    monkeypatch.setattr(coupling, "_CHUNK_ELEMENTS", chunk)  # B H W = 24 elements per channel
    u, m = inputs()
    g = torch.randn(u.shape, dtype=u.dtype, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(spn.couple(u, m), (u, m), g)
    expected = torch.autograd.grad(u * m.unsqueeze(1), (u, m), g)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    # and on its own: sum_k g_k u_k, computed here channel by channel
    manual = sum(g[:, k] * u[:, k] for k in range(u.shape[1]))
    torch.testing.assert_close(got[1], manual.detach(), rtol=1e-14, atol=1e-14)
    # many cotangents at once (is_grads_batched, as torch.autograd.functional.jacobian vectorizes)
    many = torch.randn(3, *u.shape, dtype=u.dtype, generator=torch.Generator().manual_seed(2))
    batched = torch.autograd.grad(spn.couple(u, m), (u, m), many, is_grads_batched=True)
    for i in range(3):
        one = torch.autograd.grad(u * m.unsqueeze(1), (u, m), many[i])
        for a, b in zip(batched, one, strict=True):
            torch.testing.assert_close(a[i], b, rtol=1e-14, atol=1e-14)


def test_every_mode_of_differentiation():
    # reverse and forward mode, second order, and vmap over the batch of gradients (batched grad)
    u, m = inputs()
    assert torch.autograd.gradcheck(spn.couple, (u, m), check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(spn.couple, (u, m), check_fwd_over_rev=True)
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        got = transform(spn.couple, argnums=(0, 1))(u[:1].detach(), m[:1].detach())
        expected = transform(lambda a, b: a * b.unsqueeze(1), argnums=(0, 1))(u[:1].detach(), m[:1].detach())
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b)
    per_example = torch.func.vmap(spn.couple)(u.detach()[:, None], m.detach()[:, None])
    torch.testing.assert_close(per_example[:, 0], (u * m.unsqueeze(1)).detach())


def test_only_what_is_needed_and_no_channels():
    u, m = inputs()
    (grad,) = torch.autograd.grad(spn.couple(u, m.detach()), u, torch.ones_like(u))
    torch.testing.assert_close(grad, m.detach().unsqueeze(1).expand_as(u))
    empty_u, empty_m = inputs(channels=0)
    (grad_m,) = torch.autograd.grad(spn.couple(empty_u, empty_m).sum(), empty_m)
    assert torch.equal(grad_m, torch.zeros_like(empty_m))


def test_low_precision_sums_in_float32(monkeypatch):
    # bfloat16 U: the chunks' partial sums are accumulated in float32, as one sum over K would be
    monkeypatch.setattr(coupling, "_CHUNK_ELEMENTS", 24)  # one channel at a time
    u, m = inputs(channels=256, dtype=torch.float64, seed=2)
    u16, m16 = u.detach().bfloat16().requires_grad_(), m.detach().bfloat16().requires_grad_()
    g = torch.ones_like(u16)
    (got,) = torch.autograd.grad(spn.couple(u16, m16), m16, g)
    assert got.dtype == torch.bfloat16
    exact = u16.detach().double().sum(1)  # the bfloat16 inputs, summed exactly
    (plain,) = torch.autograd.grad(u16 * m16.unsqueeze(1), m16, g)
    error, plain_error = ((x.double() - exact).abs().max() for x in (got, plain))
    assert error <= 2 * plain_error + 1e-2, (error, plain_error)


def test_the_chunked_backward_runs_in_eager_reverse_mode_only(monkeypatch):
    # Only there does it pay (and only there can it go: Dynamo cannot trace every
    # autograd.Function); with M held constant the plain product saves M alone, not U.
    u, m = inputs()
    assert type(spn.couple(u, m).grad_fn).__name__ == "_CoupleBackward"
    held = spn.couple(u, m.detach())
    assert type(held.grad_fn).__name__ == "MulBackward0"
    with torch.no_grad():
        assert spn.couple(u, m).grad_fn is None
    calls = []
    original = coupling._Couple.apply
    monkeypatch.setattr(coupling._Couple, "apply", lambda *args: calls.append(1) or original(*args))
    spn.couple(u, m)
    assert calls == [1]  # the patch is seen
    torch.compile(spn.couple, fullgraph=True, backend="eager")(u, m).sum().backward()
    torch.func.jacrev(spn.couple, argnums=1)(u[:1].detach(), m[:1].detach())
    with torch.autograd.forward_ad.dual_level():
        spn.couple(u, torch.autograd.forward_ad.make_dual(m, torch.ones_like(m)))
    assert calls == [1]
