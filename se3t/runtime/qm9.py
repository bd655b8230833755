"""The QM9 side of the runtime: data set, splits, subsets, bucketed collate (via ``se3t_data``)."""

from __future__ import annotations

from typing import Any

from .build import TargetInfo
from .errors import UserError

__all__ = ["load_qm9", "target_info", "make_collate", "take_subset"]


def _se3t_data():
    try:
        import se3t_data
    except ImportError as e:  # rdkit or another data dependency missing
        raise UserError(f"the QM9 data package cannot be imported ({e}); install the data extras: "
                        "pip install 'se3t[data]'") from None
    return se3t_data


def load_qm9(data_dir: str | None, task: str, split_seed: int, *, allow_partial: bool = False,
             progress: bool = True, num_workers: int = 2):
    """``se3t_data.QM9`` with every user-facing failure turned into a :class:`UserError`."""
    sd = _se3t_data()
    if task not in sd.TARGET_NAMES:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(sd.TARGET_NAMES)}")
    try:
        return sd.QM9(root=data_dir, task=task, seed=split_seed, progress=progress, num_workers=num_workers,
                      expect_complete=not allow_partial)
    except sd.QM9SourceError as e:
        raise UserError(f"QM9 data: {e}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"QM9 data in {data_dir or sd.default_root()}: {e}") from None


def target_info(ds) -> TargetInfo:
    return TargetInfo(name=str(ds.task), unit=str(ds.unit), mean=float(ds.target_mean), std=float(ds.target_std))


def take_subset(part, n: int | None, what: str):
    """The first ``n`` molecules of a (randomly ordered) split; all of it when ``n`` is None."""
    if n is None:
        return part
    if n > len(part):
        raise UserError(f"{what} asks for {n} molecules, but the split has only {len(part)}")
    return part.subset(range(n))


def make_collate(fit_on, batch_size: int, *, basis_max_degree: int | None = None, seed: int = 0) -> Any:
    """A picklable collate padding to a few bucket capacities fitted on ``fit_on`` (one data set or several:
    fit on every set the collate will see, so that its largest molecules fit too)."""
    import numpy as np

    sd = _se3t_data()
    parts = fit_on if isinstance(fit_on, (list, tuple)) else [fit_on]
    nodes = np.concatenate([np.asarray(p.num_nodes) for p in parts])
    edges = np.concatenate([np.asarray(p.num_edges) for p in parts])
    buckets = sd.Buckets.fit(nodes, edges, batch_size, seed=seed, num_batches=500)
    return sd.PaddedCollate(buckets, basis_max_degree=basis_max_degree)
