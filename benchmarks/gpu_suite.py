"""The GPU suite of issue 17, one command: attnfuse's own kernels vs PyTorch's SDPA backends vs FlexAttention.

    python benchmarks/gpu_suite.py [--sections dense,window,documents,train] [--seqs 4096,8192,16384]
                                   [--head-dims 64,128] [--reps 10] [--out DIR|FILE.json]
    python benchmarks/gpu_suite.py --dry [--out DIR]    # on the CPU, tiny shapes, end to end (about 2 minutes)
    python benchmarks/gpu_suite.py --from-json RESULTS.json [--out DIR|FILE.png]   # re-plot, no GPU needed

Sections (bf16 on the GPU; ``--dry``: float32 on the CPU, seq 128-256, head dims 32/64, one layer):

* ``dense`` -- d64/d128, causal and not, ``--seqs`` (batch = 16k tokens // seq, heads = 2048 // d): ``attnfuse``
  (``torch.ops.attnfuse.attention(q, k, v, causal=...)``, its own kernels: ``impl=""``), ``sdpa-flash`` and
  ``sdpa-cudnn`` (``F.scaled_dot_product_attention`` under ``sdpa_kernel(<backend>)``), ``flex``
  (``torch.compile(flex_attention)``, a causal ``BlockMask`` on causal rows);
* ``window`` -- a causal sliding window of w keys (key j visible from query i iff i - w < j <= i), d128, seq 16k:
  ``attnfuse`` (the op's window kernel: ``window_left=w - 1, window_right=0``) vs ``flex`` (a window
  ``mask_mod``);
* ``documents`` -- packed documents (random lengths, fixed seed; key j visible from query i iff both are in one
  document, and j <= i when causal), d128, seq 16k: ``attnfuse`` (its own kernel on the dense (B, 1, L, L) bool
  mask: what such a site ran before Flex was a candidate), ``attnfuse-flex`` (the op with ``impl="flex"`` and the
  ``doc`` tensor: int64 (B, 2, L), row 0 segment ids, row 1 prefix-key flags, zeros) vs ``flex`` with a
  hand-written ``mask_mod``;
* ``train`` -- one training step (forward, cross-entropy, backward, AdamW step) of a LLaMA-style model written
  with SDPA (RMSNorm, RoPE, causal ``F.scaled_dot_product_attention``, SwiGLU MLP; 2 layers, dim 2048, 16 heads,
  seq 8k, batch 1): ``eager`` (the model as written), ``inductor`` (stock ``torch.compile``), ``attnfuse``
  (``backend="attnfuse"``) and ``attnfuse-autotune`` (``options={"autotune": True}``; skipped, with the reason,
  where that option raises ValueError): time per step, peak memory (``torch.cuda.max_memory_allocated``; CPU:
  the profiler's allocator peak), the first call (compile) time and which kernel each attention site ran.

Attention modes: ``fwd`` (the forward, inputs requiring grad where the peer has a backward), ``bwd``
(``out.backward(grad, retain_graph=True)`` on one forward output) and ``fwd_bwd``.  A peer without a backward
here (FlexAttention on the CPU) gets ``fwd`` rows only, under ``torch.no_grad()``; a peer that cannot run here
(cuDNN off CUDA) is listed in ``skipped`` with the reason.  Time: `_common.time_call` (CUDA events on the GPU;
``perf_counter`` on the CPU), median of ``--reps``; TFLOP/s count the visible (query, key) pairs (dense:
nominal, halved when causal), bwd 2.5x and fwd_bwd 3.5x the forward.  Numerics, once per configuration: each
peer's output (and input gradients) against SDPA with the same mask as a dense ``attn_mask`` (``max_abs_diff``,
``grad_max_abs_diff``); train: the first step's loss and parameter gradients against the eager model's.

Results: ``benchmarks/results/gpu-suite-<device>-<date>.json`` and ``.png`` (``--dry``: into ``--out``, default a
fresh temporary folder).  The rows' ``family`` / ``variant`` are what `benchmarks/fit_costs.py` fits the cost
model's ``sdpa`` / ``flex`` ratios from (a ``dry`` file is never fitted).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # _common, also when loaded by path (tests)
import _common as common  # noqa: E402

SECTIONS = ("dense", "window", "documents", "train")
MODES = ("fwd", "bwd", "fwd_bwd")
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
# peer -> (family, variant) per section: what fit_costs.py reads (family None: not fitted)
PEERS = {
    "dense": {"attnfuse": ("attnfuse", "dense"), "sdpa-flash": ("sdpa", "flash"), "sdpa-cudnn": ("sdpa", "cudnn"),
              "flex": ("flex", "dense")},
    "window": {"attnfuse": ("attnfuse", "window"), "flex": ("flex", "window")},
    "documents": {"attnfuse": ("attnfuse", "documents"), "attnfuse-flex": (None, None),
                  "flex": ("flex", "documents")},
}
TRAIN_VARIANTS = ("eager", "inductor", "attnfuse", "attnfuse-autotune")
GPU = {"seqs": [4096, 8192, 16384], "head_dims": [64, 128], "tokens": 16384, "model_dim": 2048, "windows": [1024, 4096],
       "long_seq": 16384, "long_dim": 128, "doc_causal": [True, False], "docs": 8, "dtype": "bfloat16",
       "train": {"layers": 2, "dim": 2048, "heads": 16, "seq": 8192, "batch": 1, "vocab": 16384, "hidden": 5632},
       "reps": 10, "warmup": 2}
DRY = {"seqs": [128], "head_dims": [32, 64], "tokens": 256, "model_dim": 128, "windows": [64], "long_seq": 256,
       "long_dim": 64, "doc_causal": [True], "docs": 4, "dtype": "float32",
       "train": {"layers": 1, "dim": 64, "heads": 2, "seq": 128, "batch": 1, "vocab": 256, "hidden": 176},
       "reps": 2, "warmup": 0}


# ---------------------------------------------------------------- configurations (no torch needed)

def cases(setup: dict[str, Any], sections: list[str]) -> list[dict[str, Any]]:
    """The attention configurations of the chosen sections, in order."""
    out = []
    base = {"window": None, "documents": None, "dtype": setup["dtype"]}
    if "dense" in sections:
        for d in setup["head_dims"]:
            for causal in (False, True):
                for seq in setup["seqs"]:
                    out.append({**base, "section": "dense", "seq": seq, "batch": max(1, setup["tokens"] // seq),
                                "heads": setup["model_dim"] // d, "head_dim": d, "causal": causal})
    seq, d = setup["long_seq"], setup["long_dim"]
    long = {**base, "seq": seq, "batch": max(1, setup["tokens"] // seq), "heads": setup["model_dim"] // d,
            "head_dim": d}
    if "window" in sections:
        out += [{**long, "section": "window", "causal": True, "window": w} for w in setup["windows"]]
    if "documents" in sections:
        out += [{**long, "section": "documents", "causal": c, "documents": setup["docs"]} for c in setup["doc_causal"]]
    return out


def doc_lengths(seq: int, docs: int, row: int) -> list[int]:
    """``docs`` document lengths (each >= 1) summing to ``seq``: cut points drawn with a fixed seed per batch row."""
    import random

    cuts = sorted(random.Random(1000 * row + seq).sample(range(1, seq), docs - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, seq])]


def pairs(case: dict[str, Any]) -> float:
    """Visible (query, key) pairs per (batch, head), summed over the batch for documents (dense: nominal)."""
    seq, causal = case["seq"], case["causal"]
    if case.get("window") is not None:
        m = min(case["window"], seq)
        return (m * (m + 1) // 2 + (seq - m) * m) * case["batch"]
    if case.get("documents"):
        lens = [n for row in range(case["batch"]) for n in doc_lengths(seq, case["documents"], row)]
        return float(sum(n * (n + 1) // 2 if causal else n * n for n in lens))
    return seq * seq / (2 if causal else 1) * case["batch"]


def flops(case: dict[str, Any], mode: str) -> float:
    return 4.0 * case["heads"] * case["head_dim"] * pairs(case) * MODE_FACTOR[mode]


def label(case: dict[str, Any]) -> str:
    kind = (f"win {common.seq_label(case['window'])}" if case.get("window") is not None
            else "docs" + (" causal" if case["causal"] else "") if case.get("documents")
            else "causal" if case["causal"] else "full")
    return f"d{case['head_dim']} {kind} {common.seq_label(case['seq'])}"


# ---------------------------------------------------------------- attention peers

_FLEX: Any = None


def _flex():
    global _FLEX
    if _FLEX is None:
        import torch
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _inputs(case: dict[str, Any], dev: str) -> dict[str, Any]:
    """q, k, v, grad, and the mask forms the peers take: the dense keep-mask of a window or documents (the
    reference's ``attn_mask``; None for dense rows, whose reference takes ``is_causal``), segment ids, doc."""
    import torch

    dtype = getattr(torch, case["dtype"])
    gen = torch.Generator(device=dev).manual_seed(case["seq"] + case["head_dim"])
    shape = (case["batch"], case["heads"], case["seq"], case["head_dim"])
    q, k, v, grad = (torch.randn(shape, device=dev, dtype=dtype, generator=gen) for _ in range(4))
    out: dict[str, Any] = {"q": q, "k": k, "v": v, "grad": grad, "keep": None, "seg": None, "doc": None}
    seq, i = case["seq"], torch.arange(case["seq"], device=dev)
    if case.get("window") is not None:
        out["keep"] = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - case["window"])
    elif case.get("documents"):
        seg = torch.stack([torch.repeat_interleave(torch.arange(case["documents"], device=dev),
                                                   torch.tensor(doc_lengths(seq, case["documents"], b), device=dev))
                           for b in range(case["batch"])])
        keep = seg[:, :, None] == seg[:, None, :]
        out["keep"] = (keep & (i[None, :] <= i[:, None]) if case["causal"] else keep)[:, None]
        out["dense_doc"] = keep[:, None]  # attnfuse's own kernel gets the document term; causal is its flag
        out["seg"] = seg
        out["doc"] = torch.stack([seg, torch.zeros_like(seg)], dim=1)
    return out


