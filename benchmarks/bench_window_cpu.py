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
import json
import pathlib
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # _common, also when loaded by path (tests)
import _common as common  # noqa: E402

PARTS = {"model": ("eager", "inductor", "attnfuse"), "kernel": ("sdpa_band", "tiled")}
BASELINE = {"model": "eager", "kernel": "sdpa_band"}
FAST = {"model": "attnfuse", "kernel": "tiled"}
CONFIG = dict(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
              intermediate_size=512, vocab_size=512)
GOAL = {"seq": 16384, "speedup": 10.0, "memory_ratio": 0.1}


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
        timing = common.time_call(forward, "cpu", reps=reps, warmup=warmup, retry_s=retry_s)
        res["times_s"], res["all_times_s"] = timing.times_s, timing.all_times_s
        res["median_s"], res["median_cpu_s"] = timing.median_s, statistics.median(timing.cpu_times_s)
        res["others_busy_cores"] = timing.others_busy_cores
        common.exact_malloc()
        before = common.reset_peak_rss() and common.proc_status_mb("VmRSS")
        forward()
        if before:
            res["forward_rss_peak_mb"] = common.proc_status_mb("VmHWM") - before
        res["forward_alloc_peak_mb"] = common.alloc_peak_mb(forward)
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
    return common.run_worker(cmd, {"part": part, "seq": seq, "variant": variant}, timeout)


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
    lines = []
    for r in results:
        if "error" in r:
            lines.append((r["part"], str(r["seq"]), r["variant"], *["-"] * 7, r["error"][:80]))
            continue
        fmt = lambda k, f="{:.0f}": common.fmt(r.get(k), f)
        lines.append((r["part"], str(r["seq"]), r["variant"], fmt("median_s", "{:.3f}"), fmt("median_cpu_s", "{:.3f}"),
                      fmt("first_call_s", "{:.1f}"),
                      fmt("forward_alloc_peak_mb"), fmt("forward_rss_peak_mb"), fmt("max_rel_diff", "{:.1e}"),
                      fmt("others_busy_cores", "{:.1f}"), r.get("fused_sites", "")))
    return common.table(lines, head)


def plot(results: list[dict[str, Any]], title: str, path: pathlib.Path) -> None:
    """A column per part, a row per metric (time, forward tensor peak) vs seq, a line per variant."""
    ok = [r for r in results if "error" not in r]
    parts = [p for p in PARTS if any(r["part"] == p for r in ok)]
    metrics = (("median_s", "median forward time (s)"), ("forward_alloc_peak_mb", "forward peak tensor memory (MB)"))
    grid = [[common.Panel([common.Line(variant, [(r["seq"], r[metric]) for r in ok if r["part"] == part
                                                 and r["variant"] == variant and r.get(metric) is not None])
                           for variant in PARTS[part]],
                          sorted({r["seq"] for r in ok if r["part"] == part}), title=part if row == 0 else "",
                          ylabel=label) for part in parts]
            for row, (metric, label) in enumerate(metrics)]
    common.plot(grid, path, title, figsize=(5 * max(len(parts), 1), 7.5))


def _run(part: str, seq: int, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    if args.wait_idle > 0:
        common.wait_for_idle(args.wait_idle)
    t0 = time.perf_counter()
    r = run_in_subprocess(part, seq, variant, args)
    msg = r.get("error") or (f"median {r['median_s']:.3f} s, forward tensors {r.get('forward_alloc_peak_mb') or 0:.0f}"
                             f" MB, busy {r['others_busy_cores']:.1f}")
    common.log(f"[{time.perf_counter() - t0:6.1f} s] {part:6s} seq {seq:5d} {variant:9s} {msg}")
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=common.csv(int), default=[8192, 16384])
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="HF attn_implementation of the model")
    p.add_argument("--parts", type=common.csv(str), default=list(PARTS), help="comma-separated: " + ",".join(PARTS))
    p.add_argument("--reps", type=int, default=3, help="timed forwards per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards after the first (compiling) one")
    p.add_argument("--retry-s", type=float, default=120.0, metavar="SECONDS",
                   help="keep timing forwards up to this long until --reps of them ran on a quiet machine")
    common.add_common_args(p, ("PART", "SEQ", "VARIANT"))
    args = p.parse_args(argv)
    if args.worker:
        part, seq, variant = args.worker
        res = measure(part, int(seq), variant, args.window, args.attn, args.reps, args.warmup, args.retry_s)
        common.emit(res)
        return 0
    common.check_choices(p, "part", args.parts, list(PARTS))
    command = common.command(__file__, argv)

    if args.from_json:
        json_path = pathlib.Path(args.from_json)
        doc = json.loads(json_path.read_text())
        setup = doc["setup"]
        args.window, args.attn = setup["window"], setup["model"]["attn_implementation"]
        args.reps, args.warmup, args.retry_s = setup["reps"], setup["warmup"], setup["retry_s"]
        if args.rerun_busy:
            common.rerun_busy(doc, lambda r: _run(r["part"], r["seq"], r["variant"], args))
        doc.setdefault("later_commands", []).append(command)
        write(doc, json_path)
        return 0
    info = common.machine_info()
    today = common.today()
    json_path = common.json_path(args.out, f"window-{common.device_tag('cpu', today)}.json")
    configs = [(part, seq, variant) for part in args.parts for seq in args.seqs for variant in PARTS[part]]
    results = [_run(part, seq, variant, args) for part, seq, variant in common.progress(configs, "bench_window_cpu")]
    doc = {"benchmark": "bench_window_cpu", "date": today, "device": common.device_name("cpu"), "machine": info,
           **common.versions(),
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
    common.write_json(json_path, doc)
    png_path = json_path.with_suffix(".png")
    plot(results, f"sliding window {doc['setup']['window']} on {doc['device']}: Mistral-style model "
                  f"({doc['setup']['model']['attn_implementation']}) and one attention call, fp32, batch 1 "
                  f"({doc['date']})", png_path)
    common.print_summary(table(results), doc, json_path, png_path)


if __name__ == "__main__":
    sys.exit(main())
