"""What the suites share: the result document, the grid of cells, running them, writing the outputs."""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from .machine import device_tag, gemm_rate, machine_info, precision_supported, versions
from .runner import run_cell

__all__ = ["SCHEMA", "new_result", "Cell", "run_cells", "write_outputs", "fuse_levels", "scatter_backends",
           "default_fuse_level", "log"]

SCHEMA = "se3t-benchmarks/1"

#: every cell records these keys (values may be None where they do not apply).
CELL_KEYS = ("suite", "model", "mode", "fuse_level", "precision", "low_memory", "batch_size", "scatter_backend",
             "status", "reason")


def log(msg: str) -> None:
    print(f"[{_dt.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def fuse_levels() -> List[str]:
    """Every member of :class:`se3t.FuseLevel`, however many the library has."""
    from se3t import FuseLevel

    return [m.name for m in FuseLevel]


def default_fuse_level() -> str:
    """The level ``SE3TransformerPooled`` uses when none is given."""
    import inspect

    from se3t import FuseLevel, SE3TransformerPooled

    default = inspect.signature(SE3TransformerPooled.__init__).parameters["fuse_level"].default
    return FuseLevel.coerce(default).name


def scatter_backends() -> Dict[str, Optional[str]]:
    """Backend -> None if usable here, else why not."""
    from se3t import scatter

    return {b: (None if b == "torch" or scatter.WITH_TORCH_SCATTER else "torch-scatter is not installed")
            for b in scatter.BACKENDS}


def new_result(suite: str, args, device: torch.device, threads: int, settings: dict) -> dict:
    return {
        "schema": SCHEMA,
        "suite": suite,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(getattr(args, "argv", None) or ["python -m benchmarks"] + sys.argv[1:]),
        "machine": machine_info(device, threads),
        "versions": versions(),
        "settings": settings,
        "gemm": {},
        "cells": [],
        "notes": [],
    }


def measure_gemm(result: dict, precisions: Iterable[str], device: torch.device, n: int = 2048) -> None:
    """The machine's dense GEMM rate per precision, measured now in this process (same threads as the cells)."""
    for p in precisions:
        if precision_supported(p, device) is None and p not in result["gemm"]:
            result["gemm"][p] = gemm_rate(p, device, n=n)
            log(f"GEMM {p}: {result['gemm'][p]['flops_per_s'] / 1e9:.1f} GFLOP/s (n={result['gemm'][p]['n']})")


class Cell(dict):
    """One grid point: its key fields plus ``func``/``kwargs`` to measure it, or a status saying why it is not run."""


def grid(**axes: Sequence) -> List[dict]:
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]


def run_cells(result: dict, cells: List[Cell], *, isolate: bool, threads: int, timeout: Optional[float],
              mem_limit: Optional[int] = None, post: Optional[Callable[[dict], None]] = None,
              checkpoint: Optional[Path] = None) -> None:
    """Run every cell (in order), appending its record to ``result["cells"]``; save after each when asked."""
    total = len(cells)
    for n, cell in enumerate(cells, 1):
        record = {k: cell.get(k) for k in CELL_KEYS}
        record.update({k: v for k, v in cell.items() if k not in ("func", "kwargs") and k not in CELL_KEYS})
        label = " ".join(f"{k}={cell.get(k)}" for k in ("mode", "fuse_level", "precision", "low_memory",
                                                           "compile", "cuda_graphs", "batch_size", "scatter_backend",
                                                           "label")
                         if cell.get(k) is not None)
        if cell.get("status") in (None, "ok"):
            t0 = time.perf_counter()
            out = run_cell(cell["func"], cell["kwargs"], isolate=isolate, threads=threads, timeout=timeout,
                           mem_limit=mem_limit)
            record.update(out)
            record["status"] = out.get("status", "ok")
            if post is not None and record["status"] == "ok":
                post(record)
            tp = record.get("throughput", {})
            shown = f"{tp['value']:.4g} {tp['unit']}" if record["status"] == "ok" else record.get("reason", "")[:200]
            log(f"[{n}/{total}] {label}: {record['status']} {shown} ({time.perf_counter() - t0:.0f} s)")
        else:
            log(f"[{n}/{total}] {label}: {record['status']} ({record.get('reason')})")
        result["cells"].append(record)
        if checkpoint is not None:
            _dump(result, checkpoint)


def _dump(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=_jsonable)
        f.write("\n")
    os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, (set, tuple)):
        return list(x)
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def output_stem(args, suite: str, device: torch.device, threads: int) -> str:
    if args.name:
        return args.name if suite in args.name or args.suite != "all" else f"{args.name}-{suite}"
    return f"{device_tag(device, threads)}-{suite}" + ("-quick" if args.quick else "")


def write_outputs(result: dict, out_dir: Path, stem: str, plots: bool = True) -> Dict[str, Path]:
    """``<stem>.json``, ``<stem>.md`` and the PNG plots of the suite; returns the paths written."""
    from . import report

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    result["outputs"] = {"stem": stem}
    if plots:
        for name, path in report.plot(result, out_dir, stem).items():
            paths[name] = path
        result["outputs"]["plots"] = sorted(p.name for k, p in paths.items() if k not in ("json", "md"))
    _dump(result, paths["json"])
    paths["md"].write_text(report.markdown(result))
    return paths
