"""Shared fixtures: fixed seeds, TF32 off, both float dtypes with their tolerances."""
from __future__ import annotations

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


