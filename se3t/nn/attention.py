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
from .linear import LinearSE3

__all__ = ["AttentionBlockSE3"]


def _to_heads(features: Features, fiber: Fiber, num_heads: int) -> Tensor:
    """``{d: [M, C_d, 2d+1]} -> [M, H, sum_d C_d/H * (2d+1)]``: head ``h`` takes channel chunk ``h`` of every degree."""
    return torch.cat([features[d].reshape(features[d].shape[0], num_heads, c // num_heads * (2 * d + 1))
                      for d, c in fiber], dim=-1)


class _EdgeDot(torch.autograd.Function):
    """``(k * q[dst]).sum(-1)``: ``k [E, H, D]``, ``q [N, H, D]`` -> ``[E, H]``, keeping node-level ``q`` for
    backward instead of the edge-level ``q[dst]`` plain autograd would keep. The backward is differentiable
    (double backward for forces)."""

    @staticmethod
    def forward(ctx, k: Tensor, q: Tensor, dst: Tensor) -> Tensor:
        ctx.save_for_backward(k, q, dst)
        return (k * q.index_select(0, dst)).sum(-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        k, q, dst = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        grad_k = g * q.index_select(0, dst) if ctx.needs_input_grad[0] else None
        grad_q = scatter_sum(g * k, dst, q.shape[0], check=False) if ctx.needs_input_grad[1] else None
        return grad_k, grad_q, None


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
                 fuse_level: Union[FuseLevel, str, int] = FuseLevel.FULL, low_memory: bool = False,
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
                edge_index: Tensor, basis: Basis) -> Features:
        dst = edge_index[1]
        num_nodes = next(iter(node_feats.values())).shape[0]
        kv = self.to_key_value(node_feats, edge_feats, radial_in, edge_index, basis)
        value = {d: kv[d][:, :c] for d, c in self.value_fiber}
        key = {d: kv[d][:, self.value_fiber[d]:] for d in self.key_fiber.degrees}
        query = self.to_query(node_feats)

        k = _to_heads(key, self.key_fiber, self.num_heads)                       # [E, H, Dk]
        q = _to_heads(query, self.key_fiber, self.num_heads)                     # [N, H, Dk]
        logits = _EdgeDot.apply(k, q, dst) * self.scale                          # [E, H]
        alpha = edge_softmax(logits, dst, num_nodes, check=False)[..., None, None]  # [E, H, 1, 1]

        z: Features = {}
        for d, c in self.value_fiber:
            v = value[d].reshape(value[d].shape[0], self.num_heads, c // self.num_heads, 2 * d + 1)
            z[d] = scatter_sum(alpha * v, dst, num_nodes, check=False).view(num_nodes, c, 2 * d + 1)
        skip = {d: torch.cat([z[d], node_feats[d]], dim=1) if d in self.fiber_in else z[d] for d in z}
        return self.project(skip)

    def extra_repr(self) -> str:
        return f"fiber_in={self.fiber_in}, fiber_out={self.fiber_out}, num_heads={self.num_heads}"
