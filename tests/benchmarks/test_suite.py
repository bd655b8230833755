"""Smoke tests of the benchmark suites: the output files are complete and well-formed. Nothing here is timed:
benchmarks are not tests, only their plumbing is."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from benchmarks import peers, report
from benchmarks.cli import main
from benchmarks.data import synthetic_molecule_batches
from benchmarks.runner import STATUSES, latency_stats, run_cell
from benchmarks.scaling import fit_power_law
from benchmarks.suite import CELL_KEYS, SCHEMA, fuse_levels
from se3t.runtime.heap import glibc_malloc

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = ["--quick", "--no-isolate", "--repeats", "2", "--warmup", "1", "--gemm-size", "256"]


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _check_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_MAGIC


def _check_document(result: dict, suite: str) -> None:
    assert result["schema"] == SCHEMA and result["suite"] == suite
    for key in ("created", "command", "machine", "versions", "settings", "gemm", "cells"):
        assert key in result, key
    for key in ("cpu_model", "logical_cpus", "torch_threads", "device", "gpu"):
        assert key in result["machine"], key
    for key in ("python", "torch", "e3nn", "se3t"):
        assert result["versions"][key], key
    for cell in result["cells"]:
        assert all(k in cell for k in CELL_KEYS), cell
        assert cell["status"] in STATUSES
        if cell["status"] == "ok":
            lat = cell["latency_s"]
            assert 0 < lat["min"] <= lat["median"] <= lat["p90"] <= lat["p99"] <= lat["max"]
            assert lat["n"] == cell["repeats_run"] >= 1
            assert cell["throughput"]["value"] > 0 and cell["throughput"]["unit"] in ("mol/s", "points/s")
            assert cell["memory"]["peak_bytes"] > 0 and cell["memory"]["growth_bytes"] >= 0
            for order in ("pairwise", "fused"):
                assert cell["flops"][order]["achieved_flops_per_s"] > 0
            assert cell["se3t_source"] and cell["load_average"]["before"]
        else:
            assert cell["reason"], cell


@pytest.fixture(scope="module")
def qm9_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qm9")
    argv = ["qm9", *FAST, "--model", "tiny", "--data", "synthetic", "--batch-sizes", "3", "--num-batches", "2",
            "--levels", "NONE,FULL", "--low-memory", "off,on", "--low-memory-levels", "FULL", "--scatter-backends",
            "torch", "--out", str(out),
            "--name", "smoke"]
    assert main(argv) == 0
    return out


def test_qm9_quick_writes_complete_outputs(qm9_run):
    result = _load(qm9_run / "smoke.json")
    _check_document(result, "qm9")
    assert result["gemm"]["fp32"]["flops_per_s"] > 0
    cells = result["cells"]
    # (2 levels x off + FULL x on) x 2 modes
    assert len(cells) == 3 * 2 and {c["scatter_backend"] for c in cells} == {"torch"}
    assert {c["fuse_level"] for c in cells} == {"NONE", "FULL"}
    ok = [c for c in cells if c["status"] == "ok"]
    assert {(c["mode"], c["fuse_level"], c["low_memory"]) for c in ok} == {
        ("train", "NONE", False), ("infer", "NONE", False), ("train", "FULL", False), ("infer", "FULL", False),
        ("train", "FULL", True)}
    assert all(c["status"] == "skipped" for c in cells if c["low_memory"] and c["mode"] == "infer")
    for c in ok:
        eq = c["equivariance"]
        assert 0 <= eq["max_rel_error"] < 1e-4 and eq["rel_dev_vs_fp32_none"] < 1e-4
        assert c["gemm"]["flops_per_s"] > 0 and 0 < report.utilisation(c, result) < 10
        assert c["flops"]["fused"]["per_step"] >= c["flops"]["pairwise"]["per_step"]
        assert c["items_per_step"] == 3
        if c["mode"] == "train":  # memory that is not activations: gradients and AdamW's two moments
            mem = c["memory"]
            assert 0 < mem["gradient_bytes"] <= mem["parameter_bytes"] == 4 * c["num_parameters"]
            assert mem["optimizer_state_bytes"] >= 2 * mem["gradient_bytes"]
            assert mem["activation_growth_bytes"] == max(
                mem["growth_bytes"] - mem["gradient_bytes"] - mem["optimizer_state_bytes"], 0)
            # live tensors of a step: at least the gradients it makes (set to None before each step)
            assert mem["live_peak_bytes"] >= mem["gradient_bytes"] and "profiler" in mem["live_method"]
    md = (qm9_run / "smoke.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| train") or line.startswith("| infer")]
    assert len(table) == sum(c["status"] != "unsupported" for c in cells)
    for name in ("throughput", "memory"):
        _check_png(qm9_run / f"smoke-{name}.png")
    assert sorted(result["outputs"]["plots"]) == ["smoke-memory.png", "smoke-throughput.png"]


def test_optimizer_in_backward_cells(tmp_path, capsys):
    """Training cells with the AdamW step made per parameter in backward: no gradients outlive the step, and
    their own rows in the tables (what it saves is measured at the paper model's size, see the README)."""
    argv = ["qm9", *FAST, "--model", "tiny", "--data", "synthetic", "--batch-sizes", "3", "--num-batches", "2",
            "--levels", "FULL", "--low-memory", "on", "--low-memory-levels", "FULL",
            "--optimizer-in-backward", "off,on",
            "--scatter-backends", "torch", "--no-plots", "--no-equivariance", "--out", str(tmp_path), "--name", "oib"]
    assert main(argv) == 0
    cells = _load(tmp_path / "oib.json")["cells"]
    train = {c["optimizer_in_backward"]: c for c in cells if c["mode"] == "train"}
    assert len(cells) == 3 and set(train) == {False, True}  # inference has no optimizer: one cell
    assert all(c["status"] == "ok" for c in train.values())
    assert train[True]["memory"]["gradient_bytes"] == 0 < train[False]["memory"]["gradient_bytes"]
    assert train[True]["memory"]["live_peak_bytes"] > 0
    assert main(["readme-table", str(tmp_path / "oib.json")]) == 0
    assert "| FULL | fp32 | on + optimizer in backward | 3 |" in capsys.readouterr().out


@pytest.mark.skipif(not glibc_malloc(), reason="glibc's malloc only")
def test_return_freed_memory_cells(tmp_path, capsys):
    """Cells whose process has glibc's malloc give freed tensors back (as ``se3t train --return_freed_memory``
    does): their own rows, each cell in its own process (the setting is process-wide)."""
    argv = ["qm9", *[a for a in FAST if a != "--no-isolate"], "--model", "tiny", "--data", "synthetic",
            "--batch-sizes", "3", "--num-batches", "2", "--levels", "FULL", "--low-memory", "on",
            "--low-memory-levels", "FULL", "--modes", "train", "--return-freed-memory", "off,on",
            "--scatter-backends", "torch", "--no-plots", "--no-equivariance", "--out", str(tmp_path), "--name", "rfm"]
    assert main(argv) == 0
    cells = _load(tmp_path / "rfm.json")["cells"]
    assert sorted(c["return_freed_memory"] for c in cells) == [False, True]
    assert all(c["status"] == "ok" and c["memory"]["peak_bytes"] > 0 for c in cells)
    assert main(["readme-table", str(tmp_path / "rfm.json")]) == 0
    assert "| FULL | fp32 | on + freed memory returned | 3 |" in capsys.readouterr().out


def test_return_freed_memory_cells_need_glibc(tmp_path, monkeypatch):
    from benchmarks import qm9
    monkeypatch.setattr(qm9, "glibc_malloc", lambda: False)
    argv = ["qm9", *FAST, "--model", "tiny", "--data", "synthetic", "--batch-sizes", "3", "--num-batches", "2",
            "--levels", "FULL", "--low-memory", "off", "--modes", "train", "--return-freed-memory", "on",
            "--scatter-backends", "torch", "--no-plots", "--no-equivariance", "--out", str(tmp_path), "--name", "no"]
    assert main(argv) == 0
    cell, = _load(tmp_path / "no.json")["cells"]
    assert cell["status"] == "unsupported" and "glibc" in cell["reason"]


def test_readme_table_and_report(qm9_run, capsys):
    assert main(["readme-table", str(qm9_run / "smoke.json")]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| NONE") or line.startswith("| FULL")]
    assert len(rows) == 3  # NONE off, FULL off, FULL on (low memory: train only)
    assert "AMD" in text or "Intel" in text or "cpu" in text.lower() or text.startswith("Measured on")
    (qm9_run / "smoke.md").unlink()
    assert main(["report", str(qm9_run / "smoke.json")]) == 0
    assert (qm9_run / "smoke.md").read_text().count("| train") >= 3


def test_compare_renders_ratios(qm9_run, tmp_path):
    a = _load(qm9_run / "smoke.json")
    b = copy.deepcopy(a)
    first = next(c for c in b["cells"] if c["status"] == "ok")
    first["throughput"]["value"] *= 2
    first["memory"]["peak_bytes"] //= 2
    b["cells"] = [c for c in b["cells"] if not (c["mode"] == "infer" and c["fuse_level"] == "NONE")]
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "c.md")]) == 0
    text = (tmp_path / "c.md").read_text()
    assert "2.00x" in text and "0.50x" in text and "1.00x" in text
    assert "missing" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "cell |" not in line]
    assert len(rows) == len([c for c in a["cells"] if c["status"] != "unsupported"])


