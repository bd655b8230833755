"""The analytic FLOP counter against a brute-force count (torch's FlopCounterMode) of the reference-order path."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import se3t
from se3t import Fiber, FuseLevel
from benchmarks.flops import TRAINING_FACTOR, FlopCount, conv_flops, model_flops


def _graph(num_nodes: int = 9, num_edges: int = 20, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, num_nodes, (num_edges,), generator=gen)
    dst = (src + torch.randint(1, num_nodes, (num_edges,), generator=gen)) % num_nodes  # no self loops
    pos = torch.randn(num_nodes, 3, generator=gen)
    return torch.stack([src, dst]), pos


def _brute_force(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("radial", ["conv", "pair"])
@pytest.mark.parametrize("edge_degree1", [0, 2])
def test_conv_count_matches_flop_counter(radial, edge_degree1):
    fiber_in, fiber_out = Fiber({0: 3, 1: 4, 2: 2}), Fiber({0: 5, 1: 3, 2: 4})
    fiber_edge = Fiber({0: 2, 1: edge_degree1}) if edge_degree1 else Fiber({0: 2})
    conv = se3t.ConvSE3(fiber_in, fiber_out, fiber_edge, pool=True, self_interaction=True,
                        fuse_level=FuseLevel.NONE, radial=radial)
    edge_index, pos = _graph()
    N, E = pos.shape[0], edge_index.shape[1]
    basis = se3t.get_basis(pos[edge_index[1]] - pos[edge_index[0]], 2)
    assert basis.blocks  # made (lazily) outside the count: the bases are an input, not the conv's FLOPs
    feats = {d: torch.randn(N, c, 2 * d + 1) for d, c in fiber_in}
    edge_feats = {d: torch.randn(E, c, 2 * d + 1) for d, c in fiber_edge}
    radial_in = torch.randn(E, fiber_edge[0] + 1)
    measured = _brute_force(lambda: conv(feats, edge_feats, radial_in, edge_index, basis))
    counted = conv_flops(conv, E, N).total
    assert counted == pytest.approx(measured, rel=0.02), (counted, measured)


def test_model_count_matches_flop_counter():
    model = se3t.SE3TransformerPooled(fiber_in=Fiber({0: 6}), fiber_out=Fiber({0: 16}), fiber_edge=Fiber({0: 4}),
                                      num_degrees=3, num_channels=8, num_layers=2, num_heads=2, channels_div=2,
                                      fuse_level=FuseLevel.NONE)
    edge_index, pos = _graph(12, 30)
    N, E = pos.shape[0], edge_index.shape[1]
    graph_index = (torch.arange(N) >= N // 2).long()
    basis = model.transformer.compute_basis(edge_index, pos)
    assert basis.blocks  # made outside the count, as above
    inputs = dict(node_feats={0: torch.randn(N, 6, 1)}, edge_index=edge_index, pos=pos,
                  edge_feats={0: torch.randn(E, 4, 1)}, basis=basis, graph_index=graph_index, num_graphs=2)
    measured = _brute_force(lambda: model(**inputs))
    counted = model_flops(model, N, E, num_graphs=2)
    assert counted.total == pytest.approx(measured, rel=0.02), (counted, measured)
    assert counted.radial > 0 and counted.contraction > 0 and counted.linear > 0
    assert model_flops(model, N, E, 2, training=True).total == TRAINING_FACTOR * counted.total


def test_counts_scale_with_edges_and_fused_order_counts_the_zeros():
    conv = se3t.ConvSE3(Fiber.create(4, 8), Fiber.create(4, 8))
    one, two = conv_flops(conv, 10, 5), conv_flops(conv, 20, 5)
    assert two.radial == 2 * one.radial and two.contraction == 2 * one.contraction
    fused = conv_flops(conv, 10, 5, order="fused")
    assert fused.radial == one.radial and fused.contraction > 2 * one.contraction
    with pytest.raises(ValueError, match="order"):
        conv_flops(conv, 10, 5, order="bogus")


def test_paper_model_matches_the_issue_figures():
    """Issue 7: ~3.5 GFLOP per QM9 molecule (18 atoms, 37 edges) and training step in the reference's fused order,
    radial last layers ~57 %."""
    model = se3t.SE3TransformerPooled(fiber_in=Fiber({0: 6}), fiber_out=Fiber({0: 128}), fiber_edge=Fiber({0: 4}),
                                      num_degrees=4, num_channels=32, num_layers=7, num_heads=8, channels_div=2)
    fused = model_flops(model, 18, 37, 1, training=True, order="fused")
    assert 3.3e9 < fused.total < 3.7e9
    assert 0.5 < fused.radial / fused.total < 0.65
    pairwise = model_flops(model, 18, 37, 1, training=True)
    assert pairwise.total < fused.total and pairwise.radial == fused.radial
    assert isinstance(pairwise + fused, FlopCount)
