"""The ``peers`` suite: lucidrains' ``se3-transformer-pytorch`` (PyPI) against se3t at comparable settings.

Both models get the same molecules (real QM9 when available, else synthetic) and the same architecture outline,
``D`` being ``--peer-depth`` (se3t: ``SE3TransformerPooled``; lucidrains: its ``SE3Transformer`` with se3t's head):

- input -> hidden fiber: se3t's first attention block from ``{0: 6}`` / lucidrains' ``conv_in`` from ``{0: 6}``;
- ``D`` attention blocks on the hidden fiber: se3t ``num_layers = D + 1`` (the input block counts) / lucidrains
  ``depth = D``;
- hidden fiber: degrees 0..3 with 32 channels each (``num_degrees=4``, ``num_channels=32`` / ``dim=32``);
- 8 heads with 16 key/value channels per degree, 2 per head: se3t ``num_heads=8, channels_div=2`` (32 / 2) /
  lucidrains ``heads=8, dim_head=2`` (its attention width per degree is ``heads * dim_head``);
- output: a convolution to ``{0: 32}`` (lucidrains ``output_degrees=1``, ``dim_out = dim``);
- neighbourhood and edges: bonded neighbours only (lucidrains ``attend_sparse_neighbors=True, num_neighbors=0``),
  bond types into the radial MLPs next to the distance (se3t: 4 one-hot scalars; lucidrains: 5 bond tokens,
  0 = none, embedded to ``edge_dim=4``);
- readout: max over each molecule's atoms, then ``Linear(32, 32) -> ReLU -> Linear(32, 1)``.

What stays different is each library's own design: lucidrains convolves keys and values separately with one
radial MLP (128 hidden units, LayerNorm) per degree pair, computes attention weights per degree, lets every node
attend to itself, averages the messages of its convolutions, and adds a feed-forward block per layer (hence many
more parameters: both counts are recorded per cell); se3t uses one radial MLP per convolution (``radial="conv"``)
at its default fusion level. lucidrains works on dense ``[B, n_max, ...]`` batches with a mask and an adjacency
matrix, converted (:func:`to_dense`) from the same padded batches se3t gets.

Install the peer without replacing torch: ``pip install se3-transformer-pytorch torch==<your torch>`` (the
``peers`` extra). When it is not installed or fails, its cells are recorded as unsupported/error with the reason.
Cells that run out of memory (address-space limit ``--mem-limit-gb``) or time (``--cell-timeout``) are recorded
as such.
"""
from __future__ import annotations

import importlib.util
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from .cells import train_optimizer
from .machine import precision_context, sync
from .runner import PeakMemory, latency_stats, time_steps
from .suite import Cell, default_fuse_level

__all__ = ["peer_config", "se3t_config", "build_cells", "lucidrains_cell", "to_dense", "PEER_MODEL"]

PEER_MODEL = "lucidrains/se3-transformer-pytorch"
HIDDEN_CHANNELS, NUM_DEGREES, HEADS, CHANNELS_DIV = 32, 4, 8, 2
NODE_FEATURES, BOND_TYPES = 6, 4


def se3t_config(depth: int) -> dict:
    """``SE3TransformerPooled`` arguments: ``depth`` attention blocks on the hidden fiber after the input block."""
    return dict(fiber_in={0: NODE_FEATURES}, fiber_out={0: HIDDEN_CHANNELS}, fiber_edge={0: BOND_TYPES},
                num_degrees=NUM_DEGREES, num_channels=HIDDEN_CHANNELS, num_layers=depth + 1, num_heads=HEADS,
                channels_div=CHANNELS_DIV, pooling="max")


