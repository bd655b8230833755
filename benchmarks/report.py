"""Rendering result files: Markdown tables, PNG plots, two files compared as ratios, the README table."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

__all__ = ["markdown", "plot", "compare", "readme_table", "cell_key", "fmt_bytes", "utilisation"]

_KEY_FIELDS = ("suite", "model", "mode", "fuse_level", "precision", "low_memory", "optimizer_in_backward",
               "return_freed_memory", "compile", "cuda_graphs", "batch_size", "scatter_backend", "sweep", "num_points",
               "max_degree")
#: key fields left out of the key at this value: result files written before the field existed match these cells.
_KEY_DEFAULTS = {"compile": False, "cuda_graphs": False, "optimizer_in_backward": False, "return_freed_memory": False}


def cell_key(cell: dict) -> Tuple:
    """What identifies a cell across result files."""
    return tuple((k, cell.get(k)) for k in _KEY_FIELDS
                 if cell.get(k) is not None and not (k in _KEY_DEFAULTS and cell.get(k) == _KEY_DEFAULTS[k]))


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _num(x: Optional[float], digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 1000 or abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}" if abs(x) < 1e-3 else f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.0f}" if seconds >= 1 else f"{seconds * 1e3:.1f}"


def utilisation(cell: dict, result: dict, order: str = "pairwise") -> Optional[float]:
    """Achieved FLOP/s of the cell over the GEMM rate in its precision (the cell's own measurement if it made one,
    else the run's)."""
    flops = (cell.get("flops") or {}).get(order)
    gemm = cell.get("gemm") or (result.get("gemm") or {}).get(cell.get("precision"))
    if not flops or not gemm:
        return None
    return flops["achieved_flops_per_s"] / gemm["flops_per_s"]


def _lowmem(v) -> str:
    return "-" if v is None else ("on" if v else "off")


def _memory_mode(c: dict) -> str:
    """The low-memory column: low_memory, the optimizer stepped in backward and freed memory returned where they
    were."""
    return _lowmem(c.get("low_memory")) + (" + optimizer in backward" if c.get("optimizer_in_backward") else "") \
        + (" + freed memory returned" if c.get("return_freed_memory") else "")


def _variant(c: dict) -> str:
    """A plot series' suffix for the cell's execution options: low-memory, optimizer in backward, freed memory
    returned, compiled."""
    return (" low-mem" if c.get("low_memory") else "") + (" opt-in-bwd" if c.get("optimizer_in_backward") else "") \
        + (" freed-mem" if c.get("return_freed_memory") else "") + (" compiled" if c.get("compile") else "")


def _any_compiled(result: dict) -> bool:
    return any(c.get("compile") for c in result["cells"])


def _eager_twin(cell: dict, result: dict) -> Optional[dict]:
    """The cell of ``result`` with the same settings as the compiled ``cell`` but not compiled."""
    key = cell_key(dict(cell, compile=False))
    return next((c for c in result["cells"] if not c.get("compile") and cell_key(c) == key), None)


def _header(result: dict) -> List[str]:
    m, v = result["machine"], result["versions"]
    gpu = f", GPU {m['gpu']['name']}" if m.get("gpu") else ""
    lines = [f"# se3t benchmarks: `{result['suite']}` suite", "",
             f"- Machine: {m['cpu_model']} ({m['usable_cpus']} usable CPUs, {m['torch_threads']} torch threads, "
             f"{fmt_bytes(m.get('memory_bytes'))} RAM{gpu}); device `{m['device']}`; load average at start "
             f"{', '.join(f'{x:.1f}' for x in (m.get('load_average') or []))}",
             f"- Versions: python {v['python']}, torch {v['torch']}, e3nn {v.get('e3nn')}, se3t {v.get('se3t')}"
             + (f" (git {v['git_commit']})" if v.get("git_commit") else ""),
             f"- Created {result['created']} by `{result['command']}`"]
    if result.get("gemm"):
        rates = ", ".join(f"{p} {g['flops_per_s'] / 1e9:,.1f} GFLOP/s (n={g['n']})" for p, g in result["gemm"].items())
        lines.append(f"- Dense GEMM rate at the start of the run: {rates}")
    data = result["settings"].get("data_info")
    if data:
        for bs, info in data.items():
            lines.append(f"- Data (batch {bs}): " + ", ".join(f"{k} {v}" for k, v in info.items()
                                                                if k in ("source", "split", "molecules", "task")))
    return lines + [""]


def _row_common(c: dict, compile_column: bool = False, graphs_column: bool = False) -> List[str]:
    return [c.get("mode") or "-", c.get("fuse_level") or "-", c.get("precision") or "-", _memory_mode(c)] \
        + ([_lowmem(c.get("compile"))] if compile_column else []) \
        + ([_lowmem(c.get("cuda_graphs"))] if graphs_column else []) \
        + [str(c.get("batch_size") or "-"), c.get("scatter_backend") or "-"]


_REASONS: Dict[str, int] = {}


def _footnote(cell: dict) -> str:
    reason = (cell.get("reason") or "?").strip().splitlines()[-1]
    return f"note {_REASONS.setdefault(reason, len(_REASONS) + 1)}"


def _cells_table(result: dict) -> List[str]:
    compiled = _any_compiled(result)  # the compile column only in runs with compiled cells
    graphed = any(c.get("cuda_graphs") for c in result["cells"])  # likewise the CUDA graphs column
    cols = (["mode", "level", "precision", "low-mem"] + (["compile"] if compiled else [])
            + (["CUDA graphs"] if graphed else [])
            + ["batch", "scatter", "status", "throughput", "median ms", "p90 ms", "p99 ms", "peak mem", "mem growth",
               "act. growth", "live peak", "GFLOP/s", "% GEMM", "% GEMM (ref-fused)", "equiv. err", "dev vs fp32",
               "load"])
    extra = result["suite"] in ("scaling", "peers")
    if extra:
        cols = ["model", "sweep", "points", "edges", "L"] + cols if result["suite"] == "scaling" else ["model"] + cols
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for c in result["cells"]:
        if c["status"] in ("unsupported",):
            continue
        ok = c["status"] == "ok"
        lat = c.get("latency_s") or {}
        mem = c.get("memory") or {}
        tp = c.get("throughput") or {}
        fl = (c.get("flops") or {}).get("pairwise") or {}
        eq = c.get("equivariance") or {}
        u, uf = utilisation(c, result), utilisation(c, result, "fused")
        row = _row_common(c, compiled, graphed) + [
            c["status"] if ok else f"{c['status']} ({_footnote(c)})",
            f"{_num(tp.get('value'))} {tp.get('unit', '')}" if ok else "-",
            _ms(lat.get("median")), _ms(lat.get("p90")), _ms(lat.get("p99")),
            fmt_bytes(mem.get("peak_bytes")), fmt_bytes(mem.get("growth_bytes")),
            fmt_bytes(mem.get("activation_growth_bytes")), fmt_bytes(mem.get("live_peak_bytes")),
            _num(fl.get("achieved_flops_per_s", 0) / 1e9) if fl else "-",
            f"{100 * u:.1f}" if u is not None else "-", f"{100 * uf:.1f}" if uf is not None else "-",
            _num(eq.get("max_rel_error"), 2), _num(eq.get("rel_dev_vs_fp32_none"), 2),
            f"{c['load_average']['before'][0]:.1f}" if (c.get("load_average") or {}).get("before") else "-"]
        if result["suite"] == "scaling":
            row = [c.get("model"), c.get("sweep"), str(c.get("num_points")), str(c.get("num_edges")),
                   str(c.get("max_degree"))] + row
        elif result["suite"] == "peers":
            row = [c.get("model")] + row
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    return lines


def _compile_table(result: dict) -> List[str]:
    """Compiled cells against their eager twins: speedup, the compiling first steps, shapes, graphs, graph breaks."""
    cells = [c for c in result["cells"] if c.get("compile") and c["status"] not in ("unsupported", "skipped")]
    if not cells:
        return []
    lines = ["", "torch.compile (`dynamic=False`): each compiled cell against the eager cell with the same settings. "
                 "First steps: one step on the first batch of each distinct padded shape, before the warm-up; they "
                 "compile every graph and are excluded from the timings (and included in peak memory). Graphs: "
                 "graphs dynamo compiled in the cell (`unique_graphs`); graph breaks: breaks met while tracing (the "
                 "fused conv kernel is one by design); later: graphs compiled after the first steps (0: no timed "
                 "step recompiled).", "",
             "| mode | level | precision | low-mem | batch | scatter | eager | compiled | speedup | median ms eager | "
             "median ms compiled | first steps s | shapes | graphs | graph breaks | later |",
             "|" + "---|" * 16]
    for c in cells:
        eager = _eager_twin(c, result)
        tp = c["throughput"]["value"] if c["status"] == "ok" else None
        tp_eager = eager["throughput"]["value"] if eager and eager["status"] == "ok" else None
        st = c.get("compile_stats") or {}
        row = _row_common(c) + [
            f"{_num(tp_eager)} {eager['throughput']['unit']}" if tp_eager else (eager or {}).get("status", "-"),
            f"{_num(tp)} {c['throughput']['unit']}" if tp else f"{c['status']} ({_footnote(c)})",
            _ratio(tp_eager, tp),
            _ms(eager["latency_s"]["median"]) if tp_eager else "-", _ms(c["latency_s"]["median"]) if tp else "-",
            _num(st.get("first_steps_total_s")), str(st.get("shapes", "-")), str(st.get("unique_graphs", "-")),
            str(st.get("graph_breaks", "-")), str(st.get("graphs_compiled_after_first_steps", "-"))]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def markdown(result: dict) -> str:
    """The result file as a Markdown report: header, the table of every cell, cells not run, fits."""
    _REASONS.clear()
    lines = _header(result)
    lines += ["Throughput counts real molecules (or points) per second; latency is per step (train: forward + L1 loss "
              "+ backward + AdamW; infer: forward), warm-up excluded. Peak memory: CUDA peak allocated, CPU peak "
              "resident set of the cell's own process (growth: over the state before the first step, including the "
              "optimizer's state; act.: the growth less gradients and optimizer state, i.e. activations, workspaces "
              "and what the allocator keeps; live peak, CPU: the most bytes of tensors alive at once in one profiled "
              "step, over those alive before it, whatever the allocator keeps). GFLOP/s: useful matmul FLOPs of the "
              "model counted per degree pair (`benchmarks/flops.py`), over the measured time; % GEMM: of the dense "
              "GEMM rate measured in the same process and precision; ref-fused: the same time credited with the "
              "reference's fused-basis FLOP count (issue 7's 3.5 GFLOP per molecule and step). Equivariance error: "
              "worst relative error of the model's output under 3 random rotations and translations, at the cell's "
              "precision and level; dev vs fp32: relative deviation from the fp32 output at level NONE. Load: the "
              "machine's 1-minute load average when the cell started (above the thread count, other processes competed"
              " for the cores).", ""]
    lines += _cells_table(result)
    lines += _compile_table(result)
    if _REASONS:
        lines += [""] + [f"- note {n}: {reason}" for reason, n in _REASONS.items()]
    not_run = defaultdict(list)
    for c in result["cells"]:
        if c["status"] == "unsupported":
            not_run[c.get("reason") or "?"].append(" ".join(str(x) for x in _row_common(c)))
    if not_run:
        lines += ["", "Cells not run on this machine:"]
        for reason, rows in not_run.items():
            lines.append(f"- {reason}: {len(rows)} cells")
    if result.get("fits"):
        lines += ["", "| fit (y = a x^b) | exponent b | r² | points |", "|---|---|---|---|"]
        for name, f in result["fits"].items():
            lines.append(f"| {name} | {f['exponent']:.2f} | {f['r2']:.3f} | {f['points']} |")
    if result.get("notes"):
        lines += [""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- plots
def _ok(result: dict) -> List[dict]:
    return [c for c in result["cells"] if c["status"] == "ok"]


def _bar_chart(ax, groups: List[str], series: Dict[str, Dict[str, float]], ylabel: str, title: str) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ys = [values.get(g, 0.0) for g in groups]
        bars = ax.bar(xs, ys, width, label=name)
        for b, y in zip(bars, ys):
            if y:
                ax.annotate(f"{y:.3g}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if series:
        ax.legend(fontsize=7)


def _machine_line(result: dict) -> str:
    m = result["machine"]
    return (m["gpu"]["name"] if m.get("gpu") else f"{m['cpu_model']}, {m['torch_threads']} threads") + \
        f" - {result['created'][:10]}"


def plot(result: dict, out_dir: Path, stem: str) -> Dict[str, Path]:
    """PNG plots of the suite; returns name -> path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: Dict[str, Path] = {}
    ok = _ok(result)
    if result["suite"] in ("qm9", "peers"):
        modes = sorted({c["mode"] for c in ok})
        key = "fuse_level" if result["suite"] == "qm9" else "batch_size"
        fig, axes = plt.subplots(1, max(len(modes), 1), figsize=(6 * max(len(modes), 1), 4), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            cells = [c for c in ok if c["mode"] == mode]
            groups = list(dict.fromkeys(str(c[key]) for c in cells))
            series: Dict[str, Dict[str, float]] = defaultdict(dict)
            for c in cells:
                name = c["precision"] + _variant(c)
                if result["suite"] == "peers":
                    name = f"{c['model'].split('/')[-1]} {c['precision']}"
                if len({c.get("batch_size") for c in cells}) > 1 and result["suite"] == "qm9":
                    name += f" b{c['batch_size']}"
                series[name][str(c[key])] = c["throughput"]["value"]
            _bar_chart(axes[0][modes.index(mode)], groups, dict(series), f"throughput ({cells[0]['throughput']['unit']})",
                       f"{mode}: throughput by {'fusion level' if key == 'fuse_level' else 'batch size'}")
        fig.suptitle(_machine_line(result), fontsize=9)
        fig.tight_layout()
        paths["throughput"] = out_dir / f"{stem}-throughput.png"
        fig.savefig(paths["throughput"], dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(7, 4))
        cells = [c for c in ok if c["mode"] == "train"] or ok
        groups = list(dict.fromkeys(str(c[key]) for c in cells))
        series = defaultdict(dict)
        for c in cells:
            name = (f"{c['model'].split('/')[-1]} " if result["suite"] == "peers" else "") + c["precision"] \
                + _variant(c)
            series[name][str(c[key])] = c["memory"]["peak_bytes"] / 2 ** 30
        _bar_chart(ax, groups, dict(series), "peak memory (GiB)",
                   f"{cells[0]['mode'] if cells else ''}: peak memory by {key.replace('_', ' ')}")
        fig.suptitle(_machine_line(result), fontsize=9)
        fig.tight_layout()
        paths["memory"] = out_dir / f"{stem}-memory.png"
        fig.savefig(paths["memory"], dpi=110)
        plt.close(fig)
    if result["suite"] == "scaling":
        from .scaling import degree_fit_name, degree_levels  # noqa: PLC0415

        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for mode in sorted({c["mode"] for c in ok}):
            size = sorted((c for c in ok if c["mode"] == mode and c.get("sweep") == "size"),
                          key=lambda c: c["num_points"])
            fit = (result.get("fits") or {}).get(f"{mode}: time vs nodes")
            label = f"{mode}" + (f" (b = {fit['exponent']:.2f})" if fit else "")
            axes[0].loglog([c["num_points"] for c in size], [c["latency_s"]["median"] for c in size], "o-",
                           label=label)
            mfit = (result.get("fits") or {}).get(f"{mode}: memory growth vs nodes")
            axes[1].loglog([c["num_points"] for c in size], [max(c["memory"]["growth_bytes"], 1) / 2 ** 20
                                                             for c in size], "o-",
                           label=f"{mode}" + (f" (b = {mfit['exponent']:.2f})" if mfit else ""))
            levels = degree_levels(result)
            for level in levels:
                deg = sorted((c for c in ok if c["mode"] == mode and c.get("sweep") == "degree"
                              and c["fuse_level"] == level), key=lambda c: c["max_degree"])
                dfit = (result.get("fits") or {}).get(degree_fit_name(mode, level, levels))
                axes[2].loglog([c["max_degree"] + 1 for c in deg], [c["latency_s"]["median"] for c in deg], "o-",
                               label=f"{mode} {level}" + (f" (b = {dfit['exponent']:.2f})" if dfit else ""))
        axes[0].set(xlabel="points", ylabel="step time (s)", title="time vs points (radius graph, uniform density)")
        axes[1].set(xlabel="points", ylabel="peak memory growth (MiB)", title="memory vs points")
        axes[2].set(xlabel="max degree + 1", ylabel="step time (s)", title="time vs maximum degree")
        for ax in axes:
            ax.legend(fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
        fig.suptitle(_machine_line(result), fontsize=9)
        fig.tight_layout()
        paths["scaling"] = out_dir / f"{stem}-scaling.png"
        fig.savefig(paths["scaling"], dpi=110)
        plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------- compare
def _ratio(a: Optional[float], b: Optional[float]) -> str:
    if a is None or b is None or a == 0:
        return "-"
    return f"{b / a:.2f}x"


def compare(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> str:
    """Cells of two result files side by side, B / A ratios of throughput, median latency and peak memory."""
    def index(result: dict) -> Dict[Tuple, dict]:
        return {cell_key(c): c for c in result["cells"] if c["status"] != "unsupported"}

    ia, ib = index(a), index(b)
    lines = [f"# Compare `{name_b}` (B) against `{name_a}` (A)", "",
             f"- A: {_machine_line(a)}, se3t {a['versions'].get('se3t')} {a['versions'].get('git_commit', '')}",
             f"- B: {_machine_line(b)}, se3t {b['versions'].get('se3t')} {b['versions'].get('git_commit', '')}", "",
             "Ratios are B / A: throughput above 1 is faster in B, latency and memory below 1 are better in B.", "",
             "| cell | A throughput | B throughput | throughput B/A | median B/A | peak mem A | peak mem B | "
             "mem B/A |", "|---|---|---|---|---|---|---|---|"]
    for key in list(dict.fromkeys(list(ia) + list(ib))):
        ca, cb = ia.get(key), ib.get(key)
        label = " ".join(f"lowmem={_lowmem(v)}" if k == "low_memory" else "compiled" if k == "compile" else
                         "optimizer-in-backward" if k == "optimizer_in_backward" else f"{v}"
                         for k, v in key if k not in ("suite",))

        def tp(c):
            return c["throughput"]["value"] if c and c["status"] == "ok" else None

        def med(c):
            return c["latency_s"]["median"] if c and c["status"] == "ok" else None

        def mem(c):
            return c["memory"]["peak_bytes"] if c and c["status"] == "ok" else None

        def show(c):
            if c is None:
                return "missing"
            return f"{tp(c):.4g} {c['throughput']['unit']}" if c["status"] == "ok" else c["status"]

        lines.append(f"| {label} | {show(ca)} | {show(cb)} | {_ratio(tp(ca), tp(cb))} | {_ratio(med(ca), med(cb))} | "
                     f"{fmt_bytes(mem(ca))} | {fmt_bytes(mem(cb))} | {_ratio(mem(ca), mem(cb))} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- README
def readme_table(result: dict, source: str = "") -> str:
    """The README's results table: one row per (level, precision, low-memory, batch), train and infer side by side."""
    rows: Dict[Tuple, Dict[str, dict]] = {}
    for c in result["cells"]:
        if c["status"] in ("unsupported",) or (c["status"] == "skipped" and c.get("mode") == "infer"
                                               and c.get("low_memory")):
            continue
        level = c.get("fuse_level")
        if level and c.get("compile"):
            level += " + compile"
        key = (c.get("model"), level, c.get("precision"), _memory_mode(c), c.get("batch_size"),
               c.get("scatter_backend"))
        rows.setdefault(key, {})[c["mode"]] = c
    multi_backend = len({k[5] for k in rows}) > 1
    m = result["machine"]
    machine = m["gpu"]["name"] if m.get("gpu") else f"{m['cpu_model']}, {m['torch_threads']} threads"
    lines = [f"Measured on {machine} on {result['created'][:10]} with `{result['command']}`"
             + (f" (`{source}`)" if source else "") + ".", "",
             "| fusion level | precision | low memory | batch | " + ("scatter | " if multi_backend else "")
             + "train (mol/s) | inference (mol/s) | train peak memory | train live tensors | train % of GEMM | "
             "equivariance error |",
             "|---|---|---|---|" + ("---|" if multi_backend else "") + "---|---|---|---|---|---|"]
    for (model, level, precision, low, bs, backend), modes in rows.items():
        tr, inf = modes.get("train"), modes.get("infer")

        def tp(c):
            if c is None:
                return "-"
            return f"{c['throughput']['value']:.3g}" if c["status"] == "ok" else c["status"]

        # an accuracy-only cell (skipped for time) still carries the precision's equivariance error
        any_ok = next((c for c in (tr, inf) if c and c["status"] in ("ok", "skipped") and c.get("equivariance")),
                      None)
        u = utilisation(tr, result) if tr and tr["status"] == "ok" else None
        lines.append(f"| {level} | {precision} | {low} | {bs} | " + (f"{backend} | " if multi_backend else "")
                     + f"{tp(tr)} | {tp(inf)} | "
                     + f"{fmt_bytes(tr['memory']['peak_bytes']) if tr and tr['status'] == 'ok' else '-'} | "
                     + f"{fmt_bytes(tr['memory'].get('live_peak_bytes')) if tr and tr['status'] == 'ok' else '-'} | "
                     + f"{f'{100 * u:.0f} %' if u is not None else '-'} | "
                     + f"{_num(any_ok['equivariance']['max_rel_error'], 2) if any_ok else '-'} |")
    return "\n".join(lines) + "\n"
