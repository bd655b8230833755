"""The QM9 data set: records, features, units, split, normalisation, graph modes, bonds."""

from __future__ import annotations

import csv
import pickle

import numpy as np
import pytest
import torch

import se3t_data
from se3t_data import HARTREE_TO_EV, REFERENCE_SPLIT, BondStatus, split_sizes

from data_helpers import QM9PACK_FIXTURE, fixture_qm9

csv.field_size_limit(1 << 30)


def _csv_rows():
    rows = {}
    for p in (1, 2, 3):
        with open(QM9PACK_FIXTURE / f"qm9_part{p}.csv", newline="") as f:
            for r in csv.DictReader(f):
                rows[int(r["Index"])] = r
    return rows


def test_record_schema(small_qm9):
    assert len(small_qm9) == 291
    for i in (0, 57, -1):
        m = small_qm9[i]
        n, e = m.num_nodes, m.num_edges
        assert m.z.shape == (n,) and m.z.dtype == torch.int64
        assert m.pos.shape == (n, 3) and m.pos.dtype == torch.float32
        assert m.edge_index.shape == (2, e) and m.edge_index.dtype == torch.int64
        assert m.bond_type.shape == (e,) and m.bond_type.dtype == torch.int64
        assert m.x.shape == (n, 6) and m.x.dtype == torch.float32
        assert m.edge_attr.shape == (e, 4) and m.edge_attr.dtype == torch.float32
        assert m.y.shape == () and m.y.dtype == torch.float32
        assert m.index == small_qm9.indices[i]
        # node features: one-hot of H, C, N, O, F, then Z
        slot = {1: 0, 6: 1, 7: 2, 8: 3, 9: 4}
        expected = torch.zeros(n, 6)
        expected[torch.arange(n), torch.tensor([slot[v] for v in m.z.tolist()])] = 1
        expected[:, 5] = m.z.float()
        torch.testing.assert_close(m.x, expected)
        # edge features: one-hot single/double/triple/aromatic of the bond type
        assert set(m.bond_type.tolist()) <= {1, 2, 3, 4}
        torch.testing.assert_close(m.edge_attr, torch.nn.functional.one_hot(m.bond_type - 1, 4).float())
        # both directions, no self-loops, sorted by (src, dst)
        pairs = set(map(tuple, m.edge_index.T.tolist()))
        assert pairs == {(j, i) for i, j in pairs} and all(i != j for i, j in pairs)
        key = m.edge_index[0] * n + m.edge_index[1]
        assert torch.equal(key, key.sort().values)


def test_values_come_from_the_source_in_the_spec_units(small_qm9):
    rows = _csv_rows()
    for i in range(0, len(small_qm9), 37):
        m = small_qm9[i]
        r = rows[m.index]
        xyz = np.array(r["XYZ_Ang"].replace("[", "").replace("]", "").split(","), dtype=np.float64).reshape(-1, 3)
        np.testing.assert_allclose(m.pos.numpy(), xyz, atol=1e-6)
        assert m.y.item() == pytest.approx(float(r["HOMO_au"]) * HARTREE_TO_EV, rel=1e-6)  # eV
    assert small_qm9.unit == "eV"
    methane = small_qm9.indices.tolist().index(1)
    targets = {name: small_qm9.targets(name)[methane].item() for name in se3t_data.TARGET_NAMES}
    assert targets["mu"] == pytest.approx(0.0)  # D
    assert targets["alpha"] == pytest.approx(13.21)  # a0^3
    assert targets["r2"] == pytest.approx(35.3641)  # a0^2
    assert targets["Cv"] == pytest.approx(6.469)  # cal/(mol K)
    assert targets["A"] == pytest.approx(157.7118)  # GHz
    assert targets["U0"] == pytest.approx(-40.47893 * 27.211386, rel=1e-7)
    # atomization energy of methane at 0 K: U0 - (U0(C) + 4 U0(H)) = -0.631066 Ha = -17.172 eV
    assert targets["U0_atom"] == pytest.approx(-17.172, abs=2e-3)
    # G: -40.498597 - (-37.861317 + 4 * -0.510927) = -0.593572 Ha (atoms gain entropy: less negative)
    assert targets["G_atom"] == pytest.approx(-0.593572 * 27.211386, abs=1e-4)


def test_several_tasks(qm9_root, small_qm9):
    ds = fixture_qm9(qm9_root, task=("homo", "lumo", "mu"))
    m = ds[3]
    assert m.y.shape == (3,)
    assert m.y[0] == small_qm9[3].y
    assert ds.unit == ("eV", "eV", "D")
    assert ds.target_mean.shape == (3,)


def test_split_sizes_and_determinism(small_qm9):
    assert split_sizes(130_831) == REFERENCE_SPLIT == (100_000, 17_748, 13_083)
    assert sum(split_sizes(291)) == 291 and split_sizes(291)[0] == round(291 * 100_000 / 130_831)
    train, val, test = small_qm9.split()
    assert (len(train), len(val), len(test)) == split_sizes(291)
    all_idx = np.concatenate([train.indices, val.indices, test.indices])
    assert sorted(all_idx.tolist()) == sorted(small_qm9.indices.tolist())  # disjoint and complete
    again = small_qm9.split(seed=small_qm9.seed)[0]
    np.testing.assert_array_equal(train.indices, again.indices)
    assert not np.array_equal(small_qm9.split(seed=1)[0].indices, train.indices)


