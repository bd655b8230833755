"""The se3t measurement of one cell (runs inside the cell's process): build, check equivariance, time, measure.

Inputs are plain dicts of tensors (see :mod:`benchmarks.data`) so the child process needs no data package:

``node_feats [N, Fn]``, ``pos [N, 3]``, ``edge_index [2, E]``, ``edge_feats [E, Fe]`` (may have ``Fe = 0``),
``graph_index [N]``, ``num_graphs``, ``graph_mask [G]``, ``node_mask [N]``, ``y`` (``[G]`` for graph targets,
``[N]`` for node targets), ``num_real_graphs``, ``num_real_nodes``, ``num_real_edges``.

With ``compile_model=True`` the timed model is ``torch.compile(model, dynamic=False)``: padded batches come in a few
static shapes, so each distinct shape compiles once, in a first step per shape that runs before the warm-up and the
timed steps (its wall time, the shapes and dynamo's graph and graph-break counts go to ``compile_stats``). Each
compiled cell compiles into a fresh inductor cache folder, so the first steps pay the whole compilation whatever
earlier runs left in the machine's cache. The equivariance check and the FLOP count use the eager model.
"""
from __future__ import annotations

import contextlib
import math
import tempfile
import time
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F

import se3t
import se3t.runtime
from se3t import Fiber
from se3t.runtime.optim import StepInBackward, build_optimizer

from .flops import model_flops
from .machine import gemm_rate, precision_context, sync
from .runner import PeakMemory, latency_stats, live_tensor_peak, time_steps

__all__ = ["build_model", "train_optimizer", "se3t_cell", "model_inputs", "shape_key"]


def build_model(kind: str, config: dict, fuse_level: str, low_memory: bool, seed: int = 0) -> torch.nn.Module:
    """``kind="pooled"``: :class:`se3t.SE3TransformerPooled` (graph targets); ``"nodes"``: :class:`se3t.SE3Transformer`
    with per-node degree-0 outputs. ``config`` holds the constructor arguments (fibers as ``{degree: channels}``)."""
    cfg = {k: (Fiber({int(d): c for d, c in v.items()}) if k.startswith("fiber_") else v) for k, v in config.items()}
    torch.manual_seed(seed)  # the same weights in every cell: fusion levels and low-memory share parameters
    if kind == "pooled":
        return se3t.SE3TransformerPooled(**cfg, fuse_level=fuse_level, low_memory=low_memory)
    if kind == "nodes":
        return se3t.SE3Transformer(**cfg, return_type=0, fuse_level=fuse_level, low_memory=low_memory)
    raise ValueError(f"unknown model kind {kind!r}")


def train_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The benchmarks' training optimizer: the trainer's AdamW (its fused kernel where it runs), lr 2e-3, weight
    decay 0.1, betas (0.9, 0.999)."""
    return build_optimizer("adam", model.parameters(), lr=2e-3, weight_decay=0.1, momentum=0.9)


def model_inputs(batch: dict) -> dict:
    inputs = dict(node_feats={0: batch["node_feats"][..., None]}, edge_index=batch["edge_index"], pos=batch["pos"],
                  graph_index=batch["graph_index"], num_graphs=batch["num_graphs"])
    if batch["edge_feats"].shape[1]:
        inputs["edge_feats"] = {0: batch["edge_feats"][..., None]}
    return inputs


def shape_key(batch: dict) -> tuple:
    """What a ``dynamic=False`` compiled model specialises on: padded nodes, padded edges, graphs (padded)."""
    return int(batch["pos"].shape[0]), int(batch["edge_index"].shape[1]), int(batch["num_graphs"])


def _to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _prediction(model, kind: str, batch: dict, inputs: Optional[dict] = None) -> torch.Tensor:
    """Real outputs only: ``[real graphs]`` or ``[real nodes]``."""
    out = model(**(inputs or model_inputs(batch)))
    if kind == "pooled":
        return out[batch["graph_mask"]].float().reshape(-1)
    return out[batch["node_mask"]].float().reshape(-1)


def _accuracy(model, kind: str, batch: dict, precision: str, device: torch.device, fuse_level: str) -> dict:
    """Equivariance error of the model's output at this precision and level, and its deviation from fp32 NONE."""
    model.eval()
    b = _to(batch, device)
    base = model_inputs(b)

    def fn(node_feats, pos, edge_feats):
        inputs = dict(base, node_feats=node_feats, pos=pos)
        if edge_feats:
            inputs["edge_feats"] = edge_feats
        with precision_context(precision, device):
            return _prediction(model, kind, b, inputs)[:, None]  # [M, 1]: invariant (degree-0) outputs

    errors = se3t.testing.equivariance_error(fn, base["node_feats"], base["pos"], base.get("edge_feats"),
                                             output_degree=0, num_rotations=3, seed=0)
    with torch.no_grad():
        out = fn(base["node_feats"], base["pos"], base.get("edge_feats")).double()
        model.set_fuse_level("NONE")
        with precision_context("fp32", device):
            ref = _prediction(model, kind, b)[:, None].double()
        model.set_fuse_level(fuse_level)
    scale = ref.abs().max().clamp_min(1e-30)
    model.train()
    return {"max_rel_error": max(errors.values()), "per_degree": {str(d): e for d, e in errors.items()},
            "rel_dev_vs_fp32_none": float((out - ref).abs().max() / scale), "num_graphs": int(b["num_real_graphs"]),
            "num_nodes": int(b["num_real_nodes"]), "rotations": 3}


