"""What ran the benchmark (machine, versions), precision contexts, and the machine's own dense GEMM rate."""
from __future__ import annotations

import contextlib
import os
import platform
import re
import time
from typing import Iterator, Optional

import numpy as np
import torch

__all__ = ["PRECISIONS", "precision_supported", "precision_context", "machine_info", "versions", "device_tag",
           "gemm_rate", "resolve_device", "sync"]

#: every precision the suites know; each maps to how matmuls run.
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
_CUDA_ONLY = {"tf32": "TF32 exists on CUDA (Ampere+) only", "fp16": "AMP fp16 is measured on CUDA only"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precision_supported(precision: str, device: torch.device) -> Optional[str]:
    """None when ``precision`` can run on ``device``, else why not."""
    if precision not in PRECISIONS:
        return f"unknown precision {precision!r}"
    if device.type != "cuda" and precision in _CUDA_ONLY:
        return _CUDA_ONLY[precision]
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU does not support bf16"
    return None


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Matmul settings and autocast for one precision: fp32 (TF32 off), tf32 (TF32 on), fp16/bf16 (autocast)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        if precision in ("fp16", "bf16"):
            dtype = torch.float16 if precision == "fp16" else torch.bfloat16
            with torch.autocast(device_type=device.type, dtype=dtype):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile",
                                           "avx512_vnni", "avx_vnni"})
    except OSError:
        pass
    return []


def _mem_total() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info(device: torch.device, threads: int) -> dict:
    info = {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": threads,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_bytes": _mem_total(),
        "platform": platform.platform(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "memory_bytes": props.total_memory,
                       "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}
    return info


def versions() -> dict:
    import sys

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    for name in ("e3nn", "se3t", "se3t_data", "matplotlib", "se3_transformer_pytorch", "torch_scatter"):
        try:
            from importlib.metadata import version

            out[name] = version(name.replace("_", "-")) if name != "se3t_data" else version("se3t")
        except Exception:  # noqa: BLE001  (not installed)
            out[name] = None
    try:
        import se3t

        out["se3t"] = se3t.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        import subprocess

        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "se3t"], capture_output=True, text=True,
                               timeout=5, cwd=os.path.dirname(os.path.abspath(__file__)))
        if sha.returncode == 0:
            out["git_commit"] = sha.stdout.strip() + ("+dirty-se3t" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def device_tag(device: torch.device, threads: int) -> str:
    """A file-name-safe name of the machine: ``cpu-2core`` or ``nvidia-h100-80gb-hbm3``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"cpu-{threads}core"


def gemm_rate(precision: str, device: torch.device, n: int = 2048, repeats: int = 5, warmup: int = 2,
              max_seconds: float = 30.0, max_matmul_seconds: float = 2.0) -> dict:
    """Dense ``n x n`` matmul rate (FLOP/s, median) in ``precision``: the machine's own ceiling for utilisation.

    fp32 runs float32 with TF32 off, tf32 float32 with TF32 on, fp16/bf16 run half-precision tensors (what
    autocast feeds the matmuls). Where one ``n x n`` matmul would take longer than ``max_matmul_seconds``
    (formats the hardware emulates, e.g. bf16 on a CPU without bf16 instructions) ``n`` is halved, down to 512;
    stops early after ``max_seconds``.
    """
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    small = min(n, 512)
    probe = _gemm_times(small, dtype, precision, device, repeats=1, warmup=1, max_seconds=max_seconds)
    rate = 2.0 * small ** 3 / probe[0]
    while n > 512 and 2.0 * n ** 3 / rate > max_matmul_seconds:
        n //= 2
    times = _gemm_times(n, dtype, precision, device, repeats, warmup, max_seconds)
    median = float(np.median(times))
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "flops_per_s": 2.0 * n ** 3 / median,
            "median_s": median, "samples": len(times), "precision": precision}


def _gemm_times(n: int, dtype, precision: str, device: torch.device, repeats: int, warmup: int,
                max_seconds: float) -> list:
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    times = []
    start = time.perf_counter()
    with precision_context("tf32" if precision == "tf32" else "fp32", device):
        for i in range(warmup + repeats):
            sync(device)
            t = time.perf_counter()
            torch.mm(a, b, out=out)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t)
            if time.perf_counter() - start > max_seconds and times:
                break
    return times
