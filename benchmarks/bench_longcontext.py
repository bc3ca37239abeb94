"""Long-context attention: exact vs top-k sparse vs LSH, time and peak memory over sequence length (CPU or GPU).

    python benchmarks/bench_longcontext.py [--device auto|cpu|cuda] [--seqs 4096,...,65536] [--modes fwd,fwd_bwd]
                                           [--peers sdpa,attnfuse,topk,lsh] [--exact-max-seq N] [--topk 2048]
                                           [--tables 8] [--bits -1] [--probes 0]
                                           [--reps 3] [--warmup 1] [--quick] [--out benchmarks/results]
    python benchmarks/bench_longcontext.py --from-json RESULTS.json [--rerun-busy]   # re-plot (re-measure)

Peers, all causal on the same inputs (``(batch, heads, seq, head_dim)``, GQA when ``--kv-heads`` < ``--heads``):

* ``sdpa``     -- exact: ``F.scaled_dot_product_attention(is_causal=True)`` (on CUDA restricted to the flash
  backend); the baseline of every ratio;
* ``attnfuse`` -- exact: on CPU attnfuse's op ``torch.ops.attnfuse.attention(..., causal=True, kv_groups=G)``,
  on CUDA its Triton flash kernel ``attnfuse.kernels.flash.attention(q, k, v, causal=True)``;
* ``topk``     -- ``attnfuse.kernels.topk.attention(q, k, v, causal=True, topk=, block=, sink=, local=)``;
* ``lsh``      -- ``attnfuse.kernels.lsh.attention(q, k, v, causal=True, tables=, bits=, probes=, cap=topk,
  block=, sink=, local=, seed=0)``: the same block/sink/local and ``cap`` = top-k's ``topk``, so both attend at
  most the same number of keys per query block (sink + local + topk); they differ only in how the extra key
  blocks are found (top-k: scored against every key block; LSH: hash-table votes).

Defaults: CPU seq 4k..64k, batch 1, 4 heads (4 K/V heads), head dim 64, fp32; CUDA seq 4k..128k, batch 1, 16
heads, head dim 128, bf16; top-k keeps 2048 tokens (blocks of 64, 64 sink and 256 local tokens); LSH
``--tables``/``--bits``/``--probes`` default to ``attnfuse.kernels.lsh.DEFAULTS`` (8 tables, bits -1 = auto,
0 probes).  Exact peers above ``--exact-max-seq`` are not run (cells marked "skipped").

Inputs (seeded, made inside each worker): ``q ~ N(0, 1)``, ``k ~ N(0, 0.25)``, ``v ~ N(0, 1)``, plus planted
"needles" so that attention is peaked, as in trained models, and a sparse kernel has something to find: per
(batch, K/V head) ``max(4, seq // 512)`` keys at random positions are set to ``sqrt(D) * u`` (``u`` a random
unit vector), and every segment of 128 queries is pointed at one needle its first query can see (``q +=
gap * u``): its scaled score is then ``gap = ln(seq) + 4`` above the noise, about 98% of the row's weight.

Every (seq, peer, mode) runs in a fresh process (this script with ``--worker``): one first call, ``--warmup``
more, then the median of ``--reps`` timed calls (perf_counter on CPU, CUDA events on GPU).  ``fwd`` is a
forward under ``torch.no_grad()``; ``fwd_bwd`` a forward and ``out.backward(grad)`` (input gradients reset
outside the timed region).  On a shared CPU, calls during which other processes kept a core busy are retried
for up to ``--retry-s`` seconds and the quietest kept (``others_busy_cores`` says how quiet it was).

Selection (``topk`` and ``lsh`` cells): in the same worker, after the peer's own timing, the selection alone --
``attnfuse.kernels.topk.select`` / ``attnfuse.kernels.lsh.select`` with the peer's settings, under
``torch.no_grad()`` -- is timed the same way (one first call, ``--warmup``, median of ``--reps``, retried the
same): ``select_median_s``, ``select_times_s``, ``select_others_busy_cores``.

Memory, counted from the call's start (inputs are the baseline): CPU ``alloc_peak_mb`` (primary: most tensor
bytes live at once, from ``torch.profiler`` memory events) and ``rss_peak_mb`` (peak RSS growth); CUDA
``alloc_peak_mb`` = ``max_memory_allocated`` minus ``memory_allocated`` before the call.

Accuracy: ``rel_err`` = ||out - exact||_F / ||exact||_F against SDPA on the same inputs (computed in the
approximate peer's worker when ``seq <= --exact-max-seq``), and ``rel_err_rows``, the same over ``--err-rows``
sampled query rows against a float64 reference (always, for every peer: cheap, and the only accuracy figure
where exact was skipped).

Goals (printed PASS/FAIL with the measured ratio, also in the JSON's ``goals``; "not measured" where a side is
missing; mode ``fwd``):

* CPU: top-k forward at seq 32k >= 5x exact (SDPA);
* CPU, every seq in [8k, 64k] with both measured: LSH ``rel_err`` (where measured) and ``rel_err_rows`` <= 1.1 x
  top-k's (value: LSH / top-k);
* CPU, seq 32k and 64k: LSH forward time <= 1.2 x top-k's (value: LSH / top-k);
* CPU, selection growth: with N1 < N2 the two largest seqs where LSH's selection was timed, ``select_median_s``
  at N2 / at N1 <= 1.25 * (N2 / N1) * (log2 N2 / log2 N1) -- i.e. ~N log N with 25% slack (value: the time
  ratio; at 32k -> 64k the bound is 1.25 * 2 * 16/15 = 2.67, where a selection growing as N^2 / block gives 4);
  the JSON's ``select_growth`` lists the same ratio and bound per peer for every pair of consecutive seqs;
* CUDA, seq 128k, top-k 2048: top-k forward >= 20x dense flash (the faster of ``sdpa`` and ``attnfuse``);
* CUDA, every seq >= 32k: LSH forward faster than dense flash (value: speedup, > 1).

Results: ``benchmarks/results/longcontext-<device>-<date>.json`` and ``.png`` (time, memory, error and selection
time vs seq, log-log).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # _common, also when loaded by path (tests)
import _common as common  # noqa: E402

PEERS = ("sdpa", "attnfuse", "topk", "lsh")
EXACT = ("sdpa", "attnfuse")
SPARSE = ("topk", "lsh")
MODES = ("fwd", "fwd_bwd")
LABELS = {"cpu": {"sdpa": "SDPA (exact)", "attnfuse": "attnfuse op (exact)", "topk": "attnfuse top-k",
                  "lsh": "attnfuse LSH"},
          "cuda": {"sdpa": "SDPA flash (exact)", "attnfuse": "attnfuse flash (exact)", "topk": "attnfuse top-k",
                   "lsh": "attnfuse LSH"}}
COLORS = {"sdpa": "tab:blue", "attnfuse": "tab:orange", "topk": "tab:green", "lsh": "tab:red"}
DEFAULTS = {"cpu": dict(seqs=[4096, 8192, 16384, 32768, 65536], batch=1, heads=4, kv_heads=4, head_dim=64,
                        dtype="float32"),
            "cuda": dict(seqs=[4096, 8192, 16384, 32768, 65536, 131072], batch=1, heads=16, kv_heads=16,
                         head_dim=128, dtype="bfloat16")}
LSH_KNOBS = ("tables", "bits", "probes")  # defaults: attnfuse.kernels.lsh.DEFAULTS (`lsh_defaults`)
KNOBS = dict(topk=2048, block=64, sink=64, local=256, tables=None, bits=None, probes=None, reps=3, warmup=1,
             err_rows=256)
QUICK = dict(seqs=[256, 512], heads=2, kv_heads=2, head_dim=32, topk=64, block=32, sink=32, local=32, reps=2,
             warmup=0, err_rows=32, retry_s=0.0)
GOALS = {"cpu": {"seq": 32768, "peer": "topk", "mode": "fwd", "min_speedup": 5.0, "vs": "sdpa"},
         "cuda": {"seq": 131072, "peer": "topk", "mode": "fwd", "min_speedup": 20.0, "vs": "dense flash"}}
LSH_VS_TOPK = {"err_seqs": (8192, 65536), "max_err_ratio": 1.1, "time_seqs": (32768, 65536), "max_time_ratio": 1.2,
               "growth_slack": 1.25, "cuda_min_seq": 32768}
SEGMENT = 128  # queries pointed at the same needle


# ---------------------------------------------------------------- inputs and peers (worker side)

def needle_gap(seq: int) -> float:
    """Scaled-score margin of a query's needle over the noise: ln(seq) + 4, about 98% of the row's softmax."""
    return math.log(seq) + 4.0


def make_inputs(batch: int, heads: int, kv_heads: int, seq: int, dim: int, dtype, device: str, seed: int = 0):
    """(q, k, v) with planted needles (see the module docstring); deterministic in ``seed`` per device."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    groups = heads // kv_heads
    q = torch.randn(batch, heads, seq, dim, generator=g, device=device)
    k = torch.randn(batch, kv_heads, seq, dim, generator=g, device=device) * 0.5
    v = torch.randn(batch, kv_heads, seq, dim, generator=g, device=device)
    n = min(seq, max(4, seq // 512))
    pos = torch.rand(batch, kv_heads, seq, generator=g, device=device).topk(n, dim=-1).indices.sort(-1).values
    u = torch.randn(batch, kv_heads, n, dim, generator=g, device=device)
    u = u / u.norm(dim=-1, keepdim=True)
    k.scatter_(2, pos[..., None].expand(-1, -1, -1, dim), u * dim**0.5)
    starts = torch.arange(0, seq, SEGMENT, device=device).expand(batch, kv_heads, -1).contiguous()
    seen = torch.searchsorted(pos.contiguous(), starts, right=True)  # needles a segment's first query can see
    pick = (torch.rand(seen.shape, generator=g, device=device) * seen).long().clamp(max=n - 1)
    target = u.gather(2, pick[..., None].expand(-1, -1, -1, dim)) * (seen > 0)[..., None]
    target = target.repeat_interleave(SEGMENT, dim=2)[:, :, :seq]
    q.view(batch, kv_heads, groups, seq, dim).add_(target[:, :, None], alpha=needle_gap(seq))
    return tuple(t.to(dtype) for t in (q, k, v))


def make_peer(peer: str, device: str, knobs: dict[str, Any]):
    """``fn(q, k, v) -> out`` for one peer (causal); raises if the peer's kernel is unavailable."""
    import torch
    import torch.nn.functional as F

    if peer == "sdpa":
        def sdpa(q, k, v):
            gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
            if device != "cuda":
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)

        return sdpa
    if peer == "attnfuse":
        if device == "cuda":
            from attnfuse.kernels import flash

            return lambda q, k, v: flash.attention(q, k, v, causal=True)
        import attnfuse  # noqa: F401 - registers torch.ops.attnfuse.attention

        return lambda q, k, v: torch.ops.attnfuse.attention(q, k, v, causal=True,
                                                            kv_groups=q.shape[1] // k.shape[1])[0]
    if peer in SPARSE:
        import importlib

        mod = importlib.import_module(f"attnfuse.kernels.{peer}")
        kw = sparse_settings(peer, knobs)
        return lambda q, k, v: mod.attention(q, k, v, causal=True, **kw)
    raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")


def sparse_settings(peer: str, knobs: dict[str, Any]) -> dict[str, int]:
    """The keyword settings of a sparse peer: top-k's {topk, block, sink, local}; LSH's {tables, bits, probes,
    cap, block, sink, local, seed} with ``cap`` = top-k's ``topk`` (the same number of kept keys)."""
    kw = {name: knobs[name] for name in ("block", "sink", "local")}
    if peer == "topk":
        return {"topk": knobs["topk"], **kw}
    return {**{name: knobs[name] for name in LSH_KNOBS}, "cap": knobs["topk"], **kw, "seed": 0}


def make_select(peer: str, knobs: dict[str, Any]):
    """``fn(q, k) -> bool block mask``: the selection alone of a sparse peer (``attnfuse.kernels.<peer>.select``,
    causal, the peer's settings)."""
    import importlib

    mod = importlib.import_module(f"attnfuse.kernels.{peer}")
    kw = sparse_settings(peer, knobs)
    if peer == "lsh":
        kw = {name: kw[name] for name in mod.DEFAULTS}
    return lambda q, k: mod.select(q, k, causal=True, **kw)


def lsh_defaults() -> dict[str, int]:
    """``attnfuse.kernels.lsh.DEFAULTS``' index settings ({tables, bits, probes}); the documented values where the
    kernel cannot be imported (its cell then records the import error)."""
    try:
        from attnfuse.kernels.lsh import DEFAULTS as lsh
    except Exception:  # noqa: BLE001 - an unavailable kernel is a result row, not a crash here
        lsh = dict(tables=8, bits=-1, probes=0)
    return {name: lsh[name] for name in LSH_KNOBS}


def rows_error(out, q, k, v, n_rows: int, seed: int = 1) -> float:
    """``rel_err`` over ``n_rows`` sampled query rows against float64 causal attention (chunks of 16 rows)."""
    import torch

    b, h, seq, _ = q.shape
    groups = h // k.shape[1]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(seq, generator=g)[: min(n_rows, seq)].sort().values.to(q.device)
    num = den = 0.0
    kd, vd = k.double(), v.double()
    for part in idx.split(16):
        qs = q[:, :, part].double().view(b, -1, groups, len(part), q.shape[-1])
        s = (qs @ kd[:, :, None].transpose(-1, -2)) * q.shape[-1] ** -0.5
        s.masked_fill_(torch.arange(seq, device=q.device) > part[:, None], float("-inf"))
        ref = (s.softmax(-1) @ vd[:, :, None]).view(b, h, len(part), -1)
        num += float((out[:, :, part].double() - ref).square().sum())
        den += float(ref.square().sum())
    return math.sqrt(num / max(den, 1e-300))


def measure(seq: int, peer: str, mode: str, device: str, shape: dict[str, Any], knobs: dict[str, Any],
            retry_s: float, exact_max_seq: int | None) -> dict[str, Any]:
    """Time, memory and error of one (seq, peer, mode) in this process; see the module docstring."""
    import torch

    cuda = device == "cuda"
    dtype = getattr(torch, shape["dtype"])
    q, k, v = make_inputs(shape["batch"], shape["heads"], shape["kv_heads"], seq, shape["head_dim"], dtype, device)
    fn = make_peer(peer, device, knobs)
    res: dict[str, Any] = {"seq": seq, "peer": peer, "mode": mode}
    grad = None
    if mode == "fwd_bwd":
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        grad = torch.randn_like(q)

    def reset() -> None:
        for t in (q, k, v):
            t.grad = None

    def call() -> None:
        if grad is None:
            with torch.no_grad():
                fn(q, k, v)
        else:
            fn(q, k, v).backward(grad)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    call()
    sync()
    res["first_call_s"] = time.perf_counter() - t0
    timing = common.time_call(call, device, reps=knobs["reps"], warmup=knobs["warmup"], setup=reset,
                              retry_s=retry_s)
    res["times_s"] = timing.times_s
    if not cuda:
        res["all_times_s"] = timing.all_times_s
    res["median_s"], res["others_busy_cores"] = timing.median_s, timing.others_busy_cores
    reset()
    if peer in SPARSE:
        select = make_select(peer, knobs)
        qd, kd = q.detach(), k.detach()

        def call_select() -> None:
            with torch.no_grad():
                select(qd, kd)

        call_select()
        timing = common.time_call(call_select, device, reps=knobs["reps"], warmup=knobs["warmup"], retry_s=retry_s)
        res["select_times_s"], res["select_median_s"] = timing.times_s, timing.median_s
        res["select_others_busy_cores"] = timing.others_busy_cores
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        sync()
        res["alloc_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        common.exact_malloc()
        before = common.reset_peak_rss() and common.proc_status_mb("VmRSS")
        call()
        if before:
            res["rss_peak_mb"] = common.proc_status_mb("VmHWM") - before
        reset()
        res["alloc_peak_mb"] = common.alloc_peak_mb(call)
    reset()
    with torch.no_grad():
        q, k, v = (t.detach() for t in (q, k, v))
        out = fn(q, k, v)
        res["rel_err_rows"] = rows_error(out, q, k, v, knobs["err_rows"])
        if peer not in EXACT and (exact_max_seq is None or seq <= exact_max_seq):
            res["rel_err"] = common.rel_err(out, make_peer("sdpa", device, knobs)(q, k, v))
    return res


# ---------------------------------------------------------------- summary (no torch needed)

def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (seq, mode, peer other than sdpa): speedup over sdpa and over the fastest exact peer ("dense
    flash" on CUDA), and peak-memory ratio to sdpa (None where a side was not measured)."""
    ok = {(r["seq"], r["mode"], r["peer"]): r for r in results if "median_s" in r}
    out = []
    for r in results:
        if r["peer"] == "sdpa" or "median_s" not in r:
            continue
        base = ok.get((r["seq"], r["mode"], "sdpa"))
        exact = [ok[key]["median_s"] for key in ((r["seq"], r["mode"], p) for p in EXACT) if key in ok]
        row = {"seq": r["seq"], "mode": r["mode"], "peer": r["peer"],
               "speedup_vs_sdpa": base["median_s"] / r["median_s"] if base else None,
               "speedup_vs_best_exact": min(exact) / r["median_s"] if exact and r["peer"] not in EXACT else None,
               "memory_vs_sdpa": (r["alloc_peak_mb"] / base["alloc_peak_mb"]
                                  if base and r.get("alloc_peak_mb") and base.get("alloc_peak_mb") else None)}
        out.append(row)
    return out


def _goal(what: str, value: float | None, met: bool | None) -> dict[str, Any]:
    if value is None:
        return {"goal": what, "value": None, "met": None, "note": "not measured"}
    return {"goal": what, "value": round(value, 3), "met": met}


def _values(results: list[dict[str, Any]], peer: str, field: str, modes=("fwd",)) -> dict[int, float]:
    """{seq: r[field]} of ``peer``'s cells in the first of ``modes`` that has any."""
    for mode in modes:
        got = {r["seq"]: r[field] for r in results
               if (r["peer"], r["mode"]) == (peer, mode) and r.get(field) is not None}
        if got:
            return got
    return {}


def nlogn_bound(n1: int, n2: int, slack: float = LSH_VS_TOPK["growth_slack"]) -> float:
    """The selection-growth bound from seq ``n1`` to ``n2``: slack * (n2 / n1) * (log2 n2 / log2 n1)."""
    return slack * (n2 / n1) * (math.log2(n2) / math.log2(n1))


def select_growth(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per sparse peer and pair of consecutive timed seqs: the selection's time ratio and `nlogn_bound`."""
    out = []
    for peer in SPARSE:
        t = _values(results, peer, "select_median_s", MODES)
        seqs = sorted(t)
        out += [{"peer": peer, "seq_lo": a, "seq_hi": b, "time_ratio": t[b] / t[a], "nlogn_bound": nlogn_bound(a, b)}
                for a, b in zip(seqs, seqs[1:])]
    return out


def goals(results: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """The issue's targets for ``device`` ("cpu" or "cuda") checked against ``results`` (module docstring)."""
    rows = ratios(results)
    goal = GOALS[device]
    key = "speedup_vs_sdpa" if goal["vs"] == "sdpa" else "speedup_vs_best_exact"
    found = next((r[key] for r in rows if (r["seq"], r["peer"], r["mode"]) == (goal["seq"], goal["peer"],
                                                                               goal["mode"]) and r.get(key)), None)
    out = [_goal(f"{device}: {goal['peer']} {goal['mode']} at seq {goal['seq']} >= {goal['min_speedup']:g}x "
                 f"{goal['vs']}", found, found is not None and found >= goal["min_speedup"])]
    g = LSH_VS_TOPK
    if device == "cuda":
        fast = {r["seq"]: r["speedup_vs_best_exact"] for r in rows if (r["peer"], r["mode"]) == ("lsh", "fwd")
                and r["seq"] >= g["cuda_min_seq"] and r.get("speedup_vs_best_exact")}
        for seq in sorted(fast) or [f">= {g['cuda_min_seq']}"]:
            out.append(_goal(f"cuda: lsh fwd faster than dense flash at seq {seq} (speedup > 1)", fast.get(seq),
                             fast.get(seq, 0) > 1.0))
        return out
    lo, hi = g["err_seqs"]
    for field in ("rel_err", "rel_err_rows"):  # every output row vs SDPA (where measured), and sampled rows
        err_lsh, err_topk = _values(results, "lsh", field), _values(results, "topk", field)
        if field == "rel_err" and not err_lsh:
            continue
        for seq in sorted(n for n in set(err_lsh) & set(err_topk) if lo <= n <= hi) or [f"{lo}..{hi}"]:
            ratio = err_lsh[seq] / max(err_topk[seq], 1e-300) if seq in err_lsh else None
            out.append(_goal(f"cpu: lsh {field} <= {g['max_err_ratio']:g}x topk's at seq {seq}", ratio,
                             ratio is not None and ratio <= g["max_err_ratio"]))
    t_lsh, t_topk = _values(results, "lsh", "median_s"), _values(results, "topk", "median_s")
    for seq in g["time_seqs"]:
        ratio = t_lsh[seq] / t_topk[seq] if seq in t_lsh and seq in t_topk else None
        out.append(_goal(f"cpu: lsh fwd time <= {g['max_time_ratio']:g}x topk's at seq {seq}", ratio,
                         ratio is not None and ratio <= g["max_time_ratio"]))
    t = _values(results, "lsh", "select_median_s", MODES)
    what = (f"cpu: lsh select time growth between the two largest seqs <= {g['growth_slack']:g} (N2/N1) "
            "(log2 N2/log2 N1)")
    if len(t) < 2:
        return [*out, _goal(what, None, None)]
    n1, n2 = sorted(t)[-2:]
    bound = nlogn_bound(n1, n2)
    return [*out, {**_goal(f"{what}: seq {n1} -> {n2}, bound {bound:.2f}", t[n2] / t[n1], t[n2] / t[n1] <= bound),
                   "bound": round(bound, 3)}]


def table(results: list[dict[str, Any]]) -> str:
    rat = {(r["seq"], r["mode"], r["peer"]): r for r in ratios(results)}
    head = ("seq", "mode", "peer", "median s", "x sdpa", "peak MB", "mem/sdpa", "rel err", "rel err rows",
            "select s", "busy", "note")
    lines = []
    for r in results:
        x = rat.get((r["seq"], r["mode"], r["peer"]), {})
        note = r.get("skipped") or (r["error"][:70] if "error" in r else "")
        fmt = common.fmt
        lines.append((str(r["seq"]), r["mode"], r["peer"], fmt(r.get("median_s"), "{:.4f}"),
                      fmt(x.get("speedup_vs_sdpa"), "{:.2f}"), fmt(r.get("alloc_peak_mb"), "{:.1f}"),
                      fmt(x.get("memory_vs_sdpa"), "{:.3f}"), fmt(r.get("rel_err"), "{:.2e}"),
                      fmt(r.get("rel_err_rows"), "{:.2e}"), fmt(r.get("select_median_s"), "{:.4f}"),
                      fmt(r.get("others_busy_cores"), "{:.1f}"), note))
    return common.table(lines, head)


def plot(results: list[dict[str, Any]], title: str, path: pathlib.Path, device: str = "cpu") -> None:
    """One row of panels per mode: time, peak memory, relative error and the sparse peers' selection time vs seq
    (log-log), a line per peer."""
    ok = [r for r in results if "median_s" in r]
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)] or ["fwd"]
    metrics = (("median_s", "time (s)"), ("alloc_peak_mb", "peak tensor memory (MB)"),
               ("rel_err_rows", "relative error (sampled rows)"), ("select_median_s", "selection time (s)"))
    seqs = sorted({r["seq"] for r in ok})
    grid = [[common.Panel([common.Line(LABELS[device][peer], [] if metric == "rel_err_rows" and peer in EXACT else
                                       [(r["seq"], r[metric]) for r in ok
                                        if r["mode"] == mode and r["peer"] == peer and r.get(metric)],
                                       COLORS[peer]) for peer in PEERS],
                          seqs, title=f"{mode}: {label}", ylabel=label) for metric, label in metrics]
            for mode in modes]
    common.plot(grid, path, title, figsize=(20, 4.2 * len(modes)), tick_label=common.seq_label, legend_size=8)


# ---------------------------------------------------------------- CLI

def _run(seq: int, peer: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    key = {"seq": seq, "peer": peer, "mode": mode}
    if peer in EXACT and args.exact_max_seq is not None and seq > args.exact_max_seq:
        common.log(f"[   0.0 s] seq {seq:6d} {peer:8s} {mode:7s} skipped (seq > --exact-max-seq)")
        return {**key, "skipped": f"exact peers run up to seq {args.exact_max_seq} (--exact-max-seq)"}
    if args.wait_idle > 0:
        common.wait_for_idle(args.wait_idle)
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", str(seq), peer, mode,
           "--device", args.device, "--retry-s", str(args.retry_s),
           "--exact-max-seq", str(args.exact_max_seq or 0)]
    for name in ("batch", "heads", "kv_heads", "head_dim", "dtype", *KNOBS):
        cmd += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    t0 = time.perf_counter()
    r = common.run_worker(cmd, key, args.timeout)
    msg = r.get("error") or (f"median {r['median_s']:.4f} s, peak {r.get('alloc_peak_mb') or 0:.1f} MB, "
                             f"rel err rows {r['rel_err_rows']:.1e}, busy {r['others_busy_cores']:.1f}")
    common.log(f"[{time.perf_counter() - t0:6.1f} s] seq {seq:6d} {peer:8s} {mode:7s} {msg}")
    return r


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seqs", type=common.csv(int), help="comma-separated (CPU default 4k..64k, CUDA 4k..128k)")
    p.add_argument("--modes", type=common.csv(str), default=["fwd"], help="comma-separated: " + ",".join(MODES))
    p.add_argument("--peers", type=common.csv(str), default=list(PEERS), help="comma-separated: " + ",".join(PEERS))
    p.add_argument("--exact-max-seq", type=int, default=None,
                   help="run the exact peers only up to this seq (0 or unset: no limit); their cells above it "
                        "are marked skipped and approximate rows there get no full rel_err")
    for name in ("batch", "heads", "kv_heads", "head_dim"):
        p.add_argument("--" + name.replace("_", "-"), type=int, help="CPU default 1, 4, 4, 64; CUDA 1, 16, 16, 128")
    p.add_argument("--dtype", help="fp32/bf16/fp16 (CPU default fp32, CUDA bf16)")
    for name, value in KNOBS.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, help=f"default {value}")
    p.add_argument("--retry-s", type=float, help="CPU: keep timing up to this long for quiet calls (default 60)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker")
    p.add_argument("--quick", action="store_true", help="smoke run: seq 256 and 512, tiny heads and kernel knobs")
    common.add_common_args(p, ("SEQ", "PEER", "MODE"))
    args = p.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    fill = {**DEFAULTS[args.device], **KNOBS, **lsh_defaults(), "retry_s": 60.0, **(QUICK if args.quick else {})}
    for name, value in fill.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dtype = common.DTYPES.get(args.dtype.lower(), args.dtype)
    if args.dtype not in ("float32", "bfloat16", "float16"):
        p.error(f"--dtype {args.dtype!r}: choose from fp32, bf16, fp16")
    common.check_choices(p, "mode", args.modes, MODES)
    common.check_choices(p, "peer", args.peers, PEERS)
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    args.exact_max_seq = args.exact_max_seq or None
    return p, args


def main(argv: list[str] | None = None) -> int:
    p, args = parse_args(argv)
    if args.worker:
        seq, peer, mode = args.worker
        shape = {name: getattr(args, name) for name in ("batch", "heads", "kv_heads", "head_dim", "dtype")}
        res = measure(int(seq), peer, mode, args.device, shape, {n: getattr(args, n) for n in KNOBS},
                      args.retry_s, args.exact_max_seq)
        common.emit(res)
        return 0
    command = common.command(__file__, argv)
    if args.from_json:
        return common.redo_from_json(args, command, lambda r: _run(r["seq"], r["peer"], r["mode"], args), write)
    info = common.machine_info()
    today = common.today()
    name = f"longcontext-{common.device_tag(args.device, today)}{'-quick' if args.quick else ''}.json"
    json_path = common.json_path(args.out, name)
    configs = [(seq, peer, mode) for mode in args.modes for seq in args.seqs for peer in args.peers]
    results = [_run(seq, peer, mode, args) for seq, peer, mode in common.progress(configs, "bench_longcontext")]
    saved = ("device", "seqs", "modes", "peers", "exact_max_seq", "batch", "heads", "kv_heads", "head_dim", "dtype",
             "retry_s", "timeout", *KNOBS)
    doc = {"benchmark": "bench_longcontext", "date": today, "device": common.device_name(args.device), "machine": info,
           **common.versions(),
           "setup": {"args": {n: getattr(args, n) for n in saved}, "causal": True, "quick": args.quick,
                     "inputs": f"seeded; q~N(0,1), k~N(0,0.25), v~N(0,1); max(4, seq//512) needle keys per K/V "
                               f"head, every {SEGMENT} queries aimed at one visible needle with scaled-score "
                               "margin ln(seq)+4",
                     "time": "median_s: median of reps calls after a first call and warmup (CPU: the quietest "
                             "of them, retried up to retry_s; CUDA: CUDA events)",
                     "memory": "alloc_peak_mb: peak tensor bytes during one call from its start (CPU: "
                               "torch.profiler memory events; CUDA: max_memory_allocated - memory_allocated); "
                               "rss_peak_mb (CPU): peak RSS growth during one call",
                     "error": "rel_err: ||out - sdpa||_F / ||sdpa||_F (approximate peers, seq <= exact_max_seq); "
                              "rel_err_rows: the same over err_rows sampled query rows vs float64 attention",
                     "process": "each (seq, peer, mode) in a fresh process",
                     "select": "select_median_s (topk, lsh): attnfuse.kernels.<peer>.select alone, timed in the "
                               "peer's worker after its own timing, as median_s",
                     "lsh": "cap = topk, block/sink/local as top-k's, seed 0"},
           "results": results, "command": command}
    write(doc, json_path)
    return 0


def write(doc: dict[str, Any], json_path: pathlib.Path) -> None:
    """Add ratios and goals to ``doc``; write it as JSON and the plot as PNG next to it; print a summary."""
    device = doc["setup"]["args"]["device"]
    doc["ratios"] = ratios(doc["results"])
    doc["goals"] = goals(doc["results"], device)
    doc["select_growth"] = select_growth(doc["results"])
    common.write_json(json_path, doc)
    png_path = json_path.with_suffix(".png")
    a = doc["setup"]["args"]
    plot(doc["results"], f"causal attention on {doc['device']}: B={a['batch']}, H={a['heads']}, "
                         f"Hkv={a['kv_heads']}, D={a['head_dim']}, {a['dtype']}, top-k / LSH cap {a['topk']}, LSH "
                         f"{a.get('tables')} tables x {'auto' if a.get('bits') == -1 else a.get('bits')} bits, "
                         f"{a.get('probes')} probes ({doc['date']})", png_path, device)
    common.print_summary(table(doc["results"]), doc, json_path, png_path)
    common.print_goals(doc["goals"])


if __name__ == "__main__":
    sys.exit(main())
