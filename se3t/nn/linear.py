"""LinearSE3: per-degree channel mixing (no mixing between degrees, no bias: equivariant)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..fiber import Features, Fiber
from .._validate import check_features

__all__ = ["LinearSE3", "channel_mix"]


def _rows(x: Tensor) -> Tensor:
    """``[N, C, L] -> [N*L, C]``: the components as rows, channels as columns (a copy unless ``L = 1``)."""
    return x.transpose(1, 2).reshape(x.shape[0] * x.shape[2], x.shape[1])


def _from_rows(rows: Tensor, N: int, L: int) -> Tensor:
    """Inverse of :func:`_rows`: ``[N*L, C] -> [N, C, L]``, contiguous (explicit sizes: ``N`` may be 0)."""
    return rows.view(N, L, rows.shape[1]).transpose(1, 2).contiguous()


def _mix(W: Tensor, x: Tensor) -> Tensor:
    """``W @ x[n]`` for every ``n``: ``[C_out, C_in]``, ``[N, C_in, L]`` -> ``[N, C_out, L]``.

    On CPU one GEMM over all ``N*L`` rows (``x``'s rows ``[N*L, C_in] @ W^T``) and two layout copies. ``torch.matmul``
    takes that route only when ``W`` requires grad; otherwise (inference, the backward's ``W^T @ grad``) it runs
    ``N`` small products: measured on 2-core Zen 4, N = 1,797, 2 threads, ``C = 32``, ``L = 3..7``: 1.6-2.2 ms
    against 0.3-0.5 ms; with ``L = 1`` 10-16x, so that case is one GEMM on every device. Other devices keep
    ``torch.matmul`` (the GPU kernel counts and times were measured with it)."""
    N, _, L = x.shape
    if L == 1 or x.device.type == "cpu":  # (with L = 1 both layout changes are views)
        return _from_rows(torch.mm(_rows(x), W.t()), N, L)
    return torch.matmul(W, x)


class _ChannelMix(torch.autograd.Function):
    """``W @ x`` keeping ``x`` itself for backward: ``torch.matmul`` of ``[C_out, C_in]`` and ``[N, C_in, L]`` keeps
    a transposed copy of ``x`` (for the model's node features: one extra copy per layer). The backward is
    differentiable (double backward for forces)."""

    @staticmethod
    def forward(ctx, W: Tensor, x: Tensor) -> Tensor:
        ctx.save_for_backward(W, x)
        return _mix(W, x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        W, x = ctx.saved_tensors
        dt = grad.dtype  # under autocast the forward ran in the autocast dtype; the backward does not: cast here
        N, _, L = grad.shape
        # the gradient's rows [N*L, C_out], made once for both products on CPU
        g_rows = _rows(grad) if (ctx.needs_input_grad[0] or grad.device.type == "cpu") else None
        grad_W = None
        if ctx.needs_input_grad[0]:  # sum over nodes and components: one GEMM over their [N * L] rows
            grad_W = torch.mm(g_rows.t(), _rows(x.to(dt)))
        grad_x = None
        if ctx.needs_input_grad[1]:
            if grad.device.type == "cpu":  # grad x = W^T @ grad: the rows [N*L, C_out] @ W, as in _mix
                grad_x = _from_rows(torch.mm(g_rows, W.to(dt)), N, L)
            else:
                grad_x = _mix(W.t().to(dt), grad)
        return grad_W, grad_x


def channel_mix(W: Tensor, x: Tensor) -> Tensor:
    """``out[n] = W @ x[n]``: ``W [C_out, C_in]``, ``x [N, C_in, L]`` -> ``[N, C_out, L]`` (``torch.matmul(W, x)``'s
    values; only ``W`` and ``x`` themselves are kept for backward)."""
    if W.dim() != 2 or x.dim() != 3 or W.shape[1] != x.shape[1]:
        raise ValueError(f"channel_mix needs W [C_out, C_in] and x [N, C_in, L] with the same C_in; got W of shape "
                         f"{tuple(W.shape)} and x of shape {tuple(x.shape)}")
    if not (torch.is_grad_enabled() and (W.requires_grad or x.requires_grad)):
        return _mix(W, x)  # nothing kept: no autograd.Function (nor one for dynamo to trace)
    return _ChannelMix.apply(W, x)


class LinearSE3(nn.Module):
    """``out[d] = W_d @ x[d]`` with ``W_d [C_out_d, C_in_d]``, initialised ``randn / sqrt(C_in_d)``.

    Shapes: ``x[d]: [N, C_in_d, 2d+1] -> out[d]: [N, C_out_d, 2d+1]`` for each degree of ``fiber_out``
    (which must be a subset of the degrees of ``fiber_in``).
    """

    def __init__(self, fiber_in: Fiber, fiber_out: Fiber):
        super().__init__()
        missing = [d for d in fiber_out.degrees if d not in fiber_in]
        if missing:
            raise ValueError(f"LinearSE3 cannot create degrees {missing}: fiber_out {fiber_out} needs every degree "
                             f"in fiber_in {fiber_in}")
        self.fiber_in, self.fiber_out = fiber_in, fiber_out
        self.weights = nn.ParameterDict({
            str(d): nn.Parameter(torch.randn(c_out, fiber_in[d]) / math.sqrt(fiber_in[d]))
            for d, c_out in fiber_out
        })

    def forward(self, features: Features) -> Features:
        check_features(features, self.fiber_in.restrict(self.fiber_out.degrees), None, "features")
        return {d: channel_mix(self.weights[str(d)], features[d]) for d in self.fiber_out.degrees}

    def extra_repr(self) -> str:
        return f"fiber_in={self.fiber_in}, fiber_out={self.fiber_out}"
