"""With the se3t model: padding content never changes real outputs; batched equals one-by-one; bases."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import se3t
from se3t_data import Buckets, PaddedCollate, basis_numel_per_edge, collate, precompute_bases


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = se3t.SE3TransformerPooled(
        fiber_in=se3t.Fiber({0: 6}), fiber_out=se3t.Fiber({0: 8}), fiber_edge=se3t.Fiber({0: 4}),
        num_degrees=2, num_channels=4, output_dim=1, num_layers=1, num_heads=2, channels_div=2, pooling="max",
    )  # fmt: skip
    return net.eval()


@pytest.fixture(scope="module")
def buckets(small_qm9):
    return Buckets.fit(small_qm9.num_nodes, small_qm9.num_edges, batch_size=16, num_buckets=2)


def _garbage(batch, seed, self_loops=False):
    """The same batch with random content in every padding entry (features, positions, padding edges)."""
    g = torch.Generator().manual_seed(seed)
    n, e, N, E = batch.num_real_nodes, batch.num_real_edges, batch.num_nodes, batch.num_edges
    node_feats, pos, edge_feats, edge_index = (t.clone() for t in (batch.node_feats, batch.pos, batch.edge_feats,
                                                                     batch.edge_index))  # fmt: skip
    node_feats[n:] = 10 * torch.randn(N - n, node_feats.shape[1], generator=g)
    pos[n:] = 5 * torch.randn(N - n, 3, generator=g)
    edge_feats[e:] = torch.randn(E - e, edge_feats.shape[1], generator=g)
    src = torch.randint(n, N, (E - e,), generator=g)
    shift = torch.randint(0 if self_loops else 1, N - n, (E - e,), generator=g)
    edge_index[:, e:] = torch.stack([src, n + (src - n + shift) % (N - n)])
    return dataclasses.replace(batch, node_feats=node_feats, pos=pos, edge_feats=edge_feats, edge_index=edge_index)


@torch.no_grad()
def test_padding_content_does_not_change_real_outputs(model, small_qm9, buckets):
    records = [small_qm9[i] for i in range(10, 21)]  # 11 real graphs, 5 empty slots and the dummy slot
    batch = collate(records, buckets)
    assert batch.num_nodes - batch.num_real_nodes >= 2 and batch.num_edges > batch.num_real_edges, "needs padding"
    out = model(**batch.model_inputs())
    assert out.shape == (batch.num_graphs, 1)
    real = out[batch.graph_mask]
    assert torch.isfinite(real).all()
    for seed in range(3):
        other = model(**_garbage(batch, seed).model_inputs())[batch.graph_mask]
        torch.testing.assert_close(other, real, atol=1e-5, rtol=1e-5)
    # even zero-length padding edges (self-loops) must not leak into real graphs
    looped = model(**_garbage(batch, 7, self_loops=True).model_inputs())[batch.graph_mask]
    torch.testing.assert_close(looped, real, atol=1e-5, rtol=1e-5)


def test_forces_in_padded_batches(small_qm9, buckets):
    """Forces on a padded batch (the default EDGE_FRAME level: through the frames): FULL's on the real atoms,
    unchanged by the padding's content, zero on padding atoms. Average pooling: the max over nodes has no
    gradient where symmetric atoms tie (rounding then picks the atom that gets it)."""
    torch.manual_seed(0)
    model = se3t.SE3TransformerPooled(
        fiber_in=se3t.Fiber({0: 6}), fiber_out=se3t.Fiber({0: 8}), fiber_edge=se3t.Fiber({0: 4}),
        num_degrees=2, num_channels=4, output_dim=1, num_layers=1, num_heads=2, channels_div=2, pooling="avg",
    ).eval()  # fmt: skip
    batch = collate([small_qm9[i] for i in range(10, 21)], buckets)
    n = batch.num_real_nodes

    def forces(b, level):
        model.set_fuse_level(level)
        inputs = b.model_inputs()
        pos = inputs["pos"].clone().requires_grad_(True)
        return torch.autograd.grad(model(**dict(inputs, pos=pos))[b.graph_mask].sum(), pos)[0]

    frame, full, garbage = forces(batch, "EDGE_FRAME"), forces(batch, "FULL"), forces(_garbage(batch, 3), "EDGE_FRAME")
    assert frame[:n].abs().max() > 0 and torch.isfinite(frame).all()
    torch.testing.assert_close(frame[:n], full[:n], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(garbage[:n], frame[:n], atol=1e-6, rtol=1e-4)
    assert frame[n:].abs().max() == 0 and garbage[n:].abs().max() == 0


@pytest.mark.parametrize("level", ["EDGE_FRAME", "NONE"])
def test_force_training_on_padded_batches_has_finite_gradients(small_qm9, buckets, level, monkeypatch):
    """A loss on forces (create_graph) over a padded batch: the padding atoms' zero features sit at the norm's
    clamp, where torch.norm's second derivative is 0/0; every parameter gradient must be finite, and equal with
    fused and reference second derivatives."""
    from se3t.nn import fused
    torch.manual_seed(0)
    model = se3t.SE3TransformerPooled(
        fiber_in=se3t.Fiber({0: 6}), fiber_out=se3t.Fiber({0: 8}), fiber_edge=se3t.Fiber({0: 4}),
        num_degrees=2, num_channels=4, output_dim=1, num_layers=1, num_heads=2, channels_div=2,
        fuse_level=level).double()  # fmt: skip
    batch = collate([small_qm9[i] for i in range(10, 21)], buckets)
    inputs = {k: ({d: t.double() for d, t in v.items()} if isinstance(v, dict) else
                  v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in batch.model_inputs().items()}
    grads = []
    for fused_double in (True, False):
        monkeypatch.setattr(fused, "FUSED_DOUBLE_BACKWARD", fused_double)
        model.zero_grad(set_to_none=True)
        pos = inputs["pos"].clone().requires_grad_(True)
        energy = model(**dict(inputs, pos=pos))[batch.graph_mask].sum()
        forces, = torch.autograd.grad(energy, pos, create_graph=True)
        (energy + forces.pow(2).sum()).backward()
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
    assert grads[0] and all(torch.isfinite(g).all() for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@torch.no_grad()
def test_batched_equals_one_by_one(model, small_qm9, buckets):
    records = [small_qm9[i] for i in range(100, 116)]
    batch = collate(records, buckets)
    batched = model(**batch.model_inputs())[batch.graph_mask]
    alone = torch.cat([model(**collate([r]).model_inputs())[:1] for r in records])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_precomputed_and_per_batch_bases_give_the_same_outputs(model, small_qm9, buckets):
    subset = small_qm9.subset(range(40))
    with_bases = precompute_bases(subset, max_degree=1)
    assert with_bases.nbytes == int(subset.num_edges.sum()) * 9 * 4  # the harmonics: 9 per edge for degree 1
    records = [with_bases[i] for i in range(16)]
    assert records[0].basis is not None
    pre = collate(records, buckets)
    assert pre.basis is not None and pre.basis.num_edges == pre.num_edges
    # batched and moved as harmonics, zero on the padding edges
    assert pre.basis.harmonics is not None and pre.to("cpu").basis.harmonics is not None
    assert not pre.basis.harmonics[int(pre.num_real_edges):].any()
    in_worker = PaddedCollate(buckets, basis_max_degree=1)([subset[i] for i in range(16)])
    plain = collate([subset[i] for i in range(16)], buckets)
    reference = model(**plain.model_inputs())[plain.graph_mask]
    for batch in (pre, in_worker):
        assert "basis" in batch.model_inputs()
        torch.testing.assert_close(model(**batch.model_inputs())[batch.graph_mask], reference, atol=1e-5, rtol=1e-5)


def test_basis_memory_per_edge(small_qm9):
    assert basis_numel_per_edge(3) == 1092  # 4,368 bytes per directed edge in float32
    m = small_qm9[5]
    rel = m.pos[m.edge_index[1]] - m.pos[m.edge_index[0]]
    basis = se3t.get_basis(rel, 3)
    assert basis.nbytes() == m.num_edges * 49 * 4  # held as harmonics until the blocks are asked for
    assert sum(b.numel() for b in basis.blocks.values()) == m.num_edges * 1092
    with pytest.raises(MemoryError, match="GiB"):
        precompute_bases(small_qm9, max_degree=3, max_bytes=int(small_qm9.num_edges.sum()) * 49 * 4 - 1)
