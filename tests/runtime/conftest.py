"""Fixtures of the runtime tests (helpers live in runtime_helpers.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"
ARCHIVE = "dsgdb9nsd.xyz.tar.bz2"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def qm9_dir(tmp_path_factory) -> Path:
    """A data directory holding the ~300-molecule QM9 fixture archive (the cache is built there once)."""
    pytest.importorskip("rdkit", reason="preprocessing QM9 perceives bonds with RDKit (pip install 'se3t[data]')")
    src = FIXTURES / ARCHIVE
    if not src.exists():
        pytest.fail(f"the QM9 fixture {src} is missing (tests/data/fixtures/make_fixtures.py makes it)")
    root = tmp_path_factory.mktemp("qm9")
    shutil.copy(src, root / ARCHIVE)
    return root
