import pytest
import torch

from se3t.graph import knn_graph, radius_graph


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
