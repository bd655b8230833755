"""One molecule as a graph record, the graph modes and the reference features (SPEC §6)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ._targets import ATOMIC_NUMBERS

__all__ = ["Molecule", "GRAPH_MODES", "build_graph", "node_features", "edge_features", "num_edge_features"]

GRAPH_MODES = ("bonds", "radius", "full")
NUM_NODE_FEATURES = 6

@dataclass
class Molecule:
    """One molecular graph. Shapes (n atoms, e directed edges):

    - ``index``: int, the molecule's number (QM9: 1..133,885; users' molecules: position in the input list)
    - ``z`` ``[n]`` int64 atomic numbers; ``pos`` ``[n, 3]`` float32, Å
    - ``edge_index`` ``[2, e]`` int64, ``[src, dst]``, both directions of every pair, sorted by (src, dst)
    - ``bond_type`` ``[e]`` int64: 0 no bond (radius/full modes only), 1 single, 2 double, 3 triple, 4 aromatic
    - ``x`` ``[n, 6]`` float32: one-hot H, C, N, O, F, then Z
    - ``edge_attr`` ``[e, 4]`` float32 one-hot single/double/triple/aromatic (``[e, 5]`` in the radius and full
      modes: a fifth column marks "no bond")
    - ``y``: float32 tensor ``[]`` (one task) or ``[k]`` (several), or None when unknown
    - ``basis``: optional precomputed bases ``{(d_in, d_out): [e, 2 d_in + 1, F, 2 d_out + 1]}``
    """

    index: int
    z: torch.Tensor
    pos: torch.Tensor
    edge_index: torch.Tensor
    bond_type: torch.Tensor
    x: torch.Tensor
    edge_attr: torch.Tensor
    y: torch.Tensor | None = None
    basis: dict | None = field(default=None, repr=False)

    @property
    def num_nodes(self) -> int:
        return int(self.z.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def __repr__(self) -> str:
        y = None if self.y is None else self.y.tolist()
        return f"Molecule(index={self.index}, num_nodes={self.num_nodes}, num_edges={self.num_edges}, y={y})"


def num_edge_features(graph: str) -> int:
    return 4 if graph == "bonds" else 5


# lookup tables: row z of _NODE_TABLE is the feature row of element z; rows of unsupported elements are NaN
_NODE_TABLE = np.full((128, NUM_NODE_FEATURES), np.nan, dtype=np.float32)
for _slot, _z in enumerate(ATOMIC_NUMBERS):
    _NODE_TABLE[_z] = 0.0
    _NODE_TABLE[_z, _slot] = 1.0
    _NODE_TABLE[_z, 5] = _z
# row t of _EDGE_TABLE[width] is the feature row of bond type t (type 0 has no row in the 4-wide bonds mode)
_EDGE_TABLE = {
    4: np.concatenate([np.full((1, 4), np.nan, np.float32), np.eye(4, dtype=np.float32)]),
    5: np.concatenate([np.eye(5, dtype=np.float32)[4:], np.eye(5, dtype=np.float32)[:4]]),
}


def node_features(z: np.ndarray) -> np.ndarray:
    """``[n, 6]`` float32: one-hot H, C, N, O, F and the atomic number Z (the reference's node input)."""
    z = np.asarray(z, dtype=np.int64)
    x = _NODE_TABLE[np.clip(z, 0, 127)]
    if np.isnan(x[:, 5]).any() or (z > 127).any():
        bad = sorted(set(z[np.isnan(x[:, 5]) | (z > 127)].tolist()))
        raise ValueError(f"elements with atomic numbers {bad} are not H, C, N, O, F")
    return x


def edge_features(bond_type: np.ndarray, graph: str) -> np.ndarray:
    """One-hot edge features: ``[e, 4]`` (bonds mode) or ``[e, 5]`` with a trailing "no bond" column."""
    bond_type = np.asarray(bond_type, dtype=np.int64)
    if len(bond_type) and (bond_type.min() < 0 or bond_type.max() > 4):
        raise ValueError(f"bond types must lie in 0..4, got {sorted(set(bond_type.tolist()))}")
    out = _EDGE_TABLE[num_edge_features(graph)][bond_type]
    if graph == "bonds" and (bond_type == 0).any():
        raise ValueError("bond type 0 ('no bond') only exists in the radius and full graph modes")
    return out


def _sorted_edges(src: np.ndarray, dst: np.ndarray, types: np.ndarray):
    order = np.lexsort((dst, src))
    return np.stack([src[order], dst[order]]), types[order]


def build_graph(
    n: int, pos: np.ndarray, bonds: np.ndarray, bond_types: np.ndarray, graph: str, cutoff: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed edges and their bond types for one molecule.

    - ``'bonds'``: both directions of every covalent bond.
    - ``'radius'``: every ordered pair i != j with |pos_j - pos_i| <= cutoff, typed by its bond (0 = no bond). A
      bond longer than the cutoff is left out (none in QM9 for a cutoff >= 1.8 Å).
    - ``'full'``: every ordered pair i != j, typed by its bond.
    Returns ``edge_index [2, e]`` int64 and ``bond_type [e]`` int64.
    """
    bonds = np.asarray(bonds, dtype=np.int64).reshape(-1, 2)
    bond_types = np.asarray(bond_types, dtype=np.int64)
    if graph == "bonds":
        src = np.concatenate([bonds[:, 0], bonds[:, 1]])
        dst = np.concatenate([bonds[:, 1], bonds[:, 0]])
        return _sorted_edges(src, dst, np.concatenate([bond_types, bond_types]))
    if graph not in GRAPH_MODES:
        raise ValueError(f"graph must be one of {GRAPH_MODES}, got {graph!r}")
    table = np.zeros((n, n), dtype=np.int64)
    table[bonds[:, 0], bonds[:, 1]] = bond_types
    table[bonds[:, 1], bonds[:, 0]] = bond_types
    keep = ~np.eye(n, dtype=bool)
    if graph == "radius":
        if cutoff is None or not cutoff > 0:
            raise ValueError("graph='radius' needs a positive cutoff (Å)")
        pos = np.asarray(pos, dtype=np.float64)
        d = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
        keep &= d <= cutoff
    src, dst = np.nonzero(keep)  # row-major: already sorted by (src, dst)
    return np.stack([src, dst]).astype(np.int64), table[src, dst]


def make_molecule(
    index: int,
    z: np.ndarray,
    pos: np.ndarray,
    bonds: np.ndarray,
    bond_types: np.ndarray,
    graph: str,
    cutoff: float | None,
    y: torch.Tensor | None,
) -> Molecule:
    edge_index, bond_type = build_graph(len(z), pos, bonds, bond_types, graph, cutoff)
    return Molecule(
        index=int(index),
        z=torch.from_numpy(np.asarray(z, dtype=np.int64)),
        pos=torch.from_numpy(np.ascontiguousarray(pos, dtype=np.float32)),
        edge_index=torch.from_numpy(np.ascontiguousarray(edge_index, dtype=np.int64)),
        bond_type=torch.from_numpy(np.ascontiguousarray(bond_type, dtype=np.int64)),
        x=torch.from_numpy(node_features(z)),
        edge_attr=torch.from_numpy(edge_features(bond_type, graph)),
        y=y,
    )
