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
import json
import pathlib
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # _common, also when loaded by path (tests)
import _common as common  # noqa: E402

MODELS = ("nanogpt", "gpt2", "llama")
VARIANTS = ("eager", "inductor", "attnfuse", "sdpa")
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


def _ru_maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- models

def build_model(name: str, seq: int, sdpa: bool = False):
    """``(model, forward)``: ``forward(m, idx)`` runs ``m`` on token ids and returns the logits."""
    import torch

    torch.manual_seed(0)
    if name == "nanogpt":
        sys.path.insert(0, str(common.ROOT / "examples"))
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
    hwms = [common.proc_status_mb("VmHWM") or 0.0]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def reset() -> float:
        """Reset the peak; return the baseline it is measured against (MB)."""
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / common.MIB
        hwms.append(common.proc_status_mb("VmHWM") or 0.0)
        res["peak_reset"] = common.reset_peak_rss()
        return common.proc_status_mb("VmRSS") or 0.0

    def peak() -> float:
        sync()
        return torch.cuda.max_memory_allocated() / common.MIB if cuda else (common.proc_status_mb("VmHWM") or 0.0)

    with torch.no_grad():
        base = res["rss_before_mb"] = reset()
        t0 = time.perf_counter()
        fwd(model, idx)
        sync()
        res["first_call_s"] = time.perf_counter() - t0
        timing = common.time_call(lambda: fwd(model, idx), device.type, reps=reps, warmup=max(warmup - 1, 0),
                                  retry_s=_RETRY_S)
        times, cpu_times = timing.times_s, timing.cpu_times_s
        res["timed_forwards"] = len(timing.all_times_s)
        res["others_busy_cores"] = timing.others_busy_cores
        res["all_times_s"] = timing.all_times_s
        res["peak_delta_mb"] = peak() - res["rss_before_mb"]
        fwd_peaks = []
        res["exact_malloc"] = not cuda and common.exact_malloc()
        for _ in range(mem_reps):
            base = reset()
            fwd(model, idx)
            fwd_peaks.append(peak() - base)
            if not cuda:  # RSS is absolute: a later forward can still set the process peak
                res["peak_delta_mb"] = max(res["peak_delta_mb"], peak() - res["rss_before_mb"])
        if not cuda:
            res["forward_alloc_peak_mb"] = common.alloc_peak_mb(lambda: fwd(model, idx))
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
        res["peak_allocated_mb"] = torch.cuda.max_memory_allocated() / common.MIB
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
    return common.run_worker(cmd, {"model": model_name, "seq": seq, "variant": variant}, timeout)


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


STYLES = {"eager": ("tab:gray", "o"), "inductor": ("tab:blue", "s"), "attnfuse": ("tab:red", "D"),
          "sdpa": ("tab:green", "^")}
LABELS = {"eager": "eager", "inductor": "torch.compile (inductor)", "attnfuse": "torch.compile (attnfuse)",
          "sdpa": "SDPA-written, eager"}


def plot(results: list[dict[str, Any]], info: dict[str, Any], title: str, path: pathlib.Path) -> None:
    """A column per model, a row per metric (time, forward tensor peak, CPU: RSS growth) vs seq, a line per
    variant."""
    ok = [r for r in results if "error" not in r]
    models = list(dict.fromkeys(r["model"] for r in ok))
    panels = [("median_s", "median forward time (s)"),
              ("forward_alloc_peak_mb", "forward peak tensor memory (MB)")]
    if not info["cuda"]:
        panels.append(("peak_delta_mb", "peak RSS growth incl. compile (MB)"))
    grid = [[common.Panel([common.Line(LABELS[variant], [(r["seq"], r[metric]) for r in ok if r["model"] == model
                                                         and r["variant"] == variant and r.get(metric) is not None],
                                       *style) for variant, style in STYLES.items()],
                          sorted({r["seq"] for r in ok if r["model"] == model}), title=model if row == 0 else "",
                          ylabel=ylabel) for model in models]
            for row, (metric, ylabel) in enumerate(panels)]
    common.plot(grid, path, title, figsize=(4.6 * max(len(models), 1), 3.4 * len(panels) + 0.8), legend="figure",
                legend_ncol=4, rect=(0, 0.05, 1, 0.96), dpi=120)


def _table(results: list[dict[str, Any]]) -> str:
    head = ("model", "seq", "variant", "median s", "cpu s", "fwd tensor MB", "fwd RSS MB", "peak Δ MB", "peak RSS MB",
            "busy", "note")
    rows = []
    for r in results:
        if "error" in r:
            rows.append((r["model"], str(r["seq"]), r["variant"], *["-"] * 7, r["error"][:60]))
            continue
        fmt = lambda k, f="{:.0f}": common.fmt(r.get(k), f)
        rows.append((r["model"], str(r["seq"]), r["variant"], fmt("median_s", "{:.3f}"), fmt("median_cpu_s", "{:.3f}"),
                     *map(fmt, ("forward_alloc_peak_mb", "forward_peak_delta_mb", "peak_delta_mb", "peak_rss_mb")),
                     fmt("others_busy_cores", "{:.1f}"), r.get("fused_sites", "")))
    return common.table(rows, head)


# ---------------------------------------------------------------- CLI

