"""Tensor Product Attention: a T6-style model as written vs attnfuse vs the same model with a plain MHA cache.

    python benchmarks/bench_tpa.py [--device auto|cpu|cuda] [--arms as_written,attnfuse,mha_cache]
                                   [--phases prefill,decode] [--prefill-seqs 4096,16384]
                                   [--decode-ctxs 8192,32768,65536] [--steps 8] [--quick] [--out benchmarks/results]
    python benchmarks/bench_tpa.py --from-json RESULTS.json [--rerun-busy]   # re-make goals and plot (re-measure)

The model (`t6_model`, random seeded weights): ``--layers`` 2 pre-norm blocks, width ``--dim`` 512, ``--heads`` 8
of ``--head-dim`` 64, TPA ranks ``--q-rank`` 6 and ``--rank`` 2 (the paper's small configuration scaled down),
SwiGLU MLP of 2x width, vocab 256, batch 1; CPU float32, CUDA bfloat16.  Arms:

* ``as_written`` -- `t6_model.T6` eager: factors -> formed q/k/v (``--spelling``, default the reference code's
  bmm) -> SDPA; its decode cache holds the factors (``R * (H + D)`` numbers per token for K and for V) and every
  step re-forms K/V of the whole cache;
* ``attnfuse``   -- ``torch.compile(model, backend="attnfuse", options={"inner": --inner})`` of the same model
  (whatever attnfuse does with it today: each result records the report's sites and their kernel names, and
  ``tpa_kernel`` says whether the ``tpa`` kernel ran); decode marks the cache's token axis dynamic
  (``torch._dynamo.mark_dynamic``) so that one compile serves the growing cache;
* ``attnfuse_tpa`` (not by default) -- the same with ``options["kernels"] = ["tpa"]``: the tpa family wherever it
  applies, whatever the plan would choose (CPU prefill: the blocked path, which the cost model's
  ``CPU_BLOCKED_RATIO`` weighs by this arm's prefill time over as_written's);
* ``mha_cache``  -- `t6_model.MHA` eager: the same decoder with plain multi-head attention and a plain K/V cache
  of ``H * D`` numbers per token for K and for V.

Phases: ``prefill`` -- one forward over ``seq`` random tokens (logits of every position, no cache);
``decode`` -- one-token steps after a cache of ``ctx`` tokens filled with random numbers of the right shapes (no
64k prefill; the cost does not depend on the values), the cache grown with ``torch.cat`` as the model does:
``--decode-warmup`` steps, then the median of ``--steps`` timed steps (the context grows by one per step;
``context_end`` records where it ended).  Prefill: the median of ``--reps`` calls after ``--warmup``.  The first
call (the compile, for attnfuse) is timed apart (``first_call_s``); attnfuse's first output is checked against the
eager model's (``rel_err_vs_eager``).  On a shared CPU, calls during which other processes kept a core busy are
retried for up to ``--retry-s`` seconds (``others_busy_cores`` says how quiet it was).

Memory of one more call (a prefill, or a decode step -- the step's new cache and the old one alive together, as
``torch.cat`` caches are), counted from its start: CPU ``alloc_peak_mb`` (most tensor bytes live at once, from
``torch.profiler`` memory events) and ``rss_peak_mb`` (peak RSS growth); CUDA ``alloc_peak_mb`` from
``max_memory_allocated``.  ``cache_mb``: the decode cache's size at ``ctx``.

Every (arm, phase, length) runs in a fresh process (this script with ``--worker``), with torch's own thread count
(``--threads N`` sets it).  ``--quick``: a smoke run in seconds -- width 64, 4 heads of 16, R_q 4, prefill 128,
decode after 256, one thread, attnfuse's inner compiler ``eager`` (Inductor's compile would dominate).

Goals (printed, in the JSON, not asserted): attnfuse decode per token at 32k >= 3x faster than as_written;
attnfuse prefill (at 4k and 16k, the slower ratio) no slower than as_written.  Results:
``benchmarks/results/tpa-<device>-<date>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # _common, t6_model, also when loaded by path
import _common as common  # noqa: E402

ARMS = ("as_written", "attnfuse", "mha_cache", "attnfuse_tpa")
DEFAULT_ARMS = ARMS[:3]
PHASES = ("prefill", "decode")
INNER = ("inductor", "eager")
LABELS = {"as_written": "T6 as written (formed K/V + SDPA)", "attnfuse": "T6 through attnfuse",
          "mha_cache": "MHA, plain K/V cache", "attnfuse_tpa": "T6 through attnfuse, tpa forced"}
COLORS = {"as_written": "tab:blue", "attnfuse": "tab:orange", "mha_cache": "tab:gray", "attnfuse_tpa": "tab:red"}
SHAPE = ("batch", "vocab", "dim", "layers", "heads", "head_dim", "q_rank", "rank")
KNOBS = ("reps", "warmup", "steps", "decode_warmup")
DEFAULTS = dict(prefill_seqs=[4096, 16384], decode_ctxs=[8192, 32768, 65536], batch=1, vocab=256, dim=512,
                layers=2, heads=8, head_dim=64, q_rank=6, rank=2, reps=3, warmup=1, steps=8, decode_warmup=3,
                retry_s=30.0, inner="inductor", threads=0)
QUICK = dict(prefill_seqs=[128], decode_ctxs=[256], vocab=128, dim=64, heads=4, head_dim=16, q_rank=4, reps=2,
             steps=3, decode_warmup=2, retry_s=0.0, inner="eager", threads=1)
GOAL_DECODE = {"length": 32768, "min_speedup": 3.0}
GOAL_PREFILL = {"lengths": (4096, 16384), "min_speedup": 1.0}


# ---------------------------------------------------------------- one configuration (worker side)

def build(arm: str, args: argparse.Namespace, device: str):
    """(eager model, what to call): the arm's model on ``device`` in ``args.dtype``, compiled for attnfuse."""
    import t6_model
    import torch

    if arm == "mha_cache":
        model = t6_model.MHA(args.vocab, args.dim, args.layers, args.heads, args.head_dim, seed=0)
    else:
        model = t6_model.T6(args.vocab, args.dim, args.layers, args.heads, args.head_dim, args.q_rank, args.rank,
                            args.spelling, seed=0)
    model = model.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    if not arm.startswith("attnfuse"):
        return model, model
    import attnfuse  # noqa: F401 - registers the backend

    forced = {"kernels": ["tpa"]} if arm == "attnfuse_tpa" else {}
    return model, torch.compile(model, backend="attnfuse", options={"inner": args.inner, **forced})


