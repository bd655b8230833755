"""QM9 sources (raw archive, qm9pack CSV, download), bad input, and the cache."""

from __future__ import annotations

import csv
import hashlib
import logging
import shutil

import numpy as np
import pytest

import se3t_data
from se3t_data import QM9SourceError, _preprocess
from se3t_data._excluded import EXCLUDED_INDICES

from data_helpers import ARCHIVE_FIXTURE, fixture_qm9

csv.field_size_limit(1 << 30)


def _rewrite_csv(path, edit):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows = edit(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _archive_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(ARCHIVE_FIXTURE, root / ARCHIVE_FIXTURE.name)
    return root


def test_archive_and_qm9pack_give_the_same_data(tmp_path, small_qm9):
    from_archive = fixture_qm9(_archive_root(tmp_path), source="archive")
    assert from_archive.info["source_kind"] == "archive"
    assert small_qm9.info["source_kind"] == "qm9pack"
    assert len(from_archive) == len(small_qm9) > 250
    np.testing.assert_array_equal(from_archive.indices, small_qm9.indices)
    for key in ("atom_ptr", "z", "pos", "bond_ptr", "bonds", "bond_type", "bond_status"):
        np.testing.assert_array_equal(from_archive._arrays[key], small_qm9._arrays[key], err_msg=key)
    # the archive writes some numbers as 1.2*^-5, rounded to 7 digits
    np.testing.assert_allclose(from_archive._arrays["targets"], small_qm9._arrays["targets"], rtol=1e-6, atol=1e-9)


def test_archive_leaves_out_the_unconverged_molecules(tmp_path):
    ds = fixture_qm9(_archive_root(tmp_path), source="archive")
    assert {58, 61, 80} <= EXCLUDED_INDICES
    assert not {58, 61, 80} & set(ds.indices.tolist())
    assert ds.info["num_excluded_unconverged"] == 3


def test_archive_is_preferred_over_qm9pack(tmp_path):
    ds = fixture_qm9(_archive_root(tmp_path))  # source='auto'
    assert ds.info["source_kind"] == "archive"


def test_missing_data_says_what_to_do(tmp_path, no_qm9pack):
    with pytest.raises(QM9SourceError) as err:
        se3t_data.QM9(tmp_path, progress=False)
    message = str(err.value)
    assert "pip install qm9pack" in message
    assert str(tmp_path / "dsgdb9nsd.xyz.tar.bz2") in message
    with pytest.raises(QM9SourceError, match="no QM9 archive"):
        se3t_data.QM9(tmp_path, source="archive", progress=False)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_archive_is_an_error(tmp_path, damage):
    root = tmp_path / "root"
    root.mkdir()
    data = ARCHIVE_FIXTURE.read_bytes()
    data = np.random.default_rng(0).bytes(len(data)) if damage == "garbage" else data[: len(data) // 2]
    (root / ARCHIVE_FIXTURE.name).write_bytes(data)
    with pytest.raises(QM9SourceError, match="corrupt or truncated"):
        fixture_qm9(root, source="archive")
    assert not list(root.glob("*.npz")), "no cache may be written from a broken source"


def test_csv_with_a_missing_column_is_an_error(tmp_path, qm9pack_copy):
    def drop_homo(rows):
        k = rows[0].index("HOMO_au")
        return [r[:k] + r[k + 1 :] for r in rows]

    _rewrite_csv(qm9pack_copy / "qm9_part2.csv", drop_homo)
    with pytest.raises(QM9SourceError, match="HOMO_au"):
        fixture_qm9(tmp_path, qm9pack_dir=qm9pack_copy)


def test_truncated_csv_is_an_error(tmp_path, qm9pack_copy):
    path = qm9pack_copy / "qm9_part1.csv"
    text = path.read_text()
    path.write_text(text[: len(text) - 500])  # cut inside the last row
    with pytest.raises(QM9SourceError, match="truncated"):
        fixture_qm9(tmp_path, qm9pack_dir=qm9pack_copy)


def test_incomplete_source_is_an_error_when_the_full_set_is_expected(tmp_path):
    with pytest.raises(QM9SourceError, match="lacks 130"):
        fixture_qm9(tmp_path, expect_complete=True)


def _edit_xyz(qm9pack_copy, index, fn):
    def edit(rows):
        col = rows[0].index("XYZ_Ang")
        for r in rows[1:]:
            if r[1] == str(index):
                r[col] = fn(r[col])
        return rows

    _rewrite_csv(qm9pack_copy / "qm9_part1.csv", edit)


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda xyz: xyz.replace("1.0858041578", "nan", 1), "non-finite coordinates"),
        # move atom 1 of methane onto atom 0 (0.01 Å away)
        (lambda xyz: "[[0.0,0.0,0.0],[0.01,0.0,0.0]" + xyz[xyz.index("],[", xyz.index("],[") + 1) :],
         "Å apart"),
    ],
    ids=["nan", "close-atoms"],
)  # fmt: skip
def test_invalid_molecules_are_skipped_counted_and_logged(tmp_path, qm9pack_copy, small_qm9, caplog, edit, reason):
    _edit_xyz(qm9pack_copy, 1, edit)
    with caplog.at_level(logging.WARNING, logger="se3t_data"):
        ds = fixture_qm9(tmp_path, qm9pack_dir=qm9pack_copy)
    assert len(ds) == len(small_qm9) - 1
    assert 1 not in ds.indices
    assert list(ds.info["skipped"]) == ["1"] and reason in ds.info["skipped"]["1"]
    assert "skipped 1 invalid molecule" in caplog.text


