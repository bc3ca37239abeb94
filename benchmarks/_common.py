"""What the benchmark scripts share: timing (from `_measure`), device tags and run metadata, JSON results, text
tables, plots, common flags, progress lines and fresh worker processes.

Each script imports this module (``import _common as common``) and keeps only its own cases; no script imports
another.  Results go to ``benchmarks/results/<stem>-<device>-<date>.json`` (and ``.png``) with ``<device>`` ``cpu``
or a GPU's short name (``h100``), see `device_tag`; older committed files keep their names (``cpu-2core``).
`time_call` is the one way to time a call: CUDA events on a GPU, ``perf_counter`` on the CPU (`_measure` says how
and why).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from _measure import (  # noqa: F401 - re-exported: the scripts import _common only
    MIB,
    QUIET,
    Timing,
    alloc_peak_mb,
    cpu_snapshot,
    exact_malloc,
    others_cores,
    per_call_s,
    proc_status_mb,
    rel_err,
    reset_peak_rss,
    time_call,
    wait_for_idle,
)
from tqdm import tqdm

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RESULT_MARK = "ATTNFUSE_BENCH_RESULT "  # the stdout line of a worker process that carries its result
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16",
          "fp32": "float32", "float32": "float32"}


# ---------------------------------------------------------------- command line, files, progress

def csv(kind: Callable[[str], Any]) -> Callable[[str], list]:
    """argparse type of a comma-separated list (``--seqs 512,1024``)."""
    return lambda text: [kind(x.strip()) for x in text.split(",") if x.strip()]


def add_common_args(p: argparse.ArgumentParser, worker: tuple[str, str, str]) -> None:
    """The flags of the scripts that measure in worker processes: idle wait, output, re-plot / re-measure, worker."""
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each measurement, wait up to this long for other processes to quiet down")
    p.add_argument("--out", default=str(RESULTS), help="output folder, or a .json path (the .png goes next to it)")
    p.add_argument("--from-json", metavar="PATH", help="re-make ratios, goals and the plot from a results JSON")
    p.add_argument("--rerun-busy", action="store_true",
                   help="with --from-json: measure again the results taken on a busy machine (or that failed)")
    p.add_argument("--worker", nargs=3, metavar=worker, help=argparse.SUPPRESS)


def check_choices(p: argparse.ArgumentParser, what: str, values: Sequence, allowed: Sequence) -> None:
    """Exit through ``p.error`` at the first of ``values`` not in ``allowed``, naming the choices."""
    for x in values:
        if x not in allowed:
            p.error(f"unknown {what} {x!r}; choose from {', '.join(allowed)}")


def rerun_busy(doc: dict[str, Any], run: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """``--from-json --rerun-busy``: replace each of ``doc["results"]`` that failed or ran while other processes
    kept ``QUIET`` cores busy by ``run(result)``, a new measurement of the same case."""
    doc["results"] = [run(r) if "error" in r or r.get("others_busy_cores", 0.0) >= QUIET else r
                      for r in doc["results"]]


def redo_from_json(args: argparse.Namespace, command_line: str, run: Callable[[dict[str, Any]], dict[str, Any]],
                   write: Callable[[dict[str, Any], pathlib.Path], None]) -> int:
    """``--from-json [--rerun-busy]``: the run's settings back into ``args``, the busy or failed results measured
    again by ``run(result)`` (`rerun_busy`), ``command_line`` recorded, and ``write(doc, path)`` in place."""
    json_path = pathlib.Path(args.from_json)
    doc = json.loads(json_path.read_text())
    for name, value in doc["setup"]["args"].items():
        setattr(args, name, value)
    if args.rerun_busy:
        rerun_busy(doc, run)
    doc.setdefault("later_commands", []).append(command_line)
    write(doc, json_path)
    return 0


def command(script: str, argv: Sequence[str] | None) -> str:
    """The command line a results file records: ``benchmarks/<script> <arguments>``."""
    return " ".join([f"benchmarks/{pathlib.Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


def json_path(out: str | os.PathLike, name: str) -> pathlib.Path:
    """``out`` if it names a .json file, else ``out/name``; its folder is created."""
    out = pathlib.Path(out)
    path = out if out.suffix == ".json" else out / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def replot(args: argparse.Namespace, report: Callable[[dict, pathlib.Path], None]) -> int:
    """``--from-json``: ``report(doc, png_path)`` of ``args.from_json`` into ``args.out`` (a folder or a .png path;
    default: next to the JSON).  Needs no GPU."""
    src = pathlib.Path(args.from_json)
    doc = json.loads(src.read_text())
    out = pathlib.Path(args.out) if args.out else src.parent
    png_path = out if out.suffix == ".png" else out / src.with_suffix(".png").name
    png_path.parent.mkdir(parents=True, exist_ok=True)
    report(doc, png_path)
    print(f"wrote {png_path}")
    return 0


def write_json(path: str | os.PathLike, doc: dict[str, Any], indent: int = 2) -> pathlib.Path:
    """Write a results document (its folder created; values JSON cannot hold written as text)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=indent, default=str) + "\n")
    return path


