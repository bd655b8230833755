"""Input checks shared by the layers: clear errors naming the argument, never a crash deep inside."""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor

from .fiber import Fiber, degree_to_dim


def check_features(features: Mapping[int, Tensor], fiber: Fiber, num_rows: Optional[int], name: str) -> None:
    """``features`` must hold every degree of ``fiber`` as ``[num_rows, C_d, 2d+1]`` floating tensors."""
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
            raise ValueError(f"{name}[{degree}] must have shape [{expected[0]}, {channels}, {expected[2]}] "
                             f"(rows, channels, 2d+1) for fiber {fiber}, got {list(t.shape)}")


def check_edge_index(edge_index: Tensor, num_nodes: int) -> None:
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"edge_index must be a Tensor, got {type(edge_index).__name__}")
    if edge_index.dtype != torch.long:
        raise TypeError(f"edge_index must be int64, got {edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape [2, E] (src, dst), got {list(edge_index.shape)}")
    if edge_index.numel() and not torch.compiler.is_compiling():
        lo, hi = int(edge_index.min()), int(edge_index.max())
        if lo < 0 or hi >= num_nodes:
            raise ValueError(f"edge_index values must lie in [0, {num_nodes}) for {num_nodes} nodes, "
                             f"got range [{lo}, {hi}]")


def check_pos(pos: Tensor) -> None:
    if not isinstance(pos, Tensor):
        raise TypeError(f"pos must be a Tensor, got {type(pos).__name__}")
    if not pos.is_floating_point():
        raise TypeError(f"pos must be floating point, got {pos.dtype}")
    if pos.dim() != 2 or pos.shape[1] != 3:
        raise ValueError(f"pos must have shape [N, 3], got {list(pos.shape)}")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(pos).all()):
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
        num_graphs = int(graph_index.max()) + 1
    if not torch.compiler.is_compiling() and num_nodes:
        lo, hi = int(graph_index.min()), int(graph_index.max())
        if lo < 0 or hi >= num_graphs:
            raise ValueError(f"graph_index values must lie in [0, {num_graphs}), got range [{lo}, {hi}]")
    return num_graphs
