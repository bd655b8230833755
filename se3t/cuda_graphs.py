"""Replay a step (a forward, or forward + loss + backward) as one CUDA graph per input signature.

At the sizes of molecular batches, eager PyTorch on a GPU is bound by launching kernels: a training step of the
paper model issues thousands of small kernels, each costing more host time than device time (on an H200 the step
took as long in bf16 as in fp32). A CUDA graph records the kernels once and replays them with one launch.
``se3t_data``'s padded batches come in a few static shapes (one per bucket), so an epoch needs one graph per
bucket.

What a replayed step does differently from eager:

* Checks of input values (NaN positions, index ranges, edges without an edge frame) cannot synchronise with the
  host inside a graph; they are recorded as device flags (:func:`se3t._validate.deferred_checks`) and verified
  after each replay (``check_values=True``): a failed check raises the same ``ValueError`` as eager, and the
  replay's outputs are not returned.
* The EDGE_FRAME level cannot fall back to the basis path for zero-length edges inside a graph: such an input
  raises instead (use ``FuseLevel.FULL`` for inputs with coincident points).
* ``low_memory=True`` splits the graph by host-side edge counts: not capturable.
* Outputs are the graph's own buffers: valid until the next call with the same input signature (clone to keep).

Gradients: the step may call ``backward()``; pass ``params`` and each replay leaves its gradients in ``p.grad``
(written, not accumulated), ready for an eager ``optimizer.step()`` outside the graph, so any optimizer and
``torch.amp.GradScaler`` work unchanged.
"""
from __future__ import annotations

import enum
import traceback
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ._validate import deferred_checks, raise_failed_checks

__all__ = ["CUDAGraphStep", "HostSyncDetector"]

#: non-tensor inputs a graph's signature may hold (compared by value)
_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, enum.Enum)


class _Captured:
    """One captured signature: static input buffers, the graph, its outputs, check flags and gradients."""

    def __init__(self, graph: "torch.cuda.CUDAGraph", static: List[Any], outputs: Any,
                 checks: List[Tuple[Tensor, str]], flags: Optional[Tensor], grads: List[Optional[Tensor]]):
        self.graph, self.static, self.outputs = graph, static, outputs
        self.checks, self.flags, self.grads = checks, flags, grads