def test_scaling_quick_fits_exponents(tmp_path):
    argv = ["scaling", *FAST, "--sizes", "60,120,240", "--degree-points", "60", "--max-degree", "1",
            "--modes", "infer", "--out", str(tmp_path), "--name", "scal", "--levels", "EDGE_FRAME,FULL"]
    assert main(argv) == 0
    result = _load(tmp_path / "scal.json")
    _check_document(result, "scaling")
    cells = result["cells"]
    assert [c["num_points"] for c in cells if c["sweep"] == "size"] == [60, 120, 240]
    assert [(c["fuse_level"], c["max_degree"]) for c in cells if c["sweep"] == "degree"] == [
        ("EDGE_FRAME", 0), ("EDGE_FRAME", 1), ("FULL", 0), ("FULL", 1)]
    assert {c["fuse_level"] for c in cells if c["sweep"] == "size"} == {"EDGE_FRAME"}
    assert all(c["throughput"]["unit"] == "points/s" for c in cells if c["status"] == "ok")
    assert all(c["num_edges"] > 0 for c in cells)
    for name in ("infer: time vs nodes", "infer: time vs edges", "infer: time vs (max_degree + 1)",
                 "infer FULL: time vs (max_degree + 1)"):
        assert name in result["fits"] and result["fits"][name]["points"] >= 2
    _check_png(tmp_path / "scal-scaling.png")
    assert "| fit (y = a x^b)" in (tmp_path / "scal.md").read_text()


