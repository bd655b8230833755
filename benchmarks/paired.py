"""Step-time ratios of model variants measured in one process, steps interleaved: ``python -m benchmarks.paired``.

    python -m benchmarks.paired --data-file .devdata/qm9-100.pt --batch-size 100 \
        --variants default,oib,low,low+oib --rounds 12 --name cpu-2core-paired-low-memory

The suite (``python -m benchmarks qm9``) runs every cell in its own process, one after another: on a shared or
noisy machine two cells minutes apart can see different load, and their time ratio moves by 15-30 %. Here every
variant is built in this process (same weights), and each round runs one step of each variant, in alternating
order (A B C, C B A, ...), so a round's ratio to the baseline (the first variant) compares steps taken seconds
apart. Reported per variant: the median step time, the median of the per-round ratios to the baseline with a
bootstrap interval over the rounds, and the live-tensor peak of one profiled step
(:func:`benchmarks.runner.live_tensor_peak`, the suite's "live peak") with its ratio to the baseline's.

CPU only (on CUDA the suite's cells time one process each without this noise; the live peak here is a CPU
measure). A variant is a ``+``-joined set of flags (``default``: none of them):

* ``low``: ``low_memory=True``; ``seg=N``: with ``low``, ``low_memory_segment=N``;
* ``oib``: AdamW stepped per parameter during backward (:class:`se3t.runtime.StepInBackward`);
* ``infer``: inference (the forward under ``torch.inference_mode``) instead of a training step (forward, L1 loss,
  backward and AdamW, as the suite's training cells);
* ``forces``: the model's output summed as an energy and its gradient with respect to the positions
  (``torch.autograd.grad``; the weights require grad, as they do in a trained model); ``wgrad``: with ``forces``,
  the fused kernel makes the weights' gradient anyway (``se3t.nn.fused.SKIP_UNUSED_WEIGHT_GRADIENT`` off, the
  reference);
* ``ftrain``: a training step on forces: the L1 loss of the energies plus the mean square of the real atoms'
  forces (QM9's geometries are relaxed: zero is their target), the forces by ``torch.autograd.grad(...,
  create_graph=True)``, then backward and AdamW (second derivatives through fused calls); ``refdouble``: with
  ``ftrain``, second derivatives through the kernel's plain-autograd form in checkpointed chunks of edges
  (``se3t.nn.fused.FUSED_DOUBLE_BACKWARD`` off, the reference); ``unchunked``: that form over all edges at once
  (``DOUBLE_BACKWARD_CHUNK_VALUES`` set to 0 as well);
* ``nokeep``: calls on few edges lay their weights out again in backward (``se3t.nn.fused.KEEP_LAYOUTS_MAX_EDGES``
  set to 0, the reference, during this variant's steps);
* ``densemaps``: the edge frame's weights mapped by gathers and ``bmm`` instead of sparse products
  (``se3t.nn.edge_frame_conv.SPARSE_MAPS`` off, the reference); ``copies``: calls on few edges copy their weights
  into contiguous or outer-order GEMM layouts anyway (``se3t.nn.fused.LAYOUT_COPY_MIN_EDGES`` set to 0, the reference);
* ``cache``: with ``infer`` or ``forces``, inside ``se3t.cached_kernel_weights(model)`` (the kernel weights laid
  out once, in the warm-up);
* ``level=NAME``: this variant's fusion level (``FULL``, ``EDGE_FRAME``, ...) instead of ``--level``'s.

The variants share the process's heap: a variant with a small peak reuses memory the others freed, where on its
own it would fault some pages in afresh (measured for ``low+oib`` at batch 100: ~45 MB of minor faults per step
on its own, a few tens of ms of a 4 s step).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Sequence

import torch
import torch.nn.functional as F

import se3t
from se3t import FuseLevel
from se3t.nn import edge_frame_conv, fused
from se3t.runtime.optim import StepInBackward

from .cells import _prediction, build_model, model_inputs, train_optimizer
from .data import add_batch_arguments, batches_from_args
from .machine import gemm_rate, machine_info, versions
from .qm9 import PAPER_CONFIG, TINY_CONFIG
from .runner import live_tensor_peak
from .suite import _dump

__all__ = ["Variant", "parse_variant", "interleaved_times", "ratio_summary", "paired", "markdown", "main"]

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


class Variant(NamedTuple):
    """One configuration of the model and step (see the module docstring)."""

    name: str
    low_memory: bool = False
    segment: int = 0            # low_memory_segment; 0: the model's default
    optimizer_in_backward: bool = False
    infer: bool = False
    cache: bool = False         # infer or forces inside se3t.cached_kernel_weights(model)
    forces: bool = False        # energy + forces (autograd.grad for the positions)
    weight_gradient: bool = False  # forces with the fused kernel's weight gradient made anyway (the reference)
    force_training: bool = False   # a training step with a loss on forces (create_graph)
    no_kept_layouts: bool = False  # se3t.nn.fused.KEEP_LAYOUTS_MAX_EDGES = 0 (the reference)
    reference_double: bool = False  # ftrain with se3t.nn.fused.FUSED_DOUBLE_BACKWARD = False (the reference)
    unchunked: bool = False        # ... and DOUBLE_BACKWARD_CHUNK_VALUES = 0 (all edges at once)
    dense_maps: bool = False       # se3t.nn.edge_frame_conv.SPARSE_MAPS = False (the reference)
    layout_copies: bool = False    # se3t.nn.fused.LAYOUT_COPY_MIN_EDGES = 0 (the reference)
    level: str = ""             # fusion level; "": the run's


#: flag -> Variant field, for the flags that switch a field on
_SWITCHES = {"low": "low_memory", "oib": "optimizer_in_backward", "infer": "infer", "cache": "cache",
             "forces": "forces", "wgrad": "weight_gradient", "ftrain": "force_training",
             "nokeep": "no_kept_layouts", "refdouble": "reference_double", "unchunked": "unchunked",
             "densemaps": "dense_maps", "copies": "layout_copies"}


def parse_variant(text: str) -> Variant:
    """``"low+oib"`` -> ``Variant("low+oib", low_memory=True, optimizer_in_backward=True)``."""
    flags = [f.strip() for f in text.split("+") if f.strip()]
    if not flags:
        raise ValueError(f"empty variant in {text!r}")
    fields: Dict[str, object] = {}
    for flag in flags:
        if flag in _SWITCHES:
            fields[_SWITCHES[flag]] = True
        elif flag.startswith("seg="):
            try:
                fields["segment"] = int(flag[4:])
            except ValueError:
                fields["segment"] = 0
            if fields["segment"] < 1:
                raise ValueError(f"variant {text!r}: seg= needs a positive integer, got {flag!r}")
        elif flag.startswith("level="):
            try:
                fields["level"] = FuseLevel.coerce(flag[6:]).name
            except (KeyError, ValueError) as e:
                raise ValueError(f"variant {text!r}: {flag!r} names no fusion level (known: "
                                 f"{', '.join(lv.name for lv in FuseLevel)})") from e
        elif flag != "default":
            raise ValueError(f"variant {text!r}: unknown flag {flag!r} (known: default, {', '.join(_SWITCHES)}, "
                             "seg=N, level=NAME)")
    if fields.get("unchunked"):
        fields["reference_double"] = True
    v = Variant(text.strip(), **fields)
    if v.segment and not v.low_memory:
        raise ValueError(f"variant {text!r}: seg=N applies to low_memory only; add 'low'")
    if v.infer and v.forces:
        raise ValueError(f"variant {text!r}: 'infer' and 'forces' are two different steps; choose one")
    if (v.infer or v.forces) and (v.low_memory or v.optimizer_in_backward):
        raise ValueError(f"variant {text!r}: 'infer' and 'forces' run the model in eval mode with no optimizer, so "
                         "'low' and 'oib' would change nothing")
    if v.force_training and (v.infer or v.forces or v.optimizer_in_backward):
        raise ValueError(f"variant {text!r}: 'ftrain' is a training step of its own; it takes 'low', 'seg=N' and "
                         "'level=NAME' only")
    if v.reference_double and not v.force_training:
        raise ValueError(f"variant {text!r}: 'refdouble' and 'unchunked' apply to 'ftrain' only")
    if v.cache and not (v.infer or v.forces):
        raise ValueError(f"variant {text!r}: 'cache' applies to 'infer' and 'forces' only")
    if v.weight_gradient and not v.forces:
        raise ValueError(f"variant {text!r}: 'wgrad' applies to 'forces' only")
    return v


def interleaved_times(steps: Sequence[Callable[[int], None]], rounds: int, warmup: int = 1,
                      clock: Callable[[], float] = time.perf_counter) -> List[List[float]]:
    """Seconds of ``steps[v](r)`` for every variant ``v`` and round ``r``: ``[variant][round]``. Each round runs
    every step once, in order on even rounds and in reverse on odd ones (what runs first or after which variant
    does not favour one); ``warmup`` untimed rounds first, ordered alike."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    times: List[List[float]] = [[] for _ in steps]
    for r in range(-warmup, rounds):
        order = range(len(steps)) if r % 2 == 0 else range(len(steps) - 1, -1, -1)
        for v in order:
            t0 = clock()
            steps[v](r)
            if r >= 0:
                times[v].append(clock() - t0)
    return times


