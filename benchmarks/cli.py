"""``python -m benchmarks``: run a suite, compare two result files, or print the README table.

    python -m benchmarks qm9 [--quick] [--device auto|cpu|cuda] [--repeats N] [--warmup N] [--out DIR] ...
    python -m benchmarks qm9 --levels FULL --compile off,on  # eager against torch.compile(model, dynamic=False)
    python -m benchmarks scaling --quick
    python -m benchmarks peers
    python -m benchmarks all
    python -m benchmarks compare A.json B.json [--out FILE]
    python -m benchmarks readme-table RESULT.json
    python -m benchmarks report RESULT.json          # re-render the Markdown table and the plots
    python -m benchmarks pack-data --batch-sizes 240 --out FILE.pt   # real QM9 batches for a machine without it
    python -m benchmarks qm9 --data saved --data-file FILE.pt ...
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import torch

__all__ = ["main", "build_parser"]

SUITES = ("qm9", "scaling", "peers", "all")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _csv(kind=str):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            return [kind(t) for t in items]
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def _onoff(text: str) -> bool:
    t = text.strip().lower()
    if t in ("on", "true", "1", "yes"):
        return True
    if t in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {text!r}")


def _level(text: str) -> str:
    from se3t import FuseLevel

    try:
        return FuseLevel.coerce(text).name
    except (ValueError, KeyError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for suite in SUITES:
        s = sub.add_parser(suite, help=f"run the {suite} suite" if suite != "all" else "run every suite")
        g = s.add_argument_group("run")
        g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
        g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
        g.add_argument("--repeats", type=int, default=None, help="timed steps per cell (default 5; quick: 2)")
        g.add_argument("--warmup", type=int, default=None, help="untimed steps per cell (default 2; quick: 1)")
        g.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
        g.add_argument("--name", default=None, help="output file stem (default <machine>-<suite>[-quick])")
        g.add_argument("--quick", action="store_true", help="a small grid that finishes in minutes on 2 CPU cores")
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--no-isolate", action="store_true",
                       help="run cells in this process (faster; CPU peak memory less exact)")
        g.add_argument("--cell-timeout", type=float, default=None, help="seconds before a cell is killed "
                                                                        "(default 1800; quick: 300, or 900 with "
                                                                        "--compile on)")
        g.add_argument("--max-cell-seconds", type=float, default=None,
                       help="stop a cell's timed loop after this many seconds (at least one timed step)")
        g.add_argument("--max-step-seconds", type=float, default=None,
                       help="qm9: skip (and record) cells whose step cannot take less than this: matmul FLOPs over "
                            "the measured GEMM rate (e.g. bf16 on CPUs that emulate it)")
        g.add_argument("--mem-limit-gb", type=float, default=None,
                       help="address-space limit per cell process (CPU out-of-memory becomes an 'oom' cell); "
                            "peers default: 80%% of RAM")
        g.add_argument("--gemm-size", type=int, default=2048, help="n of the n x n GEMM that sets the utilisation "
                                                                   "ceiling (default 2048)")
        g.add_argument("--no-plots", action="store_true")
        f = s.add_argument_group("grid filters (comma-separated lists)")
        f.add_argument("--levels", type=_csv(_level), default=None, help="fusion levels (default: every FuseLevel; quick: the model's default)")
        f.add_argument("--precisions", type=_csv(), default=None,
                       help="fp32, tf32, fp16, bf16 (default: CPU fp32,bf16; CUDA all four)")
        f.add_argument("--batch-sizes", type=_csv(int), default=None, help="molecules per batch (default 100)")
        f.add_argument("--low-memory", type=_csv(_onoff), default=None, help="on,off (default both)")
        f.add_argument("--optimizer-in-backward", type=_csv(_onoff), default=None,
                       help="qm9 training: on (AdamW stepped per parameter during backward, "
                            "se3t.runtime.optim.StepInBackward), off (default)")
        f.add_argument("--return-freed-memory", type=_csv(_onoff), default=None,
                       help="qm9: on (glibc's malloc gives freed tensors back to the system, as `se3t train "
                            "--return_freed_memory` has it: se3t.runtime.return_freed_memory), off (default)")
        f.add_argument("--low-memory-levels", type=_csv(str), default=None,
                       help="levels measured with low_memory=on (default: the model's default level; 'all')")
        f.add_argument("--scatter-backends", type=_csv(), default=None, help="default: every se3t.scatter backend; quick: torch")
        f.add_argument("--modes", type=_csv(), default=None, help="train,infer (default both)")
        f.add_argument("--cuda-graphs", type=_csv(_onoff), default=None,
                       help="qm9 on CUDA: off (eager), on (se3t.CUDAGraphStep: the forward, loss and backward replayed "
                            "as one CUDA graph per padded batch shape; the optimizer steps eagerly) or off,on "
                            "(default off)")
        f.add_argument("--compile", type=_csv(_onoff), default=None,
                       help="qm9: off (eager), on (torch.compile(model, dynamic=False): one compilation per padded "
                            "batch shape, before the timed steps) or off,on (default off)")
        d = s.add_argument_group("model and data")
        d.add_argument("--model", choices=("paper", "tiny"), default="paper", help="qm9: the paper model or a tiny one")
        d.add_argument("--data", choices=("qm9", "synthetic", "saved"), default="qm9",
                       help="qm9: real QM9 via se3t_data; synthetic: molecule-like random graphs; saved: the "
                            "batches `pack-data` wrote to --data-file")
        d.add_argument("--data-file", type=Path, default=None, help="--data saved: the file `pack-data` wrote")
        d.add_argument("--data-root", default=None, help="se3t_data QM9 root (default: its cache folder)")
        d.add_argument("--num-batches", type=int, default=4, help="distinct random batches cycled per cell")
        d.add_argument("--no-equivariance", action="store_true", help="skip the per-cell equivariance check")
        d.add_argument("--sizes", type=_csv(int), default=None, help="scaling: point counts")
        d.add_argument("--degree-points", type=int, default=None, help="scaling: points of the degree sweep")
        d.add_argument("--max-degree", type=int, default=3, help="scaling: largest max degree of the degree sweep")
        d.add_argument("--neighbours", type=float, default=16.0, help="scaling: expected neighbours per point")
        d.add_argument("--peer-depth", type=int, default=None,
                       help="peers: attention blocks on the hidden fiber (se3t has one more, from the input; "
                            "default 2; quick 1)")
    c = sub.add_parser("compare", help="two result files side by side as ratios (B / A)")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--out", type=Path, default=None, help="write the Markdown here instead of stdout")
    r = sub.add_parser("readme-table", help="the README's Markdown results table from a result file")
    r.add_argument("result", type=Path)
    pk = sub.add_parser("pack-data", help="save random real QM9 batches to one file, for --data saved on a "
                                          "machine without se3t_data's extras or the QM9 cache (a lent GPU)")
    pk.add_argument("--batch-sizes", type=_csv(int), required=True)
    pk.add_argument("--num-batches", type=int, default=4)
    pk.add_argument("--seed", type=int, default=0)
    pk.add_argument("--data-root", default=None)
    pk.add_argument("--out", type=Path, required=True)
    rep = sub.add_parser("report", help="re-render a result file's Markdown table and plots next to it")
    rep.add_argument("result", type=Path)
    return p


def _defaults(args, suite: str, device: torch.device) -> None:
    quick = args.quick
    cuda = device.type == "cuda"
    if args.repeats is None:
        args.repeats = 2 if quick else 5
    if args.warmup is None:
        args.warmup = 1 if quick else 2
    if args.compile is None:
        args.compile = [False]
    if getattr(args, "cuda_graphs", None) is None:
        args.cuda_graphs = [False]
    if args.cell_timeout is None:  # compiling the paper model takes minutes per batch shape on a few CPU cores
        args.cell_timeout = (900.0 if any(args.compile) else 300.0) if quick else 1800.0
    if args.precisions is None:
        args.precisions = (["fp32"] if quick else ["fp32", "tf32", "fp16", "bf16"] if cuda else ["fp32", "bf16"])
        if suite in ("scaling", "peers"):
            args.precisions = ["fp32"]
    if args.modes is None:
        args.modes = ["train", "infer"]
    if args.low_memory is None:
        args.low_memory = [False] if quick or suite != "qm9" else [False, True]
    if args.batch_sizes is None:
        if suite == "peers":
            args.batch_sizes = [1, 4] if quick else [1, 10, 100]
        else:
            args.batch_sizes = [8] if quick and args.model == "tiny" else [100]
    if suite == "scaling":
        if args.sizes is None:
            args.sizes = [500, 1000, 2500, 5000, 10000] if quick else [500, 1000, 2000, 5000, 10000, 20000]
        if args.degree_points is None:
            args.degree_points = 500 if quick else 2000
        if quick and args.max_cell_seconds is None:
            args.max_cell_seconds = 15.0
    if quick and suite == "qm9":  # the default level on the default backend: NONE/PARTIAL take minutes per step
        if args.levels is None:
            from .suite import default_fuse_level  # noqa: PLC0415  (imports se3t)

            args.levels = [default_fuse_level()]
        if args.scatter_backends is None:
            args.scatter_backends = ["torch"]
    if args.peer_depth is None:
        args.peer_depth = 1 if quick else 2
    if args.quick and args.num_batches == 4:
        args.num_batches = 2


def _settings(args) -> dict:
    keep = ("device", "threads", "repeats", "warmup", "quick", "seed", "cell_timeout", "max_cell_seconds",
            "mem_limit_gb", "max_step_seconds", "levels", "precisions", "batch_sizes", "low_memory", "low_memory_levels",
            "optimizer_in_backward", "return_freed_memory", "compile", "cuda_graphs", "scatter_backends", "modes",
            "model", "data", "num_batches", "sizes", "degree_points", "max_degree", "neighbours", "peer_depth",
            "gemm_size")
    s = {k: getattr(args, k, None) for k in keep}
    s["isolated_cells"] = not args.no_isolate
    return s


def run_suite(args, suite: str) -> dict:
    from . import peers, qm9, scaling
    from .machine import resolve_device
    from .runner import default_mem_limit
    from .suite import log, measure_gemm, new_result, output_stem, run_cells, write_outputs

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    _defaults(args, suite, device)
    settings = _settings(args)
    settings["threads"] = threads
    result = new_result(suite, args, device, threads, settings)
    out_dir = Path(args.out)
    stem = output_stem(args, suite, device, threads)
    partial = out_dir / f"{stem}.partial.json"
    log(f"suite {suite} on {device} ({threads} threads) -> {out_dir / stem}.*")
    mem_limit = int(args.mem_limit_gb * 2 ** 30) if args.mem_limit_gb else None
    if suite in ("qm9", "peers"):
        data = {}
        for bs in args.batch_sizes:
            batches, eq, info = qm9.load_batches(args, bs)
            data[bs] = (batches, eq, info)
            log(f"data batch {bs}: {info['source']}, {len(batches)} batches, "
                f"{sum(b['num_real_nodes'] for b in batches) / len(batches):.0f} nodes and "
                f"{sum(b['num_real_edges'] for b in batches) / len(batches):.0f} edges per batch")
        settings["data_info"] = {str(bs): v[2] for bs, v in data.items()}
        if suite == "qm9":
            settings["model_config"] = qm9.TINY_CONFIG if args.model == "tiny" else qm9.PAPER_CONFIG
            measure_gemm(result, args.precisions, device, args.gemm_size)
            cells = qm9.build_cells(args, device, data, result["gemm"])
        else:
            settings["se3t_config"] = peers.se3t_config(args.peer_depth)
            if mem_limit is None and device.type == "cpu" and not args.no_isolate:
                mem_limit = default_mem_limit()
            settings["mem_limit_bytes"] = mem_limit
            cells = peers.build_cells(args, device, data)
    else:
        settings["model_config"] = dict(scaling.SCALING_CONFIG, hidden_channels=scaling.CHANNELS)
        cells = scaling.build_cells(args, device)
    run_cells(result, cells, isolate=not args.no_isolate, threads=threads, timeout=args.cell_timeout,
              mem_limit=mem_limit, checkpoint=partial)
    if suite == "scaling":
        scaling.add_fits(result)
    paths = write_outputs(result, out_dir, stem, plots=not args.no_plots)
    if partial.exists():
        partial.unlink()
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = ["python -m benchmarks"] + list(argv if argv is not None else sys.argv[1:])
    if args.command == "compare":
        from .report import compare

        text = compare(json.loads(args.a.read_text()), json.loads(args.b.read_text()), args.a.name, args.b.name)
        if args.out:
            args.out.write_text(text)
        else:
            sys.stdout.write(text)
        return 0
    if args.command == "readme-table":
        from .report import readme_table

        sys.stdout.write(readme_table(json.loads(args.result.read_text()), source=str(args.result)))
        return 0
    if args.command == "pack-data":
        from .data import pack_batches
        from .suite import log

        pack_batches(args.out, args.batch_sizes, args.num_batches, seed=args.seed, root=args.data_root)
        log(f"wrote {args.out} ({args.out.stat().st_size / 2 ** 20:.1f} MiB)")
        return 0
    if args.command == "report":
        from .report import markdown, plot

        result = json.loads(args.result.read_text())
        if result["suite"] == "scaling":
            from .scaling import add_fits

            add_fits(result)  # derived from the cells: recomputed with the current fitting code
            args.result.write_text(json.dumps(result, indent=1) + "\n")
        stem = args.result.name[:-len(".json")] if args.result.name.endswith(".json") else args.result.stem
        plot(result, args.result.parent, stem)
        (args.result.parent / f"{stem}.md").write_text(markdown(result))
        return 0
    suites = ["qm9", "scaling", "peers"] if args.command == "all" else [args.command]
    args.suite = args.command
    import copy

    for suite in suites:
        run_suite(copy.copy(args), suite)
    return 0
