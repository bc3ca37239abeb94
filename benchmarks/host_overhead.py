"""Per-call time of a compiled tiny LLaMA decode step on CPU, stock ``torch.compile`` (Inductor) vs attnfuse.

    python benchmarks/host_overhead.py [--threads 1,2] [--kv-len 128] [--calls 2000] [--warmup 100]
                                       [--rounds 5] [--parts step,attention,op] [--out PATH]

At this size the arithmetic is a few microseconds, so the per-call time is host overhead: guards, the
compiled graph's wrapper, Python dispatch.  The issue's goal: attnfuse's decode step within 1.1x of stock
compile's per-call time.  Parts (each variant, thread count and round in its own fresh process, this script
with ``--worker``; rounds alternate the variants, so load drift on a shared machine hits all alike):

* ``step`` -- HF ``LlamaForCausalLM`` from a config with random weights (seed 0): 2 layers, hidden 64, 4 query
  heads and 2 K/V heads (head dim 16), MLP 128, vocab 256, fp32, ``attn_implementation="sdpa"``, ``eval()``,
  under ``no_grad``.  A ``StaticCache`` of ``--kv-len`` + 1 slots holds a ``--kv-len``-token prompt (run
  eagerly); each timed call decodes one token into the last slot (the cache's write position is reset before
  every call, outside the timer), so every call runs the same graph on the same shapes.  Variants:
  ``inductor`` (``torch.compile(step)``), ``attnfuse`` (``backend="attnfuse"``), and ``attnfuse_opaque``: the
  same but with the op kept as one opaque node (`attnfuse._cpu_graph` switched off), i.e. the op's own
  Python dispatch and checks on every call, as before the CPU decomposition.
* ``attention`` -- the decode step's attention alone, compiled: ``F.scaled_dot_product_attention`` of
  (1, 4, 1, 16) queries on (1, 2, kv_len + 1, 16) keys/values with a (1, 1, 1, kv_len + 1) bool mask,
  ``enable_gqa=True``; same variants.
* ``op`` -- the same call uncompiled: ``sdpa`` (eager SDPA) vs ``attnfuse`` (``attnfuse.ops.attend``, the op
  through the dispatcher: what ``inner="eager"`` and direct users pay per call).

Time: ``--warmup`` calls, then ``--calls`` calls each timed alone (``perf_counter``); a row reports their
median (and p10/p90) in microseconds.  Every compiled output is compared with the uncompiled one
(``max_abs_diff``).  ``--threads``: intra-op threads.  With 2 threads on a loaded 2-core machine an OpenMP
parallel region (SDPA's, in both variants) may wait milliseconds for a descheduled worker, which swamps the
host overhead; the 1-thread rows are the host-overhead measure, the 2-thread rows what such a machine gives.
The summary holds, per (part, threads), each variant's median and min over rounds (of the per-round medians)
and their ratios to the baseline variant.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import time
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # _common, also when loaded by path (tests)
import _common as common  # noqa: E402

VARIANTS = {"step": ("inductor", "attnfuse", "attnfuse_opaque"),
            "attention": ("inductor", "attnfuse", "attnfuse_opaque"), "op": ("sdpa", "attnfuse")}
BASELINE = {"step": "inductor", "attention": "inductor", "op": "sdpa"}


def _timed(fn, reset, calls: int, warmup: int) -> dict[str, float]:
    """Median, p10 and p90 (microseconds) of ``calls`` bare perf_counter samples after ``warmup`` calls."""
    timing = common.time_call(fn, "cpu", reps=calls, warmup=warmup, setup=reset, track_load=False)
    us = sorted(t * 1e6 for t in timing.times_s)
    return {"median_us": statistics.median(us), "p10_us": us[len(us) // 10], "p90_us": us[len(us) * 9 // 10]}


def _step(kv_len: int):
    """(decode step, cache reset) of the tiny LLaMA; the step returns the logits."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(cfg).eval()
    cache = transformers.StaticCache(config=cfg, max_cache_len=kv_len + 1)
    prompt = torch.randint(0, 256, (1, kv_len), generator=torch.Generator().manual_seed(1))
    model(prompt, past_key_values=cache, cache_position=torch.arange(kv_len), use_cache=True)
    ids, pos = torch.tensor([[7]]), torch.tensor([kv_len])

    def reset():  # transformers 5 keeps the write position in the cache; older versions take cache_position
        for layer in getattr(cache, "layers", ()):
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length.fill_(kv_len)

    def step():
        return model(ids, past_key_values=cache, cache_position=pos, use_cache=True).logits

    return step, reset


def _attention_inputs(kv_len: int):
    import torch

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, 16, generator=g)
    k, v = (torch.randn(1, 2, kv_len + 1, 16, generator=g) for _ in range(2))
    mask = torch.rand(1, 1, 1, kv_len + 1, generator=g) > 0.1
    return q, k, v, mask