def _dynamo_counts() -> Dict[str, int]:
    """Dynamo's graphs compiled, graph breaks met while tracing and frames it stopped recompiling (over
    ``torch._dynamo.config.recompile_limit``: they run eagerly), so far in this process (or since a reset)."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "recompile_limit_hits": int(sum(n for msg, n in counters["unimplemented"].items()
                                            if "recompile limit" in str(msg).lower()))}


def _graph_break_reasons(limit: int = 5) -> Dict[str, int]:
    """The most frequent graph-break reasons (first line of each, truncated) and how often tracing met them."""
    from torch._dynamo.utils import counters

    reasons: Dict[str, int] = {}
    for reason, n in counters["graph_break"].most_common(limit):
        line = str(reason).strip().splitlines()[0][:200] if str(reason).strip() else "?"
        reasons[line] = reasons.get(line, 0) + int(n)
    return reasons


def _compile(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(model, dynamic=False)`` with dynamo's caches and counters cleared, so that what the cell
    records counts this model only (cells may share a process with ``--no-isolate``)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return torch.compile(model, dynamic=False)


@contextlib.contextmanager
def _fresh_compile_cache(enabled: bool) -> Iterator[None]:
    """A new, empty inductor cache folder while compiled code is built (removed afterwards): compilation is timed
    cold, as on a machine's first run, not as a load from the on-disk caches of earlier runs."""
    if not enabled:
        yield
        return
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    with tempfile.TemporaryDirectory(prefix="se3t-inductor-") as folder, temporary_cache_dir(folder):
        yield


def _first_step_per_shape(step: Callable[[int], None], batches: List[dict], device: torch.device) -> Dict:
    """Run ``step`` once on the first batch of every distinct shape (each compiles one set of graphs), timing each:
    afterwards no timed step meets a new shape."""
    first: Dict[tuple, int] = {}
    for i, b in enumerate(batches):
        first.setdefault(shape_key(b), i)
    seconds = []
    for i in first.values():
        sync(device)
        t = time.perf_counter()
        step(i)
        sync(device)
        seconds.append(time.perf_counter() - t)
    return {"shapes": len(first), "shape_list": sorted(first), "first_steps_s": seconds,
            "first_steps_total_s": sum(seconds)}


def _graphed_step(mode: str, run_model, kind: str, dev_batches: List[dict], inputs: List[dict], precision: str,
                  dev: torch.device, opt, scaler):
    """The cell's step with the forward (train: + L1 loss + backward) replayed by a :class:`se3t.CUDAGraphStep`;
    the optimizer (and GradScaler) step eagerly. Returns ``(step, graphed)``."""
    if mode == "train":
        def forward_backward(inp: dict, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            # the eager cell's L1 loss over real outputs, without boolean indexing (a host sync)
            with precision_context(precision, dev):
                pred = run_model(**inp).float().reshape(-1)
            loss = ((pred - y.float()).abs() * mask).sum() / mask.sum().clamp_min(1)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            return loss.detach()

        graphed = se3t.CUDAGraphStep(forward_backward, params=list(run_model.parameters()))

        def step(i: int) -> None:
            b = dev_batches[i]
            graphed(inputs[i], b["y"], b["graph_mask"] if kind == "pooled" else b["node_mask"])
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        return step, graphed

    def forward(inp: dict) -> torch.Tensor:
        with torch.inference_mode(), precision_context(precision, dev):
            return run_model(**inp)

    graphed = se3t.CUDAGraphStep(forward)
    return (lambda i: graphed(inputs[i])), graphed


def _nbytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))


