"""QM9 elements, bond types and the 19 regression targets with their units (SPEC §6)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "HARTREE_TO_EV",
    "ELEMENTS",
    "ATOMIC_NUMBERS",
    "BOND_TYPES",
    "Target",
    "TARGETS",
    "TARGET_NAMES",
    "target",
]

#: CODATA 2018; SPEC §6 quotes it as 27.211386.
HARTREE_TO_EV = 27.211386245988

#: The elements of QM9, in the order of the node one-hot features.
ELEMENTS: tuple[str, ...] = ("H", "C", "N", "O", "F")
ATOMIC_NUMBERS: tuple[int, ...] = (1, 6, 7, 8, 9)

#: Bond type codes stored in ``bond_type``. Code 0 ("none") only appears in the radius and full graph modes.
#: The edge one-hot features use codes 1..4 (single, double, triple, aromatic), plus a fifth "none" column in the
#: radius and full modes.
BOND_TYPES: tuple[str, ...] = ("none", "single", "double", "triple", "aromatic")

# Atomic reference energies in Hartree (B3LYP/6-31G(2df,p), Ramakrishnan et al. 2014, atomref table), for the
# atomization energies. Columns: U0, U (298 K), H (298 K), G (298 K).
_ATOMREF_HARTREE = {
    1: (-0.500273, -0.498857, -0.497912, -0.510927),
    6: (-37.846772, -37.845355, -37.844411, -37.861317),
    7: (-54.583861, -54.582445, -54.581501, -54.598897),
    8: (-75.064579, -75.063162, -75.062219, -75.079532),
    9: (-99.718730, -99.717314, -99.716370, -99.733544),
}


@dataclass(frozen=True)
class Target:
    """One QM9 target: its name, the unit se3t_data returns it in, and the source quantity it comes from."""

    name: str
    unit: str
    description: str
    source: str  # the quantity in the raw file / qm9pack CSV (before conversion)
    scale: float = 1.0  # multiply the source value (in its own unit) by this to get ``unit``


_H = HARTREE_TO_EV
#: The 19 targets, in the conventional order (PyG / DGL QM9).
TARGETS: tuple[Target, ...] = (
    Target("mu", "D", "dipole moment", "Dipole_debye"),
    Target("alpha", "a0^3", "isotropic polarizability", "Polarizability_bohr3"),
    Target("homo", "eV", "HOMO energy", "HOMO_au", _H),
    Target("lumo", "eV", "LUMO energy", "LUMO_au", _H),
    Target("gap", "eV", "HOMO-LUMO gap", "HOMO_LUMO_gap_au", _H),
    Target("r2", "a0^2", "electronic spatial extent", "R2_bohr2"),
    Target("zpve", "eV", "zero-point vibrational energy", "ZPVE_au", _H),
    Target("U0", "eV", "internal energy at 0 K", "InternalEnergy_0K_au", _H),
    Target("U", "eV", "internal energy at 298.15 K", "InternalEnergy_298K_au", _H),
    Target("H", "eV", "enthalpy at 298.15 K", "Enthalphy_298K_au", _H),
    Target("G", "eV", "free energy at 298.15 K", "GibbsFreeEnergy_298K_au", _H),
    Target("Cv", "cal/(mol K)", "heat capacity at 298.15 K", "Heatcapacity_Cv_cal_mol_K"),
    Target("U0_atom", "eV", "atomization energy at 0 K (U0 minus atomic references)", "InternalEnergy_0K_au", _H),
    Target("U_atom", "eV", "atomization energy at 298.15 K", "InternalEnergy_298K_au", _H),
    Target("H_atom", "eV", "atomization enthalpy at 298.15 K", "Enthalphy_298K_au", _H),
    Target("G_atom", "eV", "atomization free energy at 298.15 K", "GibbsFreeEnergy_298K_au", _H),
    Target("A", "GHz", "rotational constant A", "RotA_GHz"),
    Target("B", "GHz", "rotational constant B", "RotB_GHz"),
    Target("C", "GHz", "rotational constant C", "RotC_GHz"),
)
TARGET_NAMES: tuple[str, ...] = tuple(t.name for t in TARGETS)

#: The 15 source quantities, in the order of the raw XYZ comment line after the tag and index.
SOURCE_QUANTITIES: tuple[str, ...] = (
    "RotA_GHz", "RotB_GHz", "RotC_GHz", "Dipole_debye", "Polarizability_bohr3", "HOMO_au", "LUMO_au",
    "HOMO_LUMO_gap_au", "R2_bohr2", "ZPVE_au", "InternalEnergy_0K_au", "InternalEnergy_298K_au",
    "Enthalphy_298K_au", "GibbsFreeEnergy_298K_au", "Heatcapacity_Cv_cal_mol_K",
)  # fmt: skip


def target(name: str) -> Target:
    """Look a target up by name (case-sensitive, as in :data:`TARGET_NAMES`)."""
    for t in TARGETS:
        if t.name == name:
            return t
    raise ValueError(f"unknown QM9 target {name!r}; choose one of {', '.join(TARGET_NAMES)}")


def convert_targets(source: np.ndarray, z: np.ndarray, atom_ptr: np.ndarray) -> np.ndarray:
    """Source quantities ``[M, 15]`` (order :data:`SOURCE_QUANTITIES`) -> the 19 targets ``[M, 19]`` in their units.

    ``z`` holds the atomic numbers of all molecules concatenated, ``atom_ptr [M+1]`` the offsets.
    """
    col = {q: i for i, q in enumerate(SOURCE_QUANTITIES)}
    out = np.empty((source.shape[0], len(TARGETS)), dtype=np.float64)
    # per-molecule sums of the atomic reference energies, [M, 4]
    ref_table = np.zeros((10, 4))
    for zz, refs in _ATOMREF_HARTREE.items():
        ref_table[zz] = refs
    per_atom = ref_table[z.astype(np.int64)]
    mol_of_atom = np.repeat(np.arange(source.shape[0]), np.diff(atom_ptr))
    ref_sum = np.zeros((source.shape[0], 4))
    np.add.at(ref_sum, mol_of_atom, per_atom)
    atom_k = {"U0_atom": 0, "U_atom": 1, "H_atom": 2, "G_atom": 3}
    for j, t in enumerate(TARGETS):
        value = source[:, col[t.source]]
        if t.name in atom_k:
            value = value - ref_sum[:, atom_k[t.name]]
        out[:, j] = value * t.scale
    return out