def site_info(report) -> list[dict[str, Any]]:
    return [{"status": s.status, "kernel": s.kernel, "reason": s.reason, "pattern": s.pattern, "shapes": s.shapes}
            for s in (report.sites if report is not None else [])]


def measure(arm: str, phase: str, length: int, args: argparse.Namespace) -> dict[str, Any]:
    """Time and memory of one (arm, phase, length) in this process; see the module docstring."""
    import t6_model
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device, cuda = args.device, args.device == "cuda"
    model, fn = build(arm, args, device)
    g = torch.Generator().manual_seed(1)
    res: dict[str, Any] = {"arm": arm, "phase": phase, "length": length, "threads": torch.get_num_threads(),
                           "cache_numel_per_token_layer": model.cache_numel_per_token()}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if phase == "prefill":
        tokens = torch.randint(args.vocab, (args.batch, length), generator=g).to(device)

        def call():
            return fn(tokens)

        def eager():
            return model(tokens)
    else:
        cache = model.random_cache(args.batch, length, g)
        start = t6_model.Cache(cache.layers, cache.length)  # the tensors are never written: sharing them is safe
        if arm.startswith("attnfuse"):
            for t in (t for layer in cache.layers for t in layer):
                torch._dynamo.mark_dynamic(t, model.cache_seq_dim)
        res["cache_mb"] = cache.nbytes() / common.MIB
        token = torch.randint(args.vocab, (args.batch, 1), generator=g).to(device)

        def call():
            return model.generate_step(token, cache, fn)

        def eager():
            return model.generate_step(token, t6_model.Cache(start.layers, start.length))

    with torch.no_grad():
        t0 = time.perf_counter()
        out = call()
        sync()
        res["first_call_s"] = time.perf_counter() - t0
        if arm.startswith("attnfuse"):
            import attnfuse

            res["rel_err_vs_eager"] = common.rel_err(out, eager())
            res["sites"] = site_info(attnfuse.last_report())
            res["kernels"] = sorted({s["kernel"] for s in res["sites"] if s["kernel"]})
            res["tpa_kernel"] = "tpa" in res["kernels"]
        del out
        reps, warmup = (args.reps, args.warmup) if phase == "prefill" else (args.steps, args.decode_warmup)
        timing = common.time_call(call, device, reps=reps, warmup=warmup, retry_s=args.retry_s)
        res["times_s"], res["median_s"] = timing.times_s, timing.median_s
        res["others_busy_cores"] = timing.others_busy_cores
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            call()
            sync()
            res["alloc_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / common.MIB
        else:
            common.exact_malloc()
            before = common.reset_peak_rss() and common.proc_status_mb("VmRSS")
            call()
            if before:
                res["rss_peak_mb"] = common.proc_status_mb("VmHWM") - before
            res["alloc_peak_mb"] = common.alloc_peak_mb(call)
    if phase == "decode":
        res["context_end"] = cache.length
    return res


# ---------------------------------------------------------------- summary (no torch needed)

def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (phase, length, arm other than as_written): speedup over as_written and peak-memory ratio to it (None
    where a side was not measured)."""
    ok = {(r["phase"], r["length"], r["arm"]): r for r in results if "median_s" in r}
    out = []
    for (phase, length, arm), r in ok.items():
        if arm == "as_written":
            continue
        base = ok.get((phase, length, "as_written"))
        out.append({"phase": phase, "length": length, "arm": arm,
                    "speedup_vs_as_written": base["median_s"] / r["median_s"] if base else None,
                    "memory_vs_as_written": (r["alloc_peak_mb"] / base["alloc_peak_mb"]
                                             if base and r.get("alloc_peak_mb") and base.get("alloc_peak_mb")
                                             else None)})
    return out


def goals(rows: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """The issue's two goals for the attnfuse arm, from `ratios` rows (``met`` None: not measured)."""
    got = {(r["phase"], r["length"]): r["speedup_vs_as_written"] for r in rows
           if r["arm"] == "attnfuse" and r["speedup_vs_as_written"] is not None}
    n, need = GOAL_DECODE["length"], GOAL_DECODE["min_speedup"]
    what = f"{device}: attnfuse decode per token at {common.seq_label(n)} >= {need:g}x faster than as_written"
    value = got.get(("decode", n))
    out = [{"goal": what, "value": None, "met": None, "note": "not measured"} if value is None else
           {"goal": what, "value": round(value, 2), "met": value >= need}]
    lengths = [n for n in GOAL_PREFILL["lengths"] if ("prefill", n) in got]
    what = (f"{device}: attnfuse prefill no slower than as_written (slowest of "
            f"{', '.join(map(common.seq_label, GOAL_PREFILL['lengths']))})")
    if not lengths:
        return [*out, {"goal": what, "value": None, "met": None, "note": "not measured"}]
    value = min(got["prefill", n] for n in lengths)
    return [*out, {"goal": what, "value": round(value, 2), "met": value >= GOAL_PREFILL["min_speedup"],
                   "lengths": lengths}]


def table(results: list[dict[str, Any]]) -> str:
    rat = {(r["phase"], r["length"], r["arm"]): r for r in ratios(results)}
    head = ("phase", "length", "arm", "median s", "x as_written", "peak MB", "mem/aw", "cache MB", "rel err",
            "kernels", "busy", "note")
    fmt, lines = common.fmt, []
    for r in results:
        x = rat.get((r["phase"], r["length"], r["arm"]), {})
        lines.append((r["phase"], common.seq_label(r["length"]), r["arm"], fmt(r.get("median_s"), "{:.4f}"),
                      fmt(x.get("speedup_vs_as_written"), "{:.2f}"), fmt(r.get("alloc_peak_mb"), "{:.1f}"),
                      fmt(x.get("memory_vs_as_written"), "{:.3f}"), fmt(r.get("cache_mb"), "{:.1f}"),
                      fmt(r.get("rel_err_vs_eager"), "{:.1e}"), ",".join(r.get("kernels", [])) or "-",
                      fmt(r.get("others_busy_cores"), "{:.1f}"), (r.get("error") or "")[:70]))
    return common.table(lines, head)


def plot(results: list[dict[str, Any]], title: str, path: pathlib.Path) -> None:
    """Time (top) and peak tensor memory (bottom) vs length, prefill (left) and decode per token (right)."""
    ok = [r for r in results if "median_s" in r]
    grid = []
    for metric, what in (("median_s", "time (s)"), ("alloc_peak_mb", "peak tensor memory (MB)")):
        row = []
        for phase, xlabel in (("prefill", "prompt length"), ("decode", "context length")):
            lines = [common.Line(LABELS[arm], [(r["length"], r[metric]) for r in ok if r["arm"] == arm
                                               and r["phase"] == phase and r.get(metric)], COLORS[arm])
                     for arm in ARMS]
            xs = sorted({r["length"] for r in ok if r["phase"] == phase})
            label = f"{phase}: " + ("time per token (s)" if phase == "decode" and metric == "median_s" else what)
            row.append(common.Panel(lines, xs, title=label, ylabel=what, xlabel=xlabel))
        grid.append(row)
    common.plot(grid, path, title, figsize=(12, 8.4), tick_label=common.seq_label, legend_size=8)


# ---------------------------------------------------------------- CLI

def _run(arm: str, phase: str, length: int, args: argparse.Namespace) -> dict[str, Any]:
    if args.wait_idle > 0:
        common.wait_for_idle(args.wait_idle)
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", arm, phase, str(length),
           "--device", args.device, "--dtype", args.dtype, "--spelling", args.spelling, "--inner", args.inner,
           "--retry-s", str(args.retry_s), "--threads", str(args.threads)]
    for name in (*SHAPE, *KNOBS):
        cmd += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    t0 = time.perf_counter()
    r = common.run_worker(cmd, {"arm": arm, "phase": phase, "length": length}, args.timeout)
    msg = r.get("error") or (f"median {r['median_s']:.4f} s, peak {common.fmt(r.get('alloc_peak_mb'), '{:.1f}')} "
                             f"MB" + (f", kernels {r['kernels']}" if "kernels" in r else ""))
    common.log(f"[{time.perf_counter() - t0:6.1f} s] {phase:7s} {common.seq_label(length):>4s} {arm:10s} {msg}")
    return r


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--arms", type=common.csv(str), default=list(DEFAULT_ARMS),
                   help="comma-separated: " + ",".join(ARMS) + " (default: the first three)")
    p.add_argument("--phases", type=common.csv(str), default=list(PHASES), help="comma-separated: prefill,decode")
    p.add_argument("--prefill-seqs", type=common.csv(int), help="comma-separated (default 4096,16384)")
    p.add_argument("--decode-ctxs", type=common.csv(int), help="comma-separated (default 8192,32768,65536)")
    for name in (*SHAPE, *KNOBS):
        p.add_argument("--" + name.replace("_", "-"), type=int, help=f"default {DEFAULTS[name]}")
    p.add_argument("--spelling", default="bmm", help="how the model forms q/k/v: bmm (default), matmul, einsum")
    p.add_argument("--inner", help="attnfuse's inner compiler: inductor (default), eager (--quick's default)")
    p.add_argument("--dtype", help="fp32/bf16/fp16 (CPU default fp32, CUDA bf16)")
    p.add_argument("--retry-s", type=float, help="CPU: keep timing up to this long for quiet calls (default 30)")
    p.add_argument("--threads", type=int, help="torch threads per worker (default 0: torch's own; --quick 1)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, prefill 128, decode after 256")
    common.add_common_args(p, ("ARM", "PHASE", "LENGTH"))
    args = p.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    fill = {**DEFAULTS, "dtype": "float32" if args.device == "cpu" else "bfloat16", **(QUICK if args.quick else {})}
    for name, value in fill.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dtype = common.DTYPES.get(args.dtype.lower(), args.dtype)
    if args.dtype not in ("float32", "bfloat16", "float16"):
        p.error(f"--dtype {args.dtype!r}: choose from fp32, bf16, fp16")
    common.check_choices(p, "arm", args.arms, ARMS)
    common.check_choices(p, "phase", args.phases, PHASES)
    common.check_choices(p, "spelling", [args.spelling], ("bmm", "matmul", "einsum"))
    common.check_choices(p, "inner compiler", [args.inner], INNER)
    if args.dim % 2 or args.head_dim % 2 or min(args.q_rank, args.rank, args.heads, args.layers) < 1:
        p.error("--dim and --head-dim must be even, --q-rank, --rank, --heads and --layers at least 1")
    return args


