"""Context parallelism: per-rank peak memory and time of one causal attention layer over 1, 2 and 4 ranks.

    python benchmarks/bench_context_parallel.py [--seqs 4096,16384,65536] [--ranks 1 2 4] [--strategies ulysses,ring]
                                                [--modes fwd,fwd_bwd] [--bwd-seqs 4096,16384] [--reps 3] [--warmup 1]
                                                [--long-seq 32768 --long-reps 1] [--ring-max-seq N]
                                                [--backend gloo|nccl] [--quick] [--out benchmarks/results]
    python benchmarks/bench_context_parallel.py --from-json RESULTS.json   # re-make the table, goals and plot

The unit: one attention layer over ``x`` of shape ``(B, L, E)`` (B=1, H=4 heads of head_dim 32, E=128, fp32):
q/k/v projections, ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``, an output projection.  With P
ranks every rank holds its contiguous ``L / P`` rows (``attnfuse.parallel.shard(x, 1, cp)``) and runs the model
compiled with ``torch.compile(model, backend="attnfuse", options={"context_parallel": {"group": dist.group.WORLD,
"strategy": s}})`` for s in ulysses, ring; 1 rank (the baseline) is the same model compiled through attnfuse
with ``options={"kernels": ["flash", "window", "blocksparse"]}`` (`BASELINE_KERNELS`): attnfuse's own kernel
families, the ones a context-parallel site plans with, so the comparison is like for like (without it the
baseline may pick PyTorch's ``flex``; each row records its site's ``kernel``).
``fwd``: a forward under ``torch.no_grad()``; ``fwd_bwd``: a forward and ``out.backward(g)``
(input and parameter gradients reset outside the measured region), run only at ``--bwd-seqs`` (the JSON says
which cells were skipped and why).

Processes: every configuration (ranks, strategy, seq, mode) runs in P FRESH processes started with
torch.multiprocessing (spawn); P > 1 joins a process group (gloo on 127.0.0.1, a free port per configuration;
``--backend nccl``: CUDA tensors, rank r on GPU r -- written for a multi-GPU machine, not tested here).  The P ranks
share the machine's cores: each gets ``max(1, cores // P)`` threads (``OMP_NUM_THREADS`` and
``torch.set_num_threads``; Inductor compiles in-process), recorded as ``threads_per_rank``.  So on a 2-core CPU the
times say what the collectives and the split cost, not a speed-up: 4 ranks oversubscribe 2 cores.

In each rank: imports, model (same seeded weights on every rank), input (the global ``x`` seeded, then sharded),
compile; ``--warmup`` calls (the first compiles; ``first_call_s``), then ``--reps`` timed calls (``--long-reps`` from
``--long-seq`` on), each after a barrier; ``median_s`` is the median over calls of the slowest rank's time
(``rank_median_s`` per rank).

Memory, per rank, of more calls after the timed ones, counted from that call's start (the rank's inputs,
parameters and compiled code are the baseline):

* ``retained_mb`` (primary for ``fwd_bwd``): activations and saved attention state.  One more forward, alone,
  under ``torch.profiler`` with ``profile_memory=True``; the sum of its memory events (each allocation +bytes,
  each free -bytes) is the tensor bytes allocated right after the forward returns -- its output alive, the
  autograd graph holding what the backward needs -- minus those allocated just before it (inputs, parameters;
  gc runs first).  The backward then runs outside the profiler.  Workspaces freed inside the forward do not
  count.  In ``fwd`` (``no_grad``) it is the output alone.  CUDA: ``memory_allocated`` after minus before.
* ``alloc_peak_mb``: the most bytes of tensors live at once in PyTorch's CPU allocator during one whole call
  (forward, and backward in ``fwd_bwd``), from ``torch.profiler``'s memory events (`_common.alloc_peak_mb`),
  including the collectives' output buffers.  It includes fixed-size score workspaces (the CPU kernels' row-block
  budgets, the ring's score tiles) whose size does not depend on P, so at these lengths it does not fall ~1/P
  even where activations do.  CUDA: ``max_memory_allocated - memory_allocated``.
* ``rss_peak_mb`` (CPU): peak resident-set growth during the same call.  Peak RSS is monotonic over a process's life
  (``ru_maxrss``), so a baseline taken after the warm-up would hide the call behind the compile's peak.  Instead
  the kernel's peak mark is reset just before the call (``/proc/self/clear_refs`` 5, after gc and malloc_trim, with
  glibc told to return blocks >= 64 KiB at once: `_common.exact_malloc`), then ``VmHWM - VmRSS(before)``.  Where
  the mark cannot be reset, ``ru_maxrss(after) - VmRSS(before)`` is recorded instead (``rss_method`` says
  which; that one is only an upper bound).  Also counts gloo's, the profiler's and the allocator's own buffers,
  so it is noisier.

All are maxima over ranks.  Goals, at the longest sequence measured, at P ranks against the 1-rank baseline:
``fwd_bwd``: ``retained_mb`` <= ``GOAL_SLACK / P`` of the baseline's (activations and attention state fall ~1/P);
``fwd``: ``alloc_peak_mb`` <= ``GOAL_SLACK / P`` of the baseline's.
Results: ``benchmarks/results/context-parallel-<device>-<date>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # _common, also when loaded by path (tests)
import _common as common  # noqa: E402

STRATEGIES = ("ulysses", "ring")
MODES = ("fwd", "fwd_bwd")
BACKENDS = ("gloo", "nccl")
DEFAULTS = dict(seqs=[4096, 16384, 65536], ranks=[1, 2, 4], strategies=list(STRATEGIES), modes=list(MODES),
                bwd_seqs=[4096, 16384], batch=1, heads=4, head_dim=32, reps=3, warmup=1, long_seq=32768,
                long_reps=1)
QUICK = dict(seqs=[256], ranks=[1, 2], modes=["fwd"], reps=2, warmup=1, bwd_seqs=[256])
GOAL_SLACK = 1.25  # metric(P) <= GOAL_SLACK / P x metric(1): "falls about 1/P"
GOAL_METRIC = {"fwd": "alloc_peak_mb", "fwd_bwd": "retained_mb"}  # what each mode's goal judges
BASELINE_KERNELS = ("flash", "window", "blocksparse")  # the 1-rank baseline: attnfuse's own families, as CP sites
COLORS = {1: "black", 2: "tab:blue", 4: "tab:red", 8: "tab:green"}
STYLES = {"none": "-", "ulysses": "-", "ring": "--"}


# ---------------------------------------------------------------- one rank (a spawned process)

def build_model(heads: int, head_dim: int):
    import torch.nn as nn
    import torch.nn.functional as F

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            dim = heads * head_dim
            self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = (p(x).view(b, n, heads, head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o(out.transpose(1, 2).reshape(b, n, heads * head_dim))

    return Attention()


def _site_info(report) -> list[dict[str, Any]]:
    return [{"status": s.status, "kernel": s.kernel, "reason": s.reason, "context_parallel": s.context_parallel}
            for s in (report.sites if report is not None else [])]


def measure_rank(rank: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Time and memory of one configuration on this rank (the process group, if any, is set up)."""
    import torch
    import torch.distributed as dist

    import attnfuse
    import attnfuse.parallel as cpar

    cuda = cfg["backend"] == "nccl"
    device = f"cuda:{rank}" if cuda else "cpu"
    ranks, seq, mode = cfg["ranks"], cfg["seq"], cfg["mode"]
    torch.manual_seed(0)
    model = build_model(cfg["heads"], cfg["head_dim"]).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(cfg["batch"], seq, cfg["heads"] * cfg["head_dim"], generator=g)
    grad = torch.randn(x.shape, generator=g) if mode == "fwd_bwd" else None
    options = {"kernels": list(BASELINE_KERNELS)}
    if ranks > 1:
        options = {"context_parallel": {"group": dist.group.WORLD, "strategy": cfg["strategy"]}}
        cp = cpar.from_option(options["context_parallel"])
        x = cpar.shard(x, 1, cp)
        grad = cpar.shard(grad, 1, cp) if grad is not None else None
    x = x.contiguous().to(device).requires_grad_(mode == "fwd_bwd")
    grad = grad.contiguous().to(device) if grad is not None else None
    compiled = torch.compile(model, backend="attnfuse", options=options)

    def reset() -> None:
        x.grad = None
        model.zero_grad(set_to_none=True)

    def call() -> None:
        if grad is None:
            with torch.no_grad():
                compiled(x)
        else:
            compiled(x).backward(grad)
        if cuda:
            torch.cuda.synchronize()

    def barrier() -> None:
        if ranks > 1:
            dist.barrier()

    res: dict[str, Any] = {"rank": rank, "local_len": x.shape[1], "threads": torch.get_num_threads()}
    for i in range(max(1, cfg["warmup"])):
        reset()
        barrier()
        t0 = time.perf_counter()
        call()
        if i == 0:
            res["first_call_s"] = time.perf_counter() - t0
    res["sites"] = _site_info(attnfuse.last_report())
    times = []
    for _ in range(cfg["reps"]):
        reset()
        barrier()
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    res["times_s"] = times
    reset()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        barrier()
        call()
        res["alloc_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / common.MIB
    else:
        import resource

        rss: dict[str, Any] = {}

        def measured() -> None:  # the peak mark reset inside the profiler: its own set-up is not counted
            rss["reset"] = common.reset_peak_rss(release=False)
            rss["before"] = common.proc_status_mb("VmRSS")
            barrier()
            call()
            rss["hwm"] = common.proc_status_mb("VmHWM")
            rss["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        common.exact_malloc()
        common.reset_peak_rss()  # gc and malloc_trim before the profiler starts (frees would count negative)
        res["alloc_peak_mb"] = common.alloc_peak_mb(measured)
        if "hwm" not in rss:  # the profiler failed before the call: measure RSS alone
            reset()
            common.reset_peak_rss()
            measured()
        if rss["reset"] and rss["before"] is not None:
            res["rss_peak_mb"], res["rss_method"] = rss["hwm"] - rss["before"], "VmHWM reset"
        elif rss["before"] is not None:
            res["rss_peak_mb"], res["rss_method"] = rss["maxrss"] - rss["before"], "ru_maxrss (upper bound)"
        res["ru_maxrss_mb"] = rss["maxrss"]
    reset()
    res["retained_mb"] = _retained_mb(compiled, x, grad, barrier, cuda)
    reset()
    barrier()
    return res


def net_alloc_mb(run) -> tuple[float | None, Any]:
    """(tensor MB allocated after ``run()`` minus before, from the profiler's memory events; ``run()``'s value).
    The value stays alive past the measurement; None for the MB if the profiler reports no memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        value = run()
    events = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    return (sum(events) / common.MIB if events else None), value


def _retained_mb(compiled, x, grad, barrier, cuda: bool) -> float | None:
    """Tensor MB a forward leaves allocated (output, saved activations and attention state); then its backward."""
    import gc

    import torch

    def forward():
        if grad is None:
            with torch.no_grad():
                return compiled(x)
        return compiled(x)

    gc.collect()
    barrier()
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = forward()
        torch.cuda.synchronize()
        mb = (torch.cuda.memory_allocated() - before) / common.MIB
    else:
        try:
            mb, out = net_alloc_mb(forward)
        except Exception:
            mb, out = None, forward()
    if grad is not None:
        out.backward(grad)
    del out
    return mb


def _rank_entry(rank: int, cfg: dict[str, Any], port: int, out_dir: str) -> None:
    """A spawned rank: threads, process group, `measure_rank`, its result (or error) in ``out_dir/rank<r>.json``."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(cfg["threads_per_rank"])
    try:
        if cfg["ranks"] > 1:
            if cfg["backend"] == "nccl":
                torch.cuda.set_device(rank)
            dist.init_process_group(cfg["backend"], init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=cfg["ranks"], timeout=datetime.timedelta(seconds=cfg["timeout"]))
        res = measure_rank(rank, cfg)
    except Exception as e:
        res = {"rank": rank, "error": common.error_text(e), "traceback": traceback.format_exc()[-3000:]}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    pathlib.Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res, default=str))


