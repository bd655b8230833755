"""A radial MLP's part of a :class:`~se3t.nn.conv.ConvSE3` executed in the edge frame (``FuseLevel.EDGE_FRAME``).

See :mod:`se3t.edge_frame` for the math. Per order ``m`` the plan makes one block of the fused kernel
(:mod:`se3t.nn.fused`): output rows ``k`` = the components ``+m, -m`` (one row for ``m = 0``), output
channels ``(d_out, c_out)`` over the MLP's output degrees ``>= m``, input columns ``(d_in, slot, c)`` over its
input degrees ``>= m``; the kernel's per-edge "basis" of an input degree is :func:`se3t.edge_frame.frame_rows`
(the frame rotation's rows, ``[E, 4, 2d_in+1]``) and its weights are the radial MLP's last layer mapped
from frequencies to slots (:meth:`EdgeFramePlan.apply`, inside the kernel in forward and again in backward:
never stored). The kernel writes every block into one output; one gather puts each output degree's components in
order and the frame rotation takes them back (:class:`_GatherRotate`, which keeps nothing per edge but the
rotations).
"""
from __future__ import annotations

import itertools
import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..basis import Basis, num_frequencies
from ..edge_frame import num_slots, so2_coefficients
from ..fiber import degree_to_dim
from .fused import BlockSpec, PartSpec, fused_conv

__all__ = ["EdgeFramePlan"]

#: :meth:`EdgeFramePlan.add_block_adjoint` maps a group of pairs in at most this many pieces.
ADJOINT_PIECES = 4

#: On CPU, in float32 and float64, a block's weights and their gradient's adjoint are mapped as one sparse matrix
#: product each (:meth:`EdgeFramePlan._sparse_maps`: one pass over ``W``, no gathered copies) instead of a gather,
#: a ``bmm`` per group of pairs and a scatter. ``False``: always the latter (the reference; tests compare).
SPARSE_MAPS = True
_SPARSE_DTYPES = (torch.float32, torch.float64)


def _csr(rows: Tensor, cols: Tensor, values: Tensor, shape: Tuple[int, int]) -> Tensor:
    """A sparse CSR matrix from its distinct entries, with int32 indices (MKL's sparse product takes int32: int64
    indices would be converted in every call)."""
    order = torch.argsort(rows * shape[1] + cols)
    crow = torch.zeros(shape[0] + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state" (torch 2.13)
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow.int(), cols[order].int(), values[order], shape, check_invariants=False)


def _slot_index(m: int, slot: int) -> int:
    """Position of ``(m, slot)`` among a pair's slots ``(a_0, a_1, c_1, a_2, c_2, ...)``."""
    return 0 if m == 0 else 2 * m - 1 + slot