def make_peer(peer: str, case: dict[str, Any], inp: dict[str, Any], dev: str):
    """``fn(q, k, v) -> out`` of one peer for one configuration (raises where it cannot run)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attnfuse  # noqa: F401 - registers torch.ops.attnfuse

    causal, window = case["causal"], case.get("window")
    op = torch.ops.attnfuse.attention
    if peer == "attnfuse" and window is not None:
        return lambda q, k, v: op(q, k, v, causal=True, window_left=window - 1, window_right=0)[0]
    if peer == "attnfuse" and case.get("documents"):
        return lambda q, k, v: op(q, k, v, inp["dense_doc"], causal=causal)[0]
    if peer == "attnfuse":
        return lambda q, k, v: op(q, k, v, causal=causal)[0]
    if peer == "attnfuse-flex":
        return lambda q, k, v: op(q, k, v, None, None, None, None, inp["doc"], causal=causal, impl="flex")[0]
    if peer.startswith("sdpa-"):
        if peer == "sdpa-cudnn" and not dev.startswith("cuda"):
            raise NotImplementedError("cuDNN attention runs on CUDA only")
        backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[peer]

        def sdpa(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return sdpa
    from torch.nn.attention.flex_attention import create_block_mask

    b, seq = case["batch"], case["seq"]
    if window is not None:
        mask_mod = lambda b_, h, qi, ki: (qi >= ki) & (qi - ki < window)
    elif case.get("documents"):
        seg = inp["seg"]
        same = lambda b_, h, qi, ki: seg[b_, qi] == seg[b_, ki]
        mask_mod = (lambda b_, h, qi, ki: same(b_, h, qi, ki) & (qi >= ki)) if causal else same
    else:
        mask_mod = (lambda b_, h, qi, ki: qi >= ki) if causal else None
    block = None if mask_mod is None else create_block_mask(mask_mod, b if case.get("documents") else None, None,
                                                             seq, seq, device=dev)
    compiled = _flex()
    return lambda q, k, v: compiled(q, k, v, block_mask=block)


def _diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def run_case(case: dict[str, Any], setup: dict[str, Any], dev: str, log) -> tuple[list[dict], list[dict]]:
    """(rows, skipped) of one attention configuration: every peer of its section in every mode it has."""
    import torch
    import torch.nn.functional as F

    inp = _inputs(case, dev)
    q, k, v, grad = inp["q"], inp["k"], inp["v"], inp["grad"]
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    causal_ref = case["causal"] and inp["keep"] is None
    ref_out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=inp["keep"], is_causal=causal_ref)
    ref_grads = torch.autograd.grad(ref_out, (qg, kg, vg), grad)
    ref_out = ref_out.detach()
    rows, skipped = [], []
    for peer, (family, variant) in PEERS[case["section"]].items():
        base = {"peer": peer, "family": family, "variant": variant, **case, "label": label(case)}
        try:
            fn = make_peer(peer, case, inp, dev)
        except NotImplementedError as e:
            skipped.append({"section": case["section"], "peer": peer, "reason": common.error_text(e)})
            continue
        except Exception as e:
            rows.append({**base, "mode": "fwd", "error": common.error_text(e)})
            continue
        check: dict[str, Any] = {}
        backward = True
        try:  # numerics once, and whether this peer has a backward here
            out = fn(qg, kg, vg)
            check["max_abs_diff"] = _diff(out, ref_out)
            got = torch.autograd.grad(out, (qg, kg, vg), grad)
            check["grad_max_abs_diff"] = {n: _diff(g, r) for n, g, r in zip("qkv", got, ref_grads)}
        except Exception as e:
            backward = False
            reason = f"no backward here: {common.error_text(e, 300)}"
            skipped.append({"section": case["section"], "peer": peer, "label": label(case), "modes": ["bwd", "fwd_bwd"],
                            "reason": reason})
            try:
                with torch.no_grad():
                    check["max_abs_diff"] = _diff(fn(q, k, v), ref_out)
            except Exception as e2:
                rows.append({**base, "mode": "fwd", "error": common.error_text(e2)})
                continue
        for mode in MODES if backward else ("fwd",):
            row = {**base, "mode": mode, "grad": backward, "flops": flops(case, mode), **check}
            try:
                row.update(_time_mode(fn, mode, (qg, kg, vg) if backward else (q, k, v), grad, setup, dev))
                row["tflops"] = row["flops"] / (row["ms"] * 1e-3) / 1e12
                msg = f"{row['ms']:9.3f} ms {row['tflops']:8.2f} TFLOP/s"
            except Exception as e:
                row["error"] = common.error_text(e)
                msg = row["error"][:160]
            rows.append(row)
            log(f"{case['section']:9s} {label(case):18s} {peer:13s} {mode:7s} {msg}")
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows, skipped


def _time_mode(fn, mode: str, qkv, grad, setup: dict[str, Any], dev: str) -> dict[str, Any]:
    import torch

    def zero() -> None:
        for t in qkv:
            t.grad = None

    if mode == "fwd":
        def call():
            with torch.enable_grad() if qkv[0].requires_grad else torch.no_grad():
                fn(*qkv)
    elif mode == "bwd":
        held = fn(*qkv)
        call = lambda: held.backward(grad, retain_graph=True)
    else:
        call = lambda: fn(*qkv).backward(grad)
    timing = common.time_call(call, dev, reps=setup["reps"], warmup=setup["warmup"], setup=zero,
                              track_load=dev.startswith("cuda") or not setup.get("dry"))
    zero()
    return {"ms": timing.median_s * 1e3, "ms_min": min(timing.times_s) * 1e3}


# ---------------------------------------------------------------- LLaMA-style training step

def llama(cfg: dict[str, Any]):
    """A LLaMA-style decoder written with SDPA: RMSNorm, RoPE, causal attention, SwiGLU MLP, tied nothing."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            x32 = x.float()
            return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x) * self.weight

    def rope(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            dim, hidden = cfg["dim"], cfg["hidden"]
            self.heads = cfg["heads"]
            self.attn_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
            self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
            self.wo = nn.Linear(dim, dim, bias=False)
            self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
            self.w2 = nn.Linear(hidden, dim, bias=False)

        def forward(self, x, cos, sin):
            b, n, dim = x.shape
            q, k, v = self.wqkv(self.attn_norm(x)).view(b, n, 3, self.heads, dim // self.heads).unbind(2)
            q, k, v = rope(q.transpose(1, 2), cos, sin), rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.wo(att.transpose(1, 2).reshape(b, n, dim))
            gate, up = self.w13(self.mlp_norm(x)).chunk(2, dim=-1)
            return x + self.w2(F.silu(gate) * up)

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(cfg["vocab"], cfg["dim"])
            self.layers = nn.ModuleList(Block() for _ in range(cfg["layers"]))
            self.norm = RMSNorm(cfg["dim"])
            self.head = nn.Linear(cfg["dim"], cfg["vocab"], bias=False)
            d = cfg["dim"] // cfg["heads"]
            inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
            ang = torch.outer(torch.arange(cfg["seq"]).float(), inv)
            self.register_buffer("cos", torch.cat((ang.cos(), ang.cos()), -1), persistent=False)
            self.register_buffer("sin", torch.cat((ang.sin(), ang.sin()), -1), persistent=False)

        def forward(self, idx, targets):
            x = self.embed(idx)
            cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
            for layer in self.layers:
                x = layer(x, cos, sin)
            logits = self.head(self.norm(x)).float()
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    return Llama()


def autotune_unavailable() -> str | None:
    """Why ``options={"autotune": True}`` cannot be used (its ValueError), or None."""
    import attnfuse

    try:
        attnfuse.Config.from_options({"autotune": True})
    except ValueError as e:
        return f"options={{'autotune': True}} raised ValueError: {common.error_text(e, 300)}"
    return None


def run_train(setup: dict[str, Any], dev: str, log) -> tuple[list[dict], list[dict]]:
    """One row per training variant: step time, peak memory, compile time, numerics vs eager, site kernels."""
    import torch

    import attnfuse

    cfg = setup["train"]
    dtype = getattr(torch, setup["dtype"])
    torch.manual_seed(0)
    master = llama(cfg).to(dev, dtype)
    gen = torch.Generator(device=dev).manual_seed(1)
    idx, targets = (torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), device=dev, generator=gen)
                    for _ in range(2))
    tokens = cfg["batch"] * cfg["seq"]
    case = {"section": "train", "seq": cfg["seq"], "batch": cfg["batch"], "heads": cfg["heads"],
            "head_dim": cfg["dim"] // cfg["heads"], "layers": cfg["layers"], "dim": cfg["dim"], "causal": True,
            "dtype": setup["dtype"], "mode": "train_step", "family": None, "variant": None}
    rows, skipped, ref = [], [], None
    cuda = dev.startswith("cuda")
    for variant in TRAIN_VARIANTS:
        why = autotune_unavailable() if variant == "attnfuse-autotune" else None
        if why:
            skipped.append({"section": "train", "peer": variant, "reason": why})
            log(f"train     {variant:18s} skipped: {why[:150]}")
            continue
        torch._dynamo.reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        model = copy.deepcopy(master)
        row: dict[str, Any] = {"peer": variant, **case, "label": f"{cfg['layers']}L d{cfg['dim']} {tokens} tok"}
        try:
            run = model
            if variant == "inductor":
                run = torch.compile(model)
            elif variant.startswith("attnfuse"):
                opts = {"autotune": True} if variant == "attnfuse-autotune" else {}
                run = torch.compile(model, backend="attnfuse", options=opts)
            t0 = time.perf_counter()
            loss = run(idx, targets)
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t0
            grads = [p.grad.detach().clone() for p in model.parameters()]
            if ref is None:
                ref = (loss.detach(), grads)
            row["loss_abs_diff"] = abs(loss.item() - ref[0].item())
            row["grad_max_abs_diff"] = max(_diff(g, r) for g, r in zip(grads, ref[1]))
            del grads
            if variant.startswith("attnfuse"):
                rep = attnfuse.last_report()
                row["site_kernels"] = [s.kernel or f"skipped: {s.reason}" for s in rep.sites] if rep else []
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

            def step():
                opt.zero_grad(set_to_none=True)
                run(idx, targets).backward()
                opt.step()

            step()  # the optimizer's state, outside the peak
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                row["static_mb"] = torch.cuda.memory_allocated() / common.MIB
            timing = common.time_call(step, dev, reps=setup["reps"], warmup=setup["warmup"],
                                      track_load=cuda or not setup.get("dry"))
            row["ms"], row["ms_min"] = timing.median_s * 1e3, min(timing.times_s) * 1e3
            row["peak_mb"] = (torch.cuda.max_memory_allocated() / common.MIB if cuda else common.alloc_peak_mb(step))
            row["tokens_per_s"] = tokens / (row["ms"] * 1e-3)
            msg = (f"{row['ms']:9.2f} ms/step, peak {row['peak_mb'] or 0:8.0f} MB, first call "
                   f"{row['first_call_s']:.1f} s")
        except Exception as e:
            row["error"] = common.error_text(e)
            msg = row["error"][:200]
        rows.append(row)
        log(f"train     {row['label']:18s} {variant:18s} {msg}")
        del model
    torch._dynamo.reset()
    return rows, skipped