def test_fit_power_law_recovers_the_exponent():
    x = [10, 100, 1000, 10000]
    fit = fit_power_law(x, [3.0 * v ** 1.5 for v in x])
    assert fit["exponent"] == pytest.approx(1.5) and fit["prefactor"] == pytest.approx(3.0)
    assert fit["r2"] == pytest.approx(1.0)
    assert fit_power_law([10], [1.0]) is None


def test_latency_stats_orders_percentiles():
    s = latency_stats([0.5, 0.1, 0.2, 0.3, 0.4])
    assert s["median"] == pytest.approx(0.3) and s["min"] == 0.1 and s["max"] == 0.5 and s["n"] == 5
    assert s["median"] <= s["p90"] <= s["p99"] <= s["max"]


def test_isolated_cell_measures_memory_time_limit_and_oom():
    mib = 1 << 20
    ok = run_cell("benchmarks.runner:memory_probe", {"nbytes": 96 * mib}, isolate=True, timeout=120)
    assert ok["status"] == "ok", ok
    assert 90 * mib <= ok["memory"]["growth_bytes"] <= 160 * mib, ok["memory"]
    slow = run_cell("benchmarks.runner:memory_probe", {"nbytes": mib, "sleep_s": 60}, isolate=True, timeout=15)
    assert slow["status"] == "timeout" and "time limit" in slow["reason"]
    oom = run_cell("benchmarks.runner:memory_probe", {"nbytes": 16 << 30}, isolate=True, timeout=120,
                   mem_limit=4 << 30)
    assert oom["status"] == "oom", oom
    err = run_cell("benchmarks.runner:memory_probe", {"nbytes": -4}, isolate=False)
    assert err["status"] == "error" and err["reason"]


def test_live_tensor_peak_counts_the_tensors_alive_at_once():
    """Three 4 MB tensors alive together, each freed before the next phase's: the peak is their sum (plus the
    small reduction outputs), not every allocation of the step, and a fused kernel on worker threads is run on
    the calling thread while measured (its flag restored after)."""
    from benchmarks.runner import live_tensor_peak
    from se3t.nn import fused
    mb4 = 1000 * 1000 * 4

    def step():
        a = torch.ones(1000, 1000)
        b, c = a * 2, a * 3
        del a, b, c
        d = torch.ones(1000, 1000)
        del d

    assert fused.PARALLEL_RANGES
    peak = live_tensor_peak(step)["live_peak_bytes"]
    assert fused.PARALLEL_RANGES
    assert 3 * mb4 <= peak < 3 * mb4 + 4096, peak


