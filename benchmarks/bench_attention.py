"""Attention kernel throughput (TFLOP/s): attnfuse's flash kernel vs SDPA (flash backend) vs FlexAttention, on GPU.

    python benchmarks/bench_attention.py [--seqs 512,1024,2048,4096,8192,16384] [--head-dims 64,128]
                                         [--causal false,true] [--dtype bf16] [--modes fwd,bwd,fwd_bwd]
                                         [--peers attnfuse,sdpa,flex] [--reps 30] [--warmup 5] [--out DIR|FILE.json]
    python benchmarks/bench_attention.py --from-json RESULTS.json [--out DIR|FILE.png]   # re-plot, no GPU needed

Peers, run side by side in one process on the same inputs:

* ``attnfuse`` -- ``attnfuse.kernels.flash.attention(q, k, v, causal=...)`` (imported only on the GPU path);
* ``sdpa``     -- ``F.scaled_dot_product_attention`` restricted to the flash backend
  (``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``);
* ``flex``     -- ``torch.compile(flex_attention)``, with a causal ``create_block_mask`` for causal rows.

Shapes: (batch, heads, seq, head_dim) with ``batch = tokens // seq`` (16k tokens per batch) and
``heads = model_dim // head_dim`` (model dim 2048), so every configuration moves the same number of elements.

FLOPs (the same nominal count for every peer): forward ``4 * B * H * Lq * Lk * D``, halved when causal;
backward 2.5x and forward+backward 3.5x the forward.  Time: one untimed call (compiles / autotunes), warm-up
(at least ``--warmup`` calls and about 25 ms), then ``--reps`` calls each between two CUDA events; the median is
reported.  ``fwd`` is the training forward (inputs require grad); ``bwd`` is ``out.backward(grad,
retain_graph=True)`` on one precomputed forward output; ``fwd_bwd`` is both.  Input gradients are reset to None
before every call, outside the timed region.  Once per configuration each peer's output (and, when a backward
mode is measured, its input gradients) is compared with SDPA's (max abs difference).  A peer that fails
(unsupported, out of memory, compile error) records the error instead of stopping the run.

Results: ``benchmarks/results/attention-<gpu>-<date>.json`` and a ``.png`` next to it (one panel per
(head dim, causal, mode), TFLOP/s vs sequence length, one line per peer), and a table on stdout with the
attnfuse / sdpa throughput ratio per row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import re
import statistics
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
PEERS = ("attnfuse", "sdpa", "flex")
MODES = ("fwd", "bwd", "fwd_bwd")
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16",
          "fp32": "float32", "float32": "float32"}
DEFAULT_SEQS = (512, 1024, 2048, 4096, 8192, 16384)
NEEDS_GPU = "bench_attention.py needs a CUDA GPU"
_WARMUP_MS = 25.0  # warm-up lasts at least this long (and at least --warmup calls)


# ---------------------------------------------------------------- grid and FLOPs (no torch needed)

def _csv(kind):
    return lambda text: [kind(x.strip()) for x in text.split(",") if x.strip()]


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "causal"):
        return True
    if low in ("0", "false", "no", "full"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r} (use true/false)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=_csv(int), default=list(DEFAULT_SEQS), help="comma-separated sequence lengths")
    p.add_argument("--head-dims", type=_csv(int), default=[64, 128], help="comma-separated head dims")
    p.add_argument("--causal", type=_csv(_bool), default=[False, True], help="comma-separated: false,true")
    p.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    p.add_argument("--modes", type=_csv(str), default=list(MODES), help="comma-separated: " + ",".join(MODES))
    p.add_argument("--peers", type=_csv(str), default=list(PEERS), help="comma-separated: " + ",".join(PEERS))
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch: batch = tokens // seq")
    p.add_argument("--model-dim", type=int, default=2048, help="heads = model_dim // head_dim")
    p.add_argument("--reps", type=int, default=30, help="timed calls per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing (at least ~25 ms of them)")
    p.add_argument("--out", default=None,
                   help="output folder or .json path (default benchmarks/results); with --from-json, a folder "
                        "or .png path for the plot (default: next to the JSON)")
    p.add_argument("--from-json", metavar="FILE", help="re-plot and re-print an existing results JSON (no GPU)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    for what, values, allowed in (("mode", args.modes, MODES), ("peer", args.peers, PEERS)):
        for x in values:
            if x not in allowed:
                p.error(f"unknown {what} {x!r}; choose from {', '.join(allowed)}")
    if args.dtype.lower() not in DTYPES:
        p.error(f"unknown dtype {args.dtype!r}; choose from {', '.join(DTYPES)}")
    args.dtype = DTYPES[args.dtype.lower()]
    for d in args.head_dims:
        if d <= 0 or args.model_dim % d:
            p.error(f"head dim {d} does not divide the model dim {args.model_dim}")
    for s in args.seqs:
        if s <= 0 or s > args.tokens:
            p.error(f"sequence length {s} must be in 1..{args.tokens} (--tokens)")
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    args.modes = list(dict.fromkeys(args.modes))
    args.peers = list(dict.fromkeys(args.peers))
    return args


def cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration of the grid, ordered by (head dim, causal, seq)."""
    out = []
    for d in dict.fromkeys(args.head_dims):
        for causal in dict.fromkeys(args.causal):
            for seq in dict.fromkeys(args.seqs):
                out.append({"seq": seq, "batch": args.tokens // seq, "heads": args.model_dim // d, "head_dim": d,
                            "causal": causal, "dtype": args.dtype})
    return out


