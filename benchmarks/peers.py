"""The ``peers`` suite: lucidrains' ``se3-transformer-pytorch`` (PyPI) against se3t at comparable settings.

Both models get the same molecules (real QM9 when available, else synthetic), the same hidden fiber (degrees
0..3, 32 channels), 8 heads with value/key channels halved (lucidrains: ``dim_head=2``, 8 heads = 16 channels),
the same depth, bond types as edge information (se3t: 4 edge scalars; lucidrains: 5 edge tokens embedded to 4),
attention restricted to bonded neighbours (lucidrains: ``attend_sparse_neighbors``), and a degree-0 readout
pooled per molecule followed by a linear head. lucidrains works on dense ``[B, n_max, ...]`` batches with a mask
and an adjacency matrix, converted from the same padded batches.

Install the peer without replacing torch: ``pip install se3-transformer-pytorch torch==<your torch>``. When it is
not installed or fails, its cells are recorded as unsupported/error with the reason. Cells that run out of memory
(address-space limit ``--mem-limit-gb``) or time (``--cell-timeout``) are recorded as such.
"""
from __future__ import annotations

import importlib.util
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from .machine import precision_context, sync
from .runner import PeakMemory, latency_stats, time_steps
from .suite import Cell, default_fuse_level

__all__ = ["peer_config", "se3t_config", "build_cells", "lucidrains_cell", "to_dense"]

HIDDEN_CHANNELS, NUM_DEGREES, HEADS = 32, 4, 8


def se3t_config(depth: int) -> dict:
    return dict(fiber_in={0: 6}, fiber_out={0: HIDDEN_CHANNELS}, fiber_edge={0: 4}, num_degrees=NUM_DEGREES,
                num_channels=HIDDEN_CHANNELS, num_layers=depth, num_heads=HEADS, channels_div=2)


def peer_config(depth: int, max_neighbours: int) -> dict:
    return dict(dim=HIDDEN_CHANNELS, dim_in=6, heads=HEADS, dim_head=HIDDEN_CHANNELS // 2 // HEADS, depth=depth,
                num_degrees=NUM_DEGREES, input_degrees=1, output_degrees=1, reduce_dim_out=False,
                attend_sparse_neighbors=True, num_neighbors=0, max_sparse_neighbors=max_neighbours,
                num_edge_tokens=5, edge_dim=4)


def to_dense(batch: dict) -> dict:
    """A padded batch dict as lucidrains' dense inputs ``feats [B, n, 6]``, ``coors``, ``mask``, ``adj_mat``,
    ``edges`` (bond-type tokens, 0 = none) and targets ``y [B]``."""
    g = int(batch["num_real_graphs"])
    n_real = int(batch["num_real_nodes"])
    gi = batch["graph_index"][:n_real]
    counts = torch.bincount(gi, minlength=g)
    n_max = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(n_real) - starts[gi]
    feats = torch.zeros(g, n_max, batch["node_feats"].shape[1])
    coors = torch.zeros(g, n_max, 3)
    mask = torch.zeros(g, n_max, dtype=torch.bool)
    feats[gi, slot] = batch["node_feats"][:n_real]
    coors[gi, slot] = batch["pos"][:n_real]
    mask[gi, slot] = True
    e_real = int(batch["num_real_edges"])
    src, dst = batch["edge_index"][:, :e_real]
    adj = torch.zeros(g, n_max, n_max, dtype=torch.bool)
    edges = torch.zeros(g, n_max, n_max, dtype=torch.long)
    adj[gi[dst], slot[dst], slot[src]] = True
    ef = batch["edge_feats"][:e_real]
    edges[gi[dst], slot[dst], slot[src]] = torch.where(ef.sum(1) > 0, ef.argmax(1) + 1, torch.zeros_like(ef[:, 0],
                                                                                                      dtype=torch.long))
    return {"feats": feats, "coors": coors, "mask": mask, "adj_mat": adj, "edges": edges,
            "y": batch["y"][:g].float(), "num_real_graphs": g, "max_neighbours": int(adj.sum(-1).max())}


