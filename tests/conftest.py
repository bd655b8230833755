"""Shared fixtures: fixed seeds, TF32 off, both float dtypes with their tolerances."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from se3t.testing import FLOAT_TOLERANCE


@pytest.fixture(autouse=True)
def _seed_and_precision():
    torch.manual_seed(0)
    # TF32 never on inside numerical tests (it fails equivariance at these tolerances on Ampere+).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.fixture
def tol(dtype):
    return FLOAT_TOLERANCE[dtype]




# Capabilities a run promises (e.g. SE3T_REQUIRE=rdkit,qm9 in the full CI session): a missing capability is a
# usage error, and a test with that marker that skips anyway fails instead of silently not running.
REQUIRED = {c.strip() for c in os.environ.get("SE3T_REQUIRE", "").split(",") if c.strip()}


def _available(capability: str) -> bool:
    if capability == "torch_scatter":
        return importlib.util.find_spec("torch_scatter") is not None
    if capability == "rdkit":
        return importlib.util.find_spec("rdkit") is not None
    if capability == "qm9":
        return importlib.util.find_spec("qm9pack") is not None
    if capability == "peers":
        return importlib.util.find_spec("se3_transformer_pytorch") is not None
    if capability == "gpu":
        return torch.cuda.is_available()
    if capability == "triton":
        return importlib.util.find_spec("triton") is not None
    raise pytest.UsageError(f"SE3T_REQUIRE: unknown capability {capability!r}")


def pytest_configure(config):
    missing = sorted(c for c in REQUIRED if not _available(c))
    if missing:
        raise pytest.UsageError(f"SE3T_REQUIRE promises {missing} but they are not available in this environment")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and any(item.get_closest_marker(c) for c in REQUIRED):
        report.outcome = "failed"
        report.longrepr = f"skipped although SE3T_REQUIRE={','.join(sorted(REQUIRED))} promises it: {report.longrepr}"