def flops(case: dict[str, Any], mode: str) -> float:
    """Nominal FLOPs of one call: forward 4*B*H*Lq*Lk*D (halved when causal); bwd 2.5x, fwd_bwd 3.5x."""
    seq_q = case["seq"]
    seq_k = case.get("seq_k", seq_q)
    fwd = 4.0 * case["batch"] * case["heads"] * seq_q * seq_k * case["head_dim"]
    if case["causal"]:
        fwd /= 2
    return fwd * MODE_FACTOR[mode]


def device_tag(name: str) -> str:
    """Short file-name tag for a GPU: 'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA GeForce RTX 4090' -> 'rtx-4090'."""
    words = [w for w in re.findall(r"[a-z0-9]+", name.lower()) if w not in ("nvidia", "geforce", "tesla", "amd")]
    if not words:
        return "gpu"
    if words[0] in ("rtx", "gtx", "quadro", "radeon", "instinct") and len(words) > 1:
        return f"{words[0]}-{words[1]}"
    return words[0]


def _seq_label(seq: int) -> str:
    return f"{seq // 1024}k" if seq >= 1024 and seq % 1024 == 0 else str(seq)


def _config_key(r: dict[str, Any]) -> tuple:
    return (r["head_dim"], r["causal"], r["seq"], r["batch"], r["heads"])


# ---------------------------------------------------------------- report: ratios, table, plot

def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """attnfuse TFLOP/s over sdpa TFLOP/s for every (configuration, mode) where both were measured."""
    tf = {(_config_key(r), r["mode"], r["peer"]): r.get("tflops") for r in rows}
    out = []
    for r in rows:
        if r["peer"] != "attnfuse":
            continue
        af, sd = r.get("tflops"), tf.get((_config_key(r), r["mode"], "sdpa"))
        out.append({"seq": r["seq"], "head_dim": r["head_dim"], "causal": r["causal"], "mode": r["mode"],
                    "attnfuse_over_sdpa": af / sd if af and sd else None})
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """One line per (configuration, mode): each peer's TFLOP/s and max abs diff vs SDPA, and attnfuse/sdpa."""
    peers = [p for p in PEERS if any(r["peer"] == p for r in rows)]
    peers += [p for p in dict.fromkeys(r["peer"] for r in rows) if p not in peers]
    by = {(_config_key(r), r["mode"], r["peer"]): r for r in rows}
    head = ("d", "causal", "seq", "batch", "heads", "mode", *(f"{p} TF/s" for p in peers), "af/sdpa",
            *(f"diff {p}" for p in peers if p != "sdpa"))
    lines = [head]
    for key, mode in dict.fromkeys((_config_key(r), r["mode"]) for r in rows):
        d, causal, seq, batch, heads = key
        cells = [str(d), "yes" if causal else "no", _seq_label(seq), str(batch), str(heads), mode]
        got = [by.get((key, mode, p)) for p in peers]
        for r in got:
            cells.append("-" if r is None else "error" if r.get("error") else f"{r['tflops']:.1f}")
        af, sd = by.get((key, mode, "attnfuse")), by.get((key, mode, "sdpa"))
        ok = af and sd and af.get("tflops") and sd.get("tflops")
        cells.append(f"{af['tflops'] / sd['tflops']:.2f}" if ok else "-")
        for p, r in zip(peers, got):
            if p != "sdpa":
                diff = None if r is None else r.get("max_abs_diff")
                cells.append("-" if diff is None else f"{diff:.1e}")
        lines.append(tuple(cells))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
    errors = dict.fromkeys(f"{r['peer']} d{r['head_dim']} {'causal' if r['causal'] else 'full'} "
                           f"seq {_seq_label(r['seq'])} {r['mode']}: {r['error']}" for r in rows if r.get("error"))
    if errors:
        text += "\nerrors:\n" + "\n".join("  " + e[:300] for e in errors)
    return text