def peer_config(depth: int, max_neighbours: int) -> dict:
    """lucidrains ``SE3Transformer`` arguments (``hidden = heads * dim_head`` channels per degree in attention)."""
    return dict(dim=HIDDEN_CHANNELS, dim_in=NODE_FEATURES, heads=HEADS,
                dim_head=HIDDEN_CHANNELS // CHANNELS_DIV // HEADS, depth=depth, num_degrees=NUM_DEGREES,
                input_degrees=1, output_degrees=1, reduce_dim_out=False, attend_sparse_neighbors=True,
                num_neighbors=0, max_sparse_neighbors=max(int(max_neighbours), 1), num_edge_tokens=BOND_TYPES + 1,
                edge_dim=BOND_TYPES)


def to_dense(batch: dict) -> dict:
    """A padded batch dict (schema in :mod:`benchmarks.cells`: real nodes, edges and graphs first) as lucidrains'
    dense inputs: ``feats [B, n, F]``, ``coors [B, n, 3]``, ``mask [B, n]``, ``adj_mat [B, n, n]`` (``[b, i, j]``:
    ``j -> i`` is an edge), ``edges [B, n, n]`` (bond-type tokens: 1 + the one-hot index, 0 = no bond) and the
    targets ``y [B]``; ``B`` = the real molecules, ``n`` = the largest one's atoms. Padding slots are masked, with
    zero features, no edges and coordinates far from every atom."""
    g = int(batch["num_real_graphs"])
    n_real = int(batch["num_real_nodes"])
    gi = batch["graph_index"][:n_real]
    counts = torch.bincount(gi, minlength=g)
    n_max = int(counts.max()) if n_real else 1
    starts = torch.cumsum(counts, 0) - counts
    order = torch.argsort(gi, stable=True)  # a node's slot: its rank among its molecule's nodes
    slot = torch.empty_like(gi)
    slot[order] = torch.arange(n_real) - starts[gi[order]]
    node_feats = batch["node_feats"][:n_real]
    feats = torch.zeros(g, n_max, node_feats.shape[1], dtype=node_feats.dtype)
    coors = torch.zeros(g, n_max, 3, dtype=batch["pos"].dtype)
    mask = torch.zeros(g, n_max, dtype=torch.bool)
    feats[gi, slot] = node_feats
    coors[gi, slot] = batch["pos"][:n_real]
    mask[gi, slot] = True
    # Padding slots far from every atom, 10 apart: lucidrains ranks bonded neighbours by a distance set to 0, so a
    # padding slot at an atom's position (distance 0 too) could take a bonded neighbour's place and be masked out.
    pad = ~mask
    far = float(batch["pos"][:n_real].abs().max()) * 2 + 100.0 if n_real else 100.0
    coors[pad, 0] = far + 10.0 * torch.arange(n_max, dtype=coors.dtype).expand(g, n_max)[pad]
    e_real = int(batch["num_real_edges"])
    src, dst = batch["edge_index"][:, :e_real]
    if e_real and (gi[src] != gi[dst]).any():
        raise ValueError("to_dense: an edge joins two molecules")
    adj = torch.zeros(g, n_max, n_max, dtype=torch.bool)
    edges = torch.zeros(g, n_max, n_max, dtype=torch.long)
    adj[gi[dst], slot[dst], slot[src]] = True
    ef = batch["edge_feats"][:e_real]
    if ef.shape[1]:
        tokens = torch.where(ef.abs().sum(1) > 0, ef.argmax(1) + 1, torch.zeros(e_real, dtype=torch.long))
        edges[gi[dst], slot[dst], slot[src]] = tokens
    return {"feats": feats, "coors": coors, "mask": mask, "adj_mat": adj, "edges": edges,
            "y": batch["y"][:g].float(), "num_real_graphs": g, "num_real_nodes": n_real, "num_real_edges": e_real,
            "max_neighbours": int(adj.sum(-1).max()) if e_real else 0}