def test_download_with_checksum_from_a_file_url(tmp_path, no_qm9pack):
    url = ARCHIVE_FIXTURE.resolve().as_uri()
    digest = hashlib.sha256(ARCHIVE_FIXTURE.read_bytes()).hexdigest()
    bad = tmp_path / "bad"
    with pytest.raises(QM9SourceError, match="checksum mismatch"):
        fixture_qm9(bad, download_url=url, sha256="0" * 64)
    assert not (bad / ARCHIVE_FIXTURE.name).exists() and not list(bad.glob(".*part"))
    ds = fixture_qm9(tmp_path / "good", download_url=url, sha256=digest)
    assert ds.info["source_kind"] == "archive" and len(ds) > 250
    assert (tmp_path / "good" / ARCHIVE_FIXTURE.name).read_bytes() == ARCHIVE_FIXTURE.read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# cache


def test_cache_is_reused_and_keyed_by_source_and_version(tmp_path, monkeypatch):
    first = fixture_qm9(tmp_path)
    assert first.cache_file.parent == tmp_path
    assert first.info["source_fingerprint"] in first.cache_file.name
    assert first.cache_file.name.endswith(f"_v{_preprocess.PREPROCESS_VERSION}.npz")

    def no_build(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(_preprocess, "build_arrays", no_build)
    again = fixture_qm9(tmp_path)
    np.testing.assert_array_equal(again._arrays["pos"], first._arrays["pos"])
    # a new preprocessing version must not read the old cache
    monkeypatch.setattr(_preprocess, "PREPROCESS_VERSION", _preprocess.PREPROCESS_VERSION + 1)
    with pytest.raises(AssertionError, match="cache should have been used"):
        fixture_qm9(tmp_path)


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    good = fixture_qm9(tmp_path)
    before = good.cache_file.read_bytes()

    def crash(file, **arrays):
        file.write(b"partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(_preprocess.np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        fixture_qm9(tmp_path, force_reprocess=True)
    assert good.cache_file.read_bytes() == before
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert left == [good.cache_file.name], "no temporary file may be left"


def test_unreadable_cache_is_rebuilt(tmp_path, caplog):
    good = fixture_qm9(tmp_path)
    good.cache_file.write_bytes(b"not an npz file")
    with caplog.at_level(logging.WARNING, logger="se3t_data"):
        again = fixture_qm9(tmp_path)
    assert "unreadable" in caplog.text
    assert len(again) == len(good)


def test_parallel_preprocessing_equals_serial(tmp_path, small_qm9):
    parallel = fixture_qm9(tmp_path, num_workers=2)
    assert parallel.info["num_workers"] == 2
    for key in ("index", "z", "pos", "bonds", "bond_type", "bond_status", "targets"):
        np.testing.assert_array_equal(parallel._arrays[key], small_qm9._arrays[key], err_msg=key)


def test_concurrent_processes_preprocess_once(tmp_path):
    """Two processes (e.g. DDP ranks) asking for the same cache: one builds it, the other waits and reads it."""
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import sys, json; sys.path.insert(0, sys.argv[2]);"
        "from data_helpers import fixture_qm9;"
        "ds = fixture_qm9(sys.argv[1]);"
        "print(json.dumps([len(ds), ds.info['preprocess_seconds']]))"
    )
    here = str(Path(__file__).parent)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), here], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    results = [tuple(__import__("json").loads(o.strip().splitlines()[-1])) for o in outputs]
    assert results[0] == results[1], "both read the same cache (same build time recorded)"
    assert len(list(tmp_path.glob("*.npz"))) == 1