def _run_one(model: str, seq: int, variant: str, reps: int, warmup: int, mem_reps: int, procs: int = 1,
             wait_idle: float = 0.0) -> dict[str, Any]:
    """Measure in ``procs`` fresh processes; keep the one with the median time (all medians in proc_medians_s)."""
    t0 = time.perf_counter()
    runs = []
    for _ in range(procs):
        if wait_idle > 0:
            common.wait_for_idle(wait_idle)
        runs.append(measure_in_subprocess(model, seq, variant, reps, warmup, mem_reps))
    ok = sorted((x for x in runs if "error" not in x), key=lambda x: x["median_s"])
    r = ok[(len(ok) - 1) // 2] if ok else runs[0]
    if len(runs) > 1:
        r["proc_medians_s"] = [x.get("median_s") for x in runs]
    msg = r.get("error") or (f"median {r['median_s']:.3f} s, forward tensors "
                             f"{r.get('forward_alloc_peak_mb') or 0:.0f} MB, RSS {r['forward_peak_delta_mb']:.0f} MB, "
                             f"peak delta {r['peak_delta_mb']:.0f} MB, busy {r.get('others_busy_cores', 0):.1f}")
    common.log(f"[{time.perf_counter() - t0:6.1f} s] {model:8s} seq {seq:5d} {variant:9s} {msg}")
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=common.csv(str), default=list(MODELS), help="comma-separated: " + ",".join(MODELS))
    p.add_argument("--seqs", type=common.csv(int), default=[1024, 2048, 4096])
    p.add_argument("--variants", type=common.csv(str), default=list(VARIANTS), help=",".join(VARIANTS))
    p.add_argument("--reps", type=int, default=5, help="timed forwards per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards first (the first one compiles)")
    p.add_argument("--mem-reps", type=int, default=3, help="forwards measured for memory (median reported)")
    p.add_argument("--procs", type=int, default=1,
                   help="fresh processes per measurement; the one with the median time is kept")
    common.add_common_args(p, ("MODEL", "SEQ", "VARIANT"))
    args = p.parse_args(argv)
    if args.worker:
        model, seq, variant = args.worker
        common.emit(measure(model, int(seq), variant, args.reps, args.warmup, args.mem_reps))
        return 0
    common.check_choices(p, "model", args.models, MODELS)
    common.check_choices(p, "variant", args.variants, VARIANTS)

    if args.from_json:
        json_path = pathlib.Path(args.from_json)
        doc = json.loads(json_path.read_text())
        setup = doc["setup"]
        if args.rerun_busy:
            common.rerun_busy(doc, lambda r: _run_one(r["model"], r["seq"], r["variant"], setup["reps"],
                                                      setup["warmup"], setup["mem_reps"], setup.get("procs", 1),
                                                      args.wait_idle))
        write(doc, doc["results"], json_path)
        return 0
    info = common.machine_info()
    today = common.today()
    device = "cuda" if info["cuda"] else "cpu"
    json_path = common.json_path(args.out, f"models-{common.device_tag(device, today)}.json")
    configs = [(model, seq, variant) for model in args.models for seq in args.seqs for variant in args.variants]
    results = [_run_one(model, seq, variant, args.reps, args.warmup, args.mem_reps, args.procs, args.wait_idle)
               for model, seq, variant in common.progress(configs, "bench_models")]
    doc = {"benchmark": "bench_models", "date": today, "device": common.device_name(device), "machine": info,
           **common.versions(),
           "setup": {"batch": 1, "dtype": "float32", "layers": 4, "width": 256, "heads": 4, "vocab": 512,
                     "llama_kv_heads": 2, "grad": "torch.no_grad()", "mode": "eval()", "reps": args.reps,
                     "warmup": args.warmup, "mem_reps": args.mem_reps,
                     "procs": args.procs,
                     "time": "median_s: median of reps (CUDA events on GPU, perf_counter on CPU); on CPU a "
                             f"forward during which other processes kept >= {common.QUIET} cores busy is retried (for "
                             f"up to {_RETRY_S:.0f} s) and the reps quietest forwards are kept (times_s; every "
                             "forward in all_times_s)",
                     "cpu_time": "median_cpu_s: median process CPU time (all threads) per forward, CPU only; "
                                 "less sensitive than wall time to other load on the machine",
                     "contention": "others_busy_cores: the most CPU cores other processes kept busy during a "
                                   "kept timed forward (/proc/stat busy time minus this process's CPU time)",
                     "process": "each (model, seq, variant) in `procs` fresh processes; the result is the "
                                "process with the median median_s (every process's in proc_medians_s)"},
           "memory_metrics": MEMORY_METRICS, "results": results,
           "command": common.command(__file__, argv)}
    write(doc, results, json_path)
    return 0


def write(doc: dict[str, Any], results: list[dict[str, Any]], json_path: pathlib.Path) -> None:
    """Add ratios and goals to ``doc``; write it as JSON and the plot as PNG next to it; print a summary."""
    doc["ratios"] = ratios(results)
    doc["goals"] = goals(doc["ratios"])
    common.write_json(json_path, doc)
    png_path = json_path.with_suffix(".png")
    info = doc["machine"]
    plot(results, info, f"attnfuse model benchmark: {doc['device']}, torch {info['torch']}, fp32, batch 1, "
                        f"forward ({doc['date']})", png_path)
    common.print_summary(_table(results), doc, json_path, png_path)




if __name__ == "__main__":
    sys.exit(main())
