"""The qm9 suite's ``--compile off,on`` grid axis (issue 7): compiled cells run, record how much they compiled, and
the report sets them beside their eager twins. Nothing here is timed: only the plumbing and the compile counts."""
from __future__ import annotations

import contextlib
import json
import os
import shutil

import pytest

from benchmarks import cells as cells_module
from benchmarks import report
from benchmarks.cells import shape_key
from benchmarks.cli import main
from benchmarks.data import synthetic_molecule_batches

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "clang++", "c++")),
                       reason="torch.compile (inductor) on CPU needs a C++ compiler"),
]

FAST = ["--quick", "--no-isolate", "--repeats", "2", "--warmup", "1", "--gemm-size", "256", "--no-plots"]
BATCH, NUM_BATCHES = 3, 2


@pytest.fixture(scope="module", params=["EDGE_FRAME", "FULL"])
def compile_run(tmp_path_factory, request):
    """One compiled benchmark run per level: the default (EDGE_FRAME) and FULL."""
    out = tmp_path_factory.mktemp("compile")
    # the machine's shared inductor cache instead of a cold one per cell: a rerun of this test loads, not compiles
    # (test_fresh_compile_cache_is_empty_and_removed checks the cold cache on its own)
    patch = pytest.MonkeyPatch()
    patch.setattr(cells_module, "_fresh_compile_cache", lambda enabled: contextlib.nullcontext())
    argv = ["qm9", *FAST, "--model", "tiny", "--data", "synthetic", "--batch-sizes", str(BATCH), "--num-batches",
            str(NUM_BATCHES), "--levels", request.param, "--low-memory", "off", "--scatter-backends",
            "torch", "--compile", "off,on", "--modes", "train,infer", "--out", str(out), "--name", "comp"]
    try:
        assert main(argv) == 0
    finally:
        patch.undo()
    return json.loads((out / "comp.json").read_text()), (out / "comp.md").read_text()


def _table(md: str, header_start: str) -> list:
    """The rows (header included) of the Markdown table whose header line starts with ``header_start``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_compiled_cells_run_and_record_compile_counts(compile_run):
    result, _ = compile_run
    assert result["settings"]["compile"] == [False, True]
    cells = result["cells"]
    assert [(c["mode"], c["compile"]) for c in cells] == [("train", False), ("infer", False), ("train", True),
                                                          ("infer", True)]
    assert all(c["status"] == "ok" for c in cells), [(c["mode"], c["compile"], c.get("reason")) for c in cells]
    batches, _, _ = synthetic_molecule_batches(BATCH, NUM_BATCHES, seed=0)
    shapes = len({shape_key(b) for b in batches})
    for c in cells:
        assert c["equivariance"]["max_rel_error"] < 1e-4  # the eager model's check, in compiled cells too
        if not c["compile"]:
            assert "compile_stats" not in c
            continue
        st = c["compile_stats"]
        assert st["shapes"] == shapes and len(st["first_steps_s"]) == shapes
        assert all(s > 0 for s in st["first_steps_s"]) and st["first_steps_total_s"] == pytest.approx(
            sum(st["first_steps_s"]))
        # bounded: graphs come from the first step of each shape only, never from a timed step
        assert 0 < st["unique_graphs"] <= 16 * shapes
        assert st["graphs_compiled_after_first_steps"] == 0
        assert st["graph_breaks"] >= 1  # fused_conv (FULL) is a graph break by design
        assert isinstance(st["graph_break_reasons"], dict)


def test_report_sets_compiled_cells_beside_eager(compile_run):
    result, md = compile_run
    level = result["cells"][0]["fuse_level"]
    main_table = _table(md, "| mode | level | precision | low-mem | compile |")
    assert all(len(row) == len(main_table[0]) for row in main_table)
    assert sorted(row[4] for row in main_table[2:]) == ["off", "off", "on", "on"]
    compile_table = _table(md, "| mode | level | precision | low-mem | batch | scatter | eager | compiled | speedup")
    assert all(len(row) == len(compile_table[0]) for row in compile_table)
    assert sorted(row[0] for row in compile_table[2:]) == ["infer", "train"]
    assert all(row[8].endswith("x") for row in compile_table[2:])  # a speedup against the eager twin
    assert report.markdown(json.loads(json.dumps(result))) == md  # re-rendering gives the same report
    keys = [report.cell_key(c) for c in result["cells"]]
    assert len(set(keys)) == len(keys)  # compiled and eager cells are distinct cells for compare
    readme = report.readme_table(result)
    assert f"| {level} | fp32 |" in readme and f"| {level} + compile | fp32 |" in readme


def test_compare_tells_compiled_from_eager(compile_run, tmp_path):
    result, _ = compile_run
    eager_only = dict(result, cells=[dict(c) for c in result["cells"] if not c["compile"]])
    for c in eager_only["cells"]:
        del c["compile"]  # as in result files written before the compile axis existed
    text = report.compare(eager_only, result, "old", "new")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "cell |" not in line]
    assert len(rows) == 4
    assert sum("compiled" in r for r in rows) == 2 and sum("missing" in r for r in rows) == 2
    assert sum("1.00x" in r for r in rows) == 2  # old eager cells match the new eager cells


def test_fresh_compile_cache_is_empty_and_removed():
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with cells_module._fresh_compile_cache(True):
        folder = cache_dir()
        assert os.path.basename(folder).startswith("se3t-inductor-")
        assert folder != before
    assert not os.path.exists(folder)
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before
