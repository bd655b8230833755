"""The QM9 data set (SPEC §6): 130,831 molecules, bonds from RDKit, 19 targets, the reference split."""

from __future__ import annotations

import json
import operator
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ._bonds import BondStatus
from ._molecule import GRAPH_MODES, NUM_NODE_FEATURES, Molecule, make_molecule, num_edge_features
from ._preprocess import load_or_build
from ._sources import resolve_source
from ._targets import TARGET_NAMES, target

__all__ = ["QM9", "QM9Subset", "REFERENCE_SPLIT", "split_sizes", "default_root"]

#: train / validation / test sizes of the reference protocol.
REFERENCE_SPLIT = (100_000, 17_748, 13_083)


def default_root() -> Path:
    """``$SE3T_DATA_ROOT``, else ``$XDG_CACHE_HOME/se3t/qm9`` (default ``~/.cache/se3t/qm9``)."""
    if env := os.environ.get("SE3T_DATA_ROOT"):
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "se3t" / "qm9"


def split_sizes(n: int) -> tuple[int, int, int]:
    """Reference sizes for the full data set; the same proportions (rounded) for any other size."""
    total = sum(REFERENCE_SPLIT)
    if n == total:
        return REFERENCE_SPLIT
    train = round(n * REFERENCE_SPLIT[0] / total)
    val = round(n * REFERENCE_SPLIT[1] / total)
    return train, val, n - train - val


class _Molecules(torch.utils.data.Dataset):
    """What QM9 and its subsets share. ``_rows`` are row numbers in the owning :class:`QM9`'s arrays."""

    _owner: QM9
    _rows: np.ndarray

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i) -> Molecule:
        i = operator.index(i)
        n = len(self._rows)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a data set of {n} molecules")
        return self._owner._record(int(self._rows[i]))

    # sizes, for bucketing ------------------------------------------------------------------------------------
    @property
    def num_nodes(self) -> np.ndarray:
        """``[len]`` int64: atoms per molecule."""
        return self._owner._num_nodes_all()[self._rows]

    @property
    def num_edges(self) -> np.ndarray:
        """``[len]`` int64: directed edges per molecule in this graph mode."""
        return self._owner._num_edges_all()[self._rows]

    # identity -----------------------------------------------------------------------------------------------
    @property
    def indices(self) -> np.ndarray:
        """``[len]`` int64: the QM9 numbers (1..133,885) of the molecules, in order."""
        return self._owner._arrays["index"][self._rows].astype(np.int64)

    @property
    def y(self) -> torch.Tensor:
        """All targets of the task(s), ``[len]`` or ``[len, k]`` float32, in the task's unit."""
        return torch.from_numpy(self._owner._task_values(self._rows)).float()

    # subsets ------------------------------------------------------------------------------------------------
    def subset(self, positions: Sequence[int] | np.ndarray | torch.Tensor) -> QM9Subset:
        """The molecules at these positions (0-based, of this data set), in this order."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        n = len(self._rows)
        if len(positions) and (positions.min() < -n or positions.max() >= n):
            raise IndexError(f"subset positions out of range for a data set of {n} molecules")
        return QM9Subset(self._owner, self._rows[positions])

    def random_subset(self, n: int, seed: int = 0) -> QM9Subset:
        """``n`` molecules drawn without replacement (e.g. the 5,000 of a demo run)."""
        if not 0 <= n <= len(self):
            raise ValueError(f"cannot draw {n} molecules from a data set of {len(self)}")
        return self.subset(np.sort(np.random.default_rng(seed).permutation(len(self))[:n]))

    def target_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (population) standard deviation of the task's target over these molecules, float32."""
        values = self._owner._task_values(self._rows)
        if len(values) == 0:
            raise ValueError("cannot compute target statistics of an empty data set")
        return torch.tensor(values.mean(axis=0)).float(), torch.tensor(values.std(axis=0)).float()

    @property
    def num_node_features(self) -> int:
        return NUM_NODE_FEATURES

    @property
    def num_edge_features(self) -> int:
        return num_edge_features(self._owner.graph)


