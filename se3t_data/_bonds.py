"""Covalent bonds and bond orders from coordinates with RDKit (SPEC §6).

Policy, in order (the first that succeeds wins; with a reference SMILES, "succeeds" means that the canonical
SMILES of the perceived molecule, without hydrogens and stereo, equals the reference's):

1. ``rdDetermineBonds.DetermineBonds(mol, charge=charge)``                          -> :attr:`BondStatus.DEFAULT`
2. the same with ``useHueckel=True``                                                -> :attr:`BondStatus.HUCKEL`
3. only with a reference SMILES: the connectivity perceived from the coordinates (default, then Hückel), bond
   orders and charges copied from the reference SMILES with ``AssignBondOrdersFromTemplate``, accepted only if
   the result then reproduces the SMILES                                            -> :attr:`BondStatus.REPAIRED`
4. only with a reference SMILES: steps 1/2 gave a molecule but not the reference's (typically the relaxed
   geometry's connectivity differs from the SMILES); the perceived bonds are kept    -> :attr:`BondStatus.MISMATCH`
5. no bond orders at all: the connectivity is kept, every bond single               -> :attr:`BondStatus.CONNECTIVITY`

Without a reference SMILES (users' molecules) steps 3-4 do not apply, and step 5 happens only when asked
(``on_failure='connectivity'``); by default a molecule whose bond orders cannot be perceived raises
:class:`BondPerceptionError`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from enum import IntEnum

import numpy as np

__all__ = ["BondStatus", "BondPerceptionError", "perceive_bonds", "canonical_smiles", "require_rdkit"]


class BondStatus(IntEnum):
    DEFAULT = 0
    HUCKEL = 1
    REPAIRED = 2
    MISMATCH = 3
    CONNECTIVITY = 4
    UNCHECKED = 5  # perceived (default or Hückel) without a reference SMILES to check against


class BondPerceptionError(ValueError):
    """RDKit could not assign bonds to a molecule."""


def require_rdkit():
    try:
        from rdkit import Chem, RDLogger  # noqa: F401
        from rdkit.Chem import rdDetermineBonds  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "bond perception needs RDKit: `pip install rdkit` (or `pip install 'se3t[data]'`)"
        ) from err
    RDLogger.DisableLog("rdApp.*")
    return Chem, rdDetermineBonds


_SYMBOL = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F"}


def _xyz_block(z: np.ndarray, pos: np.ndarray) -> str:
    return f"{len(z)}\n\n" + "".join(
        f"{_SYMBOL[zz]} {x:.10f} {y:.10f} {w:.10f}\n" for zz, (x, y, w) in zip(z.tolist(), pos.tolist())
    )


@contextlib.contextmanager
def _quiet_stdout():
    """Silence C-level stdout and stderr (YAeHMOP, behind useHueckel, prints distance warnings there)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
    except (OSError, ValueError, AttributeError):  # no real file descriptors (e.g. captured)
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                _libc_fflush()  # the C++ streams write through C stdio: flush them into devnull, not later
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _libc_fflush() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # pragma: no cover - no libc (non-POSIX)
        pass


def canonical_smiles(mol) -> str:
    """Canonical SMILES without hydrogens or stereo (the comparison used for the agreement figure)."""
    from rdkit import Chem

    return Chem.MolToSmiles(Chem.RemoveAllHs(mol), isomericSmiles=False)


def _reference_smiles(smiles: str | None) -> str | None:
    if not smiles:
        return None
    from rdkit import Chem

    ref = Chem.MolFromSmiles(smiles)
    return None if ref is None else canonical_smiles(ref)


_ORDER_CODE = {1.0: 1, 2.0: 2, 3.0: 3, 1.5: 4}


def _bond_arrays(mol) -> tuple[np.ndarray, np.ndarray]:
    from rdkit import Chem

    order = Chem.GetAdjacencyMatrix(mol, useBO=True)
    i, j = np.nonzero(np.triu(order, 1))  # row-major: sorted by (i, j)
    types = np.array([_ORDER_CODE.get(float(v), 1) for v in order[i, j].tolist()], dtype=np.int8)
    return np.stack([i, j], axis=1).astype(np.int64), types


def perceive_bonds(
    z: np.ndarray,
    pos: np.ndarray,
    *,
    charge: int = 0,
    smiles: str | None = None,
    on_failure: str = "raise",
) -> tuple[np.ndarray, np.ndarray, BondStatus]:
    """Bonds of one molecule from its coordinates.

    Args:
        z: ``[n]`` atomic numbers. pos: ``[n, 3]`` positions in Å.
        charge: total charge of the molecule. smiles: optional reference SMILES (QM9's), see the module doc.
        on_failure: ``'raise'`` or ``'connectivity'`` (keep single bonds) when no bond orders can be found.

    Returns:
        ``bonds [b, 2]`` int64 (undirected, i < j, sorted), ``types [b]`` int8 (1 single, 2 double, 3 triple,
        4 aromatic), and the :class:`BondStatus`.
    """
    Chem, rdDetermineBonds = require_rdkit()
    if on_failure not in ("raise", "connectivity"):
        raise ValueError(f"on_failure must be 'raise' or 'connectivity', got {on_failure!r}")
    z = np.asarray(z)
    pos = np.asarray(pos, dtype=np.float64)
    bad = sorted(set(z.tolist()) - set(_SYMBOL))
    if bad:
        raise BondPerceptionError(f"bond perception supports H, C, N, O, F only, got atomic numbers {bad}")
    block = _xyz_block(z, pos)
    ref = _reference_smiles(smiles)
    first = None  # first perceived molecule (kept if nothing reproduces the reference)
    errors = []
    for status, hueckel in ((BondStatus.DEFAULT, False), (BondStatus.HUCKEL, True)):
        mol = Chem.MolFromXYZBlock(block)
        try:
            if hueckel:
                with _quiet_stdout():
                    rdDetermineBonds.DetermineBonds(mol, charge=charge, useHueckel=True)
            else:
                rdDetermineBonds.DetermineBonds(mol, charge=charge)
            Chem.SanitizeMol(mol)
        except Exception as err:  # RDKit raises ValueError and its own exception types
            errors.append(f"{'Hückel' if hueckel else 'default'}: {err}")
            continue
        if ref is None:
            return (*_bond_arrays(mol), BondStatus.UNCHECKED)
        if canonical_smiles(mol) == ref:
            return (*_bond_arrays(mol), status)
        if first is None:
            first = mol
    connectivity = None
    for hueckel in (False, True):
        mol = Chem.MolFromXYZBlock(block)
        try:
            with _quiet_stdout():
                rdDetermineBonds.DetermineConnectivity(mol, useHueckel=hueckel, charge=charge)
        except Exception as err:
            errors.append(f"connectivity ({'Hückel' if hueckel else 'default'}): {err}")
            continue
        if connectivity is None:
            connectivity = mol
        if ref is None:
            break
        try:
            from rdkit.Chem import AllChem

            repaired = AllChem.AssignBondOrdersFromTemplate(Chem.MolFromSmiles(smiles), Chem.Mol(mol))
            if canonical_smiles(repaired) == ref:
                return (*_bond_arrays(repaired), BondStatus.REPAIRED)
        except Exception:  # no match of the template on this connectivity
            pass
    if first is not None:
        return (*_bond_arrays(first), BondStatus.MISMATCH)
    if connectivity is not None and on_failure == "connectivity":
        bonds, _ = _bond_arrays(connectivity)
        return bonds, np.ones(len(bonds), dtype=np.int8), BondStatus.CONNECTIVITY
    raise BondPerceptionError("RDKit could not assign bonds: " + "; ".join(errors))
