"""Checkpoints: atomic writes, safe (``weights_only=True``) reads, RNG states, clear errors.

A checkpoint is a plain dict of tensors and Python containers::

    format      "se3t-checkpoint"          version   CHECKPOINT_VERSION
    config      run configuration (model hyperparameters, task, target mean/std, seeds, ...)
    model       model state_dict (unwrapped: no "module." / "_orig_mod." prefixes)
    optimizer   optimizer state_dict        scheduler  LR scheduler state_dict
    scaler      GradScaler state_dict or None
    rng         torch / CUDA / numpy / python RNG states
    progress    {"epoch": e, "step_in_epoch": k, "global_step": g, "finished_epochs": ...}

It is read with ``torch.load(weights_only=True)``: a checkpoint is untrusted input and must not run pickled code.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "save_checkpoint", "load_checkpoint", "capture_rng_state",
           "restore_rng_state", "unwrap_model", "load_model_state"]

CHECKPOINT_FORMAT = "se3t-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically: a temporary file in the same directory, fsync, then ``os.replace``.

    A crash at any moment leaves either the previous checkpoint or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise
    with _suppress():  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read an se3t checkpoint safely; every way it can be unusable is a :class:`UserError` that says why."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory, not a file")
    if not zipfile.is_zipfile(path):
        raise UserError(f"checkpoint {path} cannot be read as a PyTorch file (truncated, corrupt or not a "
                        "checkpoint): it is not in torch.save's zip format")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "WeightsUnpickler" in ln]
        why = f" ({lines[0].split('. Please')[0][:160]})" if lines else ""
        raise UserError(
            f"checkpoint {path} holds objects that safe loading (weights_only=True) refuses to unpickle{why}. "
            "se3t never executes pickled code from a checkpoint; se3t checkpoints hold only "
            "tensors and plain containers. If this is a checkpoint of NVIDIA's reference implementation, convert "
            "it with `se3t convert-nvidia`."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise UserError(
            f"checkpoint {path} cannot be read as a PyTorch file (truncated, corrupt or not a checkpoint): "
            f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}"
        ) from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} holds a {type(state).__name__}, not an se3t checkpoint")
    if state.get("format") != CHECKPOINT_FORMAT:
        if "state_dict" in state or "optimizer_state_dict" in state:
            raise UserError(
                f"checkpoint {path} looks like one of NVIDIA's reference implementation; "
                "convert it first with `se3t convert-nvidia`"
            )
        raise UserError(f"checkpoint {path} is not an se3t checkpoint (no 'format': {CHECKPOINT_FORMAT!r} entry)")
    version = state.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise UserError(
            f"checkpoint {path} has format version {version!r}; this se3t reads versions up to "
            f"{CHECKPOINT_VERSION} (upgrade se3t)"
        )
    for key in ("config", "model"):
        if key not in state:
            raise UserError(f"checkpoint {path} is incomplete: it has no {key!r} entry")
    return state


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def load_model_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with a short, readable mismatch report instead of torch's wall of text."""
    own = unwrap_model(model).state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {'; '.join(shapes[:3])})")
        raise UserError(f"the weights in {source} do not fit this model: parameters " + ", ".join(parts))
    unwrap_model(model).load_state_dict(state_dict, strict=True)


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as weights_only-loadable values."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
