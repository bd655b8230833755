"""Input checks shared by the layers: clear errors naming the argument, never a crash deep inside.

Checks of values (ranges, NaN) need the values on the host: a synchronisation, which CUDA graph capture forbids.
While :func:`deferred_checks` records (``se3t.cuda_graphs`` captures under it), such a check becomes a device flag
and its message, verified after each replay; under ``torch.compile``, or a capture nobody records, it is skipped.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from .fiber import Fiber, degree_to_dim

_recording = threading.local()


@contextlib.contextmanager
def deferred_checks() -> Iterator[List[Tuple[Tensor, str]]]:
    """Record the value checks of the code run inside as ``(ok, message)`` (``ok`` a 0-dim bool tensor, computed
    on the device without a host synchronisation) instead of making them; yields the list they go to."""
    previous = getattr(_recording, "checks", None)
    _recording.checks = checks = []
    try:
        yield checks
    finally:
        _recording.checks = previous


def value_check_mode(t: Tensor) -> str:
    """How a value check of ``t`` runs now: ``"now"`` (host sync), ``"defer"`` (:func:`deferred_checks` records)
    or ``"skip"`` (tracing under ``torch.compile``, or a CUDA graph capture without a recorder)."""
    if getattr(_recording, "checks", None) is not None:
        return "defer"
    if torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing()):
        return "skip"
    return "now"


def defer_check(ok: Tensor, message: str) -> None:
    """Record a device-side check (:func:`deferred_checks`): ``ok`` must hold after the recorded work ran."""
    _recording.checks.append((ok.reshape(()).to(torch.bool), message))


def check_index_range(index: Tensor, upper: int, what: str, detail: str = "") -> None:
    """``0 <= index < upper`` for every entry, made now (a host sync), recorded, or skipped as
    :func:`value_check_mode` says; the error names ``what`` (and ``detail``) and the range found."""
    if not index.numel():
        return
    mode = value_check_mode(index)
    message = f"{what} values must lie in [0, {upper}){detail}"
    if mode == "defer":
        defer_check((index.min() >= 0) & (index.max() < upper), message)
    elif mode == "now":
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= upper:
            raise ValueError(f"{message}, got range [{lo}, {hi}]")


def raise_failed_checks(checks: List[Tuple[Tensor, str]], flags: Tensor) -> None:
    """Raise ``ValueError`` with the message of the first recorded check whose flag in ``flags [n]`` is False."""
    failed = [message for (_, message), ok in zip(checks, flags.tolist()) if not ok]
    if failed:
        raise ValueError(failed[0] + (f" (and {len(failed) - 1} more failed checks)" if len(failed) > 1 else ""))


def check_features(features: Mapping[int, Tensor], fiber: Fiber, num_rows: Optional[int], name: str,
                   rows_of: str = "") -> None:
    """``features`` must hold every degree of ``fiber`` as ``[num_rows, C_d, 2d+1]`` floating tensors; ``rows_of``
    says where ``num_rows`` comes from (the error quotes it)."""
    if not isinstance(features, Mapping):
        raise TypeError(f"{name} must be a dict {{degree: Tensor}}, got {type(features).__name__}")
    for degree, channels in fiber:
        if degree not in features:
            if str(degree) in features:
                raise TypeError(f"{name} uses string degree keys ('{degree}'); se3t uses int keys ({degree})")
            raise ValueError(f"{name} is missing degree {degree} (expected fiber {fiber})")
        t = features[degree]
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{degree}] must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}[{degree}] must be floating point, got {t.dtype}")
        expected = (num_rows if num_rows is not None else t.shape[0], channels, degree_to_dim(degree))
        if t.dim() != 3 or tuple(t.shape) != expected:
            rows = f"; {num_rows} rows: {rows_of}" if rows_of and num_rows is not None else ""
            raise ValueError(f"{name}[{degree}] must have shape [{expected[0]}, {channels}, {expected[2]}] "
                             f"(rows, channels, 2d+1) for fiber {fiber}{rows}, got {list(t.shape)}")


def check_input_dtypes(param_dtype: torch.dtype, inputs: Mapping[str, Tensor]) -> None:
    """Floating ``inputs`` (name -> tensor) must be in the model's parameter dtype; outside autocast (which casts
    them itself) a mix otherwise fails deep inside a matmul, or works for some combinations only."""
    for name, t in inputs.items():
        if t.dtype != param_dtype and not torch.is_autocast_enabled(t.device.type):
            raise TypeError(f"{name} is {t.dtype} but the model's parameters are {param_dtype}: convert the inputs "
                            f"(.to({param_dtype})) or the model (model.to({t.dtype}))")


def check_edge_index(edge_index: Tensor, num_nodes: int) -> None:
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"edge_index must be a Tensor, got {type(edge_index).__name__}")
    if edge_index.dtype != torch.long:
        raise TypeError(f"edge_index must be int64, got {edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape [2, E] (src, dst), got {list(edge_index.shape)}")
    check_index_range(edge_index, num_nodes, "edge_index", f" for {num_nodes} nodes")


def check_pos(pos: Tensor) -> None:
    if not isinstance(pos, Tensor):
        raise TypeError(f"pos must be a Tensor, got {type(pos).__name__}")
    if not pos.is_floating_point():
        raise TypeError(f"pos must be floating point, got {pos.dtype}")
    if pos.dim() != 2 or pos.shape[1] != 3:
        raise ValueError(f"pos must have shape [N, 3], got {list(pos.shape)}")
    mode = value_check_mode(pos)
    if mode == "defer":
        defer_check(torch.isfinite(pos).all(), "pos contains NaN or infinite coordinates")
    elif mode == "now" and not bool(torch.isfinite(pos).all()):
        raise ValueError("pos contains NaN or infinite coordinates")


def check_graph_index(graph_index: Tensor, num_nodes: int, num_graphs: Optional[int]) -> int:
    """Validate ``graph_index [N]`` and return the number of graphs."""
    if not isinstance(graph_index, Tensor) or graph_index.dtype != torch.long:
        raise TypeError(f"graph_index must be an int64 tensor, got {getattr(graph_index, 'dtype', type(graph_index))}")
    if graph_index.dim() != 1 or graph_index.shape[0] != num_nodes:
        raise ValueError(f"graph_index must have shape [{num_nodes}] (one graph per node), got {list(graph_index.shape)}")
    if num_graphs is None:
        if num_nodes == 0:
            raise ValueError("cannot infer num_graphs from an empty graph_index; pass num_graphs")
        mode = value_check_mode(graph_index)
        if mode == "defer" or (mode == "skip" and not torch.compiler.is_compiling()):
            raise ValueError("pass num_graphs: it cannot be read from graph_index under CUDA graph capture (a host "
                             "synchronisation)")
        num_graphs = int(graph_index.max()) + 1
    check_index_range(graph_index, num_graphs, "graph_index")
    return num_graphs