class EdgeFramePlan:
    """The edge-frame execution of one radial MLP's blocks.

    Args:
        blocks: the MLP's blocks in parameter layout, one per output degree: ``(offset, d_out, d_ins, k_in,
            in_offsets)`` (:class:`se3t.nn.conv._Block`); every block must cover the same input degrees.
        in_degrees: the conv's input degrees (``xs`` order).
        in_channels, out_channels: channels per degree.
    """

    def __init__(self, blocks: Sequence, in_degrees: Sequence[int], in_channels: Dict[int, int],
                 out_channels: Dict[int, int]):
        d_ins = blocks[0].d_ins
        if any(b.d_ins != d_ins for b in blocks):
            raise ValueError("edge-frame execution needs every output degree of a radial MLP to read the same "
                             f"input degrees, got {[b.d_ins for b in blocks]}")
        self.blocks = tuple(blocks)
        self.out_channels = dict(out_channels)
        max_order = max(min(b.d_out, max(d_ins)) for b in blocks)
        specs: List[BlockSpec] = []
        rows: List[Tensor] = []
        #: per kernel part, the (d_in, m) of its frame rows
        self.part_orders: List[Tuple[int, int]] = []
        #: per order m: the output degrees of its block, ascending
        self.block_outputs: List[Tuple[int, ...]] = []
        # The slot weights are kept pair-major: pair by pair (parameter order), rows (slot, o, c), so that mapping
        # frequencies to slots is one GEMM per pair (``perm``: the parameter rows in that order, with (f, o, c)).
        self._pairs: List[Tuple[int, int, int, int]] = []  # (first row, rows, d_in, d_out)
        pair_start: Dict[Tuple[int, int], int] = {}
        perm, start = [], 0
        for b in blocks:
            C_o = out_channels[b.d_out]
            for d, col in zip(b.d_ins, b.in_offsets):
                F, C = num_frequencies(d, b.d_out), in_channels[d]
                f, o, c = torch.meshgrid(torch.arange(F), torch.arange(C_o), torch.arange(C), indexing="ij")
                perm.append((b.offset + o * b.k_in + col + c * F + f).reshape(-1))
                self._pairs.append((start, F * C_o * C, d, b.d_out))
                pair_start[(d, b.d_out)] = start
                start += F * C_o * C
        self.perm = torch.cat(perm)
        row = 0
        for m in range(max_order + 1):
            outs = [b for b in blocks if b.d_out >= m]
            ins = [d for d in d_ins if d >= m]
            S = num_slots(m)
            parts, col = [], 0
            for d in ins:
                parts.append(PartSpec(in_degrees.index(d), len(self.part_orders), col, S, in_channels[d]))
                self.part_orders.append((d, m))
                col += S * in_channels[d]
            c_out = sum(out_channels[b.d_out] for b in outs)
            specs.append(BlockSpec(row, c_out, 1 if m == 0 else 2, col, tuple(parts)))
            self.block_outputs.append(tuple(b.d_out for b in outs))
            row += c_out * col
            # kernel row ((d_out, o), (d_in, slot, c)) <- pair-major slot row (slot, o, c) of pair (d_in, d_out)
            for b in outs:
                C_o, cols = out_channels[b.d_out], []
                for d in ins:
                    C = in_channels[d]
                    slots = torch.tensor([_slot_index(m, s) for s in range(S)])
                    o, s_, c = torch.meshgrid(torch.arange(C_o), slots, torch.arange(C), indexing="ij")
                    cols.append((pair_start[(d, b.d_out)] + s_ * (C_o * C) + o * C + c).reshape(C_o, -1))
                rows.append(torch.cat(cols, dim=1).reshape(-1))
        self.specs = tuple(specs)
        self.rows = torch.cat(rows)
        self._build_gather_index()
        self._build_block_maps(start)
        self._coefficients: Dict[Tuple[torch.dtype, torch.device], Tuple[List[Tensor], Tensor]] = {}
        self._block_coefficients: Dict[Tuple[torch.dtype, torch.device], Dict[int, List[Tuple[Tensor, ...]]]] = {}
        self._block_sparse: Dict[Tuple[torch.dtype, torch.device, bool], Dict[int, Tensor]] = {}

    def __getstate__(self) -> dict:
        """Without the per-dtype caches (made again on first use): sparse tensors cannot be copied or pickled, and
        a copy of a model (``copy.deepcopy``, ``torch.save``) need not carry them."""
        state = dict(self.__dict__)
        state.update(_coefficients={}, _block_coefficients={}, _block_sparse={})
        return state

    def _build_gather_index(self) -> None:
        """Where each output value sits among the blocks' outputs flattened side by side (``[K, c_out]`` per
        block, ``width`` columns): ``gather_index`` holds, per output degree (blocks' degrees in order), the
        columns of its values ``(component, c)`` component-major; components of orders above every input degree
        read an appended zero column. A component's channels are consecutive columns, so the index moves whole
        runs of :attr:`run` columns (the channel counts' gcd): :attr:`gather_runs` indexes the columns viewed as
        ``[width / run, run]`` (plus a zero run where :attr:`needs_zero_column`); each block output is read exactly
        once (checked here), so gradients go back by copying into the same runs."""
        starts, col = [], 0
        for spec in self.specs:
            starts.append(col)
            col += spec.K * spec.c_out
        zero_column, index = col, []
        for b in self.blocks:
            C, L = self.out_channels[b.d_out], degree_to_dim(b.d_out)
            where = torch.full((L, C), zero_column, dtype=torch.long)
            for m in range(min(b.d_out, len(self.specs) - 1) + 1):
                outputs, spec = self.block_outputs[m], self.specs[m]
                channels = sum(self.out_channels[d] for d in outputs[:outputs.index(b.d_out)]) + torch.arange(C)
                where[b.d_out + m] = starts[m] + channels  # row k = 0: component +m
                if m > 0:
                    where[b.d_out - m] = starts[m] + spec.c_out + channels  # row k = 1: component -m
            index.append(where.reshape(-1))
        gather_index = torch.cat(index)
        self.needs_zero_column = bool((gather_index == zero_column).any())
        self.run = math.gcd(*(self.out_channels[b.d_out] for b in self.blocks))
        runs, num_runs = gather_index.view(-1, self.run), zero_column // self.run
        zero = runs[:, :1] == zero_column  # a component no block writes: the zero column throughout
        consecutive = torch.where(zero, runs == zero_column, runs == runs[:, :1] + torch.arange(self.run))
        if not bool(consecutive.all()) or bool((runs[:, 0] % self.run).any()):
            raise AssertionError("edge-frame gather: a component's channels are whole runs of consecutive columns")
        self.gather_runs = runs[:, 0] // self.run
        read = (self.gather_runs < num_runs).nonzero().squeeze(1)
        if read.numel() != num_runs or bool((self.gather_runs[read].bincount(minlength=num_runs) != 1).any()):
            raise AssertionError("edge-frame gather: every block output is read exactly once")

    def _build_block_maps(self, num_rows: int) -> None:
        """Per block (by its first kernel row): the pairs it reads, each with the slots of the block's order ``m``
        and where their rows ``(slot, o, c)`` sit among the block's rows, so that a block's weights are made (and
        its gradient mapped back) without the other blocks'."""
        self._block_maps: Dict[int, List[Tuple[int, List[int], Tensor]]] = {}
        for m, spec in enumerate(self.specs):
            n = spec.c_out * spec.k_in
            position = torch.full((num_rows,), -1, dtype=torch.long)
            position[self.rows[spec.row:spec.row + n]] = torch.arange(n)
            entries = []
            for p, (start, size, d_in, d_out) in enumerate(self._pairs):
                if min(d_in, d_out) < m:
                    continue
                cell = size // num_frequencies(d_in, d_out)  # rows (o, c) of one slot
                slots = [_slot_index(m, s) for s in range(num_slots(m))]
                entries.append((p, slots, torch.cat([position[start + i * cell:start + (i + 1) * cell]
                                                     for i in slots])))
            where = torch.cat([e[2] for e in entries])
            if where.numel() != n or bool((where < 0).any()) or where.unique().numel() != n:
                raise AssertionError(f"edge-frame block {m}: the pairs' slot rows do not tile the block's rows")
            self._block_maps[spec.row] = entries

    def _block_constants(self, dtype: torch.dtype, device: torch.device) -> Dict[int, List[Tuple[Tensor, ...]]]:
        """Per block: its pairs in groups of one shape (slots, frequencies, rows per slot), each group as
        ``(T[slots] [n, S, F], the pairs' parameter rows (pair, f, o, c), their slots' rows in the block)``, on
        ``device`` (made once per dtype and device). A group maps with one gather, one ``bmm`` and one scatter
        whatever its number of pairs: on a GPU every op is a kernel launch (30 pairs, 10 groups per conv here)."""
        key = (dtype, device)
        if key not in self._block_coefficients:
            Ts, perm = self._constants(dtype, device)
            with torch.inference_mode(False):
                constants = {}
                for row, entries in self._block_maps.items():
                    groups: Dict[Tuple[int, int, int], List[Tuple[Tensor, Tensor, Tensor]]] = {}
                    for p, slots, where in entries:
                        start, size = self._pairs[p][:2]
                        T = Ts[p][slots]
                        groups.setdefault((T.shape[0], T.shape[1], size // T.shape[1]), []).append(
                            (T, perm[start:start + size], where.to(device)))
                    constants[row] = [(torch.stack([g[0] for g in group]).contiguous(),
                                       torch.cat([g[1] for g in group]), torch.cat([g[2] for g in group]))
                                      for group in groups.values()]
                self._block_coefficients[key] = constants
        return self._block_coefficients[key]

    def _sparse_maps(self, like: Tensor, adjoint: bool) -> Optional[Dict[int, Tensor]]:
        """Per block (by its first kernel row), its map as a sparse CSR matrix on ``like``'s dtype and device:
        ``M [n, P]`` (block rows from parameter rows, ``block_weights(W) = M @ W``) or, ``adjoint``, ``M^T [P, n]``
        (``grad_W += M^T @ grad``, added in place). Each row of ``M`` holds a slot's coefficients ``T[s, f]`` over
        the pair's frequencies ``f``: at most 7 entries (paper model, all convs: 9.5 MiB of maps, 12.6 MiB of
        adjoints with int32 indices, made on first use). None where sparse products are not used:
        :data:`SPARSE_MAPS` off, a dtype other than float32/float64, a device other than the CPU, or autograd
        recording (the gather and ``bmm`` form is differentiable; the reference double backward differentiates
        it)."""
        if (not SPARSE_MAPS or like.device.type != "cpu" or like.dtype not in _SPARSE_DTYPES
                or (like.requires_grad and torch.is_grad_enabled())):
            return None
        key = (like.dtype, like.device, adjoint)
        if key not in self._block_sparse:
            num_params = self.perm.numel()
            with torch.inference_mode(False):
                maps = {}
                for row, groups in self._block_constants(like.dtype, like.device).items():
                    entries = []
                    for T, param_rows, where in groups:  # block row (pair, s, cell) <- rows (pair, f, cell)
                        n, S, F = T.shape
                        cell = where.numel() // (n * S)
                        shape = (n, S, F, cell)
                        entries.append((where.view(n, S, 1, cell).expand(shape).reshape(-1),
                                        param_rows.view(n, 1, F, cell).expand(shape).reshape(-1),
                                        T[..., None].expand(shape).reshape(-1)))
                    block_rows, cols, values = (torch.cat(e) for e in zip(*entries))
                    size = sum(where.numel() for _, _, where in groups)
                    maps[row] = (_csr(cols, block_rows, values, (num_params, size)) if adjoint
                                 else _csr(block_rows, cols, values, (size, num_params)))
                self._block_sparse[key] = maps
        return self._block_sparse[key]

    def block_weights(self, W: Tensor, row: int) -> Tensor:
        """The kernel weights of the block starting at kernel row ``row``: ``apply(W)[rows[row:row + n]]``
        (:class:`se3t.nn.fused.WeightMap`), made from the pairs it reads, ``T[slots] @ W_pair`` each (one sparse
        product on CPU: :meth:`_sparse_maps`)."""
        sparse = self._sparse_maps(W, adjoint=False)
        if sparse is not None:
            M = sparse[row]
            # beta=0 ignores the empty tensor's contents; torch.mm(M, W) would zero a result, compute into a
            # second one and copy it over (measured on a warm buffer: 4x the time of this product alone)
            return W.new_empty(M.shape[0], W.shape[1]).addmm_(M, W, beta=0)
        groups = self._block_constants(W.dtype, W.device)[row]
        out = W.new_empty(sum(where.numel() for _, _, where in groups), W.shape[1])
        for T, param_rows, where in groups:  # T [n, S, F]; W_pair rows (f, (o, c)) -> slot rows (s, (o, c))
            part = torch.bmm(T, W.index_select(0, param_rows).view(T.shape[0], T.shape[2], -1))
            out.index_copy_(0, where, part.view(-1, W.shape[1]))
        return out

    def add_block_adjoint(self, out: Tensor, grad: Tensor, row: int) -> None:
        """``out += adjoint(G)`` for the ``G`` that is ``grad`` at the rows of the block starting at kernel row
        ``row`` and zero elsewhere: ``T[slots]^T @ grad_pair`` added at each pair's parameter rows, a few pairs at a
        time: a pair's frequencies outnumber its slots (up to 7 against 2), so its mapped gradient is larger than
        its part of ``grad`` (all pairs' at once: 1.7x the block's gradient in the paper model's largest block).
        On CPU one sparse product added into ``out`` in place (:meth:`_sparse_maps`), when their dtypes agree."""
        sparse = self._sparse_maps(grad, adjoint=True) if out.dtype == grad.dtype else None
        if sparse is not None and out.is_contiguous():
            out.addmm_(sparse[row], grad)
            return
        for T, param_rows, where in self._block_constants(grad.dtype, grad.device)[row]:
            n, S, F = T.shape
            cell = where.numel() // (n * S)  # rows (o, c) of one slot of one pair
            step = max(1, -(-n // ADJOINT_PIECES))
            for i in range(0, n, step):
                k = min(step, n - i)
                g = grad.index_select(0, where[i * S * cell:(i + k) * S * cell]).view(k, S, -1)
                out.index_add_(0, param_rows[i * F * cell:(i + k) * F * cell],
                               torch.bmm(T[i:i + k].transpose(1, 2), g).view(-1, grad.shape[1]))

    def _constants(self, dtype: torch.dtype, device: torch.device) -> Tuple[List[Tensor], Tensor]:
        """Each pair's coefficients ``T`` and :attr:`perm`, on ``device`` (made once per dtype and device)."""
        key = (dtype, device)
        if key not in self._coefficients:
            with torch.inference_mode(False):  # constants usable with autograd later
                self._coefficients[key] = ([so2_coefficients(d_in, d_out).to(device=device, dtype=dtype)
                                            for _, _, d_in, d_out in self._pairs], self.perm.to(device))
        return self._coefficients[key]

    def apply(self, W: Tensor) -> Tensor:
        """The slot weights of the last layer ``W [P, H]`` (parameter layout): pair-major, each pair's
        ``T @ W_pair`` with ``W_pair [F, (o, c, h)]``, so rows ``(pair, slot, o, c)``. The kernel makes them block by
        block (:meth:`block_weights`); this all-at-once map is their reference."""
        Ts, perm = self._constants(W.dtype, W.device)
        out = torch.empty_like(W)
        for (start, n, _, _), T in zip(self._pairs, Ts):  # pair by pair: no second W-sized temporary
            F = T.shape[0]
            torch.mm(T, W.index_select(0, perm[start:start + n]).view(F, -1), out=out[start:start + n].view(F, -1))
        return out

    def adjoint(self, grad: Tensor) -> Tensor:
        """The parameter's gradient (parameter layout) from the slot weights' (``T^T @ G`` per pair): the
        reference of :meth:`add_block_adjoint`."""
        Ts, perm = self._constants(grad.dtype, grad.device)
        out = torch.empty_like(grad)
        for (start, n, _, _), T in zip(self._pairs, Ts):  # pair by pair: no second W-sized temporary
            F = T.shape[0]
            out.index_copy_(0, perm[start:start + n], torch.mm(T.t(), grad[start:start + n].view(F, -1)).view(n, -1))
        return out

    def messages(self, h: Tensor, W: Tensor, rows: Tensor, gather_runs: Tensor,
                 xs: Sequence[Tensor], x_index: Optional[Tensor], basis: Basis, chunk: Optional[int],
                 blockwise: bool = False) -> Dict[int, Tensor]:
        """``{d_out: [E, C_out, 2d_out+1]}``: this MLP's messages, computed in the edge frame and rotated back.
        ``h [E, H]``: the MLP's hidden features; ``W``: its last layer; ``rows``, ``gather_runs``: :attr:`rows`
        and :attr:`gather_runs` on the device;
        ``xs``/``x_index``: as for :func:`se3t.nn.fused.fused_conv`; ``basis``: with frames
        (:meth:`se3t.basis.Basis.edge_frames` not ``None``); ``chunk``, ``blockwise``: as for ``fused_conv``."""
        bts = [basis.frame_rows(d, m) for d, m in self.part_orders]
        # every block's [E, K, c_out] side by side in one tensor (no per-block copies)
        flat, = fused_conv(h, W, rows, self.specs, xs, bts, chunk, x_index=x_index, weight_map=self,
                           single_output=True, blockwise=blockwise)
        # the zero run and the run view here, not inside _GatherRotate: torch.compile (torch 2.13, inference)
        # traced the shape of a 2-D input there wrongly; explicit sizes, no -1: an empty edge set has E = 0
        E = flat.shape[0]
        if self.needs_zero_column:
            flat = torch.cat([flat, flat.new_zeros(E, self.run)], dim=1)
        degrees = [b.d_out for b in self.blocks]
        back = [basis.edge_frames().back[d] for d in degrees]
        outs = _GatherRotate.apply(flat.view(E, flat.shape[1] // self.run, self.run), gather_runs,
                                   tuple(self.out_channels[d] for d in degrees), basis.frames_orthogonal, *back)
        return dict(zip(degrees, outs))


def _largest_first(back: Sequence[Tensor]) -> List[int]:
    """The degrees' positions, largest ``2d+1`` first: each degree's temporaries (its gathered part, its rotated
    gradient) are made while the fewest other outputs exist, and the largest ones first."""
    return sorted(range(len(back)), key=lambda i: -back[i].shape[-1])


class _GatherRotate(torch.autograd.Function):
    """``out_d = part_d @ back_d`` for each output degree ``d``, ``part_d [E, C_d, L_d]`` gathered from the blocks'
    outputs (:meth:`EdgeFramePlan._build_gather_index`) in whole runs of channels (``flat_runs [E, runs, run]``):
    a column-wise gather of 2-byte values was 5x slower (measured on 2-core Zen 4, bf16, 3,744 edges: 3.9 ms
    against 0.8 ms per call). Parts are gathered component-major, ``[E, L, C]``, and rotated as
    ``out_d^T = back_d^T @ part_d^T``: this orientation's bmm was 3-4x faster in fp32 for ``L`` = 5, 7 (one
    64-byte row per output instead of one of ``L`` values), and transposing its output costs less than that.

    One degree at a time, largest first, in both directions: forward gathers each degree's runs on their own (a
    contiguous part, freed after its rotation), backward copies each rotated gradient into the runs it came from
    (``index_copy_``: every block output is read exactly once; the zero run's gradient, written by several
    components, is unused). Gathering all runs at once, and concatenating all gradients before one inverse gather,
    made two more per-edge tensors of the messages' size at once (inference peak of the paper model at batch 100:
    34.5 MiB, 7.3 MiB of it the gathered runs). Nothing per edge is saved but the rotations ``back_d``, unless
    they require gradients (forces): ``grad back_d = part_d @ g_d`` with ``part_d`` made again, from the outputs
    where the rotations are orthogonal (``orthogonal``: ``part_d = back_d @ out_d^T``; outputs the next layer keeps
    anyway; on padding edges ``back_d`` is zero and so is this gradient, which the frames' mask discards there), else
    gathered again from the blocks' outputs, which are then kept."""

    @staticmethod
    def forward(ctx, flat_runs: Tensor, gather_runs: Tensor, channels: Tuple[int, ...], orthogonal: bool,
                *back: Tensor):
        E, num_runs, run = flat_runs.shape
        outs: List[Optional[Tensor]] = [None] * len(channels)
        spans = list(itertools.accumulate((C * R.shape[-1] // run for C, R in zip(channels, back)), initial=0))
        for i in _largest_first(back):
            C, R = channels[i], back[i]
            part_t = flat_runs.index_select(1, gather_runs[spans[i]:spans[i + 1]]).view(E, R.shape[-1], C)
            # contiguous [E, C, L] again: consumers of strided messages were slower by more than this copy (the
            # attention's per-head weighting of the values: 3.5x)
            outs[i] = torch.bmm(R.transpose(1, 2).to(part_t.dtype), part_t).transpose(1, 2).contiguous()
            part_t = None
        with_back = any(ctx.needs_input_grad[4:])
        ctx.from_outputs = with_back and orthogonal
        ctx.save_for_backward(gather_runs, flat_runs if with_back and not orthogonal else None, *back,
                              *(outs if ctx.from_outputs else ()))
        ctx.num_runs, ctx.run, ctx.spans, ctx.channels = num_runs, run, spans, channels
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        gather_runs, flat_runs, *saved = ctx.saved_tensors
        back, outs = saved[:len(ctx.channels)], saved[len(ctx.channels):]
        E, spans = back[0].shape[0], ctx.spans
        grad_back: List[Optional[Tensor]] = [None] * len(back)
        like = next(g for g in grads if g is not None)
        # Every run is written below when every degree has a gradient (each block output is read exactly once, and
        # the zero run exists only because some component reads it): no zero fill then.
        if all(g is not None for g in grads):
            grad_runs = like.new_empty(E, ctx.num_runs, ctx.run)
        else:
            grad_runs = like.new_zeros(E, ctx.num_runs, ctx.run)
        for i in _largest_first(back):
            if grads[i] is not None:  # grad part_d^T = back_d @ g_d^T, copied into the runs it was gathered from
                part = torch.bmm(back[i].to(grads[i].dtype), grads[i].transpose(1, 2))
                runs = gather_runs[spans[i]:spans[i + 1]]  # (explicit sizes: E may be 0)
                grad_runs.index_copy_(1, runs, part.view(E, runs.shape[0], ctx.run))
                part = None
                if ctx.needs_input_grad[4 + i]:  # out_d = part_t^T @ back_d: grad back_d = part_t @ g_d
                    if ctx.from_outputs:
                        part_t = torch.bmm(back[i].to(outs[i].dtype), outs[i].transpose(1, 2))
                    else:
                        part_t = flat_runs.index_select(1, runs).view(E, back[i].shape[-1], ctx.channels[i])
                    grad_back[i] = torch.bmm(part_t.to(grads[i].dtype), grads[i]).to(back[i].dtype)
        return (grad_runs, None, None, None, *grad_back)
