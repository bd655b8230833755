"""Running one benchmark cell: in a fresh child process (default), timing loop, peak memory, failures as data.

A cell is a function ``f(**kwargs) -> dict`` named ``"module:function"``. With isolation, each cell runs in a
``spawn``-ed child process, so CPU peak memory is the child's own resident high-water mark (nothing left over
from earlier cells in the allocator) and a crash, an out-of-memory kill or a time-out only loses that cell: it is
recorded with its status and reason, never dropped.
"""
from __future__ import annotations

import gc
import importlib
import multiprocessing
import os
import resource
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .machine import sync

__all__ = ["run_cell", "PeakMemory", "live_tensor_peak", "profiled_events", "cpu_allocations", "time_steps",
           "latency_stats", "STATUSES", "is_oom"]

#: ok: measured; oom: out of memory; timeout: killed after the cell's time limit; error: raised;
#: skipped: not run, with the reason (e.g. identical to another cell); unsupported: cannot run here.
STATUSES = ("ok", "oom", "timeout", "error", "skipped", "unsupported")


# ---------------------------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset this process's resident high-water mark (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of what runs between :meth:`start` and :meth:`stop`.

    CUDA: ``torch.cuda.max_memory_allocated`` (peak) and its growth over the allocation at start. CPU: the
    process's peak resident set (``VmHWM``, reset at start through ``/proc/self/clear_refs``) and its growth over
    the resident set at start; where the reset is unavailable, ``ru_maxrss`` growth (a lower bound if the process
    peaked higher before start: hence one fresh process per cell).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.method = None
        self._base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated"
            return
        rss = _proc_status_kib("VmRSS")
        if rss is not None and _reset_hwm() and _proc_status_kib("VmHWM") is not None:
            self._base, self.method = rss * 1024, "VmHWM (reset at start) - VmRSS at start"
        else:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss growth"

    def stop(self) -> dict:
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method and self.method.startswith("VmHWM"):
            peak = _proc_status_kib("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_bytes": int(peak), "growth_bytes": int(max(peak - self._base, 0)), "base_bytes": int(self._base),
                "method": self.method}


def profiled_events(step: Callable[[], None]) -> list:
    """The profiler's events of one run of ``step()`` with memory events, the fused kernel on the calling thread (the
    profiler sees that thread's allocations only)."""
    from torch.profiler import ProfilerActivity, profile
    from se3t.nn import fused
    parallel, fused.PARALLEL_RANGES = fused.PARALLEL_RANGES, False
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    finally:
        fused.PARALLEL_RANGES = parallel
    return prof.profiler.kineto_results.events()


def cpu_allocations(events: list) -> List[Tuple[int, int]]:
    """``(start ns, bytes)`` of the CPU allocation (> 0) and free (< 0) events among ``events``, in time order."""
    return sorted((e.start_ns(), e.nbytes()) for e in events
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)


def live_tensor_peak(step: Callable[[], None]) -> dict:
    """Peak bytes of live CPU tensors while ``step()`` runs, over those live when it starts: what the step's
    tensors need, whatever the allocator keeps (the resident set of :class:`PeakMemory` also holds freed heap
    memory glibc has not returned, which can be larger than the tensors themselves; this is the CPU counterpart of
    CUDA's ``max_memory_allocated``). Measured from the allocation and free events of a profiled run of ``step``
    with the fused kernel on the calling thread (the profiler sees that thread's allocations only; with worker
    threads each would add its own chunk buffers, ~1-4 MiB)."""
    live = peak = 0
    for _, nbytes in cpu_allocations(profiled_events(step)):
        live += nbytes
        peak = max(peak, live)
    return {"live_peak_bytes": int(peak), "live_method": "torch.profiler memory events, one step on the calling "
            "thread (tensors allocated in the step, including its gradients)"}


# ---------------------------------------------------------------------------------------------- timing
def time_steps(step: Callable[[int], None], num_inputs: int, *, warmup: int, repeats: int, device: torch.device,
               max_seconds: Optional[float] = None) -> Dict[str, List]:
    """Run ``step(i)`` for ``warmup`` untimed then ``repeats`` timed iterations, cycling over ``num_inputs`` inputs.

    Each timed step is bracketed by device synchronisation. After ``max_seconds`` of timed work (at least one step)
    the loop stops early; the caller sees how many steps ran. Returns the input indices and seconds of the timed
    steps.
    """
    for i in range(warmup):
        step(i % num_inputs)
    sync(device)
    times, indices = [], []
    started = time.perf_counter()
    for j in range(repeats):
        i = (warmup + j) % num_inputs
        sync(device)
        t = time.perf_counter()
        step(i)
        sync(device)
        times.append(time.perf_counter() - t)
        indices.append(i)
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            break
    return {"seconds": times, "indices": indices}


