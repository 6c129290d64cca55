"""The exact stationary Soft Proposal with its exact gradient as one autograd node (torch path).

Composed, V = couple(U, M) with M = deg / sum(deg) and deg = graph.degrees(U) is three nodes, and
autograd adds the two gradients that reach U: dV * M from the coupling, and the degrees' term
through M. Here one node computes both: the degrees' GEMM accumulates into dV * M, which saves a
gradient-sized tensor and a pass over it (forward + backward took 0.90x to 0.96x the composed
form's time, interleaved at (64, 512, 14, 14) and (16, 512, 28, 28) on 2 CPU cores, mostly the
fresh pages of that tensor; 30 MiB less peak memory at 28 x 28).

Used by the torch backend for iterations=None, detach=False in eager reverse mode when the
forward keeps its distances (graph.keeps_distances); everywhere else (torch.compile,
torch.export, torch.jit.trace, torch.func, forward-mode AD, large maps) the composed form runs.
Double backward and batched gradients (is_grads_batched) go through the composed form's
operators, from inside this node's backward.
"""

from __future__ import annotations

import torch

from . import graph, walk
from .coupling import _channel_dot, _eager_reverse_mode

__all__: list[str] = []


def applies(features: torch.Tensor) -> bool:
    """Whether `exact_stationary` serves these features (see the module's docstring)."""
    return (
        torch.is_grad_enabled()
        and features.requires_grad
        and _eager_reverse_mode()
        and torch._C._len_torch_dispatch_stack() == 0
        and graph.keeps_distances(features.shape)
    )


class _ExactStationary(torch.autograd.Function):
    @staticmethod
    def forward(features, epsilon):
        batch, _, height, width = features.shape
        deg, kept = torch.ops.spn.degrees_keeping(features, epsilon)
        state = walk.stationary_state(deg)
        proposal = state.to(features.dtype).reshape(batch, height, width)
        return features * proposal.unsqueeze(1), proposal, deg, kept

    @staticmethod
    def setup_context(ctx, inputs, output):
        features, epsilon = inputs
        _, proposal, deg, kept = output
        ctx.mark_non_differentiable(deg, kept)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(features, proposal, deg, kept)
        ctx.epsilon = epsilon

    @staticmethod
    def backward(ctx, grad_coupled, grad_proposal, _grad_deg, _grad_kept):
        features, proposal, deg, kept = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the composed form (its forward run again), differentiable
            pairs = [
                (output, grad)
                for output, grad in zip(_composed(features, ctx.epsilon), (grad_coupled, grad_proposal), strict=True)
                if grad is not None
            ]
            if not pairs:
                return None, None
            outputs, grads = zip(*pairs, strict=True)
            return torch.autograd.grad(outputs, features, grads, create_graph=True)[0], None
        # dL/dM: from M itself and, through V = U M, sum over channels of dV U
        grad_state = None
        if grad_proposal is not None:
            grad_state = grad_proposal.to(deg.dtype).reshape(deg.shape)
        if grad_coupled is not None:
            through = _channel_dot(grad_coupled, features).to(deg.dtype).reshape(deg.shape)
            grad_state = through if grad_state is None else grad_state + through
        if grad_state is None:
            return None, None
        grad_deg = _stationary_state_backward(grad_state, deg)
        if _batched(grad_state):  # is_grads_batched: the operators' batching rules
            term = torch.ops.spn.degrees_backward_kept(grad_deg, features, kept, ctx.epsilon)
            return term if grad_coupled is None else grad_coupled * proposal.unsqueeze(1) + term, None
        # contiguous (the degrees' GEMM writes into it as (B, K, n)), whatever dV's layout
        grad = torch.empty(features.shape, dtype=features.dtype, device=features.device)
        if grad_coupled is None:
            grad.zero_()
        else:
            torch.mul(grad_coupled, proposal.unsqueeze(1), out=grad)
        return graph._degrees_backward_kept(grad_deg, features, ctx.epsilon, kept, out=grad), None


def _batched(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is batched by vmap (torch.func's, or the one of is_grads_batched)."""
    functorch = torch._C._functorch
    return functorch.is_legacy_batchedtensor(tensor) or functorch.is_batchedtensor(tensor)


def _stationary_state_backward(grad_state: torch.Tensor, deg: torch.Tensor) -> torch.Tensor:
    """The gradient of M = deg / sum(deg) with respect to deg: (dM - sum_b dM_b M_b) / sum(deg),
    0 for an image whose degrees are all 0 (its M is the constant uniform map)."""
    total = deg.sum(-1, keepdim=True)
    safe = torch.where(total == 0, torch.ones_like(total), total)
    state = deg / safe
    grad = (grad_state - (grad_state * state).sum(-1, keepdim=True)) / safe
    return torch.where(total == 0, torch.zeros_like(grad), grad)


def _composed(features: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same V and M as three autograd nodes (degrees, stationary state, product)."""
    batch, _, height, width = features.shape
    proposal = walk.stationary_state(graph.degrees(features, epsilon)).to(features.dtype)
    proposal = proposal.reshape(batch, height, width)
    return features * proposal.unsqueeze(1), proposal


def exact_stationary(features: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, M) of the exact stationary state with the exact gradient, as one autograd node; call
    only where `applies(features)`. Arguments as for spn.soft_proposal's torch backend."""
    coupled, proposal, _, _ = _ExactStationary.apply(features, float(epsilon))
    return coupled, proposal
