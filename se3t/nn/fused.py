"""The whole TFN contraction of a conv, fused with the radial MLP's last layer, tile by tile of edges and channels.

For one radial MLP with hidden features ``h [E, H]`` and last-layer weight ``W [P, H]`` the kernel weights of
an edge are ``R[e] = W @ h[e]`` (``P`` = 45,056 per edge and hidden layer of the QM9 model), and an output
degree's messages are ``out[e] = (x[e] @ B[e]) @ R[e]^T`` summed over the input degrees. Materialising ``R``
(or the products ``tmp = x @ B``) for all edges costs more time than the arithmetic on CPU (first-touch page
faults of huge fresh tensors, several passes over memory) and they are the largest activations autograd would
keep. Here, for each output-degree block ``j`` (rows ``W_j``), each group of edges ``c`` and each tile ``t`` of
the block's output channels (rows ``W_jt``), ``tmp_jc`` and ``R_jct`` exist only in reused buffers small enough
to stay in cache:

    forward:  tmp_jc = [Bt_c(d_in, d_out) @ x_c(d_in)^T for d_in];  R_jct = h_c @ W_jt^T;  out_jt[c] = tmp_jc @ R_jct^T
    backward: tmp_jc and R_jct again;  gtmp = sum_t g_jct @ R_jct;  grad_x_c(d_in) += Bt_c^T @ gtmp(d_in);
              gR_jct = g_jct^T @ tmp_jc;  grad_W_jt += gR_jct^T @ h_c;  grad_h_c += gR_jct @ W_jt

Nothing per edge beyond the inputs is saved for backward. The bases can be given materialised (``Bt`` per
pair) or as the edges' spherical harmonics ``Y`` with one constant projection ``M_j`` per block: then each group
of edges gets its block's bases as ``Y_g @ M_j`` (about 3 % of the radial GEMM's FLOPs) and no per-edge basis
exists at all (the gradient goes to ``Y``). Layouts ("component-major", see ``Basis.kernel_major``):
``Bt [E, K*F, L]`` with rows ``(m_out, f)``, so ``Bt @ x^T`` is ``[E, K, F*C]``: the block's ``tmp [E, K, K_in]``
has its input columns ordered ``(d_in, f, c)``, and ``W_j`` must be given with its rows in that order
(:class:`se3t.nn.conv.ConvSE3` permutes them). Each per-edge product is then ``(small K) x K_in @ K_in x C_out``:
the orientation in which batched GEMMs with a tiny ``K`` run several times faster on CPU (measured 4-7x for
``K = 1..7``) than ``C_out x K_in @ K_in x K``.

Blocks with one output row and many output channels (the edge frame's order 0) skip ``R`` altogether: per
group, ``out = (h ⊗ tmp) @ W'`` with the block's weights reordered to ``W' [H*K_in, C_out]``; backward makes
``grad W' = (h ⊗ tmp)^T @ g`` and ``grad (h ⊗ tmp) = g @ W'^T`` (see :data:`ONE_ROW_OUTER`).

The reference path (:class:`se3t.nn.conv.ConvSE3` at ``FuseLevel.PARTIAL``/``NONE``) computes the same function
with plain autograd; tests compare the two in forward and backward, and gradcheck this kernel. A backward with
``create_graph`` (training on forces) returns the fused backward's results as a function whose gradients are
fused calls again (:class:`_FusedConvVJP`: the kernel is linear in each group of inputs), so second derivatives
store nothing per edge either; :data:`FUSED_DOUBLE_BACKWARD` ``= False`` differentiates a plain-autograd form of
the same function instead (:func:`_reference_outputs`, in checkpointed chunks of edges: the reference).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Protocol, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["fused_conv", "BlockSpec", "PartSpec", "WeightMap", "CHUNK_VALUES",
           "CHUNK_VALUES_ACCELERATOR", "GROUP_EDGES", "GROUP_EDGES_16BIT", "CHUNK_VALUES_16BIT", "PARALLEL_RANGES",
           "PARALLEL_MIN_VALUES", "UNITS_PER_THREAD", "BLOCKWISE_BUDGET_DIVISOR",
           "ONE_ROW_OUTER", "ONE_ROW_OUTER_MIN_RATIO", "TRITON", "SKIP_UNUSED_WEIGHT_GRADIENT",
           "KEEP_LAYOUTS_MAX_EDGES", "FUSED_DOUBLE_BACKWARD", "DOUBLE_BACKWARD_CHUNK_VALUES", "cached_kernel_weights"]

#: CPU budget of kernel-weight values per tile buffer (512 Ki values = 2 MiB in fp32): a tile of R stays in cache.
#: Measured against 256 Ki on 2-core EPYC, same process, paper model: 0.95-0.96x the step time at 2 threads and
#: 0.90-0.96x at 1 (fewer, larger tiles: less Python per edge); 1 Mi was slower again. On a 2-core Xeon (AVX-512,
#: 2 MiB L2 per core), 2 threads: 256 Ki 1.04x, 128 Ki 1.13x, 1 Mi 1.01x the step time of 512 Ki.
CHUNK_VALUES = 1 << 19
#: Edges sharing one build of ``tmp`` on CPU. 128: as fast as 256 (measured on 2-core EPYC, same process, paper
#: model; 64 was 14 % slower) with half the per-thread group buffers. On the 2-core Xeon: 64 1.14x, 256 1.10x.
GROUP_EDGES = 128
#: Blockwise (low-memory) runs on CPU divide the tile budget by this: R's tile buffer is part of their peak (paper
#: model, batch 100, low_memory with the optimizer in backward: 1.9 of 48.6 MiB), and halving it did not change
#: the step time measurably (1.00x over 16 alternating rounds in one process, 2-core Zen 4).
BLOCKWISE_BUDGET_DIVISOR = 2
#: CPU group and tile budget for 2-byte dtypes (bf16/fp16 autocast): four times fp32's values per tile (4 MiB of
#: bf16 against 2 MiB of fp32) in groups of up to 512 edges. Measured on a 2-core AMD EPYC Zen 4 (AVX-512 with
#: native bf16 dot products), same process, paper model, batch 100, bf16 autocast, against the fp32 settings:
#: 0.85x the training step with 256 edges and 1 Mi values, 0.93x that again with 512 and 2 Mi (1,024 and 4 Mi:
#: 1.05x); inference 0.92x. fp32 gains
#: nothing reliable there (256 edges: 0.94-0.95x; 512 edges with 2 Mi values: 1.14x), so it keeps the values
#: above. A group is at most half of an intra-op thread's share of the edges (see _cpu_limits).
GROUP_EDGES_16BIT = 512
CHUNK_VALUES_16BIT = 1 << 21
#: Blocks with one output row (``K = 1``: degree-0 outputs, the edge frame's order 0) run in the "outer" order:
#: ``out = (h ⊗ tmp) @ W'`` with ``W' [H*K_in, C_out]`` (the block's weights reordered), one GEMM with inner
#: dimension ``H*K_in`` per group of edges instead of ``R = h @ W^T`` (inner dimension ``H``) and a per-edge
#: ``tmp @ R^T``. Same FLOPs in forward, a third fewer in backward (``R`` is not recomputed), and no memory-bound
#: per-edge products with ``R`` (measured on 2-core EPYC, one thread, 3,700 edges, H = 32: 1.4-1.5x per block
#: with C_out = 128, 1.15-1.2x with 64, even at 32, slower below). With ``K > 1`` the outer order costs ``K``x
#: the FLOPs, so those blocks keep ``R``; so do blocks with few output channels
#: (:data:`ONE_ROW_OUTER_MIN_RATIO`). ``False``: every block forms ``R`` (the reference order; tests compare).
ONE_ROW_OUTER = True
#: ... for blocks with at least this many output channels per hidden feature (``C_out >= ratio * H``).
ONE_ROW_OUTER_MIN_RATIO = 2
#: Budget on accelerators (64 Mi values): a few large launches per block instead of many small ones.
CHUNK_VALUES_ACCELERATOR = 1 << 26
#: Blocks on CUDA in 2-byte dtypes (bf16/fp16 autocast) or TF32 run as Triton kernels (:mod:`se3t.nn.triton_outer`)
#: that form ``h ⊗ tmp`` tile by tile on chip: no per-edge ``R`` or ``h ⊗ tmp`` in device memory, and one launch
#: per block instead of a handful of batched GEMMs (on an H200 the ``R`` order's batched per-edge GEMMs were the
#: largest share of a bf16 training step's kernel time). ``"auto"``: there, on NVIDIA GPUs of compute capability
#: 8.0 or newer, when ``triton`` imports; ``"never"``: the PyTorch paths (the reference; strict fp32 keeps them,
#: where the outer order's ``K``-fold GEMM FLOPs would run without tensor cores); ``"always"``: every device and
#: dtype (tests, on CPU with ``TRITON_INTERPRET=1``).
TRITON = os.environ.get("SE3T_TRITON", "auto")
#: Inside :func:`cached_kernel_weights`: each conv's weight parameter -> (what its layouts were made for, the
#: laid-out weights of each (block, outer order)).
_weight_layouts = WeakTensorKeyDictionary()
#: The open :func:`cached_kernel_weights` blocks: None (every parameter) or the parameters of the modules given.
_cache_scopes: List[Optional[WeakTensorKeyDictionary]] = []
_cache_lock = threading.Lock()

#: Backward skips the weights' gradient when autograd will not use it, although the weights require grad: forces
#: by ``torch.autograd.grad(energy, pos)`` or ``backward(inputs=[pos])`` (one GEMM of three per tile in the ``R``
#: order, one of two in the outer order, and the weight-sized gradient buffers). Asked of autograd's engine
#: through ``torch._C._will_engine_execute_node`` (private; as torch's FSDP uses it); computed whenever it cannot
#: tell. ``False``: always computed (the reference behaviour; tests compare).
SKIP_UNUSED_WEIGHT_GRADIENT = True

#: A call that records a graph on at most this many edges keeps its forward's laid-out weights for its own
#: backward (held by the graph until then), instead of laying them out again there: at small batches laying
#: out all of a conv's weights costs as much as the edge work. Paper model, 2-core Zen 4, steps interleaved in one
#: process (``python -m benchmarks.paired --variants nokeep,default`` and ``forces+nokeep,forces``): one molecule
#: (36 edges) 0.91x the training step (live peak 53.7 -> 56.8 MiB) and 0.88x the forces call (9.9 -> 40.9 MiB:
#: the weights, 31 MiB over all convs, held through it); ten molecules (356 edges) only 0.98x and 0.94x for
#: +14 and +32 MiB, hence the bound. Since calls on few edges no longer copy their layouts
#: (:data:`LAYOUT_COPY_MIN_EDGES`) keeping them gains less: one molecule, 0.966x the forces call (9.7 -> 38.2 MiB)
#: and 0.978x the training step. Not in blockwise (low-memory) runs, whose checkpoints would hold them for the
#: whole step. 0: never (the reference; tests compare).
KEEP_LAYOUTS_MAX_EDGES = 256

#: A call on fewer edges uses its blocks' weights as the gather or map makes them, rows ``W_j [C_out*K_in, H]``:
#: every block in the ``R`` order, reading ``W_j^T`` as their transposed view, instead of copying them into a
#: contiguous ``W_j^T`` or the outer order's ``W'`` (inside :func:`cached_kernel_weights` too, which keeps each
#: kind that calls ask for). On few edges the copies cost more than the GEMMs they speed up (2-core Zen 4, fp32,
#: ``h [37, 32] @ W_j^T``: the same time either way; on 512 edges 1.0-1.3x slower GEMMs). Paper model, steps
#: interleaved in one process, this bound against copying always: one molecule (36 edges) 0.73x inference, 0.90x
#: forces, 0.96x a training step; against never copying on ten (~360 edges): 1.02x, 0.94x, 0.82x. 0: always
#: copy (the reference; tests compare).
LAYOUT_COPY_MIN_EDGES = 256

#: A backward with ``create_graph`` (training on forces) returns the fused backward's gradients as a function
#: whose own gradients are fused calls again (:class:`_FusedConvVJP`). ``False``: the gradients of the kernel's
#: plain-autograd form instead (:func:`_differentiable_backward`, the reference; tests compare). Paper model,
#: EDGE_FRAME, 2-core Zen 4, a step on energies and forces against a plain training step, interleaved in one
#: process (``python -m benchmarks.paired --variants default,ftrain+refdouble,ftrain``): batch 100 (QM9) 3.32x
#: (8.7 s) against the reference's 9.91x (25.3 s), live peak 679 against 780 MiB; batch 10 3.23x against 5.49x,
#: 107 against 202 MiB (the reference over all edges at once: 3.54x at 984 MiB).
FUSED_DOUBLE_BACKWARD = True
#: The reference's chunks (``FUSED_DOUBLE_BACKWARD = False``): at most this many kernel weights ``R`` per block
#: and chunk of edges, each chunk under a checkpoint. 0: all edges at once, no checkpoint.
DOUBLE_BACKWARD_CHUNK_VALUES = 1 << 22

#: On CPU, split the edges over one worker thread per intra-op thread (see ``_run_ranges``).
PARALLEL_RANGES = True
#: ... when a block has at least this many kernel weights over all its edges (below, the hand-off costs more).
PARALLEL_MIN_VALUES = 1 << 21


class WeightMap(Protocol):
    """A linear map of the kernel's weight parameter (:func:`fused_conv`'s ``weight_map``), block by block: the
    kernel's weights are ``A(W)[rows]`` for a linear ``A`` (``[P, H] -> [P, H]``) and ``fused_conv``'s ``rows``."""

    def block_weights(self, W: Tensor, row: int) -> Tensor:
        """``A(W)[rows[row:row + n]]``, the ``n = C_out * K_in`` weights of the block starting at ``row``."""

    def add_block_adjoint(self, out: Tensor, grad: Tensor, row: int) -> None:
        """``out += A^T(G)`` for the ``G`` that is ``grad [n, H]`` at that block's rows and zero elsewhere."""


