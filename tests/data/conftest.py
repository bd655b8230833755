"""Fixtures for se3t_data: ~300 real QM9 molecules (see fixtures/make_fixtures.py) in both source formats."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("rdkit")  # every se3t_data test preprocesses or perceives bonds

import se3t_data  # noqa: E402
from data_helpers import QM9PACK_FIXTURE, fixture_qm9  # noqa: E402
from se3t_data import _sources  # noqa: E402


@pytest.fixture
def use_fixture_qm9pack(monkeypatch):
    """Make the fixture folder the installed qm9pack data."""
    monkeypatch.setattr(_sources, "find_qm9pack_dir", lambda: QM9PACK_FIXTURE)
    return QM9PACK_FIXTURE


@pytest.fixture
def no_qm9pack(monkeypatch):
    monkeypatch.setattr(_sources, "find_qm9pack_dir", lambda: None)


@pytest.fixture(scope="session")
def qm9_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qm9")


@pytest.fixture(scope="session")
def small_qm9(qm9_root) -> se3t_data.QM9:
    """The fixture's molecules (qm9pack format), task homo, bond graphs."""
    return fixture_qm9(qm9_root)


@pytest.fixture
def qm9pack_copy(tmp_path) -> Path:
    dest = tmp_path / "qm9pack"
    shutil.copytree(QM9PACK_FIXTURE, dest)
    return dest
