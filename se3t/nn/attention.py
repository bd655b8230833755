"""AttentionBlockSE3: equivariant multi-head graph attention (keys and values from one ConvSE3)."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..basis import Basis
from ..fiber import Features, Fiber
from ..scatter import edge_softmax, scatter_sum
from .conv import ConvSE3, FuseLevel
from .linear import LinearSE3, channel_mix

__all__ = ["AttentionBlockSE3"]


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """``[M, C, 2d+1] -> [M, H, C/H, 2d+1]`` (head ``h`` takes channel chunk ``h``): always a view, whatever the
    strides (the conv's outputs are transposed views of component-major tensors)."""
    return x.unflatten(1, (num_heads, x.shape[1] // num_heads))


def _edge_logits(dst: Tensor, keys, queries) -> Tensor:
    """``sum_d (k_d * q_d[dst]).sum((-2, -1))`` -> ``[E, H]``, summed over all degrees in at least float32 and
    rounded once (per-degree sums rounded to bf16 and then added would lose bits under autocast)."""
    acc = torch.promote_types(keys[0].dtype, torch.float32)
    logits = None
    for k, q in zip(keys, queries):
        part = (k * q.index_select(0, dst)).sum((-2, -1), dtype=acc)
        logits = part if logits is None else logits + part
    return logits.to(keys[0].dtype)


def _times_rows(g: Tensor, q: Tensor, dst: Tensor) -> Tensor:
    """``g * q[dst]``, scaled in place in the gathered copy when that keeps the dtype (one edge-level tensor at
    a time instead of two, at the attention backward's memory peak), out of place under double backward."""
    rows = q.index_select(0, dst)
    if torch.is_grad_enabled() or torch.result_type(g, rows) != rows.dtype:
        return g * rows
    return rows.mul_(g)


class _SplitChannels(torch.autograd.Function):
    """``(x[:, :c], x[:, c:])`` as views of ``x [M, C, L]``. Backward makes ``x``'s gradient as one concatenation
    of the two; autograd's slices would each zero-fill an ``x``-sized gradient and add them (the attention
    backward's memory peak held one such tensor per degree, ~29 MiB at 400 molecules)."""

    @staticmethod
    def forward(ctx, x: Tensor, c: int):
        ctx.c, ctx.shape = c, x.shape
        return x[:, :c], x[:, c:]

    @staticmethod
    def backward(ctx, grad_a: Optional[Tensor], grad_b: Optional[Tensor]):
        M, C, L = ctx.shape
        ref = grad_a if grad_a is not None else grad_b
        if grad_a is None:
            grad_a = ref.new_zeros(M, ctx.c, L)
        if grad_b is None:
            grad_b = ref.new_zeros(M, C - ctx.c, L)
        return torch.cat([grad_a, grad_b], dim=1), None


class _EdgeDot(torch.autograd.Function):
    """``sum_d (k_d * q_d[dst]).sum((-2, -1))``: ``k_d [E, H, D_d, 2d+1]``, ``q_d [N, H, D_d, 2d+1]`` -> ``[E, H]``.

    Keeps for backward the keys as given (views of the conv's output, which the values keep anyway) and the
    node-level queries, instead of the concatenated copies and the edge-level ``q[dst]`` plain autograd would
    keep. The backward is differentiable (double backward for forces). Call as ``apply(dst, *ks, *qs)``."""

    @staticmethod
    def forward(ctx, dst: Tensor, *kq: Tensor) -> Tensor:
        ctx.save_for_backward(dst, *kq)
        n = len(kq) // 2
        return _edge_logits(dst, kq[:n], kq[n:])

    @staticmethod
    def backward(ctx, grad: Tensor):
        dst, *kq = ctx.saved_tensors
        n = len(kq) // 2
        g = grad[..., None, None]
        grad_k = [_times_rows(g, q, dst) if need else None for q, need in zip(kq[n:], ctx.needs_input_grad[1:1 + n])]
        grad_q = [scatter_sum(g * k, dst, q.shape[0], check=False) if need else None
                  for k, q, need in zip(kq[:n], kq[n:], ctx.needs_input_grad[1 + n:])]
        return (None, *grad_k, *grad_q)


class AttentionBlockSE3(nn.Module):
    """Attention block: keys/values by a ConvSE3 (``pool=False``), queries by a LinearSE3 on the nodes,
    edge softmax per head over each node's incoming edges, skip connection by concatenation, projection.

    value fiber = ``fiber_out // channels_div``; key/query fiber = value-fiber degrees that are also in
    ``fiber_in``. The conv's output channels are ``[value | key]`` per degree (value first).
    ``logits[e, h] = <key[e, h], query[dst[e], h]> / sqrt(key_fiber.num_features)``.

    Shapes: ``node_feats[d]: [N, C_in_d, 2d+1] -> [N, C_out_d, 2d+1]`` for every degree of ``fiber_out``.
    """

    def __init__(self, fiber_in: Fiber, fiber_out: Fiber, fiber_edge: Optional[Fiber] = None, num_heads: int = 4,
                 channels_div: int = 2, use_layer_norm: bool = False,
                 fuse_level: Union[FuseLevel, str, int] = FuseLevel.EDGE_FRAME, low_memory: bool = False,
                 radial: str = "conv", radial_hidden: int = 32):
        super().__init__()
        fiber_edge = fiber_edge if fiber_edge is not None else Fiber({})
        self.fiber_in, self.fiber_out, self.num_heads = fiber_in, fiber_out, num_heads
        self.value_fiber = fiber_out // channels_div
        if self.value_fiber.degrees != fiber_out.degrees:
            raise ValueError(f"channels_div={channels_div} leaves some degree of {fiber_out} with no channels")
        self.key_fiber = self.value_fiber.restrict(fiber_in.degrees)
        if len(self.key_fiber) == 0:
            raise ValueError(f"fiber_in {fiber_in} shares no degree with fiber_out {fiber_out}: no keys/queries")
        for d, c in self.value_fiber:
            if c % num_heads:
                raise ValueError(f"value channels of degree {d} ({c} = {fiber_out[d]} // {channels_div}) are not "
                                 f"divisible by num_heads={num_heads}")
        self.to_key_value = ConvSE3(fiber_in, self.value_fiber + self.key_fiber, fiber_edge, pool=False,
                                    use_layer_norm=use_layer_norm, fuse_level=fuse_level, low_memory=low_memory,
                                    radial=radial, radial_hidden=radial_hidden)
        self.to_query = LinearSE3(fiber_in, self.key_fiber)
        self.project = LinearSE3(Fiber({d: c + fiber_in[d] for d, c in self.value_fiber}), fiber_out)
        self.scale = 1.0 / math.sqrt(self.key_fiber.num_features)

    def forward(self, node_feats: Features, edge_feats: Optional[Features], radial_in: Tensor,
                edge_index: Tensor, basis: Basis, dst_feats: Optional[Features] = None) -> Features:
        """``dst_feats``: the destination nodes' features when they are not ``node_feats`` (a block of nodes,
        :func:`se3t.graph.destination_blocks`, with all their incoming edges): ``edge_index[1]`` then indexes
        ``dst_feats``, which give the queries and the skip connection; keys and values come from ``node_feats``."""
        dst = edge_index[1]
        dst_feats = node_feats if dst_feats is None else dst_feats
        num_nodes = next(iter(dst_feats.values())).shape[0]
        kv = self.to_key_value(node_feats, edge_feats, radial_in, edge_index, basis)
        query = self.to_query(dst_feats)
        # Heads as views (no copies): the keys and values stay in the conv's output, kept once for backward.
        split = {d: (_SplitChannels.apply(kv[d], c) if torch.is_grad_enabled() else (kv[d][:, :c], kv[d][:, c:]))
                 for d, c in self.value_fiber}
        keys = [_heads(split[d][1], self.num_heads) for d in self.key_fiber.degrees]
        queries = [_heads(query[d], self.num_heads) for d in self.key_fiber.degrees]
        if torch.is_grad_enabled():
            logits = _EdgeDot.apply(dst, *keys, *queries)                        # [E, H]
        else:  # nothing kept for backward: the plain sum (no autograd.Function for dynamo to trace)
            logits = _edge_logits(dst, keys, queries)
        logits = logits * self.scale
        alpha = edge_softmax(logits, dst, num_nodes, check=False)[..., None, None]  # [E, H, 1, 1]

        out: Features = {}
        for d, c in self.value_fiber:
            v = _heads(split[d][0], self.num_heads)                               # [E, H, c/H, 2d+1]
            z = scatter_sum(alpha * v, dst, num_nodes, check=False).view(num_nodes, c, 2 * d + 1)
            # project([z | x]) (skip connection by concatenation) as W[:, :c] @ z + W[:, c:] @ x: no concatenated
            # copy is made or kept for backward.
            W = self.project.weights[str(d)]
            out[d] = channel_mix(W[:, :c], z)
            if d in self.fiber_in:
                out[d] = out[d] + channel_mix(W[:, c:], dst_feats[d])
        return out

    def extra_repr(self) -> str:
        return f"fiber_in={self.fiber_in}, fiber_out={self.fiber_out}, num_heads={self.num_heads}"
