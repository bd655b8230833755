"""The step-level pieces shared by training, evaluation and prediction.

Batches are ``se3t_data.PaddedBatch``-like: ``.to(device)``, ``.model_inputs()`` (the model's forward kwargs),
``.y [G_cap]`` (targets in their unit) and ``.graph_mask [G_cap]`` (True for real graphs; the padding's dummy
graph and empty slots are False). Only real graphs enter losses, errors and predictions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..nn.fused import cached_kernel_weights
from .build import TargetInfo
from .distributed import DistInfo, all_reduce_sum
from .precision import PrecisionPolicy

__all__ = ["forward_batch", "standardised_abs_error", "StepTimer", "evaluate_mae", "predict_values",
           "shard_batches"]


def forward_batch(model: torch.nn.Module, batch, policy: PrecisionPolicy) -> tuple[torch.Tensor, torch.Tensor]:
    """Model output for the real graphs of ``batch`` (fp32, ``[G]``) and their mask over the padded slots."""
    return _predict(model, batch.model_inputs(), policy), batch.graph_mask.to(torch.bool)


def _predict(model: torch.nn.Module, inputs: dict, policy: PrecisionPolicy) -> torch.Tensor:
    """The model's first output per graph slot, in fp32: ``[G]``."""
    with policy.autocast():
        out = model(**inputs)
    return out.float().reshape(out.shape[0], -1)[:, 0]


def standardised_abs_error(model, batch, policy: PrecisionPolicy, target: TargetInfo) -> torch.Tensor:
    """Sum over the batch's real graphs of |prediction - (y - mean) / std| (the L1 loss's numerator)."""
    pred, mask = forward_batch(model, batch, policy)
    return _masked_abs_error(pred, batch.y, mask, target)


def inputs_abs_error(model, inputs: dict, y: torch.Tensor, graph_mask: torch.Tensor, policy: PrecisionPolicy,
                     target: TargetInfo) -> torch.Tensor:
    """:func:`standardised_abs_error` from the batch's parts (``model_inputs()``, ``y``, ``graph_mask``): plain
    tensors and values, as :class:`se3t.CUDAGraphStep` takes them; no host synchronisation."""
    return _masked_abs_error(_predict(model, inputs, policy), y, graph_mask.to(torch.bool), target)


def _masked_abs_error(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, target: TargetInfo) -> torch.Tensor:
    y_std = (y.to(pred.device, torch.float32).reshape(-1) - target.mean) / target.std
    # where(), not multiplication by the mask: padded slots may hold NaN targets without poisoning the sum.
    return torch.where(mask, (pred - y_std).abs(), torch.zeros_like(pred)).sum()


def shard_batches(num_samples: int, batch_size: int, dist: DistInfo) -> list[list[int]]:
    """This rank's contiguous share of ``range(num_samples)`` in batches (nothing dropped, no shuffling)."""
    from .data import even_chunks

    lo, hi = even_chunks(num_samples, dist.world_size)[dist.rank]
    return [list(range(s, min(s + batch_size, hi))) for s in range(lo, hi, batch_size)]


@dataclass
class StepTimer:
    """Per-step wall times for ``--benchmark``: throughput and latency percentiles after warm-up.

    As the reference measures it: a step's latency is the (device-synchronised) time between the ends of two
    consecutive steps, data loading included. ``restart()`` is called before the first step of a loop (it only
    starts the clock; time between loops, e.g. validation, is not counted) and ``mark()`` after every step.
    """

    device: torch.device
    warmup: int
    molecules: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    _seen: int = 0
    _last: float | None = None

    def restart(self) -> None:
        self._last = None
        self.mark(0)

    def mark(self, molecules: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self._last is not None:
            self._seen += 1
            if self._seen > self.warmup:
                self.seconds.append(now - self._last)
                self.molecules.append(molecules)
        self._last = now

    def report(self, mode: str) -> dict:
        if not self.seconds:
            return {"mode": mode, "measured_steps": 0,
                    "note": f"no steps after the {self.warmup} warm-up steps; lower --benchmark_warmup"}
        s = np.asarray(self.seconds)
        return {
            "mode": mode,
            "measured_steps": len(s),
            "warmup_steps": self.warmup,
            "throughput_mol_s": float(sum(self.molecules) / s.sum()),
            "latency_mean_ms": float(s.mean() * 1e3),
            "latency_p50_ms": float(np.percentile(s, 50) * 1e3),
            "latency_p90_ms": float(np.percentile(s, 90) * 1e3),
            "latency_p95_ms": float(np.percentile(s, 95) * 1e3),
            "latency_p99_ms": float(np.percentile(s, 99) * 1e3),
            "mean_batch_molecules": float(np.mean(self.molecules)),
        }


def _loader(dataset, batches: Sequence[Sequence[int]], collate: Callable, num_workers: int, device: torch.device):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
                                       pin_memory=device.type == "cuda")


@torch.no_grad()
def evaluate_mae(model, dataset, collate: Callable, *, batch_size: int, policy: PrecisionPolicy, dist: DistInfo,
                 target: TargetInfo, num_workers: int = 0, timer: StepTimer | None = None) -> tuple[float, int]:
    """Mean absolute error in the target's unit over ``dataset`` (all ranks' shares), and the molecule count."""
    was_training = model.training
    model.eval()
    batches = shard_batches(len(dataset), batch_size, dist)
    loader = _loader(dataset, batches, collate, num_workers, dist.device)
    total = torch.zeros(2, dtype=torch.float64, device=dist.device)
    if timer is not None:
        timer.restart()
    with cached_kernel_weights(model):  # the weights do not change during evaluation: lay them out once
        for indices, batch in zip(batches, loader):
            batch = batch.to(dist.device)
            err = standardised_abs_error(model, batch, policy, target)
            if timer is not None:
                timer.mark(len(indices) * dist.world_size)
            total[0] += err.double() * target.std
            total[1] += len(indices)
    all_reduce_sum(total)
    model.train(was_training)
    n = int(total[1].item())
    return (float(total[0].item()) / max(n, 1)), n


@torch.no_grad()
def predict_values(model, dataset, collate: Callable, *, batch_size: int, policy: PrecisionPolicy,
                   device: torch.device, target: TargetInfo) -> np.ndarray:
    """Predictions in the target's unit, one per molecule of ``dataset``, in order (single process)."""
    model.eval()
    out = []
    with cached_kernel_weights(model):
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]).to(device)
            pred, mask = forward_batch(model, batch, policy)
            out.append((pred[mask].double() * target.std + target.mean).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)
