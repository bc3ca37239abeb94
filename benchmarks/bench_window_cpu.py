"""Sliding-window attention on CPU: a Mistral-style model and its attention alone, attnfuse vs eager vs Inductor.

    python benchmarks/bench_window_cpu.py [--seqs 8192,16384] [--window 512] [--attn sdpa|eager]
                                          [--parts model,kernel] [--reps 3] [--warmup 1] [--retry-s 120]
                                          [--wait-idle 0] [--out benchmarks/results]
    python benchmarks/bench_window_cpu.py --from-json RESULTS.json [--rerun-busy]   # re-plot (re-measure)

The issue's goal, at seq 16k with window 512: attnfuse >= 10x eager's speed and <= 1/10 of its peak
attention memory.

``model`` rows: HF ``MistralForCausalLM`` built from a config with random weights (seed 0): 2 layers,
hidden 256, 4 query heads and 2 K/V heads of dim 64, MLP 512, vocab 512, ``sliding_window=512``, fp32,
batch 1, ``eval()``, forward under ``torch.no_grad()``, ``attn_implementation=--attn`` (``sdpa`` by default:
HF then hands SDPA a dense (seq, seq) band mask; ``eager`` materializes every score, 4.3 GB per layer and
tensor at 16k).  The model is narrow on purpose: the goal is about attention, and the projections and MLP,
which no attention kernel speeds up, bound the model's speedup (Amdahl).  Variants:

* ``eager``    -- the model as written;
* ``inductor`` -- ``torch.compile(model)``;
* ``attnfuse`` -- ``torch.compile(model, backend="attnfuse")``; ``fused_sites`` and ``site_masks`` record
  what the backend fused and which mask kind it proved (a window only once the mask analysis proves it).

``kernel`` rows: one attention call with the model's shapes, (1, 4, seq, 64) queries and (1, 2, seq, 64)
keys/values, a causal window of ``--window`` keys (key ``j`` visible from query ``i`` iff
``i - window < j <= i``):

* ``sdpa_band`` -- what eager Mistral does: build the dense bool band mask, then
  ``F.scaled_dot_product_attention(..., attn_mask=band, enable_gqa=True)``;
* ``tiled``     -- ``attnfuse.kernels.tiled.forward(..., causal=True, window_left=window - 1)``, the CPU
  kernel attnfuse runs for a proven window (it visits only the tiles of the band).

Every (part, seq, variant) runs in its own fresh process (this script with ``--worker``), so no allocator
state, compile cache or peak is shared between measurements.  Time: one first call (compiles), ``--warmup``
more, then the median of ``--reps`` timed forwards.  On a shared CPU a forward during which other processes
kept a core busy is retried for up to ``--retry-s`` seconds (OpenMP threads that lose their core make a
forward several times slower) and the ``--reps`` quietest are kept; ``others_busy_cores`` is the most cores
other processes kept busy during a kept forward, ``median_cpu_s`` the process CPU time per forward.

Memory, both counted from the forward's start, so the weights and inputs (allocated before) are the
baseline and the numbers are the forward's own, i.e. the attention's plus the other layers' activations:

* ``forward_alloc_peak_mb`` (primary): most bytes of tensors live at once in PyTorch's CPU allocator
  during one forward (``torch.profiler`` memory events);
* ``forward_rss_peak_mb``: that forward's growth of resident set size (peak reset through
  ``/proc/self/clear_refs``); it also sees memory kernels take from malloc directly.

Every output is compared with its part's baseline (``eager`` for the model, ``sdpa_band`` for the kernel),
run in the same worker after the measurements: ``max_abs_diff`` and ``max_rel_diff`` (max abs difference over
the baseline's largest magnitude).  Results: ``benchmarks/results/window-cpu-<date>.json`` and ``.png``, and a
table on stdout; ``--from-json PATH --rerun-busy`` measures again the rows that failed or ran on a busy
machine and rewrites both.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_models as _bm  # noqa: E402 - the sibling script's memory probes, machine info and idle wait

PARTS = {"model": ("eager", "inductor", "attnfuse"), "kernel": ("sdpa_band", "tiled")}
BASELINE = {"model": "eager", "kernel": "sdpa_band"}
FAST = {"model": "attnfuse", "kernel": "tiled"}
CONFIG = dict(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
              intermediate_size=512, vocab_size=512)
GOAL = {"seq": 16384, "speedup": 10.0, "memory_ratio": 0.1}
_MARK = _bm._MARK


def build(part: str, variant: str, seq: int, window: int, attn: str):
    """``forward()`` for one measurement; every input is made here, before the forward's baseline."""
    import torch

    torch.manual_seed(0)
    if part == "model":
        from transformers import MistralConfig, MistralForCausalLM

        cfg = MistralConfig(**CONFIG, sliding_window=window, max_position_embeddings=seq, bos_token_id=0,
                            eos_token_id=0, pad_token_id=0)
        model = MistralForCausalLM._from_config(cfg, attn_implementation=attn).eval()
        if variant == "inductor":
            model = torch.compile(model)
        elif variant == "attnfuse":
            import attnfuse  # noqa: F401 - registers the op; the backend comes through its entry point

            model = torch.compile(model, backend="attnfuse")
        idx = torch.randint(0, CONFIG["vocab_size"], (1, seq))
        return lambda: model(idx, use_cache=False).logits
    heads, kv_heads, dim = CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"], CONFIG["head_dim"]
    q = torch.randn(1, heads, seq, dim)
    k, v = torch.randn(1, kv_heads, seq, dim), torch.randn(1, kv_heads, seq, dim)
    if variant == "tiled":
        from attnfuse.kernels import tiled

        return lambda: tiled.forward(q, k, v, scale=dim**-0.5, causal=True, window_left=window - 1,
                                     kv_groups=heads // kv_heads)

    def sdpa_band():
        i = torch.arange(seq)
        band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=True)

    return sdpa_band


