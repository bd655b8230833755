"""The ``qm9`` suite: the paper model (SPEC §5) on random real QM9 padded batches.

Grid: mode (train, infer) x fusion level (every ``se3t.FuseLevel``) x precision x low-memory x compile x batch size
x scatter backend. ``low_memory=on`` is measured at the levels of ``--low-memory-levels`` (default: the model's
default level); inference cells with ``low_memory=on`` are recorded as skipped (checkpointing only acts under
autograd, so they would measure the same code as ``off``). ``compile=on`` (``--compile off,on``; default off only)
times ``torch.compile(model, dynamic=False)``: one compilation per distinct padded batch shape, before the timed
steps (see :mod:`benchmarks.cells`). ``--optimizer-in-backward off,on`` (default off only) adds training cells whose
AdamW steps each parameter during backward (``se3t.runtime.StepInBackward``). A cell whose step would exceed
``--max-step-seconds`` at the measured GEMM rate (bf16 on a CPU without native bf16) is skipped; its inference cell
still measures that precision's equivariance error and deviation from fp32 on the small equivariance batch
(``benchmarks.cells.accuracy_cell``).
"""
from __future__ import annotations

from typing import List

from se3t.runtime.heap import glibc_malloc

from .machine import precision_supported
from .suite import Cell, default_fuse_level, fuse_levels, grid, scatter_backends

__all__ = ["PAPER_CONFIG", "TINY_CONFIG", "build_cells", "load_batches"]

#: SE3TransformerPooled arguments of the paper's QM9 model (SPEC §5).
PAPER_CONFIG = dict(fiber_in={0: 6}, fiber_out={0: 128}, fiber_edge={0: 4}, num_degrees=4, num_channels=32,
                    num_layers=7, num_heads=8, channels_div=2)
#: a few-second model for the smoke test and --model tiny.
TINY_CONFIG = dict(fiber_in={0: 6}, fiber_out={0: 8}, fiber_edge={0: 4}, num_degrees=2, num_channels=4,
                   num_layers=1, num_heads=2, channels_div=2)


def load_batches(args, batch_size: int):
    from .data import load_packed_batches, qm9_batches, synthetic_molecule_batches

    if args.data == "saved":
        if args.data_file is None:
            raise SystemExit("--data saved needs --data-file (written by `python -m benchmarks pack-data`)")
        return load_packed_batches(args.data_file, batch_size, args.num_batches)
    if args.data == "qm9":
        try:
            return qm9_batches(batch_size, args.num_batches, seed=args.seed, root=args.data_root)
        except ImportError as err:
            raise SystemExit(f"--data qm9 needs se3t_data and its extras ({err}); or run with --data synthetic")
    return synthetic_molecule_batches(batch_size, args.num_batches, seed=args.seed)


def _estimated_seconds(config: dict, batches: list, mode: str, gemm: dict) -> float:
    """A lower bound on one step's time: its matmul FLOPs at the machine's dense GEMM rate (no model runs faster)."""
    from .cells import build_model
    from .flops import model_flops

    model = build_model("pooled", config, "NONE", False)
    b = batches[0]
    flops = model_flops(model, b["num_real_nodes"], b["num_real_edges"], b["num_real_graphs"],
                        training=mode == "train").total
    return flops / gemm["flops_per_s"]


