"""Data-parallel plumbing: ``torchrun`` environment, process group, device choice, ``no_sync``.

One process per device. ``torchrun --nproc_per_node=K [--nnodes ... --rdzv_endpoint ...] -m se3t train ...``
sets ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``; we join the default process group with NCCL on CUDA and Gloo on
CPU. Without those variables the run is a single process and nothing here communicates.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError

__all__ = ["DistInfo", "resolve_device", "init_distributed", "shutdown_distributed", "sync_context",
           "all_reduce_sum"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; a clear error when CUDA is missing."""
    name = (device or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device torch knows (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} asks for CUDA, but torch sees no CUDA device here; use --device cpu")
        index = local_rank if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise UserError(f"CUDA device {index} does not exist ({torch.cuda.device_count()} visible)")
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise UserError(f"--device {device!r}: only cpu and cuda are supported")
    return dev


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group ``torchrun`` describes in the environment (if any) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30), **kwargs)
    if dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def shutdown_distributed(synchronize: bool = False) -> None:
    """Leave the process group. ``synchronize`` (only where every rank ended normally: a rank that failed would
    leave the others waiting): first wait for all ranks, so that the backend's worker thread has finished with
    every collective before the group goes. Gloo's group joins that thread in its destructor, which can run while
    holding the GIL (when DDP's reducer drops the last reference), while the thread may still be freeing the last
    all-reduce's tensors, which needs the GIL: a deadlock (seen once in the two-process test, torch 2.13)."""
    if dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def sync_context(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """``model.no_sync()`` on accumulation micro-steps that must not all-reduce gradients yet."""
    if not sync and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
