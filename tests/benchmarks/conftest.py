"""The benchmark suite lives in the repository's top-level ``benchmarks`` package (not installed): make sure the
repository root comes first on ``sys.path`` so ``import benchmarks`` finds it rather than this test folder."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