def worker(part: str, variant: str, threads: int, kv_len: int, calls: int, warmup: int) -> dict:
    import torch
    import torch.nn.functional as F

    import attnfuse
    from attnfuse import ops

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if variant == "attnfuse_opaque":
        from attnfuse import _cpu_graph

        _cpu_graph.forward = _cpu_graph.attention_sdpa = lambda *args, **kwargs: None  # the op stays whole
    row: dict = {"part": part, "variant": variant, "threads": threads, "kv_len": kv_len,
                 "load_before": os.getloadavg()[0]}
    with torch.no_grad():
        if part == "step":
            fn, reset = _step(kv_len)
        else:
            q, k, v, mask = _attention_inputs(kv_len)

            def fn():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)

            def reset():
                pass

        reset()
        expected = fn()
        timed = fn
        if part == "op" and variant == "attnfuse":
            def timed():
                return ops.attend(q, k, v, mask, scale=0.25, kv_groups=2)

            row["max_abs_diff"] = (timed() - expected).abs().max().item()
        if part != "op":
            torch._dynamo.reset()
            backend = "inductor" if variant == "inductor" else "attnfuse"
            timed = torch.compile(fn, backend=backend)
            start = time.perf_counter()
            reset()
            got = timed()
            row["first_call_s"] = time.perf_counter() - start
            row["max_abs_diff"] = (got - expected).abs().max().item()
            if backend == "attnfuse":
                row["fused_sites"] = len(attnfuse.last_report().fused)
        row.update(_timed(timed, reset, calls, warmup))
    row["load_after"] = os.getloadavg()[0]
    return row


def summarize(rows: list[dict]) -> list[dict]:
    """Per (part, threads): each variant's median and min over rounds of its per-round median, and their ratios to
    the baseline variant (the min is the least disturbed round, on a shared machine)."""
    out = []
    for part in VARIANTS:
        for threads in sorted({r["threads"] for r in rows if r["part"] == part}):
            med, low = {}, {}
            for variant in VARIANTS[part]:
                got = [r["median_us"] for r in rows if (r["part"], r["threads"], r["variant"]) == (part, threads,
                                                                                                 variant)]
                if got:
                    med[variant], low[variant] = statistics.median(got), min(got)
            base = BASELINE[part]
            out.append({"part": part, "threads": threads, "median_us": med, "min_us": low,
                        "ratio": {v: t / med[base] for v, t in med.items() if base in med and v != base},
                        "ratio_min": {v: t / low[base] for v, t in low.items() if base in low and v != base}})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=common.csv(int), default=[1, 2])
    p.add_argument("--kv-len", type=int, default=128)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--parts", type=common.csv(str), default=["step", "attention", "op"])
    p.add_argument("--variants", type=common.csv(str), default=[],
                   help="only these variants (comma-separated; default: all)")
    p.add_argument("--out", default=None, help="output .json path or folder (default: benchmarks/results, "
                                               "host-overhead-cpu-<date>.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        part, variant, threads = args.worker.split(":")
        common.emit(worker(part, variant, int(threads), args.kv_len, args.calls, args.warmup))
        return
    rows = []
    for threads in args.threads:
        for rnd in range(args.rounds):
            for part in args.parts:
                for variant in VARIANTS[part]:
                    if args.variants and variant not in args.variants:
                        continue
                    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker",
                           f"{part}:{variant}:{threads}", "--kv-len", str(args.kv_len), "--calls", str(args.calls),
                           "--warmup", str(args.warmup)]
                    got = common.run_worker(cmd, {}, env={**os.environ, "PYTHONWARNINGS": "ignore"}, tail=40)
                    if "error" in got:
                        raise SystemExit(f"{' '.join(cmd)} failed: {got['error']}")
                    row = {**got, "round": rnd}
                    rows.append(row)
                    print(f"threads {threads} round {rnd} {part:9s} {variant:16s} median {row['median_us']:9.1f} us"
                          f"  (p10 {row['p10_us']:.1f}, p90 {row['p90_us']:.1f}, load {row['load_before']:.1f})",
                          flush=True)
    summary = summarize(rows)
    for s in summary:
        ratios = ", ".join(f"{v} {r:.2f}x (min {s['ratio_min'][v]:.2f}x)" for v, r in s["ratio"].items())
        print(f"{s['part']:9s} threads {s['threads']}: " + ", ".join(f"{v} {t:.1f} us" for v, t in
                                                                    s["median_us"].items()) + f"; {ratios}")
    import transformers

    today = common.today()
    meta = {"date": today, "command": common.command(__file__, argv), **common.versions(),
            "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "kv_len": args.kv_len, "calls": args.calls, "warmup": args.warmup, "rounds": args.rounds}
    name = f"host-overhead-{common.device_tag('cpu', today)}.json"
    out = common.write_json(common.json_path(args.out or common.RESULTS, name),
                            {"meta": meta, "summary": summary, "rows": rows}, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
