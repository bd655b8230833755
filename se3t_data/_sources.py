"""Where QM9 comes from: the raw archive, the ``qm9pack`` CSV files, or a configured download.

Nothing here imports ``qm9pack`` (its module imports ``pkg_resources``, which current setuptools no longer ships);
its data folder is located with :func:`importlib.util.find_spec`.

Both readers yield *raw items*, small tuples of strings that the preprocessing workers parse
(:func:`parse_raw_item`), so that the parsing runs in parallel with the reading:

- ``("csv", index, smiles, elements, xyz, quantities)`` from qm9pack, where ``quantities`` are the 15 source
  strings in the order of :data:`se3t_data._targets.SOURCE_QUANTITIES`;
- ``("xyz", member_name, text)`` from the raw archive.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import importlib.util
import os
import tarfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._excluded import EXCLUDED_INDICES, NUM_MOLECULES, NUM_RAW_MOLECULES
from ._targets import SOURCE_QUANTITIES

__all__ = [
    "QM9SourceError",
    "Source",
    "ARCHIVE_NAME",
    "ARCHIVE_URL_HINT",
    "find_qm9pack_dir",
    "resolve_source",
    "download",
    "iter_raw_items",
    "parse_raw_item",
    "RawMolecule",
]

ARCHIVE_NAME = "dsgdb9nsd.xyz.tar.bz2"
ARCHIVE_URL_HINT = "https://figshare.com/collections/_/978904 (file dsgdb9nsd.xyz.tar.bz2)"
QM9PACK_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
CSV_REQUIRED_COLUMNS = ("Index", "SMILES", "N_atoms", "Elements", "XYZ_Ang", *SOURCE_QUANTITIES)


class QM9SourceError(RuntimeError):
    """The QM9 source is missing, unreadable, corrupt or incomplete. The message says what to do."""


@dataclass(frozen=True)
class Source:
    """A resolved QM9 source. ``fingerprint`` identifies its content for the cache key."""

    kind: str  # "archive" or "qm9pack"
    path: Path  # the archive file, or qm9pack's data folder
    fingerprint: str
    expected: int  # number of raw items the reader yields (for the progress bar)


def find_qm9pack_dir() -> Path | None:
    """qm9pack's ``data`` folder if the package is installed and has its CSV files, else None (never imports it)."""
    try:
        spec = importlib.util.find_spec("qm9pack")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        data = Path(location) / "data"
        if all((data / name).is_file() for name in QM9PACK_FILES):
            return data
    return None


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _qm9pack_fingerprint(data: Path) -> str:
    try:
        version = importlib.metadata.version("qm9pack")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    sizes = ",".join(f"{name}:{(data / name).stat().st_size}" for name in QM9PACK_FILES)
    return hashlib.sha256(f"qm9pack {version} {sizes}".encode()).hexdigest()[:16]


