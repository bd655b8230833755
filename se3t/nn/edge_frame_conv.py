"""A radial MLP's part of a :class:`~se3t.nn.conv.ConvSE3` executed in the edge frame (``FuseLevel.EDGE_FRAME``).

See :mod:`se3t.edge_frame` for the math. Per order ``m`` the plan makes one block of the fused kernel
(:mod:`se3t.nn.fused`): output rows ``k`` = the components ``+m, -m`` (one row for ``m = 0``), output
channels ``(d_out, c_out)`` over the MLP's output degrees ``>= m``, input columns ``(d_in, slot, c)`` over its
input degrees ``>= m``; the kernel's per-edge "basis" of an input degree is :func:`se3t.edge_frame.frame_rows`
(the frame rotation's rows, ``[E, 4, 2d_in+1]``) and its weights are the radial MLP's last layer mapped
from frequencies to slots (:meth:`EdgeFramePlan.apply`, inside the kernel in forward and again in backward:
never stored). The plan returns each output
degree in the frame, ``out' [E, C_out, 2d_out+1]``; the conv rotates back.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..basis import Basis, num_frequencies
from ..edge_frame import num_slots, so2_coefficients
from ..fiber import degree_to_dim
from .fused import BlockSpec, PartSpec, fused_conv

__all__ = ["EdgeFramePlan"]


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
            # kernel row ((d_out, o), (d_in, slot, c)) <- row (o, d_in, c, slot) of the slot weights, which keep
            # the parameter layout with frequencies replaced by slots
            for b in outs:
                cols = []
                for d in ins:
                    F, C = num_frequencies(d, b.d_out), in_channels[d]
                    start = b.in_offsets[b.d_ins.index(d)]
                    slots = torch.tensor([_slot_index(m, s) for s in range(S)])
                    cols.append((start + torch.arange(C)[None, :] * F + slots[:, None]).reshape(-1))
                cols = torch.cat(cols)
                rows.append((b.offset + torch.arange(out_channels[b.d_out])[:, None] * b.k_in + cols).reshape(-1))
        self.specs = tuple(specs)
        self.rows = torch.cat(rows)
        self._build_gather_index()
        self._coefficients: Dict[Tuple[torch.dtype, torch.device], List[List[Tensor]]] = {}

    def _build_gather_index(self) -> None:
        """Where each output value ``(d_out, c, component)`` (blocks' degrees in order) sits among the blocks'
        outputs flattened side by side (``[K, c_out]`` per block); components of orders above every input degree
        read an appended zero column."""
        starts, col = [], 0
        for spec in self.specs:
            starts.append(col)
            col += spec.K * spec.c_out
        zero_column, index = col, []
        for b in self.blocks:
            C, L = self.out_channels[b.d_out], degree_to_dim(b.d_out)
            where = torch.full((C, L), zero_column, dtype=torch.long)
            for m in range(min(b.d_out, len(self.specs) - 1) + 1):
                outputs, spec = self.block_outputs[m], self.specs[m]
                channels = sum(self.out_channels[d] for d in outputs[:outputs.index(b.d_out)]) + torch.arange(C)
                where[:, b.d_out + m] = starts[m] + channels  # row k = 0: component +m
                if m > 0:
                    where[:, b.d_out - m] = starts[m] + spec.c_out + channels  # row k = 1: component -m
            index.append(where.reshape(-1))
        self.gather_index = torch.cat(index)
        self.needs_zero_column = bool((self.gather_index == zero_column).any())

    def _coefficients_for(self, dtype: torch.dtype, device: torch.device) -> List[List[Tensor]]:
        key = (dtype, device)
        if key not in self._coefficients:
            with torch.inference_mode(False):  # constants usable with autograd later
                self._coefficients[key] = [[so2_coefficients(d, b.d_out).to(device=device, dtype=dtype)
                                            for d in b.d_ins] for b in self.blocks]
        return self._coefficients[key]

    def _map(self, W: Tensor, equation: str) -> Tensor:
        """Each pair's rows of ``W [P, H]`` (parameter layout) mapped by its coefficients along the frequency /
        slot axis (``equation``: the einsum of ``T`` with a ``[C_out, C_in, F, H]`` part)."""
        coefficients = self._coefficients_for(W.dtype, W.device)
        H, out = W.shape[1], []
        for b, Ts in zip(self.blocks, coefficients):
            C_out = self.out_channels[b.d_out]
            Wb = W[b.offset:b.offset + C_out * b.k_in].view(C_out, b.k_in, H)
            ends = b.in_offsets[1:] + (b.k_in,)
            for start, end, T in zip(b.in_offsets, ends, Ts):
                part = Wb[:, start:end].reshape(C_out, (end - start) // T.shape[0], T.shape[0], H)
                out.append(torch.einsum(equation, T, part).reshape(C_out, end - start, H))
        rows = []  # back to the parameter layout: per block, its parts side by side
        i = 0
        for b in self.blocks:
            n = len(b.d_ins)
            rows.append(torch.cat(out[i:i + n], dim=1).reshape(-1, H) if n > 1 else out[i].reshape(-1, H))
            i += n
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    def apply(self, W: Tensor) -> Tensor:
        """The slot weights (:class:`se3t.nn.fused.WeightMap`): ``W [P, H]`` with each pair's frequencies ``f``
        replaced by its edge-frame slots ``s``, ``T @ R`` (same shape and layout)."""
        return self._map(W, "sf,ocfh->ocsh")

    def adjoint(self, grad: Tensor) -> Tensor:
        """The parameter's gradient from the slot weights' (``T^T @ G``)."""
        return self._map(grad, "sf,ocsh->ocfh")

    def messages(self, h: Tensor, W: Tensor, rows: Tensor, gather_index: Tensor, xs: Sequence[Tensor],
                 x_index: Optional[Tensor], basis: Basis, chunk: Optional[int]) -> Dict[int, Tensor]:
        """``{d_out: out' [E, C_out, 2d_out+1]}``: this MLP's messages in the edge frame (rotate back with
        ``basis.edge_frames().back``). ``h [E, H]``: the MLP's hidden features; ``W``: its last layer;
        ``rows``, ``gather_index``: :attr:`rows` and :attr:`gather_index` on the device; ``xs``/``x_index``: as for
        :func:`se3t.nn.fused.fused_conv`."""
        bts = [basis.frame_rows(d, m) for d, m in self.part_orders]
        outs = fused_conv(h, W, rows, self.specs, xs, bts, chunk, x_index=x_index, weight_map=self)
        # every block's [E, K, c_out] side by side, then one gather into (d_out, c, component) order: its backward
        # is one scatter, not one zero-filled block-sized buffer per slice
        flat = torch.cat([o.reshape(o.shape[0], -1) for o in outs] + ([outs[0].new_zeros(outs[0].shape[0], 1)]
                                                                       if self.needs_zero_column else []), dim=1)
        gathered = flat.index_select(1, gather_index)
        result, col = {}, 0
        for b in self.blocks:
            C, L = self.out_channels[b.d_out], degree_to_dim(b.d_out)
            result[b.d_out] = gathered[:, col:col + C * L].view(-1, C, L)
            col += C * L
        return result