class QM9Subset(_Molecules):
    """Some molecules of a :class:`QM9`, sharing its arrays (cheap to make, picklable for DataLoader workers)."""

    def __init__(self, owner: QM9, rows: np.ndarray):
        self._owner = owner
        self._rows = np.asarray(rows, dtype=np.int64)

    def __repr__(self) -> str:
        return f"QM9Subset({len(self)} molecules, task={self._owner.task!r}, graph={self._owner.graph!r})"


class QM9(_Molecules):
    """QM9 as graphs (SPEC §6).

    Args:
        root: folder for the cache and (optionally) the raw archive ``dsgdb9nsd.xyz.tar.bz2``;
            default :func:`default_root`.
        task: a target name (``'homo'``, see :data:`~se3t_data.TARGET_NAMES`) or a sequence of names.
        graph: ``'bonds'`` (covalent bonds), ``'radius'`` (pairs within ``cutoff`` Å) or ``'full'``.
        cutoff: radius in Å for ``graph='radius'``.
        source: ``'auto'`` (archive in ``root``, else qm9pack, else ``download_url``), ``'archive'`` or
            ``'qm9pack'``.
        download_url, sha256: where to fetch the archive when it is absent, and its checksum.
        seed: the split seed used by :meth:`split` and by :attr:`target_mean` / :attr:`target_std`.
        drop_bond_mismatches: leave out the molecules whose perceived bonds do not reproduce the data set's SMILES
            even after repair (:attr:`BondStatus.MISMATCH`, :attr:`BondStatus.CONNECTIVITY`); off by default, so
            that the data set has the reference's 130,831 molecules.
        num_workers: processes for the one-off preprocessing (0: in this process).
        progress: show a progress bar while preprocessing.
        force_reprocess: ignore an existing cache.
        expect_complete: fail unless the source holds all 130,831 molecules (turn off for partial sources).

    ``ds[i]`` is a :class:`~se3t_data.Molecule`; ``y`` is the task's target in its unit (energies in eV).
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        task: str | Sequence[str] = "homo",
        graph: str = "bonds",
        cutoff: float | None = None,
        *,
        source: str = "auto",
        download_url: str | None = None,
        sha256: str | None = None,
        seed: int = 0,
        drop_bond_mismatches: bool = False,
        num_workers: int = 2,
        progress: bool = True,
        force_reprocess: bool = False,
        expect_complete: bool = True,
    ):
        if graph not in GRAPH_MODES:
            raise ValueError(f"graph must be one of {GRAPH_MODES}, got {graph!r}")
        if graph == "radius" and (cutoff is None or not cutoff > 0):
            raise ValueError("graph='radius' needs a positive cutoff in Å, e.g. cutoff=5.0")
        if graph != "radius" and cutoff is not None:
            raise ValueError(f"cutoff only applies to graph='radius', not graph={graph!r}")
        tasks = (task,) if isinstance(task, str) else tuple(task)
        if not tasks:
            raise ValueError("task must name at least one target")
        self._task_cols = [TARGET_NAMES.index(target(t).name) for t in tasks]
        self.task = task if isinstance(task, str) else tasks
        self.graph = graph
        self.cutoff = cutoff
        self.seed = seed
        self.root = Path(root).expanduser() if root is not None else default_root()

        t0 = time.perf_counter()
        src = resolve_source(self.root, source, download_url, sha256)
        self._arrays, self.cache_file = load_or_build(
            self.root,
            src,
            num_workers=num_workers,
            progress=progress,
            force=force_reprocess,
            expect_complete=expect_complete,
        )
        self.load_seconds = time.perf_counter() - t0
        self.info: dict = json.loads(str(self._arrays["meta"]))
        status = self._arrays["bond_status"]
        rows = np.arange(len(status), dtype=np.int64)
        if drop_bond_mismatches:
            rows = rows[np.isin(status, (BondStatus.MISMATCH, BondStatus.CONNECTIVITY), invert=True)]
        self._owner = self
        self._rows = rows
        self._n_nodes: np.ndarray | None = None
        self._n_edges: np.ndarray | None = None
        self._stats: tuple | None = None

    def __repr__(self) -> str:
        return (
            f"QM9({len(self)} molecules, task={self.task!r}, graph={self.graph!r}"
            + (f", cutoff={self.cutoff}" if self.cutoff is not None else "")
            + f", source={self.info['source_kind']!r})"
        )

    # units and targets --------------------------------------------------------------------------------------
    @property
    def unit(self) -> str | tuple[str, ...]:
        units = tuple(target(TARGET_NAMES[c]).unit for c in self._task_cols)
        return units[0] if isinstance(self.task, str) else units

    @property
    def bond_status(self) -> np.ndarray:
        """``[len]`` int8 :class:`BondStatus` of each molecule."""
        return self._arrays["bond_status"][self._rows]

    @property
    def smiles_agreement(self) -> float:
        """Fraction of all preprocessed molecules whose perceived bonds (default or Hückel) reproduce the
        data set's SMILES."""
        return float(self.info["smiles_agreement"])

    def targets(self, name: str) -> torch.Tensor:
        """One of the 19 targets for every molecule, ``[len]`` float64, in its unit."""
        return torch.from_numpy(self._arrays["targets"][self._rows, TARGET_NAMES.index(target(name).name)])

    def _task_values(self, rows: np.ndarray) -> np.ndarray:
        values = self._arrays["targets"][rows][:, self._task_cols]
        return values[:, 0] if isinstance(self.task, str) else values

    # split and normalisation --------------------------------------------------------------------------------
    def split(self, seed: int | None = None) -> tuple[QM9Subset, QM9Subset, QM9Subset]:
        """Random train / validation / test split: 100,000 / 17,748 / 13,083 on the full data set (the same
        proportions otherwise), from a permutation seeded with ``seed`` (default: the data set's ``seed``)."""
        seed = self.seed if seed is None else seed
        perm = np.random.default_rng(seed).permutation(len(self))
        n_train, n_val, _ = split_sizes(len(self))
        return (
            self.subset(perm[:n_train]),
            self.subset(perm[n_train : n_train + n_val]),
            self.subset(perm[n_train + n_val :]),
        )

    def _train_stats(self):
        if self._stats is None:
            self._stats = self.split()[0].target_stats()
        return self._stats

    @property
    def target_mean(self) -> float | torch.Tensor:
        """Mean of the task's target over the **train split** (seed ``self.seed``): a float, or ``[k]``."""
        mean = self._train_stats()[0]
        return float(mean) if isinstance(self.task, str) else mean

    @property
    def target_std(self) -> float | torch.Tensor:
        """Standard deviation of the task's target over the train split: a float, or ``[k]``."""
        std = self._train_stats()[1]
        return float(std) if isinstance(self.task, str) else std

    # records ------------------------------------------------------------------------------------------------
    def _record(self, row: int) -> Molecule:
        a = self._arrays
        a0, a1 = a["atom_ptr"][row], a["atom_ptr"][row + 1]
        b0, b1 = a["bond_ptr"][row], a["bond_ptr"][row + 1]
        y = torch.from_numpy(np.asarray(self._task_values(np.array([row]))[0], dtype=np.float32))
        return make_molecule(
            int(a["index"][row]),
            a["z"][a0:a1],
            a["pos"][a0:a1],
            a["bonds"][b0:b1],
            a["bond_type"][b0:b1],
            self.graph,
            self.cutoff,
            y,
        )

    def _num_nodes_all(self) -> np.ndarray:
        if self._n_nodes is None:
            self._n_nodes = np.diff(self._arrays["atom_ptr"]).astype(np.int64)
        return self._n_nodes

    def _num_edges_all(self) -> np.ndarray:
        if self._n_edges is None:
            n = self._num_nodes_all()
            if self.graph == "bonds":
                self._n_edges = 2 * np.diff(self._arrays["bond_ptr"]).astype(np.int64)
            elif self.graph == "full":
                self._n_edges = n * (n - 1)
            else:
                self._n_edges = self._radius_edge_counts()
        return self._n_edges

    def _radius_edge_counts(self) -> np.ndarray:
        n = self._num_nodes_all()
        ptr = self._arrays["atom_ptr"]
        pos = self._arrays["pos"].astype(np.float64)
        counts = np.zeros(len(n), dtype=np.int64)
        for size in np.unique(n):  # molecules of equal size at once: [m, size, 3]
            rows = np.nonzero(n == size)[0]
            p = pos[ptr[rows][:, None] + np.arange(size)]
            d = np.linalg.norm(p[:, :, None, :] - p[:, None, :, :], axis=-1)
            counts[rows] = (d <= self.cutoff).sum(axis=(1, 2)) - size
        return counts
