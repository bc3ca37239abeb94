"""Model quality with approximate attention: train a small transformer on associative recall (CPU), then
evaluate it with exact, top-k and LSH attention swapped in through attnfuse.

    python benchmarks/quality.py [--minutes 3] [--seq 1024] [--train-seq 512] [--topk 128] [--lsh-budget 0.1]
                                 [--block 32] [--sink 32] [--local 64] [--variants eager,attnfuse,topk,lsh]
                                 [--route attnfuse|direct] [--quick] [--out benchmarks/results]

Task (multi-query associative recall): every position holds one token.  A context token carries a (key,
value) pair -- its embedding is the sum of a key embedding and a value embedding, keys unique within a
sequence (``--keys`` of them, ``--values`` values); after the first eighth of the sequence about one position
in eight is a query: an earlier context token's key with the "unknown" value, and the model must predict that
token's value.  Recall is one attention hop over up to the whole sequence, so the answer lives in one key far
back: a long-range task on which a sparse kernel must find the right key.  (Writing key and value as separate
tokens needs an induction circuit, which a CPU does not train in minutes.)  Loss and accuracy count query
positions only; chance is ``1 / --values``.

Model: plain PyTorch, 2 pre-LN blocks (d_model 128, 4 heads, MLP 4x), causal attention written
``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` (what attnfuse matches), no position embedding
(the causal mask is enough for this task), fp32.  Trained with AdamW for ``--minutes`` at ``--train-seq``,
then evaluated on held-out batches (another seed) at ``--seq`` (longer: the approximations matter more).

Variants (one fresh compile each, ``inner="eager"``):

* ``eager``    -- the model as is (exact; the reference);
* ``attnfuse`` -- ``torch.compile(model, backend="attnfuse")`` with no approximation (exact);
* ``topk``     -- the same with ``options={"kernels": ["topk"], "approximate": {"max_rel_error": 0.99,
  "families": ["topk"], "topk": {"topk", "block", "sink", "local"}}}``;
* ``lsh``      -- ``options={"kernels": ["lsh"], "approximate": {"max_rel_error": --lsh-budget (0.1),
  "families": ["lsh"], "lsh": {"block", "sink", "local", "seed": 0}}}``: top-k's flags are what a user would
  pin; the index knobs (tables, bits, probes) and ``cap`` are left to attnfuse, whose policy calibrates a
  ladder of levels the cost model chooses from the key length and the budget, and keeps the first within it
  (`attnfuse.costmodel.lshknobs`).  A real budget, not top-k's 0.99: it is what chooses LSH's knobs.

``--route direct`` instead swaps the kernel into the model's attention modules by hand (eager), for
comparison or while the policy is unavailable: top-k with the flags' settings, LSH with
``attnfuse.kernels.lsh.DEFAULTS`` but ``cap`` = ``--topk`` and ``block``/``sink``/``local`` from the flags
(the same kept keys as top-k).  Per variant: accuracy, ``logits_rel_err`` (||logits - eager logits||_F /
||eager logits||_F over the evaluation batches, query positions), per site the report's kernel, calibration
``error``, ``config`` and ``params`` (the chosen approximate settings: the site's config and its candidate
row's ``params``, where the report has them; None otherwise), and ``attn_rel_err``: per layer, the family's
kernel called directly (with the settings the report chose for that layer's site, else the direct route's) on
that layer's q, k, v from an eager forward of the first evaluation batch, against SDPA (the attention output's
own relative error).

Goal (printed PASS/FAIL, also the JSON's ``goals``): LSH accuracy >= exact (eager) accuracy - 0.02 (value:
LSH - exact).  Results: ``benchmarks/results/quality-cpu-<date>.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # _common, also when loaded by path (tests)
import _common as common  # noqa: E402

VARIANTS = ("eager", "attnfuse", "topk", "lsh")
APPROX = ("topk", "lsh")
DEFAULTS = dict(minutes=3.0, seq=1024, train_seq=512, keys=2048, values=32, d_model=128, heads=4, layers=2,
                batch=16, lr=2e-3, eval_batches=8, eval_batch=8, topk=128, block=32, sink=32, local=64, lsh_budget=0.1)
QUICK = dict(minutes=0.1, seq=256, train_seq=128, keys=512, d_model=64, heads=2, batch=16, eval_batches=2,
             eval_batch=4, topk=64, block=32, sink=32, local=32)
LSH_GOAL = 0.02  # LSH accuracy may be at most this much below exact (eager) accuracy


# ---------------------------------------------------------------- task and model

def make_batch(batch: int, seq: int, n_keys: int, n_values: int, gen: torch.Generator, query_every: int = 8):
    """(keys, values, target), each (batch, seq) int64: ``values`` holds ``n_values`` ("unknown") at query
    positions and ``target`` their answer (-100 elsewhere, ignored by the loss)."""
    if n_keys < seq:
        raise ValueError(f"--keys ({n_keys}) must be >= the sequence length ({seq}): keys are unique per sequence")
    keys = torch.rand(batch, n_keys, generator=gen).argsort(1)[:, :seq]
    values = torch.randint(0, n_values, (batch, seq), generator=gen)
    is_query = torch.rand(batch, seq, generator=gen) < 1.0 / query_every
    is_query[:, : max(1, seq // 8)] = False
    context_first = torch.argsort(is_query.to(torch.int8), dim=1, stable=True)  # context positions, in order
    seen = (~is_query).cumsum(1)  # context tokens at or before each position (>= 1 for every query)
    src = context_first.gather(1, (torch.rand(batch, seq, generator=gen) * seen).long().clamp(max=seq - 1))
    keys = torch.where(is_query, keys.gather(1, src), keys)
    target = torch.where(is_query, values.gather(1, src), -100)
    return keys, torch.where(is_query, n_values, values), target


class Attention(nn.Module):
    """Causal multi-head self-attention; ``kernel`` (``fn(q, k, v) -> out``) replaces SDPA when set (the
    direct route), ``captured`` collects (q, k, v) when it is a list."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.kernel = None
        self.captured = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.captured is not None:
            self.captured.append((q.detach(), k.detach(), v.detach()))
        if self.kernel is not None:
            y = self.kernel(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = Attention(d_model, heads)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class RecallModel(nn.Module):
    """Embeddings (key + value) -> ``layers`` blocks -> LayerNorm -> value logits."""

    def __init__(self, n_keys: int, n_values: int, d_model: int, heads: int, layers: int):
        super().__init__()
        self.key_emb = nn.Embedding(n_keys, d_model)
        self.key_emb.weight.requires_grad_(False)  # fixed random codes: every key works, seen in training or not
        self.value_emb = nn.Embedding(n_values + 1, d_model)  # the last one: "unknown" (a query)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_values)

    def forward(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        x = self.key_emb(keys) + self.value_emb(values)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def attentions(model: RecallModel) -> list[Attention]:
    return [b.attn for b in model.blocks]


# ---------------------------------------------------------------- training and evaluation

def train(model: RecallModel, args: argparse.Namespace, log=print) -> dict[str, Any]:
    """AdamW (linear warm-up over 50 steps) for ``args.minutes`` of wall time; returns the training log.

    Curriculum: the sequence starts at 64 (at most ``train_seq``) and doubles, up to ``train_seq``, whenever
    the accuracy over the last 25 steps reaches 0.8 -- short sequences give the attention a strong signal
    early, and the task is the same at every length."""
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 50))
    model.train()
    t0, step, history, seq, window = time.perf_counter(), 0, [], min(64, args.train_seq), []
    bar = tqdm(total=round(args.minutes * 60), desc="quality: training", unit="s", disable=None, leave=False)
    while time.perf_counter() - t0 < args.minutes * 60 or step == 0:
        bar.update(int(time.perf_counter() - t0) - bar.n)  # stderr, terminals only: wall seconds trained
        keys, values, target = make_batch(args.batch, seq, args.keys, args.values, gen)
        logits = model(keys, values)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        mask = target >= 0
        window.append((logits.argmax(-1)[mask] == target[mask]).float().mean().item())
        if step % 25 == 0 or step == 1:
            acc = sum(window) / len(window)
            history.append({"step": step, "s": round(time.perf_counter() - t0, 1), "seq": seq,
                            "loss": round(loss.item(), 4), "acc": round(acc, 4)})
            log(f"  step {step:5d}  {history[-1]['s']:6.1f} s  seq {seq:5d}  loss {loss.item():.4f}  acc {acc:.3f}")
            if acc >= 0.8 and seq < args.train_seq:
                seq = min(2 * seq, args.train_seq)
            window = []
    bar.close()
    model.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "final_seq": seq, "history": history}