PEER_STYLE = {"attnfuse": ("tab:red", "D", "attnfuse (Triton flash)"), "sdpa": ("tab:green", "^", "SDPA flash"),
              "flex": ("tab:blue", "s", "FlexAttention (compiled)")}


def plot(rows: list[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> None:
    """TFLOP/s vs sequence length, one panel per (head dim, causal, mode), one line per peer; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("error") and r.get("tflops") is not None]
    groups = list(dict.fromkeys((r["head_dim"], r["causal"]) for r in rows)) or [(None, None)]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)] or list(MODES)
    peers = list(dict.fromkeys(r["peer"] for r in rows))
    fig, axes = plt.subplots(len(groups), len(modes), figsize=(4.4 * len(modes), 3.3 * len(groups) + 0.9),
                             squeeze=False)
    for i, (d, causal) in enumerate(groups):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            seqs = sorted({r["seq"] for r in rows if (r["head_dim"], r["causal"]) == (d, causal)})
            for peer in peers:
                color, marker, label = PEER_STYLE.get(peer, (None, "o", peer))
                pts = sorted((r["seq"], r["tflops"]) for r in ok
                             if (r["head_dim"], r["causal"], r["mode"], r["peer"]) == (d, causal, mode, peer))
                if pts:
                    ax.plot(*zip(*pts), color=color, marker=marker, label=label)
            ax.set_xscale("log", base=2)
            if seqs:
                ax.set_xticks(seqs, [_seq_label(s) for s in seqs])
                ax.minorticks_off()
            ax.set_ylim(bottom=0)
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.set_title(f"d={d}, {'causal' if causal else 'non-causal'}, {mode}")
            ax.grid(True, alpha=0.3)
    handles, names = {}, []
    for ax in axes.flat:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in handles:
                handles[n] = h
                names.append(n)
    if names:
        fig.legend([handles[n] for n in names], names, loc="lower center", ncol=len(names), frameon=False)
    fig.suptitle(title or "attention TFLOP/s")
    fig.tight_layout(rect=(0, 0.06 if names else 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _title(doc: dict[str, Any]) -> str:
    return (f"attention TFLOP/s: {doc.get('device', '?')}, {doc.get('setup', {}).get('dtype', '?')}, "
            f"torch {doc.get('torch', '?')}, triton {doc.get('triton', '?')} ({doc.get('date', '?')})")


def report(doc: dict[str, Any], png_path: pathlib.Path) -> None:
    """Plot ``doc['rows']`` to ``png_path`` and print the table and the attnfuse/sdpa ratios."""
    rows = doc["rows"]
    plot(rows, png_path, _title(doc))
    print(table(rows))
    got = [r["attnfuse_over_sdpa"] for r in ratios(rows) if r["attnfuse_over_sdpa"]]
    if got:
        print(f"attnfuse/sdpa TFLOP/s: geomean {math.exp(statistics.fmean(map(math.log, got))):.2f}, "
              f"min {min(got):.2f}, max {max(got):.2f} over {len(got)} rows")


# ---------------------------------------------------------------- measurement (GPU only)

def _error(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}"[:500] if msg else type(e).__name__


_FLEX = None


def _make_peer(peer: str, case: dict[str, Any]):
    """``fn(q, k, v) -> out`` for one peer and configuration; raises if the peer is unavailable."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    causal = case["causal"]
    if peer == "attnfuse":
        from attnfuse.kernels.flash import attention

        return lambda q, k, v: attention(q, k, v, causal=causal)
    if peer == "sdpa":
        def sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return sdpa
    if peer == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        global _FLEX
        if _FLEX is None:
            _FLEX = torch.compile(flex_attention, dynamic=False)
        compiled = _FLEX
        mask = None
        if causal:
            mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, case["seq"],
                                     case.get("seq_k", case["seq"]), device="cuda")
        return lambda q, k, v: compiled(q, k, v, block_mask=mask)
    raise ValueError(f"unknown peer {peer!r}")


def _bench(fn, reps: int, warmup: int, setup=None) -> list[float]:
    """Milliseconds of ``reps`` calls of ``fn``, each between two CUDA events (``setup()`` runs before each call,
    outside the events), after one untimed call and a warm-up of at least ``warmup`` calls and ~25 ms."""
    import torch

    def call():
        if setup is not None:
            setup()
        fn()

    call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        call()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(min(max(warmup, math.ceil(_WARMUP_MS / estimate)), 1000)):
        call()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        if setup is not None:
            setup()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def run_case(case: dict[str, Any], args: argparse.Namespace, t0: float) -> list[dict[str, Any]]:
    """All rows of one configuration: every peer in every mode, with its difference from SDPA."""
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, case["dtype"])
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (case["batch"], case["heads"], case["seq"], case["head_dim"])
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, generator=gen).requires_grad_() for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
    inputs = (q, k, v)
    want_grads = any(m != "fwd" for m in args.modes)

    def zero_grads() -> None:
        for t in inputs:
            t.grad = None

    def forward_and_grads(fn):
        zero_grads()
        out = fn(q, k, v)
        grads = None
        if want_grads:
            out.backward(grad)
            grads = tuple(t.grad for t in inputs)
            zero_grads()
        return out.detach(), grads

    ref = ref_grads = None
    ref_note = "sdpa (flash backend)"
    try:
        ref, ref_grads = forward_and_grads(_make_peer("sdpa", case))
    except Exception as e:  # no flash backend for this shape/GPU: any SDPA backend is still a reference
        ref_note = f"sdpa (default backends; flash failed: {_error(e)[:120]})"
        torch.cuda.empty_cache()
        try:
            ref, ref_grads = forward_and_grads(
                lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=case["causal"]))
        except Exception as e2:
            ref_note = f"none: {_error(e2)}"
            torch.cuda.empty_cache()

    rows = []
    for peer in args.peers:
        base = {"peer": peer, **case, "reference": ref_note}
        try:
            fn = _make_peer(peer, case)
        except Exception as e:
            err = _error(e)
            rows += [{**base, "mode": m, "flops": flops(case, m), "error": err} for m in args.modes]
            print(f"[{time.perf_counter() - t0:7.1f} s] {peer:8s} d{case['head_dim']} causal={case['causal']} "
                  f"seq {case['seq']}: {err[:200]}", flush=True)
            torch.cuda.empty_cache()
            continue
        check: dict[str, Any] = {"max_abs_diff": None}
        try:
            out, grads = forward_and_grads(fn)
            if ref is not None:
                check["max_abs_diff"] = _max_diff(out, ref)
                if grads is not None and ref_grads is not None:
                    check["grad_max_abs_diff"] = {n: _max_diff(g, r) for n, g, r in zip("qkv", grads, ref_grads)}
            del out, grads
        except Exception as e:
            check["check_error"] = _error(e)
            torch.cuda.empty_cache()
        for mode in args.modes:
            row = {**base, "mode": mode, "flops": flops(case, mode), **check}
            try:
                if mode == "fwd":
                    times = _bench(lambda: fn(q, k, v), args.reps, args.warmup, zero_grads)
                elif mode == "bwd":
                    out = fn(q, k, v)
                    times = _bench(lambda: out.backward(grad, retain_graph=True), args.reps, args.warmup,
                                   zero_grads)
                    del out
                else:
                    times = _bench(lambda: fn(q, k, v).backward(grad), args.reps, args.warmup, zero_grads)
                row["ms"] = statistics.median(times)
                row["ms_min"] = min(times)
                row["tflops"] = row["flops"] / (row["ms"] * 1e-3) / 1e12
                msg = f"{row['tflops']:7.1f} TFLOP/s ({row['ms']:.3f} ms)"
            except Exception as e:
                row["error"] = _error(e)
                msg = row["error"][:200]
                torch.cuda.empty_cache()
            zero_grads()
            rows.append(row)
            print(f"[{time.perf_counter() - t0:7.1f} s] {peer:8s} d{case['head_dim']:<4d} "
                  f"{'causal' if case['causal'] else 'full  '} seq {case['seq']:6d} {mode:7s} {msg}", flush=True)
    return rows