class _PeerModel(torch.nn.Module):
    """lucidrains' ``SE3Transformer`` (degree-0 outputs per atom), max over real atoms, se3t's MLP head."""

    def __init__(self, config: dict):
        super().__init__()
        from se3_transformer_pytorch import SE3Transformer  # noqa: PLC0415  (optional peer)

        self.net = SE3Transformer(**config)
        self.head = torch.nn.Sequential(torch.nn.Linear(config["dim"], config["dim"]), torch.nn.ReLU(),
                                        torch.nn.Linear(config["dim"], 1))

    def forward(self, feats, coors, mask, adj_mat, edges):
        h = self.net(feats, coors, mask, adj_mat=adj_mat, edges=edges, return_type=0)  # [B, n, dim]
        pooled = h.masked_fill(~mask[..., None], float("-inf")).amax(1)
        return self.head(pooled).squeeze(-1)


def lucidrains_cell(*, batches: List[dict], depth: int, mode: str, precision: str, device: str, warmup: int,
                    repeats: int, max_seconds: Optional[float] = None, seed: int = 0) -> Dict:
    """Measure lucidrains' model on ``batches`` (padded batch dicts): ``mode`` ``"train"`` (forward + L1 loss +
    backward + AdamW step) or ``"infer"``, as :func:`benchmarks.cells.se3t_cell` does for se3t."""
    dev = torch.device(device)
    dense = [to_dense(b) for b in batches]
    config = peer_config(depth, max(d["max_neighbours"] for d in dense))
    torch.manual_seed(seed)
    model = _PeerModel(config).to(dev)
    result: Dict = {"num_parameters": sum(p.numel() for p in model.parameters()), "peer_config": config}
    inputs = [{k: d[k].to(dev) for k in ("feats", "coors", "mask", "adj_mat", "edges")} for d in dense]
    ys = [d["y"].to(dev) for d in dense]
    if mode == "train":
        model.train()
        opt = train_optimizer(model)

        def step(i: int) -> None:
            opt.zero_grad(set_to_none=True)
            with precision_context(precision, dev):
                pred = model(**inputs[i])
            F.l1_loss(pred.float(), ys[i]).backward()
            opt.step()
    elif mode == "infer":
        model.eval()

        def step(i: int) -> None:
            with torch.inference_mode(), precision_context(precision, dev):
                model(**inputs[i])
    else:
        raise ValueError(f"unknown mode {mode!r}")

    memory = PeakMemory(dev)
    memory.start()
    timing = time_steps(step, len(inputs), warmup=warmup, repeats=repeats, device=dev, max_seconds=max_seconds)
    result["memory"] = memory.stop()
    sync(dev)
    seconds, used = timing["seconds"], [dense[i] for i in timing["indices"]]
    items = sum(d["num_real_graphs"] for d in used)
    result["latency_s"] = latency_stats(seconds)
    result["throughput"] = {"value": items / sum(seconds), "unit": "mol/s"}
    result["repeats_run"] = len(seconds)
    result["items_per_step"] = items / len(seconds)
    result["nodes_per_step"] = sum(d["num_real_nodes"] for d in used) / len(seconds)
    result["edges_per_step"] = sum(d["num_real_edges"] for d in used) / len(seconds)
    result["dense_shapes"] = sorted({tuple(d["feats"].shape[:2]) + (config["max_sparse_neighbors"],) for d in used})
    return result


def build_cells(args, device, data: dict) -> List[Cell]:
    """``data``: batch size -> (batches, equivariance batch, info). Per batch size, precision and mode: an se3t
    cell, then the peer's (recorded as unsupported when the package is not installed)."""
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
                peer = Cell(model=PEER_MODEL, fuse_level=None, **common)
                if not installed:
                    peer.update(status="unsupported", reason="se3-transformer-pytorch is not installed "
                                                             "(pip install se3-transformer-pytorch torch==<torch>)")
                else:
                    peer.update(status=None, func="benchmarks.peers:lucidrains_cell", kwargs=dict(
                        batches=batches, depth=args.peer_depth, mode=mode, precision=precision, device=str(device),
                        warmup=args.warmup, repeats=args.repeats, max_seconds=args.max_cell_seconds, seed=args.seed))
                cells.append(peer)
    return cells
