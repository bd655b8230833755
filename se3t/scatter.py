"""Aggregation over graph segments: sum / mean / max and the edge softmax.

One module, two backends: ``"torch"`` (pure PyTorch, ``index_add_`` / ``scatter_reduce``; always available,
the default) and ``"torch_scatter"`` (the optional compiled package, used only when installed). The backend is
chosen globally with :func:`set_backend` or per call with ``backend=``. Under ``torch.compile`` the torch
backend is always used (the compiled package is opaque to the compiler).
"""
from __future__ import annotations

import contextlib
import importlib.util
from typing import Iterator, Optional

import torch
from torch import Tensor

from ._validate import check_index_range

__all__ = [
    "WITH_TORCH_SCATTER",
    "BACKENDS",
    "set_backend",
    "get_backend",
    "use_backend",
    "scatter",
    "scatter_sum",
    "scatter_mean",
    "scatter_max",
    "edge_softmax",
]

WITH_TORCH_SCATTER = importlib.util.find_spec("torch_scatter") is not None
BACKENDS = ("torch", "torch_scatter")
_backend = "torch"
_torch_scatter = None


def _load_torch_scatter():
    global _torch_scatter
    if _torch_scatter is None:
        import torch_scatter  # noqa: PLC0415  (optional accelerator, imported on first use)

        _torch_scatter = torch_scatter
    return _torch_scatter


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown scatter backend {name!r}; choose one of {BACKENDS}")
    if name == "torch_scatter" and not WITH_TORCH_SCATTER:
        raise ValueError("scatter backend 'torch_scatter' requested but the torch-scatter package is not installed "
                         "(pip install --no-build-isolation torch-scatter)")
    return name


def set_backend(name: str) -> None:
    """Select the default backend for every later call: ``"torch"`` or ``"torch_scatter"``."""
    global _backend
    _backend = _check_backend(name)


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily select a backend: ``with use_backend("torch_scatter"): ...``."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _resolve(backend: Optional[str]) -> str:
    name = _backend if backend is None else _check_backend(backend)
    if name != "torch" and torch.compiler.is_compiling():
        return "torch"
    return name


def _validate(src: Tensor, index: Tensor, dim_size: int, check_range: bool) -> None:
    if not isinstance(index, Tensor) or index.dtype != torch.long:
        raise TypeError(f"index must be an int64 tensor, got {getattr(index, 'dtype', type(index))}")
    if index.dim() != 1:
        raise ValueError(f"index must be 1-D, got shape {list(index.shape)}")
    if src.shape[0] != index.shape[0]:
        raise ValueError(f"index has {index.shape[0]} entries but src has {src.shape[0]} rows")
    if not isinstance(dim_size, int) or dim_size < 0:
        raise ValueError(f"dim_size must be a non-negative int, got {dim_size!r}")
    if check_range:
        check_index_range(index, dim_size, "index")


class _IndexAddSum(torch.autograd.Function):
    """``zeros[dim_size, *].index_add_(0, index, src)`` keeping only ``index`` for backward (the gradient is
    ``grad[index]``). Autograd's own index_add keeps ``src`` as well: an edge-sized tensor per sum, e.g. every
    attention layer's weighted values. The backward is itself differentiable (double backward for forces)."""

    @staticmethod
    def forward(ctx, src: Tensor, index: Tensor, dim_size: int) -> Tensor:
        ctx.save_for_backward(index)
        return src.new_zeros((dim_size,) + tuple(src.shape[1:])).index_add_(0, index, src)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


def scatter(src: Tensor, index: Tensor, dim_size: int, reduce: str = "sum", *,
            backend: Optional[str] = None, check: bool = True) -> Tensor:
    """Reduce the rows of ``src [M, *]`` into ``[dim_size, *]`` by ``index [M]``.

    ``reduce`` is ``"sum"``, ``"mean"`` or ``"max"``; empty segments give 0. ``check=False`` skips the
    (host-synchronising) range check for callers that validated ``index`` already.
    """
    if reduce not in ("sum", "mean", "max"):
        raise ValueError(f"reduce must be 'sum', 'mean' or 'max', got {reduce!r}")
    _validate(src, index, dim_size, check)
    name = _resolve(backend)
    if name == "torch_scatter":
        ts = _load_torch_scatter()
        if reduce == "max":
            return ts.scatter_max(src, index, dim=0, dim_size=dim_size)[0]
        return ts.scatter(src, index, dim=0, dim_size=dim_size, reduce=reduce)
    out_shape = (dim_size,) + tuple(src.shape[1:])
    if reduce == "max":
        idx = index.view(-1, *([1] * (src.dim() - 1))).expand_as(src)
        out = src.new_zeros(out_shape)
        return out.scatter_reduce(0, idx, src, reduce="amax", include_self=False)
    out = _IndexAddSum.apply(src, index, dim_size)
    if reduce == "mean":
        count = torch.zeros(dim_size, dtype=src.dtype, device=src.device)
        count.index_add_(0, index, torch.ones_like(index, dtype=src.dtype))
        out = out / count.clamp_min(1).view(-1, *([1] * (src.dim() - 1)))
    return out


def scatter_sum(src: Tensor, index: Tensor, dim_size: int, **kwargs) -> Tensor:
    return scatter(src, index, dim_size, "sum", **kwargs)


def scatter_mean(src: Tensor, index: Tensor, dim_size: int, **kwargs) -> Tensor:
    return scatter(src, index, dim_size, "mean", **kwargs)


def scatter_max(src: Tensor, index: Tensor, dim_size: int, **kwargs) -> Tensor:
    return scatter(src, index, dim_size, "max", **kwargs)


def edge_softmax(logits: Tensor, dst: Tensor, num_nodes: int, *, backend: Optional[str] = None,
                 check: bool = True) -> Tensor:
    """Softmax of ``logits [E, *]`` over the incoming edges of each destination node.

    The per-node maximum is subtracted (detached: the softmax does not depend on it) so large logits do not
    overflow; every non-empty segment's sum is therefore >= 1, and nodes without incoming edges simply have
    no entries.
    """
    seg_max = scatter(logits.detach(), dst, num_nodes, "max", backend=backend, check=check)
    exp = (logits - seg_max[dst]).exp()
    denom = scatter(exp, dst, num_nodes, "sum", backend=backend, check=False)
    return exp / denom[dst]
