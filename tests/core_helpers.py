"""Helpers for the core tests (random features and graphs, fixture location)."""
from __future__ import annotations

import pathlib

import torch

from se3t import Fiber

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


def random_features(fiber: Fiber, rows: int, dtype=torch.float64):
    return {d: torch.randn(rows, c, 2 * d + 1, dtype=dtype) for d, c in fiber}


def random_graph(num_nodes: int = 12, p: float = 0.35, dtype=torch.float64, num_graphs: int = 1):
    """Random directed graphs without self loops; returns (pos, edge_index, graph_index)."""
    sizes = [num_nodes // num_graphs + (i < num_nodes % num_graphs) for i in range(num_graphs)]
    pos = torch.randn(num_nodes, 3, dtype=dtype) * 1.5
    edges, graph_index, start = [], [], 0
    for g, n in enumerate(sizes):
        adj = (torch.rand(n, n) < p) & ~torch.eye(n, dtype=torch.bool)
        src, dst = adj.nonzero(as_tuple=True)
        edges.append(torch.stack([src, dst]) + start)
        graph_index += [g] * n
        start += n
    return pos, torch.cat(edges, dim=1), torch.tensor(graph_index)


#: The fused kernel's orders and layouts: "outer" for every one-row block (``se3t.nn.fused.ONE_ROW_OUTER``; the
#: default threshold applies it only to wide blocks, which small test layers do not have), "R" for none, both with
#: the weights copied into their GEMM layouts whatever the number of edges; "rows": every block in the R order
#: reading its weights' rows transposed, as calls on few edges do (``LAYOUT_COPY_MIN_EDGES``; test graphs are
#: small, so without these settings they would run that way only).
KERNEL_ORDERS = ["outer", "R", "rows"]


def set_kernel_order(monkeypatch, order: str) -> None:
    from se3t.nn import fused
    monkeypatch.setattr(fused, "ONE_ROW_OUTER", order == "outer")
    monkeypatch.setattr(fused, "ONE_ROW_OUTER_MIN_RATIO", 0)
    monkeypatch.setattr(fused, "LAYOUT_COPY_MIN_EDGES", 1 << 62 if order == "rows" else 0)