def ratio_summary(times: Sequence[float], base: Sequence[float], level: float = 0.9, resamples: int = 2000,
                  seed: int = 0) -> Dict[str, float]:
    """Per-round ratios ``times[r] / base[r]``: their median, smallest and largest, and a percentile bootstrap
    interval (``level``) of the median over rounds resampled with replacement (seeded: the same numbers each
    time)."""
    if len(times) != len(base) or not times:
        raise ValueError(f"need the same non-zero number of rounds, got {len(times)} and {len(base)}")
    ratios = [t / b for t, b in zip(times, base)]
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    tail = (1.0 - level) / 2
    lo = medians[int(math.floor(tail * (resamples - 1)))]
    hi = medians[int(math.ceil((1.0 - tail) * (resamples - 1)))]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "interval_low": lo,
            "interval_high": hi, "interval_level": level}


def _variant_step(variant: Variant, config: dict, level: str, batches: List[dict], inputs: List[dict],
                  seed: int, stack: contextlib.ExitStack) -> Callable[[int], None]:
    """One step of ``variant``'s own model and optimizer; contexts the step needs held (``cache``) enter
    ``stack``."""
    model = build_model("pooled", config, variant.level or level, variant.low_memory, seed)
    if variant.segment:
        model.transformer.low_memory_segment = variant.segment
    if variant.infer or variant.forces:
        model.eval()
        if variant.cache:  # held for the whole run (the variant's steps are interleaved with the others')
            stack.enter_context(se3t.cached_kernel_weights(model))

        def infer(i: int) -> None:
            with torch.inference_mode():
                model(**inputs[i % len(inputs)])

        def forces(i: int) -> None:
            pos = inputs[i % len(inputs)]["pos"].clone().requires_grad_(True)
            energy = model(**dict(inputs[i % len(inputs)], pos=pos)).sum()
            torch.autograd.grad(energy, pos)
        return _with_kernel_settings(variant, infer if variant.infer else forces)
    model.train()
    opt = train_optimizer(model)
    in_backward = StepInBackward(opt) if variant.optimizer_in_backward else None

    def train(i: int) -> None:
        b = batches[i % len(batches)]
        if in_backward is None:
            opt.zero_grad(set_to_none=True)
        if variant.force_training:
            pos = inputs[i % len(inputs)]["pos"].clone().requires_grad_(True)
            pred = _prediction(model, "pooled", b, dict(inputs[i % len(inputs)], pos=pos))
            forces, = torch.autograd.grad(pred.sum(), pos, create_graph=True)
            loss = F.l1_loss(pred, b["y"][b["graph_mask"]].float()) + forces[b["node_mask"]].pow(2).mean()
        else:
            pred = _prediction(model, "pooled", b, inputs[i % len(inputs)])
            loss = F.l1_loss(pred, b["y"][b["graph_mask"]].float())
        loss.backward()
        if in_backward is None:
            opt.step()
    return _with_kernel_settings(variant, train)


