"""Optional precomputed kernel bases per molecule (the reference's ``--precompute_bases``).

Bases depend only on the edge vectors (SPEC §2), so they can be computed once per data set. What is stored is
the edges' spherical harmonics (``se3t.Basis.harmonics``): ``(2 max_degree + 1)**2`` numbers per directed edge,
49 for ``max_degree`` 3 (196 bytes in float32), from which the fused convolution makes the bases itself; QM9
with bonds (~4.8 M directed edges) then needs ~0.94 GB in float32. The materialised bases would be 1,092 numbers
per edge (:func:`basis_numel_per_edge`, ~21 GB). The alternatives are computing them per batch in the
DataLoader workers (``PaddedCollate(buckets, basis_max_degree=3)``) or inside the model (the default).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ._molecule import Molecule

__all__ = ["get_basis", "basis_numel_per_edge", "precompute_bases", "WithBases"]


def _se3t():
    try:
        import se3t
    except ImportError as err:  # pragma: no cover - se3t ships in the same distribution
        raise ImportError("computing bases needs the se3t core package (same distribution as se3t_data)") from err
    return se3t


def get_basis(rel_pos: torch.Tensor, max_degree: int):
    """``se3t.get_basis``: a ``se3t.Basis`` mapping ``(d_in, d_out) -> [E, 2d_in+1, F, 2d_out+1]``."""
    return _se3t().get_basis(rel_pos, max_degree)


def basis_numel_per_edge(max_degree: int) -> int:
    """Numbers per directed edge of the materialised bases of all degree pairs up to ``max_degree`` (1,092 for
    3). What :func:`precompute_bases` stores is ``(2 max_degree + 1)**2`` (the harmonics)."""
    return sum(
        (2 * a + 1) * (2 * min(a, b) + 1) * (2 * b + 1) for a in range(max_degree + 1) for b in range(max_degree + 1)
    )


def _available_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 62


class WithBases(torch.utils.data.Dataset):
    """A data set whose molecules carry precomputed bases (``record.basis``). Make it with
    :func:`precompute_bases`. Attribute access falls through to the wrapped data set (``num_nodes``,
    ``target_mean``, ...)."""

    def __init__(self, dataset, max_degree: int, harmonics: torch.Tensor, edge_ptr: np.ndarray):
        self.dataset = dataset
        self.max_degree = max_degree
        self._harmonics = harmonics  # [E_total, (2 max_degree + 1)**2]
        self._edge_ptr = edge_ptr

    @property
    def nbytes(self) -> int:
        """Memory held by the bases (their harmonics)."""
        return self._harmonics.numel() * self._harmonics.element_size()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i) -> Molecule:
        record = self.dataset[i]
        i = int(i) % len(self)
        e0, e1 = int(self._edge_ptr[i]), int(self._edge_ptr[i + 1])
        if e1 - e0 != record.num_edges:
            raise RuntimeError("the wrapped data set changed since its bases were computed")
        basis = _se3t().Basis.from_harmonics(self._harmonics[e0:e1], self.max_degree)
        return Molecule(**{**record.__dict__, "basis": basis})

    def __getattr__(self, name):
        if name.startswith("_") or name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def precompute_bases(
    dataset,
    max_degree: int,
    *,
    dtype: torch.dtype = torch.float32,
    chunk: int = 2048,
    max_bytes: int | None = None,
) -> WithBases:
    """Compute the bases of every molecule of ``dataset`` once (with ``se3t.get_basis`` in float32; their
    harmonics stored as ``dtype``) and return a :class:`WithBases` wrapper.

    Raises :class:`MemoryError` before computing anything when the bases would exceed ``max_bytes`` (default: half
    of the memory available now), with the estimate in the message.
    """
    n_edges = np.asarray(
        dataset.num_edges if hasattr(dataset, "num_edges") else [dataset[i].num_edges for i in range(len(dataset))],
        dtype=np.int64,
    )
    per_edge = (2 * max_degree + 1) ** 2 * torch.empty((), dtype=dtype).element_size()
    need = int(n_edges.sum()) * per_edge
    limit = _available_bytes() // 2 if max_bytes is None else max_bytes
    if need > limit:
        raise MemoryError(
            f"precomputed bases for {len(n_edges)} molecules ({int(n_edges.sum())} edges, max_degree={max_degree}, "
            f"{dtype}) need {need / 2**30:.2f} GiB, over the limit of {limit / 2**30:.2f} GiB. Use a subset, "
            "dtype=torch.float16, or compute bases per batch: PaddedCollate(buckets, basis_max_degree=...)"
        )
    edge_ptr = np.concatenate([[0], np.cumsum(n_edges)])
    harmonics = torch.empty((int(edge_ptr[-1]), (2 * max_degree + 1) ** 2), dtype=dtype)
    for start in range(0, len(n_edges), chunk):
        records = [dataset[i] for i in range(start, min(start + chunk, len(n_edges)))]
        rel = torch.cat([r.pos[r.edge_index[1]] - r.pos[r.edge_index[0]] for r in records])
        sh = get_basis(rel, max_degree).harmonics
        e0 = int(edge_ptr[start])
        harmonics[e0 : e0 + sh.shape[0]] = sh.to(dtype)
    return WithBases(dataset, max_degree, harmonics, edge_ptr)