def save_results(doc: dict[str, Any], json_path: str | os.PathLike, plot: Any) -> pathlib.Path:
    """Write a results document and its figure (``plot(doc, png_path)``) next to it; print where they went."""
    json_path = write_json(json_path, doc)
    png_path = json_path.with_suffix(".png")
    plot(doc, png_path)
    print(f"wrote {json_path} and {png_path}")
    return json_path


def log(line: str) -> None:
    """Print a progress line to stdout (flushed) without tearing the tqdm bar that stderr may be showing."""
    with tqdm.external_write_mode():
        print(line, flush=True)


def progress(items: Sequence, desc: str, unit: str = "config") -> tqdm:
    """A tqdm bar over a benchmark's configurations, on stderr and only where stderr is a terminal."""
    return tqdm(items, desc=desc, unit=unit, disable=None)


def error_text(e: BaseException, limit: int | None = 500) -> str:
    """``Type: message`` on one line, at most ``limit`` characters: what a result row records of a failure."""
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}"[:limit] if msg else type(e).__name__


# ---------------------------------------------------------------- device, versions, machine

def today() -> str:
    return datetime.date.today().isoformat()


def gpu_tag(name: str) -> str:
    """Short name of a GPU: 'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA GeForce RTX 4090' -> 'rtx-4090'."""
    words = [w for w in re.findall(r"[a-z0-9]+", name.lower()) if w not in ("nvidia", "geforce", "tesla", "amd")]
    if not words:
        return "gpu"
    if words[0] in ("rtx", "gtx", "quadro", "radeon", "instinct") and len(words) > 1:
        return f"{words[0]}-{words[1]}"
    return words[0]


def device_name(device: Any = None) -> str:
    """``cpu``, or the short name (`gpu_tag`) of the first GPU; ``device`` None: the GPU if there is one."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu" if str(device).startswith("cpu") else gpu_tag(torch.cuda.get_device_name(0))


def device_tag(device: Any = None, date: str | None = None) -> str:
    """The device and date part of a results file name: ``cpu-2026-12-05``, ``h100-2026-12-05``."""
    return f"{device_name(device)}-{date or today()}"


def versions() -> dict[str, Any]:
    """torch, triton (None without it) and CUDA versions, for a results document."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda}


def machine_info() -> dict[str, Any]:
    """Platform, Python, torch, CPU model and count, memory, threads, transformers, GPU: a results document's
    ``machine``."""
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        found = re.search(r"model name\s*:\s*(.+)", pathlib.Path("/proc/cpuinfo").read_text())
        info["cpu_model"] = found.group(1).strip() if found else platform.processor()
        mem = re.search(r"MemTotal:\s*(\d+)", pathlib.Path("/proc/meminfo").read_text())
        info["mem_total_gib"] = round(int(mem.group(1)) / 2**20, 1) if mem else None
    except OSError:
        info["cpu_model"] = platform.processor()
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------- worker processes

def emit(result: dict[str, Any]) -> None:
    """A worker's last word: its result on one stdout line that `run_worker` finds."""
    print(RESULT_MARK + json.dumps(result), flush=True)


