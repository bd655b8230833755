import pytest
import torch

from se3t.graph import destination_blocks, knn_graph, radius_graph


def _brute_radius(pos, r, graph_index):
    d = torch.cdist(pos, pos)
    m = (d < r) & ~torch.eye(len(pos), dtype=torch.bool) & (graph_index[:, None] == graph_index[None, :])
    dst, src = m.nonzero(as_tuple=True)
    return set(zip(src.tolist(), dst.tolist()))


@pytest.mark.parametrize("r", [0.5, 1.3, 4.0])
def test_radius_graph_matches_brute_force(r):
    pos = torch.randn(200, 3) * 2
    gi = torch.sort(torch.randint(0, 3, (200,))).values
    ei = radius_graph(pos, r, gi, chunk_size=37)
    assert ei.dtype == torch.long and ei.shape[0] == 2
    assert set(zip(*ei.tolist())) == _brute_radius(pos, r, gi)
    assert (ei[1][1:] >= ei[1][:-1]).all()  # sorted by destination


def test_radius_graph_max_neighbors_keeps_nearest():
    pos = torch.randn(80, 3)
    ei = radius_graph(pos, 2.0, max_num_neighbors=5)
    counts = torch.bincount(ei[1], minlength=80)
    assert counts.max() <= 5
    full = radius_graph(pos, 2.0)
    for node in range(0, 80, 9):
        kept = ei[0][ei[1] == node]
        allnb = full[0][full[1] == node]
        d_all = (pos[allnb] - pos[node]).norm(dim=1).sort().values
        d_kept = (pos[kept] - pos[node]).norm(dim=1).sort().values
        assert torch.allclose(d_kept, d_all[: len(kept)])


def test_knn_graph_matches_brute_force():
    pos = torch.randn(150, 3)
    gi = torch.sort(torch.randint(0, 2, (150,))).values
    ei = knn_graph(pos, 6, gi, chunk_size=40)
    d = torch.cdist(pos, pos)
    d[gi[:, None] != gi[None, :]] = float("inf")
    d.fill_diagonal_(float("inf"))
    for node in range(150):
        nb = set(ei[0][ei[1] == node].tolist())
        assert nb == set(d[node].topk(6, largest=False).indices.tolist())


def test_large_cloud_linear_memory():
    pos = torch.rand(10_000, 3) * 20  # density ~1.25 points / unit^3
    ei = radius_graph(pos, 1.5)
    assert ei.shape[1] > 0 and int(ei.max()) < 10_000
    sample = torch.randint(0, 10_000, (20,))
    for node in sample.tolist():
        expected = ((pos - pos[node]).norm(dim=1) < 1.5).sum() - 1
        assert (ei[1] == node).sum() == expected


def test_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        radius_graph(torch.tensor([[0.0, 0.0, float("nan")]]), 1.0)
    with pytest.raises(ValueError, match="positive"):
        radius_graph(torch.randn(3, 3), 0.0)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        knn_graph(torch.randn(3, 2), 2)
    assert radius_graph(torch.zeros(0, 3), 1.0).shape == (2, 0)


def _check_blocks(blocks, edge_index, num_nodes, num_blocks):
    dst = edge_index[1]
    E = dst.numel()
    assert 1 <= len(blocks) <= num_blocks
    assert blocks[0].start == 0 and blocks[-1].stop == num_nodes
    assert all(a.stop == b.start and a.start < a.stop for a, b in zip(blocks, blocks[1:]))
    ids = torch.cat([b.edges for b in blocks])
    assert sorted(ids.tolist()) == list(range(E))  # every edge exactly once
    for b in blocks:
        d = dst[b.edges]
        assert bool(((d >= b.start) & (d < b.stop)).all())  # all of the block's incoming edges, no others
        assert int(((dst >= b.start) & (dst < b.stop)).sum()) == b.edges.numel()
        assert bool((d[1:] >= d[:-1]).all())  # ordered by destination ...
        same = d[1:] == d[:-1]
        assert bool((b.edges[1:][same] > b.edges[:-1][same]).all())  # ... stably
        assert E == 0 or b.edges.numel() > 0
    if E:
        largest_in_degree = int(torch.bincount(dst).max())
        assert max(b.edges.numel() for b in blocks) <= -(-E // num_blocks) + largest_in_degree


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 5, 64])
def test_destination_blocks_partition_nodes_and_edges(num_blocks):
    g = torch.Generator().manual_seed(num_blocks)
    N = 40
    dst = torch.randint(3, N - 4, (150,), generator=g)  # nodes 0-2 and the last 4 have no incoming edges
    dst[:30] = 17                                         # and one node has a fifth of them
    src = torch.randint(0, N, (150,), generator=g)
    ei = torch.stack([src, dst])[:, torch.randperm(150, generator=g)]
    _check_blocks(destination_blocks(ei, N, num_blocks), ei, N, num_blocks)


def test_destination_blocks_small_and_empty_graphs():
    ei = torch.tensor([[0, 2, 1], [1, 1, 3]])
    for k in (1, 2, 3, 10):
        _check_blocks(destination_blocks(ei, 6, k), ei, 6, k)
    hub = torch.tensor([[0, 1, 2, 3], [4, 4, 4, 4]])
    assert [(b.start, b.stop) for b in destination_blocks(hub, 5, 4)] == [(0, 5)]
    empty = destination_blocks(torch.zeros(2, 0, dtype=torch.long), 5, 4)
    assert [(b.start, b.stop, b.edges.numel()) for b in empty] == [(0, 5, 0)]
    with pytest.raises(ValueError, match="num_blocks"):
        destination_blocks(ei, 6, 0)
