"""Attention kernel throughput (TFLOP/s): attnfuse vs SDPA vs FlexAttention on GPU, dense and sliding-window.

    python benchmarks/bench_attention.py [--seqs 512,1024,2048,4096,8192,16384] [--head-dims 64,128]
                                         [--causal false,true] [--windows 1024,4096] [--no-dense] [--dtype bf16]
                                         [--modes fwd,bwd,fwd_bwd] [--peers attnfuse,sdpa,flex] [--reps 30]
                                         [--warmup 5] [--out DIR|FILE.json]
    python benchmarks/bench_attention.py --from-json RESULTS.json [--out DIR|FILE.png]   # re-plot, no GPU needed

Two kinds of rows, run side by side in one process on the same inputs:

* dense rows (one per ``--causal`` value; ``--no-dense`` skips them):

  * ``attnfuse`` -- ``attnfuse.kernels.flash.attention(q, k, v, causal=...)`` (imported only on the GPU path);
  * ``sdpa``     -- ``F.scaled_dot_product_attention`` restricted to the flash backend
    (``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``);
  * ``flex``     -- ``torch.compile(flex_attention)``, with a causal ``create_block_mask`` for causal rows.

* window rows (one per ``--windows`` width ``w``): Mistral-style causal sliding window, key ``j`` visible from
  query ``i`` iff ``i - w < j <= i``:

  * ``attnfuse`` -- ``attnfuse.kernels.window.attention(q, k, v, window_size=(w - 1, 0), causal=True)``, which
    visits only the tiles of the band;
  * ``sdpa``     -- "sdpa (dense band mask)": a dense ``(seq, seq)`` bool band mask through the efficient (or
    math) backend, since the flash backend takes no mask; it computes every tile, so it is the correctness
    reference of the row and its time is recorded, but the goal is set against Flex;
  * ``flex``     -- ``torch.compile(flex_attention)`` with the sliding-window BlockMask
    ``create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (qi - ki < w), ...)``.

Shapes: (batch, heads, seq, head_dim) with ``heads = model_dim // head_dim`` (model dim 2048) and
``batch = tokens // seq`` (16k tokens per batch), so every dense configuration moves the same number of elements.
Window rows may be longer than ``--tokens`` (the sliding-window case is about 8k..64k): they run at
``batch = max(1, tokens // seq)``.

FLOPs (the same count for every peer of a row): dense forward ``4 * B * H * Lq * Lk * D``, halved when causal
(nominal, as usual for attention benchmarks); a window forward counts only the useful work,
``4 * B * H * D * P`` with ``P`` the exact number of visible (query, key) pairs, ``w * (w + 1) / 2 + (seq - w) * w``
for ``w < seq`` (``seq * (seq + 1) / 2`` otherwise), so a peer that computes the masked-out tiles gets no credit
for them.  Backward 2.5x and forward+backward 3.5x the forward.  Time: one untimed call (compiles / autotunes),
warm-up (at least ``--warmup`` calls and about 25 ms), then ``--reps`` calls each between two CUDA events; the
median is reported.  ``fwd`` is the training forward (inputs require grad); ``bwd`` is ``out.backward(grad,
retain_graph=True)`` on one precomputed forward output; ``fwd_bwd`` is both.  Input gradients are reset to None
before every call, outside the timed region.  Once per configuration each peer's output (and, when a backward
mode is measured, its input gradients) is compared with SDPA's (max abs difference).  A peer that fails
(unsupported, out of memory, compile error) records the error instead of stopping the run.

Results: ``benchmarks/results/attention-<gpu>-<date>.json`` (``attention-window-<gpu>-<date>.json`` with
``--no-dense``, so that it never overwrites the same day's dense results) and a ``.png`` next to it (one panel
per (head dim, causal, mode) for dense rows and per (head dim, window, mode) for window rows, TFLOP/s vs sequence
length, one line per peer), and a table on stdout with the attnfuse / sdpa throughput ratio of every dense row
and the attnfuse / flex ratio of every window row (the sliding-window goal is >= 1.5x Flex).
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # _common, also when loaded by path (tests)
import _common as common  # noqa: E402

PEERS = ("attnfuse", "sdpa", "flex")
MODES = ("fwd", "bwd", "fwd_bwd")
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
DEFAULT_SEQS = (512, 1024, 2048, 4096, 8192, 16384)
NEEDS_GPU = "bench_attention.py needs a CUDA GPU"
_WARMUP_MS = 25.0  # warm-up lasts at least this long (and at least --warmup calls): common.time_call's warmup_ms


# ---------------------------------------------------------------- grid and FLOPs (no torch needed)

def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "causal"):
        return True
    if low in ("0", "false", "no", "full"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r} (use true/false)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=common.csv(int), default=list(DEFAULT_SEQS), help="comma-separated sequence lengths")
    p.add_argument("--head-dims", type=common.csv(int), default=[64, 128], help="comma-separated head dims")
    p.add_argument("--causal", type=common.csv(_bool), default=[False, True],
                   help="comma-separated: false,true (the dense rows)")
    p.add_argument("--windows", type=common.csv(int), default=[],
                   help="comma-separated sliding-window widths w (key j visible from query i iff i - w < j <= i); "
                        "one row per width and seq, beside the dense rows (default: none)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense rows (run only the --windows rows)")
    p.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    p.add_argument("--modes", type=common.csv(str), default=list(MODES), help="comma-separated: " + ",".join(MODES))
    p.add_argument("--peers", type=common.csv(str), default=list(PEERS), help="comma-separated: " + ",".join(PEERS))
    p.add_argument("--tokens", type=int, default=16384,
                   help="tokens per batch: batch = tokens // seq (window rows: max(1, tokens // seq))")
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
    common.check_choices(p, "mode", args.modes, MODES)
    common.check_choices(p, "peer", args.peers, PEERS)
    if args.dtype.lower() not in common.DTYPES:
        p.error(f"unknown dtype {args.dtype!r}; choose from {', '.join(common.DTYPES)}")
    args.dtype = common.DTYPES[args.dtype.lower()]
    for d in args.head_dims:
        if d <= 0 or args.model_dim % d:
            p.error(f"head dim {d} does not divide the model dim {args.model_dim}")
    for w in args.windows:
        if w <= 0:
            p.error(f"window width {w} must be >= 1")
    if args.no_dense and not args.windows:
        p.error("--no-dense leaves nothing to run without --windows")
    for s in args.seqs:
        if s <= 0:
            p.error(f"sequence length {s} must be >= 1")
        # dense rows keep batch * seq == tokens (same elements everywhere); window rows may be longer, at batch 1
        if s > args.tokens and not args.no_dense:
            p.error(f"sequence length {s} must be in 1..{args.tokens} (--tokens) for the dense rows; "
                    "add --no-dense to run only the window rows, which take longer sequences at batch 1")
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    args.modes = list(dict.fromkeys(args.modes))
    args.peers = list(dict.fromkeys(args.peers))
    args.windows = list(dict.fromkeys(args.windows))
    return args


def cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration of the grid: the dense ones ordered by (head dim, causal, seq), then the window ones
    by (head dim, window, seq).  ``window`` is None for dense rows; window rows are causal."""
    out = []
    if not args.no_dense:
        for d in dict.fromkeys(args.head_dims):
            for causal in dict.fromkeys(args.causal):
                for seq in dict.fromkeys(args.seqs):
                    out.append({"seq": seq, "batch": args.tokens // seq, "heads": args.model_dim // d,
                                "head_dim": d, "causal": causal, "window": None, "dtype": args.dtype})
    for d in dict.fromkeys(args.head_dims):
        for w in args.windows:
            for seq in dict.fromkeys(args.seqs):
                out.append({"seq": seq, "batch": max(1, args.tokens // seq), "heads": args.model_dim // d,
                            "head_dim": d, "causal": True, "window": w, "dtype": args.dtype})
    return out


def window_pairs(seq: int, window: int) -> int:
    """Visible (query, key) pairs of a causal sliding window over ``seq`` tokens (key j seen from query i iff
    i - window < j <= i): row i sees min(i + 1, window) keys, so the first ``m = min(window, seq)`` rows form a
    triangle and every later row sees ``m`` keys."""
    m = min(window, seq)
    return m * (m + 1) // 2 + (seq - m) * m


def window_mask_mod(window: int):
    """FlexAttention ``mask_mod`` of the causal sliding window (also evaluates on plain index tensors)."""
    return lambda b, h, qi, ki: (qi >= ki) & (qi - ki < window)


def window_kwargs(window: int) -> dict[str, Any]:
    """``attnfuse.kernels.window.attention`` arguments of the causal sliding window: ``window_size=(left, right)``,
    where ``left`` counts the keys before the query's own, so width ``window`` is ``left = window - 1``."""
    return {"window_size": (window - 1, 0), "causal": True}


def flops(case: dict[str, Any], mode: str) -> float:
    """FLOPs of one call; bwd 2.5x and fwd_bwd 3.5x the forward.  Dense forward: nominal 4*B*H*Lq*Lk*D (halved
    when causal).  Window forward: the useful work only, 4*B*H*D * (visible pairs), whatever a peer computes."""
    seq_q = case["seq"]
    if case.get("window") is not None:
        pairs = window_pairs(seq_q, case["window"])
    else:
        pairs = seq_q * case.get("seq_k", seq_q) / (2 if case["causal"] else 1)
    return 4.0 * case["batch"] * case["heads"] * case["head_dim"] * pairs * MODE_FACTOR[mode]


def _kind(r: dict[str, Any]) -> str:
    """'window 4k', 'causal' or 'full' (rows saved before window rows existed have no 'window' key)."""
    w = r.get("window")
    return f"window {common.seq_label(w)}" if w is not None else "causal" if r["causal"] else "full"


def _config_key(r: dict[str, Any]) -> tuple:
    return (r["head_dim"], r["causal"], r.get("window"), r["seq"], r["batch"], r["heads"])


# ---------------------------------------------------------------- report: ratios, table, plot

def baseline(window: int | None) -> str:
    """The peer attnfuse is measured against: sdpa (flash) for dense rows; flex for window rows, whose SDPA
    computes the whole dense mask and so is no bar (the issue's goal is >= 1.5x Flex's sliding-window BlockMask)."""
    return "sdpa" if window is None else "flex"


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """attnfuse TFLOP/s over its baseline's (``attnfuse_over_sdpa`` for dense rows, ``attnfuse_over_flex`` for
    window rows; None unless both were measured) for every (configuration, mode) with an attnfuse row."""
    tf = {(_config_key(r), r["mode"], r["peer"]): r.get("tflops") for r in rows}
    out = []
    for r in rows:
        if r["peer"] != "attnfuse":
            continue
        base = baseline(r.get("window"))
        af, other = r.get("tflops"), tf.get((_config_key(r), r["mode"], base))
        out.append({"seq": r["seq"], "head_dim": r["head_dim"], "causal": r["causal"], "window": r.get("window"),
                    "mode": r["mode"], f"attnfuse_over_{base}": af / other if af and other else None})
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """One line per (configuration, mode): each peer's TFLOP/s and max abs diff vs the reference (SDPA), and
    attnfuse over its baseline: ``af/sdpa`` on dense rows, ``af/flex`` on window rows (a column per kind present).
    """
    peers = [p for p in PEERS if any(r["peer"] == p for r in rows)]
    peers += [p for p in dict.fromkeys(r["peer"] for r in rows) if p not in peers]
    bases = [b for b in ("sdpa", "flex") if any(baseline(r.get("window")) == b for r in rows)]
    by = {(_config_key(r), r["mode"], r["peer"]): r for r in rows}
    head = ("d", "causal", "window", "seq", "batch", "heads", "mode", *(f"{p} TF/s" for p in peers),
            *(f"af/{b}" for b in bases), *(f"diff {p}" for p in peers if p != "sdpa"))
    lines = []
    for key, mode in dict.fromkeys((_config_key(r), r["mode"]) for r in rows):
        d, causal, window, seq, batch, heads = key
        cells = [str(d), "yes" if causal else "no", "-" if window is None else common.seq_label(window),
                 common.seq_label(seq), str(batch), str(heads), mode]
        got = [by.get((key, mode, p)) for p in peers]
        for r in got:
            cells.append("-" if r is None else "error" if r.get("error") else f"{r['tflops']:.1f}")
        for b in bases:
            af, other = by.get((key, mode, "attnfuse")), by.get((key, mode, b))
            ok = b == baseline(window) and af and other and af.get("tflops") and other.get("tflops")
            cells.append(f"{af['tflops'] / other['tflops']:.2f}" if ok else "-")
        for p, r in zip(peers, got):
            if p != "sdpa":
                diff = None if r is None else r.get("max_abs_diff")
                cells.append("-" if diff is None else f"{diff:.1e}")
        lines.append(cells)
    text = common.table(lines, head, align="right")
    if "flex" in bases:
        text += ("\nwindow w rows: key j visible from query i iff i - w < j <= i; 'sdpa' is sdpa (dense band mask), "
                 "the reference;\n  af/flex = attnfuse / FlexAttention with the sliding-window BlockMask (goal >= 1.5)")
    errors = dict.fromkeys(f"{r['peer']} d{r['head_dim']} {_kind(r)} seq {common.seq_label(r['seq'])} {r['mode']}: "
                           f"{r['error']}" for r in rows if r.get("error"))
    if errors:
        text += "\nerrors:\n" + "\n".join("  " + e[:300] for e in errors)
    return text


PEER_STYLE = {"attnfuse": ("tab:red", "D"), "sdpa": ("tab:green", "^"), "flex": ("tab:blue", "s")}
PEER_LABEL = {"attnfuse": "attnfuse (Triton flash)", "sdpa": "SDPA flash", "flex": "FlexAttention (compiled)"}
WINDOW_PEER_LABEL = {"attnfuse": "attnfuse (Triton window)", "sdpa": "sdpa (dense band mask)",
                     "flex": "FlexAttention (sliding-window BlockMask)"}


def peer_label(peer: str, window: int | None) -> str:
    """What a peer runs on a dense row (window None) or a window row; rows record it, the plot's legend shows it."""
    return (PEER_LABEL if window is None else WINDOW_PEER_LABEL).get(peer, peer)


def plot(rows: list[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> None:
    """TFLOP/s vs sequence length, one panel per (head dim, causal, mode) for dense rows and per (head dim,
    window, mode) for window rows, one line per peer (dashed on window panels); saved as PNG."""
    ok = [r for r in rows if not r.get("error") and r.get("tflops") is not None]
    groups = list(dict.fromkeys((r["head_dim"], r["causal"], r.get("window")) for r in rows)) or [(None, None, None)]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)] or list(MODES)
    peers = list(dict.fromkeys(r["peer"] for r in rows))
    # legend: one row per kind of row present (dense, window), one column per peer
    kinds = list(dict.fromkeys(w is not None for _, _, w in groups))
    height = 3.3 * len(groups) + 0.55 + 0.35 * len(kinds)
    grid = []
    for group in groups:
        d, causal, window = group
        seqs = sorted({r["seq"] for r in rows if (r["head_dim"], r["causal"], r.get("window")) == group})
        kind = f"window {common.seq_label(window)}" if window is not None else "causal" if causal else "non-causal"
        grid.append([common.Panel(
            [common.Line(peer_label(peer, window),
                         [(r["seq"], r["tflops"]) for r in ok if r["mode"] == mode and r["peer"] == peer
                          and (r["head_dim"], r["causal"], r.get("window")) == group],
                         *PEER_STYLE.get(peer, (None, "o")), linestyle="-" if window is None else "--")
             for peer in peers],
            seqs, title=f"d={d}, {kind}, {mode}", ylabel="TFLOP/s") for mode in modes])
    # peer-major order: the legend fills column by column, so each column holds one peer's dense and window lines
    drawn = {line.label for row in grid for panel in row for line in panel.lines if line.points}
    names = [n for n in dict.fromkeys(peer_label(p, w) for p in peers for w in (None, 1)) if n in drawn]
    common.plot(grid, path, title or "attention TFLOP/s", figsize=(4.4 * len(modes), height), logy=False,
                tick_label=common.seq_label, legend="figure", legend_order=names,
                legend_ncol=math.ceil(len(names) / len(kinds)),
                rect=(0, 0.35 * len(kinds) / height if names else 0, 1, 1 - 0.45 / height))


def _title(doc: dict[str, Any]) -> str:
    return (f"attention TFLOP/s: {doc.get('device', '?')}, {doc.get('setup', {}).get('dtype', '?')}, "
            f"torch {doc.get('torch', '?')}, triton {doc.get('triton', '?')} ({doc.get('date', '?')})")


def report(doc: dict[str, Any], png_path: pathlib.Path) -> None:
    """Plot ``doc['rows']`` to ``png_path`` and print the table, the attnfuse/sdpa ratios of the dense rows and
    the attnfuse/flex ratios of the window rows (with how many meet the >= 1.5x goal)."""
    rows = doc["rows"]
    plot(rows, png_path, _title(doc))
    print(table(rows))
    rat = ratios(rows)
    for base, what in (("sdpa", "rows"), ("flex", "sliding-window rows")):
        got = [r[f"attnfuse_over_{base}"] for r in rat if r.get(f"attnfuse_over_{base}")]
        if got:
            line = (f"attnfuse/{base} TFLOP/s: geomean {math.exp(statistics.fmean(map(math.log, got))):.2f}, "
                    f"min {min(got):.2f}, max {max(got):.2f} over {len(got)} {what}")
            if base == "flex":
                line += f"; {sum(x >= 1.5 for x in got)} of {len(got)} meet the goal (>= 1.5)"
            print(line)


# ---------------------------------------------------------------- measurement (GPU only)

_FLEX = None
_BAND: dict[tuple, Any] = {}


def band_mask(seq: int, window: int, device: str = "cuda"):
    """The dense (seq, seq) bool keep-mask of a causal sliding window (i - window < j <= i).  Only the latest
    one is kept (4 GiB at 64k): the SDPA peer and its reference fallback share it within a configuration, and
    the previous configuration's is dropped before the next is built."""
    import torch

    key = (seq, window, device)
    if key not in _BAND:
        _BAND.clear()
        _BAND[key] = torch.ones(seq, seq, dtype=torch.bool, device=device).tril_().triu_(1 - window)
    return _BAND[key]


def _make_peer(peer: str, case: dict[str, Any]):
    """``fn(q, k, v) -> out`` for one peer and configuration; raises if the peer is unavailable."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    causal, window = case["causal"], case.get("window")
    if peer == "attnfuse":
        if window is not None:
            from attnfuse.kernels.window import attention as window_attention

            kwargs = window_kwargs(window)
            return lambda q, k, v: window_attention(q, k, v, **kwargs)
        from attnfuse.kernels.flash import attention

        return lambda q, k, v: attention(q, k, v, causal=causal)
    if peer == "sdpa":
        if window is not None:  # the flash backend takes no mask: the efficient (or math) one reads the band
            band = band_mask(case["seq"], window)

            def sdpa_band(q, k, v):
                with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=band)

            return sdpa_band

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
        seq_q, seq_k = case["seq"], case.get("seq_k", case["seq"])
        mask = None
        if window is not None:
            mask = create_block_mask(window_mask_mod(window), None, None, seq_q, seq_k, device="cuda")
        elif causal:
            mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, seq_q, seq_k, device="cuda")
        return lambda q, k, v: compiled(q, k, v, block_mask=mask)
    raise ValueError(f"unknown peer {peer!r}")


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

    window = case.get("window")
    ref = ref_grads = None
    ref_note = peer_label("sdpa", window) if window is not None else "sdpa (flash backend)"
    try:
        ref, ref_grads = forward_and_grads(_make_peer("sdpa", case))
    except Exception as e:  # no such backend for this shape/GPU: any SDPA backend is still a reference
        ref_note = f"sdpa (default backends; {ref_note} failed: {common.error_text(e)[:120]})"
        torch.cuda.empty_cache()
        try:
            if window is None:
                ref, ref_grads = forward_and_grads(
                    lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=case["causal"]))
            else:
                band = band_mask(case["seq"], window)
                ref, ref_grads = forward_and_grads(
                    lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=band))
        except Exception as e2:
            ref_note = f"none: {common.error_text(e2)}"
            torch.cuda.empty_cache()

    rows = []
    for peer in args.peers:
        base = {"peer": peer, **case, "label": peer_label(peer, window), "reference": ref_note}
        try:
            fn = _make_peer(peer, case)
        except Exception as e:
            err = common.error_text(e)
            rows += [{**base, "mode": m, "flops": flops(case, m), "error": err} for m in args.modes]
            common.log(f"[{time.perf_counter() - t0:7.1f} s] {peer:8s} d{case['head_dim']} {_kind(case)} "
                f"seq {case['seq']}: {err[:200]}")
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
            check["check_error"] = common.error_text(e)
            torch.cuda.empty_cache()
        for mode in args.modes:
            row = {**base, "mode": mode, "flops": flops(case, mode), **check}
            try:
                if mode == "fwd":
                    call = lambda: fn(q, k, v)
                elif mode == "bwd":
                    out = fn(q, k, v)
                    call = lambda: out.backward(grad, retain_graph=True)
                else:
                    call = lambda: fn(q, k, v).backward(grad)
                timing = common.time_call(call, "cuda", reps=args.reps, warmup=args.warmup, setup=zero_grads,
                                          warmup_ms=_WARMUP_MS)
                out = call = None
                row["ms"] = timing.median_s * 1e3
                row["ms_min"] = min(timing.times_s) * 1e3
                row["tflops"] = row["flops"] / (row["ms"] * 1e-3) / 1e12
                msg = f"{row['tflops']:7.1f} TFLOP/s ({row['ms']:.3f} ms)"
            except Exception as e:
                row["error"] = common.error_text(e)
                msg = row["error"][:200]
                torch.cuda.empty_cache()
            zero_grads()
            rows.append(row)
            common.log(f"[{time.perf_counter() - t0:7.1f} s] {peer:8s} d{case['head_dim']:<4d} {_kind(case):10s} "
                f"seq {case['seq']:6d} {mode:7s} {msg}")
    return rows


# ---------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return common.replot(args, report)
    grid = cases(args)
    total_flops = sum(flops(c, m) for c in grid for m in args.modes)

    import torch

    if not torch.cuda.is_available():
        n_window = sum(c["window"] is not None for c in grid)
        print(f"{NEEDS_GPU}; none found (torch {torch.__version__}). Planned {len(grid)} configs x "
              f"{len(args.modes)} modes x {len(args.peers)} peers ({len(grid) - n_window} dense, {n_window} "
              f"sliding-window; {total_flops / 1e12:.1f} TFLOP per peer); use --from-json FILE to re-plot saved "
              "results.")
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
    today = common.today()
    stem = "attention-window" if args.no_dense else "attention"
    json_path = common.json_path(args.out or common.RESULTS, f"{stem}-{common.device_tag('cuda', today)}.json")
    print(f"{gpu}: {len(grid)} configs x {len(args.modes)} modes x {len(args.peers)} peers "
          f"({sum(c['window'] is not None for c in grid)} sliding-window)", flush=True)

    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for case in common.progress(grid, "bench_attention"):
        rows += run_case(case, args, t0)
    doc = {"benchmark": "bench_attention", "date": today, "device": gpu, "device_tag": common.gpu_tag(gpu),
           **common.versions(),
           "setup": {"dtype": args.dtype, "tokens_per_batch": args.tokens, "model_dim": args.model_dim,
                     "seqs": args.seqs, "head_dims": args.head_dims, "causal": [] if args.no_dense else args.causal,
                     "windows": args.windows, "modes": args.modes, "peers": args.peers, "reps": args.reps,
                     "warmup": args.warmup,
                     "flops": "dense forward 4*B*H*Lq*Lk*D (halved when causal); window forward 4*B*H*D*(visible "
                              "(i, j) pairs, exact); bwd 2.5x, fwd_bwd 3.5x forward",
                     "window": "causal sliding window w: key j visible from query i iff i - w < j <= i; batch "
                               "max(1, tokens // seq); attnfuse.kernels.window.attention(window_size=(w-1, 0), "
                               "causal=True), flex with the sliding-window BlockMask, sdpa with a dense bool band "
                               "mask (efficient/math backend; the reference); ratio: attnfuse / flex",
                     "time": "ms: median of reps calls, each between two CUDA events, after one untimed call and "
                             f">= warmup calls (>= {_WARMUP_MS:.0f} ms); ms_min: the fastest",
                     "fwd": "training forward (inputs require grad)",
                     "bwd": "out.backward(grad, retain_graph=True) on one precomputed forward output",
                     "check": "max_abs_diff (and grad_max_abs_diff, when a backward mode runs): max |peer - "
                              "reference| once per configuration; the reference is SDPA (see each row's "
                              "'reference')"},
           "rows": rows, "ratios": ratios(rows), "command": common.command(__file__, argv)}
    common.save_results(doc, json_path, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
