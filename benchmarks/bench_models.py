"""Forward time and peak memory: eager vs stock ``torch.compile`` vs attnfuse, on whole models.

    python benchmarks/bench_models.py [--models nanogpt,gpt2,llama] [--seqs 1024,2048,4096]
                                      [--reps 5] [--procs 1] [--wait-idle 0] [--out benchmarks/results]
    python benchmarks/bench_models.py --from-json RESULTS.json [--rerun-busy]   # re-plot (re-measure)

Models (random weights, built from configs, fp32, batch 1, ``eval()``, forward under
``torch.no_grad()``): the project's nanoGPT (``examples/nanogpt.py``), a tiny HF GPT-2
and a tiny HF LLaMA (GQA, 2 query heads per KV head), all 4 layers, width 256, 4 heads,
vocab 512.  Variants:

* ``eager``    -- the model as written (attention spelled matmul -> softmax -> matmul);
* ``inductor`` -- ``torch.compile(model)`` (stock Inductor);
* ``attnfuse`` -- ``torch.compile(model, backend="attnfuse")``;
* ``sdpa``     -- the same model written with ``F.scaled_dot_product_attention``
  (``GPTConfig(sdpa=True)``; HF ``attn_implementation="sdpa"``), run eagerly: the memory peer.

Every (model, seq, variant) runs in fresh processes (this script with ``--worker``;
``--procs`` of them, the median kept), so no allocator state, compile cache in memory or
peak is shared between measurements.  Time is the median of ``--reps`` forwards after
``--warmup`` forwards (the first one compiles).  On a shared CPU a forward during which
other processes kept a core busy is retried (OpenMP threads that lose their core make a
forward several times slower), ``--wait-idle`` waits for a quiet machine first, and every
result records how busy the machine was.

Memory, on CPU (the JSON's ``memory_metrics`` defines each number):

* ``forward_alloc_peak_mb`` (primary): the most tensor bytes live at once in PyTorch's
  allocator during one forward after warm-up, from ``torch.profiler`` memory events; exact
  and repeatable;
* ``forward_peak_delta_mb``: the same forward's growth of resident set size (``VmHWM``
  after minus ``VmRSS`` before, the peak reset through ``/proc/self/clear_refs``); it
  also sees malloc and page effects and varies by about +-10 MB from run to run;
* ``peak_delta_mb``: RSS growth from just before the first forward on (compilation
  included), and ``peak_rss_mb``, the process's raw peak RSS.

``ru_maxrss`` is not used: a child started with vfork/exec inherits its parent's peak in
it.  On CUDA, memory is ``torch.cuda.max_memory_allocated`` and timing uses CUDA events.
``goals`` in the JSON compares nanoGPT at seq 4096 with the issue's targets (reported,
not asserted).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any

from tqdm import tqdm

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = ("nanogpt", "gpt2", "llama")
VARIANTS = ("eager", "inductor", "attnfuse", "sdpa")
_MARK = "ATTNFUSE_BENCH_RESULT "
_MiB = 2**20
_QUIET = 0.3  # a CPU forward counts as uncontended if other processes kept fewer cores than this busy
_RETRY_S = 90.0  # how long a measurement keeps retrying contended CPU forwards

MEMORY_METRICS = {
    "forward_alloc_peak_mb": "PRIMARY. Peak bytes of tensors live in PyTorch's allocator during one forward after "
                             "warm-up, counted from its start (CPU: torch.profiler memory events; CUDA: "
                             "max_memory_allocated minus memory_allocated before it). Exact and repeatable; "
                             "excludes memory kernels take from malloc directly",
    "rss_before_mb": "CPU: resident set size just before the model's first forward (model and input built)",
    "peak_rss_mb": "CPU: raw peak resident set size of the worker process over its whole life (VmHWM)",
    "peak_delta_mb": "peak RSS (CUDA: max_memory_allocated) from the first forward on, minus the value just "
                     "before it; includes compilation and warm-up",
    "forward_peak_delta_mb": "median over mem_reps forwards (after warm-up and the timed forwards) of peak RSS "
                             "(CUDA: max_memory_allocated) during that one forward minus the value just before "
                             "it (peak reset before each): the steady-state forward's own memory; all in "
                             "forward_peaks_mb",
    "ru_maxrss_mb": "getrusage ru_maxrss, for reference only: a child started with vfork/exec inherits its "
                    "parent's peak in it, so it can overstate the worker's own peak",
}


# ---------------------------------------------------------------- memory probes (this process)

def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Release free heap pages, then reset the kernel's peak-RSS mark to the current RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _exact_malloc() -> bool:
    """Make glibc return every freed block of 64 KiB or more to the OS at once, so that RSS follows the
    live tensor bytes instead of malloc's dynamic thresholds (which make a forward's peak vary by
    tens of MB from run to run).  Used only for the memory forwards: it costs page faults."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 64 * 1024) and libc.mallopt(m_trim_threshold, 64 * 1024))
    except (OSError, AttributeError):
        return False