def download(url: str, dest: Path, sha256: str | None) -> Path:
    """Download ``url`` to ``dest`` (atomically) and verify its SHA-256. ``file://`` URLs work too."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url) as response, open(tmp, "wb") as out:  # noqa: S310 (user-configured URL)
            while block := response.read(1 << 20):
                h.update(block)
                out.write(block)
        digest = h.hexdigest()
        if sha256 is not None and digest != sha256.lower():
            raise QM9SourceError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest}; the file was not kept"
            )
        os.replace(tmp, dest)
    except OSError as err:
        raise QM9SourceError(f"could not download {url} to {dest}: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def resolve_source(
    root: Path, source: str = "auto", url: str | None = None, sha256: str | None = None
) -> Source:
    """Pick the QM9 source: ``root/dsgdb9nsd.xyz.tar.bz2``, then qm9pack, then a download from ``url``."""
    if source not in ("auto", "archive", "qm9pack"):
        raise ValueError(f"source must be 'auto', 'archive' or 'qm9pack', got {source!r}")
    archive = Path(root) / ARCHIVE_NAME
    if source in ("auto", "archive"):
        if not archive.is_file() and url is not None:
            download(url, archive, sha256)
        if archive.is_file():
            return Source("archive", archive, "archive-" + _sha256(archive)[:16], NUM_RAW_MOLECULES)
        if source == "archive":
            raise QM9SourceError(
                f"no QM9 archive at {archive}. Put {ARCHIVE_NAME} there (from {ARCHIVE_URL_HINT}), "
                "or pass download_url=... and sha256=..."
            )
    data = find_qm9pack_dir()
    if data is not None:
        return Source("qm9pack", data, "qm9pack-" + _qm9pack_fingerprint(data), NUM_MOLECULES)
    raise QM9SourceError(
        "QM9 data not found. Either install the CSV package with `pip install qm9pack` "
        "(or `pip install 'se3t[data]'`), or put the raw archive at "
        f"{archive} (from {ARCHIVE_URL_HINT}), or pass download_url=... and sha256=... to QM9()."
    )


# ----------------------------------------------------------------------------------------------------------------
# readers (run in the main process)


def iter_raw_items(src: Source) -> Iterator[tuple]:
    if src.kind == "archive":
        yield from _iter_archive(src.path)
    else:
        yield from _iter_qm9pack(src.path)


def _iter_qm9pack(data: Path) -> Iterator[tuple]:
    csv.field_size_limit(1 << 30)
    for name in QM9PACK_FILES:
        path = data / name
        try:
            with open(path, newline="") as f:
                reader = csv.reader(f)
                try:
                    header = next(reader)
                except StopIteration:
                    raise QM9SourceError(f"{path} is empty; reinstall qm9pack") from None
                missing = [c for c in CSV_REQUIRED_COLUMNS if c not in header]
                if missing:
                    raise QM9SourceError(
                        f"{path} lacks the column(s) {', '.join(missing)}; it is not a qm9pack CSV "
                        "(reinstall qm9pack)"
                    )
                pos = {c: header.index(c) for c in CSV_REQUIRED_COLUMNS}
                q_cols = [pos[q] for q in SOURCE_QUANTITIES]
                width = len(header)
                for line, row in enumerate(reader, start=2):
                    if len(row) != width:
                        raise QM9SourceError(
                            f"{path}, line {line}: {len(row)} fields instead of {width}; the file is truncated "
                            "or corrupt (reinstall qm9pack)"
                        )
                    yield (
                        "csv",
                        row[pos["Index"]],
                        row[pos["SMILES"]],
                        row[pos["Elements"]],
                        row[pos["XYZ_Ang"]],
                        tuple(row[c] for c in q_cols),
                    )
        except (OSError, csv.Error, UnicodeDecodeError) as err:
            raise QM9SourceError(f"cannot read {path}: {err}") from err


def _iter_archive(path: Path) -> Iterator[tuple]:
    seen = 0
    try:
        with tarfile.open(path, "r|bz2") as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".xyz"):
                    continue
                f = tar.extractfile(member)
                assert f is not None
                seen += 1
                yield ("xyz", member.name, f.read().decode("ascii", errors="replace"))
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise QM9SourceError(
            f"{path} is corrupt or truncated ({type(err).__name__}: {err}) after {seen} molecules; "
            f"delete it and download {ARCHIVE_NAME} again from {ARCHIVE_URL_HINT}"
        ) from err
    if seen == 0:
        raise QM9SourceError(f"{path} contains no .xyz files; it is not the QM9 archive {ARCHIVE_NAME}")


# ----------------------------------------------------------------------------------------------------------------
# parsing (runs in the workers)


@dataclass
class RawMolecule:
    index: int
    symbols: list[str]
    pos: np.ndarray  # [n, 3] float64, Å
    smiles: str
    quantities: np.ndarray  # [15] float64, order SOURCE_QUANTITIES, source units


class ParseError(ValueError):
    pass


def _float(token: str) -> float:
    # the raw files write some numbers in Mathematica notation, e.g. 2.1*^-6
    return float(token.replace("*^", "e"))


def parse_raw_item(item: tuple) -> RawMolecule:
    """Parse one raw item; raises :class:`ParseError` with a reason."""
    if item[0] == "csv":
        _, index, smiles, elements, xyz, quantities = item
        try:
            idx = int(index)
            symbols = [e.strip().strip("'\"") for e in elements.strip().strip("[]").split(",") if e.strip()]
            flat = np.array(xyz.replace("[", " ").replace("]", " ").split(","), dtype=np.float64)
            q = np.array([_float(v) for v in quantities], dtype=np.float64)
        except ValueError as err:
            raise ParseError(f"unparsable CSV row (index {index!r}): {err}") from None
        if flat.size != 3 * len(symbols):
            raise ParseError(f"molecule {idx}: {len(symbols)} elements but {flat.size} coordinates")
        return RawMolecule(idx, symbols, flat.reshape(-1, 3), smiles, q)
    if item[0] == "xyz":
        _, name, text = item
        lines = text.splitlines()
        try:
            n = int(lines[0])
            props = lines[1].split()
            if len(props) < 17 or props[0] != "gdb":
                raise ValueError(f"comment line has {len(props)} fields, expected 'gdb <index>' and 15 properties")
            idx = int(props[1])
            q = np.array([_float(v) for v in props[2:17]], dtype=np.float64)
            symbols, coords = [], []
            for line in lines[2 : 2 + n]:
                tok = line.split()
                symbols.append(tok[0])
                coords.append([_float(t) for t in tok[1:4]])
            if len(symbols) != n:
                raise ValueError(f"{len(symbols)} atom lines instead of {n}")
            smiles = lines[3 + n].split()[0]
        except (ValueError, IndexError) as err:
            raise ParseError(f"{name}: malformed QM9 xyz file ({err})") from None
        return RawMolecule(idx, symbols, np.asarray(coords, dtype=np.float64).reshape(-1, 3), smiles, q)
    raise ParseError(f"unknown raw item kind {item[0]!r}")


def raw_item_index(item: tuple) -> int | None:
    """The QM9 index of a raw item without parsing all of it (None if unknown)."""
    try:
        if item[0] == "csv":
            return int(item[1])
        # dsgdb9nsd_000001.xyz
        return int(Path(item[1]).stem.rsplit("_", 1)[1])
    except (ValueError, IndexError):
        return None


def is_excluded(item: tuple) -> bool:
    """True for the 3,054 unconverged molecules (only present in the raw archive)."""
    return item[0] == "xyz" and raw_item_index(item) in EXCLUDED_INDICES