def _with_kernel_settings(variant: Variant, step: Callable[[int], None]) -> Callable[[int], None]:
    """``step`` with the kernel switches the variant asks for (``wgrad``, ``nokeep``, ``refdouble``,
    ``unchunked``, ``densemaps``, ``copies``) set during each of its steps only (the variants' steps are
    interleaved)."""
    settings = {}
    if variant.weight_gradient:
        settings[fused, "SKIP_UNUSED_WEIGHT_GRADIENT"] = False
    if variant.no_kept_layouts:
        settings[fused, "KEEP_LAYOUTS_MAX_EDGES"] = 0
    if variant.reference_double:
        settings[fused, "FUSED_DOUBLE_BACKWARD"] = False
    if variant.unchunked:
        settings[fused, "DOUBLE_BACKWARD_CHUNK_VALUES"] = 0
    if variant.dense_maps:
        settings[edge_frame_conv, "SPARSE_MAPS"] = False
    if variant.layout_copies:
        settings[fused, "LAYOUT_COPY_MIN_EDGES"] = 0
    if not settings:
        return step

    def run(i: int) -> None:
        saved = {(module, name): getattr(module, name) for module, name in settings}
        try:
            for (module, name), value in settings.items():
                setattr(module, name, value)
            step(i)
        finally:
            for (module, name), value in saved.items():
                setattr(module, name, value)
    return run


