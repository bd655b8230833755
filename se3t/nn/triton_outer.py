"""Triton kernels for one block of the fused TFN kernel in the outer order, on CUDA (optional: needs ``triton``).

A block computes, per edge ``e`` and output row ``k`` (rows ``r = e * K + k``),

    out[r, o] = sum_{h, i} h[e, h] * t[r, i] * W[h, i, o]        (W = the block's weights as [H, K_in, C_out])

which is the ``R`` order's ``t @ (h @ W_j^T)^T`` with the sums swapped. The PyTorch paths materialise a per-edge
tensor on the way (``R = h @ W_j^T``, ``[E, C_out * K_in]``, or ``h ⊗ t``, ``[E, H * K_in]``): on a GPU the
block is then bound by writing and re-reading it (memory-bound, in small batched GEMMs). These kernels form
``h[e, h] * t[r, i]`` on chip, tile by tile, as the A operand of a GEMM whose inner dimension is ``(h, i)``:
nothing per edge but ``t``, ``h``, the output and its gradient touches device memory.

    forward:   out   = (h ⊗ t) @ W                                   _outer_forward
    backward:  gW    = (h ⊗ t)^T @ g   (split over rows, summed)     _outer_grad_w
               gz    = g @ W^T, never stored:                        _outer_grad_inputs
               grad_t[r, i] = sum_h h[e, h] gz[r, (h, i)],  grad_h[r, h] = sum_i t[r, i] gz[r, (h, i)]

``K`` output rows per edge cost ``K`` times the ``R`` order's radial GEMM FLOPs (cheap on tensor cores, not in
strict fp32: the kernels run for 2-byte dtypes and TF32, see :data:`se3t.nn.fused.TRITON`). Products are
taken in float32 and rounded to the operands' dtype for the tensor-core dot (as autocast rounds ``R``);
accumulation is float32 throughout. The PyTorch paths are the reference (tests compare; on CPU with
``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

try:  # optional: CUDA builds of PyTorch ship it; CPU installs need not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

__all__ = ["available", "outer_forward", "outer_backward"]


def available() -> bool:
    """Whether ``triton`` can be imported."""
    return triton is not None


#: Output channels of one tile in the input-gradient kernel; wider blocks loop over tiles (the paper model's widest
#: block, 128 channels, is one tile: the configuration measured on the H200).
MAX_CHANNEL_TILE = 128


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << max(0, (int(n) - 1).bit_length()))


if triton is not None:
    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def _outer_forward(h_ptr, t_ptr, w_ptr, out_ptr, M, H, KIN, COUT, s_he, s_oe, s_ok,
                       K: tl.constexpr, BM: tl.constexpr, BI: tl.constexpr, BO: tl.constexpr, IEEE: tl.constexpr,
                       ACC: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = rows < M
        e = rows // K
        ocols = tl.program_id(1) * BO + tl.arange(0, BO)
        omask = ocols < COUT
        acc = tl.zeros((BM, BO), dtype=ACC)
        for i0 in range(0, KIN, BI):
            icols = i0 + tl.arange(0, BI)
            imask = icols < KIN
            t = tl.load(t_ptr + rows[:, None] * KIN + icols[None, :], mask=rmask[:, None] & imask[None, :],
                        other=0.0).to(ACC)
            for hh in range(0, H):
                hv = tl.load(h_ptr + e * s_he + hh, mask=rmask, other=0.0).to(ACC)
                w = tl.load(w_ptr + (hh * KIN + icols)[:, None] * COUT + ocols[None, :],
                            mask=imask[:, None] & omask[None, :], other=0.0)
                acc = _dot((t * hv[:, None]).to(w.dtype), w, acc, IEEE)
        k = rows % K
        tl.store(out_ptr + (e * s_oe + k * s_ok)[:, None] + ocols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & omask[None, :])

    @triton.jit
    def _outer_grad_w(h_ptr, t_ptr, g_ptr, gw_ptr, M, H, KIN, COUT, s_he, s_ge, s_gk, rows_per_split,
                      K: tl.constexpr, BM: tl.constexpr, BI: tl.constexpr, BO: tl.constexpr, IEEE: tl.constexpr,
                      ACC: tl.constexpr):
        n_i = tl.cdiv(KIN, BI)
        hh = tl.program_id(0) // n_i
        icols = (tl.program_id(0) % n_i) * BI + tl.arange(0, BI)
        imask = icols < KIN
        ocols = tl.program_id(1) * BO + tl.arange(0, BO)
        omask = ocols < COUT
        split = tl.program_id(2)
        r_lo = split * rows_per_split
        r_hi = tl.minimum(M, r_lo + rows_per_split)
        acc = tl.zeros((BI, BO), dtype=ACC)
        for r0 in range(r_lo, r_hi, BM):
            rows = r0 + tl.arange(0, BM)
            rmask = rows < r_hi
            e = rows // K
            k = rows % K
            hv = tl.load(h_ptr + e * s_he + hh, mask=rmask, other=0.0).to(ACC)
            t = tl.load(t_ptr + rows[:, None] * KIN + icols[None, :], mask=rmask[:, None] & imask[None, :],
                        other=0.0).to(ACC)
            g = tl.load(g_ptr + (e * s_ge + k * s_gk)[:, None] + ocols[None, :],
                        mask=rmask[:, None] & omask[None, :], other=0.0)
            acc = _dot(tl.trans((t * hv[:, None]).to(g.dtype)), g, acc, IEEE)
        tl.store(gw_ptr + split * H * KIN * COUT + (hh * KIN + icols)[:, None] * COUT + ocols[None, :], acc,
                 mask=imask[:, None] & omask[None, :])

    @triton.jit
    def _outer_grad_inputs(h_ptr, t_ptr, wt_ptr, g_ptr, gt_ptr, gh_ptr, M, H, KIN, COUT, s_he, s_ge, s_gk,
                           K: tl.constexpr, BM: tl.constexpr, BI: tl.constexpr, BC: tl.constexpr,
                           BH: tl.constexpr, NEED_T: tl.constexpr, NEED_H: tl.constexpr, IEEE: tl.constexpr,
                           ACC: tl.constexpr, SINGLE_C: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = rows < M
        e = rows // K
        k = rows % K
        icols = tl.program_id(1) * BI + tl.arange(0, BI)
        imask = icols < KIN
        ccols = tl.arange(0, BC)
        g_rows = g_ptr + (e * s_ge + k * s_gk)[:, None]
        if SINGLE_C:  # all output channels in one tile: g's rows are loaded once
            cmask = ccols < COUT
            g = tl.load(g_rows + ccols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        t = tl.load(t_ptr + rows[:, None] * KIN + icols[None, :], mask=rmask[:, None] & imask[None, :],
                    other=0.0).to(ACC)
        hcols = tl.arange(0, BH)
        gt = tl.zeros((BM, BI), dtype=ACC)
        gh = tl.zeros((BM, BH), dtype=ACC)
        for hh in range(0, H):
            # W^T's tile [C_out, i] for this h: wt is [H, C_out, K_in]
            if SINGLE_C:
                w = tl.load(wt_ptr + hh * COUT * KIN + ccols[:, None] * KIN + icols[None, :],
                            mask=cmask[:, None] & imask[None, :], other=0.0)
                gz = _dot(g, w, tl.zeros((BM, BI), dtype=ACC), IEEE)
            else:  # wide blocks: output channels in tiles of BC (g's rows re-read from cache for each h)
                gz = tl.zeros((BM, BI), dtype=ACC)
                for c0 in range(0, COUT, BC):
                    cc = c0 + ccols
                    cm = cc < COUT
                    gc = tl.load(g_rows + cc[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
                    wc = tl.load(wt_ptr + hh * COUT * KIN + cc[:, None] * KIN + icols[None, :],
                                 mask=cm[:, None] & imask[None, :], other=0.0)
                    gz = _dot(gc, wc, gz, IEEE)
            if NEED_T:
                hv = tl.load(h_ptr + e * s_he + hh, mask=rmask, other=0.0).to(ACC)
                gt += gz * hv[:, None]
            if NEED_H:
                s = tl.sum(gz * t, axis=1)
                gh += tl.where(hcols[None, :] == hh, s[:, None], 0.0)
        if NEED_T:
            tl.store(gt_ptr + rows[:, None] * KIN + icols[None, :], gt.to(gt_ptr.dtype.element_ty),
                     mask=rmask[:, None] & imask[None, :])
        if NEED_H:
            tl.store(gh_ptr + tl.program_id(1) * M * H + rows[:, None] * H + hcols[None, :], gh,
                     mask=rmask[:, None] & (hcols[None, :] < H))

    # On CUDA the launches are autotuned per shape (a few configs, timed once per shape during the first, eager
    # steps; a CUDA graph captures the chosen one). The interpreter runs the first config of each list.
    def _configs(tiles, warps=(4, 8, 4)):
        return [triton.Config(dict(zip(("BM", "BI", "BO"), tile)), num_warps=nw) for tile, nw in zip(tiles, warps)]

    _FORWARD_CONFIGS = _configs([(64, 32, 64), (128, 32, 64), (64, 64, 128)])
    _GRAD_W_CONFIGS = _configs([(64,), (128,), (32,)])       # BM only: the tiles fix the partial buffers
    _GRAD_INPUTS_CONFIGS = _configs([(64,), (128,), (32,)])
    _KEY = ["M", "H", "KIN", "COUT"]
    _outer_forward_tuned = triton.autotune(_FORWARD_CONFIGS, key=_KEY)(_outer_forward)
    _outer_grad_w_tuned = triton.autotune(_GRAD_W_CONFIGS, key=_KEY)(_outer_grad_w)
    _outer_grad_inputs_tuned = triton.autotune(_GRAD_INPUTS_CONFIGS, key=_KEY)(_outer_grad_inputs)


def _launch(kernel, tuned, configs, grid, args, on_cuda: bool, **constexprs):
    """Launch the autotuned kernel on CUDA, else (interpreter) the plain one with the first config."""
    if on_cuda:
        tuned[grid](*args, **constexprs)
        return
    cfg = configs[0]
    meta = dict(constexprs, **cfg.kwargs)
    kernel[grid(meta)](*args, **meta, num_warps=cfg.num_warps)


def _check(h: Tensor, t: Tensor, w: Tensor) -> Tuple[int, int, int, int, int]:
    if triton is None:
        raise RuntimeError("se3t.nn.triton_outer needs triton (pip install triton)")
    E, H = h.shape
    if t.dim() != 3 or t.shape[0] != E or not t.is_contiguous():
        raise ValueError(f"t must be a contiguous [E, K, K_in] tensor with E = {E}, got {tuple(t.shape)}")
    K, KIN = t.shape[1], t.shape[2]
    if w.dim() != 3 or w.shape[:2] != (H, KIN) or not w.is_contiguous():
        raise ValueError(f"w must be a contiguous [H, K_in, C_out] = [{H}, {KIN}, C_out] tensor, got {tuple(w.shape)}")
    if h.stride(1) != 1:
        raise ValueError("h's rows must be contiguous")
    return E, H, K, KIN, w.shape[2]


def _acc_torch(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, float64 for float64 inputs (tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def outer_forward(h: Tensor, t: Tensor, w: Tensor, out: Tensor) -> Tensor:
    """``out[e, k, o] = sum_{h, i} h[e, h] t[e, k, i] w[h, i, o]`` written into ``out [E, K, C_out]`` (a view
    whose channels are contiguous). ``h [E, H]``, ``t [E, K, K_in]``, ``w [H, K_in, C_out]``, all of one dtype."""
    E, H, K, KIN, COUT = _check(h, t, w)
    if out.shape != (E, K, COUT) or out.stride(2) != 1:
        raise ValueError(f"out must be [E, K, C_out] = {(E, K, COUT)} with contiguous channels")
    M = E * K
    if M == 0:
        return out
    _launch(_outer_forward, _outer_forward_tuned, _FORWARD_CONFIGS,
            lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(COUT, meta["BO"])),
            (h, t, w, out, M, H, KIN, COUT, h.stride(0), out.stride(0), out.stride(1)), h.is_cuda,
            K=K, IEEE=_ieee(w.dtype), ACC=_acc(w.dtype))
    return out


def outer_backward(h: Tensor, t: Tensor, w: Tensor, g: Tensor, need_w: bool, need_h: bool,
                   grad_t: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients of :func:`outer_forward` for the output gradient ``g [E, K, C_out]`` (contiguous channels):
    returns ``(grad_w [H, K_in, C_out] float32 or None, grad_h [E, H] float32 or None)`` and writes the gradient
    of ``t`` into ``grad_t [E, K, K_in]`` (contiguous) when one is given."""
    E, H, K, KIN, COUT = _check(h, t, w)
    if g.shape != (E, K, COUT) or g.stride(2) != 1:
        raise ValueError(f"g must be [E, K, C_out] = {(E, K, COUT)} with contiguous channels")
    M = E * K
    ieee = _ieee(w.dtype)
    grad_w = grad_h = None
    if need_w:
        BI, BO = 32, 64
        tiles = H * triton.cdiv(KIN, BI) * triton.cdiv(COUT, BO)
        # enough programs to fill a large GPU; each split sums its own rows (a multiple of 128, so of every
        # config's BM), the splits are summed after
        splits = max(1, min(triton.cdiv(M, 512), triton.cdiv(1024, tiles)))
        rows_per_split = 128 * triton.cdiv(triton.cdiv(max(M, 1), splits), 128)
        partial = torch.empty(splits, H, KIN, COUT, dtype=_acc_torch(w.dtype), device=h.device)
        if M == 0:
            partial.zero_()
        else:
            _launch(_outer_grad_w, _outer_grad_w_tuned, _GRAD_W_CONFIGS,
                    lambda meta: (H * triton.cdiv(KIN, BI), triton.cdiv(COUT, BO), splits),
                    (h, t, g, partial, M, H, KIN, COUT, h.stride(0), g.stride(0), g.stride(1), rows_per_split),
                    h.is_cuda, K=K, BI=BI, BO=BO, IEEE=ieee, ACC=_acc(w.dtype))
        grad_w = partial.sum(0) if splits > 1 else partial[0]
    if (need_h or grad_t is not None) and M > 0:
        if grad_t is not None and (grad_t.shape != t.shape or not grad_t.is_contiguous()):
            raise ValueError(f"grad_t must be a contiguous {tuple(t.shape)} tensor")
        BI, BC, BH = 32, min(_pow2(COUT), MAX_CHANNEL_TILE), _pow2(H)
        n_i = triton.cdiv(KIN, BI)
        wt = w.permute(0, 2, 1).contiguous()  # [H, C_out, K_in]: W^T's tiles for gz = g @ W^T
        gh = torch.empty(n_i, M, H, dtype=_acc_torch(w.dtype), device=h.device) if need_h else None
        _launch(_outer_grad_inputs, _outer_grad_inputs_tuned, _GRAD_INPUTS_CONFIGS,
                lambda meta: (triton.cdiv(M, meta["BM"]), n_i),
                (h, t, wt, g, grad_t if grad_t is not None else t, gh if gh is not None else t, M, H, KIN, COUT,
                 h.stride(0), g.stride(0), g.stride(1)), h.is_cuda, K=K, BI=BI, BC=BC, BH=BH,
                NEED_T=grad_t is not None, NEED_H=need_h, IEEE=ieee, ACC=_acc(w.dtype), SINGLE_C=BC >= COUT)
        if need_h:
            grad_h = gh.sum(0).view(E, K, H).sum(1)
    elif need_h:
        grad_h = torch.zeros(E, H, dtype=_acc_torch(w.dtype), device=h.device)
    return grad_w, grad_h