def run_worker(cmd: list[str], key: dict[str, Any], timeout: float | None = None, env: dict[str, str] | None = None,
               tail: int = 3) -> dict[str, Any]:
    """Run a ``--worker`` command line in a fresh process and return the result it `emit`-ted, or ``{**key,
    "error": ...}`` with the last ``tail`` lines of its stderr."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {**key, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    lines = (proc.stderr or proc.stdout).strip().splitlines()[-tail:]
    return {**key, "error": f"worker exited {proc.returncode}: " + " | ".join(lines)}


# ---------------------------------------------------------------- tables and summaries

def fmt(x: Any, spec: str = "{:.0f}") -> str:
    """A table cell: ``spec`` of ``x``, or "-" for None."""
    return "-" if x is None else spec.format(x)


def seq_label(seq: int) -> str:
    """1024 -> '1k', 1000 -> '1000'."""
    return f"{seq // 1024}k" if seq >= 1024 and seq % 1024 == 0 else str(seq)


def table(rows: Sequence[Sequence[str]], columns: Sequence[str], align: str = "left") -> str:
    """Text table: a header line and one line per row of cells, columns two spaces apart, cells left- (or
    right-) aligned, no trailing spaces."""
    lines = [tuple(columns), *map(tuple, rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    just = str.rjust if align == "right" else str.ljust
    return "\n".join("  ".join(just(c, w) for c, w in zip(line, widths)).rstrip() for line in lines)


def print_summary(text: str, doc: dict[str, Any], json_path: pathlib.Path, png_path: pathlib.Path) -> None:
    """The table, one line of ratios per row, the goals and where the files went."""
    print(text)
    for row in doc["ratios"]:
        print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print("goals:", json.dumps(doc["goals"]))
    print(f"wrote {json_path} and {png_path}")


def print_goals(goals: list[dict[str, Any]]) -> None:
    """One line per goal ``{"goal", "met" (None: not measured), "value"}``: PASS / FAIL with its ratio."""
    for g in goals:
        verdict = "not measured" if g["met"] is None else f"{'PASS' if g['met'] else 'FAIL'} ({g['value']}x)"
        print(f"goal {g['goal']}: {verdict}")


# ---------------------------------------------------------------- plots

@dataclass
class Line:
    """One line of a panel: (x, y) points, drawn in this style."""

    label: str
    points: list[tuple[float, float]]
    color: str | None = None
    marker: str = "o"
    linestyle: str = "-"


@dataclass
class Panel:
    """One axes of `plot`: lines against sequence length, ticks at ``xticks``."""

    lines: list[Line]
    xticks: list[int]
    title: str = ""
    ylabel: str = ""
    xlabel: str = "sequence length"


def figure(nrows: int, ncols: int, figsize: tuple[float, float]):
    """(fig, axes) of a grid of panels, axes indexed [row][col], with the file backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)


def save(fig, path: str | os.PathLike, title: str, rect: tuple | None = None, dpi: int = 110) -> None:
    """Title, tight layout (within ``rect``), write the PNG, close the figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    if rect is None:
        fig.tight_layout()
    else:
        fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot(grid: list[list[Panel]], path: str | os.PathLike, title: str, *, figsize: tuple[float, float],
         logy: bool = True, tick_label: Callable[[int], str] = str, legend: str = "axes",
         legend_order: list[str] | None = None, legend_ncol: int | None = None, legend_size: float | None = None,
         rect: tuple | None = None, dpi: int = 110) -> None:
    """The scripts' figure: a grid of panels, metric vs sequence length, log2 x axis, log y (values written
    plainly, minor ticks at 2 and 5) or linear y from 0, one line per peer.  ``legend``: "axes" (each panel
    with lines), "figure" (one, below the panels, ordered by ``legend_order`` when given) or "none"."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig, axes = figure(max(len(grid), 1), max([1, *(len(row) for row in grid)]), figsize)
    for i, row in enumerate(grid):
        for j, panel in enumerate(row):
            ax = axes[i][j]
            for line in panel.lines:
                if line.points:
                    ax.plot(*zip(*sorted(line.points)), color=line.color, marker=line.marker,
                            linestyle=line.linestyle, label=line.label)
            ax.set_xscale("log", base=2)
            if logy:
                ax.set_yscale("log")
                ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
                for set_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                    set_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            if panel.xticks:
                ax.set_xticks(panel.xticks, [tick_label(s) for s in panel.xticks])
                if not logy:
                    ax.minorticks_off()
            if not logy:
                ax.set_ylim(bottom=0)
            ax.set_xlabel(panel.xlabel)
            ax.set_ylabel(panel.ylabel)
            if panel.title:
                ax.set_title(panel.title)
            ax.grid(True, which="both" if logy else "major", alpha=0.3)
            if legend == "axes" and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=legend_size)
    if legend == "figure":
        handles: dict[str, Any] = {}
        for ax in axes.flat:
            for h, name in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(name, h)
        names = [n for n in legend_order if n in handles] if legend_order is not None else list(handles)
        if names:
            fig.legend([handles[n] for n in names], names, loc="lower center", ncol=legend_ncol or len(names),
                       frameon=False)
    save(fig, path, title, rect, dpi)
