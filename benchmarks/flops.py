"""Analytic matmul FLOP count of an se3t model, in the reference's contraction order.

The count is the *useful* work of a forward pass, whatever order or fusion level se3t executes, so that a
utilisation figure means the same thing for every level: per conv and edge

* the radial MLP(s): every ``nn.Linear`` inside the conv, ``E x in x out`` multiply-adds (one shared MLP per conv
  is ``E x (in x 32 + 32 x 32 + 32 x W)``; per-pair parametrizations own several MLPs and are counted as such);
* per degree pair ``(d_in, d_out)`` the two contractions as the reference performs them, ``x @ B``
  (``C_in x (2 d_in + 1) x F (2 d_out + 1)``) then ``R @ (x @ B)`` (``C_out x C_in F x (2 d_out + 1)``), where
  ``C_in`` includes edge features of degree ``d_in > 0``. ``order="pairwise"`` (default) counts them per pair,
  without the zeros of a fused basis: the work the function needs. ``order="fused"`` counts them as the
  reference's FULL level runs them, one dense contraction through the fused basis ``[16, 44, 16]`` (90 % zeros):
  this is the ~3.5 GFLOP per QM9 molecule and training step quoted in issue 7 (pairwise: ~2.4 GFLOP);
* the self-interaction of a conv (per destination node, or per edge in reference-parity mode);

plus every :class:`~se3t.nn.LinearSE3` (per node) and the head's ``nn.Linear`` layers (per graph). Attention dot
products, softmax, norms and scatters are not matmuls and are not counted (they are a few per cent of the work);
neither is the basis (precomputed once per data set in the reference protocol). One multiply-add is 2 FLOP.
A training step counts ``3 x`` the forward (forward + backward w.r.t. activations and weights), by convention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from torch import nn

from se3t.fiber import Fiber
from se3t.nn import ConvSE3, LinearSE3

__all__ = ["FlopCount", "conv_flops", "model_flops", "TRAINING_FACTOR", "ORDERS"]

#: contraction orders :func:`conv_flops` can count.
ORDERS = ("pairwise", "fused")

#: forward + backward (activations and weights) of a matmul-dominated network, in forward-pass units.
TRAINING_FACTOR = 3


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one pass, split by kind (2 FLOP per multiply-add)."""

    radial: int = 0
    contraction: int = 0
    linear: int = 0

    @property
    def total(self) -> int:
        return self.radial + self.contraction + self.linear

    def __add__(self, other: "FlopCount") -> "FlopCount":
        return FlopCount(self.radial + other.radial, self.contraction + other.contraction, self.linear + other.linear)

    def __mul__(self, k: int) -> "FlopCount":
        return FlopCount(self.radial * k, self.contraction * k, self.linear * k)

    __rmul__ = __mul__

    def as_dict(self) -> dict:
        return {"radial": self.radial, "contraction": self.contraction, "linear": self.linear, "total": self.total}


def _frequencies(d_in: int, d_out: int) -> int:
    return 2 * min(d_in, d_out) + 1


def _dim(d: int) -> int:
    return 2 * d + 1


def _contraction_macs(fiber_in: Fiber, fiber_out: Fiber, in_channels: dict, order: str) -> int:
    """Multiply-adds of the kernel contractions of one conv, per edge."""
    if order == "pairwise":
        macs = 0
        for d_out, c_out in fiber_out:
            for d_in in fiber_in.degrees:
                c_in, f = in_channels[d_in], _frequencies(d_in, d_out)
                macs += c_in * _dim(d_in) * f * _dim(d_out)   # x @ B
                macs += c_out * c_in * f * _dim(d_out)        # R @ (x @ B)
        return macs
    # "fused": one dense kernel over all pairs, as the reference's FULL level runs it (block-sparse basis
    # [sum(2d_in+1), sum_pairs F, sum(2d_out+1)] stored dense), assuming uniform channels as that level requires.
    c_in, c_out = max(in_channels.values()), max(fiber_out.channels)
    d_in_total = sum(_dim(d) for d in fiber_in.degrees)
    d_out_total = sum(_dim(d) for d in fiber_out.degrees)
    f_total = sum(_frequencies(di, do) for di in fiber_in.degrees for do in fiber_out.degrees)
    return c_in * d_in_total * f_total * d_out_total + c_out * c_in * f_total * d_out_total


def conv_flops(conv: ConvSE3, num_edges: int, num_nodes: int, order: str = "pairwise") -> FlopCount:
    """Forward FLOPs of one :class:`~se3t.nn.ConvSE3` on ``num_edges`` edges into ``num_nodes`` nodes.

    ``order``: ``"pairwise"`` (two contractions per degree pair, no zeros: the work the function needs) or
    ``"fused"`` (the reference's FULL level: one dense contraction through the zero-padded fused basis).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    fiber_in, fiber_out = conv.fiber_in, conv.fiber_out
    fiber_edge = getattr(conv, "fiber_edge", None) or Fiber({})
    in_channels = {d: c + (fiber_edge[d] if d > 0 else 0) for d, c in fiber_in}
    radial = sum(m.in_features * m.out_features for m in conv.modules() if isinstance(m, nn.Linear)) * num_edges
    contraction = num_edges * _contraction_macs(fiber_in, fiber_out, in_channels, order)
    linear = 0
    if getattr(conv, "self_interaction", False):
        per_edge = getattr(conv, "reference_parity", False) or not getattr(conv, "pool", True)
        rows = num_edges if per_edge else num_nodes
        for d, c_out in fiber_out:
            if d in fiber_in:
                linear += rows * c_out * fiber_in[d] * _dim(d)
    return FlopCount(2 * radial, 2 * contraction, 2 * linear)


def _linear_se3_flops(layer: LinearSE3, num_nodes: int) -> int:
    return 2 * num_nodes * sum(c_out * layer.fiber_in[d] * _dim(d) for d, c_out in layer.fiber_out)


def _walk(module: nn.Module) -> Iterator[nn.Module]:
    """Modules in order, without descending into convs (they are counted whole)."""
    for child in module.children():
        yield child
        if not isinstance(child, ConvSE3):
            yield from _walk(child)


def model_flops(model: nn.Module, num_nodes: int, num_edges: int, num_graphs: int = 1,
                training: bool = False, order: str = "pairwise") -> FlopCount:
    """FLOPs of a forward pass (``training=True``: ``3 x``) of an se3t model or layer on a graph batch.

    ``nn.Linear`` layers outside the convs act per graph (the pooled model's head). Count the real nodes, edges
    and graphs of a padded batch to get its useful work.
    """
    total = FlopCount()
    modules = [model] if isinstance(model, (ConvSE3, LinearSE3)) else list(_walk(model))
    for m in modules:
        if isinstance(m, ConvSE3):
            total = total + conv_flops(m, num_edges, num_nodes, order)
        elif isinstance(m, LinearSE3):
            total = total + FlopCount(linear=_linear_se3_flops(m, num_nodes))
        elif isinstance(m, nn.Linear):
            total = total + FlopCount(linear=2 * num_graphs * m.in_features * m.out_features)
    return total * TRAINING_FACTOR if training else total
