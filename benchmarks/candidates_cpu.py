"""The candidate kernel families on this CPU, as a ``torch.compile(model, backend="attnfuse")`` user gets them.

    python benchmarks/candidates_cpu.py [--seqs 256,1024,2048] [--head-dim 64] [--heads 4] [--threads 2]
                                        [--peers attnfuse,sdpa,flex] [--reps 7] [--warmup 2] [--retry-s 10]
                                        [--wait-idle 0] [--out DIR|FILE.json]
    python benchmarks/candidates_cpu.py --from-json RESULTS.json [--out DIR|FILE.png]   # re-plot
    python benchmarks/candidates_cpu.py --from-json RESULTS.json --rerun-busy   # re-measure the busy/failed cases

What the cost model's ``cpu`` preset knows of the `sdpa` and `flex` families: `benchmarks/fit_costs.py` turns
these rows into time ratios over attnfuse's own kernel (``attnfuse/costmodel/fits.json``).

Every peer is the same compiled site: a module whose forward is ``F.scaled_dot_product_attention(q, k, v,
is_causal=causal)``, compiled with ``torch.compile(m, backend="attnfuse", options={"kernels": [family]},
dynamic=False)`` (inner compiler Inductor), on (1, ``--heads``, seq, ``--head-dim``) float32 tensors, causal
and not -- so each is timed as it runs in a compiled graph, not as an op called eagerly:

* ``attnfuse`` -- family ``flash``, attnfuse's own: its CPU path for such a site is PyTorch's fused SDPA CPU kernel
  traced into the graph (`attnfuse._cpu_graph`), the op's blocked reference backward when training;
* ``sdpa``     -- family ``sdpa``: PyTorch's SDPA CPU kernel as one op with its host-side guard;
* ``flex``     -- family ``flex``: FlexAttention over the site's BlockMask.

After the first (compiling) call of each (case, mode) the site's kernel (``attnfuse.last_report().sites[0]``) must
be the family asked for; where the family declined the site (``sdpa`` declines float32 training on the CPU: its
backward misses the 2x accuracy rule) the row is ``skipped`` with the site's reason and has no time.

Modes: ``fwd`` (inference forward, under ``torch.no_grad()``) and ``fwd_bwd`` (inputs requiring grad,
``torch.autograd.grad(out, (q, k, v), grad)``), each compiled afresh.  Each peer runs every case in its own
fresh process with ``--threads`` threads.  Time: `_common.time_call` on the CPU clock -- ``--warmup`` untimed
calls (after the first, which compiles), then the median of the ``--reps`` quietest of the calls timed within
``--retry-s`` seconds (``others_busy_cores``: the most cores other processes kept busy during a kept call).  Once
per (case, mode) the output (and input gradients) is compared with eager SDPA's in the same process:
``max_abs_diff`` (``grad_max_abs_diff``).  Each row's ``family`` ("attnfuse" for the baseline) and ``variant``
(SDPA's backend; the mask structure for the others) are what `benchmarks/fit_costs.py` reads.  Results:
``benchmarks/results/candidates-cpu-<threads>core-<date>.json`` and a ``.png`` next to it (time vs seq, one
panel per (causal, mode)).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # _common, also when loaded by path (tests)
import _common as common  # noqa: E402

PEERS = ("attnfuse", "sdpa", "flex")
KERNEL = {"attnfuse": "flash", "sdpa": "sdpa", "flex": "flex"}  # the family each peer's compile allows
VARIANT = {"attnfuse": "dense", "sdpa": "flash", "flex": "dense"}  # fit_costs' names (SDPA's CPU kernel: flash)
MODES = ("fwd", "fwd_bwd")
COLORS = {"attnfuse": "C0", "sdpa": "C1", "flex": "C2"}
SITE = 'F.scaled_dot_product_attention(q, k, v, is_causal=causal) in torch.compile(m, backend="attnfuse", ' \
       'options={"kernels": [family]}, dynamic=False), inner compiler Inductor'


def cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [{"seq": s, "batch": 1, "heads": args.heads, "head_dim": args.head_dim, "causal": c, "window": None,
             "dtype": "float32"} for c in (False, True) for s in dict.fromkeys(args.seqs)]


def _compiled(peer: str, causal: bool):
    """A fresh compiled one-site module for ``peer``'s family.  Dynamo's caches are reset first: every compile
    here shares one code object, and past its recompile limit Dynamo would run the frame eagerly."""
    import torch
    import torch.nn.functional as F

    import attnfuse  # noqa: F401 - registers the backend

    torch._dynamo.reset()

    class Site(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return torch.compile(Site(), backend="attnfuse", options={"kernels": [KERNEL[peer]]}, dynamic=False)


def _diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def measure(peer: str, case: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """This peer's rows of one case (one per mode), timed in this process."""
    import torch
    import torch.nn.functional as F

    import attnfuse

    gen = torch.Generator().manual_seed(case["seq"] + case["causal"])
    shape = (case["batch"], case["heads"], case["seq"], case["head_dim"])
    q, k, v, grad = (torch.randn(shape, generator=gen) for _ in range(4))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    causal = case["causal"]
    head = {"peer": peer, "family": "attnfuse" if peer == "attnfuse" else peer, "kernel": KERNEL[peer],
            "variant": VARIANT[peer], **case}
    rows = []
    for mode in args.modes:
        m = _compiled(peer, causal)
        before = attnfuse.last_report()
        if mode == "fwd":
            def call():
                with torch.no_grad():
                    return m(q, k, v)
        else:
            call = lambda: torch.autograd.grad(m(qg, kg, vg), (qg, kg, vg), grad)
        t0 = time.perf_counter()
        first = call()
        check: dict[str, Any] = {"first_call_s": time.perf_counter() - t0}
        report = attnfuse.last_report()
        fresh = report is not None and report is not before
        site = report.sites[0] if fresh and report.sites else None
        if site is None or site.kernel != KERNEL[peer]:
            why = ("nothing compiled (no new report)" if not fresh else "no site in the report" if site is None
                   else site.reason or f"the site ran {site.kernel!r}")
            rows.append({**head, "mode": mode, "skipped": why})
            continue
        if mode == "fwd":
            check["max_abs_diff"] = _diff(first, F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        else:
            ref = torch.autograd.grad(F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal), (qg, kg, vg), grad)
            check["grad_max_abs_diff"] = {n: _diff(g, r) for n, g, r in zip("qkv", first, ref)}
        first = None
        timing = common.time_call(call, "cpu", reps=args.reps, warmup=args.warmup, retry_s=args.retry_s)
        rows.append({**head, "mode": mode, "ms": timing.median_s * 1e3, "ms_min": min(timing.times_s) * 1e3,
                     "others_busy_cores": timing.others_busy_cores, **check})
    return rows


