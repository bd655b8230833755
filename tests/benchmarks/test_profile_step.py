"""``python -m benchmarks.profile_step``: one step's ops and their time (CPU here; CUDA adds kernels and a replay)."""
from __future__ import annotations

import re

from benchmarks.profile_step import main


def test_profile_step_reports_ops_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "prof.txt"
    main(["--model", "tiny", "--batch-size", "3", "--top", "5", "--out", str(out)])
    text = capsys.readouterr().out
    assert out.read_text().strip() == text.strip()
    assert text.startswith("profile: tiny model, EDGE_FRAME, fp32, train, batch 3")
    calls, ms = re.search(r"ops with CPU \(self\) time: (\d+) calls, ([\d.]+) ms summed", text).groups()
    assert int(calls) > 100 and float(ms) > 0
    rows = text.split("top ops by CPU (self) time: calls, ms, share\n")[1].strip().splitlines()
    assert len(rows) == 5
    shares = [float(r.split()[-1].rstrip("%")) for r in rows]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.0 + 1e-6
    # the fused conv's forward and backward are among the costliest ops of a training step
    assert any(r.strip().startswith("_FusedConv") for r in rows)


def test_profile_step_inference(capsys):
    main(["--model", "tiny", "--batch-size", "2", "--mode", "infer", "--level", "FULL", "--top", "3"])
    text = capsys.readouterr().out
    assert "FULL, fp32, infer" in text and "Backward" not in text