def build_cells(args, device, data: dict, gemm: dict = None) -> List[Cell]:
    """``data``: batch size -> (batches, equivariance batch, info); ``gemm``: precision -> the run's GEMM rate
    (for ``--max-step-seconds``)."""
    config = TINY_CONFIG if args.model == "tiny" else PAPER_CONFIG
    levels = args.levels or fuse_levels()
    low_levels = fuse_levels() if args.low_memory_levels == ["all"] else (args.low_memory_levels
                                                                             or [default_fuse_level()])
    backends = scatter_backends()
    cells: List[Cell] = []
    for g in grid(batch_size=args.batch_sizes, scatter_backend=args.scatter_backends or list(backends),
                  precision=args.precisions, fuse_level=levels, low_memory=args.low_memory,
                  compile=getattr(args, "compile", None) or [False],
                  cuda_graphs=getattr(args, "cuda_graphs", None) or [False],
                  optimizer_in_backward=getattr(args, "optimizer_in_backward", None) or [False],
                  return_freed_memory=getattr(args, "return_freed_memory", None) or [False], mode=args.modes):
        cell = Cell(suite="qm9", model=args.model, **g)
        why = precision_supported(g["precision"], device) or backends.get(g["scatter_backend"],
                                                                          "unknown scatter backend")
        if g["low_memory"] and g["fuse_level"] not in low_levels:
            continue  # not part of the grid (see --low-memory-levels)
        if g["optimizer_in_backward"] and g["mode"] == "infer":
            continue  # inference has no optimizer step
        if g["cuda_graphs"] and not why:
            why = ("CUDA graphs exist on CUDA only" if device.type != "cuda" else
                   "low_memory is not capturable (host-side block bounds)" if g["low_memory"] else
                   "compile and CUDA graphs are separate modes" if g["compile"] else None)
        if g["return_freed_memory"] and not why and not glibc_malloc():
            why = "returning freed memory sets glibc's malloc (se3t.runtime.return_freed_memory)"
        if g["optimizer_in_backward"] and not why:
            why = ("fp16 loss scaling checks every gradient before any step" if g["precision"] == "fp16" else
                   "CUDA graphs replay the backward without the per-parameter steps" if g["cuda_graphs"] else None)
        if why:
            cell.update(status="unsupported", reason=why)
        elif g["low_memory"] and g["mode"] == "infer":
            cell.update(status="skipped", reason="low_memory only recomputes under autograd: inference runs the "
                                                 "same code as low_memory=off")
        elif getattr(args, "max_step_seconds", None) and (gemm or {}).get(g["precision"]) and (
                est := _estimated_seconds(config, data[g["batch_size"]][0], g["mode"], gemm[g["precision"]])
        ) > args.max_step_seconds:
            rate = gemm[g["precision"]]["flops_per_s"] / 1e9
            reason = (f"a step would need at least ~{est:.0f} s of matmuls at this machine's {g['precision']} GEMM "
                      f"rate ({rate:.3g} GFLOP/s), over --max-step-seconds {args.max_step_seconds:g}")
            cell.update(status="skipped", estimated_step_s=est, reason=reason)
            if g["mode"] == "infer" and not args.no_equivariance and not g["compile"]:
                # not timed, but what this precision does to the outputs is still measured (small batch)
                cell.update(status=None, func="benchmarks.cells:accuracy_cell", kwargs=dict(
                    kind="pooled", config=config, eq_batch=data[g["batch_size"]][1], precision=g["precision"],
                    fuse_level=g["fuse_level"], device=str(device), scatter_backend=g["scatter_backend"],
                    reason=reason + " (accuracy measured on the equivariance batch only)", seed=args.seed,
                    estimated_step_s=est))
        else:
            batches, eq, _ = data[g["batch_size"]]
            cell.update(status=None, func="benchmarks.cells:se3t_cell", kwargs=dict(
                kind="pooled", config=config, batches=batches, eq_batch=None if args.no_equivariance else eq,
                mode=g["mode"], fuse_level=g["fuse_level"], precision=g["precision"], low_memory=g["low_memory"],
                scatter_backend=g["scatter_backend"], device=str(device), warmup=args.warmup, repeats=args.repeats,
                max_seconds=args.max_cell_seconds, seed=args.seed, item="graphs", gemm_size=args.gemm_size,
                compile_model=g["compile"], cuda_graphs=g["cuda_graphs"],
                optimizer_in_backward=g["optimizer_in_backward"], return_freed_memory=g["return_freed_memory"]))
        cells.append(cell)
    return cells
