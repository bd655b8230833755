"""Where one step's time goes: ``python -m benchmarks.profile_step`` profiles one step of the paper model.

    python -m benchmarks.profile_step --data-file .devdata/qm9-240.pt --batch-size 240 --device cuda \
        --precision bf16 --level EDGE_FRAME --mode train --top 40 --out prof.txt

Prints, for one warmed-up eager step (train: forward + L1 loss + backward; the optimizer is left out): the number
of device kernels (CUDA) or aten ops (CPU) it launches, their summed self time, and the ops that cost most,
each with its call count and share. On CUDA it also times the same step replayed as a CUDA graph
(:class:`se3t.CUDAGraphStep`), so that replay time can be set against the summed kernel time (their difference is
what the gaps between thousands of small kernels cost).
"""
from __future__ import annotations

import argparse
import collections
import time
from typing import Dict, List, Tuple

import torch

import se3t

from .cells import build_model, model_inputs
from .data import add_batch_arguments, batches_from_args
from .machine import precision_context, sync
from .qm9 import PAPER_CONFIG, TINY_CONFIG

__all__ = ["profile_step", "main"]


def _step_fn(model, batch: dict, precision: str, device: torch.device, mode: str):
    inputs = model_inputs(batch)
    mask = batch["graph_mask"]

    def step():
        if mode == "train":
            with precision_context(precision, device):
                pred = model(**inputs).float().reshape(-1)
            loss = ((pred - batch["y"].float()).abs() * mask).sum() / mask.sum().clamp_min(1)
            loss.backward()
            return loss.detach()
        with torch.inference_mode(), precision_context(precision, device):
            return model(**inputs)
    return step


def _table(events, device_type: str) -> Tuple[List[Tuple[str, int, float]], int, float]:
    """(name, calls, self seconds) per op sorted by time, the op count and total seconds. Only host-side ops: on
    CUDA their self device time is the time of the kernels they launched, and the kernels' own entries (listed
    apart) would count it twice."""
    per: Dict[str, List[float]] = collections.defaultdict(lambda: [0, 0.0])
    count, total = 0, 0.0
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue
        t = e.self_device_time_total if device_type == "cuda" else e.self_cpu_time_total
        if t <= 0:
            continue
        n = e.count
        per[e.key][0] += n
        per[e.key][1] += t * 1e-6
        count += n
        total += t * 1e-6
    rows = sorted(((k, int(v[0]), v[1]) for k, v in per.items()), key=lambda r: -r[2])
    return rows, count, total


def _graph_replay_ms(step, params, repeats: int) -> float:
    """Milliseconds per replay of ``step`` captured as a CUDA graph (after two replays), timed with CUDA events."""
    graphed = se3t.CUDAGraphStep(lambda: step(), params=params)
    for _ in range(2):
        graphed()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graphed()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def profile_step(model, batch: dict, precision: str, device: torch.device, mode: str, top: int = 40,
                 graph_repeats: int = 20) -> str:
    """Profile one step; returns the report as text (see the module docstring)."""
    step = _step_fn(model, batch, precision, device, mode)
    for _ in range(3):  # warm-up: allocator, cuBLAS handles, lazy buffers
        model.zero_grad(set_to_none=True)
        step()
    sync(device)
    lines = []
    t0 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    step()
    sync(device)
    lines.append(f"eager step wall time: {1e3 * (time.perf_counter() - t0):.2f} ms")
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    model.zero_grad(set_to_none=True)
    with profile(activities=acts) as prof:
        step()
        sync(device)
    # kernels: device-side events grouped by kernel name; ops: aten ops grouped by name (their device time)
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        per: Dict[str, List[float]] = collections.defaultdict(lambda: [0, 0.0])
        for e in kernels:
            per[e.name][0] += 1
            per[e.name][1] += e.device_time * 1e-6
        krows = sorted(((k, int(v[0]), v[1]) for k, v in per.items()), key=lambda r: -r[2])
        kcount, ktotal = sum(r[1] for r in krows), sum(r[2] for r in krows)
        lines.append(f"device kernels per step: {kcount}, summed kernel time {1e3 * ktotal:.2f} ms")
    rows, count, total = _table(prof.key_averages(), device.type)
    unit = "device" if device.type == "cuda" else "CPU (self)"
    lines.append(f"ops with {unit} time: {count} calls, {1e3 * total:.2f} ms summed")
    if device.type == "cuda":
        params = [p for p in model.parameters() if p.requires_grad] if mode == "train" else None
        what = "forward + loss + backward" if mode == "train" else "forward"
        lines.append(f"CUDA graph replay ({what}): {_graph_replay_ms(step, params, graph_repeats):.2f} ms")
    lines.append("")
    lines.append(f"top ops by {unit} time: calls, ms, share")
    for name, n, t in rows[:top]:
        lines.append(f"  {name[:70]:70s} {n:6d} {1e3 * t:9.3f} {100 * t / max(total, 1e-12):5.1f}%")
    if device.type == "cuda":
        lines.append("")
        lines.append("top kernels by device time: launches, ms, share")
        for name, n, t in krows[:top]:
            lines.append(f"  {name[:90]:90s} {n:6d} {1e3 * t:9.3f} {100 * t / max(ktotal, 1e-12):5.1f}%")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_arguments(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16", "fp16"))
    p.add_argument("--level", default="EDGE_FRAME")
    p.add_argument("--mode", default="train", choices=("train", "infer"))
    p.add_argument("--model", default="paper", choices=("paper", "tiny"))
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--out", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    batches, _ = batches_from_args(args, 1)
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batches[0].items()}
    config = TINY_CONFIG if args.model == "tiny" else PAPER_CONFIG
    model = build_model("pooled", config, args.level, False).to(device)
    model.train(args.mode == "train")
    head = (f"profile: {args.model} model, {args.level}, {args.precision}, {args.mode}, batch {args.batch_size} "
            f"({int(batch['num_real_nodes'])} atoms, {int(batch['num_real_edges'])} edges), device {device}"
            + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
            + f", torch {torch.__version__}")
    report = head + "\n" + profile_step(model, batch, args.precision, device, args.mode, args.top)
    print(report, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
