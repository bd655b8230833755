"""se3t_data: QM9 and users' own molecules as padded, static-shape batches for se3t.

Data flows one way: se3t_data builds batches -> se3t.runtime drives -> se3t computes. Typical use::

    from se3t_data import QM9, BucketSampler
    ds = QM9(task="homo")                          # 130,831 molecules; preprocessed once, then cached
    train, val, test = ds.split()                  # 100,000 / 17,748 / 13,083
    sampler = BucketSampler(train, batch_size=240)
    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=sampler.collate_fn,
                                         num_workers=2)
    for batch in loader:                           # PaddedBatch
        pred = model(**batch.to(device).model_inputs())[batch.graph_mask]

See :data:`BATCH_SCHEMA` for the batch fields.
"""

from ._ase import InvalidMoleculeError, UnsupportedElementError, from_ase, read
from ._basis import WithBases, basis_numel_per_edge, precompute_bases
from ._batch import BATCH_SCHEMA, MIN_PAD_NODES, Buckets, PaddedBatch, PaddedCollate, collate
from ._bonds import BondPerceptionError, BondStatus, perceive_bonds
from ._molecule import GRAPH_MODES, Molecule
from ._preprocess import PREPROCESS_VERSION
from ._qm9 import QM9, REFERENCE_SPLIT, QM9Subset, default_root, split_sizes
from ._sampler import BucketSampler
from ._sources import QM9SourceError
from ._targets import BOND_TYPES, ELEMENTS, HARTREE_TO_EV, TARGET_NAMES, TARGETS, Target

__all__ = [
    "QM9",
    "QM9Subset",
    "REFERENCE_SPLIT",
    "split_sizes",
    "default_root",
    "Molecule",
    "GRAPH_MODES",
    "PaddedBatch",
    "BATCH_SCHEMA",
    "MIN_PAD_NODES",
    "Buckets",
    "collate",
    "PaddedCollate",
    "BucketSampler",
    "from_ase",
    "read",
    "precompute_bases",
    "WithBases",
    "basis_numel_per_edge",
    "perceive_bonds",
    "BondStatus",
    "BondPerceptionError",
    "QM9SourceError",
    "InvalidMoleculeError",
    "UnsupportedElementError",
    "TARGETS",
    "TARGET_NAMES",
    "Target",
    "ELEMENTS",
    "BOND_TYPES",
    "HARTREE_TO_EV",
    "PREPROCESS_VERSION",
]
