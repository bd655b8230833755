"""The ``scaling`` suite: time and memory against graph size and maximum degree, with fitted growth exponents.

Point clouds of uniform density (random points in a cube, ``se3t.graph.radius_graph`` with a radius giving
``--neighbours`` expected neighbours in the bulk), a small per-node model (``SCALING_CONFIG``). Two sweeps:

* size: ``--sizes`` points (up to at least 10,000) at ``num_degrees = 3``;
* degree: ``num_degrees = 1 .. --max-degree + 1`` at ``--degree-points`` points, for every level of
  ``--levels`` (e.g. ``EDGE_FRAME,FULL``: how each level's cost grows with the degree).

Per sweep and mode the exponent ``b`` of ``y = a x^b`` is fitted by least squares on ``log y`` against ``log x``
(time vs nodes, time vs edges, memory growth vs nodes; time vs ``max_degree + 1``).
"""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from .suite import Cell, default_fuse_level, log

__all__ = ["SCALING_CONFIG", "build_cells", "fit_power_law", "add_fits", "degree_fit_name", "degree_levels"]

#: the small model of the size sweep (num_degrees varies in the degree sweep).
SCALING_CONFIG = dict(num_layers=2, fiber_in={0: 1}, fiber_hidden=None, fiber_out={0: 1}, num_heads=2,
                      channels_div=2)
CHANNELS = 8


def _config(num_degrees: int) -> dict:
    cfg = dict(SCALING_CONFIG)
    cfg["fiber_hidden"] = {d: CHANNELS for d in range(num_degrees)}
    return cfg


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> Optional[dict]:
    """Least squares ``log y = log a + b log x``: exponent ``b``, prefactor ``a``, ``r2``; None with < 2 points."""
    pts = [(float(a), float(b)) for a, b in zip(x, y) if a and b and a > 0 and b > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    b, log_a = np.polyfit(lx, ly, 1)
    pred = log_a + b * lx
    ss_res, ss_tot = float(((ly - pred) ** 2).sum()), float(((ly - ly.mean()) ** 2).sum())
    return {"exponent": float(b), "prefactor": float(math.exp(log_a)), "r2": 1.0 - ss_res / ss_tot if ss_tot else 1.0,
            "points": len(pts)}


def build_cells(args, device) -> List[Cell]:
    from .data import point_cloud

    levels = args.levels or [default_fuse_level()]
    precision = args.precisions[0]
    cells: List[Cell] = []
    sweeps = [("size", n, 3, levels[0]) for n in args.sizes] + [
        ("degree", args.degree_points, k, level) for level in levels for k in range(1, args.max_degree + 2)]
    clouds: Dict[int, dict] = {}
    for sweep, n, num_degrees, level in sweeps:
        if n not in clouds:
            t0 = time.perf_counter()
            clouds[n] = point_cloud(n, neighbours=args.neighbours, seed=args.seed)
            clouds[n]["graph_seconds"] = time.perf_counter() - t0
            log(f"point cloud {n}: {clouds[n]['num_real_edges']} edges, radius_graph "
                f"{clouds[n]['graph_seconds']:.2f} s")
        cloud = clouds[n]
        for mode in args.modes:
            cells.append(Cell(
                suite="scaling", model=f"scaling-c{CHANNELS}-l{num_degrees - 1}", mode=mode, fuse_level=level,
                precision=precision, low_memory=False, batch_size=1, scatter_backend="torch", status=None,
                sweep=sweep, num_points=n, max_degree=num_degrees - 1, num_edges=cloud["num_real_edges"],
                radius=cloud["radius"], radius_graph_s=cloud["graph_seconds"],
                label=f"{sweep} N={n} L={num_degrees - 1} {level}",
                func="benchmarks.cells:se3t_cell",
                kwargs=dict(kind="nodes", config=_config(num_degrees), batches=[cloud],
                            eq_batch=None, mode=mode, fuse_level=level, precision=precision, low_memory=False,
                            scatter_backend="torch", device=str(device), warmup=args.warmup, repeats=args.repeats,
                            max_seconds=args.max_cell_seconds, seed=args.seed, item="nodes", measure_gemm=False)))
    return cells


def degree_fit_name(mode: str, level: str, levels: Sequence[str], minimum: bool = False) -> str:
    """The fit's key of a degree sweep: the first level's is ``"<mode>: time vs (max_degree + 1)"``, the others'
    name their level."""
    who = mode if level == levels[0] else f"{mode} {level}"
    return f"{who}: {'min ' if minimum else ''}time vs (max_degree + 1)"


def degree_levels(result: dict) -> List[str]:
    """The levels of the degree sweep, in the order they were asked for."""
    return list(dict.fromkeys(c["fuse_level"] for c in result["cells"] if c.get("sweep") == "degree"))


def add_fits(result: dict) -> None:
    """Growth exponents per sweep and mode from the measured cells (``result["fits"]``)."""
    fits: Dict[str, dict] = {}
    ok = [c for c in result["cells"] if c["status"] == "ok"]
    for mode in sorted({c["mode"] for c in ok}):
        size = sorted((c for c in ok if c["mode"] == mode and c.get("sweep") == "size"), key=lambda c: c["num_points"])
        fits[f"{mode}: time vs nodes"] = fit_power_law([c["num_points"] for c in size],
                                                       [c["latency_s"]["median"] for c in size])
        fits[f"{mode}: time vs edges"] = fit_power_law([c["num_edges"] for c in size],
                                                       [c["latency_s"]["median"] for c in size])
        fits[f"{mode}: memory growth vs nodes"] = fit_power_law([c["num_points"] for c in size],
                                                                [c["memory"]["growth_bytes"] for c in size])
        # the fastest step is the least disturbed by other processes on a shared machine
        fits[f"{mode}: min time vs nodes"] = fit_power_law([c["num_points"] for c in size],
                                                           [c["latency_s"]["min"] for c in size])
        levels = degree_levels(result)
        for level in levels:
            deg = sorted((c for c in ok if c["mode"] == mode and c.get("sweep") == "degree"
                          and c["fuse_level"] == level), key=lambda c: c["max_degree"])
            for minimum, stat in ((False, "median"), (True, "min")):
                fits[degree_fit_name(mode, level, levels, minimum)] = fit_power_law(
                    [c["max_degree"] + 1 for c in deg], [c["latency_s"][stat] for c in deg])
    graphs = {c["num_points"]: c["radius_graph_s"] for c in result["cells"] if c.get("sweep") == "size"}
    fits["radius_graph: time vs nodes"] = fit_power_law(list(graphs), list(graphs.values()))
    result["fits"] = {k: v for k, v in fits.items() if v is not None}