def configs(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(arm, phase, length) in run order: prefill before decode, short before long, the arms in `ARMS` order."""
    lengths = {"prefill": args.prefill_seqs, "decode": args.decode_ctxs}
    return [(arm, phase, n) for phase in PHASES if phase in args.phases for n in lengths[phase]
            for arm in ARMS if arm in args.arms]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        arm, phase, length = args.worker
        common.emit(measure(arm, phase, int(length), args))
        return 0
    command = common.command(__file__, argv)
    if args.from_json:
        return common.redo_from_json(args, command, lambda r: _run(r["arm"], r["phase"], r["length"], args), write)
    today = common.today()
    name = f"tpa-{common.device_tag(args.device, today)}{'-quick' if args.quick else ''}.json"
    json_path = common.json_path(args.out, name)
    saved = ("device", "arms", "phases", "prefill_seqs", "decode_ctxs", *SHAPE, *KNOBS, "spelling", "inner", "dtype",
             "retry_s", "threads", "timeout")
    t0, results = time.perf_counter(), []
    doc = {"benchmark": "bench_tpa", "date": today, "device": common.device_name(args.device),
           "machine": common.machine_info(), **common.versions(),
           "setup": {"args": {n: getattr(args, n) for n in saved}, "quick": args.quick,
                     "model": f"benchmarks/t6_model.py: {args.layers} pre-norm blocks, dim {args.dim}, {args.heads} "
                              f"heads x {args.head_dim}, TPA q_rank {args.q_rank}, rank {args.rank}, SwiGLU "
                              f"{2 * args.dim}, vocab {args.vocab}, batch {args.batch}, random seeded weights",
                     "arms": {arm: LABELS[arm] for arm in ARMS},
                     "cache": "torch.cat per step; T6: per layer A_k, B_k (post-RoPE), A_v, B_v = 2 R (H + D) "
                              f"= {2 * args.rank * (args.heads + args.head_dim)} numbers per token; MHA: k, v = "
                              f"2 H D = {2 * args.heads * args.head_dim}; decode caches filled with random numbers",
                     "time": "prefill: median of reps calls after warmup; decode: median of steps one-token steps "
                             "after decode_warmup (context grows by one per step); CPU: the quietest calls, "
                             "retried up to retry_s; CUDA: CUDA events",
                     "memory": "alloc_peak_mb: peak tensor bytes during one more call from its start (CPU: "
                               "torch.profiler memory events; CUDA: max_memory_allocated); rss_peak_mb (CPU): peak "
                               "RSS growth",
                     "process": "each (arm, phase, length) in a fresh process"},
           "results": results, "command": command}
    for arm, phase, n in common.progress(configs(args), "bench_tpa"):
        results.append(_run(arm, phase, n, args))
        common.write_json(json_path, {**doc, "partial": True})  # what is done so far, should the run be cut short
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    write(doc, json_path)
    return 0


def write(doc: dict[str, Any], json_path: pathlib.Path) -> None:
    """Add ratios and goals to ``doc``; write it as JSON and the plot as PNG next to it; print a summary."""
    doc["ratios"] = ratios(doc["results"])
    doc["goals"] = goals(doc["ratios"], doc["device"])
    common.write_json(json_path, doc)
    png_path = json_path.with_suffix(".png")
    a = doc["setup"]["args"]
    plot(doc["results"], f"T6-style decoder on {doc['device']}: {a['layers']} layers, dim {a['dim']}, "
                         f"H={a['heads']}, D={a['head_dim']}, R_q={a['q_rank']}, R={a['rank']}, {a['dtype']} "
                         f"({doc['date']})", png_path)
    common.print_summary(table(doc["results"]), doc, json_path, png_path)
    common.print_goals(doc["goals"])


if __name__ == "__main__":
    sys.exit(main())