def measure(part: str, seq: int, variant: str, window: int, attn: str, reps: int, warmup: int,
            retry_s: float) -> dict[str, Any]:
    """Time and memory of one (part, seq, variant) in this process, then its output against the part's
    baseline, built and run here after every measurement; see the module docstring."""
    import torch

    res: dict[str, Any] = {"part": part, "seq": seq, "variant": variant}
    forward = build(part, variant, seq, window, attn)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = forward()
        res["first_call_s"] = time.perf_counter() - t0
        for _ in range(warmup):
            forward()
        runs = []  # (wall s, CPU s, cores other processes kept busy) per timed forward
        deadline = time.perf_counter() + retry_s
        while sum(r[2] < _bm._QUIET for r in runs) < reps and (len(runs) < reps or time.perf_counter() < deadline):
            snap, t0, c0 = _bm._cpu_snapshot(), time.perf_counter(), time.process_time()
            forward()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            runs.append((wall, cpu, _bm._others_cores(snap, _bm._cpu_snapshot())))
            if runs[-1][2] >= _bm._QUIET:
                time.sleep(1.0)  # give the other process a chance to finish
        used = sorted(runs, key=lambda r: r[2])[:reps]  # the quietest forwards
        res["times_s"], res["all_times_s"] = [r[0] for r in used], [r[0] for r in runs]
        res["median_s"], res["median_cpu_s"] = statistics.median(res["times_s"]), statistics.median(r[1] for r in used)
        res["others_busy_cores"] = max(r[2] for r in used)
        _bm._exact_malloc()
        before = _bm._reset_peak_rss() and _bm._proc_status_mb("VmRSS")
        forward()
        if before:
            res["forward_rss_peak_mb"] = _bm._proc_status_mb("VmHWM") - before
        res["forward_alloc_peak_mb"] = _bm._alloc_peak_mb(forward)
    if variant == "attnfuse":
        import attnfuse

        rep = attnfuse.last_report()
        res["fused_sites"] = f"{len(rep.fused)}/{len(rep.sites)}" if rep is not None else "no report"
        res["site_masks"] = sorted({json.dumps(s.mask, sort_keys=True) for s in rep.sites}) if rep else []
    if variant != BASELINE[part]:
        del forward
        with torch.no_grad():
            ref = build(part, BASELINE[part], seq, window, attn)()
        diff = (out.double() - ref.double()).abs().max().item()
        res["max_abs_diff"], res["max_rel_diff"] = diff, diff / max(ref.abs().max().item(), 1e-30)
    return res