def latency_stats(seconds: Sequence[float]) -> dict:
    """Median, p90, p99 (linear interpolation between samples), mean, min, max, std and count."""
    x = np.asarray(seconds, dtype=np.float64)
    return {"median": float(np.median(x)), "p90": float(np.percentile(x, 90)), "p99": float(np.percentile(x, 99)),
            "mean": float(x.mean()), "min": float(x.min()), "max": float(x.max()),
            "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0, "n": int(len(x))}


# ---------------------------------------------------------------------------------------------- isolation
def is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(err, oom_type):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "defaultcpuallocator" in text)


def _resolve(func: str) -> Callable[..., dict]:
    module, name = func.split(":")
    return getattr(importlib.import_module(module), name)


def se3t_source_hash() -> Optional[str]:
    """A short hash of the se3t sources this process imports (cells of one run may see different code when the
    checkout changes during the run)."""
    import hashlib

    try:
        import se3t
    except ImportError:
        return None
    root = os.path.dirname(os.path.abspath(se3t.__file__))
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name), "rb") as f:
                    h.update(name.encode() + f.read())
    return h.hexdigest()[:12]


def _execute(func: str, kwargs: dict, threads: Optional[int]) -> dict:
    if threads:
        torch.set_num_threads(threads)
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    try:
        result = _resolve(func)(**kwargs)
    except Exception as err:  # noqa: BLE001  (a failed cell is data)
        status = "oom" if is_oom(err) else "error"
        lines = traceback.format_exception_only(type(err), err)
        result = {"status": status, "reason": "".join(lines).strip()[-2000:]}
        if status == "error":
            result["traceback"] = traceback.format_exc()[-4000:]
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result.setdefault("status", "ok")
    result["wall_s"] = time.perf_counter() - t0
    result["se3t_source"] = se3t_source_hash()
    # other processes on the machine distort timings (threads of two processes on the same cores): say so
    result["load_average"] = {"before": load_before,
                              "after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    return result


def _child(func: str, kwargs: dict, threads: Optional[int], mem_limit: Optional[int], conn) -> None:
    if mem_limit:
        resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    conn.send(_execute(func, kwargs, threads))
    conn.close()


def run_cell(func: str, kwargs: dict, *, isolate: bool = True, threads: Optional[int] = None,
             timeout: Optional[float] = None, mem_limit: Optional[int] = None) -> dict:
    """Run the cell function ``"module:function"`` with ``kwargs``; always returns a result with a ``status``.

    ``isolate``: in a fresh ``spawn`` child process (``timeout`` seconds, address-space limit ``mem_limit`` bytes:
    exceeding it raises an allocation error that is recorded as ``oom``); otherwise in this process.
    """
    if not isolate:
        return _execute(func, kwargs, threads)
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(func, kwargs, threads, mem_limit, send), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    send.close()
    result = None
    try:
        if receive.poll(timeout):
            result = receive.recv()
    except EOFError:  # the child died before sending
        result = None
    if result is None:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
            return {"status": "timeout", "reason": f"killed after the cell time limit of {timeout:.0f} s",
                    "wall_s": time.perf_counter() - t0}
        proc.join(10)
        code = proc.exitcode
        status = "oom" if code == -9 else "error"
        why = ("killed by SIGKILL (most likely the kernel's out-of-memory killer)" if code == -9
               else f"child process exited with code {code} before reporting")
        return {"status": status, "reason": why, "wall_s": time.perf_counter() - t0}
    proc.join(30)
    if proc.is_alive():
        proc.kill()
    return result


def default_mem_limit(fraction: float = 0.8) -> Optional[int]:
    """``fraction`` of the machine's memory (bytes), for the peers' address-space limit; None where unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * fraction)
    except (ValueError, OSError, AttributeError):
        return None


def memory_probe(nbytes: int = 64 << 20, sleep_s: float = 0.0) -> dict:
    """A calibration cell: touch ``nbytes`` between :meth:`PeakMemory.start` and :meth:`~PeakMemory.stop` (and
    sleep ``sleep_s``). Its ``memory.growth_bytes`` should be close to ``nbytes``; the tests use it to check the
    measurement, the time limit and the out-of-memory path."""
    memory = PeakMemory(torch.device("cpu"))
    memory.start()
    block = torch.ones(nbytes // 4, dtype=torch.float32)
    total = float(block[:: 1 << 10].sum())
    del block
    time.sleep(sleep_s)
    return {"memory": memory.stop(), "checksum": total}