# ---------------------------------------------------------------- one configuration (the driver)

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(key: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run one configuration in ``key["ranks"]`` fresh spawned processes; each rank's result (or error)."""
    import torch.multiprocessing as mp

    cfg = {**key, "backend": args.backend, "timeout": args.timeout,
           "reps": args.long_reps if key["seq"] >= args.long_seq else args.reps,
           **{n: getattr(args, n) for n in ("batch", "heads", "head_dim", "warmup")}}
    saved = {n: os.environ.get(n) for n in ("OMP_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS")}
    os.environ.update(OMP_NUM_THREADS=str(key["threads_per_rank"]), TORCHINDUCTOR_COMPILE_THREADS="1")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-cp-") as out_dir:
            ctx = mp.start_processes(_rank_entry, args=(cfg, _free_port(), out_dir), nprocs=key["ranks"],
                                     join=False, start_method="spawn")
            deadline = time.monotonic() + args.timeout
            try:
                while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"timed out after {args.timeout:.0f} s")
            except Exception as e:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                failed = common.error_text(e)
            else:
                failed = None
            out = []
            for r in range(key["ranks"]):
                path = pathlib.Path(out_dir, f"rank{r}.json")
                out.append(json.loads(path.read_text()) if path.exists() else {"rank": r, "error": failed or "none"})
            return out
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def _combine(key: dict[str, Any], per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [r for r in per_rank if "error" in r]
    if errors:
        return {**key, "error": f"rank {errors[0]['rank']}: {errors[0]['error']}",
                "traceback": errors[0].get("traceback", "")}
    calls = list(zip(*(r["times_s"] for r in per_rank)))
    res = {**key, "median_s": statistics.median(max(c) for c in calls),
           "rank_median_s": [statistics.median(r["times_s"]) for r in per_rank],
           "times_s": [max(c) for c in calls], "first_call_s": max(r["first_call_s"] for r in per_rank),
           "local_len": per_rank[0]["local_len"], "threads": per_rank[0]["threads"], "sites": per_rank[0]["sites"],
           "kernel": next((s["kernel"] for s in per_rank[0]["sites"] if s["status"] == "fused"), None)}
    for name in ("retained_mb", "alloc_peak_mb", "rss_peak_mb", "ru_maxrss_mb"):
        vals = [r.get(name) for r in per_rank]
        if all(v is not None for v in vals):
            res[name], res[name + "_ranks"] = max(vals), vals
    if "rss_method" in per_rank[0]:
        res["rss_method"] = per_rank[0]["rss_method"]
    return res


# ---------------------------------------------------------------- summary (no torch needed)

def label(r: dict[str, Any]) -> str:
    return "1 rank (no CP)" if r["ranks"] == 1 else f"{r['ranks']} ranks {r['strategy']}"


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per P > 1 cell: memory (alloc and RSS) and time relative to the 1-rank baseline of the same (seq, mode)."""
    base = {(r["seq"], r["mode"]): r for r in results if r["ranks"] == 1 and "median_s" in r}
    out = []
    for r in results:
        b = base.get((r["seq"], r["mode"]))
        if r["ranks"] == 1 or "median_s" not in r or b is None:
            continue
        row = {"seq": r["seq"], "mode": r["mode"], "ranks": r["ranks"], "strategy": r["strategy"],
               "ideal": 1 / r["ranks"], "time_vs_1": r["median_s"] / b["median_s"]}
        for name in ("retained_mb", "alloc_peak_mb", "rss_peak_mb"):
            row[name.split("_")[0] + "_vs_1"] = r[name] / b[name] if r.get(name) and b.get(name) else None
        out.append(row)
    return out


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (mode, ranks, strategy) at the longest seq with a ratio: the mode's `GOAL_METRIC` relative to 1 rank
    <= GOAL_SLACK / ranks (fwd_bwd: retained activations and attention state; fwd: peak tensor memory)."""
    out = []
    for mode in MODES:
        ratio = GOAL_METRIC[mode].split("_")[0] + "_vs_1"
        name = "retained tensor memory" if mode == "fwd_bwd" else "peak tensor memory"
        for key in sorted({(r["ranks"], r["strategy"]) for r in rows if r["mode"] == mode}):
            cells = [r for r in rows if r["mode"] == mode and (r["ranks"], r["strategy"]) == key
                     and r.get(ratio) is not None]
            what = f"{mode} {key[0]} ranks {key[1]}: {name} <= {GOAL_SLACK:g}/{key[0]} of 1 rank"
            if not cells:
                out.append({"goal": what, "value": None, "met": None, "note": "not measured"})
                continue
            top = max(cells, key=lambda r: r["seq"])
            out.append({"goal": what, "metric": GOAL_METRIC[mode], "seq": top["seq"], "value": round(top[ratio], 3),
                        "met": top[ratio] <= GOAL_SLACK / key[0]})
    return out


def table(results: list[dict[str, Any]]) -> str:
    rat = {(r["seq"], r["mode"], r["ranks"], r["strategy"]): r for r in ratios(results)}
    head = ("seq", "mode", "ranks", "strategy", "median s", "x 1 rank", "kept MB", "kept/1", "peak MB", "peak/1",
            "RSS MB", "RSS/1",
            "kernel", "note")
    fmt, lines = common.fmt, []
    for r in results:
        x = rat.get((r["seq"], r["mode"], r["ranks"], r["strategy"]), {})
        site = next((s for s in r.get("sites", []) if s["status"] == "fused"), None)
        kernel = "-" if site is None else site["kernel"] + (f" ({site['context_parallel']['strategy']})"
                                                           if site.get("context_parallel") else "")
        note = r.get("skipped") or (r["error"][:60] if "error" in r else "")
        lines.append((common.seq_label(r["seq"]), r["mode"], str(r["ranks"]), r["strategy"],
                      fmt(r.get("median_s"), "{:.4f}"), fmt(x.get("time_vs_1"), "{:.2f}"),
                      fmt(r.get("retained_mb"), "{:.1f}"), fmt(x.get("retained_vs_1"), "{:.3f}"),
                      fmt(r.get("alloc_peak_mb"), "{:.1f}"), fmt(x.get("alloc_vs_1"), "{:.3f}"),
                      fmt(r.get("rss_peak_mb"), "{:.1f}"), fmt(x.get("rss_vs_1"), "{:.3f}"), kernel, note))
    return common.table(lines, head)


def plot(results: list[dict[str, Any]], title: str, path: pathlib.Path) -> None:
    """One row per mode: per-rank retained and peak tensor memory, per-rank peak RSS growth and time vs seq, a line
    per (ranks, strategy)."""
    ok = [r for r in results if "median_s" in r]
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)] or ["fwd"]
    peers = sorted({(r["ranks"], r["strategy"]) for r in ok})
    metrics = (("retained_mb", "retained tensor MB per rank (after fwd)"),
               ("alloc_peak_mb", "peak tensor MB per rank"), ("rss_peak_mb", "peak RSS growth MB per rank"),
               ("median_s", "time (s), slowest rank"))
    seqs = sorted({r["seq"] for r in ok})
    grid = [[common.Panel([common.Line(label({"ranks": p, "strategy": s}),
                                       [(r["seq"], r[metric]) for r in ok if r["mode"] == mode
                                        and (r["ranks"], r["strategy"]) == (p, s) and r.get(metric)],
                                       COLORS.get(p), "o" if s != "ring" else "s", STYLES.get(s, "-"))
                           for p, s in peers], seqs, title=f"{mode}: {name}", ylabel=name)
             for metric, name in metrics] for mode in modes]
    common.plot(grid, path, title, figsize=(19, 4.2 * len(modes)), tick_label=common.seq_label, legend_size=8)