def _versions() -> dict[str, Any]:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda}


# ---------------------------------------------------------------- CLI

def _from_json(args: argparse.Namespace) -> int:
    json_path = pathlib.Path(args.from_json)
    doc = json.loads(json_path.read_text())
    out = pathlib.Path(args.out) if args.out else json_path.parent
    png_path = out if out.suffix == ".png" else out / json_path.with_suffix(".png").name
    png_path.parent.mkdir(parents=True, exist_ok=True)
    report(doc, png_path)
    print(f"wrote {png_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return _from_json(args)
    grid = cases(args)
    total_flops = sum(flops(c, m) for c in grid for m in args.modes)

    import torch

    if not torch.cuda.is_available():
        print(f"{NEEDS_GPU}; none found (torch {torch.__version__}). Planned {len(grid)} configs x "
              f"{len(args.modes)} modes x {len(args.peers)} peers ({total_flops / 1e12:.1f} TFLOP per peer); "
              "use --from-json FILE to re-plot saved results.")
        return 0

    import torch._dynamo
    import torch._functorch.config

    # one compiled flex_attention serves every shape and mask: allow it that many recompiles
    for name, least in (("cache_size_limit", 256), ("accumulated_cache_size_limit", 4096)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), least))
    # bwd mode calls backward with retain_graph=True, which compiled backwards with donated buffers refuse
    if hasattr(torch._functorch.config, "donated_buffer"):
        torch._functorch.config.donated_buffer = False

    gpu = torch.cuda.get_device_name(0)
    today = datetime.date.today().isoformat()
    out = pathlib.Path(args.out) if args.out else ROOT / "benchmarks" / "results"
    json_path = out if out.suffix == ".json" else out / f"attention-{device_tag(gpu)}-{today}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"{gpu}: {len(grid)} configs x {len(args.modes)} modes x {len(args.peers)} peers", flush=True)

    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for case in grid:
        rows += run_case(case, args, t0)
    doc = {"benchmark": "bench_attention", "date": today, "device": gpu, "device_tag": device_tag(gpu),
           **_versions(),
           "setup": {"dtype": args.dtype, "tokens_per_batch": args.tokens, "model_dim": args.model_dim,
                     "seqs": args.seqs, "head_dims": args.head_dims, "causal": args.causal, "modes": args.modes,
                     "peers": args.peers, "reps": args.reps, "warmup": args.warmup,
                     "flops": "forward 4*B*H*Lq*Lk*D (halved when causal); bwd 2.5x, fwd_bwd 3.5x forward",
                     "time": "ms: median of reps calls, each between two CUDA events, after one untimed call and "
                             f">= warmup calls (>= {_WARMUP_MS:.0f} ms); ms_min: the fastest",
                     "fwd": "training forward (inputs require grad)",
                     "bwd": "out.backward(grad, retain_graph=True) on one precomputed forward output",
                     "check": "max_abs_diff (and grad_max_abs_diff, when a backward mode runs): max |peer - "
                              "reference| once per configuration; the reference is SDPA (see each row's "
                              "'reference')"},
           "rows": rows, "ratios": ratios(rows),
           "command": " ".join([os.path.relpath(sys.argv[0], ROOT) if argv is None else "bench_attention.py",
                                *(argv if argv is not None else sys.argv[1:])])}
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    png_path = json_path.with_suffix(".png")
    report(doc, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