def run_in_subprocess(part: str, seq: int, variant: str, args: argparse.Namespace,
                      timeout: float = 3600) -> dict[str, Any]:
    """`measure` in a fresh process; a failure comes back as ``{"error": ...}``."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", part, str(seq), variant,
           "--window", str(args.window), "--attn", args.attn, "--reps", str(args.reps), "--warmup", str(args.warmup),
           "--retry-s", str(args.retry_s)]
    return _bm.run_worker(cmd, {"part": part, "seq": seq, "variant": variant}, timeout)


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (part, seq): baseline time / each variant's time, and each variant's forward peaks / the baseline's."""
    ok = {(r["part"], r["seq"], r["variant"]): r for r in results if "error" not in r}
    rows = []
    for part, seq in dict.fromkeys((r["part"], r["seq"]) for r in results):
        base = ok.get((part, seq, BASELINE[part]))
        if base is None:
            continue
        for variant in PARTS[part]:
            r = ok.get((part, seq, variant))
            if r is None or variant == BASELINE[part]:
                continue
            row = {"part": part, "seq": seq, "variant": variant, "speedup": base["median_s"] / r["median_s"]}
            for metric in ("forward_alloc_peak_mb", "forward_rss_peak_mb"):
                if r.get(metric) and base.get(metric):
                    row[f"memory_ratio_{metric.removesuffix('_mb')}"] = r[metric] / base[metric]
            rows.append(row)
    return rows


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets at seq 16k (speedup >= 10 over eager, forward peak <= 1/10 of eager's) per part."""
    out = []
    for row in rows:
        if row["seq"] == GOAL["seq"] and row["variant"] == FAST[row["part"]]:
            mem = row.get("memory_ratio_forward_alloc_peak")
            out.append({"part": row["part"], "seq": row["seq"], "speedup": round(row["speedup"], 2),
                        "speedup_met": row["speedup"] >= GOAL["speedup"],
                        "memory_ratio": None if mem is None else round(mem, 4),
                        "memory_met": mem is not None and mem <= GOAL["memory_ratio"]})
    return out


def table(results: list[dict[str, Any]]) -> str:
    head = ("part", "seq", "variant", "median s", "cpu s", "first s", "fwd tensor MB", "fwd RSS MB", "max rel diff",
            "busy", "note")
    lines = [head]
    for r in results:
        if "error" in r:
            lines.append((r["part"], str(r["seq"]), r["variant"], *["-"] * 7, r["error"][:80]))
            continue
        fmt = lambda k, f="{:.0f}": f.format(r[k]) if r.get(k) is not None else "-"
        lines.append((r["part"], str(r["seq"]), r["variant"], fmt("median_s", "{:.3f}"), fmt("median_cpu_s", "{:.3f}"),
                      fmt("first_call_s", "{:.1f}"),
                      fmt("forward_alloc_peak_mb"), fmt("forward_rss_peak_mb"), fmt("max_rel_diff", "{:.1e}"),
                      fmt("others_busy_cores", "{:.1f}"), r.get("fused_sites", "")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def plot(results: list[dict[str, Any]], title: str, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    ok = [r for r in results if "error" not in r]
    parts = [p for p in PARTS if any(r["part"] == p for r in ok)]
    metrics = (("median_s", "median forward time (s)"), ("forward_alloc_peak_mb", "forward peak tensor memory (MB)"))
    fig, axes = plt.subplots(len(metrics), max(len(parts), 1), figsize=(5 * max(len(parts), 1), 7.5), squeeze=False)
    for col, part in enumerate(parts):
        for row, (metric, label) in enumerate(metrics):
            ax = axes[row][col]
            for variant in PARTS[part]:
                pts = sorted((r["seq"], r[metric]) for r in ok
                             if r["part"] == part and r["variant"] == variant and r.get(metric) is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=variant)
            seqs = sorted({r["seq"] for r in ok if r["part"] == part})
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
            for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis(FuncFormatter(lambda y, _: f"{y:g}"))
            ax.set_xticks(seqs, [str(s) for s in seqs])
            ax.set_xlabel("sequence length")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
            if row == 0:
                ax.set_title(part)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)




def _run(part: str, seq: int, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    if args.wait_idle > 0:
        _bm.wait_for_idle(args.wait_idle)
    t0 = time.perf_counter()
    r = run_in_subprocess(part, seq, variant, args)
    msg = r.get("error") or (f"median {r['median_s']:.3f} s, forward tensors {r.get('forward_alloc_peak_mb') or 0:.0f}"
                             f" MB, busy {r['others_busy_cores']:.1f}")
    _bm.log(f"[{time.perf_counter() - t0:6.1f} s] {part:6s} seq {seq:5d} {variant:9s} {msg}")
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=_bm._csv(int), default=[8192, 16384])
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="HF attn_implementation of the model")
    p.add_argument("--parts", type=_bm._csv(str), default=list(PARTS), help="comma-separated: " + ",".join(PARTS))
    p.add_argument("--reps", type=int, default=3, help="timed forwards per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards after the first (compiling) one")
    p.add_argument("--retry-s", type=float, default=120.0, metavar="SECONDS",
                   help="keep timing forwards up to this long until --reps of them ran on a quiet machine")
    _bm.add_common_args(p, ("PART", "SEQ", "VARIANT"))
    args = p.parse_args(argv)
    if args.worker:
        part, seq, variant = args.worker
        res = measure(part, int(seq), variant, args.window, args.attn, args.reps, args.warmup, args.retry_s)
        print(_MARK + json.dumps(res), flush=True)
        return 0
    for part in args.parts:
        if part not in PARTS:
            p.error(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
    command = " ".join(["benchmarks/bench_window_cpu.py", *(argv if argv is not None else sys.argv[1:])])

    if args.from_json:
        json_path = pathlib.Path(args.from_json)
        doc = json.loads(json_path.read_text())
        setup = doc["setup"]
        args.window, args.attn = setup["window"], setup["model"]["attn_implementation"]
        args.reps, args.warmup, args.retry_s = setup["reps"], setup["warmup"], setup["retry_s"]
        for i, r in enumerate(doc["results"]):
            if args.rerun_busy and ("error" in r or r["others_busy_cores"] >= _bm._QUIET):
                doc["results"][i] = _run(r["part"], r["seq"], r["variant"], args)
        doc.setdefault("later_commands", []).append(command)
        write(doc, json_path)
        return 0
    info = _bm.machine_info()
    today = datetime.date.today().isoformat()
    out = pathlib.Path(args.out)
    json_path = out if out.suffix == ".json" else out / f"window-cpu-{today}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    configs = [(part, seq, variant) for part in args.parts for seq in args.seqs for variant in PARTS[part]]
    results = [_run(part, seq, variant, args) for part, seq, variant in _bm.progress(configs, "bench_window_cpu")]
    doc = {"benchmark": "bench_window_cpu", "date": today, "device": _bm.device_tag(info), "machine": info,
           "setup": {"model": {**CONFIG, "sliding_window": args.window, "attn_implementation": args.attn,
                               "dtype": "float32", "batch": 1, "grad": "torch.no_grad()", "mode": "eval()"},
                     "window": args.window, "reps": args.reps, "warmup": args.warmup, "retry_s": args.retry_s,
                     "process": "each (part, seq, variant) in a fresh process"},
           "results": results, "command": command}
    write(doc, json_path)
    return 0


def write(doc: dict[str, Any], json_path: pathlib.Path) -> None:
    """Add ratios and goals to ``doc``; write it as JSON and the plot as PNG next to it; print a summary."""
    results = doc["results"]
    doc["ratios"] = ratios(results)
    doc["goals"] = goals(doc["ratios"])
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    png_path = json_path.with_suffix(".png")
    plot(results, f"sliding window {doc['setup']['window']} on {doc['device']}: Mistral-style model "
                  f"({doc['setup']['model']['attn_implementation']}) and one attention call, fp32, batch 1 "
                  f"({doc['date']})", png_path)
    _bm.print_summary(table(results), doc, json_path, png_path)


if __name__ == "__main__":
    sys.exit(main())