# ---------------------------------------------------------------- CLI

def _ints(values: list[str]) -> list[int]:
    return [int(x) for v in values for x in v.split(",") if x.strip()]


def _strs(values: list[str]) -> list[str]:
    return [x.strip() for v in values for x in v.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", nargs="+", help="global sequence lengths, spaces or commas (default 4096,16384,65536)")
    p.add_argument("--ranks", nargs="+", help="process counts (default 1 2 4); 1 is the baseline without the option")
    p.add_argument("--strategies", nargs="+", help="ulysses, ring (default both)")
    p.add_argument("--modes", nargs="+", help="fwd, fwd_bwd (default both)")
    p.add_argument("--bwd-seqs", nargs="+", help="run fwd_bwd only at these seqs (default 4096,16384)")
    for name in ("batch", "heads", "head_dim", "reps", "warmup", "long_seq", "long_reps"):
        p.add_argument("--" + name.replace("_", "-"), type=int, help=f"default {DEFAULTS[name]}")
    p.add_argument("--ring-max-seq", type=int, help="run the ring strategy only up to this seq (default: all)")
    p.add_argument("--backend", choices=BACKENDS, default="gloo", help="gloo (CPU tensors) or nccl (CUDA, GPU r)")
    p.add_argument("--cores", type=int, help="cores the ranks share (default: this process's CPU affinity)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each configuration, wait up to this long for other processes to quiet down")
    p.add_argument("--quick", action="store_true", help="smoke run: seq 256, ranks 1 and 2, fwd, 2 reps")
    p.add_argument("--out", default=str(common.RESULTS), help="output folder, or a .json path (.png next to it)")
    p.add_argument("--from-json", metavar="PATH", help="re-make the table, ratios, goals and plot from a JSON")
    args = p.parse_args(argv)
    fill = {**DEFAULTS, **(QUICK if args.quick else {})}
    for name, conv in (("seqs", _ints), ("ranks", _ints), ("strategies", _strs), ("modes", _strs),
                       ("bwd_seqs", _ints)):
        setattr(args, name, conv(getattr(args, name)) if getattr(args, name) else fill[name])
    for name in ("batch", "heads", "head_dim", "reps", "warmup", "long_seq", "long_reps"):
        if getattr(args, name) is None:
            setattr(args, name, fill[name])
    common.check_choices(p, "strategy", args.strategies, STRATEGIES)
    common.check_choices(p, "mode", args.modes, MODES)
    for r in args.ranks:
        if r < 1 or args.heads % r:
            p.error(f"--ranks {r}: must be >= 1 and divide --heads {args.heads} (Ulysses splits the heads)")
        if any(s % r for s in args.seqs):
            p.error(f"--ranks {r}: every --seqs value must be a multiple of it")
    if args.backend == "nccl" and not args.from_json:
        import torch

        if max(args.ranks) > torch.cuda.device_count():
            p.error(f"--backend nccl puts rank r on GPU r: --ranks {max(args.ranks)} needs that many GPUs, found "
                    f"{torch.cuda.device_count()}")
    args.cores = args.cores or len(os.sched_getaffinity(0))
    return args


def configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every cell, in run order (fwd before fwd_bwd, short before long, baseline first)."""
    out = []
    for mode in args.modes:
        for seq in args.seqs:
            for ranks in args.ranks:
                for strategy in (["none"] if ranks == 1 else args.strategies):
                    out.append({"seq": seq, "mode": mode, "ranks": ranks, "strategy": strategy,
                                "threads_per_rank": max(1, args.cores // ranks)})
    return out


def _run(key: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    what = f"seq {common.seq_label(key['seq']):>4s} {key['mode']:7s} {key['ranks']} ranks {key['strategy']:7s}"
    if key["strategy"] == "ring" and args.ring_max_seq and key["seq"] > args.ring_max_seq:
        common.log(f"[   0.0 s] {what} skipped (seq > --ring-max-seq)")
        return {**key, "skipped": f"ring runs up to seq {args.ring_max_seq} (--ring-max-seq): on this CPU its "
                                  "first call (tracing and compiling its tile loop) takes minutes beyond"}
    if key["mode"] == "fwd_bwd" and key["seq"] not in args.bwd_seqs:
        common.log(f"[   0.0 s] {what} skipped (not in --bwd-seqs)")
        return {**key, "skipped": "fwd_bwd runs only at seq " + ",".join(map(str, args.bwd_seqs)) + " (--bwd-seqs), "
                                  "to keep the run short on this machine"}
    if args.wait_idle > 0:
        common.wait_for_idle(args.wait_idle)
    t0 = time.perf_counter()
    key = {**key, "load_avg_1m": os.getloadavg()[0]}
    r = _combine(key, _spawn(key, args))
    msg = r.get("error") or (f"median {r['median_s']:.4f} s, peak {common.fmt(r.get('alloc_peak_mb'), '{:.1f}')} MB,"
                             f" RSS {common.fmt(r.get('rss_peak_mb'), '{:.1f}')} MB")
    common.log(f"[{time.perf_counter() - t0:6.1f} s] {what} {msg}")
    return r


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        json_path = pathlib.Path(args.from_json)
        write(json.loads(json_path.read_text()), json_path)
        return 0
    device = "cuda" if args.backend == "nccl" else "cpu"
    today = common.today()
    name = f"context-parallel-{common.device_tag(device, today)}{'-quick' if args.quick else ''}.json"
    json_path = common.json_path(args.out, name)
    t0, results = time.perf_counter(), []
    saved = ("seqs", "ranks", "strategies", "modes", "bwd_seqs", "batch", "heads", "head_dim", "reps", "warmup",
             "long_seq", "long_reps", "ring_max_seq", "backend", "cores", "timeout")
    doc = {"benchmark": "bench_context_parallel", "date": today, "device": common.device_name(device),
           "machine": common.machine_info(), **common.versions(),
           "setup": {"args": {n: getattr(args, n) for n in saved}, "quick": args.quick, "dtype": "float32",
                     "model": f"x (B, L, {args.heads * args.head_dim}) -> q/k/v Linear -> SDPA is_causal=True "
                              f"({args.heads} heads x {args.head_dim}) -> out Linear; torch.compile backend attnfuse",
                     "context_parallel": "ranks > 1: options={'context_parallel': {'group': WORLD, 'strategy': s}},"
                                         " contiguous layout, x sharded by attnfuse.parallel.shard(x, 1, cp); "
                                         "ranks == 1 (the baseline): options={'kernels': "
                                         f"{list(BASELINE_KERNELS)}}} (attnfuse's own families, as CP sites)",
                     "threads": f"each rank max(1, {args.cores} // ranks) threads (threads_per_rank); Inductor "
                                "compile threads 1",
                     "time": "median_s: median over reps calls (long_reps from seq long_seq on; each after a "
                             "barrier, after warmup calls, the first compiling) of the slowest rank's wall time",
                     "memory": "per rank, max over ranks: retained_mb = tensor bytes allocated right after a "
                               "forward returns minus just before it (output + autograd-saved activations and "
                               "attention state; sum of torch.profiler memory events over the forward alone; CUDA "
                               "memory_allocated delta); alloc_peak_mb = peak tensor bytes of one whole call from "
                               "its start (profiler memory events; CUDA max_memory_allocated), includes fixed-size "
                               "score workspaces; rss_peak_mb = peak RSS growth (VmHWM reset via "
                               "/proc/self/clear_refs before the call)",
                     "goals": f"at the longest seq, metric(P) <= {GOAL_SLACK:g}/P x metric(1 rank): fwd_bwd "
                              "retained_mb, fwd alloc_peak_mb",
                     "process": "each configuration in fresh processes (torch.multiprocessing spawn)",
                     "backward": "fwd_bwd measured only at seq " + ",".join(map(str, args.bwd_seqs))},
           "results": results, "command": common.command(__file__, argv)}
    for key in common.progress(configs(args), "bench_context_parallel"):
        results.append(_run(key, args))
        common.write_json(json_path, {**doc, "partial": True})  # what is done so far, should the run be cut short
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    write(doc, json_path)
    return 0


def write(doc: dict[str, Any], json_path: pathlib.Path) -> None:
    """Add ratios and goals to ``doc``; write it as JSON and the plot as PNG next to it; print a summary."""
    doc["ratios"], doc["goals"] = ratios(doc["results"]), []
    doc["goals"] = goals(doc["ratios"])
    common.write_json(json_path, doc)
    png_path = json_path.with_suffix(".png")
    a = doc["setup"]["args"]
    plot(doc["results"], f"context parallelism on {doc['device']} ({a['backend']}): one causal attention layer, "
                         f"B={a['batch']}, H={a['heads']}, D={a['head_dim']}, fp32, {a['cores']} cores shared "
                         f"({doc['date']})", png_path)
    common.print_summary(table(doc["results"]), doc, json_path, png_path)
    common.print_goals(doc["goals"])


if __name__ == "__main__":
    sys.exit(main())