def _training_state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer, growth: int) -> Dict[str, int]:
    """What of a training step's memory is not activations: parameters (in the base), gradients and the optimizer's
    state (created in the first step, so inside the measured growth). ``activation_growth_bytes``: the growth less
    gradients and optimizer state, i.e. activations, workspaces and what the allocator keeps (CPU resident set)."""
    grads = _nbytes(p.grad for p in model.parameters())
    state = _nbytes(v for st in opt.state.values() for v in st.values())
    return {"parameter_bytes": _nbytes(model.parameters()), "gradient_bytes": grads, "optimizer_state_bytes": state,
            "activation_growth_bytes": max(growth - grads - state, 0)}


def accuracy_cell(*, kind: str, config: dict, eq_batch: dict, precision: str, fuse_level: str, device: str,
                  scatter_backend: str, reason: str, seed: int = 0, **extra) -> Dict:
    """A cell too slow to time here (e.g. bf16 emulated on a CPU without native bf16): still measure what the
    precision does to the model's output (equivariance error, deviation from fp32 NONE) on the small equivariance
    batch, and record the cell as ``skipped`` with ``reason``. ``extra`` is recorded as given."""
    dev = torch.device(device)
    model = build_model(kind, config, fuse_level, False, seed).to(dev)
    with se3t.scatter.use_backend(scatter_backend):
        accuracy = _accuracy(model, kind, eq_batch, precision, dev, fuse_level)
    return {"status": "skipped", "reason": reason, "num_parameters": sum(p.numel() for p in model.parameters()),
            "equivariance": accuracy, **extra}