# ---------------------------------------------------------------- report

PEER_COLORS = {"attnfuse": "tab:blue", "attnfuse-flex": "tab:cyan", "sdpa-flash": "tab:orange",
               "sdpa-cudnn": "tab:red", "flex": "tab:green", "eager": "tab:gray", "inductor": "tab:purple",
               "attnfuse-autotune": "tab:olive"}


def _bars(ax, groups: list[str], peers: list[str], value, ylabel: str, title: str) -> None:
    width = 0.8 / max(len(peers), 1)
    for j, peer in enumerate(peers):
        xs = [i + (j - (len(peers) - 1) / 2) * width for i in range(len(groups))]
        ys = [value(g, peer) or 0.0 for g in groups]
        ax.bar(xs, ys, width, label=peer, color=PEER_COLORS.get(peer))
    ax.set_xticks(range(len(groups)), groups, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    if peers:
        ax.legend(fontsize=6)


def plot(doc: dict[str, Any], path: pathlib.Path) -> None:
    """Bars: TFLOP/s per configuration and peer, per (section kind, mode); the training step's time and peak."""
    ok = [r for r in doc["rows"] if r.get("ms") and not r.get("error")]
    attn = [r for r in ok if r["section"] != "train"]
    train = [r for r in ok if r["section"] == "train"]
    fig, axes = common.figure(3, 3, (16, 12))
    for i, kinds in enumerate((("dense",), ("window", "documents"))):
        for j, mode in enumerate(MODES):
            rs = [r for r in attn if r["section"] in kinds and r["mode"] == mode]
            groups = list(dict.fromkeys(r["label"] for r in rs))
            peers = list(dict.fromkeys(r["peer"] for r in rs))
            tf = {(r["label"], r["peer"]): r["tflops"] for r in rs}
            _bars(axes[i][j], groups, peers, lambda g, p: tf.get((g, p)), "TFLOP/s", f"{'/'.join(kinds)} {mode}")
    groups = list(dict.fromkeys(r["label"] for r in train))
    peers = list(dict.fromkeys(r["peer"] for r in train))
    by = {(r["label"], r["peer"]): r for r in train}
    _bars(axes[2][0], groups, peers, lambda g, p: by.get((g, p), {}).get("ms"), "ms per step", "training step")
    _bars(axes[2][1], groups, peers, lambda g, p: by.get((g, p), {}).get("peak_mb"), "peak MB", "training peak memory")
    _bars(axes[2][2], groups, peers, lambda g, p: by.get((g, p), {}).get("first_call_s"), "s", "first call (compile)")
    common.save(fig, path, f"gpu suite: {doc['device']}, {doc['setup']['dtype']}, torch {doc['torch']}, triton "
                           f"{doc['triton']} ({doc['date']}){' DRY RUN' if doc.get('dry') else ''}")


def summary(doc: dict[str, Any]) -> str:
    lines = []
    for r in doc["rows"]:
        cells = [r["section"], r["label"], r["peer"], r.get("mode", "-")]
        if r.get("error"):
            lines.append((*cells, "-", "-", "-", r["error"][:70]))
            continue
        diff = r.get("max_abs_diff", r.get("grad_max_abs_diff"))
        extra = (f"peak {r['peak_mb']:.0f} MB" if r.get("peak_mb") else "") if r["section"] == "train" else ""
        lines.append((*cells, f"{r['ms']:.3f}", common.fmt(r.get("tflops"), "{:.1f}"), common.fmt(diff, "{:.1e}"),
                      extra))
    text = common.table(lines, ("section", "config", "peer", "mode", "ms", "TFLOP/s", "max diff", "note"))
    for s in doc["skipped"]:
        text += f"\nskipped {s['section']} {s['peer']}{' ' + s['label'] if s.get('label') else ''}: {s['reason'][:200]}"
    return text


def report(doc: dict[str, Any], png_path: pathlib.Path) -> None:
    plot(doc, png_path)
    print(summary(doc))


# ---------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry", action="store_true", help="on the CPU with tiny shapes (a test runs this)")
    p.add_argument("--sections", type=common.csv(str), default=list(SECTIONS), help=",".join(SECTIONS))
    p.add_argument("--seqs", type=common.csv(int), help="dense sequence lengths (default 4096,8192,16384)")
    p.add_argument("--head-dims", type=common.csv(int), help="dense head dims (default 64,128)")
    p.add_argument("--reps", type=int, help="timed calls per measurement (default 10; --dry 2)")
    p.add_argument("--out", default=None, help="output folder or .json path (default benchmarks/results; --dry: a "
                                               "new temporary folder)")
    p.add_argument("--from-json", metavar="FILE", help="re-plot and re-print a results JSON (no GPU needed)")
    args = p.parse_args(argv)
    common.check_choices(p, "section", args.sections, SECTIONS)
    if args.from_json:
        return common.replot(args, report)
    setup = copy.deepcopy(DRY if args.dry else GPU)
    setup.update({k: v for k, v in (("seqs", args.seqs), ("head_dims", args.head_dims), ("reps", args.reps)) if v})
    setup["dry"] = args.dry
    out = args.out or (tempfile.mkdtemp(prefix="gpu-suite-dry-") if args.dry else str(common.RESULTS))
    if args.dry:  # the autotune cache of a dry run stays in its output folder
        os.environ.setdefault("ATTNFUSE_AUTOTUNE_CACHE", str(pathlib.Path(out) / "autotune-cache.json"))

    import torch

    if not args.dry and not torch.cuda.is_available():
        print(f"gpu_suite.py needs a CUDA GPU (torch {torch.__version__} sees none); --dry runs it on the CPU")
        return 0
    dev = "cpu" if args.dry else "cuda"
    if args.dry:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    for name, least in (("cache_size_limit", 256), ("accumulated_cache_size_limit", 4096)):
        if hasattr(torch._dynamo.config, name):  # one compiled flex_attention serves every shape and mask
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), least))
    import torch._functorch.config

    if hasattr(torch._functorch.config, "donated_buffer"):  # bwd mode: backward(retain_graph=True)
        torch._functorch.config.donated_buffer = False

    today = common.today()
    json_path = common.json_path(out, f"gpu-suite-{common.device_tag(dev, today)}.json")
    t0 = time.perf_counter()
    log = lambda line: common.log(f"[{time.perf_counter() - t0:7.1f} s] {line}")
    rows, skipped, section_s = [], [], {}
    for case in common.progress(cases(setup, args.sections), "gpu_suite"):
        s0 = time.perf_counter()
        got, skip = run_case(case, setup, dev, log)
        rows += got
        skipped += [s for s in skip if s not in skipped]
        section_s[case["section"]] = section_s.get(case["section"], 0.0) + time.perf_counter() - s0
    if "train" in args.sections:
        s0 = time.perf_counter()
        got, skip = run_train(setup, dev, log)
        rows, skipped = rows + got, skipped + skip
        section_s["train"] = time.perf_counter() - s0
    name = torch.cuda.get_device_name(0) if dev == "cuda" else common.device_name("cpu")
    doc = {"benchmark": "gpu_suite", "dry": args.dry, "date": today, "device": name,
           "device_tag": common.device_name(dev), **common.versions(), "machine": common.machine_info(),
           "setup": {**setup, "sections": args.sections, "modes": list(MODES),
                     "flops": "4*H*D*(visible (q, k) pairs; dense nominal, halved when causal) per batch; bwd 2.5x, "
                              "fwd_bwd 3.5x the forward",
                     "check": "max |peer - SDPA with the same dense attn_mask| once per configuration; train: the "
                              "first step's loss and parameter gradients vs the eager model's"},
           "rows": rows, "skipped": skipped, "section_s": {k: round(v, 1) for k, v in section_s.items()},
           "wall_s": round(time.perf_counter() - t0, 1), "command": common.command(__file__, argv)}
    common.save_results(doc, json_path, report)
    print(f"({doc['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