def worker(peer: str, case_keys: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    wanted = set(case_keys.split(","))
    rows = []
    for case in cases(args):
        if f"{case['seq']}:{int(case['causal'])}" not in wanted:
            continue
        try:
            rows += measure(peer, case, args)
        except Exception as e:
            rows.append({"peer": peer, **case, "mode": "fwd", "error": common.error_text(e)})
    return {"peer": peer, "rows": rows}


def run_peer(peer: str, args: argparse.Namespace, argv_common: list[str],
             keys: str | None = None) -> list[dict[str, Any]]:
    """Every case of one peer (or those ``keys`` names: "seq:causal,...") in a fresh process."""
    if args.wait_idle > 0:
        common.wait_for_idle(args.wait_idle)
    keys = keys or ",".join(f"{c['seq']}:{int(c['causal'])}" for c in cases(args))
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", peer, keys, "-", *argv_common]
    t0 = time.perf_counter()
    res = common.run_worker(cmd, {"peer": peer}, timeout=1800, tail=5)
    rows = res.get("rows") or [{"peer": peer, "error": res.get("error", "no rows")}]
    for r in rows:
        msg = r.get("error") or (f"skipped: {r['skipped'][:90]}" if "skipped" in r
                                 else f"{r['ms']:9.2f} ms (busy {r['others_busy_cores']:.1f})")
        common.log(f"[{time.perf_counter() - t0:6.1f} s] {peer:8s} seq {r.get('seq', '-')!s:5s} "
                   f"causal {r.get('causal', '-')!s:5s} {r.get('mode', '-'):7s} {msg}")
    return rows


def rerun_busy(doc: dict[str, Any], args: argparse.Namespace) -> None:
    """``--from-json --rerun-busy``: measure again, per peer in one fresh process, the cases with a row that
    failed or ran while other processes kept `common.QUIET` cores busy; each row becomes the quieter of the two
    (a failed row always gives way)."""
    measured = doc["rows"]
    noise = lambda r: math.inf if "error" in r else (r.get("others_busy_cores") or 0.0)
    for peer in doc["setup"]["peers"]:
        busy = sorted({(r["seq"], r["causal"]) for r in measured if r["peer"] == peer and "seq" in r
                       and noise(r) >= common.QUIET})
        if not busy:
            continue
        key = lambda r: (r["peer"], r.get("seq"), r.get("causal"), r.get("mode"))
        new = {key(r): r for r in run_peer(peer, args, _worker_argv(args), ",".join(f"{s}:{int(c)}" for s, c in busy))}
        measured = [new[key(r)] if key(r) in new and noise(new[key(r)]) < noise(r) else r for r in measured]
    doc["rows"] = measured
    doc["ratios"] = ratios(doc["rows"])


def _worker_argv(args: argparse.Namespace) -> list[str]:
    return ["--seqs", ",".join(map(str, args.seqs)), "--head-dim", str(args.head_dim), "--heads", str(args.heads),
            "--threads", str(args.threads), "--modes", ",".join(args.modes), "--reps", str(args.reps), "--warmup",
            str(args.warmup), "--retry-s", str(args.retry_s)]


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each peer's time over attnfuse's, per (causal, seq, mode)."""
    ms = {(r["peer"], r["causal"], r["seq"], r["mode"]): r["ms"] for r in rows if "ms" in r}
    out = []
    for (peer, causal, seq, mode), t in ms.items():
        base = ms.get(("attnfuse", causal, seq, mode))
        if peer != "attnfuse" and base:
            out.append({"peer": peer, "causal": causal, "seq": seq, "mode": mode, "time_over_attnfuse": t / base})
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        if "error" in r:
            lines.append((r["peer"], str(r.get("seq", "-")), str(r.get("causal", "-")), r.get("mode", "-"),
                          "-", "-", "-", r["error"][:80]))
            continue
        if "skipped" in r:
            lines.append((r["peer"], str(r["seq"]), str(r["causal"]), r["mode"], "-", "-", "-",
                          "skipped: " + r["skipped"][:70]))
            continue
        diff = r.get("max_abs_diff", max((r.get("grad_max_abs_diff") or {}).values(), default=None))
        lines.append((r["peer"], str(r["seq"]), str(r["causal"]), r["mode"], f"{r['ms']:.2f}",
                      common.fmt(diff, "{:.1e}"), common.fmt(r.get("others_busy_cores"), "{:.1f}"), ""))
    return common.table(lines, ("peer", "seq", "causal", "mode", "ms", "max diff", "busy", "note"))


def report(doc: dict[str, Any], png_path: pathlib.Path) -> None:
    """The plot (ms vs seq, one panel per (causal, mode), a line per peer) and the table."""
    rows = [r for r in doc["rows"] if "ms" in r]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    seqs = sorted({r["seq"] for r in rows})
    grid = [[common.Panel([common.Line(p, [(r["seq"], r["ms"]) for r in rows if r["peer"] == p
                                           and r["causal"] == c and r["mode"] == m], color=COLORS[p]) for p in PEERS],
                          seqs, title=f"{'causal' if c else 'full'}, {m}", ylabel="ms") for m in modes]
            for c in (False, True)]
    s = doc["setup"]
    common.plot(grid, png_path, f"compiled sites (backend attnfuse), {doc['device']} {s['threads']} threads: B=1, "
                f"H={s['heads']}, d={s['head_dim']}, fp32, torch {doc['torch']}\n({doc['date']}; a missing line: "
                "the family declined the site)",
                figsize=(4.5 * max(len(modes), 1), 7.5))
    print(table(doc["rows"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=common.csv(int), default=[256, 1024, 2048])
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch threads in each worker process")
    p.add_argument("--peers", type=common.csv(str), default=list(PEERS), help="comma-separated: " + ",".join(PEERS))
    p.add_argument("--modes", type=common.csv(str), default=list(MODES), help="comma-separated: " + ",".join(MODES))
    p.add_argument("--reps", type=int, default=7, help="timed calls per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first (compiling) one")
    p.add_argument("--retry-s", type=float, default=10.0, metavar="SECONDS",
                   help="keep timing up to this long until --reps calls ran on a quiet machine")
    common.add_common_args(p, ("PEER", "CASES", "-"))
    args = p.parse_args(argv)
    common.check_choices(p, "peer", args.peers, PEERS)
    common.check_choices(p, "mode", args.modes, MODES)
    if args.worker:
        common.emit(worker(args.worker[0], args.worker[1], args))
        return 0
    if args.from_json and args.rerun_busy:
        json_path = pathlib.Path(args.from_json)
        doc = json.loads(json_path.read_text())
        setup = doc["setup"]
        args.seqs, args.head_dim, args.heads, args.threads = setup["seqs"], setup["head_dim"], setup["heads"], \
            setup["threads"]
        args.modes, args.reps, args.warmup, args.retry_s = setup["modes"], setup["reps"], setup["warmup"], \
            setup["retry_s"]
        rerun_busy(doc, args)
        doc.setdefault("later_commands", []).append(common.command(__file__, argv))
        common.write_json(json_path, doc)
        report(doc, json_path.with_suffix(".png"))
        print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
        return 0
    if args.from_json:
        return common.replot(args, report)
    argv_common = _worker_argv(args)
    today = common.today()
    json_path = common.json_path(args.out, f"candidates-cpu-{args.threads}core-{today}.json")
    t0 = time.perf_counter()
    rows = [r for peer in args.peers for r in run_peer(peer, args, argv_common)]
    doc = {"benchmark": "candidates_cpu", "date": today, "device": common.device_name("cpu"), "device_tag": "cpu",
           "machine": common.machine_info(), **common.versions(),
           "setup": {"seqs": args.seqs, "head_dim": args.head_dim, "heads": args.heads, "batch": 1,
                     "dtype": "float32", "threads": args.threads, "peers": args.peers, "modes": args.modes,
                     "reps": args.reps, "warmup": args.warmup, "retry_s": args.retry_s,
                     "process": "each peer in a fresh process, every case; a fresh compile per (case, mode)",
                     "site": SITE, "kernels": KERNEL,
                     "fwd": "inference forward (torch.no_grad())",
                     "fwd_bwd": "torch.autograd.grad(out, (q, k, v), grad) on inputs requiring grad",
                     "skipped": "the site's kernel is not the family asked for (its reason)",
                     "check": "max_abs_diff / grad_max_abs_diff: max |peer - eager SDPA| once per (case, mode)"},
           "rows": rows, "ratios": ratios(rows), "wall_s": round(time.perf_counter() - t0, 1),
           "command": common.command(__file__, argv)}
    common.save_results(doc, json_path, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