class _PeerModel(torch.nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        from se3_transformer_pytorch import SE3Transformer  # noqa: PLC0415  (optional peer)

        self.net = SE3Transformer(**config)
        self.head = torch.nn.Sequential(torch.nn.Linear(config["dim"], config["dim"]), torch.nn.ReLU(),
                                        torch.nn.Linear(config["dim"], 1))

    def forward(self, feats, coors, mask, adj_mat, edges):
        h = self.net(feats, coors, mask, adj_mat=adj_mat, edges=edges, return_type=0)  # [B, n, dim]
        m = mask[..., None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1)
        return self.head(pooled).squeeze(-1)


def lucidrains_cell(*, batches: List[dict], depth: int, mode: str, precision: str, device: str, warmup: int,
                    repeats: int, max_seconds: Optional[float] = None, seed: int = 0) -> Dict:
    dev = torch.device(device)
    dense = [to_dense(b) for b in batches]
    max_nb = max(d["max_neighbours"] for d in dense)
    torch.manual_seed(seed)
    model = _PeerModel(peer_config(depth, max_nb)).to(dev)
    result: Dict = {"num_parameters": sum(p.numel() for p in model.parameters()), "peer_config": peer_config(depth,
                                                                                                              max_nb)}
    inputs = [{k: d[k].to(dev) for k in ("feats", "coors", "mask", "adj_mat", "edges")} for d in dense]
    ys = [d["y"].to(dev) for d in dense]
    if mode == "train":
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)

        def step(i: int) -> None:
            opt.zero_grad(set_to_none=True)
            with precision_context(precision, dev):
                pred = model(**inputs[i])
            F.l1_loss(pred.float(), ys[i]).backward()
            opt.step()
    else:
        model.eval()

        def step(i: int) -> None:
            with torch.inference_mode(), precision_context(precision, dev):
                model(**inputs[i])

    memory = PeakMemory(dev)
    memory.start()
    timing = time_steps(step, len(inputs), warmup=warmup, repeats=repeats, device=dev, max_seconds=max_seconds)
    result["memory"] = memory.stop()
    sync(dev)
    seconds = timing["seconds"]
    items = sum(dense[i]["num_real_graphs"] for i in timing["indices"])
    result["latency_s"] = latency_stats(seconds)
    result["throughput"] = {"value": items / sum(seconds), "unit": "mol/s"}
    result["repeats_run"] = len(seconds)
    result["items_per_step"] = items / len(seconds)
    return result


def build_cells(args, device, data: dict) -> List[Cell]:
    """``data``: batch size -> (batches, equivariance batch, info)."""
    installed = importlib.util.find_spec("se3_transformer_pytorch") is not None
    level = default_fuse_level()
    cells: List[Cell] = []
    for bs in args.batch_sizes:
        batches, _, _ = data[bs]
        for precision in args.precisions:
            for mode in args.modes:
                common = dict(mode=mode, precision=precision, batch_size=bs, scatter_backend=None, low_memory=False,
                              depth=args.peer_depth, suite="peers")
                cells.append(Cell(model="se3t", fuse_level=level, **common, status=None,
                                  func="benchmarks.cells:se3t_cell", kwargs=dict(
                                      kind="pooled", config=se3t_config(args.peer_depth), batches=batches,
                                      eq_batch=None, mode=mode, fuse_level=level, precision=precision,
                                      low_memory=False, scatter_backend="torch", device=str(device),
                                      warmup=args.warmup, repeats=args.repeats, max_seconds=args.max_cell_seconds,
                                      seed=args.seed, item="graphs", measure_gemm=False)))
                peer = Cell(model="lucidrains/se3-transformer-pytorch", fuse_level=None, **common)
                if not installed:
                    peer.update(status="unsupported", reason="se3-transformer-pytorch is not installed "
                                                             "(pip install se3-transformer-pytorch torch==<torch>)")
                else:
                    peer.update(status=None, func="benchmarks.peers:lucidrains_cell", kwargs=dict(
                        batches=batches, depth=args.peer_depth, mode=mode, precision=precision, device=str(device),
                        warmup=args.warmup, repeats=args.repeats, max_seconds=args.max_cell_seconds, seed=args.seed))
                cells.append(peer)
    return cells