class CUDAGraphStep:
    """``step = CUDAGraphStep(fn, params=model.parameters())``; ``out = step(*args, **kwargs)`` runs
    ``fn(*args, **kwargs)`` as a CUDA graph.

    The first call with a new input signature (the structure of ``args``/``kwargs``, each tensor's shape, dtype
    and device, and every non-tensor value) runs ``fn`` eagerly ``warmup`` times on a side stream, then captures
    it; every call copies the tensors into the graph's input buffers and replays it. ``fn`` must not
    synchronise with the host (no ``.item()``, boolean-mask indexing, or host-to-device copies of new data):
    se3t's layers and models are capturable (except ``low_memory=True``).

    Args:
        fn: the step. Tensors it reads besides its arguments (parameters, buffers) are read in place at each
            replay; Python-side state it changes is changed at capture only.
        params: tensors whose ``.grad`` the step's backward fills (the model's parameters): cleared before the
            warm-up and the capture, and pointed at the graph's gradient buffers after each replay.
        warmup: eager runs before capturing (lazily made constants, cuBLAS workspaces, autocast).
        check_values: verify the recorded input checks after each replay (one host synchronisation per call).
        max_graphs: the most signatures captured; one more raises (each graph keeps its own memory pool).

    Memory: each graph keeps a private pool of about one eager step's peak, plus copies of its inputs.
    """

    def __init__(self, fn: Callable[..., Any], *, params: Optional[Iterable[Tensor]] = None, warmup: int = 3,
                 check_values: bool = True, max_graphs: int = 16):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (eager runs before capturing), got {warmup!r}")
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be a positive int, got {max_graphs!r}")
        self.fn, self.warmup, self.check_values, self.max_graphs = fn, warmup, check_values, max_graphs
        self.params = list(params) if params is not None else []
        self._graphs: Dict[Any, _Captured] = {}

    @property
    def num_graphs(self) -> int:
        """How many input signatures have been captured."""
        return len(self._graphs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = (spec, tuple(_leaf_key(i, leaf) for i, leaf in enumerate(leaves)))
        captured = self._graphs.get(key)
        if captured is None:
            if len(self._graphs) >= self.max_graphs:
                raise RuntimeError(f"CUDAGraphStep already holds {self.max_graphs} graphs (max_graphs); a new input "
                                   "signature (shapes, dtypes or non-tensor values) would capture another: pad inputs "
                                   "to a few fixed shapes (se3t_data.BucketSampler) or raise max_graphs")
            captured = self._capture(leaves, spec)
            self._graphs[key] = captured
        with torch.no_grad():  # the buffers of inputs that require grad are leaves
            for buffer, leaf in zip(captured.static, leaves):
                if isinstance(leaf, Tensor) and buffer is not leaf:
                    buffer.copy_(leaf)
        captured.graph.replay()
        if self.check_values and captured.flags is not None:  # before the gradients are handed out
            raise_failed_checks(captured.checks, captured.flags.cpu())
        for p, g in zip(self.params, captured.grads):
            p.grad = g
        return captured.outputs

    def _clear_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def _capture(self, leaves: List[Any], spec: Any) -> _Captured:
        static = [leaf.detach().clone() if isinstance(leaf, Tensor) else leaf for leaf in leaves]
        for buffer, leaf in zip(static, leaves):
            if isinstance(leaf, Tensor):
                buffer.requires_grad_(leaf.requires_grad)
        args, kwargs = pytree.tree_unflatten(static, spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # eager runs: make lazy constants and workspaces, and check the inputs now
            for _ in range(self.warmup):
                self._clear_grads()
                self.fn(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        self._clear_grads()
        graph = torch.cuda.CUDAGraph()
        try:
            with deferred_checks() as checks, torch.cuda.graph(graph):
                outputs = self.fn(*args, **kwargs)
                flags = torch.stack([ok for ok, _ in checks]) if checks else None
        except RuntimeError as err:
            raise RuntimeError("capturing the step as a CUDA graph failed: some operation in it synchronises with "
                               "the host or copies new host data (see the error above; low_memory=True is not "
                               "capturable)") from err
        return _Captured(graph, static, outputs, list(checks), flags, [p.grad for p in self.params])


def _leaf_key(position: int, leaf: Any) -> Tuple:
    if isinstance(leaf, Tensor):
        if leaf.device.type != "cuda":
            raise ValueError(f"CUDAGraphStep needs CUDA tensors: input {position} is on {leaf.device}")
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.requires_grad)
    if not isinstance(leaf, _PLAIN):
        raise TypeError(f"CUDAGraphStep inputs are tensors and plain values (int, float, bool, str, None, dtype, "
                        f"device) in tuples, lists and dicts; input {position} is a {type(leaf).__name__} (pass "
                        f"its tensors, e.g. a PaddedBatch's model_inputs(), y and graph_mask)")
    return ("value", leaf)


class HostSyncDetector(TorchDispatchMode):
    """``with HostSyncDetector() as d: fn()`` lists in ``d.found`` the ops of ``fn`` that CUDA graph capture refuses
    and a CPU run can see: reading a value on the host (``.item()``, ``int(t)``, ``bool(t)``, ``nonzero``, boolean-mask
    indexing) and tensors made from Python data (``torch.tensor``, ``new_tensor``: on a GPU, a host-to-device copy).
    Each entry is ``(op, innermost frame outside torch)``. Run ``fn`` once before (lazily made constants are made
    once, outside any graph). It cannot see copies of existing CPU tensors to a device: on CPU there are none."""

    OPS = ("_local_scalar_dense", "nonzero", "is_nonzero", "lift_fresh", "masked_select", "unique", "equal")

    def __init__(self):
        super().__init__()
        self.found: List[Tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        masked = name in ("index", "index_put", "index_put_") and any(  # boolean-mask indexing: a nonzero inside
            isinstance(i, Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if masked or any(name.startswith(op) for op in self.OPS):
            frames = [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_stack()
                      if "/torch/" not in f.filename and not f.filename.endswith("cuda_graphs.py")]
            self.found.append(("nonzero" if masked else name, frames[-1] if frames else "?"))
        return func(*args, **(kwargs or {}))
