"""QM9 preprocessing (source -> compact arrays) and the on-disk cache.

The cache is one uncompressed ``.npz`` file per (source, preprocessing version), written atomically (a temporary
file in the same folder, then :func:`os.replace`), so a crash never leaves a half-written cache and concurrent
processes (e.g. several DDP ranks) at worst both write the same file. Its arrays (M molecules, A atoms, B bonds):

==============  ==============  =====================================================================
``index``       [M] int32       QM9 number of each molecule (1..133,885), ascending
``atom_ptr``    [M+1] int64     molecule m's atoms are ``atom_ptr[m]:atom_ptr[m+1]``
``z``           [A] int8        atomic numbers
``pos``         [A, 3] float32  positions, Å
``bond_ptr``    [M+1] int64     molecule m's bonds are ``bond_ptr[m]:bond_ptr[m+1]``
``bonds``       [B, 2] int16    undirected bonds, atom indices local to the molecule, i < j
``bond_type``   [B] int8        1 single, 2 double, 3 triple, 4 aromatic
``bond_status`` [M] int8        :class:`~se3t_data._bonds.BondStatus` of each molecule
``targets``     [M, 19] f64     the 19 targets of :data:`~se3t_data._targets.TARGETS`, in their units
``meta``        str (JSON)      source, version, counts, skipped molecules and why, timings
==============  ==============  =====================================================================
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ._bonds import BondPerceptionError, BondStatus, perceive_bonds
from ._excluded import EXCLUDED_INDICES, NUM_RAW_MOLECULES
from ._sources import ParseError, Source, is_excluded, iter_raw_items, parse_raw_item
from ._targets import ATOMIC_NUMBERS, TARGET_NAMES, TARGETS, convert_targets

__all__ = ["PREPROCESS_VERSION", "cache_path", "load_or_build", "check_geometry", "MIN_DISTANCE"]

log = logging.getLogger("se3t_data")

#: Bump whenever the cached arrays would change for the same source.
PREPROCESS_VERSION = 1
#: Atoms closer than this (Å) make a molecule invalid.
MIN_DISTANCE = 0.1
_SYMBOL_TO_Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
_ARRAYS = ("index", "atom_ptr", "z", "pos", "bond_ptr", "bonds", "bond_type", "bond_status", "targets", "meta")


def check_geometry(z: np.ndarray, pos: np.ndarray, allowed: Iterable[int] = ATOMIC_NUMBERS) -> str | None:
    """Why a molecule is invalid (unsupported elements, non-finite coordinates, atoms < 0.1 Å apart), or None."""
    z = np.asarray(z)
    pos = np.asarray(pos)
    if z.ndim != 1 or pos.shape != (len(z), 3):
        return f"shape mismatch: z {tuple(z.shape)}, pos {tuple(pos.shape)} (expected [n] and [n, 3])"
    if len(z) == 0:
        return "no atoms"
    bad = sorted(set(z.tolist()) - set(allowed))
    if bad:
        return f"unsupported element(s) with atomic number {bad}"
    if not np.isfinite(pos).all():
        atoms = np.nonzero(~np.isfinite(pos).all(axis=1))[0].tolist()
        return f"non-finite coordinates for atom(s) {atoms}"
    if len(z) > 1:
        d = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
        d[np.diag_indices(len(z))] = np.inf
        i, j = np.unravel_index(np.argmin(d), d.shape)
        if d[i, j] < MIN_DISTANCE:
            return f"atoms {min(i, j)} and {max(i, j)} are {d[i, j]:.4f} Å apart (< {MIN_DISTANCE} Å)"
    return None


def _process_one(item: tuple):
    try:
        raw = parse_raw_item(item)
    except ParseError as err:
        return ("skip", None, str(err))
    z = np.array([_SYMBOL_TO_Z.get(s, -1) for s in raw.symbols], dtype=np.int64)
    if (z < 0).any():
        unknown = sorted({s for s in raw.symbols if s not in _SYMBOL_TO_Z})
        return ("skip", raw.index, f"unsupported element(s) {unknown}")
    reason = check_geometry(z, raw.pos)
    if reason is not None:
        return ("skip", raw.index, reason)
    if not np.isfinite(raw.quantities).all():
        return ("skip", raw.index, "non-finite target values")
    try:
        bonds, types, status = perceive_bonds(z, raw.pos, smiles=raw.smiles, on_failure="connectivity")
    except BondPerceptionError as err:
        return ("skip", raw.index, str(err))
    return (
        "ok",
        raw.index,
        z.astype(np.int8),
        raw.pos.astype(np.float32),
        bonds.astype(np.int16),
        types,
        int(status),
        raw.quantities,
    )


def _process_chunk(items: list[tuple]) -> tuple[list[tuple], float]:
    t0 = time.process_time()
    out = [_process_one(item) for item in items]
    return out, time.process_time() - t0


def _chunks(items: Iterator[tuple], size: int, counter: dict) -> Iterator[list[tuple]]:
    chunk = []
    for item in items:
        if is_excluded(item):
            counter["excluded"] += 1
            continue
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.total, self.done, self.next_log = total, 0, 0.1
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc="QM9 preprocessing", unit="mol", smoothing=0.1)
            except ImportError:
                pass
        self.enabled = enabled

    def update(self, n: int):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.done >= self.next_log * self.total:
            log.info("QM9 preprocessing: %d / %d molecules", self.done, self.total)
            self.next_log += 0.1

    def close(self):
        if self.bar is not None:
            self.bar.close()


def build_arrays(src: Source, num_workers: int = 2, progress: bool = True, expect_complete: bool = True) -> dict:
    """Read, validate and bond-perceive every molecule of ``src``; returns the cache arrays."""
    t0 = time.perf_counter()
    counter = {"excluded": 0}
    chunks = _chunks(iter_raw_items(src), 256, counter)
    results: list[tuple] = []
    bar = _Progress(src.expected, progress)
    seen_excluded = 0
    worker_cpu = 0.0
    main_cpu0 = time.process_time()
    try:
        if num_workers > 0:
            pool = multiprocessing.get_context("spawn").Pool(num_workers)
            outputs = pool.imap(_process_chunk, chunks)
        else:
            pool = None
            outputs = map(_process_chunk, chunks)
        try:
            for out, cpu in outputs:
                worker_cpu += cpu
                results.extend(out)
                bar.update(len(out) + counter["excluded"] - seen_excluded)
                seen_excluded = counter["excluded"]
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    finally:
        bar.close()
    n_excluded = counter["excluded"]
    wall = time.perf_counter() - t0
    main_cpu = time.process_time() - main_cpu0

    ok = [r for r in results if r[0] == "ok"]
    skipped = {}
    for r in results:
        if r[0] == "skip":
            key = str(r[1]) if r[1] is not None else f"unparsed-{len(skipped)}"
            skipped[key] = r[2]
    ok.sort(key=lambda r: r[1])
    index = np.array([r[1] for r in ok], dtype=np.int64)
    dup = index[1:][index[1:] == index[:-1]]
    if len(dup):
        from ._sources import QM9SourceError

        raise QM9SourceError(f"{src.path}: molecule(s) {dup[:10].tolist()} appear more than once; corrupt source")
    if expect_complete:
        expected = set(range(1, NUM_RAW_MOLECULES + 1)) - EXCLUDED_INDICES
        missing = sorted(expected - set(index.tolist()) - {int(k) for k in skipped if k.isdigit()})
        if missing:
            from ._sources import QM9SourceError

            raise QM9SourceError(
                f"{src.path} ({src.kind}) lacks {len(missing)} of the 130,831 QM9 molecules (e.g. {missing[:5]}); "
                "the source is incomplete or truncated: reinstall qm9pack or download the archive again"
            )
    if skipped:
        log.warning(
            "QM9: skipped %d invalid molecule(s) (first: %s); see QM9.info['skipped']",
            len(skipped),
            "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3]),
        )

    n_atoms = np.array([len(r[2]) for r in ok], dtype=np.int64)
    n_bonds = np.array([len(r[5]) for r in ok], dtype=np.int64)
    atom_ptr = np.concatenate([[0], np.cumsum(n_atoms)])
    bond_ptr = np.concatenate([[0], np.cumsum(n_bonds)])
    z = np.concatenate([r[2] for r in ok]) if ok else np.zeros(0, np.int8)
    pos = np.concatenate([r[3] for r in ok]) if ok else np.zeros((0, 3), np.float32)
    bonds = np.concatenate([r[4] for r in ok]).reshape(-1, 2) if ok else np.zeros((0, 2), np.int16)
    bond_type = np.concatenate([r[5] for r in ok]) if ok else np.zeros(0, np.int8)
    status = np.array([r[6] for r in ok], dtype=np.int8)
    quantities = np.stack([r[7] for r in ok]) if ok else np.zeros((0, 15))
    targets = convert_targets(quantities, z, atom_ptr)
    counts = Counter(BondStatus(s).name for s in status.tolist())
    agree = float(np.isin(status, (BondStatus.DEFAULT, BondStatus.HUCKEL)).mean()) if len(status) else float("nan")
    meta = {
        "preprocess_version": PREPROCESS_VERSION,
        "source_kind": src.kind,
        "source_fingerprint": src.fingerprint,
        "source_path": str(src.path),
        "num_molecules": len(ok),
        "num_excluded_unconverged": n_excluded,
        "skipped": skipped,
        "bond_status_counts": dict(counts),
        "smiles_agreement": agree,
        "target_names": list(TARGET_NAMES),
        "target_units": [t.unit for t in TARGETS],
        "preprocess_seconds": wall,
        "worker_cpu_seconds": worker_cpu,  # bond perception and parsing, all workers together
        "main_cpu_seconds": main_cpu,  # reading the source, in this process
        "num_workers": num_workers,
    }
    return {
        "index": index.astype(np.int32),
        "atom_ptr": atom_ptr,
        "z": z,
        "pos": pos,
        "bond_ptr": bond_ptr,
        "bonds": bonds,
        "bond_type": bond_type,
        "bond_status": status,
        "targets": targets,
        "meta": np.array(json.dumps(meta)),
    }


def cache_path(root: Path, src: Source) -> Path:
    return Path(root) / f"qm9_{src.fingerprint}_v{PREPROCESS_VERSION}.npz"


def write_atomic(path: Path, arrays: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_cache(path: Path) -> dict | None:
    """The cached arrays, or None (with a warning) if the file is unreadable or from another version."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in _ARRAYS}
        meta = json.loads(str(arrays["meta"]))
    except (OSError, ValueError, KeyError, EOFError) as err:
        log.warning("QM9 cache %s is unreadable (%s); rebuilding it", path, err)
        return None
    if meta.get("preprocess_version") != PREPROCESS_VERSION:
        log.warning("QM9 cache %s is from another preprocessing version; rebuilding it", path)
        return None
    return arrays


def load_or_build(
    root: Path,
    src: Source,
    *,
    num_workers: int = 2,
    progress: bool = True,
    force: bool = False,
    expect_complete: bool = True,
) -> tuple[dict, Path]:
    path = cache_path(root, src)
    if path.is_file() and not force:
        arrays = read_cache(path)
        if arrays is not None:
            return arrays, path
    with _lock(path.with_name(path.name + ".lock")):
        # another process (e.g. a DDP rank) may have built it while we waited for the lock
        if path.is_file() and not force:
            arrays = read_cache(path)
            if arrays is not None:
                return arrays, path
        arrays = build_arrays(src, num_workers=num_workers, progress=progress, expect_complete=expect_complete)
        write_atomic(path, arrays)
    log.info("QM9 cache written to %s", path)
    return arrays, path


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive advisory lock (POSIX), so that concurrent processes preprocess once; a no-op elsewhere."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
