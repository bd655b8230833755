"""Benchmark inputs as plain dicts of tensors (schema in :mod:`benchmarks.cells`).

* :func:`qm9_batches` - random real QM9 batches from ``se3t_data`` (bucketed padded batches, train split).
* :func:`synthetic_molecule_batches` - molecule-like graphs (~18 atoms, ~37 directed bonds per molecule) for
  machines without the data set and for the smoke test.
* :func:`pack_batches` / :func:`load_packed_batches` - those QM9 batches saved to one file and read back, for a
  machine without the data set's extras (a lent GPU).
* :func:`point_cloud` - uniform-density random points in a cube with a radius graph (``se3t.graph``).
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple

import torch

__all__ = ["qm9_batches", "synthetic_molecule_batches", "point_cloud", "from_padded_batch", "pack_batches",
           "load_packed_batches", "add_batch_arguments", "batches_from_args"]


def from_padded_batch(batch, y_mean: float = 0.0, y_std: float = 1.0) -> dict:
    """A ``se3t_data.PaddedBatch`` as a benchmark input dict (targets standardised)."""
    y = batch.y if batch.y.dim() == 1 else batch.y[:, 0]
    return {
        "node_feats": batch.node_feats, "pos": batch.pos, "edge_index": batch.edge_index,
        "edge_feats": batch.edge_feats, "graph_index": batch.graph_index, "num_graphs": int(batch.num_graphs),
        "graph_mask": batch.graph_mask, "node_mask": batch.node_mask,
        "y": torch.where(batch.graph_mask, (y - y_mean) / y_std, torch.zeros_like(y)),
        "num_real_graphs": int(batch.num_real_graphs), "num_real_nodes": int(batch.num_real_nodes),
        "num_real_edges": int(batch.num_real_edges),
    }


def qm9_batches(batch_size: int, num_batches: int, seed: int = 0, root: Optional[str] = None,
                eq_molecules: int = 8) -> Tuple[List[dict], dict, dict]:
    """``num_batches`` random batches of ``batch_size`` molecules of the QM9 training split (task homo), padded to
    the buckets ``se3t_data.BucketSampler`` fits, plus a small minimally padded batch for the equivariance check
    and a description of the data."""
    import se3t_data  # noqa: PLC0415  (optional: only the qm9 suite on real data needs it)

    ds = se3t_data.QM9(root=root, task="homo", progress=False)
    train, _, _ = ds.split()
    sampler = se3t_data.BucketSampler(train, batch_size=batch_size, shuffle=True, seed=seed, drop_last=True)
    collate = sampler.collate_fn
    mean, std = float(ds.target_mean), float(ds.target_std)
    batches = []
    for positions in sampler:
        batches.append(from_padded_batch(collate([train[i] for i in positions]), mean, std))
        if len(batches) == num_batches:
            break
    eq = from_padded_batch(se3t_data.collate([train[i] for i in range(eq_molecules)]), mean, std)
    info = {"source": "qm9", "data_set": repr(ds), "split": "train", "molecules": len(train), "task": "homo",
            "buckets": [list(c) for c in sampler.buckets.capacities], "sampler_seed": seed,
            "load_seconds": getattr(ds, "load_seconds", None)}
    return batches, eq, info


def pack_batches(path, batch_sizes: List[int], num_batches: int, seed: int = 0, root: Optional[str] = None) -> None:
    """Save :func:`qm9_batches` for each batch size to one ``torch.save`` file (tensors and plain values only), so
    a machine without ase, rdkit or the QM9 cache (a lent GPU) measures the same real batches."""
    packed = {int(bs): qm9_batches(bs, num_batches, seed=seed, root=root) for bs in batch_sizes}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"format": "se3t-benchmark-batches-v1", "batches": packed}, path)


def load_packed_batches(path, batch_size: int, num_batches: int) -> Tuple[List[dict], dict, dict]:
    """The first ``num_batches`` batches of ``batch_size`` molecules from a :func:`pack_batches` file, with its
    equivariance batch and data description (``source`` stays ``qm9``; ``packed_file`` names the file)."""
    packed = torch.load(path, weights_only=True)
    if not isinstance(packed, dict) or packed.get("format") != "se3t-benchmark-batches-v1":
        raise SystemExit(f"{path} is not a file written by `python -m benchmarks pack-data`")
    if batch_size not in packed["batches"]:
        raise SystemExit(f"{path} holds batch sizes {sorted(packed['batches'])}, not {batch_size}")
    batches, eq, info = packed["batches"][batch_size]
    if len(batches) < num_batches:
        raise SystemExit(f"{path} holds {len(batches)} batches of {batch_size}, fewer than --num-batches {num_batches}")
    return batches[:num_batches], eq, dict(info, packed_file=str(path))


def _molecule(gen: torch.Generator, num_atoms: int):
    """A random tree of atoms 1.1-1.6 Å apart plus one ring-closing bond: ~2 directed edges per atom."""
    pos = torch.zeros(num_atoms, 3)
    bonds = []
    for i in range(1, num_atoms):
        parent = int(torch.randint(0, i, (1,), generator=gen))
        direction = torch.randn(3, generator=gen)
        length = 1.1 + 0.5 * float(torch.rand(1, generator=gen))
        pos[i] = pos[parent] + direction / direction.norm() * length
        bonds.append((parent, i))
    if num_atoms > 4:
        d = torch.cdist(pos, pos)
        d.fill_diagonal_(float("inf"))
        for a, b in bonds:
            d[a, b] = d[b, a] = float("inf")
        a, b = divmod(int(d.argmin()), num_atoms)
        bonds.append((min(a, b), max(a, b)))
    z_choices = torch.tensor([1, 6, 7, 8, 9])
    elem = torch.randint(0, 5, (num_atoms,), generator=gen)
    x = torch.zeros(num_atoms, 6)
    x[torch.arange(num_atoms), elem] = 1.0
    x[:, 5] = z_choices[elem].float()
    und = torch.tensor(bonds, dtype=torch.long).T
    edge_index = torch.cat([und, und.flip(0)], dim=1)
    btype = torch.randint(0, 4, (und.shape[1],), generator=gen).repeat(2)
    edge_feats = torch.nn.functional.one_hot(btype, 4).float()
    return x, pos, edge_index, edge_feats


def _pad(mols: List[tuple], y: torch.Tensor) -> dict:
    """Disjoint union plus 2 padding nodes (dummy graph) joined by 2 padding edges, as se3t_data pads."""
    xs, poss, eis, efs, gis = [], [], [], [], []
    offset = 0
    for g, (x, pos, ei, ef) in enumerate(mols):
        xs.append(x), poss.append(pos), eis.append(ei + offset), efs.append(ef)
        gis.append(torch.full((x.shape[0],), g, dtype=torch.long))
        offset += x.shape[0]
    n, e, g = offset, sum(ei.shape[1] for ei in eis), len(mols)
    pad_pos = torch.tensor([[0.0, 0, 0], [1.0, 0, 0]])
    node_feats = torch.cat(xs + [torch.zeros(2, xs[0].shape[1])])
    edge_index = torch.cat(eis + [torch.tensor([[n, n + 1], [n + 1, n]])], dim=1)
    return {
        "node_feats": node_feats, "pos": torch.cat(poss + [pad_pos]), "edge_index": edge_index,
        "edge_feats": torch.cat(efs + [torch.zeros(2, efs[0].shape[1])]),
        "graph_index": torch.cat(gis + [torch.full((2,), g, dtype=torch.long)]), "num_graphs": g + 1,
        "graph_mask": torch.arange(g + 1) < g, "node_mask": torch.arange(n + 2) < n,
        "y": torch.cat([y, torch.zeros(1)]), "num_real_graphs": g, "num_real_nodes": n, "num_real_edges": e,
    }


def synthetic_molecule_batches(batch_size: int, num_batches: int, seed: int = 0,
                               eq_molecules: int = 8) -> Tuple[List[dict], dict, dict]:
    """Molecule-like batches: 10-26 atoms (mean ~18), tree + one ring bond (~37 directed edges per molecule)."""
    gen = torch.Generator().manual_seed(seed)

    def batch(n: int) -> dict:
        sizes = torch.randint(10, 27, (n,), generator=gen).tolist()
        return _pad([_molecule(gen, s) for s in sizes], torch.randn(n, generator=gen))

    batches = [batch(batch_size) for _ in range(num_batches)]
    eq = batch(eq_molecules)
    info = {"source": "synthetic", "atoms_per_molecule": "uniform 10..26", "seed": seed}
    return batches, eq, info


def point_cloud(num_points: int, neighbours: float = 16.0, density: float = 0.05, seed: int = 0,
                features: int = 1) -> dict:
    """Uniform random points (``density`` per Å^3) in a cube, radius graph with ``neighbours`` expected per point
    in the bulk; node targets random. One graph, no padding."""
    from se3t.graph import radius_graph  # noqa: PLC0415

    gen = torch.Generator().manual_seed(seed)
    side = (num_points / density) ** (1.0 / 3.0)
    radius = (3.0 * neighbours / (4.0 * math.pi * density)) ** (1.0 / 3.0)
    pos = torch.rand(num_points, 3, generator=gen) * side
    edge_index = radius_graph(pos, radius)
    n, e = num_points, int(edge_index.shape[1])
    return {
        "node_feats": torch.randn(n, features, generator=gen), "pos": pos, "edge_index": edge_index,
        "edge_feats": torch.zeros(e, 0), "graph_index": torch.zeros(n, dtype=torch.long), "num_graphs": 1,
        "graph_mask": torch.ones(1, dtype=torch.bool), "node_mask": torch.ones(n, dtype=torch.bool),
        "y": torch.randn(n, generator=gen), "num_real_graphs": 1, "num_real_nodes": n, "num_real_edges": e,
        "radius": radius, "side": side,
    }


def add_batch_arguments(parser, num_batches: Optional[int] = None) -> None:
    """``--data-file`` and ``--batch-size`` (and ``--num-batches`` when given a default) of the one-model tools
    (``benchmarks.profile_step``, ``memory_peak``, ``paired``)."""
    parser.add_argument("--data-file", default=None, help="batches saved by `python -m benchmarks pack-data` "
                        "(default: synthetic molecule-like batches)")
    parser.add_argument("--batch-size", type=int, default=100)
    if num_batches is not None:
        parser.add_argument("--num-batches", type=int, default=num_batches, help="distinct batches, cycled")


def batches_from_args(args, num_batches: int, seed: int = 0) -> Tuple[List[dict], dict]:
    """``num_batches`` batches as :func:`add_batch_arguments` chose (saved QM9 batches or synthetic molecules) and
    their description."""
    if args.data_file:
        batches, _, info = load_packed_batches(args.data_file, args.batch_size, num_batches)
    else:
        batches, _, info = synthetic_molecule_batches(args.batch_size, num_batches, seed=seed)
    return batches, info
