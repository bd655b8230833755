"""Padded, static-shape batches (SPEC §8): the :class:`PaddedBatch` schema, bucket capacities and the collate.

A batch of up to ``B`` molecules is padded to a capacity ``(N_cap, E_cap)`` chosen from a few :class:`Buckets`,
and always to ``G_cap = B + 1`` graph slots, so a whole epoch has only a few distinct shapes.

Padding rules:

- at least :data:`MIN_PAD_NODES` (2) padding nodes follow the real nodes; they all belong to the dummy graph, the
  last slot ``G_cap - 1``; their features, atomic numbers are 0 and their positions ``(k, 0, 0)`` Å (k = 0, 1, ...);
- padding edges follow the real edges and join padding nodes only (``n + k % P -> n + (k + 1) % P`` for P
  padding nodes, never a self-loop); their features and bond types are 0;
- graph slots ``num_real_graphs .. G_cap - 2`` are empty (no nodes); ``y`` is 0 and ``index`` is -1 in every padding
  slot; the masks mark the real entries. Real graphs never see padding: select outputs with ``graph_mask``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._molecule import Molecule

__all__ = ["PaddedBatch", "BATCH_SCHEMA", "Buckets", "collate", "PaddedCollate", "MIN_PAD_NODES"]

MIN_PAD_NODES = 2

#: Every field of :class:`PaddedBatch`: (name, shape, dtype, meaning). ``N``/``E``/``G`` are the capacities
#: (``G`` includes the dummy slot), ``Fn``/``Fe`` the node/edge feature widths (6 and 4 for QM9 bonds), ``k`` the
#: number of tasks when there are several.
BATCH_SCHEMA: tuple[tuple[str, str, str, str], ...] = (
    ("node_feats", "[N, Fn]", "float32", "node features (QM9: one-hot H, C, N, O, F + Z); 0 for padding"),
    ("pos", "[N, 3]", "float32", "positions in Å; padding node k at (k, 0, 0)"),
    ("edge_index", "[2, E]", "int64", "[src, dst] into the batch's nodes; padding edges join padding nodes"),
    ("edge_feats", "[E, Fe]", "float32", "edge features (QM9: one-hot single/double/triple/aromatic[/none])"),
    ("graph_index", "[N]", "int64", "graph slot of each node; padding nodes in the dummy slot G - 1"),
    ("y", "[G] or [G, k]", "float32", "targets in their unit; 0 in padding slots, NaN where unknown"),
    ("node_mask", "[N]", "bool", "True for real nodes"),
    ("edge_mask", "[E]", "bool", "True for real edges"),
    ("graph_mask", "[G]", "bool", "True for real graphs (the first num_real_graphs slots)"),
    ("z", "[N]", "int64", "atomic numbers; 0 for padding"),
    ("bond_type", "[E]", "int64", "0 none, 1 single, 2 double, 3 triple, 4 aromatic; 0 for padding"),
    ("index", "[G]", "int64", "molecule number of each slot (QM9: 1..133,885); -1 for padding slots"),
    ("num_graphs", "int", "-", "G, graph slots including the dummy slot (pass to the model's pooling)"),
    ("num_real_graphs", "int", "-", "real graphs in the batch"),
    ("num_real_nodes", "int", "-", "real nodes (they come first)"),
    ("num_real_edges", "int", "-", "real edges (they come first)"),
    ("basis", "se3t.Basis: (d_in, d_out) -> [E, 2d_in+1, F, 2d_out+1]", "float", "optional bases; 0 on padding"),
)


@dataclass(frozen=True)
class PaddedBatch:
    """A padded batch of molecular graphs; see :data:`BATCH_SCHEMA` for every field's shape and dtype, and the
    module documentation for the padding rules."""

    node_feats: torch.Tensor
    pos: torch.Tensor
    edge_index: torch.Tensor
    edge_feats: torch.Tensor
    graph_index: torch.Tensor
    y: torch.Tensor
    node_mask: torch.Tensor
    edge_mask: torch.Tensor
    graph_mask: torch.Tensor
    z: torch.Tensor
    bond_type: torch.Tensor
    index: torch.Tensor
    num_graphs: int
    num_real_graphs: int
    num_real_nodes: int
    num_real_edges: int
    basis: dict | None = None

    @property
    def num_nodes(self) -> int:
        return int(self.node_feats.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    @property
    def shape(self) -> tuple[int, int, int]:
        """The static shape ``(N, E, G)``."""
        return self.num_nodes, self.num_edges, self.num_graphs

    def _map(self, fn) -> PaddedBatch:
        changes = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                changes[f.name] = fn(value)
            elif f.name == "basis" and value is not None:
                changes[f.name] = value.apply(fn)
        return dataclasses.replace(self, **changes)

    def to(self, device, non_blocking: bool = False) -> PaddedBatch:
        """The batch on ``device`` (dtypes unchanged)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PaddedBatch:
        """The batch in pinned memory (DataLoader(pin_memory=True) calls this)."""
        return self._map(lambda t: t.pin_memory())

    def model_inputs(self) -> dict:
        """Keyword arguments of the se3t model's forward (SE3TransformerPooled)."""
        inputs = dict(
            node_feats={0: self.node_feats[..., None]},
            edge_index=self.edge_index,
            pos=self.pos,
            edge_feats={0: self.edge_feats[..., None]},
            graph_index=self.graph_index,
            num_graphs=self.num_graphs,
        )
        if self.basis is not None:
            inputs["basis"] = self.basis
        return inputs

    def __repr__(self) -> str:
        return (
            f"PaddedBatch(shape(N, E, G)={self.shape}, real=({self.num_real_nodes}, {self.num_real_edges}, "
            f"{self.num_real_graphs}), basis={'yes' if self.basis is not None else 'no'})"
        )