def test_peer_cells_recorded_when_not_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "se3_transformer_pytorch" else real(name, *a))
    batches, eq, _ = synthetic_molecule_batches(2, 1)

    class Args:
        batch_sizes, precisions, modes, peer_depth, warmup, repeats = [2], ["fp32"], ["infer"], 1, 1, 1
        max_cell_seconds, seed = None, 0

    cells = peers.build_cells(Args, torch.device("cpu"), {2: (batches, eq, {})})
    assert [c["model"] for c in cells] == ["se3t", "lucidrains/se3-transformer-pytorch"]
    assert cells[1]["status"] == "unsupported" and "not installed" in cells[1]["reason"]


def test_dense_conversion_keeps_every_bond():
    batches, _, _ = synthetic_molecule_batches(5, 1, seed=3)
    b = batches[0]
    dense = peers.to_dense(b)
    assert dense["mask"].sum() == b["num_real_nodes"]
    assert dense["adj_mat"].sum() == b["num_real_edges"]
    assert (dense["edges"] > 0).sum() == b["num_real_edges"]
    assert torch.equal(dense["adj_mat"], dense["adj_mat"].transpose(1, 2))
    assert torch.allclose(dense["feats"][dense["mask"]], b["node_feats"][: b["num_real_nodes"]])


def test_unavailable_backends_and_precisions_are_recorded_not_dropped(monkeypatch):
    import se3t
    from benchmarks import qm9
    from benchmarks.cli import _defaults, build_parser

    monkeypatch.setattr(se3t.scatter, "WITH_TORCH_SCATTER", False)
    args = build_parser().parse_args(["qm9", "--model", "tiny", "--precisions", "fp32,tf32", "--low-memory", "off"])
    _defaults(args, "qm9", torch.device("cpu"))
    batches, eq, info = synthetic_molecule_batches(2, 1)
    cells = qm9.build_cells(args, torch.device("cpu"), {100: (batches, eq, info)})
    n_levels = len(fuse_levels())
    assert len(cells) == n_levels * 2 * 2 * len(se3t.scatter.BACKENDS)  # levels x precisions x modes x backends
    reasons = {(c["precision"], c["scatter_backend"]): c.get("reason") for c in cells if c["status"] == "unsupported"}
    assert "not installed" in reasons[("fp32", "torch_scatter")] and "CUDA" in reasons[("tf32", "torch")]
    assert sum(c["status"] is None for c in cells) == n_levels * 2  # fp32 x torch x both modes


def test_every_fuse_level_is_in_the_default_grid():
    import se3t

    assert fuse_levels() == [m.name for m in se3t.FuseLevel]


def test_cells_too_slow_to_time_still_measure_accuracy(tmp_path):
    """A precision too slow to time here (bf16 without native support) is skipped, but its inference cell still
    reports the equivariance error at that precision, and the README table shows it."""
    argv = ["qm9", *FAST, "--model", "tiny", "--data", "synthetic", "--batch-sizes", "3", "--num-batches", "1",
            "--levels", "FULL", "--low-memory", "off", "--scatter-backends", "torch", "--precisions", "bf16",
            "--max-step-seconds", "1e-9", "--out", str(tmp_path), "--name", "slow"]
    assert main(argv) == 0
    result = _load(tmp_path / "slow.json")
    _check_document(result, "qm9")
    cells = {c["mode"]: c for c in result["cells"]}
    assert {c["status"] for c in cells.values()} == {"skipped"}
    assert "max-step-seconds" in cells["train"]["reason"] and "equivariance" not in cells["train"]
    eq = cells["infer"]["equivariance"]
    assert 0 < eq["max_rel_error"] < 0.5 and 0 < eq["rel_dev_vs_fp32_none"] < 0.5  # bf16: visibly above fp32
    assert cells["infer"]["estimated_step_s"] > 0
    row = next(line for line in report.readme_table(result).splitlines() if line.startswith("| FULL | bf16"))
    assert row.rstrip(" |").split("|")[-1].strip() not in ("", "-")
