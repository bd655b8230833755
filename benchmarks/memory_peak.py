"""What a training step's tensors are at their peak: ``python -m benchmarks.memory_peak``.

    python -m benchmarks.memory_peak --data-file .devdata/qm9-100.pt --batch-size 100 --low-memory \
        --optimizer-in-backward --min-mib 0.3

Profiles one warmed-up CPU training step of the paper model (forward + L1 loss + backward + AdamW, as the
benchmark's cells; the fused kernel on the calling thread, as :func:`benchmarks.runner.live_tensor_peak`) with the
profiler's memory timeline and prints: the peak of the bytes of tensors the step made and had not freed, the ops
running at that moment, and the tensors alive then, grouped by where they were made (the op, and the innermost
frames of se3t's own code). Tensors alive before the step (parameters, optimizer state, the batch) are not
counted. It reads ``torch.profiler.profile._memory_profile()``, a private torch API (written against torch 2.13);
its peak agrees with the allocation events' (:func:`~benchmarks.runner.live_tensor_peak`, the benchmark's "live
tensors") to within a few percent (paper model, batch 100, low_memory and the optimizer in backward: 47.7 against
47.4 MiB; tiny model ~6 %): the timeline follows tensors, the events the allocator's requests.

``--per-layer`` also prints where in the step the live tensors peak: the most bytes alive in each stretch of the
step, in order (forward: while each of the transformer's modules runs; backward: from the start of backward, then
from each module's recompute under ``low_memory`` through its backward, until the next recompute starts; then the
optimizer), from the allocation events of a second profiled step (as the benchmark's "live tensors").
"""
from __future__ import annotations

import argparse
import bisect
import collections
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .cells import _prediction, build_model, model_inputs, train_optimizer
from .data import add_batch_arguments, batches_from_args
from .qm9 import PAPER_CONFIG, TINY_CONFIG
from .runner import cpu_allocations, profiled_events

__all__ = ["memory_peak", "layer_peaks", "main"]

MiB = float(1 << 20)
_PYTHON_FRAME = re.compile(r"\(\d+\): ")  # profiler names of Python frames: "file.py(12): func"


class _Intervals:
    """Profiler events sorted by start: the innermost ones running at a time (microseconds since the trace start)."""

    def __init__(self, events):
        self.events = sorted(events, key=lambda e: e.time_range.start)
        self.starts = [e.time_range.start for e in self.events]

    def containing(self, us: float, limit: int, look_back: int = 20000) -> List:
        """Up to ``limit`` events running at ``us``, innermost (latest start) first."""
        found = []
        i = bisect.bisect_right(self.starts, us) - 1
        stop = max(-1, i - look_back)
        while i > stop and len(found) < limit:
            if self.events[i].time_range.end >= us:
                found.append(self.events[i])
            i -= 1
        return found


def _frame(name: str) -> str:
    """``.../se3t/nn/fused.py(506): backward`` -> ``nn/fused.py(506) backward``."""
    path, _, func = name.partition(": ")
    return f"{path.split('se3t/', 1)[-1]} {func}".strip()