def paired(variants: Sequence[Variant], batches: List[dict], *, config: dict = PAPER_CONFIG,
           level: str = "EDGE_FRAME", rounds: int = 10, warmup: int = 1, seed: int = 0, live_peak: bool = True,
           resamples: int = 2000) -> dict:
    """Measure ``variants`` (the first is the baseline) on ``batches`` (cycled), interleaved: see the module
    docstring. Returns the result's ``variants`` entries and the GEMM rate before and after."""
    if len(variants) < 2:
        raise ValueError("need at least two variants: the first is the baseline the others are compared with")
    inputs = [model_inputs(b) for b in batches]
    with contextlib.ExitStack() as stack:
        steps = [_variant_step(v, config, level, batches, inputs, seed, stack) for v in variants]
        result: dict = {"gemm_before": gemm_rate("fp32", torch.device("cpu"), repeats=3)}
        load_before = list(os.getloadavg())
        times = interleaved_times(steps, rounds, warmup)
        result["gemm_after"] = gemm_rate("fp32", torch.device("cpu"), repeats=3)
        result["load_average_before"], result["load_average_after"] = load_before, list(os.getloadavg())
        peaks = [live_tensor_peak(lambda s=s: s(0))["live_peak_bytes"] if live_peak else None for s in steps]
    items = sum(int(b["num_real_graphs"]) for b in batches) / len(batches)
    entries = []
    for v, t, peak in zip(variants, times, peaks):
        entry = {"name": v.name, "variant": v._asdict(), "seconds": t, "median_s": statistics.median(t),
                 "molecules_per_s": items / statistics.median(t),
                 "ratio": ratio_summary(t, times[0], resamples=resamples, seed=seed), "live_peak_bytes": peak}
        if peak is not None and peaks[0]:
            entry["live_peak_ratio"] = peak / peaks[0]
        entries.append(entry)
    result["variants"] = entries
    return result


def _peak_change(ratio: float) -> str:
    """A variant's live peak over the baseline's, in words: ``"2.50x lower"`` or ``"1.30x higher"``."""
    return f"{1 / ratio:.2f}x lower" if ratio < 1 else f"{ratio:.2f}x higher"