def eval_batches(args: argparse.Namespace) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(args.seed + 1)  # held out: another stream than training
    return [make_batch(args.eval_batch, args.seq, args.keys, args.values, gen) for _ in range(args.eval_batches)]


def knobs(family: str, args: argparse.Namespace) -> dict[str, Any]:
    """The direct route's settings: top-k's flags; LSH's `attnfuse.kernels.lsh.DEFAULTS` with ``cap`` =
    ``--topk`` and ``block``/``sink``/``local`` from the flags."""
    kw = {"block": args.block, "sink": args.sink, "local": args.local}
    if family == "topk":
        return {"topk": args.topk, **kw}
    from attnfuse.kernels.lsh import DEFAULTS

    return {**DEFAULTS, "cap": args.topk, **kw}


def options(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """The attnfuse options of a compiled variant (see the module docstring)."""
    opts: dict[str, Any] = {"inner": "eager"}
    if variant in APPROX:
        pinned = knobs(variant, args) if variant == "topk" else {
            "block": args.block, "sink": args.sink, "local": args.local, "seed": 0}
        opts["kernels"] = [variant]
        budget = 0.99 if variant == "topk" else args.lsh_budget
        opts["approximate"] = {"max_rel_error": budget, "families": [variant], variant: pinned}
    return opts


def site_params(site) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(config, params) of a report site running an approximate kernel: its ``config`` and the ``params`` of its
    kernel's candidate row (the chosen settings, LSH's ``bits`` resolved), each None where the report lacks it."""
    if getattr(site, "kernel", None) not in APPROX:
        return None, None
    config = getattr(site, "config", None)
    rows = [c for c in getattr(site, "candidates", None) or [] if isinstance(c, dict)
            and c.get("kernel") == site.kernel and isinstance(c.get("params"), dict)]
    row = next((c for c in rows if c.get("chosen")), rows[0] if rows else None)
    return (dict(config) if isinstance(config, dict) and config else None), (dict(row["params"]) if row else None)


def goals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The LSH accuracy goal (module docstring): value LSH - exact accuracy; met None where either is missing."""
    acc = {r["variant"]: r.get("accuracy") for r in results}
    what = f"lsh accuracy >= exact (eager) accuracy - {LSH_GOAL:g}"
    if acc.get("lsh") is None or acc.get("eager") is None:
        return [{"goal": what, "value": None, "met": None, "note": "not measured"}]
    diff = acc["lsh"] - acc["eager"]
    return [{"goal": what, "value": round(diff, 4), "met": diff >= -LSH_GOAL, "lsh_accuracy": acc["lsh"],
             "exact_accuracy": acc["eager"]}]