def test_target_statistics_come_from_the_train_split_only(small_qm9):
    train, val, test = small_qm9.split()
    y_train = np.array([train[i].y.item() for i in range(len(train))], dtype=np.float64)
    assert small_qm9.target_mean == pytest.approx(y_train.mean(), rel=1e-5)
    assert small_qm9.target_std == pytest.approx(y_train.std(), rel=1e-5)
    y_all = small_qm9.y.double().numpy()
    assert small_qm9.target_mean != pytest.approx(y_all.mean(), rel=1e-6)


def test_subsets(small_qm9):
    sub = small_qm9.subset([5, 2, -1])
    assert len(sub) == 3
    assert sub[0].index == small_qm9[5].index and sub[-1].index == small_qm9[-1].index
    demo = small_qm9.random_subset(100, seed=3)
    assert len(demo) == 100 and len(set(demo.indices.tolist())) == 100
    np.testing.assert_array_equal(demo.num_nodes, [demo[i].num_nodes for i in range(len(demo))])
    nested = demo.subset(range(10))
    assert nested[9].index == demo[9].index
    restored = pickle.loads(pickle.dumps(nested))  # DataLoader workers (spawn) pickle the data set
    assert restored[4].index == nested[4].index
    with pytest.raises(IndexError):
        small_qm9[len(small_qm9)]
    with pytest.raises(ValueError):
        small_qm9.random_subset(10_000)


def test_bad_arguments(qm9_root):
    with pytest.raises(ValueError, match="cutoff"):
        fixture_qm9(qm9_root, graph="radius")
    with pytest.raises(ValueError, match="graph must be"):
        fixture_qm9(qm9_root, graph="knn")
    with pytest.raises(ValueError, match="unknown QM9 target 'HOMO'.*homo"):
        fixture_qm9(qm9_root, task="HOMO")


@pytest.mark.parametrize("graph, cutoff", [("radius", 2.5), ("full", None)])
def test_radius_and_full_graphs(qm9_root, small_qm9, graph, cutoff):
    ds = fixture_qm9(qm9_root, graph=graph, cutoff=cutoff)
    assert ds.num_edge_features == 5
    np.testing.assert_array_equal(ds.num_edges, [ds[i].num_edges for i in range(len(ds))])
    saw_no_bond = False
    for i in range(0, len(ds), 7):
        m, b = ds[i], small_qm9[i]
        n = m.num_nodes
        src, dst = m.edge_index
        lengths = (m.pos[dst] - m.pos[src]).norm(dim=1)
        if graph == "full":
            assert m.num_edges == n * (n - 1)
        else:
            d = torch.cdist(m.pos.double(), m.pos.double())
            assert m.num_edges == int((d <= cutoff).sum()) - n
            assert (lengths <= cutoff + 1e-6).all()
        # every bond is an edge with its type; every other edge is "no bond" (last feature column)
        bonds = {tuple(p): t for p, t in zip(b.edge_index.T.tolist(), b.bond_type.tolist())}
        for (i_, j_), t, f in zip(m.edge_index.T.tolist(), m.bond_type.tolist(), m.edge_attr):
            assert t == bonds.get((i_, j_), 0)
            assert f.argmax().item() == (4 if t == 0 else t - 1) and f.sum() == 1
        assert bonds.keys() <= set(map(tuple, m.edge_index.T.tolist()))
        saw_no_bond |= bool((m.bond_type == 0).any())
    assert saw_no_bond


def test_bond_perception_agrees_with_the_data_set_smiles(small_qm9):
    status = small_qm9.bond_status
    ok = np.isin(status, (BondStatus.DEFAULT, BondStatus.HUCKEL))
    assert small_qm9.smiles_agreement == pytest.approx(ok.mean())
    assert small_qm9.smiles_agreement >= 0.99
    by_index = dict(zip(small_qm9.indices.tolist(), status.tolist()))
    # bicyclo[1.1.1] cages: the default connectivity over-bonds the bridgeheads, Hückel gets them right
    for idx in (105, 106, 316, 317, 319, 320):
        assert by_index[idx] == BondStatus.HUCKEL, idx
    # a zwitterion whose relaxed geometry puts a proton elsewhere than the SMILES: perceived bonds kept
    assert by_index[1642] == BondStatus.MISMATCH
    assert small_qm9.info["bond_status_counts"]["DEFAULT"] == int((status == BondStatus.DEFAULT).sum())


def test_dropping_bond_mismatches(qm9_root, small_qm9):
    ds = fixture_qm9(qm9_root, drop_bond_mismatches=True)
    n_bad = int(np.isin(small_qm9.bond_status, (BondStatus.MISMATCH, BondStatus.CONNECTIVITY)).sum())
    assert n_bad >= 1 and len(ds) == len(small_qm9) - n_bad
    assert 1642 not in ds.indices