class PartSpec(NamedTuple):
    """One input degree of a block: which ``x`` and ``Bt`` it uses and where its columns start in ``K_in``."""

    x: int        # index into xs ([E, C, L])
    bt: int       # index into bts ([E, K*F, L]; unused with harmonics: the block's projection gives the part)
    col: int      # first column of the part in the block's K_in
    F: int        # radial frequencies of the pair
    C: int        # input channels


class BlockSpec(NamedTuple):
    """One output-degree block: rows ``[row, row + C_out*K_in)`` of ``W``, output ``[E, K, C_out]``."""

    row: int
    c_out: int
    K: int
    k_in: int
    parts: Tuple[PartSpec, ...]


def _cpu_limits(dtype: torch.dtype, E: int) -> Tuple[int, int]:
    """``(edges per group, values per tile of R)`` on CPU for ``dtype``: :data:`GROUP_EDGES` and
    :data:`CHUNK_VALUES`, or for 2-byte dtypes :data:`GROUP_EDGES_16BIT` and :data:`CHUNK_VALUES_16BIT` with
    groups cut to at most ``E / (2 * threads)`` edges (not below :data:`GROUP_EDGES`), so a small graph still
    splits into edge ranges for every intra-op thread (see ``_run_ranges``)."""
    if dtype.itemsize > 2:
        return GROUP_EDGES, CHUNK_VALUES
    share = E // (2 * torch.get_num_threads()) if PARALLEL_RANGES else E
    return min(GROUP_EDGES_16BIT, max(GROUP_EDGES, share)), CHUNK_VALUES_16BIT