def markdown(result: dict) -> str:
    """The result as a Markdown report: header, how it was measured, one row per variant."""
    m, s = result["machine"], result["settings"]
    gb, ga = result["gemm_before"], result["gemm_after"]
    lines = [f"# se3t benchmarks: paired step times ({result['name']})", "",
             f"- Machine: {m['cpu_model']} ({m['usable_cpus']} usable CPUs, {m['torch_threads']} torch threads); "
             f"load average {', '.join(f'{x:.1f}' for x in result['load_average_before'])} before, "
             f"{', '.join(f'{x:.1f}' for x in result['load_average_after'])} after",
             f"- Versions: torch {result['versions']['torch']}, se3t {result['versions'].get('se3t')} (git "
             f"{result['versions'].get('git_commit')})",
             f"- Created {result['created']} by `{result['command']}`",
             f"- Dense fp32 GEMM (n=2048): {gb['flops_per_s'] / 1e9:.1f} GFLOP/s before, "
             f"{ga['flops_per_s'] / 1e9:.1f} after",
             f"- Model {s['model']}, level {s['level']} (where a variant names none), batch {s['batch_size']} "
             f"({s['data']}), "
             f"{s['rounds']} rounds after {s['warmup']} warm-up",
             "",
             "Each round runs one step of every variant, alternating the order; ratio: the median over rounds of the "
             f"round's step time over the baseline's (`{result['variants'][0]['name']}`), with a "
             f"{100 * result['variants'][0]['ratio']['interval_level']:.0f} % bootstrap interval over rounds and "
             "the smallest and largest round. Live peak: the most bytes of tensors alive at once in one profiled "
             "step (as the suite's).", "",
             "| variant | median step | throughput | time ratio | interval | min - max | live peak | peak ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for e in result["variants"]:
        r, peak = e["ratio"], e["live_peak_bytes"]
        lines.append(f"| `{e['name']}` | {1e3 * e['median_s']:,.0f} ms | {e['molecules_per_s']:.1f} mol/s | "
                     f"{r['median']:.3f} | {r['interval_low']:.3f} - {r['interval_high']:.3f} | "
                     f"{r['min']:.3f} - {r['max']:.3f} | "
                     + ("-" if peak is None else f"{peak / 2 ** 20:.2f} MiB") + " | "
                     + (_peak_change(e["live_peak_ratio"]) if e is not result["variants"][0]
                        and e.get("live_peak_ratio") else "-") + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.paired", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_arguments(p, num_batches=4)
    p.add_argument("--variants", default="default,oib,low,low+oib",
                   help="comma-separated variants, the first the baseline (default: default,oib,low,low+oib)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--level", default="EDGE_FRAME")
    p.add_argument("--model", default="paper", choices=("paper", "tiny"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--no-live-peak", action="store_true", help="skip the profiled step per variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--name", default=None, help="output file stem (default cpu-<threads>core-paired)")
    args = p.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variants.split(",")]
    except ValueError as err:
        p.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    batches, info = batches_from_args(args, args.num_batches, seed=args.seed)
    threads = torch.get_num_threads()
    name = args.name or f"cpu-{threads}core-paired"
    result = {"suite": "paired", "name": name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m benchmarks.paired " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(torch.device("cpu"), threads), "versions": versions(),
              "settings": {"model": args.model, "level": args.level, "batch_size": args.batch_size,
                           "num_batches": args.num_batches, "rounds": args.rounds, "warmup": args.warmup,
                           "seed": args.seed, "data": info.get("source")}}
    result.update(paired(variants, batches, config=TINY_CONFIG if args.model == "tiny" else PAPER_CONFIG,
                         level=args.level, rounds=args.rounds, warmup=args.warmup, seed=args.seed,
                         live_peak=not args.no_live_peak))
    args.out.mkdir(parents=True, exist_ok=True)
    _dump(result, args.out / f"{name}.json")
    text = markdown(result)
    (args.out / f"{name}.md").write_text(text)
    print(text, flush=True)
    return result


if __name__ == "__main__":
    main()
