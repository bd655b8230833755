"""The radial last layer fused with the kernel contraction, computed edge chunk by edge chunk.

For one radial MLP with hidden features ``h [E, H]`` and last-layer weight ``W [P, H]`` the kernel weights of
every edge are ``R[e] = W @ h[e]`` (``P`` = 45,056 per edge and hidden layer of the QM9 model). Materialising
``R`` for all edges costs more time than the arithmetic on CPU (first-touch page faults of a huge fresh tensor)
and is the largest activation kept for backward. Here ``R`` only ever exists for ``chunk`` edges at a time,
in a reused buffer that stays in cache:

    forward:  R_c = h_c @ W^T;  out_j[c] = R_c[:, block j] @ tmp_j[c]                       (nothing of R saved)
    backward: R_c again;        grad_tmp_j[c] = R_c[block j]^T @ g_j[c];
              gR_c[block j] = g_j[c] @ tmp_j[c]^T;  grad_W += gR_c^T @ h_c;  grad_h_c = gR_c @ W

The reference path (:class:`se3t.nn.conv.ConvSE3` at ``FuseLevel.PARTIAL``/``NONE``) computes the same
function with plain autograd; tests compare the two in forward and backward.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["fused_radial_contraction", "DEFAULT_CHUNK"]

#: Edges per chunk: R_c is chunk x P values (64 x 45,056 x 4 B = 11.5 MB for the QM9 model in fp32).
DEFAULT_CHUNK = 64

Spec = Tuple[int, int, int]  # (first column of the block in R, C_out, K_in)


class _FusedRadialContraction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chunk: int, specs: Tuple[Spec, ...], h: Tensor, W: Tensor, *tmps: Tensor):
        E, P = h.shape[0], W.shape[0]
        outs = [h.new_empty(E, c_out, t.shape[-1]) for (_, c_out, _), t in zip(specs, tmps)]
        Wt = W.t()
        buf = h.new_empty(min(chunk, E), P)
        for s in range(0, E, chunk):
            n = min(chunk, E - s)
            R = torch.mm(h[s:s + n], Wt, out=buf[:n])
            for (off, c_out, k_in), t, o in zip(specs, tmps, outs):
                torch.bmm(R[:, off:off + c_out * k_in].view(n, c_out, k_in), t[s:s + n], out=o[s:s + n])
        ctx.chunk, ctx.specs = chunk, specs
        ctx.save_for_backward(h, W, *tmps)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs: Tensor):
        h, W, *tmps = ctx.saved_tensors
        chunk, specs = ctx.chunk, ctx.specs
        E, P = h.shape[0], W.shape[0]
        need_h, need_W = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        need_t = ctx.needs_input_grad[4:]
        grad_h = torch.empty_like(h) if need_h else None
        # Accumulate the weight gradient in at least float32 (many chunks; bf16 sums would lose bits).
        acc_dtype = torch.promote_types(W.dtype, torch.float32)
        grad_W = torch.zeros(W.shape, dtype=acc_dtype, device=W.device) if need_W else None
        grad_t = [torch.empty_like(t) if need else None for t, need in zip(tmps, need_t)]
        Wt = W.t()
        buf = h.new_empty(min(chunk, E), P)
        gbuf = h.new_empty(min(chunk, E), P)
        grads = [g if g is not None else None for g in grad_outs]
        for s in range(0, E, chunk):
            n = min(chunk, E - s)
            R = torch.mm(h[s:s + n], Wt, out=buf[:n]) if any(need_t) else None
            gR = gbuf[:n]
            for j, ((off, c_out, k_in), t) in enumerate(zip(specs, tmps)):
                g = grads[j]
                if g is None:
                    gR[:, off:off + c_out * k_in].zero_()
                    continue
                g = g[s:s + n]
                if grad_t[j] is not None:
                    torch.bmm(R[:, off:off + c_out * k_in].view(n, c_out, k_in).transpose(1, 2), g,
                              out=grad_t[j][s:s + n])
                if need_h or need_W:
                    gR[:, off:off + c_out * k_in].view(n, c_out, k_in).copy_(
                        torch.bmm(g, t[s:s + n].transpose(1, 2)))
            if need_W:
                if grad_W.dtype == gR.dtype:
                    grad_W.addmm_(gR.t(), h[s:s + n])
                else:
                    grad_W += torch.mm(gR.t(), h[s:s + n]).to(acc_dtype)
            if need_h:
                torch.mm(gR, W, out=grad_h[s:s + n])
        if grad_W is not None:
            grad_W = grad_W.to(W.dtype)
        return (None, None, grad_h, grad_W, *grad_t)


def fused_radial_contraction(h: Tensor, W: Tensor, specs: Sequence[Spec], tmps: Sequence[Tensor],
                             chunk: int = DEFAULT_CHUNK) -> List[Tensor]:
    """``out_j[e] = (W @ h[e])[block j].view(C_out, K_in) @ tmp_j[e]`` for every block ``j``, chunked over edges.

    Shapes: ``h [E, H]``, ``W [P, H]``, ``tmps[j] [E, K_in_j, K_j]`` -> ``out_j [E, C_out_j, K_j]``.
    Under autocast the whole computation runs in the autocast dtype (explicitly: the chunked kernels write
    into preallocated buffers, which autocast does not handle).
    """
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(h.dtype, W.dtype)
        for t in tmps:
            dtype = torch.promote_types(dtype, t.dtype)
    with torch.autocast(device_type, enabled=False):
        args = [h.to(dtype).contiguous(), W.to(dtype)] + [t.to(dtype).contiguous() for t in tmps]
        return list(_FusedRadialContraction.apply(max(1, int(chunk)), tuple(specs), *args))