def memory_peak(step, min_bytes: int = 0) -> Tuple[int, List[str], List[Tuple[int, int, str]]]:
    """Profile ``step()`` (CPU): ``(peak bytes, ops running at the peak (outermost first), [(bytes, tensors,
    where made)] of the tensors alive at the peak of at least ``min_bytes`` each, largest group first)``."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    from se3t.nn import fused

    parallel, fused.PARALLEL_RANGES = fused.PARALLEL_RANGES, False  # the calling thread's allocations only
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            step()
    finally:
        fused.PARALLEL_RANGES = parallel
    if not hasattr(prof, "_memory_profile"):
        raise RuntimeError(f"torch {torch.__version__} has no profile._memory_profile(): cannot read the timeline")
    timeline = prof._memory_profile().timeline
    live: Dict[object, Tuple[int, int]] = {}  # tensor key -> (time made, bytes), for tensors made in the step
    total = peak = 0
    at_peak: Dict[object, Tuple[int, int]] = {}
    peak_time = None
    for t, action, (key, _version), size in timeline:
        if key.device.type != "cpu":
            continue
        if action == Action.CREATE:  # a key made again without a free in between replaces its first make
            total += size - (live[key][1] if key in live else 0)
            live[key] = (t, size)
        elif action == Action.DESTROY and key in live:
            total -= live.pop(key)[1]
        else:
            continue
        if total > peak:
            peak, peak_time, at_peak = total, t, dict(live)
    start_ns = prof.profiler.kineto_results.trace_start_ns()
    events = prof.events()
    ops = _Intervals([e for e in events if not _PYTHON_FRAME.search(e.name) and not e.name.startswith("<built-in")])
    frames = _Intervals([e for e in events if _PYTHON_FRAME.search(e.name) and "se3t/" in e.name])
    running = [e.name for e in reversed(ops.containing((peak_time - start_ns) / 1e3, 8))] if peak_time else []
    groups: Dict[str, List[int]] = collections.defaultdict(lambda: [0, 0])
    for made, size in at_peak.values():
        if size < min_bytes:
            continue
        us = (made - start_ns) / 1e3
        op = next(iter(ops.containing(us, 1)), None)
        where = [_frame(e.name) for e in reversed(frames.containing(us, 2))]
        group = groups[(op.name if op else "?") + (" | " + " < ".join(where) if where else "")]
        group[0] += size
        group[1] += 1
    rows = sorted(((b, n, w) for w, (b, n) in groups.items()), key=lambda r: -r[0])
    return peak, running, rows


def layer_peaks(step, modules: Sequence[Tuple[str, torch.nn.Module]]) -> List[Tuple[str, str, int]]:
    """Profile ``step(mark)`` (CPU, the fused kernel on the calling thread) and return ``(phase, stretch, peak
    bytes)`` for each stretch of the step, in order: the bytes of tensors made by the step and alive at once, at
    most, from the allocation events. ``step`` calls ``mark("backward")`` before its backward and
    ``mark("optimizer")`` before its optimizer step; a stretch starts whenever one of ``modules`` (``(label,
    module)``) starts a forward (in backward: a checkpoint's recompute)."""
    from torch.profiler import record_function

    def mark(name: str) -> None:
        with record_function("se3t-mark " + name):
            pass

    hooks = [m.register_forward_pre_hook(lambda _m, _a, label=label: mark("module " + label))
             for label, m in modules]
    try:
        events = profiled_events(lambda: step(mark))
    finally:
        for h in hooks:
            h.remove()
    allocations = cpu_allocations(events)
    marks = sorted((e.start_ns(), e.name()[len("se3t-mark "):]) for e in events
                   if e.name().startswith("se3t-mark "))
    phase, stretch, rows, live, m = "forward", "(before the first module)", [], 0, 0
    for t, nbytes in allocations:
        while m < len(marks) and marks[m][0] <= t:
            name = marks[m][1]
            if name in ("backward", "optimizer"):
                phase, stretch = name, f"(start of {name})"
            else:
                module = name[len("module "):]
                stretch = module if phase == "forward" else f"from the recompute of {module}"
            m += 1
        live += nbytes
        if not rows or rows[-1][:2] != (phase, stretch):
            rows.append((phase, stretch, live))
        elif live > rows[-1][2]:
            rows[-1] = (phase, stretch, live)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_peak", description=__doc__.split("\n")[0])
    add_batch_arguments(p)
    p.add_argument("--level", default="EDGE_FRAME")
    p.add_argument("--model", default="paper", choices=("paper", "tiny"))
    p.add_argument("--low-memory", action="store_true", help="SE3Transformer(low_memory=True)")
    p.add_argument("--optimizer-in-backward", action="store_true",
                   help="AdamW stepped per parameter in backward (se3t.runtime.StepInBackward)")
    p.add_argument("--min-mib", type=float, default=0.3, help="list tensors of at least this size")
    p.add_argument("--per-layer", action="store_true", help="also print the peak of each stretch of the step "
                   "(each module's forward; backward from each recompute)")
    args = p.parse_args(argv)
    from se3t.runtime.optim import StepInBackward

    batches, _ = batches_from_args(args, 2)
    config = TINY_CONFIG if args.model == "tiny" else PAPER_CONFIG
    model = build_model("pooled", config, args.level, args.low_memory)
    model.train()
    opt = train_optimizer(model)
    in_backward = StepInBackward(opt) if args.optimizer_in_backward else None
    inputs = [model_inputs(b) for b in batches]

    def step(i: int = 0, mark=lambda _: None) -> None:
        opt.zero_grad(set_to_none=True)
        pred = _prediction(model, "pooled", batches[i], inputs[i])
        loss = F.l1_loss(pred, batches[i]["y"][batches[i]["graph_mask"]].float())
        mark("backward")
        loss.backward()
        mark("optimizer")
        if in_backward is None:
            opt.step()

    for i in range(2):  # warm-up: optimizer state, cached constants, the kernels' buffers
        step(i)
    peak, running, rows = memory_peak(step, int(args.min_mib * MiB))
    b = batches[0]
    modes = [m for m, on in (("low_memory", args.low_memory), ("optimizer in backward", args.optimizer_in_backward))
             if on]
    listed = sum(r[0] for r in rows)
    print(f"memory peak: {args.model} model, {args.level}, fp32, train{' (' + ', '.join(modes) + ')' if modes else ''}"
          f", batch {args.batch_size} ({int(b['num_real_nodes'])} atoms, {int(b['num_real_edges'])} edges), "
          f"torch {torch.__version__}")
    print(f"tensors made by the step and alive at once: peak {peak / MiB:.2f} MiB")
    print("running at the peak: " + " > ".join(running))
    print(f"alive at the peak (>= {args.min_mib:g} MiB each), by where they were made: MiB, tensors, op | frames")
    for nbytes, count, where in rows:
        print(f"  {nbytes / MiB:7.2f} {count:4d}  {where}")
    print(f"listed {listed / MiB:.2f} of {peak / MiB:.2f} MiB")
    if args.per_layer:
        modules = [(f"{i} {type(m).__name__}", m) for i, m in enumerate(model.transformer.graph_modules)]
        print("peak of each stretch of a second step (allocation events): phase, stretch, MiB")
        for phase, stretch, nbytes in layer_peaks(lambda mark: step(0, mark), modules):
            print(f"  {phase:9s} {stretch:48s} {nbytes / MiB:7.2f}")


if __name__ == "__main__":
    main()
