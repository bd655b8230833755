"""Neighbour graphs for users' own point clouds, in pure PyTorch with memory linear in the number of points.

``radius_graph`` bins points into cells of side ``r`` (cell lists): only the 27 neighbouring cells are searched,
and query points are processed in chunks, so neither time nor memory is quadratic for bounded densities.
``knn_graph`` computes distances chunk by chunk (``[chunk, N]`` at a time, never ``[N, N]``).
Both return ``edge_index [2, E]`` = (src, dst) with messages flowing from a neighbour to the centre, no self
loops, sorted by destination, and never connect points of different graphs (``graph_index``).

``destination_blocks`` splits any graph's nodes into blocks with their incoming edges (the model's
``low_memory`` mode recomputes each layer block by block).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["radius_graph", "knn_graph", "DestinationBlock", "destination_blocks"]


def _check(pos: Tensor, graph_index: Optional[Tensor]) -> Tensor:
    if not isinstance(pos, Tensor) or pos.dim() != 2 or pos.shape[1] != 3:
        raise ValueError(f"pos must be a [N, 3] tensor, got {getattr(pos, 'shape', type(pos))}")
    if not pos.is_floating_point():
        raise TypeError(f"pos must be floating point, got {pos.dtype}")
    if not bool(torch.isfinite(pos).all()):
        raise ValueError("pos contains NaN or infinite coordinates")
    if graph_index is None:
        return torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
    if graph_index.dtype != torch.long or graph_index.shape != (pos.shape[0],):
        raise ValueError(f"graph_index must be int64 of shape [{pos.shape[0]}], got {graph_index.dtype} "
                         f"{list(graph_index.shape)}")
    return graph_index


def _sort_by_dst(src: Tensor, dst: Tensor, num_nodes: int) -> Tensor:
    order = torch.argsort(dst * max(num_nodes, 1) + src)
    return torch.stack([src[order], dst[order]])


def _keep_nearest(src: Tensor, dst: Tensor, dist: Tensor, k: int, num_nodes: int):
    """Keep at most ``k`` incoming edges per destination, the nearest ones."""
    order = torch.argsort(dist, stable=True)
    order = order[torch.argsort(dst[order], stable=True)]
    src, dst = src[order], dst[order]
    counts = torch.bincount(dst, minlength=num_nodes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(dst.numel(), device=dst.device) - starts[dst]
    keep = rank < k
    return src[keep], dst[keep]


def radius_graph(pos: Tensor, r: float, graph_index: Optional[Tensor] = None,
                 max_num_neighbors: Optional[int] = None, chunk_size: int = 4096) -> Tensor:
    """All pairs closer than ``r`` (strictly) within each graph; ``[2, E]`` int64 (src, dst).

    ``max_num_neighbors`` keeps only the nearest neighbours of each point.
    """
    graph_index = _check(pos, graph_index)
    if not r > 0:
        raise ValueError(f"radius r must be positive, got {r}")
    N = pos.shape[0]
    device = pos.device
    if N == 0:
        return torch.zeros(2, 0, dtype=torch.long, device=device)
    p = pos.detach().to(torch.float64)
    cell = torch.floor((p - p.min(0).values) / r).long()  # [N, 3], >= 0
    dims = cell.max(0).values + 3  # room for the -1 / +1 neighbours
    cell = cell + 1

    def key_of(c: Tensor, g: Tensor) -> Tensor:
        return ((g * dims[0] + c[:, 0]) * dims[1] + c[:, 1]) * dims[2] + c[:, 2]

    keys = key_of(cell, graph_index)
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    uniq, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    offsets = torch.stack(torch.meshgrid(*[torch.arange(-1, 2, device=device)] * 3, indexing="ij"), -1).view(-1, 3)

    r2 = float(r) ** 2
    srcs, dsts, dists = [], [], []
    for lo in range(0, N, chunk_size):
        q = torch.arange(lo, min(lo + chunk_size, N), device=device)
        for off in offsets:
            nkey = key_of(cell[q] + off, graph_index[q])
            slot = torch.searchsorted(uniq, nkey).clamp_max(uniq.numel() - 1)
            hit = uniq[slot] == nkey
            qq, slot = q[hit], slot[hit]
            n = counts[slot]
            centre = torch.repeat_interleave(qq, n)
            first = torch.repeat_interleave(starts[slot], n)
            within = torch.arange(int(n.sum()), device=device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
            neighbour = order[first + within]
            d2 = (p[neighbour] - p[centre]).pow(2).sum(-1)
            ok = (d2 < r2) & (neighbour != centre)
            srcs.append(neighbour[ok])
            dsts.append(centre[ok])
            dists.append(d2[ok])
    src, dst, dist = torch.cat(srcs), torch.cat(dsts), torch.cat(dists)
    if max_num_neighbors is not None:
        if max_num_neighbors < 1:
            raise ValueError(f"max_num_neighbors must be >= 1, got {max_num_neighbors}")
        src, dst = _keep_nearest(src, dst, dist, max_num_neighbors, N)
    return _sort_by_dst(src, dst, N)


def knn_graph(pos: Tensor, k: int, graph_index: Optional[Tensor] = None, chunk_size: int = 1024) -> Tensor:
    """The ``k`` nearest other points of each point within its graph (fewer if the graph is smaller).

    Returns ``[2, E]`` int64 (src = neighbour, dst = centre). Memory ``O(chunk_size * N)``.
    """
    graph_index = _check(pos, graph_index)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    N = pos.shape[0]
    device = pos.device
    if N == 0:
        return torch.zeros(2, 0, dtype=torch.long, device=device)
    p = pos.detach()
    kk = min(k, N - 1)
    if kk == 0:
        return torch.zeros(2, 0, dtype=torch.long, device=device)
    srcs, dsts = [], []
    for lo in range(0, N, chunk_size):
        q = torch.arange(lo, min(lo + chunk_size, N), device=device)
        d2 = torch.cdist(p[q], p).pow(2)  # [chunk, N]
        d2[graph_index[q][:, None] != graph_index[None, :]] = float("inf")
        d2[torch.arange(q.numel(), device=device), q] = float("inf")
        val, idx = torch.topk(d2, kk, dim=1, largest=False)
        ok = torch.isfinite(val)
        srcs.append(idx[ok])
        dsts.append(q[:, None].expand_as(idx)[ok])
    return _sort_by_dst(torch.cat(srcs), torch.cat(dsts), N)


class DestinationBlock(NamedTuple):
    """Destination nodes ``start:stop`` and the ids of all their incoming edges, ``edges [E_b]`` (int64, ordered by
    destination, in their original order within one destination)."""

    start: int
    stop: int
    edges: Tensor


def destination_blocks(edge_index: Tensor, num_nodes: int, num_blocks: int) -> List[DestinationBlock]:
    """Split nodes ``0..num_nodes-1`` into at most ``num_blocks`` contiguous ranges with about equal numbers of
    incoming edges, each range with at least one edge (fewer ranges when there are fewer edges, or when one node
    has most of them). The ranges cover every node and every edge is in exactly one block, so any computation
    whose result at a node depends only on that node's incoming edges (attention, pooled convolution, per-node
    norms) can run block by block. A graph without edges is one block without edges.

    ``edge_index [2, E]`` (src, dst), any edge order. One host synchronisation (the block bounds).
    """
    if not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
    dst = edge_index[1]
    E = dst.shape[0]
    order = torch.argsort(dst, stable=True)
    if E == 0 or num_blocks == 1:
        return [DestinationBlock(0, num_nodes, order)]
    ends = torch.bincount(dst, minlength=num_nodes).cumsum(0)  # ends[n]: edges into nodes 0..n
    targets = sorted({-(-E * i // num_blocks) for i in range(1, num_blocks)} - {E})  # ceil(E i / k) < E
    # a block ends after the first node at which the edges so far reach a target
    stops = (torch.searchsorted(ends, torch.tensor(targets, device=ends.device)) + 1).tolist()
    ends_at = ends.tolist()
    bounds = [0]
    for stop in stops + [num_nodes]:
        if stop > bounds[-1]:
            bounds.append(stop)
    if ends_at[bounds[-2] - 1] == E and len(bounds) > 2:  # trailing nodes without edges join the block before
        del bounds[-2]
    blocks = []
    for start, stop in zip(bounds, bounds[1:]):
        first = ends_at[start - 1] if start > 0 else 0
        blocks.append(DestinationBlock(start, stop, order[first:ends_at[stop - 1]]))
    return blocks
