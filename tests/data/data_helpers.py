"""Helpers for the se3t_data tests: the ~300-molecule QM9 fixture (see fixtures/make_fixtures.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import se3t_data
from se3t_data import _sources

FIXTURES = Path(__file__).parent / "fixtures"
QM9PACK_FIXTURE = FIXTURES / "qm9pack"
ARCHIVE_FIXTURE = FIXTURES / "dsgdb9nsd.xyz.tar.bz2"


def fixture_qm9(root, **kwargs) -> se3t_data.QM9:
    """QM9 from the fixture (qm9pack format unless a source is given), built in this process."""
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("expect_complete", False)
    qm9pack_dir = kwargs.pop("qm9pack_dir", QM9PACK_FIXTURE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_sources, "find_qm9pack_dir", lambda: qm9pack_dir)
        return se3t_data.QM9(root, **kwargs)
