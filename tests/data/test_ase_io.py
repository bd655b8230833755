"""Users' own molecules: from_ase and read give the same records and batches as QM9; bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ase.build
import ase.io
from ase import Atoms

import se3t_data
from se3t_data import InvalidMoleculeError, UnsupportedElementError, collate, from_ase, read


def _atoms(record) -> Atoms:
    return Atoms(numbers=record.z.numpy(), positions=record.pos.double().numpy())


def _same_graph(a, b, atol=0.0):
    assert torch.equal(a.z, b.z)
    torch.testing.assert_close(a.pos, b.pos, atol=atol, rtol=0)
    assert torch.equal(a.edge_index, b.edge_index)
    assert torch.equal(a.bond_type, b.bond_type)
    assert torch.equal(a.x, b.x) and torch.equal(a.edge_attr, b.edge_attr)


def test_from_ase_matches_the_qm9_records(small_qm9):
    picks = [0, 30, 77, 150, 290]
    records = from_ase([_atoms(small_qm9[i]) for i in picks])
    assert [r.index for r in records] == list(range(len(picks)))
    for r, i in zip(records, picks):
        _same_graph(r, small_qm9[i])
        assert r.y is None
    single = from_ase(_atoms(small_qm9[30]))
    assert isinstance(single, se3t_data.Molecule)
    _same_graph(single, small_qm9[30])


@pytest.mark.parametrize(
    "fmt, suffix, atol", [("xyz", "xyz", 1e-6), ("extxyz", "extxyz", 1e-6), ("proteindatabank", "pdb", 1e-3)]
)
def test_read_files(tmp_path, small_qm9, fmt, suffix, atol):
    picks = [3, 60, 200]
    frames = [_atoms(small_qm9[i]) for i in picks]
    for k, f in enumerate(frames):
        f.info["homo"] = float(small_qm9[picks[k]].y)
    if fmt == "proteindatabank":  # ASE's multi-model PDB needs equal atom counts: one file per molecule
        records = []
        for k, f in enumerate(frames):
            ase.io.write(tmp_path / f"mol{k}.pdb", f, format=fmt)
            records += read(tmp_path / f"mol{k}.pdb")
    else:
        path = tmp_path / f"mols.{suffix}"
        ase.io.write(path, frames, format=fmt)
        records = read(path, target="homo") if fmt == "extxyz" else read(path)
    assert len(records) == len(picks)
    for r, i in zip(records, picks):
        _same_graph(r, small_qm9[i], atol=atol)
        if fmt == "extxyz":
            assert r.y == pytest.approx(float(small_qm9[i].y))


def test_read_sdf(tmp_path, small_qm9):
    Chem = pytest.importorskip("rdkit.Chem")
    m = small_qm9[120]
    block = Chem.MolFromXYZBlock(
        f"{m.num_nodes}\n\n" + "".join(
            f"{Chem.GetPeriodicTable().GetElementSymbol(int(z))} {x:.6f} {y:.6f} {w:.6f}\n"
            for z, (x, y, w) in zip(m.z.tolist(), m.pos.double().tolist())
        )
    )
    path = tmp_path / "mol.sdf"
    path.write_text(Chem.MolToMolBlock(block) + "$$$$\n")
    (record,) = read(path)
    _same_graph(record, m, atol=1e-4)


def test_user_molecules_batch_like_qm9(small_qm9):
    records = from_ase([_atoms(small_qm9[i]) for i in range(4)])
    batch = collate(records)
    reference = collate([small_qm9[i] for i in range(4)])
    for name in ("node_feats", "pos", "edge_index", "edge_feats", "graph_index", "node_mask", "edge_mask"):
        assert torch.equal(getattr(batch, name), getattr(reference, name)), name
    assert torch.isnan(batch.y[:4]).all(), "unknown targets are NaN, never a made-up number"


def test_elements_outside_qm9_are_refused():
    thiophene = ase.build.molecule("C4H4S")
    with pytest.raises(UnsupportedElementError, match="contains S: QM9 models only know H, C, N, O, F"):
        from_ase(thiophene)
    with pytest.raises(UnsupportedElementError, match="molecule 1 .*Cl"):
        from_ase([ase.build.molecule("CH4"), ase.build.molecule("CH3Cl")])


def test_bad_coordinates_are_refused():
    water = ase.build.molecule("H2O")
    broken = water.copy()
    broken.positions[1, 2] = np.nan
    with pytest.raises(InvalidMoleculeError, match="non-finite coordinates for atom"):
        from_ase(broken)
    squashed = water.copy()
    squashed.positions[2] = squashed.positions[0] + [0.05, 0, 0]
    with pytest.raises(InvalidMoleculeError, match=r"0\.0500 Å apart"):
        from_ase(squashed)


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read(tmp_path / "missing.xyz")
    junk = tmp_path / "junk.xyz"
    junk.write_text("three\nnot an xyz file\n")
    with pytest.raises(InvalidMoleculeError, match="ASE cannot read"):
        read(junk)


def test_radius_graph_without_bond_perception():
    mol = ase.build.molecule("CH3CH2OH")
    record = from_ase(mol, graph="radius", cutoff=2.0, bonds=False)
    assert (record.bond_type == 0).all() and (record.edge_attr[:, 4] == 1).all()
    d = np.linalg.norm(mol.positions[:, None] - mol.positions[None], axis=-1)
    assert record.num_edges == int((d <= 2.0).sum()) - len(mol)
    with pytest.raises(ValueError, match="needs bond perception"):
        from_ase(mol, graph="bonds", bonds=False)
    with pytest.raises(ValueError, match="cutoff"):
        from_ase(mol, graph="radius")