def policy_available() -> bool:
    """Whether attnfuse's options take an approximation policy with "families" (the approximate route)."""
    from attnfuse.config import Config

    try:
        Config.from_options({"approximate": {"max_rel_error": 0.5, "families": ["topk"]}})
        return True
    except (ValueError, TypeError):
        return False


def kernel_fn(family: str, args: argparse.Namespace, settings: dict[str, Any] | None = None):
    """``fn(q, k, v) -> out`` of an approximate family, causal, with ``settings`` (default: `knobs`)."""
    import importlib

    mod = importlib.import_module(f"attnfuse.kernels.{family}")
    kw = settings or knobs(family, args)
    return lambda q, k, v: mod.attention(q, k, v, causal=True, **kw)


def evaluate(model: RecallModel, variant: str, batches, reference: list[torch.Tensor] | None,
             args: argparse.Namespace) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Accuracy (and errors against ``reference`` logits) of one variant; returns (result, its logits)."""
    import attnfuse

    direct = variant in APPROX and args.route == "direct"
    res: dict[str, Any] = {"variant": variant,
                           "route": "eager" if variant == "eager" else "direct" if direct else "attnfuse"}
    run = model
    if variant != "eager":
        if direct:
            for a in attentions(model):
                a.kernel = kernel_fn(variant, args)
        else:
            if variant in APPROX and not policy_available():
                raise RuntimeError("attnfuse's options take no approximation policy yet (no 'families' key); "
                                   "use --route direct")
            torch._dynamo.reset()
            res["options"] = options(variant, args)
            run = torch.compile(model, backend="attnfuse", options=res["options"], dynamic=False)
    t0 = time.perf_counter()
    logits, hits, total = [], 0, 0
    try:
        with torch.no_grad():
            for keys, values, target in batches:
                out = run(keys, values)
                mask = target >= 0
                hits += int((out.argmax(-1)[mask] == target[mask]).sum())
                total += int(mask.sum())
                logits.append(out[mask])
    finally:
        for a in attentions(model):
            a.kernel = None
    res["eval_s"] = round(time.perf_counter() - t0, 2)
    res["accuracy"] = hits / max(total, 1)
    res["queries"] = total
    if reference is not None:
        res["logits_rel_err"] = common.rel_err(torch.cat(logits), torch.cat(reference), torch.float64)
    if run is not model:
        rep = attnfuse.last_report()
        res["sites"] = [{"module": s.module, "status": s.status, "kernel": s.kernel, "error": s.error,
                         "reason": s.reason, **dict(zip(("config", "params"), site_params(s)))}
                        for s in rep.sites] if rep is not None else []
    return res, logits


def attention_errors(model: RecallModel, family: str, batch, args: argparse.Namespace,
                     sites: list[dict[str, Any]] | None = None) -> list[float]:
    """Per layer: the family's kernel on that layer's eager (q, k, v) vs SDPA, relative Frobenius error; with the
    settings the report chose for that layer's site (``blocks.<i>.attn``'s ``config``) where ``sites`` has one,
    else the direct route's (`knobs`)."""
    keys, values, _ = batch
    captured: list = []
    for a in attentions(model):
        a.captured = captured
    try:
        with torch.no_grad():
            model(keys, values)
    finally:
        for a in attentions(model):
            a.captured = None
    chosen = {s["module"]: s.get("config") for s in sites or [] if s.get("kernel") == family}
    fns = [kernel_fn(family, args, chosen.get(f"blocks.{i}.attn")) for i in range(len(captured))]
    with torch.no_grad():
        return [common.rel_err(fn(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True), torch.float64)
                for fn, (q, k, v) in zip(fns, captured)]


