"""The radial last layer fused with the kernel contraction, computed block by block and edge chunk by edge chunk.

For one radial MLP with hidden features ``h [E, H]`` and last-layer weight ``W [P, H]`` the kernel weights of
every edge are ``R[e] = W @ h[e]`` (``P`` = 45,056 per edge and hidden layer of the QM9 model). Materialising
``R`` for all edges costs more time than the arithmetic on CPU (first-touch page faults of a huge fresh tensor)
and is the largest activation kept for backward. Here, for each output-degree block ``j`` (rows ``W_j``) and
each chunk of edges ``c``, ``R_jc`` exists only in a reused buffer small enough to stay in cache:

    forward:  R_jc = h_c @ W_j^T;  out_j[c] = tmp_j[c] @ R_jc^T                               (nothing of R saved)
    backward: R_jc again;  grad_tmp_j[c] = g_j[c] @ R_jc;  gR_jc = g_j[c]^T @ tmp_j[c];
              grad_W_j += gR_jc^T @ h_c;  grad_h_c += gR_jc @ W_j

The reference path (:class:`se3t.nn.conv.ConvSE3` at ``FuseLevel.PARTIAL``/``NONE``) computes the same
function with plain autograd; tests compare the two in forward and backward.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["fused_radial_contraction", "DEFAULT_CHUNK", "CHUNK_VALUES"]

#: Most edges per chunk.
DEFAULT_CHUNK = 64
#: Budget of kernel-weight values per chunk buffer (256 Ki values = 1 MiB in fp32): keeps R_jc in L2-sized cache.
CHUNK_VALUES = 1 << 18

Spec = Tuple[int, int, int]  # (first row of the block in W, C_out, K_in)


def _chunk_edges(chunk: int, width: int) -> int:
    return max(1, min(chunk, CHUNK_VALUES // max(width, 1)))


class _FusedRadialContraction(torch.autograd.Function):
    # Layout: tmps and outputs are "component-major", tmp_j [E, K_j, K_in_j] and out_j [E, K_j, C_out_j], so each
    # per-edge product is (small K) x (long K_in) @ (K_in x C_out): the orientation in which batched GEMMs with a
    # tiny K run several times faster on CPU than [C_out, K_in] @ [K_in, K] (measured: 4-7x for K = 1..7).
    @staticmethod
    def forward(ctx, chunk: int, specs: Tuple[Spec, ...], h: Tensor, W: Tensor, *tmps: Tensor):
        E = h.shape[0]
        outs = []
        for (off, c_out, k_in), t in zip(specs, tmps):
            out = h.new_empty(E, t.shape[1], c_out)
            Wj_t = W[off:off + c_out * k_in].t()
            n_max = _chunk_edges(chunk, c_out * k_in)
            buf = h.new_empty(min(n_max, E), c_out * k_in)
            for s in range(0, E, n_max):
                n = min(n_max, E - s)
                R = torch.mm(h[s:s + n], Wj_t, out=buf[:n]).view(n, c_out, k_in)
                torch.bmm(t[s:s + n], R.transpose(1, 2), out=out[s:s + n])
            outs.append(out)
        ctx.chunk, ctx.specs = chunk, specs
        ctx.save_for_backward(h, W, *tmps)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs: Tensor):
        h, W, *tmps = ctx.saved_tensors
        chunk, specs = ctx.chunk, ctx.specs
        E = h.shape[0]
        need_h, need_W = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        need_t = ctx.needs_input_grad[4:]
        # Accumulate in at least float32 (many chunks; bf16 partial sums would lose bits).
        acc_dtype = torch.promote_types(W.dtype, torch.float32)
        grad_h = torch.zeros(h.shape, dtype=acc_dtype, device=h.device) if need_h else None
        grad_W = torch.zeros(W.shape, dtype=acc_dtype, device=W.device) if need_W else None
        grad_t = [torch.zeros_like(t) if need else None for t, need in zip(tmps, need_t)]
        for j, ((off, c_out, k_in), t, g_all) in enumerate(zip(specs, tmps, grad_outs)):
            if g_all is None:
                continue
            g_all = g_all.contiguous()
            K = t.shape[1]
            Wj = W[off:off + c_out * k_in]
            n_max = _chunk_edges(chunk, c_out * k_in)
            rbuf = h.new_empty(min(n_max, E), c_out, k_in) if grad_t[j] is not None else None
            gbuf = h.new_empty(min(n_max, E), c_out, k_in) if (need_h or need_W) else None
            for s in range(0, E, n_max):
                n = min(n_max, E - s)
                hc, g = h[s:s + n], g_all[s:s + n]                      # g: [n, K, C_out]
                if grad_t[j] is not None:
                    R = torch.mm(hc, Wj.t(), out=rbuf[:n].view(n, -1)).view(n, c_out, k_in)
                    torch.bmm(g, R, out=grad_t[j][s:s + n])               # [n, K, K_in]
                if gbuf is None:
                    continue
                if K == 1:  # an outer product: a broadcast multiply beats a GEMM with inner dimension 1
                    gR = torch.mul(g.transpose(1, 2), t[s:s + n], out=gbuf[:n])
                else:
                    gR = torch.bmm(g.transpose(1, 2), t[s:s + n], out=gbuf[:n])  # [n, C_out, K_in]
                gR = gR.view(n, c_out * k_in)
                if need_W:
                    grad_W[off:off + c_out * k_in] += torch.mm(gR.t(), hc)
                if need_h:
                    grad_h[s:s + n] += torch.mm(gR, Wj)
        grad_h = grad_h.to(h.dtype) if grad_h is not None else None
        grad_W = grad_W.to(W.dtype) if grad_W is not None else None
        return (None, None, grad_h, grad_W, *grad_t)


@torch.compiler.disable  # a hand-scheduled kernel: compiling would unroll its chunk loops (one graph break instead)
def fused_radial_contraction(h: Tensor, W: Tensor, specs: Sequence[Spec], tmps: Sequence[Tensor],
                             chunk: int = DEFAULT_CHUNK) -> List[Tensor]:
    """``out_j[e] = tmp_j[e] @ (W_j @ h[e]).view(C_out, K_in).T`` for every block ``j = (row, C_out, K_in)``.

    Shapes (component-major): ``h [E, H]``, ``W [P, H]``, ``tmps[j] [E, K_j, K_in_j]`` -> ``out_j [E, K_j, C_out_j]``.
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
