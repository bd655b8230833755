"""Users' own molecules: ASE ``Atoms`` and any file ASE reads, as the same records (and batches) as QM9."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from ._bonds import perceive_bonds
from ._molecule import GRAPH_MODES, Molecule, make_molecule
from ._preprocess import check_geometry
from ._targets import ATOMIC_NUMBERS, ELEMENTS

__all__ = ["from_ase", "read", "UnsupportedElementError", "InvalidMoleculeError"]


class InvalidMoleculeError(ValueError):
    """A molecule that cannot be turned into a graph (bad coordinates, no bonds perceivable, ...)."""


class UnsupportedElementError(InvalidMoleculeError):
    """Elements outside H, C, N, O, F: a QM9-trained model has never seen them, so no prediction is made."""


def _describe(atoms, i: int) -> str:
    formula = atoms.get_chemical_formula() if hasattr(atoms, "get_chemical_formula") else "?"
    return f"molecule {i} ({formula})"


def _one(
    atoms, i: int, graph: str, cutoff: float | None, bonds: bool, charge: int | None, target: str | None
) -> Molecule:
    try:
        z = np.asarray(atoms.get_atomic_numbers(), dtype=np.int64)
        pos = np.asarray(atoms.get_positions(), dtype=np.float64)
    except AttributeError:
        raise TypeError(f"from_ase expects ase.Atoms objects, got {type(atoms).__name__}") from None
    bad = sorted(set(z.tolist()) - set(ATOMIC_NUMBERS))
    if bad:
        from ase.data import chemical_symbols

        names = ", ".join(chemical_symbols[b] if 0 <= b < len(chemical_symbols) else str(b) for b in bad)
        raise UnsupportedElementError(
            f"{_describe(atoms, i)} contains {names}: QM9 models only know {', '.join(ELEMENTS)}, "
            "so they cannot predict for it"
        )
    reason = check_geometry(z, pos)
    if reason is not None:
        raise InvalidMoleculeError(f"{_describe(atoms, i)}: {reason}")
    if charge is None:
        charge = int(round(float(atoms.info.get("charge", 0)))) if hasattr(atoms, "info") else 0
    if bonds:
        try:
            b, t, _ = perceive_bonds(z, pos, charge=charge, on_failure="raise")
        except ValueError as err:
            raise InvalidMoleculeError(f"{_describe(atoms, i)}: {err}") from err
    else:
        b, t = np.zeros((0, 2), np.int64), np.zeros(0, np.int8)
    y = None
    if target is not None:
        if target not in atoms.info:
            raise KeyError(f"{_describe(atoms, i)} has no atoms.info[{target!r}]")
        y = torch.as_tensor(np.asarray(atoms.info[target], dtype=np.float32))
    return make_molecule(i, z, pos, b, t, graph, cutoff, y)


def from_ase(
    atoms,
    graph: str = "bonds",
    cutoff: float | None = None,
    *,
    bonds: bool = True,
    charge: int | None = None,
    target: str | None = None,
) -> Molecule | list[Molecule]:
    """Records for one ``ase.Atoms`` (returns a :class:`Molecule`) or a sequence of them (returns a list).

    Args:
        graph: ``'bonds'`` (RDKit bonds, as for QM9), ``'radius'`` (pairs within ``cutoff`` Å) or ``'full'``.
        bonds: perceive bonds with RDKit to type the edges (required for ``'bonds'``); with ``bonds=False`` the
            radius/full edges are all of type "no bond" and RDKit is not needed.
        charge: total charge for the bond perception; default ``atoms.info['charge']`` or 0.
        target: key of ``atoms.info`` to use as ``y`` (default: none, ``y`` is None and NaN in batches).

    ``record.index`` is the position in the input. Raises :class:`UnsupportedElementError` for elements outside
    H, C, N, O, F and :class:`InvalidMoleculeError` for non-finite coordinates, atoms closer than 0.1 Å, or bonds
    that RDKit cannot perceive.
    """
    if graph not in GRAPH_MODES:
        raise ValueError(f"graph must be one of {GRAPH_MODES}, got {graph!r}")
    if graph == "radius" and (cutoff is None or not cutoff > 0):
        raise ValueError("graph='radius' needs a positive cutoff in Å, e.g. cutoff=5.0")
    if graph == "bonds" and not bonds:
        raise ValueError("graph='bonds' needs bond perception (bonds=True)")
    single = not isinstance(atoms, Sequence)
    items = [atoms] if single else list(atoms)
    records = [_one(a, i, graph, cutoff, bonds, charge, target) for i, a in enumerate(items)]
    return records[0] if single else records


def read(
    path: str | os.PathLike,
    index: str | int = ":",
    *,
    format: str | None = None,
    graph: str = "bonds",
    cutoff: float | None = None,
    bonds: bool = True,
    charge: int | None = None,
    target: str | None = None,
) -> list[Molecule]:
    """Read molecules from any file ASE reads (xyz, extxyz, sdf, pdb, ...) and make records of them.

    ``index``/``format`` are passed to :func:`ase.io.read`; the rest as in :func:`from_ase`. Always a list.
    """
    import ase.io

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        frames = ase.io.read(path, index=index, format=format)
    except Exception as err:  # ASE raises many types for unreadable files
        raise InvalidMoleculeError(f"ASE cannot read {path}: {type(err).__name__}: {err}") from err
    if not isinstance(frames, list):
        frames = [frames]
    if not frames:
        raise InvalidMoleculeError(f"{path} contains no molecules")
    return from_ase(frames, graph, cutoff, bonds=bonds, charge=charge, target=target)