def _alloc_peak_mb(run) -> float | None:
    """Peak bytes live in PyTorch's CPU allocator during ``run()`` (from the profiler's memory events),
    counted from the call's start; None if the profiler does not report them."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:
        return None
    live = top = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        live += nbytes
        top = max(top, live)
    return top / _MiB if events else None


def _ru_maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- models

def build_model(name: str, seq: int, sdpa: bool = False):
    """``(model, forward)``: ``forward(m, idx)`` runs ``m`` on token ids and returns the logits."""
    import torch

    torch.manual_seed(0)
    if name == "nanogpt":
        sys.path.insert(0, str(ROOT / "examples"))
        from nanogpt import GPT, GPTConfig

        return GPT(GPTConfig(block_size=seq, sdpa=sdpa)), lambda m, idx: m(idx)
    impl = "sdpa" if sdpa else "eager"
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=seq, vocab_size=512, bos_token_id=0,
                         eos_token_id=0)
        model = GPT2LMHeadModel._from_config(cfg, attn_implementation=impl)
    elif name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=688, max_position_embeddings=seq, vocab_size=512, bos_token_id=0,
                          eos_token_id=0, pad_token_id=0)
        model = LlamaForCausalLM._from_config(cfg, attn_implementation=impl)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return model, lambda m, idx: m(idx, use_cache=False).logits


# ---------------------------------------------------------------- one measurement (this process)

def _cpu_snapshot() -> tuple[float, float, float]:
    """(machine busy CPU-seconds, this process's CPU-seconds, wall seconds) for measuring contention."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = float("nan")
    t = os.times()
    return busy, t.user + t.system, time.perf_counter()


def _others_cores(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """CPU cores other processes kept busy between two `_cpu_snapshot` calls."""
    return max(((b[0] - a[0]) - (b[1] - a[1])) / (b[2] - a[2]), 0.0)


def measure(model_name: str, seq: int, variant: str, reps: int = 5, warmup: int = 2,
            mem_reps: int = 3) -> dict[str, Any]:
    """Time and memory of one (model, seq, variant) in *this* process; see the module docstring.

    Phases: first forward (compiles) and warm-up -> ``reps`` timed forwards -> ``mem_reps``
    forwards, each with the peak reset before it (kept apart from the timed ones because the
    reset releases free heap pages, which the next forward then faults back in).
    """
    import torch

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model, fwd = build_model(model_name, seq, sdpa=variant == "sdpa")
    model = model.to(device).eval()
    if variant == "inductor":
        model = torch.compile(model)
    elif variant == "attnfuse":
        import attnfuse  # noqa: F401 - registers the op; the backend comes through its entry point

        model = torch.compile(model, backend="attnfuse")
    idx = torch.randint(0, 512, (1, seq), device=device)
    res: dict[str, Any] = {"model": model_name, "seq": seq, "variant": variant, "device": device.type,
                           "reps": reps, "warmup": warmup, "mem_reps": mem_reps}
    hwms = [_proc_status_mb("VmHWM") or 0.0]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def reset() -> float:
        """Reset the peak; return the baseline it is measured against (MB)."""
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / _MiB
        hwms.append(_proc_status_mb("VmHWM") or 0.0)
        res["peak_reset"] = _reset_peak_rss()
        return _proc_status_mb("VmRSS") or 0.0

    def peak() -> float:
        sync()
        return torch.cuda.max_memory_allocated() / _MiB if cuda else (_proc_status_mb("VmHWM") or 0.0)

    with torch.no_grad():
        base = res["rss_before_mb"] = reset()
        t0 = time.perf_counter()
        fwd(model, idx)
        sync()
        res["first_call_s"] = time.perf_counter() - t0
        for _ in range(max(warmup - 1, 0)):
            fwd(model, idx)
        runs = []  # (wall s, CPU s, cores other processes kept busy) per timed forward
        deadline = time.perf_counter() + _RETRY_S
        while len(runs) < reps or time.perf_counter() < deadline:
            snap = _cpu_snapshot()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fwd(model, idx)
                end.record()
                sync()
                runs.append((start.elapsed_time(end) / 1e3, None, 0.0))
            else:
                t0, c0 = time.perf_counter(), time.process_time()
                fwd(model, idx)
                runs.append((time.perf_counter() - t0, time.process_time() - c0, _others_cores(snap, _cpu_snapshot())))
            if cuda or sum(busy < _QUIET for *_, busy in runs) >= reps:
                break
            if runs[-1][2] >= _QUIET:
                time.sleep(1.0)  # give the other process a chance to finish
        used = sorted(runs, key=lambda r: r[2])[:reps]  # on a shared CPU: the quietest forwards
        times, cpu_times = [r[0] for r in used], [r[1] for r in used if r[1] is not None]
        res["timed_forwards"] = len(runs)
        res["others_busy_cores"] = max(r[2] for r in used)
        res["all_times_s"] = [r[0] for r in runs]
        res["peak_delta_mb"] = peak() - res["rss_before_mb"]
        fwd_peaks = []
        res["exact_malloc"] = not cuda and _exact_malloc()
        for _ in range(mem_reps):
            base = reset()
            fwd(model, idx)
            fwd_peaks.append(peak() - base)
            if not cuda:  # RSS is absolute: a later forward can still set the process peak
                res["peak_delta_mb"] = max(res["peak_delta_mb"], peak() - res["rss_before_mb"])
        if not cuda:
            res["forward_alloc_peak_mb"] = _alloc_peak_mb(lambda: fwd(model, idx))
    res["times_s"] = times
    res["median_s"] = statistics.median(times)
    if cpu_times:
        res["median_cpu_s"] = statistics.median(cpu_times)
    res["forward_peaks_mb"] = fwd_peaks
    if fwd_peaks:
        res["forward_peak_delta_mb"] = statistics.median(fwd_peaks)
    if cuda:  # the CUDA allocator's own statistics already count tensor bytes
        res["forward_alloc_peak_mb"] = res.get("forward_peak_delta_mb")
    if cuda:
        res["peak_allocated_mb"] = torch.cuda.max_memory_allocated() / _MiB
    else:
        res["peak_rss_mb"] = max(*hwms, peak())
        res["ru_maxrss_mb"] = _ru_maxrss_mb()
    if variant == "attnfuse":
        import attnfuse

        rep = attnfuse.last_report()
        res["fused_sites"] = f"{len(rep.fused)}/{len(rep.sites)}" if rep is not None else "no report"
    return res


def measure_in_subprocess(model_name: str, seq: int, variant: str, reps: int = 5, warmup: int = 2,
                          mem_reps: int = 3, timeout: float = 1800) -> dict[str, Any]:
    """`measure` in a fresh Python process; a failure comes back as ``{"error": ...}``."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", model_name, str(seq), variant,
           "--reps", str(reps), "--warmup", str(warmup), "--mem-reps", str(mem_reps)]
    return run_worker(cmd, {"model": model_name, "seq": seq, "variant": variant}, timeout)


def run_worker(cmd: list[str], key: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run a ``--worker`` command line and return the result it prints after `_MARK`, or ``{**key, "error": ...}``."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**key, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {**key, "error": f"worker exited {proc.returncode}: " + " | ".join(tail)}


def wait_for_idle(max_wait: float, busy_cores: float = 0.5, sample: float = 3.0) -> float:
    """Wait (up to ``max_wait`` s) until other processes keep fewer than ``busy_cores`` cores busy.

    Returns the busy cores seen in the last sample.  The benchmark machine may be shared;
    ``others_busy_cores`` in each result says how quiet it was while timing.
    """
    deadline = time.perf_counter() + max_wait
    while True:
        a = _cpu_snapshot()
        time.sleep(sample)
        busy = _others_cores(a, _cpu_snapshot())
        if busy < busy_cores or time.perf_counter() >= deadline:
            return busy


# ---------------------------------------------------------------- machine, files, plot

def machine_info() -> dict[str, Any]:
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
        cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
        found = re.search(r"model name\s*:\s*(.+)", cpuinfo)
        info["cpu_model"] = found.group(1).strip() if found else platform.processor()
        mem = re.search(r"MemTotal:\s*(\d+)", pathlib.Path("/proc/meminfo").read_text())
        info["mem_total_gib"] = round(int(mem.group(1)) / 2**20, 1) if mem else None
    except OSError:
        info["cpu_model"] = platform.processor()
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def device_tag(info: dict[str, Any]) -> str:
    if info["cuda"]:
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower()).strip("-")
    return f"cpu-{info['cpu_count']}core"


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """attnfuse / stock-compile time and attnfuse / SDPA-written peak memory, per (model, seq)."""
    ok = {(r["model"], r["seq"], r["variant"]): r for r in results if "error" not in r}
    out = []
    for model, seq in dict.fromkeys((r["model"], r["seq"]) for r in results):
        af, ind, sd = (ok.get((model, seq, v)) for v in ("attnfuse", "inductor", "sdpa"))
        row: dict[str, Any] = {"model": model, "seq": seq}
        if af and ind:
            row["time_attnfuse_over_inductor"] = af["median_s"] / ind["median_s"]
            if af.get("median_cpu_s") and ind.get("median_cpu_s"):
                row["cpu_time_attnfuse_over_inductor"] = af["median_cpu_s"] / ind["median_cpu_s"]
        if af and sd:
            for metric in ("forward_alloc_peak_mb", "forward_peak_delta_mb", "peak_delta_mb", "peak_rss_mb"):
                if af.get(metric) and sd.get(metric):
                    row[f"mem_attnfuse_over_sdpa_{metric.removesuffix('_mb')}"] = af[metric] / sd[metric]
        out.append(row)
    return out


GOALS = {"model": "nanogpt", "seq": 4096, "time_attnfuse_over_inductor": 0.5, "mem_attnfuse_over_sdpa": 1.1}


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets (attnfuse <= 0.5x stock-compile time, <= 1.1x SDPA-written memory) vs the result."""
    row = next((r for r in rows if r["model"] == GOALS["model"] and r["seq"] == GOALS["seq"]), None)
    out: dict[str, Any] = {"model": GOALS["model"], "seq": GOALS["seq"]}
    if row is None:
        return {**out, "note": "not measured"}

    def check(key: str, target: float) -> dict[str, Any] | None:
        return None if key not in row else {"value": round(row[key], 3), "target": target,
                                            "met": row[key] <= target}

    targets = {"time_attnfuse_over_inductor": ("time_attnfuse_over_inductor", GOALS["time_attnfuse_over_inductor"]),
               "mem_attnfuse_over_sdpa (forward tensor peak, primary)": ("mem_attnfuse_over_sdpa_forward_alloc_peak",
                                                                         GOALS["mem_attnfuse_over_sdpa"]),
               "mem_attnfuse_over_sdpa (forward RSS peak)": ("mem_attnfuse_over_sdpa_forward_peak_delta",
                                                             GOALS["mem_attnfuse_over_sdpa"]),
               "mem_attnfuse_over_sdpa (incl. compile)": ("mem_attnfuse_over_sdpa_peak_delta",
                                                          GOALS["mem_attnfuse_over_sdpa"]),
               "mem_attnfuse_over_sdpa (raw peak RSS)": ("mem_attnfuse_over_sdpa_peak_rss",
                                                         GOALS["mem_attnfuse_over_sdpa"])}
    for name, (key, target) in targets.items():
        found = check(key, target)
        if found:
            out[name] = found
    return out


def plot(results: list[dict[str, Any]], info: dict[str, Any], title: str, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    ok = [r for r in results if "error" not in r]
    models = list(dict.fromkeys(r["model"] for r in ok))
    styles = {"eager": ("tab:gray", "o"), "inductor": ("tab:blue", "s"), "attnfuse": ("tab:red", "D"),
              "sdpa": ("tab:green", "^")}
    labels = {"eager": "eager", "inductor": "torch.compile (inductor)", "attnfuse": "torch.compile (attnfuse)",
              "sdpa": "SDPA-written, eager"}
    panels = [("median_s", "median forward time (s)"),
              ("forward_alloc_peak_mb", "forward peak tensor memory (MB)")]
    if not info["cuda"]:
        panels.append(("peak_delta_mb", "peak RSS growth incl. compile (MB)"))
    fig, axes = plt.subplots(len(panels), max(len(models), 1), figsize=(4.6 * max(len(models), 1),
                                                                         3.4 * len(panels) + 0.8), squeeze=False)
    for col, model in enumerate(models):
        for row, (metric, ylabel) in enumerate(panels):
            ax = axes[row][col]
            for variant, (color, marker) in styles.items():
                pts = sorted((r["seq"], r[metric]) for r in ok
                             if r["model"] == model and r["variant"] == variant and r.get(metric) is not None)
                if pts:
                    ax.plot(*zip(*pts, strict=True), color=color, marker=marker, label=labels[variant])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
            for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis(FuncFormatter(lambda y, _: f"{y:g}"))
            seqs = sorted({r["seq"] for r in ok if r["model"] == model})
            ax.set_xticks(seqs, [str(s) for s in seqs])
            ax.set_xlabel("sequence length")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if row == 0:
                ax.set_title(model)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=4, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(results: list[dict[str, Any]]) -> str:
    head = ("model", "seq", "variant", "median s", "cpu s", "fwd tensor MB", "fwd RSS MB", "peak Δ MB", "peak RSS MB",
            "busy", "note")
    rows = [head]
    for r in results:
        if "error" in r:
            rows.append((r["model"], str(r["seq"]), r["variant"], *["-"] * 7, r["error"][:60]))
            continue
        fmt = lambda k, f="{:.0f}": f.format(r[k]) if r.get(k) is not None else "-"
        rows.append((r["model"], str(r["seq"]), r["variant"], fmt("median_s", "{:.3f}"), fmt("median_cpu_s", "{:.3f}"),
                     *map(fmt, ("forward_alloc_peak_mb", "forward_peak_delta_mb", "peak_delta_mb", "peak_rss_mb")),
                     fmt("others_busy_cores", "{:.1f}"), r.get("fused_sites", "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


# ---------------------------------------------------------------- CLI

def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def _run_one(model: str, seq: int, variant: str, reps: int, warmup: int, mem_reps: int, procs: int = 1,
             wait_idle: float = 0.0) -> dict[str, Any]:
    """Measure in ``procs`` fresh processes; keep the one with the median time (all medians in proc_medians_s)."""
    t0 = time.perf_counter()
    runs = []
    for _ in range(procs):
        if wait_idle > 0:
            wait_for_idle(wait_idle)
        runs.append(measure_in_subprocess(model, seq, variant, reps, warmup, mem_reps))
    ok = sorted((x for x in runs if "error" not in x), key=lambda x: x["median_s"])
    r = ok[(len(ok) - 1) // 2] if ok else runs[0]
    if len(runs) > 1:
        r["proc_medians_s"] = [x.get("median_s") for x in runs]
    msg = r.get("error") or (f"median {r['median_s']:.3f} s, forward tensors "
                             f"{r.get('forward_alloc_peak_mb') or 0:.0f} MB, RSS {r['forward_peak_delta_mb']:.0f} MB, "
                             f"peak delta {r['peak_delta_mb']:.0f} MB, busy {r.get('others_busy_cores', 0):.1f}")
    log(f"[{time.perf_counter() - t0:6.1f} s] {model:8s} seq {seq:5d} {variant:9s} {msg}")
    return r


def log(line: str) -> None:
    """Print a progress line to stdout (flushed) without tearing the tqdm bar that stderr may be showing."""
    with tqdm.external_write_mode():
        print(line, flush=True)


def progress(configs: list, desc: str) -> tqdm:
    """A tqdm bar over a benchmark's configurations, on stderr and only where stderr is a terminal."""
    return tqdm(configs, desc=desc, unit="config", disable=None)


def add_common_args(p: argparse.ArgumentParser, worker: tuple[str, str, str]) -> None:
    """The options every CPU benchmark script shares: idle wait, output, re-plot / re-measure, worker mode."""
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each measurement, wait up to this long for other processes to quiet down")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                   help="output folder, or a .json path (the .png goes next to it)")
    p.add_argument("--from-json", metavar="PATH", help="re-make ratios, goals and the plot from a results JSON")
    p.add_argument("--rerun-busy", action="store_true",
                   help="with --from-json: measure again the results taken on a busy machine (or that failed)")
    p.add_argument("--worker", nargs=3, metavar=worker, help=argparse.SUPPRESS)


def print_summary(table: str, doc: dict[str, Any], json_path: pathlib.Path, png_path: pathlib.Path) -> None:
    """The table, one line of ratios per row, the goals and where the files went."""
    print(table)
    for row in doc["ratios"]:
        print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print("goals:", json.dumps(doc["goals"]))
    print(f"wrote {json_path} and {png_path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=_csv(str), default=list(MODELS), help="comma-separated: " + ",".join(MODELS))
    p.add_argument("--seqs", type=_csv(int), default=[1024, 2048, 4096])
    p.add_argument("--variants", type=_csv(str), default=list(VARIANTS), help=",".join(VARIANTS))
    p.add_argument("--reps", type=int, default=5, help="timed forwards per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards first (the first one compiles)")
    p.add_argument("--mem-reps", type=int, default=3, help="forwards measured for memory (median reported)")
    p.add_argument("--procs", type=int, default=1,
                   help="fresh processes per measurement; the one with the median time is kept")
    add_common_args(p, ("MODEL", "SEQ", "VARIANT"))
    args = p.parse_args(argv)
    if args.worker:
        model, seq, variant = args.worker
        print(_MARK + json.dumps(measure(model, int(seq), variant, args.reps, args.warmup, args.mem_reps)), flush=True)
        return 0
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")

    if args.from_json:
        json_path = pathlib.Path(args.from_json)
        doc = json.loads(json_path.read_text())
        setup = doc["setup"]
        for i, r in enumerate(doc["results"]):
            if args.rerun_busy and ("error" in r or r.get("others_busy_cores", 0.0) >= _QUIET):
                doc["results"][i] = _run_one(r["model"], r["seq"], r["variant"], setup["reps"], setup["warmup"],
                                             setup["mem_reps"], setup.get("procs", 1), args.wait_idle)
        write(doc, doc["results"], json_path)
        return 0
    info = machine_info()
    today = datetime.date.today().isoformat()
    out = pathlib.Path(args.out)
    json_path = out if out.suffix == ".json" else out / f"models-{device_tag(info)}-{today}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    configs = [(model, seq, variant) for model in args.models for seq in args.seqs for variant in args.variants]
    results = [_run_one(model, seq, variant, args.reps, args.warmup, args.mem_reps, args.procs, args.wait_idle)
               for model, seq, variant in progress(configs, "bench_models")]
    doc = {"benchmark": "bench_models", "date": today, "device": device_tag(info), "machine": info,
           "setup": {"batch": 1, "dtype": "float32", "layers": 4, "width": 256, "heads": 4, "vocab": 512,
                     "llama_kv_heads": 2, "grad": "torch.no_grad()", "mode": "eval()", "reps": args.reps,
                     "warmup": args.warmup, "mem_reps": args.mem_reps,
                     "procs": args.procs,
                     "time": "median_s: median of reps (CUDA events on GPU, perf_counter on CPU); on CPU a "
                             f"forward during which other processes kept >= {_QUIET} cores busy is retried (for "
                             f"up to {_RETRY_S:.0f} s) and the reps quietest forwards are kept (times_s; every "
                             "forward in all_times_s)",
                     "cpu_time": "median_cpu_s: median process CPU time (all threads) per forward, CPU only; "
                                 "less sensitive than wall time to other load on the machine",
                     "contention": "others_busy_cores: the most CPU cores other processes kept busy during a "
                                   "kept timed forward (/proc/stat busy time minus this process's CPU time)",
                     "process": "each (model, seq, variant) in `procs` fresh processes; the result is the "
                                "process with the median median_s (every process's in proc_medians_s)"},
           "memory_metrics": MEMORY_METRICS, "results": results,
           "command": " ".join([os.path.relpath(sys.argv[0], ROOT), *(argv if argv is not None else sys.argv[1:])])}
    write(doc, results, json_path)
    return 0


def write(doc: dict[str, Any], results: list[dict[str, Any]], json_path: pathlib.Path) -> None:
    """Add ratios and goals to ``doc``; write it as JSON and the plot as PNG next to it; print a summary."""
    doc["ratios"] = ratios(results)
    doc["goals"] = goals(doc["ratios"])
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    png_path = json_path.with_suffix(".png")
    info = doc["machine"]
    plot(results, info, f"attnfuse model benchmark: {doc['device']}, torch {info['torch']}, fp32, batch 1, "
                        f"forward ({doc['date']})", png_path)
    print_summary(_table(results), doc, json_path, png_path)




if __name__ == "__main__":
    sys.exit(main())