def se3t_cell(*, kind: str, config: dict, batches: List[dict], eq_batch: Optional[dict], mode: str, fuse_level: str,
              precision: str, low_memory: bool, scatter_backend: str, device: str, warmup: int, repeats: int,
              max_seconds: Optional[float] = None, seed: int = 0, item: str = "graphs",
              measure_gemm: bool = True, gemm_size: int = 2048, compile_model: bool = False,
              cuda_graphs: bool = False, optimizer_in_backward: bool = False,
              return_freed_memory: bool = False) -> Dict:
    """Measure one cell: ``mode`` ``"train"`` (forward + L1 loss + backward + AdamW step) or ``"infer"``;
    ``optimizer_in_backward``: the AdamW step made per parameter during backward
    (:class:`se3t.runtime.optim.StepInBackward`: no step holds all gradients); ``return_freed_memory``: glibc's
    malloc gives freed tensors back to the system (:func:`se3t.runtime.return_freed_memory`, as ``se3t train
    --return_freed_memory`` does), set before anything else in the cell's process;
    ``compile_model``: time ``torch.compile(model, dynamic=False)`` (see the module docstring); ``cuda_graphs``:
    replay the forward (+ loss + backward) as a :class:`se3t.CUDAGraphStep`, one graph per padded batch shape
    captured before the timed steps; the optimizer steps eagerly."""
    dev = torch.device(device)
    if cuda_graphs and (dev.type != "cuda" or low_memory or compile_model):
        raise ValueError("cuda_graphs needs a CUDA device, low_memory off and compile off")
    if optimizer_in_backward and (mode != "train" or precision == "fp16" or cuda_graphs):
        raise ValueError("optimizer_in_backward needs training without fp16 loss scaling or CUDA graphs")
    if return_freed_memory and not se3t.runtime.return_freed_memory():
        raise ValueError("return_freed_memory needs glibc's malloc")
    model = build_model(kind, config, fuse_level, low_memory, seed).to(dev)
    result: Dict = {"num_parameters": sum(p.numel() for p in model.parameters())}
    with se3t.scatter.use_backend(scatter_backend), _fresh_compile_cache(compile_model):
        if eq_batch is not None:  # always the eager model: compiling does not change what it computes
            result["equivariance"] = _accuracy(model, kind, eq_batch, precision, dev, fuse_level)
        run_model = _compile(model) if compile_model else model
        dev_batches = [_to(b, dev) for b in batches]
        inputs = [model_inputs(b) for b in dev_batches]
        training = mode == "train"
        if training:
            model.train()
            opt = train_optimizer(model)
            scaler = torch.amp.GradScaler(dev.type) if precision == "fp16" else None
            in_backward = StepInBackward(opt) if optimizer_in_backward else None

            def eager_step(i: int) -> None:
                b = dev_batches[i]
                opt.zero_grad(set_to_none=True)
                with precision_context(precision, dev):
                    pred = _prediction(run_model, kind, b, inputs[i])
                mask = b["graph_mask"] if kind == "pooled" else b["node_mask"]
                loss = F.l1_loss(pred, b["y"][mask].float())
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    if in_backward is None:
                        opt.step()
        else:
            model.eval()

            def eager_step(i: int) -> None:
                with torch.inference_mode(), precision_context(precision, dev):  # compiles under it too
                    run_model(**inputs[i])

        step = eager_step
        if cuda_graphs:
            step, graphed = _graphed_step(mode, run_model, kind, dev_batches, inputs, precision, dev,
                                          opt if training else None, scaler if training else None)
        if measure_gemm:  # the machine's GEMM rate now, in this process and precision: the utilisation ceiling
            result["gemm"] = gemm_rate(precision, dev, n=gemm_size, repeats=3)
        memory = PeakMemory(dev)
        memory.start()  # compiling counts towards peak memory: a compiled run needs that memory too
        if compile_model:
            stats = _first_step_per_shape(step, dev_batches, dev)
            before = _dynamo_counts()
        if cuda_graphs:  # capture every shape's graph before timing (counted in peak memory)
            result["cuda_graph_stats"] = dict(_first_step_per_shape(step, dev_batches, dev),
                                              graphs=graphed.num_graphs)
        timing = time_steps(step, len(dev_batches), warmup=warmup, repeats=repeats, device=dev,
                            max_seconds=max_seconds)
        result["memory"] = memory.stop()
        if training:
            result["memory"].update(_training_state_bytes(model, opt, result["memory"]["growth_bytes"]))
        if dev.type == "cpu" and not compile_model:  # CUDA's peak is already of live tensors
            result["memory"].update(live_tensor_peak(lambda: step(timing["indices"][0])))
        if compile_model:
            after = _dynamo_counts()
            stats.update(after, graphs_compiled_after_first_steps=after["unique_graphs"] - before["unique_graphs"],
                         graph_break_reasons=_graph_break_reasons())
            result["compile_stats"] = stats
    sync(dev)
    seconds, used = timing["seconds"], [batches[i] for i in timing["indices"]]
    total = sum(seconds)
    count_key = "num_real_graphs" if item == "graphs" else "num_real_nodes"
    items = sum(int(b[count_key]) for b in used)
    result["latency_s"] = latency_stats(seconds)
    result["throughput"] = {"value": items / total, "unit": "mol/s" if item == "graphs" else "points/s"}
    result["repeats_run"] = len(seconds)
    result["items_per_step"] = items / len(seconds)
    result["nodes_per_step"] = sum(int(b["num_real_nodes"]) for b in used) / len(seconds)
    result["edges_per_step"] = sum(int(b["num_real_edges"]) for b in used) / len(seconds)
    result["padded_shapes"] = sorted({(int(b["pos"].shape[0]), int(b["edge_index"].shape[1]), int(b["num_graphs"]))
                                      for b in used})
    flops = {}
    for order in ("pairwise", "fused"):
        per_step = [model_flops(model, int(b["num_real_nodes"]), int(b["num_real_edges"]), int(b["num_real_graphs"]),
                                training=training, order=order).total for b in used]
        flops[order] = {"per_step": sum(per_step) / len(per_step), "per_item": sum(per_step) / max(items, 1),
                        "achieved_flops_per_s": sum(per_step) / total}
    result["flops"] = flops
    if not all(math.isfinite(s) for s in seconds):
        raise RuntimeError("non-finite timing")
    return result
