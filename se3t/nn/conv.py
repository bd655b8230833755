"""ConvSE3: the tensor-field-network convolution with selectable radial parametrization and fusion level.

Per edge and degree pair ``(d_in, d_out)``::

    out[e, o, k] = sum_{i, f, l} R[e, o, i, f] * x[src[e], i, l] * B[e, l, f, k]

executed as two batched matmuls, ``tmp = x @ B`` then ``out = R @ tmp``. Two independent choices:

* ``radial`` - how many radial MLPs the conv owns (changes the parameters):
  ``"conv"`` one shared MLP, ``"output_degree"`` one per output degree, ``"input_degree"`` one per input
  degree, ``"pair"`` one per ``(d_in, d_out)``.
* ``fuse_level`` - how the contractions are grouped (never changes the outputs beyond rounding):
  ``NONE`` two matmuls per pair (the reference path); ``PARTIAL`` one ``R @ tmp`` per output degree over all
  input degrees; ``FULL`` ``x @ B``, the radial MLP's last layer and the contraction in one kernel, edge chunk
  by edge chunk, so neither the per-edge kernel weights ``R`` nor ``tmp`` are ever stored
  (:mod:`se3t.nn.fused`); ``EDGE_FRAME`` the same kernel in each edge's frame (:mod:`se3t.edge_frame`): the
  inputs are rotated so the edge points along the polar axis, where the kernel only couples components
  ``±m``, and the outputs rotated back: no basis at all and about a third of the contraction's FLOPs. Edges
  without a frame (zero-length) take the ``FULL`` path; position gradients (forces) flow through the frames.
  A level is "the most fusion allowed": parts whose radial weights live in different MLPs are contracted
  separately.

Layout of a radial MLP's output, per edge: for each of its output degrees (ascending), a row-major block
``[C_out, K_in]`` where ``K_in`` runs over its input degrees (ascending), then input channels, then
frequencies ``f``. So the weights of one output degree are a view ``[E, C_out, K_in]``, ready for one matmul.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..basis import Basis, kernel_projection, num_frequencies
from ..fiber import Features, Fiber, degree_to_dim
from ..scatter import scatter_sum
from .edge_frame_conv import EdgeFramePlan
from .fused import BlockSpec, PartSpec, fused_conv
from .linear import channel_mix
from .radial import RadialMLP

__all__ = ["ConvSE3", "FuseLevel", "RADIAL_SHARING"]

RADIAL_SHARING = ("conv", "output_degree", "input_degree", "pair")


class FuseLevel(enum.IntEnum):
    """The most fusion a layer may use when grouping its contractions (see :mod:`se3t.nn.conv`)."""

    NONE = 0
    PARTIAL = 1
    FULL = 2
    EDGE_FRAME = 3

    @classmethod
    def coerce(cls, value: Union["FuseLevel", str, int]) -> "FuseLevel":
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise ValueError(f"unknown fuse level {value!r}; choose one of {[m.name for m in cls]}") from None
        return cls(value)


@dataclass(frozen=True)
class _Block:
    """Where the radial weights of one output degree (restricted to some input degrees) live."""

    group: int            # index of the radial MLP
    offset: int           # first column in that MLP's output
    d_out: int
    d_ins: Tuple[int, ...]
    k_in: int             # sum over d_ins of C_in * F
    in_offsets: Tuple[int, ...]  # column of each d_in inside K_in


class ConvSE3(nn.Module):
    """Equivariant graph convolution from ``fiber_in`` node features to ``fiber_out``.

    Args:
        fiber_in, fiber_out: node fibers.
        fiber_edge: edge features; degree 0 feeds the radial MLP (with the edge length appended), degrees > 0
            are concatenated to the source node features of that degree.
        pool: sum the messages into the destination nodes (``True``) or return per-edge outputs.
        use_layer_norm: LayerNorm inside the radial MLPs.
        self_interaction: add ``W_self[d] @ x[d]`` of the destination node for output degrees present in the input.
        fuse_level: most fusion allowed (:class:`FuseLevel`).
        low_memory: recompute the radial weights and contractions in backward (non-reentrant checkpointing).
        radial: radial parametrization, one of :data:`RADIAL_SHARING`.
        reference_parity: add the self-interaction on every edge before the sum, as NVIDIA's code does
            (scaling it by the in-degree). Default: once per node, after the sum.
        radial_hidden: width of the radial MLP's hidden layers (32 in the reference).

    Shapes (forward): ``node_feats[d]: [N, C_in_d, 2d+1]``, ``edge_feats[0]: [E, C_e0, 1]`` and
    ``edge_feats[d]: [E, C_ed, 2d+1]``, ``radial_in: [E, C_e0 + 1]`` (edge scalars with the length appended),
    ``edge_index: [2, E]`` -> ``[N, C_out_d, 2d+1]`` per output degree (``[E, ...]`` when ``pool=False``).
    """

    def __init__(self, fiber_in: Fiber, fiber_out: Fiber, fiber_edge: Fiber = Fiber({}), pool: bool = True,
                 use_layer_norm: bool = False, self_interaction: bool = False,
                 fuse_level: Union[FuseLevel, str, int] = FuseLevel.EDGE_FRAME, low_memory: bool = False,
                 radial: str = "conv", reference_parity: bool = False, radial_hidden: int = 32):
        super().__init__()
        if radial not in RADIAL_SHARING:
            raise ValueError(f"radial must be one of {RADIAL_SHARING}, got {radial!r}")
        if len(fiber_in) == 0 or len(fiber_out) == 0:
            raise ValueError(f"ConvSE3 needs non-empty fibers, got fiber_in={fiber_in}, fiber_out={fiber_out}")
        self.fiber_in, self.fiber_out, self.fiber_edge = fiber_in, fiber_out, fiber_edge
        self.pool, self.self_interaction, self.low_memory = pool, self_interaction, low_memory
        self.fuse_level = FuseLevel.coerce(fuse_level)
        self.radial_sharing, self.reference_parity = radial, reference_parity
        self.max_degree = max(fiber_in.max_degree, fiber_out.max_degree)
        #: channels entering each input degree: node channels plus edge channels of that degree (d > 0)
        self.in_channels = {d: c + (fiber_edge[d] if d > 0 else 0) for d, c in fiber_in}
        self.edge_dim = fiber_edge[0] + 1
        #: most edges per group of the fused kernel (FULL, EDGE_FRAME); None: the device's default
        self.chunk_size: Optional[int] = None
        #: the fused kernel runs its output-degree blocks one at a time (``fused_conv(blockwise=True)``): less
        #: memory per call, a little more time; set by ``low_memory`` here and by the model's ``low_memory``
        self.blockwise_kernel = low_memory

        groups = self._group_pairs(radial)
        self.radial = nn.ModuleList()
        self._blocks: Dict[int, List[_Block]] = {d: [] for d in fiber_out.degrees}
        for g, pairs in enumerate(groups):
            offset = 0
            for d_out in sorted({p[1] for p in pairs}):
                d_ins = tuple(sorted(p[0] for p in pairs if p[1] == d_out))
                widths = [self.in_channels[d] * num_frequencies(d, d_out) for d in d_ins]
                in_offsets = tuple(sum(widths[:i]) for i in range(len(widths)))
                block = _Block(g, offset, d_out, d_ins, sum(widths), in_offsets)
                self._blocks[d_out].append(block)
                offset += fiber_out[d_out] * block.k_in
            self.radial.append(RadialMLP(self.edge_dim, offset, radial_hidden, use_layer_norm))
        #: per radial MLP: its blocks (output degrees ascending) and the fused kernel's specs for them
        self._group_blocks = [[b for d in fiber_out.degrees for b in self._blocks[d] if b.group == g]
                              for g in range(len(groups))]
        self._fused_specs = [self._build_fused_specs(g) for g in range(len(groups))]
        self._frame_plans = [EdgeFramePlan(self._group_blocks[g], fiber_in.degrees, self.in_channels, dict(fiber_out))
                             for g in range(len(groups))]
        for g, plan in enumerate(self._frame_plans):
            self.register_buffer(f"_frame_rows_{g}", plan.rows, persistent=False)
            self.register_buffer(f"_frame_gather_{g}", plan.gather_runs, persistent=False)

        if self_interaction:
            self.to_kernel_self = nn.ParameterDict({
                str(d): nn.Parameter(torch.randn(c, fiber_in[d]) / math.sqrt(fiber_in[d]))
                for d, c in fiber_out if d in fiber_in
            })

    def _build_fused_specs(self, g: int) -> Tuple[BlockSpec, ...]:
        """The fused kernel's block specs for radial MLP ``g``, and the permutation (a buffer) that reorders the
        rows of its last layer from the parameter layout ``(c_out, d_in, c, f)`` to the kernel's ``(c_out, d_in,
        f, c)``."""
        degrees = self.fiber_in.degrees
        specs, rows, bt_index = [], [], 0
        for b in self._group_blocks[g]:
            c_out, parts = self.fiber_out[b.d_out], []
            for d, col in zip(b.d_ins, b.in_offsets):
                C, F = self.in_channels[d], num_frequencies(d, b.d_out)
                parts.append(PartSpec(degrees.index(d), bt_index, col, F, C))
                bt_index += 1
            specs.append(BlockSpec(b.offset, c_out, degree_to_dim(b.d_out), b.k_in, tuple(parts)))
            # kernel row (o, col + f*C + c) <- parameter row (o, col + c*F + f)
            cols = torch.cat([p.col + torch.arange(p.C * p.F).view(p.C, p.F).t().reshape(-1) for p in parts])
            rows.append((b.offset + torch.arange(c_out)[:, None] * b.k_in + cols[None, :]).reshape(-1))
        self.register_buffer(f"_fused_rows_{g}", torch.cat(rows), persistent=False)
        return tuple(specs)

    def _group_pairs(self, radial: str) -> List[List[Tuple[int, int]]]:
        d_ins, d_outs = self.fiber_in.degrees, self.fiber_out.degrees
        pairs = [(di, do) for do in d_outs for di in d_ins]
        if radial == "conv":
            return [pairs]
        if radial == "output_degree":
            return [[p for p in pairs if p[1] == do] for do in d_outs]
        if radial == "input_degree":
            return [[p for p in pairs if p[0] == di] for di in d_ins]
        return [[p] for p in pairs]

    # ----------------------------------------------------------------------------------------------------------
    def radial_weights(self, radial_out: Sequence[Tensor], block: _Block) -> Tensor:
        """The block's radial weights as a view ``[E, C_out, K_in]``."""
        c_out = self.fiber_out[block.d_out]
        r = radial_out[block.group]
        return r[:, block.offset: block.offset + c_out * block.k_in].view(r.shape[0], c_out, block.k_in)

    def _source_features(self, node_feats: Features, edge_feats: Optional[Features], src: Tensor) -> Dict[int, Tensor]:
        out = {}
        for d in self.fiber_in.degrees:
            x = node_feats[d].index_select(0, src)
            if d > 0 and self.fiber_edge[d]:
                x = torch.cat([x, edge_feats[d]], dim=1)
            out[d] = x
        return out

    def _pair_tmp(self, x: Tensor, basis: Basis, d_in: int, d_out: int) -> Tensor:
        """``x @ B`` for one pair: ``[E, C_in * F, 2d_out+1]``."""
        E, C = x.shape[0], x.shape[1]
        t = torch.bmm(x, basis.pair_matrix(d_in, d_out).to(x.dtype))
        return t.view(E, C * num_frequencies(d_in, d_out), degree_to_dim(d_out))

    def edge_messages(self, node_feats: Features, edge_feats: Optional[Features], radial_in: Tensor,
                      src: Tensor, basis: Basis) -> Features:
        """Per-edge outputs ``{d_out: [E, C_out, 2d_out+1]}`` (before self-interaction and pooling)."""
        level = self.fuse_level
        out: Features = {}
        sh = basis.harmonics
        if level == FuseLevel.EDGE_FRAME:
            if sh is not None and basis.edge_frames() is not None:  # (frames carry position gradients: forces)
                return self._edge_frame_messages(node_feats, edge_feats, radial_in, src, basis)
            level = FuseLevel.FULL  # no frame (zero-length edges, block bases): the basis path
        if level == FuseLevel.FULL:
            # x @ B, the radial last layer and the contraction in one chunked kernel (see se3t.nn.fused): only
            # x, the bases (as harmonics when the basis has them) and the radial hidden features are kept for
            # backward. Without edge features of degree > 0, x is the source nodes' features: the kernel gathers
            # them per chunk (no edge-level copy).
            xs, x_index = self._kernel_inputs(node_feats, edge_feats, src)
            for g, mlp in enumerate(self.radial):
                blocks, bts = self._fused_specs[g], []
                for b in self._group_blocks[g]:
                    if sh is not None:  # the block's bases are made per edge group from the harmonics
                        bts.append(kernel_projection(b.d_out, b.d_ins, sh.dtype, sh.device))
                    else:
                        bts += [basis.kernel_major(d, b.d_out) for d in b.d_ins]
                outs = fused_conv(mlp.hidden_features(radial_in), mlp.last.weight, getattr(self, f"_fused_rows_{g}"),
                                  blocks, xs, bts, self.chunk_size, x_index=x_index, sh=sh,
                                  blockwise=self.blockwise_kernel)
                for b, o in zip(self._group_blocks[g], outs):
                    o = o.transpose(1, 2)  # [E, C_out, 2d_out+1]
                    out[b.d_out] = o if b.d_out not in out else out[b.d_out] + o
            return out

        x = self._source_features(node_feats, edge_feats, src)

        def tmp_of(d_in: int, d_out: int) -> Tensor:
            return self._pair_tmp(x[d_in], basis, d_in, d_out)

        def block_tmp(block: _Block) -> Tensor:
            if len(block.d_ins) == 1:
                return tmp_of(block.d_ins[0], block.d_out)
            return torch.cat([tmp_of(d, block.d_out) for d in block.d_ins], dim=1)

        radial_out = [mlp(radial_in) for mlp in self.radial]
        for d_out in self.fiber_out.degrees:
            acc: Optional[Tensor] = None
            for block in self._blocks[d_out]:
                R = self.radial_weights(radial_out, block)
                if level == FuseLevel.NONE:
                    parts = [(R[:, :, a: a + self.in_channels[d] * num_frequencies(d, d_out)], tmp_of(d, d_out))
                             for d, a in zip(block.d_ins, block.in_offsets)]
                else:
                    parts = [(R, block_tmp(block))]
                for r, t in parts:
                    acc = torch.bmm(r, t) if acc is None else torch.baddbmm(acc, r, t)
            out[d_out] = acc
        return out

    def _kernel_inputs(self, node_feats: Features, edge_feats: Optional[Features], src: Tensor
                       ) -> Tuple[List[Tensor], Optional[Tensor]]:
        """The fused kernel's inputs per input degree: the node features with ``src`` as ``x_index`` (gathered
        chunk by chunk, no edge-level copy), or edge-level copies when edge features of degree > 0 join them."""
        if any(d > 0 and self.fiber_edge[d] for d in self.fiber_in.degrees):
            x, x_index = self._source_features(node_feats, edge_feats, src), None
        else:
            x, x_index = node_feats, src
        return [x[d] for d in self.fiber_in.degrees], x_index

    def _edge_frame_messages(self, node_feats: Features, edge_feats: Optional[Features], radial_in: Tensor,
                             src: Tensor, basis: Basis) -> Features:
        """:meth:`edge_messages` in the edge frame (``FuseLevel.EDGE_FRAME``, see :mod:`se3t.nn.edge_frame_conv`)."""
        xs, x_index = self._kernel_inputs(node_feats, edge_feats, src)
        out: Features = {}
        for g, (mlp, plan) in enumerate(zip(self.radial, self._frame_plans)):
            msgs = plan.messages(mlp.hidden_features(radial_in), mlp.last.weight, getattr(self, f"_frame_rows_{g}"),
                                 getattr(self, f"_frame_gather_{g}"), xs, x_index, basis, self.chunk_size,
                                 self.blockwise_kernel)
            for d, o in msgs.items():
                out[d] = o if d not in out else out[d] + o
        return out

    def forward(self, node_feats: Features, edge_feats: Optional[Features], radial_in: Tensor,
                edge_index: Tensor, basis: Basis, dst_feats: Optional[Features] = None) -> Features:
        """``dst_feats``: the destination nodes' features when they are not ``node_feats`` (a block of nodes,
        :func:`se3t.graph.destination_blocks`): ``edge_index[1]`` then indexes ``dst_feats``, the sum and the
        self-interaction are over its nodes, and sources still come from ``node_feats``."""
        if basis.max_degree < self.max_degree:
            raise ValueError(f"basis was built for max_degree={basis.max_degree}; this conv needs {self.max_degree}")
        src, dst = edge_index[0], edge_index[1]
        if self.low_memory and torch.is_grad_enabled():
            msgs = checkpoint(self.edge_messages, node_feats, edge_feats, radial_in, src, basis, use_reentrant=False)
        else:
            msgs = self.edge_messages(node_feats, edge_feats, radial_in, src, basis)
        dst_feats = node_feats if dst_feats is None else dst_feats
        num_nodes = next(iter(dst_feats.values())).shape[0]
        out: Features = {}
        for d_out, m in msgs.items():
            has_self = self.self_interaction and str(d_out) in self.to_kernel_self
            per_edge_self = has_self and (self.reference_parity or not self.pool)
            if per_edge_self:
                m = m + channel_mix(self.to_kernel_self[str(d_out)], dst_feats[d_out].index_select(0, dst))
            if self.pool:
                m = scatter_sum(m, dst, num_nodes, check=False)
                if has_self and not per_edge_self:
                    m = m + channel_mix(self.to_kernel_self[str(d_out)], dst_feats[d_out])
            out[d_out] = m
        return out

    def extra_repr(self) -> str:
        return (f"fiber_in={self.fiber_in}, fiber_out={self.fiber_out}, fiber_edge={self.fiber_edge}, "
                f"pool={self.pool}, radial={self.radial_sharing!r}, fuse_level={self.fuse_level.name}, "
                f"self_interaction={self.self_interaction}, low_memory={self.low_memory}")