def _knobs(params: dict[str, Any] | None) -> str:
    """`` [tables=8 bits=9 probes=0 cap=128]`` of LSH params, "" for others or none."""
    shown = [f"{k}={params[k]}" for k in ("tables", "bits", "probes", "cap") if k in (params or {})]
    return f" [{' '.join(shown)}]" if shown else ""


def table(results: list[dict[str, Any]]) -> str:
    head = ("variant", "route", "accuracy", "logits rel err", "attn rel err (per layer)", "report: kernel / error")
    lines = []
    for r in results:
        if "error" in r:
            lines.append((r["variant"], r.get("route", ""), "-", "-", "-", r["error"][:90]))
            continue
        sites = ", ".join(f"{s['kernel'] or s['status']}" + (f" {s['error']:.1e}" if s.get("error") is not None
                                                              else "") + _knobs(s.get("params"))
                          for s in r.get("sites", []))
        attn = ", ".join(f"{e:.2e}" for e in r.get("attn_rel_err", [])) or "-"
        err = r.get("logits_rel_err")
        lines.append((r["variant"], r["route"], f"{r['accuracy']:.4f}", "-" if err is None else f"{err:.2e}", attn,
                      sites or "-"))
    return common.table(lines, head)


# ---------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in DEFAULTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), help=f"default {value}")
    p.add_argument("--variants", type=common.csv(str), default=list(VARIANTS),
                   help="comma-separated: " + ",".join(VARIANTS))
    p.add_argument("--route", choices=("attnfuse", "direct"), default="attnfuse",
                   help="how top-k/LSH get into the model: attnfuse's approximation policy, or a direct swap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="smoke run: seconds of training, tiny model, seq 256")
    p.add_argument("--out", default=str(common.RESULTS),
                   help="output folder, or a .json path")
    args = p.parse_args(argv)
    for name, value in {**DEFAULTS, **(QUICK if args.quick else {})}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    common.check_choices(p, "variant", args.variants, VARIANTS)
    if "eager" not in args.variants:
        args.variants.insert(0, "eager")  # the reference of every error
    if args.d_model % args.heads:
        p.error(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    if args.keys < max(args.seq, args.train_seq):
        p.error(f"--keys {args.keys} must be >= --seq and --train-seq (keys are unique within a sequence)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = RecallModel(args.keys, args.values, args.d_model, args.heads, args.layers)
    print(f"training {sum(p.numel() for p in model.parameters())} parameters for {args.minutes} min at seq "
          f"{args.train_seq} (chance {1 / args.values:.3f})", flush=True)
    training = train(model, args, log=common.log)
    batches = eval_batches(args)
    results, reference = [], None
    for variant in common.progress(args.variants, "quality: variants"):
        t0 = time.perf_counter()
        try:
            res, logits = evaluate(model, variant, batches, reference, args)
            if variant == "eager":
                reference = logits
            if variant in APPROX:
                res["attn_rel_err"] = attention_errors(model, variant, batches[0], args, res.get("sites"))
        except Exception as e:  # an unavailable kernel or policy is a row, not a crash
            res = {"variant": variant, "route": args.route, "error": common.error_text(e, limit=None)}
        results.append(res)
        common.log(f"[{time.perf_counter() - t0:6.1f} s] {variant:8s} "
                + (res.get("error") or f"accuracy {res['accuracy']:.4f}"))
    today = common.today()
    name = f"quality-{common.device_tag('cpu', today)}{'-quick' if args.quick else ''}.json"
    json_path = common.json_path(args.out, name)
    setup = {k: getattr(args, k) for k in (*DEFAULTS, "variants", "route", "seed", "quick")}
    doc = {"benchmark": "quality", "date": today, "device": "cpu", "machine": common.machine_info(),
           **common.versions(),
           "setup": {**setup, "task": "multi-query associative recall, (key, value) pair per context token, "
                                       "1 in 8 positions a query after the first eighth",
                     "chance": 1 / args.values, "policy_available": policy_available()},
           "training": training, "results": results, "goals": goals(results),
           "command": common.command(__file__, argv)}
    common.write_json(json_path, doc)
    print(table(results))
    for g in doc["goals"]:
        verdict = "not measured" if g["met"] is None else (
            f"{'PASS' if g['met'] else 'FAIL'} (lsh {g['lsh_accuracy']:.4f}, exact {g['exact_accuracy']:.4f}, "
            f"difference {g['value']:+.4f})")
        print(f"goal {g['goal']}: {verdict}")
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