def _tiling(chunk: Optional[int], block: BlockSpec, E: int, device: torch.device,
            dtype: torch.dtype = torch.float32, blockwise: bool = False) -> Tuple[int, int]:
    """``(edges per group, output channels per tile)`` of a block in the ``R`` order: a tile of ``R`` is
    ``[group, tile * K_in]``, at most the device's budget of values where it can be. On CPU a group has at most
    ``chunk`` (default: :func:`_cpu_limits`) edges and the tiles cut the output channels so ``R`` stays in cache
    while the weights of a tile serve the whole group: cutting the edges into chunks instead re-read all of the
    block's weights (``H * C_out * K_in`` values, more than ``R``'s chunk) for every 14-edge chunk of the paper
    model's widest blocks (measured on 2-core EPYC: 1.1-1.25x on such a block). Accelerators want few, large
    launches: whole rows of ``R`` for as many edges as the budget holds. ``blockwise``: the CPU budget is divided
    by :data:`BLOCKWISE_BUDGET_DIVISOR`."""
    k_in = max(block.k_in, 1)
    if device.type == "cpu":
        default_group, budget = _cpu_limits(dtype, E)
        budget //= BLOCKWISE_BUDGET_DIVISOR if blockwise else 1
        group = max(1, min(default_group if chunk is None else chunk, budget // k_in))
    else:
        budget = CHUNK_VALUES_ACCELERATOR
        group = max(1, min(chunk or (1 << 62), budget // max(block.c_out * k_in, 1)))
    group = min(group, max(E, 1))
    tile = max(1, min(block.c_out, budget // (group * k_in)))
    tiles = -(-block.c_out // tile)
    return group, -(-block.c_out // tiles)  # the same channels in fewer, even tiles


def _use_outer(block: BlockSpec, hidden: int, E: int) -> bool:
    """Whether a block runs in the outer order (:data:`ONE_ROW_OUTER`): one output row and enough output channels
    (measured crossover near ``C_out = H``: the outer order's per-edge ``h ⊗ tmp`` and its gradient scale with
    ``H * K_in``, ``R`` with ``C_out * K_in``), unless the call is on few edges (:func:`_few_edges`: its
    weights would be reordered for them)."""
    return (ONE_ROW_OUTER and block.K == 1 and block.c_out >= ONE_ROW_OUTER_MIN_RATIO * hidden
            and not _few_edges(E))


def _outer_step(chunk: Optional[int], block: BlockSpec, hidden: int, E: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> int:
    """Edges per GEMM of a block in the outer order (:data:`ONE_ROW_OUTER`), each step one group: on CPU at most
    :func:`_cpu_limits`' group and ``h ⊗ tmp`` of at most 4 Mi values (16 MiB in fp32), on accelerators at most
    :data:`CHUNK_VALUES_ACCELERATOR` values; never more than ``chunk`` when one is asked for."""
    if device.type == "cpu":
        step = min(_cpu_limits(dtype, E)[0], (1 << 22) // max(hidden * block.k_in, 1))
    else:
        step = CHUNK_VALUES_ACCELERATOR // max(hidden * block.k_in, 1)
    if chunk is not None:
        step = min(step, chunk)
    return max(1, min(step, E))


def _use_triton(h: Tensor) -> bool:
    """Whether the blocks of this call run as Triton kernels (:data:`TRITON`)."""
    if TRITON == "never" or (TRITON == "auto" and not h.is_cuda):
        return False
    if TRITON not in ("auto", "always"):
        raise ValueError(f"se3t.nn.fused.TRITON must be 'auto', 'never' or 'always', got {TRITON!r}")
    from . import triton_outer

    if not triton_outer.available():
        if TRITON == "always":
            raise RuntimeError("se3t.nn.fused.TRITON = 'always' needs triton (pip install triton)")
        return False
    if TRITON == "always":
        return True
    # "auto": NVIDIA GPUs from Ampere on (bf16 and TF32 tensor-core dots; the kernels were measured on Hopper only)
    if torch.version.hip is not None or torch.cuda.get_device_capability(h.device) < (8, 0):
        return False
    return h.dtype.itemsize == 2 or (h.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32)


def _triton_step(block: BlockSpec, E: int) -> int:
    """Edges per Triton launch: all of them, unless ``tmp`` (``[edges, K, K_in]``) would pass the accelerator's
    budget."""
    return max(1, min(E, CHUNK_VALUES_ACCELERATOR // max(block.K * block.k_in, 1)))


def _edge_rows(x: Tensor, x_index: Optional[Tensor], s: int, n: int) -> Tensor:
    """Edges ``s .. s+n`` of an input: rows of edge-level ``x``, or the rows ``x_index[s:s+n]`` of node-level ``x``."""
    return x[s:s + n] if x_index is None else x.index_select(0, x_index[s:s + n])


class _Bases(NamedTuple):
    """The bases as the kernel reads them: materialised ``bts`` (one per part), or ``sh [E, S]`` with one
    projection ``[S_j, W_j]`` per block in ``bts`` (its parts' kernel-major bases side by side)."""

    bts: Sequence[Tensor]
    sh: Optional[Tensor]

    def width(self, j: int) -> int:
        """Basis values per edge of block ``j`` (0 when materialised: no group buffer needed)."""
        return 0 if self.sh is None else self.bts[j].shape[1]

    def group(self, j: int, block: BlockSpec, dims: Sequence[int], s: int, n: int, buf: Optional[Tensor],
              cast: Optional[Tensor]) -> List[Tensor]:
        """Edges ``s .. s+n`` of every part's ``Bt [n, K*F, L]`` (``dims``: each part's ``L``): views of the
        materialised bases, or ``Y_g @ M_j`` made in ``buf`` (in the harmonics' dtype; copied to ``cast``, in the
        compute dtype, when that differs)."""
        if self.sh is None:
            return [self.bts[p.bt][s:s + n] for p in block.parts]
        M = self.bts[j]
        g = torch.mm(self.sh[s:s + n, :M.shape[0]], M, out=buf[:n * M.shape[1]].view(n, M.shape[1]))
        if cast is not None:
            g = cast[:g.numel()].view(g.shape).copy_(g)
        views, col = [], 0
        for p, L in zip(block.parts, dims):
            w = block.K * p.F * L
            views.append(g[:, col:col + w].view(n, block.K * p.F, L))
            col += w
        return views


def _build_tmp(block: BlockSpec, xs, x_index: Optional[Tensor], bases: List[Tensor], s: int, n: int, tmp: Tensor,
               pbuf: Tensor) -> Tensor:
    """``tmp[:n] = [Bt_c @ x_c^T for each part]`` as ``[n, K, K_in]`` (parts side by side); ``bases``: the
    parts' ``Bt`` rows of these edges."""
    t = tmp[:n]
    if len(block.parts) == 1:
        p = block.parts[0]
        torch.bmm(bases[0], _edge_rows(xs[p.x], x_index, s, n).transpose(1, 2), out=t.view(n, block.K * p.F, p.C))
        return t
    for p, bt in zip(block.parts, bases):
        width = p.F * p.C
        part = torch.bmm(bt, _edge_rows(xs[p.x], x_index, s, n).transpose(1, 2),
                         out=pbuf[:n * block.K * width].view(n, block.K * p.F, p.C))
        t[:, :, p.col:p.col + width].copy_(part.view(n, block.K, width))
    return t


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor, first: bool = False) -> None:
    """``acc += a @ b``, or ``acc = a @ b`` when ``first`` (whatever ``acc`` held: a partial sum's buffer needs no
    zero fill); ``acc`` may be wider than ``a, b`` (float32 sums of bf16 products)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b, beta=0 if first else 1)  # beta = 0: acc's old values (NaN included) are not read
    elif first:
        acc.copy_(torch.mm(a, b))
    else:
        acc += torch.mm(a, b)


def _partial_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device, lo: int, hi: int) -> Tensor:
    """A work unit's partial weight gradient for edges ``lo .. hi``: uninitialised, as the unit's first group writes
    every value (:func:`_accumulate_mm` with ``first``); zeros for an empty range, which writes nothing."""
    if hi > lo:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


# --- edge ranges on CPU worker threads -------------------------------------------------------------------------
# A tile's GEMMs are too small to split well over OpenMP threads (measured: 2 threads barely beat 1 on a
# 25-edge chunk), but independent edge ranges are embarrassingly parallel. With T > 1 intra-op threads the edges
# are cut into at most UNITS_PER_THREAD * T contiguous units of whole groups, which T Python threads (ATen
# releases the GIL), with one intra-op thread each, take one at a time in order. Taking units dynamically
# balances the load (with a static split into T ranges one thread sat idle for up to ~25 % of a block: uneven
# ranges, noisy cores). Outputs and per-edge gradients of different units are disjoint, and every unit returns
# its own partial grad_W, summed in unit order: for a given thread count the result does not depend on which
# thread ran which unit (bitwise reproducible).
#: Work units per worker thread (more: better balance, smaller units).
UNITS_PER_THREAD = 4
#: ... each of at least this many groups: every unit's partial grad_W is a fresh block-sized buffer, which on a
#: layer called on few edges (low_memory's blocks) cost more than the balance gained (measured: backward of one
#: conv of the QM9 model in 3 calls of ~1,240 edges: 0.71 s with eight units of about one group per call,
#: 0.52-0.59 s with two; 0.48 s as one call of all edges).
MIN_UNIT_GROUPS = 4
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0


def _forget_pool_after_fork() -> None:
    # A forked child (e.g. a DataLoader worker) inherits the executor object but none of its threads.
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _worker_pool(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    if _pool is None or _pool_size != size:
        if _pool is not None:
            _pool.shutdown(wait=True)
        _pool, _pool_size = ThreadPoolExecutor(size, thread_name_prefix="se3t-fused"), size
    return _pool


class _Arena:
    """One thread's scratch buffers: slot ``i`` is one flat buffer per dtype, grown to the largest request. The
    blocks of a kernel call run one after another on a thread, so they share its buffers."""

    def __init__(self):
        self._bufs: Dict[Tuple[int, torch.dtype], Tensor] = {}

    def take(self, slot: int, n: int, like: Tensor) -> Tensor:
        """``n`` values of ``like``'s dtype and device (contents undefined)."""
        buf = self._bufs.get((slot, like.dtype))
        if buf is None or buf.numel() < n:
            buf = self._bufs[(slot, like.dtype)] = like.new_empty(max(n, 1))
        return buf[:n]


def _unit_bounds(E: int, group: int, parts: int) -> List[int]:
    """Edge bounds of the work units of :func:`_run_ranges` (``parts`` worker threads, ``group``-edge groups)."""
    chunks = -(-E // group)
    num_units = max(parts, min(chunks // MIN_UNIT_GROUPS, UNITS_PER_THREAD * parts))
    num_units -= num_units % parts  # equal shares of equal units: one unit more for one thread idles the others
    return [min(E, (chunks * i // num_units) * group) for i in range(num_units + 1)]


def _run_ranges(fn: Callable[[int, int, _Arena], object], fold: Callable[[object], None], E: int, group: int,
                device: torch.device, values: int) -> None:
    """``fold(fn(lo, hi, arena))`` for each edge range, folded in range order, with one :class:`_Arena` per
    thread: one range on the calling thread, or units of whole ``group``-edge groups taken by one worker per
    intra-op thread (CPU, enough groups and at least :data:`PARALLEL_MIN_VALUES` kernel weights in all, so small
    layers do not pay for the hand-off). A unit's result is folded as soon as every earlier one has been, so only
    the results of units finished out of order wait (memory: a few partial grad_W, not one per unit)."""
    threads = torch.get_num_threads() if (PARALLEL_RANGES and device.type == "cpu") else 1
    if values < PARALLEL_MIN_VALUES:
        threads = 1
    chunks = -(-E // group)
    parts = min(threads, chunks // 2)
    if parts <= 1:
        fold(fn(0, E, _Arena()))
        return
    bounds = _unit_bounds(E, group, parts)
    num_units = len(bounds) - 1
    next_unit = itertools.count()  # next() on a count is atomic under the GIL
    waiting: Dict[int, object] = {}  # finished units whose turn to be folded has not come yet
    next_fold = [0]
    lock = threading.Lock()
    inference = torch.is_inference_mode_enabled()

    def task(_: int) -> None:
        torch.set_num_threads(1)  # this worker's intra-op threads (OpenMP settings are per thread)
        # Grad and inference mode are per thread too: run as the calling autograd.Function does.
        with torch.inference_mode(inference), torch.no_grad():
            arena = _Arena()
            for i in next_unit:
                if i >= num_units:
                    return
                result = fn(bounds[i], bounds[i + 1], arena)
                with lock:
                    waiting[i] = result
                    while next_fold[0] in waiting:
                        fold(waiting.pop(next_fold[0]))
                        next_fold[0] += 1

    try:
        list(_worker_pool(parts).map(task, range(parts)))  # list(): re-raise a worker's exception here
    finally:
        torch.set_num_threads(threads)  # the global default the workers lowered; this thread's own setting


def _block_weights(W: Tensor, rows: Tensor, b: BlockSpec, weight_map: Optional["WeightMap"], dtype: torch.dtype
                   ) -> Tensor:
    """Block ``b``'s kernel weights ``[C_out * K_in, H]`` in ``dtype``: rows of ``W``, or of its map."""
    if weight_map is None:
        return W.index_select(0, rows[b.row:b.row + b.c_out * b.k_in])
    return weight_map.block_weights(W, b.row).to(dtype)


@contextlib.contextmanager
def cached_kernel_weights(*modules: torch.nn.Module) -> Iterator[None]:
    """Within this block, each conv of ``modules`` (default: every conv) lays out its kernel weights once (mapped by
    its weight map, cast to the compute dtype, transposed for the GEMMs) and reuses them in later calls while the
    weights stay the same: inference, and forces (gradients of the output with respect to positions: the backward
    reads them too, with the outer order's blocks kept transposed beside); leaving the block frees them.

    Laying them out reads and writes all of a conv's weights several times per call, whatever the batch (paper
    model, 2-core Zen 4, inference steps interleaved in one process, ``python -m benchmarks.paired --variants
    infer,infer+cache``: 40 -> 30 and 50 -> 43 ms per call at batch 1 in two runs, 192 -> 137 ms at batch 10, 3 %
    less at batch 100).
    While held they are one more copy of the convs' weights (35 MiB for the paper model).

    Kept layouts are used only while the parameter is the same tensor with the same storage, version counter,
    dtype and device (and the conv's blocks, row order and weight map): an optimizer step, ``load_state_dict``,
    an in-place op or ``param.data = ...`` lays them out afresh. Changes through ``param.data`` in place
    (``p.data.copy_(...)``, older EMA code) do not bump the version counter: do not make them inside the block.
    Training gains little inside the block (the backward reads the forward's layouts, but each optimizer step
    makes the next call lay them out afresh) and holds the copy throughout. The PyTorch paths only (Triton
    kernels lay out theirs per call)::

        with se3t.cached_kernel_weights(model), torch.inference_mode():
            for frame in trajectory:
                energy = model(**frame)
    """
    scope = None
    if modules:
        scope = WeakTensorKeyDictionary()
        for module in modules:
            for p in module.parameters():
                scope[p] = True
    with _cache_lock:
        _cache_scopes.append(scope)
    try:
        yield
    finally:
        with _cache_lock:
            del _cache_scopes[next(i for i in range(len(_cache_scopes) - 1, -1, -1) if _cache_scopes[i] is scope)]
            for W in list(_weight_layouts.keys()):
                if not _in_cache_scope(W):
                    del _weight_layouts[W]


def _in_cache_scope(W: Tensor) -> bool:
    return any(scope is None or W in scope for scope in _cache_scopes)


def _engine_uses(ctx, tensor_input: int) -> bool:
    """Whether autograd will use this backward's gradient for the ``tensor_input``-th tensor input of the
    function (counting tensor arguments only, as ``ctx.next_functions`` does). False only when the engine says the
    input's node will not run; True when it cannot tell (``autograd.grad`` asked for that leaf itself raises)."""
    will_run = getattr(torch._C, "_will_engine_execute_node", None)
    node = ctx.next_functions[tensor_input][0]
    if will_run is None or node is None:
        return True
    try:
        return bool(will_run(node))
    except RuntimeError:
        return True


def _cached_layouts(W: Tensor, rows: Tensor, blocks: Sequence[BlockSpec], weight_map: Optional["WeightMap"],
                    dtype: torch.dtype) -> Optional[Dict[Tuple[int, object], Tensor]]:
    """Inside :func:`cached_kernel_weights` (for ``W``): the laid-out block weights of parameter ``W`` kept from
    earlier calls, for this call to read and fill: per block ``j``, the forward's (``(j, outer)``) and, for the
    outer order, the backward's transpose of it (``(j, "backward")``). None (lay them out for this call only)
    outside it or when ``W`` is an inference tensor (no version counter). An entry serves only the ``W`` storage,
    version, dtype and device, compute dtype, blocks, row order and weight map it was made for."""
    if not _cache_scopes or not _in_cache_scope(W) or W.is_inference():
        return None
    key = (W._version, W.data_ptr(), W.dtype, W.device, dtype, tuple(blocks), rows.data_ptr(), id(weight_map))
    entry = _weight_layouts.get(W)
    if entry is None or entry[0] != key:
        entry = _weight_layouts[W] = (key, {})
    return entry[1]


def _few_edges(E: int) -> bool:
    """Whether a call on ``E`` edges uses its weights as they are made (:data:`LAYOUT_COPY_MIN_EDGES`)."""
    return E < LAYOUT_COPY_MIN_EDGES


def _layout_key(j: int, outer: bool, E: int) -> Tuple[int, object]:
    """Where block ``j``'s forward layout is kept: ``(j, True)`` the outer order's ``W'``, ``(j, False)`` a
    contiguous ``W_j^T``, ``(j, "rows")`` on few edges its rows (read transposed), so that kept layouts serve
    calls of any size as their own layouts would (bitwise the same results)."""
    return (j, True) if outer else (j, "rows" if _few_edges(E) else False)


def _gemm_layout(Wj: Tensor, E: int) -> Tensor:
    """``W_j^T [H, C_out*K_in]`` from block ``j``'s rows ``W_j [C_out*K_in, H]``, for ``R = h @ W_j^T`` and
    (transposed back) ``grad_h = gR @ W_j``: contiguous, or on few edges the transposed view (:func:`_few_edges`)."""
    return Wj.t() if _few_edges(E) else Wj.t().contiguous()


def _backward_layout(layouts: Optional[Dict[Tuple[int, object], Tensor]], j: int, outer: bool, E: int
                     ) -> Optional[Tensor]:
    """Block ``j``'s kept layout as backward reads it (see :func:`_cached_layouts`): the forward's ``W_j^T [H,
    C_out*K_in]`` itself (:func:`_layout_key`), or (``outer``) the transpose ``[C_out, H*K_in]`` of its ``W' [(h,
    i), o]``, made once and kept beside it; None when the forward kept none."""
    if layouts is None:
        return None
    if not outer:
        return layouts.get(_layout_key(j, outer, E))
    if (j, "backward") not in layouts and (j, True) in layouts:
        layouts[(j, "backward")] = layouts[(j, True)].t().contiguous()
    return layouts.get((j, "backward"))


def _triton_forward_step(b: BlockSpec, j: int, dims: List[int], Wj_t: Tensor, h: Tensor, xs, x_index, bases,
                         cast: bool, out: Tensor, E: int):
    """A forward step (as ``_FusedConv.forward`` queues them) of block ``b`` as a Triton kernel: ``tmp`` over a
    group of (nearly) all edges, then ``out = (h ⊗ tmp) @ W`` on chip (:func:`se3t.nn.triton_outer.outer_forward`)."""
    from .triton_outer import outer_forward

    H = h.shape[1]
    group = _triton_step(b, E)
    W_hio = Wj_t.view(H, b.c_out, b.k_in).transpose(1, 2).contiguous()  # [H, K_in, C_out]

    def buffers(arena: _Arena):
        width = bases.width(j)
        return (arena.take(1, group * b.K * b.k_in, h).view(group, b.K, b.k_in),
                arena.take(2, group * b.K * b.k_in, h),
                arena.take(3, group * width, bases.sh) if width else None,
                arena.take(4, group * width, h) if (width and cast) else None)

    def run(lo: int, hi: int, bufs) -> None:
        tmp, pbuf, bbuf, cbuf = bufs
        for S in range(lo, hi, group):
            m = min(group, hi - S)
            t = _build_tmp(b, xs, x_index, bases.group(j, b, dims, S, m, bbuf, cbuf), S, m, tmp, pbuf)
            outer_forward(h[S:S + m], t, W_hio, out[S:S + m])

    return run, buffers, group, E * b.c_out * b.k_in


def _reference_outputs(blocks: Sequence[BlockSpec], rows: Tensor, x_index: Optional[Tensor],
                       weight_map: Optional["WeightMap"], single_output: bool, h: Tensor, W: Tensor,
                       xs: Sequence[Tensor], bases: _Bases) -> List[Tensor]:
    """The kernel's outputs made with plain differentiable ops over the edges given (``R`` and ``tmp`` of every
    block materialised): the function :class:`_FusedConv` computes, for its double backward (``create_graph``:
    force training), where the chunked kernels' ``out=`` buffers cannot be differentiated."""
    E, H = h.shape
    outs = []
    for j, b in enumerate(blocks):
        dims = [xs[p.x].shape[2] for p in b.parts]
        if bases.sh is None:
            bts = [bases.bts[p.bt] for p in b.parts]
        else:  # the block's bases from the harmonics, as _Bases.group makes them per group
            M = bases.bts[j]
            g = (bases.sh[:, :M.shape[0]] @ M).to(h.dtype)
            widths = [b.K * p.F * L for p, L in zip(b.parts, dims)]
            bts = [part.reshape(E, b.K * p.F, L) for part, p, L in zip(g.split(widths, dim=1), b.parts, dims)]
        parts = sorted(zip(b.parts, bts), key=lambda pair: pair[0].col)
        tmp = torch.cat([torch.bmm(bt, (xs[p.x] if x_index is None else xs[p.x].index_select(0, x_index))
                                   .transpose(1, 2)).reshape(E, b.K, p.F * p.C) for p, bt in parts], dim=2)
        R = (h @ _block_weights(W, rows, b, weight_map, h.dtype).t()).view(E, b.c_out, b.k_in)
        outs.append(torch.bmm(tmp, R.transpose(1, 2)))  # [E, K, C_out]
    if single_output:
        return [torch.cat([o.reshape(E, -1) for o in outs], dim=1)]
    return outs


def _reference_grads(blocks: Sequence[BlockSpec], rows: Tensor, x_index: Optional[Tensor],
                     weight_map: Optional["WeightMap"], single_output: bool, num_x: int, with_sh: bool,
                     need: Sequence[bool], inputs: Sequence[Optional[Tensor]],
                     grad_outs: Sequence[Optional[Tensor]]) -> Tuple[Tensor, ...]:
    """The gradients of :func:`_reference_outputs` (``inputs``: ``h, W, *xs, *bases``) for the inputs flagged in
    ``need``, made with ``create_graph`` (zeros where an input is unused)."""
    with torch.enable_grad():
        # Fresh aliases: one input may depend on another (a layer's features on the harmonics that also make its
        # bases), and autograd.grad for the originals would add that path too (counted again by the outer backward).
        inputs = [t.view_as(t) if n else t for t, n in zip(inputs, need)]
        wanted = [t for t, n in zip(inputs, need) if n]
        h, W, *xs_bts = inputs
        bases = _Bases(xs_bts[num_x + 1:], xs_bts[num_x]) if with_sh else _Bases(xs_bts[num_x:], None)
        outs = _reference_outputs(blocks, rows, x_index, weight_map, single_output, h, W, xs_bts[:num_x], bases)
        pairs = [(o, g) for o, g in zip(outs, grad_outs) if g is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                    allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, wanted))


def _differentiable_backward(call: _Call, inputs: Sequence[Tensor], grad_outs: Sequence[Optional[Tensor]],
                             need: Sequence[bool]) -> Tuple[Optional[Tensor], ...]:
    """The reference backward with ``create_graph`` (:data:`FUSED_DOUBLE_BACKWARD` ``= False``): the gradients of
    :func:`_reference_outputs` for the ``inputs`` flagged in ``need``, themselves differentiable. In chunks of
    edges (:data:`DOUBLE_BACKWARD_CHUNK_VALUES`), each under a non-reentrant checkpoint: the second backward
    recomputes a chunk's gradients when it reaches them, so only one chunk's ``R`` and products exist at a time,
    instead of every edge's for every conv kept from the first backward to the second."""
    blocks, num_x, rows, x_index, with_sh = call.blocks, call.num_x, call.rows, call.x_index, call.with_sh
    args = (blocks, rows, x_index, call.weight_map, call.single_output, num_x, with_sh, need)
    E = inputs[0].shape[0]
    step = E if not DOUBLE_BACKWARD_CHUNK_VALUES else max(
        1, DOUBLE_BACKWARD_CHUNK_VALUES // max(b.c_out * b.k_in for b in blocks))
    if step >= E:
        grads = iter(_reference_grads(*args, inputs, grad_outs))
        return tuple(next(grads) if n else None for n in need)
    # per input: one row per edge (a chunk takes its rows; gradients are joined), or shared (gradients summed)
    per_edge = [True, False] + [x_index is None] * num_x + (
        [True] + [False] * (len(inputs) - 3 - num_x) if with_sh else [True] * (len(inputs) - 2 - num_x))
    parts: List[Tuple[Tensor, ...]] = []
    for lo in range(0, E, step):
        hi = min(E, lo + step)
        chunk = [t[lo:hi] if edge else t for t, edge in zip(inputs, per_edge)]
        chunk_args = args[:2] + (None if x_index is None else x_index[lo:hi],) + args[3:]
        parts.append(checkpoint(_reference_grads, *chunk_args, chunk, [None if g is None else g[lo:hi]
                                                                    for g in grad_outs], use_reentrant=False))
    edge_wanted = [edge for edge, n in zip(per_edge, need) if n]
    # shared inputs' gradients summed one chunk at a time (a stack of them all would hold one per chunk at once)
    joined = iter([torch.cat(gs) if edge else sum(gs[1:], gs[0]) for edge, gs in zip(edge_wanted, zip(*parts))])
    return tuple(next(joined) if n else None for n in need)


class _Call(NamedTuple):
    """A fused call's arguments besides its differentiable tensors (see :func:`fused_conv`)."""

    chunk: Optional[int]
    blockwise: bool
    blocks: Tuple[BlockSpec, ...]
    num_x: int
    rows: Tensor
    x_index: Optional[Tensor]
    with_sh: bool
    weight_map: Optional["WeightMap"]
    single_output: bool


def _kernel_forward(call: _Call, layouts: Optional[Dict[Tuple[int, object], Tensor]], h: Tensor, W: Tensor,
                    xs_bts: Sequence[Tensor]) -> Tuple[Tensor, ...]:
    """The fused forward (see the module docstring): each block's ``[E, K, C_out]``, or (``single_output``) one
    tensor with them side by side. ``layouts``: the laid-out block weights to reuse and fill (None: lay them out
    for this call only)."""
    # Per edge range, a "group" of edges shares one build of tmp (and, in backward, of the gradient of tmp and its
    # per-part scatter to grad_x), amortising those small ops; within it, tiles of output channels small enough
    # for R to stay in cache run the wide GEMMs (measured on 2-core EPYC: 50-70 GFLOP/s with R <= 2 MiB, 27-30
    # with 8 MiB), each tile's weights serving the whole group (see _tiling).
    chunk, blockwise, blocks, num_x, rows, x_index, with_sh, weight_map, single_output = call
    xs = xs_bts[:num_x]
    bases = _Bases(xs_bts[num_x + 1:], xs_bts[num_x]) if with_sh else _Bases(xs_bts[num_x:], None)
    cast = bases.sh is not None and bases.sh.dtype != h.dtype
    E, H = h.shape
    outs = []
    # one [E, sum_j K_j*C_out_j] tensor with each block's output a strided view, or one tensor per block
    buf = h.new_empty(E, sum(b.K * b.c_out for b in blocks)) if single_output else None
    col = 0
    steps = []  # blocks not yet run: (range function, buffers, edges per group, kernel weights over all edges)

    def hand_off() -> None:
        """Run the blocks in ``steps`` over all edges: each edge range goes through all of them, on one worker
        thread. One hand-off for all blocks: each hand-off right after the calling thread's own parallel ops
        finds its OpenMP worker still spinning (GNU OpenMP: several ms), which slows the workers down; and each
        range's inputs serve every block while in cache (measured on a 2-core Xeon, QM9 paper model: ~10 %
        of the step). (``blockwise`` applies to backward only: see :func:`fused_conv`.)"""
        _run_ranges(lambda lo, hi, arena: [fn(lo, hi, bufs(arena)) for fn, bufs, *_ in steps], lambda _: None,
                    E, max(st[2] for st in steps), h.device, sum(st[3] for st in steps))
        steps.clear()

    triton = _use_triton(h)
    for j, b in enumerate(blocks):
        if buf is None:
            out = h.new_empty(E, b.K, b.c_out)
        else:
            out = buf[:, col:col + b.K * b.c_out].view(E, b.K, b.c_out)
            col += b.K * b.c_out
        dims = [xs[p.x].shape[2] for p in b.parts]
        if triton:
            Wj_t = _block_weights(W, rows, b, weight_map, h.dtype).t()
            steps.append(_triton_forward_step(b, j, dims, Wj_t, h, xs, x_index, bases, cast, out, E))
            outs.append(out)
            continue
        outer = _use_outer(b, H, E)
        Wj_t = W_outer = None
        key = _layout_key(j, outer, E)
        layout = None if layouts is None else layouts.get(key)
        if layout is None:
            Wj_t = _block_weights(W, rows, b, weight_map, h.dtype).t()
            # outer: W' [(k, i), o] = W_j[(o, i), k]; else [H, C_out*K_in]: R's GEMM reads a column slice
            # (measured on Xeon: ~12 % faster than from the transposed rows)
            layout = (Wj_t.view(H, b.c_out, b.k_in).transpose(1, 2).reshape(H * b.k_in, b.c_out) if outer
                      else _gemm_layout(Wj_t.t(), E))
            if layouts is not None:
                layouts[key] = layout
        if outer:  # each step of edges is one group
            group, tile = _outer_step(chunk, b, H, E, h.device, h.dtype), b.c_out
            W_outer = layout
        else:
            group, tile = _tiling(chunk, b, E, h.device, h.dtype)
            Wj_t = layout
        layout = None
        # output through a buffer when the GEMM's destination would be strided (a tile of channels, or a view of
        # the one output): a GEMM into a strided view goes through a temporary anyway
        staged = single_output or tile < b.c_out

        def forward_buffers(arena: _Arena, b=b, j=j, group=group, tile=tile, outer=outer, staged=staged):
            width = bases.width(j)
            return (arena.take(0, group * (H * b.k_in if outer else tile * b.k_in), h),
                    arena.take(1, group * b.K * b.k_in, h).view(group, b.K, b.k_in),
                    arena.take(2, group * b.K * b.k_in, h),
                    arena.take(3, group * width, bases.sh) if width else None,
                    arena.take(4, group * width, h) if (width and cast) else None,
                    arena.take(5, group * b.K * tile, h) if staged else None)

        def forward_range(lo: int, hi: int, bufs, b=b, j=j, dims=dims, out=out, Wj_t=Wj_t, group=group,
                          tile=tile) -> None:
            rbuf, tmp, pbuf, bbuf, cbuf, obuf = bufs
            for S in range(lo, hi, group):
                m = min(group, hi - S)
                t = _build_tmp(b, xs, x_index, bases.group(j, b, dims, S, m, bbuf, cbuf), S, m, tmp, pbuf)
                hs = h[S:S + m]
                for o in range(0, b.c_out, tile):  # R's tile: output channels o .. o+w of these edges
                    w = min(tile, b.c_out - o)
                    R = torch.mm(hs, Wj_t[:, o * b.k_in:(o + w) * b.k_in],
                                 out=rbuf[:m * w * b.k_in].view(m, w * b.k_in)).view(m, w, b.k_in)
                    if obuf is None:
                        torch.bmm(t, R.transpose(1, 2), out=out[S:S + m])
                    else:
                        out[S:S + m, :, o:o + w].copy_(
                            torch.bmm(t, R.transpose(1, 2), out=obuf[:m * b.K * w].view(m, b.K, w)))

        def outer_forward_range(lo: int, hi: int, bufs, b=b, j=j, dims=dims, out=out, W_outer=W_outer if outer
                                else None, step=group) -> None:
            zbuf, tmp, pbuf, bbuf, cbuf, obuf = bufs
            for S in range(lo, hi, step):
                m = min(step, hi - S)
                t = _build_tmp(b, xs, x_index, bases.group(j, b, dims, S, m, bbuf, cbuf), S, m, tmp, pbuf)
                z = torch.mul(h[S:S + m, :, None], t, out=zbuf[:m * H * b.k_in].view(m, H, b.k_in))  # h ⊗ tmp
                if obuf is None:
                    torch.mm(z.view(m, -1), W_outer, out=out[S:S + m].view(m, b.c_out))
                else:
                    out[S:S + m, 0].copy_(torch.mm(z.view(m, -1), W_outer, out=obuf[:m * b.c_out].view(m, b.c_out)))

        steps.append((outer_forward_range if outer else forward_range, forward_buffers, group,
                      E * b.c_out * b.k_in))
        outs.append(out)
        # held by the chosen range function only (the other one would keep this block's weights alive)
        Wj_t = W_outer = forward_range = outer_forward_range = None
    if steps:
        hand_off()
    return (buf,) if single_output else tuple(outs)


def _kernel_backward(call: _Call, layouts: Optional[Dict[Tuple[int, object], Tensor]], inputs: Sequence[Tensor],
                     grad_outs: Sequence[Optional[Tensor]], need: Sequence[bool]) -> Tuple[Optional[Tensor], ...]:
    """The fused backward: the gradients of ``inputs`` (``h, W, *xs, *bases`` as :class:`_FusedConv` takes them)
    flagged in ``need``, None for the others, from the outputs' gradients ``grad_outs`` (None: zero)."""
    chunk, blockwise, blocks, num_x, rows, x_index, with_sh, weight_map, single_output = call
    h, W_param, *xs_bts = inputs
    xs = xs_bts[:num_x]
    bases = _Bases(xs_bts[num_x + 1:], xs_bts[num_x]) if with_sh else _Bases(xs_bts[num_x:], None)
    cast = bases.sh is not None and bases.sh.dtype != h.dtype
    E, H = h.shape
    need_h, need_W = need[0], need[1]
    need_x = need[2:2 + num_x]
    # with harmonics the "bts" are constant projections (one per block, no gradient; parts index nothing)
    need_bt = need[2 + num_x:] if not with_sh else ()
    if single_output:  # each block's gradient: a strided view of the one output's
        grad_all, grad_outs, col = grad_outs[0], [], 0
        for b in blocks:
            grad_outs.append(None if grad_all is None else
                             grad_all[:, col:col + b.K * b.c_out].view(E, b.K, b.c_out))
            col += b.K * b.c_out
    # Accumulate in at least float32 (many chunks; bf16 partial sums would lose bits).
    acc_dtype = torch.promote_types(h.dtype, torch.float32)
    grad_h = torch.zeros(h.shape, dtype=acc_dtype, device=h.device) if need_h else None
    # grad_W in the parameter's row order: each block's partials are added at its rows (one buffer, no copy),
    # or through the weight map's adjoint, block by block (no buffer of all mapped weights).
    grad_W = torch.zeros(W_param.shape, dtype=acc_dtype, device=h.device) if need_W else None
    # grad_x per edge as [E, L, C] (the natural output of Bt^T @ gtmp), returned as a transposed view (summed
    # into the nodes' rows for node-level inputs).
    grad_x = [x.new_zeros(E, x.shape[2], x.shape[1]) if need else None for x, need in zip(xs, need_x)]
    grad_bt = [torch.zeros_like(bt) if need else None for bt, need in zip(bases.bts, need_bt)]
    bt_grad = (lambda p: None) if with_sh else (lambda p: grad_bt[p.bt])
    grad_sh = None
    if with_sh and need[2 + num_x]:  # each edge range adds into its own rows
        grad_sh = torch.zeros(bases.sh.shape, dtype=torch.promote_types(bases.sh.dtype, acc_dtype),
                              device=h.device)
    # blocks not yet run: (range function, buffers, edges per group, kernel weights, fold, row, mapped grad_W)
    steps = []

    def hand_off() -> None:
        """As in forward; each range's partial grad_W of each block is folded in range order."""
        _run_ranges(lambda lo, hi, arena: [fn(lo, hi, bufs(arena)) for fn, bufs, *_ in steps],
                    lambda partials: [st[4](p) for st, p in zip(steps, partials)], E,
                    max(st[2] for st in steps), h.device, sum(st[3] for st in steps))
        mapped = [(grad_Wj, row) for *_, row, grad_Wj in steps if grad_Wj is not None]
        steps.clear()  # the blocks' weights (held by their range functions) go before the adjoints' temporaries
        while mapped:  # each block's gradient goes as soon as it is mapped
            weight_map.add_block_adjoint(grad_W, *mapped.pop(0))

    largest = E * max(b.c_out * b.k_in for b in blocks)
    triton = _use_triton(h)
    # inside cached_kernel_weights, the forward's layouts (valid while W is unchanged, as it must be between
    # forward and backward: autograd checks its version) serve here too (forces: none laid out at all)
    if layouts is None and not triton:
        layouts = _cached_layouts(W_param, rows, blocks, weight_map, h.dtype)
    for j, (b, g_all) in enumerate(zip(blocks, grad_outs)):
        if g_all is None:
            continue
        if blockwise and steps and sum(st[3] for st in steps) + E * b.c_out * b.k_in > largest:
            hand_off()  # as in forward
        if g_all.stride(-1) != 1:  # rows of channels must be contiguous for the chunk GEMMs; views of one
            g_all = g_all.contiguous()  # output already are
        parts_in = [p for p in b.parts
                    if grad_x[p.x] is not None or bt_grad(p) is not None or grad_sh is not None]
        outer = _use_outer(b, H, E) and not triton
        kept = _backward_layout(layouts, j, outer, E)
        Wj = None if kept is not None else _block_weights(W_param, rows, b, weight_map, h.dtype)
        dims = [xs[p.x].shape[2] for p in b.parts]
        # column of each part in the block's projection (harmonics only)
        part_cols = [sum(b.K * q.F * L for q, L in zip(b.parts[:i], dims)) for i in range(len(b.parts))]
        Wj_t = W_outer_t = None
        if triton:  # one group of (nearly) all edges; W as [H, K_in, C_out]
            group, tile = _triton_step(b, E), b.c_out
            W_hio = Wj.view(b.c_out, b.k_in, H).permute(2, 1, 0).contiguous()
        elif outer:  # as in forward; W'^T [c_out, (h, i)] contiguous: grad (h ⊗ tmp) = g @ W'^T reads
            # it row-major
            group, tile = _outer_step(chunk, b, H, E, h.device, h.dtype), b.c_out
            W_outer_t = kept if kept is not None else (
                Wj.view(b.c_out, b.k_in, H).transpose(1, 2).reshape(b.c_out, H * b.k_in))
        else:
            group, tile = _tiling(chunk, b, E, h.device, h.dtype, blockwise)
            # R = h @ W_j^T as in forward, and grad_h's GEMM (transposed)
            Wj_t = kept if kept is not None else _gemm_layout(Wj, E)
        # (made in the layouts above: the rows themselves are not needed again)
        Wj_shape, Wj, kept = (b.c_out * b.k_in, H), None, None

        def backward_buffers(arena: _Arena, b=b, j=j, parts_in=parts_in, group=group, tile=tile, outer=outer,
                             triton=triton):
            width = bases.width(j)  # (the Triton kernels keep no R, and always read tmp)
            return (None if triton else arena.take(0, group * (H * b.k_in if outer else tile * b.k_in), h),
                    arena.take(1, group * b.K * b.k_in, h).view(group, b.K, b.k_in)
                    if (need_h or need_W or triton) else None,
                    arena.take(2, group * b.K * b.k_in, h).view(group, b.K, b.k_in) if parts_in else None,
                    arena.take(3, group * b.K * b.k_in, h),
                    arena.take(4, group * width, bases.sh) if width else None,
                    arena.take(5, group * width, h) if (width and cast) else None)

        def scatter_parts(S: int, m: int, bts: List[Tensor], gtmp: Tensor, pbuf: Tensor, b=b, j=j,
                          part_cols=part_cols, parts_in=parts_in) -> None:
            """The gradient of ``tmp`` (``gtmp[:m]``, edges ``S .. S+m``) -> grad of x and of the basis."""
            for i, p in enumerate(b.parts):
                if p not in parts_in:
                    continue
                width = p.F * p.C
                if len(b.parts) == 1:
                    gt = gtmp[:m].view(m, b.K * p.F, p.C)
                else:
                    gt = pbuf[:m * b.K * width].view(m, b.K, width)
                    gt.copy_(gtmp[:m, :, p.col:p.col + width])
                    gt = gt.view(m, b.K * p.F, p.C)
                if grad_x[p.x] is not None:
                    grad_x[p.x][S:S + m].baddbmm_(bts[i].transpose(1, 2), gt)
                if bt_grad(p) is not None:
                    bt_grad(p)[S:S + m].baddbmm_(gt, _edge_rows(xs[p.x], x_index, S, m))
                if grad_sh is not None:  # d(loss)/dY = d(loss)/dBt @ M_part^T
                    gb = torch.bmm(gt, _edge_rows(xs[p.x], x_index, S, m)).view(m, -1)
                    M = bases.bts[j]
                    grad_sh[S:S + m, :M.shape[0]].addmm_(
                        gb.to(grad_sh.dtype), M[:, part_cols[i]:part_cols[i] + gb.shape[1]].t().to(grad_sh.dtype))

        def groups(lo: int, hi: int, step: int, tmp: Optional[Tensor], pbuf: Tensor, bbuf, cbuf, b=b, j=j,
                   dims=dims, parts_in=parts_in):
            """``(S, m, bases, tmp)`` for each group of edges ``S .. S+m`` in ``[lo, hi)``: the bases when the
            gradients need them, ``tmp`` (rebuilt) when a buffer for it is given."""
            for S in range(lo, hi, step):
                m = min(step, hi - S)
                bts = bases.group(j, b, dims, S, m, bbuf, cbuf) if (tmp is not None or parts_in) else None
                yield S, m, bts, (_build_tmp(b, xs, x_index, bts, S, m, tmp, pbuf) if tmp is not None else None)

        def backward_range(lo: int, hi: int, bufs, b=b, g_all=g_all, Wj_t=Wj_t, group=group, tile=tile,
                           groups=groups, scatter_parts=scatter_parts) -> Optional[Tensor]:
            rbuf, tmp, gtmp, pbuf, bbuf, cbuf = bufs
            # grad W_j^T [H, C_out*K_in]: h^T @ gR (M = H rows) runs ~20 % faster than gR^T @ h (N = H columns)
            gWt = _partial_buffer(Wj_t.shape, acc_dtype, h.device, lo, hi) if need_W else None
            for S, m, bts, t in groups(lo, hi, group, tmp, pbuf, bbuf, cbuf):
                hs = h[S:S + m]
                hs_t = hs.t().contiguous() if need_W else None
                for o in range(0, b.c_out, tile):  # R's tile: output channels o .. o+w of these edges
                    w = min(tile, b.c_out - o)
                    cols = slice(o * b.k_in, (o + w) * b.k_in)               # the tile's rows of W_j
                    g = g_all[S:S + m, :, o:o + w]                           # [m, K, w]
                    rb = rbuf[:m * w * b.k_in].view(m, w, b.k_in)
                    if gtmp is not None:                                     # gtmp = sum over tiles g @ R
                        R = torch.mm(hs, Wj_t[:, cols], out=rb.view(m, -1)).view(m, w, b.k_in)
                        if o == 0:
                            torch.bmm(g, R, out=gtmp[:m])
                        else:
                            gtmp[:m].baddbmm_(g, R)
                    if t is None:
                        continue
                    if b.K == 1:  # an outer product: a broadcast multiply beats a GEMM with inner dimension 1
                        gR = torch.mul(g.transpose(1, 2), t, out=rb)
                    else:
                        gR = torch.bmm(g.transpose(1, 2), t, out=rb)
                    gR = gR.view(m, w * b.k_in)
                    if need_W:
                        _accumulate_mm(gWt[:, cols], hs_t, gR, first=S == lo)
                    if need_h:  # W_j^T's columns read transposed: one copy of the block's weights, not two
                        # (W_j's rows: 0-15 %, mean ~4 % faster GEMM, measured on 2-core Zen 4)
                        _accumulate_mm(grad_h[S:S + m], gR, Wj_t[:, cols].t())
                scatter_parts(S, m, bts, gtmp, pbuf)
            return None if gWt is None else gWt.t()  # in the parameter's row order

        def outer_backward_range(lo: int, hi: int, bufs, b=b, g_all=g_all, parts_in=parts_in,
                                 W_outer_t=W_outer_t, step=group, groups=groups,
                                 scatter_parts=scatter_parts) -> Optional[Tensor]:
            zbuf, tmp, gtmp, pbuf, bbuf, cbuf = bufs
            gWt = _partial_buffer(W_outer_t.shape, acc_dtype, h.device, lo, hi) if need_W else None
            for S, m, bts, t in groups(lo, hi, step, tmp, pbuf, bbuf, cbuf):
                g = g_all[S:S + m, 0]                                        # [m, C_out]
                z = zbuf[:m * H * b.k_in].view(m, H, b.k_in)
                if need_W:                                                   # grad W'^T = g^T @ (h ⊗ tmp)
                    _accumulate_mm(gWt, g.t().contiguous(),
                                   torch.mul(h[S:S + m, :, None], t, out=z).view(m, -1), first=S == lo)
                if need_h or parts_in:
                    gz = torch.mm(g, W_outer_t, out=z.view(m, -1)).view(m, H, b.k_in)  # grad of h ⊗ tmp
                    if need_h:  # tmp @ gz^T per edge: ~2.5x faster than gz @ tmp^T (measured, Xeon)
                        grad_h[S:S + m] += torch.bmm(t.view(m, 1, b.k_in), gz.transpose(1, 2)).view(m, H)
                    if parts_in:
                        torch.bmm(h[S:S + m, None, :], gz, out=gtmp[:m])
                        scatter_parts(S, m, bts, gtmp, pbuf)
            # in the parameter's row order (c_out, k_in) as a strided view: the fold adds it where it goes
            return None if gWt is None else gWt.view(b.c_out, H, b.k_in).transpose(1, 2)

        def triton_backward_range(lo: int, hi: int, bufs, b=b, g_all=g_all, parts_in=parts_in,
                                  W_hio=W_hio if triton else None, step=group, groups=groups,
                                  scatter_parts=scatter_parts) -> Optional[Tensor]:
            from .triton_outer import outer_backward

            _, tmp, gtmp, pbuf, bbuf, cbuf = bufs
            gW = None
            for S, m, bts, t in groups(lo, hi, step, tmp, pbuf, bbuf, cbuf):
                g = g_all[S:S + m].to(W_hio.dtype)
                gw, gh = outer_backward(h[S:S + m], t, W_hio, g, need_W, need_h,
                                        gtmp[:m] if parts_in else None)
                if gh is not None:
                    grad_h[S:S + m] += gh
                if gw is not None:
                    gW = gw if gW is None else gW.add_(gw)
                if parts_in:
                    scatter_parts(S, m, bts, gtmp, pbuf)
            # [H, K_in, C_out] -> the parameter's row order (c_out, k_in)
            return None if gW is None else gW.permute(2, 1, 0).reshape(b.c_out * b.k_in, H)

        # partial grad_W of each range, added in range order: the same sum whichever thread ran which range
        grad_Wj = None
        if not need_W:
            fold = (lambda _: None)
        elif weight_map is None:
            fold = (lambda partial, r=rows[b.row:b.row + b.c_out * b.k_in]:
                    grad_W.index_add_(0, r, partial.reshape(-1, H)))
        else:  # partials [C_out * K_in, H], or [C_out, K_in, H] (outer order): added as views, no copy
            grad_Wj = torch.zeros(Wj_shape, dtype=acc_dtype, device=h.device)
            fold = (lambda partial, g=grad_Wj: g.view(partial.shape).add_(partial))
        fn = triton_backward_range if triton else (outer_backward_range if outer else backward_range)
        # the chosen range function holds its own references; the others would keep this block's weights
        # alive through the next blocks' hand-offs (blockwise: one block's weights at a time)
        Wj = Wj_t = W_outer_t = W_hio = backward_range = outer_backward_range = triton_backward_range = None
        steps.append((fn, backward_buffers, group,
                      E * b.c_out * b.k_in, fold, b.row, grad_Wj))
        grad_Wj = fold = None
    if steps:
        hand_off()
    grad_h = grad_h.to(h.dtype) if grad_h is not None else None
    if grad_W is not None:
        grad_W = grad_W.to(W_param.dtype)
    if x_index is not None:
        grad_x = [gx.new_zeros(x.shape[0], *gx.shape[1:]).index_add_(0, x_index, gx) if gx is not None else None
                  for x, gx in zip(xs, grad_x)]
    grad_x = [gx.transpose(1, 2) if gx is not None else None for gx in grad_x]
    if with_sh:
        grad_sh = grad_sh.to(bases.sh.dtype) if grad_sh is not None else None
        return (grad_h, grad_W, *grad_x, grad_sh) + (None,) * len(bases.bts)
    return (grad_h, grad_W, *grad_x, *grad_bt)


class _FusedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, schedule: Tuple[Optional[int], bool, Optional[dict], bool], blocks: Tuple[BlockSpec, ...],
                num_x: int, rows: Tensor, x_index: Optional[Tensor], with_sh: bool, weight_map: Optional["WeightMap"],
                single_output: bool, h: Tensor, W: Tensor, *xs_bts: Tensor):
        """``schedule``: ``(chunk, blockwise)`` of :func:`fused_conv`, the laid-out block weights to reuse and
        fill (:func:`_cached_layouts`, or this call's own; None: lay them out here), and whether they are this
        call's own, kept for its backward (:data:`KEEP_LAYOUTS_MAX_EDGES`)."""
        chunk, blockwise, layouts, keep = schedule
        ctx.kept_layouts = layouts if keep else None
        # rows and x_index travel as saved tensors (the call's copy in ctx holds None for them)
        ctx.call = _Call(chunk, blockwise, blocks, num_x, None, None, with_sh, weight_map, single_output)
        ctx.save_for_backward(rows, x_index, h, W, *xs_bts)
        return _kernel_forward(ctx.call._replace(rows=rows, x_index=x_index), layouts, h, W, xs_bts)

    @staticmethod
    def backward(ctx, *grad_outs: Tensor):
        # this call's own layouts (KEEP_LAYOUTS_MAX_EDGES) are freed with this backward (a second one, with
        # retain_graph, lays them out again)
        layouts, ctx.kept_layouts = ctx.kept_layouts, None
        rows, x_index, *inputs = ctx.saved_tensors
        call = ctx.call._replace(rows=rows, x_index=x_index)
        need = list(ctx.needs_input_grad[8:])
        if torch.is_grad_enabled() and not FUSED_DOUBLE_BACKWARD:  # create_graph, the reference (as it was: with
            # W's gradient skipped its checkpointed chunks peaked at 1,314 instead of 780 MiB, batch 100)
            return (None,) * 8 + _differentiable_backward(call, inputs, grad_outs, need)
        if need[1] and SKIP_UNUSED_WEIGHT_GRADIENT:  # W is the 3rd tensor input (4th with x_index)
            need[1] = _engine_uses(ctx, 2 + (x_index is not None))
        if torch.is_grad_enabled():  # create_graph (e.g. a loss on forces): gradients that can be differentiated
            return (None,) * 8 + _FusedConvVJP.apply(call, tuple(need), layouts, len(grad_outs), *grad_outs, *inputs)
        return (None,) * 8 + _kernel_backward(call, layouts, inputs, grad_outs, need)


def _linear_groups(num_x: int, with_sh: bool, num_inputs: int) -> Tuple[range, ...]:
    """The groups of a fused call's inputs (``h, W, *xs, *bases``) in each of which its output is linear: ``h``,
    ``W``, the features, the bases (with harmonics ``sh`` alone: its projections are constants)."""
    bases_end = 3 + num_x if with_sh else num_inputs
    return range(0, 1), range(1, 2), range(2, 2 + num_x), range(2 + num_x, bases_end)


def _joined_projection(M: Tensor, block: BlockSpec, dims: Sequence[int], S: int) -> Tensor:
    """Block ``block``'s projection ``M [S_j, W_j]`` of harmonics ``sh [E, S]`` made into one of ``[sh, u_sh] [E,
    2S]`` (its first ``S + S_j`` columns) whose parts are ``[Bt, u_Bt]`` side by side along the last dimension
    (``dims``: each part's ``L``; ``2L`` in the new part): :class:`_FusedConvVJP`'s joined call with harmonics."""
    S_j, K = M.shape[0], block.K
    out = M.new_zeros(S + S_j, 2 * M.shape[1])
    col = 0
    for p, L in zip(block.parts, dims):
        w = K * p.F * L
        part = M[:, col:col + w].view(S_j, K * p.F, L)
        joined = out[:, 2 * col:2 * (col + w)].view(S + S_j, K * p.F, 2 * L)
        joined[:S_j, :, :L] = part       # Bt from sh
        joined[S:, :, L:] = part         # u_Bt from u_sh
        col += w
    return out


class _FusedConvVJP(torch.autograd.Function):
    """The fused backward as a function of the outputs' gradients and the inputs: a backward with ``create_graph``
    (training on forces) returns its results, and their own gradients are fused calls again.

    The output is linear in each input group (:func:`_linear_groups`), and each input's gradient does not depend
    on its own group. So, with ``u_i`` the gradients of group ``i``'s gradients and ``F(i <- u_i)`` the kernel
    with group ``i`` replaced by them: the outputs' gradients get ``sum_i F(i <- u_i)`` (a fused forward: the
    kernel's derivative in the direction ``u_i``), and each input outside group ``i`` gets the gradient of
    ``F(i <- u_i)`` for the same outputs' gradients (a fused backward). Both run as these two functions, so
    higher derivatives exist too. Nothing per edge is stored beyond the inputs and the outputs' gradients. The
    features' and the bases' directions share one call: joined along the dimension the bases contract,
    ``[Bt, u_Bt] @ [u_x, x]^T = Bt @ u_x^T + u_Bt @ x^T``, whose gradients hold both cross terms (with harmonics,
    ``[sh, u_sh]`` and projections that make both halves: :func:`_joined_projection`). Force training: two calls
    per conv instead of three, each a forward and a backward.
    """

    @staticmethod
    def forward(ctx, call: _Call, need: Tuple[bool, ...], layouts: Optional[dict], num_grads: int,
                *tensors: Optional[Tensor]):
        """``tensors``: the ``num_grads`` outputs' gradients (None: zero), then ``h, W, *xs, *bases``; returns
        the gradients of the inputs flagged in ``need`` (None for the others)."""
        grad_outs, inputs = tensors[:num_grads], tensors[num_grads:]
        ctx.call, ctx.num_grads = call, num_grads
        # kept layouts (a small call's own, or cached_kernel_weights') serve the second derivatives' calls too
        ctx.layouts = layouts
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors)
        return _kernel_backward(call, layouts, inputs, grad_outs, need)

    @staticmethod
    def backward(ctx, *us: Optional[Tensor]):
        call, n = ctx.call, ctx.num_grads
        tensors = ctx.saved_tensors
        grad_outs, inputs = tensors[:n], tensors[n:]
        need_g = [nd and g is not None for nd, g in zip(ctx.needs_input_grad[4:4 + n], grad_outs)]
        need_in = list(ctx.needs_input_grad[4 + n:])
        if need_in[1] and SKIP_UNUSED_WEIGHT_GRADIENT:  # W's place among the tensor arguments
            need_in[1] = _engine_uses(ctx, sum(t is not None for t in grad_outs) + 1)
        grad_g: List[Optional[Tensor]] = [None] * n
        grad_in: List[Optional[Tensor]] = [None] * len(inputs)
        # the calls below with the same W lay its weights out once (this backward's own, unless kept already)
        shared = ctx.layouts if ctx.layouts is not None else {}

        def add(acc: List[Optional[Tensor]], k: int, value: Optional[Tensor]) -> None:
            if value is not None:
                acc[k] = value if acc[k] is None else acc[k] + value

        def direction(i: int) -> Tensor:  # (contiguous, in the compute dtype: as fused_conv gives the kernel)
            return torch.zeros_like(inputs[i]) if us[i] is None else us[i].to(inputs[i].dtype).contiguous()

        def run(replaced: List[Tensor], skip: Sequence[int], layouts: Optional[dict]) -> Tuple[Optional[Tensor], ...]:
            """One call on ``replaced``: its outputs add to the outputs' gradients, and its gradients for the inputs
            not in ``skip`` are returned."""
            if any(need_g):
                outs = _FusedConv.apply((call.chunk, call.blockwise, layouts, False), call.blocks, call.num_x,
                                        call.rows, call.x_index, call.with_sh, call.weight_map, call.single_output,
                                        *replaced)
                for k, out in enumerate(outs):
                    add(grad_g, k, out if need_g[k] else None)
            wanted = tuple(nd and k not in skip for k, nd in enumerate(need_in))
            return _FusedConvVJP.apply(call, wanted, layouts, n, *grad_outs, *replaced) if any(wanted) else ()

        all_groups = _linear_groups(call.num_x, call.with_sh, len(inputs))
        groups = [group for group in all_groups if any(us[i] is not None for i in group)]
        features, bases = all_groups[2], all_groups[3]
        # the features' and the bases' directions in one call: joined along the dimension the bases contract,
        # [Bt, u_Bt] @ [u_x, x]^T = Bt @ u_x^T + u_Bt @ x^T
        joined = features in groups and bases in groups
        for group in groups:
            if joined and group in (features, bases):
                continue
            replaced = list(inputs)
            for i in group:
                replaced[i] = direction(i)
            # laid-out weights serve calls with the same W only
            for k, grad in enumerate(run(replaced, group, None if 1 in group else shared)):
                add(grad_in, k, grad)
        if joined:
            replaced = list(inputs)
            for i in features:
                replaced[i] = torch.cat([direction(i), inputs[i]], dim=2)
            if call.with_sh:  # harmonics [sh, u_sh], and projections that make each part's [Bt, u_Bt] from them
                sh = inputs[bases[0]]
                replaced[bases[0]] = torch.cat([sh, direction(bases[0]).to(sh.dtype)], dim=1)
                for j, b in enumerate(call.blocks):
                    dims = [inputs[2 + q.x].shape[2] for q in b.parts]
                    replaced[bases[0] + 1 + j] = _joined_projection(inputs[bases[0] + 1 + j], b, dims, sh.shape[1])
            else:
                for i in bases:
                    replaced[i] = torch.cat([inputs[i], direction(i)], dim=2)
            for k, grad in enumerate(run(replaced, (), shared)):
                if grad is not None and (k in features or k in bases):  # the parts that multiplied u_Bt, u_x
                    L = inputs[k].shape[-1]
                    grad = grad[..., L:] if k in features else grad[..., :L]
                add(grad_in, k, grad)
        return (None,) * 4 + tuple(grad_g) + tuple(grad_in)


@torch.compiler.disable  # a hand-scheduled kernel: compiling would unroll its chunk loops (one graph break instead)
def fused_conv(h: Tensor, W: Tensor, rows: Tensor, blocks: Sequence[BlockSpec], xs: Sequence[Tensor],
               bts: Sequence[Tensor], chunk: Optional[int] = None, x_index: Optional[Tensor] = None,
               sh: Optional[Tensor] = None, weight_map: Optional["WeightMap"] = None,
               single_output: bool = False, blockwise: bool = False) -> List[Tensor]:
    """``out_j[e] = tmp_j[e] @ (W'_j @ h[e]).view(C_out, K_in)^T`` with ``tmp_j[e]`` the parts ``Bt[e] @ x[e]^T``.

    Shapes: ``h [E, H]``, ``W [P, H]``, ``rows [P]`` (int64: ``W' = W[rows]`` has the rows of each block ordered
    ``(c_out, d_in, f, c)``; selected per block, never stored), ``xs[i] [E, C_i, L_i]``, ``bts[k] [E, K*F, L]``
    -> ``out_j [E, K_j, C_out_j]`` (component-major) for every block ``j``.
    ``x_index [E]`` (int64, optional): the ``xs`` are node-level ``[N, C_i, L_i]`` and edge ``e`` reads row
    ``x_index[e]``: gathered chunk by chunk, so no edge-level copy of the features is made or kept for backward.
    ``sh [E, S]`` (optional): the edges' spherical harmonics; ``bts`` are then one constant projection per block,
    ``[S_j, W_j]`` (:func:`se3t.basis.kernel_projection`, ``S_j <= S``), and each group of edges makes its bases
    as ``sh @ M_j`` (in ``sh``'s dtype, at least the compute dtype): no per-edge basis is stored; gradients go to
    ``sh``, none to the projections.
    ``single_output``: return one tensor ``[E, sum_j K_j * C_out_j]`` holding the blocks' outputs side by side
    (each ``[K_j, C_out_j]`` row-major) instead of one tensor per block.
    ``weight_map`` (optional, :class:`WeightMap`): the kernel's weights are a linear map of ``W``, made block by
    block in forward and again in backward (never stored between the two; all blocks' exist during a call, one at a
    time in a ``blockwise`` backward); ``W``'s gradient is the adjoint map of theirs.
    ``chunk`` (optional): the most edges per group (one build of ``tmp``; default: the device's, see
    :func:`_tiling`).
    ``blockwise``: backward runs the output-degree blocks one after another over all edges (small ones together),
    so that at most the largest block's worth of (mapped) weights and weight gradients exists at a time (low-memory
    runs; instead of all blocks', at the cost of more hand-offs to the worker threads). Forward always hands all
    blocks off at once: its peak is far below backward's (paper model, low_memory: ~33 against ~48 MiB), and
    blockwise forwards took ~4 % more of a low_memory step (same process, 2-core Zen 4). Default: every edge range
    goes through all blocks in one hand-off (faster on CPU). The results are the same either way: bitwise for the
    same tiles, to rounding where the CPU's blockwise tiles are smaller (:data:`BLOCKWISE_BUDGET_DIVISOR`: the input
    gradient then sums a block's tiles in more steps).
    Under autocast the whole computation runs in the autocast dtype (explicitly: the chunked kernels write into
    preallocated buffers, which autocast does not handle).
    """
    device_type = h.device.type
    tensors = [h, W, *xs] + ([sh] if sh is not None else list(bts))
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    with torch.autocast(device_type, enabled=False):
        # a mapped W is kept as given (the map runs in its precision; its output is cast)
        args = [h.to(dtype).contiguous(), (W if weight_map is not None else W.to(dtype)).contiguous()]
        args += [t.to(dtype).contiguous() for t in xs]
        if sh is not None:
            basis_dtype = torch.promote_types(sh.dtype, dtype)
            if len(bts) != len(blocks) or any(M.dim() != 2 or M.shape[0] > sh.shape[1] for M in bts):
                raise ValueError(f"with harmonics sh [E, {sh.shape[1]}], bts must be one projection [S_j <= "
                                 f"{sh.shape[1]}, W_j] per block, got {[list(M.shape) for M in bts]}")
            args += [sh.to(basis_dtype).contiguous()] + [M.to(basis_dtype).contiguous() for M in bts]
        else:
            args += [t.to(dtype).contiguous() for t in bts]
        chunk = None if chunk is None else max(1, int(chunk))
        layouts = _cached_layouts(W, rows, blocks, weight_map, dtype)
        keep = (layouts is None and not blockwise and h.shape[0] <= KEEP_LAYOUTS_MAX_EDGES
                and torch.is_grad_enabled() and any(t.requires_grad for t in (h, W, *xs, *bts, sh) if t is not None)
                and not _use_triton(args[0]))
        return list(_FusedConv.apply((chunk, bool(blockwise), {} if keep else layouts, keep), tuple(blocks), len(xs),
                                     rows, x_index, sh is not None, weight_map, single_output, *args))
