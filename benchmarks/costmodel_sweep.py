"""Cost model vs measurement on a GPU: the flash kernel's predicted and measured time for every tile config.

    python benchmarks/costmodel_sweep.py [--bwd [--no-fwd]] [--smoke] [--rep-ms 20] [--budget-s 420]
                                         [--out DIR|FILE.json]
    python benchmarks/costmodel_sweep.py --from-json RESULTS.json [--out DIR|FILE.png]   # re-plot, no GPU needed

Shapes (40): bf16 at seq 512..32k, head dim 64/128, causal and not, model dim 2048 (heads = 2048 // d) and 16k
tokens per batch (batch = max(1, 16384 // seq)); fp16 at seq 1k/4k/16k, head dim 64/128, causal and not, model
dim 1024 and 8k tokens (fewer programs: wave quantization matters).  ``--smoke`` runs 2 shapes.

For each shape and each config of ``tiles.kept_configs(kind, d, d, elem, spec)`` (``spec =
DeviceSpec.detect()``): the measured time (``common.time_call``, CUDA events, median, ``--rep-ms`` of repetitions)
of ``flash.forward(q, k, v, causal=..., config=cfg, splits=1)`` (``--bwd`` adds ``flash.backward(...,
config=cfg)`` on the bf16 shapes), and the cost model's prediction ``tiles.estimate_s(cfg, kind, rows, kv_len,
bh_kv, d, d, elem, spec, groups=groups, window=tiles.band((-1, -1), causal))`` (rows = q_len * groups,
bh_kv = batch * kv heads; a causal launch visits the tiles on and below the diagonal, as
`attnfuse.costmodel` estimates a site).  ``predicted_dense_s`` is the same call without the band.  The chosen
config is ``tiles.pick(kind, rows, kv_len, bh_kv, d, d, elem, spec, 0, groups, band)``, what the launcher runs
(it ranks a causal launch by the tiles it visits).  A config that fails to compile or run is
recorded with its error.  Shapes left when ``--budget-s`` runs out are recorded as skipped.

Per shape: the chosen config's predicted / measured time and its measured time / the best measured config's.
Goals (issue 5): predictions within 25% of measured in >= 90% of shapes; the chosen config within 10% of the
best in >= 90% of shapes (a shape whose chosen config failed counts as a miss).  Results:
``benchmarks/results/costmodel-<gpu>-<date>.json`` and ``.png`` (predicted vs measured, log-log).
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

from attnfuse.costmodel import tiles  # noqa: E402

PRED_TOL, PICK_TOL, SHARE = 0.25, 0.10, 0.90
NEEDS_GPU = "costmodel_sweep.py needs a CUDA GPU"


# ---------------------------------------------------------------- shapes and statistics (pure, no torch)

def shapes(smoke: bool = False) -> list[dict[str, Any]]:
    """The sweep's shapes (see the module docstring); ``smoke``: 2 of them."""
    out = []
    for dtype, seqs, model_dim, tokens in (("bfloat16", (512, 1024, 2048, 4096, 8192, 16384, 32768), 2048, 16384),
                                           ("float16", (1024, 4096, 16384), 1024, 8192)):
        for d in (64, 128):
            for causal in (False, True):
                for seq in seqs:
                    heads = model_dim // d
                    out.append({"dtype": dtype, "head_dim": d, "causal": causal, "seq": seq,
                                "batch": max(1, tokens // seq), "heads": heads, "kv_heads": heads})
    if smoke:
        return [s for s in out if s["dtype"] == "bfloat16" and s["head_dim"] == 128 and s["seq"] == 2048]
    return out


def shape_key(s: dict[str, Any]) -> str:
    return (f"{s['dtype']} d{s['head_dim']} {'causal' if s['causal'] else 'full'} seq {s['seq']} "
            f"b{s['batch']} h{s['heads']}")


def shape_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Statistics of one (shape, kind) from its config rows (each: ``config``, ``chosen``, ``predicted_s`` and
    ``measured_s`` or ``error``): best measured config, chosen config's predicted / measured
    (``pred_over_measured``) and measured / best (``chosen_over_best``), whether each is within its goal's
    tolerance (None when nothing was measured), and the Spearman rank correlation of predicted vs measured."""
    ok = [r for r in rows if r.get("measured_s")]
    chosen = next((r for r in rows if r.get("chosen")), None)
    out: dict[str, Any] = {"n_configs": len(rows), "n_failed": len(rows) - len(ok),
                           "chosen_config": chosen["config"] if chosen else None}
    if not ok:
        return {**out, "best_config": None, "pred_ok": None, "pick_ok": None, "note": "no config measured"}
    best = min(ok, key=lambda r: r["measured_s"])
    out.update(best_config=best["config"], best_s=best["measured_s"])
    if chosen is None or not chosen.get("measured_s"):
        why = "no chosen config" if chosen is None else f"chosen config failed: {chosen.get('error', '?')}"[:200]
        return {**out, "pred_ok": False, "pick_ok": False, "note": why}
    ratio = chosen["predicted_s"] / chosen["measured_s"]
    out.update(chosen_measured_s=chosen["measured_s"], chosen_predicted_s=chosen["predicted_s"],
               pred_over_measured=ratio, chosen_over_best=chosen["measured_s"] / best["measured_s"],
               pred_ok=abs(ratio - 1.0) <= PRED_TOL,
               pick_ok=chosen["measured_s"] <= (1 + PICK_TOL) * best["measured_s"],
               spearman=spearman([r["predicted_s"] for r in ok], [r["measured_s"] for r in ok]))
    return out


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2  # ties share their mean rank
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman rank correlation (None with fewer than 3 points or a constant side)."""
    if len(xs) < 3:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx and vy else None


def goals(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Share of shapes meeting each goal among those measured (skipped shapes do not count; a shape whose
    chosen config failed counts as a miss), the targets, and the geometric mean of predicted / measured."""
    counted = [s for s in summaries if s.get("pred_ok") is not None]
    n = len(counted)
    pred = sum(bool(s["pred_ok"]) for s in counted)
    pick = sum(bool(s["pick_ok"]) for s in counted)
    ratios = [s["pred_over_measured"] for s in counted if s.get("pred_over_measured")]
    return {"shapes": n, "skipped": len(summaries) - n,
            "prediction": {"within": PRED_TOL, "count": pred, "share": pred / n if n else None, "target": SHARE,
                           "met": n > 0 and pred >= SHARE * n},
            "pick": {"within": PICK_TOL, "count": pick, "share": pick / n if n else None, "target": SHARE,
                     "met": n > 0 and pick >= SHARE * n},
            "geomean_pred_over_measured": math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`shape_summary` per (kind, shape) of the flat config rows, in first-seen order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["shape"]), []).append(r)
    out = []
    for (kind, key), group in groups.items():
        skipped = next((r["skipped"] for r in group if r.get("skipped")), None)
        base = {"kind": kind, "shape": key}
        out.append({**base, "pred_ok": None, "pick_ok": None, "note": skipped} if skipped
                   else {**base, **shape_summary(group)})
    return out


def table(summaries: list[dict[str, Any]]) -> str:
    head = ("kind", "shape", "chosen", "best", "pred/meas", "chosen/best", "rho", "failed", "note")
    lines = []
    f = common.fmt
    for s in summaries:
        lines.append((s["kind"], s["shape"], str(s.get("chosen_config") or "-"), str(s.get("best_config") or "-"),
                      f(s.get("pred_over_measured"), "{:.2f}"), f(s.get("chosen_over_best"), "{:.3f}"),
                      f(s.get("spearman"), "{:.2f}"), f"{s.get('n_failed', 0)}/{s.get('n_configs', 0)}",
                      (s.get("note") or "")[:60]))
    return common.table(lines, head)


def plot(rows: list[dict[str, Any]], title: str, path: pathlib.Path) -> None:
    """Predicted vs measured (log-log) per kind: every config grey, the chosen ones coloured by (d, causal),
    with y = x and the +-25% band."""
    kinds = list(dict.fromkeys(r["kind"] for r in rows if r.get("measured_s"))) or ["fwd"]
    fig, axes = common.figure(1, len(kinds), (6.5 * len(kinds), 6))
    for ax, kind in zip(axes[0], kinds):
        ok = [r for r in rows if r["kind"] == kind and r.get("measured_s")]
        ax.scatter([r["measured_s"] * 1e3 for r in ok], [r["predicted_s"] * 1e3 for r in ok], s=8, c="0.75",
                   label="every config")
        for d, causal, color in ((64, False, "tab:blue"), (64, True, "tab:cyan"), (128, False, "tab:red"),
                                 (128, True, "tab:orange")):
            sel = [r for r in ok if r.get("chosen") and r["head_dim"] == d and r["causal"] == causal]
            if sel:
                ax.scatter([r["measured_s"] * 1e3 for r in sel], [r["predicted_s"] * 1e3 for r in sel], s=28,
                           c=color, label=f"chosen, d={d}, {'causal' if causal else 'full'}")
        if ok:
            lo = min(min(r["measured_s"], r["predicted_s"]) for r in ok) * 1e3 / 1.5
            hi = max(max(r["measured_s"], r["predicted_s"]) for r in ok) * 1e3 * 1.5
            ax.plot([lo, hi], [lo, hi], "k-", lw=1, label="predicted = measured")
            ax.fill_between([lo, hi], [lo * (1 - PRED_TOL), hi * (1 - PRED_TOL)],
                            [lo * (1 + PRED_TOL), hi * (1 + PRED_TOL)], color="k", alpha=0.08, label="+-25%")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured (ms)")
        ax.set_ylabel("predicted (ms)")
        ax.set_title(f"flash {kind}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    common.save(fig, path, title)


def report(doc: dict[str, Any], png_path: pathlib.Path) -> None:
    """Recompute summaries and goals from ``doc['rows']`` (in place), plot, print the table and the goals."""
    doc["summaries"] = summarize(doc["rows"])
    doc["goals"] = {kind: goals([s for s in doc["summaries"] if s["kind"] == kind])
                    for kind in dict.fromkeys(s["kind"] for s in doc["summaries"])}
    plot(doc["rows"], f"flash cost model vs measured: {doc.get('device', '?')} ({doc.get('date', '?')})", png_path)
    print(table(doc["summaries"]))
    for kind, g in doc["goals"].items():
        for name, what in (("prediction", "predicted within 25% of measured"),
                           ("pick", "chosen config within 10% of the best")):
            x = g[name]
            share = "-" if x["share"] is None else f"{100 * x['share']:.0f}%"
            print(f"goal {kind}: {what}: {x['count']}/{g['shapes']} shapes ({share}, target >= 90%): "
                  f"{'PASS' if x['met'] else 'FAIL'}")
        gm = g["geomean_pred_over_measured"]
        print(f"     {kind}: geomean predicted/measured {'-' if gm is None else f'{gm:.2f}'}; "
              f"{g['skipped']} shapes skipped")


# ---------------------------------------------------------------- measurement (GPU only)

def measure_shape(shape: dict[str, Any], kind: str, spec, rep_ms: float, warmup_ms: float) -> list[dict[str, Any]]:
    """One row per kept config of ``shape``: predicted, measured (or error), chosen."""
    import torch

    from attnfuse.kernels import flash

    dtype = getattr(torch, shape["dtype"])
    b, h, hk, n, d = shape["batch"], shape["heads"], shape["kv_heads"], shape["seq"], shape["head_dim"]
    groups, causal = h // hk, shape["causal"]
    elem = torch.empty((), dtype=dtype).element_size()
    rows, bh_kv = n * groups, b * hk
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=gen)
    k, v = (torch.randn(b, hk, n, d, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    grad = torch.randn_like(q) if kind == "bwd" else None
    visits = tiles.band((-1, -1), causal)
    chosen = tiles.pick(kind, rows, n, bh_kv, d, d, elem, spec, 0, groups, visits)
    fwd = flash.forward(q, k, v, causal=causal, splits=1) if kind == "bwd" else None  # what the backward reads
    out_rows = []
    for cfg in tiles.kept_configs(kind, d, d, elem, spec):
        row = {"kind": kind, "shape": shape_key(shape), **shape, "config": str(cfg), "chosen": cfg == chosen,
               "predicted_s": tiles.estimate_s(cfg, kind, rows, n, bh_kv, d, d, elem, spec, groups=groups,
                                               window=visits),
               "predicted_dense_s": tiles.estimate_s(cfg, kind, rows, n, bh_kv, d, d, elem, spec)}
        try:
            if kind == "fwd":
                fn = lambda cfg=cfg: flash.forward(q, k, v, causal=causal, config=cfg, splits=1)
            else:
                fn = lambda cfg=cfg: flash.backward(grad, q, k, v, *fwd, causal=causal, config=cfg)
            fn()
            torch.cuda.synchronize()
            row["measured_s"] = common.time_call(fn, "cuda", warmup_ms=warmup_ms, rep_ms=rep_ms).median_s
        except Exception as e:  # a config that fails to compile or launch is a row, not the end of the sweep
            row["error"] = common.error_text(e, 300)
            torch.cuda.empty_cache()
        out_rows.append(row)
    return out_rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bwd", action="store_true", help="also sweep the backward (bf16 shapes)")
    p.add_argument("--no-fwd", action="store_true", help="with --bwd: the backward only (its own file, '-bwd')")
    p.add_argument("--smoke", action="store_true", help="2 shapes only")
    p.add_argument("--rep-ms", type=float, default=20.0, help="timed repetitions per config, in ms of GPU time")
    p.add_argument("--warmup-ms", type=float, default=5.0, help="warm-up per config, in ms of GPU time")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="stop starting new shapes after this many seconds (the rest are recorded as skipped)")
    p.add_argument("--out", default=None, help="output folder or .json path (default benchmarks/results); with "
                                               "--from-json, a folder or .png path")
    p.add_argument("--from-json", metavar="FILE", help="re-plot and re-print a results JSON (no GPU)")
    args = p.parse_args(argv)
    if args.from_json:
        return common.replot(args, report)
    if args.no_fwd and not args.bwd:
        p.error("--no-fwd leaves nothing to run without --bwd")
    plan = [] if args.no_fwd else [("fwd", s) for s in shapes(args.smoke)]
    if args.bwd:
        plan += [("bwd", s) for s in shapes(args.smoke) if s["dtype"] == "bfloat16"]

    import torch

    if not torch.cuda.is_available():
        print(f"{NEEDS_GPU}; none found. Planned {len(plan)} (kind, shape) pairs; use --from-json FILE to re-plot.")
        return 0
    from attnfuse.device import DeviceSpec

    spec = DeviceSpec.detect()
    gpu = torch.cuda.get_device_name(0)
    today = common.today()
    suffix = ("-bwd" if args.no_fwd else "") + ("-smoke" if args.smoke else "")
    stem = f"costmodel-{common.device_tag('cuda', today)}{suffix}"
    json_path = common.json_path(args.out or common.RESULTS, f"{stem}.json")
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for kind, shape in common.progress(plan, "costmodel_sweep", unit="shape"):
        if time.perf_counter() - t0 > args.budget_s:
            rows.append({"kind": kind, "shape": shape_key(shape), **shape,
                         "skipped": f"time budget ({args.budget_s:.0f} s) spent"})
            continue
        got = measure_shape(shape, kind, spec, args.rep_ms, args.warmup_ms)
        rows += got
        s = shape_summary(got)
        common.log(f"[{time.perf_counter() - t0:6.1f} s] {kind} {shape_key(shape)}: chosen {s.get('chosen_config')}, "
                f"pred/meas {s.get('pred_over_measured') or float('nan'):.2f}, chosen/best "
                f"{s.get('chosen_over_best') or float('nan'):.3f}, {s['n_failed']} failed")
    doc = {"benchmark": "costmodel_sweep", "date": today, "device": gpu, "device_tag": common.gpu_tag(gpu),
           "spec": {k: str(v) for k, v in vars(spec).items()} if hasattr(spec, "__dict__") else str(spec),
           **common.versions(),
           "setup": {"rep_ms": args.rep_ms, "warmup_ms": args.warmup_ms, "budget_s": args.budget_s,
                     "bwd": args.bwd, "smoke": args.smoke, "splits": 1,
                     "predicted": "tiles.estimate_s(cfg, kind, rows, kv_len, bh_kv, d, d, elem, spec, groups, "
                                  "window=tiles.band((-1, -1), causal)); predicted_dense_s: without the band",
                     "measured": "common.time_call median (CUDA events, rep_ms of repetitions after warmup_ms) "
                                 "of flash.forward(..., config=cfg, splits=1) (bwd: flash.backward(..., config=cfg))",
                     "chosen": "tiles.pick(kind, rows, kv_len, bh_kv, d, d, elem, spec, 0, groups, band)"},
           "elapsed_s": round(time.perf_counter() - t0, 1), "rows": rows,
           "command": common.command(__file__, argv)}
    png_path = json_path.with_suffix(".png")
    report(doc, png_path)
    common.write_json(json_path, doc, indent=1)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