def _round_up(x: int, multiple: int) -> int:
    return -(-int(x) // multiple) * multiple


@dataclass(frozen=True)
class Buckets:
    """Capacities ``(N_cap, E_cap)``, ascending in both, for batches of at most ``batch_size`` molecules.

    A batch takes the first bucket that holds its nodes (plus :data:`MIN_PAD_NODES`) and its edges. Make them
    with :meth:`fit`; the last bucket holds the worst case of the data it was fitted on.
    """

    batch_size: int
    capacities: tuple[tuple[int, int], ...]

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        caps = tuple((int(n), int(e)) for n, e in self.capacities)
        if not caps:
            raise ValueError("Buckets need at least one capacity")
        for (n0, e0), (n1, e1) in zip(caps, caps[1:]):
            if n1 < n0 or e1 < e0:
                raise ValueError(f"bucket capacities must be ascending in nodes and edges, got {caps}")
        if caps[0][0] < MIN_PAD_NODES:
            raise ValueError(f"node capacities must be >= {MIN_PAD_NODES}")
        object.__setattr__(self, "capacities", caps)

    @property
    def num_graphs(self) -> int:
        """Graph slots per batch, including the dummy slot."""
        return self.batch_size + 1

    def select(self, num_nodes: int, num_edges: int) -> tuple[int, int]:
        for n_cap, e_cap in self.capacities:
            if num_nodes + MIN_PAD_NODES <= n_cap and num_edges <= e_cap:
                return n_cap, e_cap
        n_max, e_max = self.capacities[-1]
        raise ValueError(
            f"a batch with {num_nodes} nodes and {num_edges} edges does not fit the largest bucket "
            f"({n_max} nodes incl. {MIN_PAD_NODES} padding, {e_max} edges); fit the buckets on data that includes "
            "these molecules (Buckets.fit) or collate without buckets"
        )

    @classmethod
    def fit(
        cls,
        num_nodes: np.ndarray,
        num_edges: np.ndarray,
        batch_size: int,
        num_buckets: int = 4,
        multiple: int = 16,
        seed: int = 0,
        num_batches: int = 4000,
    ) -> Buckets:
        """Capacities for random batches of ``batch_size`` molecules with these sizes.

        Simulates ``num_batches`` random batches; buckets ``1..num_buckets`` sit at the quantiles
        ``1/num_buckets, ..., 1`` of their total nodes and edges (rounded up to ``multiple``), and one more bucket
        holds the ``batch_size`` largest molecules together (so every batch of this data fits).
        """
        num_nodes = np.asarray(num_nodes, dtype=np.int64)
        num_edges = np.asarray(num_edges, dtype=np.int64)
        if num_nodes.shape != num_edges.shape or num_nodes.ndim != 1 or len(num_nodes) == 0:
            raise ValueError("num_nodes and num_edges must be non-empty 1-d arrays of equal length")
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        b = min(batch_size, len(num_nodes))
        rng = np.random.default_rng(seed)
        picks = np.stack([rng.choice(len(num_nodes), size=b, replace=False) for _ in range(num_batches)])
        tot_n = num_nodes[picks].sum(axis=1) + MIN_PAD_NODES
        tot_e = num_edges[picks].sum(axis=1)
        levels = np.arange(1, num_buckets + 1) / num_buckets
        caps = [
            (_round_up(np.quantile(tot_n, q, method="higher"), multiple),
             _round_up(np.quantile(tot_e, q, method="higher"), multiple))
            for q in levels
        ]  # fmt: skip
        worst = (
            _round_up(np.sort(num_nodes)[-b:].sum() + MIN_PAD_NODES, multiple),
            _round_up(np.sort(num_edges)[-b:].sum(), multiple),
        )
        caps.append(worst)
        caps = sorted(set(caps))
        # make them ascending in both coordinates
        out, e_run = [], 0
        for n, e in caps:
            e_run = max(e_run, e)
            out.append((n, e_run))
        return cls(batch_size, tuple(dict.fromkeys(out)))


def _stack_y(records: Sequence[Molecule], g_cap: int) -> torch.Tensor:
    ys = [r.y for r in records]
    known = [y for y in ys if y is not None]
    tail = tuple(known[0].shape) if known else ()
    out = torch.zeros((g_cap, *tail), dtype=torch.float32)
    for g, y in enumerate(ys):
        if y is None:
            out[g] = float("nan")
        else:
            if tuple(y.shape) != tail:
                raise ValueError(f"records have targets of different shapes: {tuple(y.shape)} and {tail}")
            out[g] = y
    return out


def collate(
    records: Sequence[Molecule],
    buckets: Buckets | None = None,
    *,
    basis_max_degree: int | None = None,
) -> PaddedBatch:
    """Pad molecules into one :class:`PaddedBatch`.

    Args:
        records: the molecules (at most ``buckets.batch_size``).
        buckets: capacities to pad to; None pads minimally (``N = nodes + 2``, ``E = edges``,
            ``G = len(records) + 1``), which gives a new shape per batch.
        basis_max_degree: compute the bases for the whole padded batch here (e.g. in DataLoader workers) with
            ``se3t.get_basis``; otherwise the bases precomputed on the records are used when all records have them.
    """
    if len(records) == 0:
        raise ValueError("cannot collate an empty list of molecules")
    if not all(isinstance(r, Molecule) for r in records):
        bad = next(type(r).__name__ for r in records if not isinstance(r, Molecule))
        raise TypeError(f"collate expects se3t_data.Molecule records, got {bad}")
    fn, fe = records[0].x.shape[1], records[0].edge_attr.shape[1]
    for r in records:
        if r.x.shape[1] != fn or r.edge_attr.shape[1] != fe:
            raise ValueError("records have different feature widths (mixed graph modes?)")
    n_nodes = np.array([r.num_nodes for r in records], dtype=np.int64)
    n_edges = np.array([r.num_edges for r in records], dtype=np.int64)
    n_real, e_real, g_real = int(n_nodes.sum()), int(n_edges.sum()), len(records)
    if buckets is None:
        n_cap, e_cap, g_cap = n_real + MIN_PAD_NODES, e_real, g_real + 1
    else:
        if g_real > buckets.batch_size:
            raise ValueError(f"{g_real} molecules exceed the buckets' batch_size {buckets.batch_size}")
        (n_cap, e_cap), g_cap = buckets.select(n_real, e_real), buckets.num_graphs
    n_pad, e_pad = n_cap - n_real, e_cap - e_real

    node_offset = torch.from_numpy(np.repeat(np.concatenate([[0], np.cumsum(n_nodes)[:-1]]), n_edges))
    pad_nodes = torch.arange(n_pad, dtype=torch.int64)
    k = torch.arange(e_pad, dtype=torch.int64)
    real_edges = torch.cat([r.edge_index for r in records], dim=1) + node_offset
    pad_edges = torch.stack([k % n_pad, (k + 1) % n_pad]) + n_real
    edge_index = torch.cat([real_edges, pad_edges], dim=1)
    pos_pad = torch.zeros(n_pad, 3)
    pos_pad[:, 0] = pad_nodes.float()
    graph_index = torch.cat(
        [torch.from_numpy(np.repeat(np.arange(g_real), n_nodes)), torch.full((n_pad,), g_cap - 1, dtype=torch.int64)]
    )
    index = torch.full((g_cap,), -1, dtype=torch.int64)
    index[:g_real] = torch.tensor([r.index for r in records], dtype=torch.int64)

    def mask(n_true: int, n: int) -> torch.Tensor:
        m = torch.zeros(n, dtype=torch.bool)
        m[:n_true] = True
        return m

    basis = None
    if basis_max_degree is None and all(r.basis is not None for r in records):
        basis = _cat_bases([r.basis for r in records], e_pad)
    pos = torch.cat([*(r.pos for r in records), pos_pad])
    if basis_max_degree is not None:
        basis = _compute_basis(pos, edge_index, basis_max_degree)
    return PaddedBatch(
        node_feats=torch.cat([*(r.x for r in records), torch.zeros(n_pad, fn)]),
        pos=pos,
        edge_index=edge_index,
        edge_feats=torch.cat([*(r.edge_attr for r in records), torch.zeros(e_pad, fe)]),
        graph_index=graph_index,
        y=_stack_y(records, g_cap),
        node_mask=mask(n_real, n_cap),
        edge_mask=mask(e_real, e_cap),
        graph_mask=mask(g_real, g_cap),
        z=torch.cat([*(r.z for r in records), torch.zeros(n_pad, dtype=torch.int64)]),
        bond_type=torch.cat([*(r.bond_type for r in records), torch.zeros(e_pad, dtype=torch.int64)]),
        index=index,
        num_graphs=g_cap,
        num_real_graphs=g_real,
        num_real_nodes=n_real,
        num_real_edges=e_real,
        basis=basis,
    )


def _cat_bases(bases: list, e_pad: int):
    from ._basis import _se3t

    Basis = _se3t().Basis
    bases = [Basis.from_pairs(b) for b in bases]
    first = bases[0]
    if all(b.harmonics is not None for b in bases):  # padding edges get zero harmonics, hence zero bases
        pad = Basis.from_harmonics(first.harmonics.new_zeros((e_pad, first.harmonics.shape[1])), first.max_degree,
                                   first.input_degrees)
    else:
        pad = Basis({d: b.new_zeros((e_pad, *b.shape[1:])) for d, b in first.blocks.items()}, first.max_degree)
    return Basis.cat([*bases, pad])


def _compute_basis(pos: torch.Tensor, edge_index: torch.Tensor, max_degree: int) -> dict:
    from ._basis import get_basis

    src, dst = edge_index
    return get_basis(pos[dst] - pos[src], max_degree)


class PaddedCollate:
    """``collate`` with fixed buckets, as a picklable ``collate_fn`` for :class:`torch.utils.data.DataLoader`."""

    def __init__(self, buckets: Buckets | None, basis_max_degree: int | None = None):
        self.buckets = buckets
        self.basis_max_degree = basis_max_degree

    def __call__(self, records: Sequence[Molecule]) -> PaddedBatch:
        return collate(records, self.buckets, basis_max_degree=self.basis_max_degree)

    def __repr__(self) -> str:
        return f"PaddedCollate({self.buckets!r}, basis_max_degree={self.basis_max_degree})"
