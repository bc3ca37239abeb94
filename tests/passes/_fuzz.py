"""Differential fuzzer: seeded attention programs, compiled with attnfuse, classified against eager.

`generate(seed)` turns one integer into one program: Python source for a function (or an
``nn.Module``) plus how to build its inputs.  The source is exec'd fresh for every case, so
every case has its own code object and no dynamo cache entry is ever shared between cases.
`run_case(case)` runs it three ways -- eager, ``torch.compile(backend="attnfuse")`` and eager
on float64 copies of the inputs -- and classifies it:

  fused-equal / skipped-equal   attnfuse's result meets the rule (below), fused or skipped per the report
  wrong                         a value, NaN/inf pattern, gradient or mutated input/buffer breaks the rule
  crash                         the compiled call raised where eager did not
  negative-fused                a program that is not attention (a negative) was reported fused; a "twin" (a near
                                miss that is still the plain attention it spells) may be fused, and must be equal

Rule (DESIGN.md): NaN and inf patterns exactly eager's; over the entries eager and the float64
reference both give finite, ``|ours - ref| <= 2 |eager - ref| + 4 eps max(|ref|, 1e-3)``; entries
the reference cannot judge (eager finite, reference not -- fp16/bf16 fills that saturate) are
held to that same tolerance against eager itself.  The float64 reference runs the same source with
``F32`` bound to float64 and ``MIN`` kept at the case dtype's ``finfo.min``.

A wrong or crashing case is re-run with the stock ``aot_eager`` backend; if that fails the same
way the case is counted as ``torch-wrong`` / ``torch-crash`` (PyTorch's problem, not attnfuse's).
Cases whose eager run raises count as ``invalid`` (a generator bug, shown in the table).

Each seed belongs to one generator family (`FAMILIES`): "core" (the original decision list: forms, masks, in-place
writes, consumers) or one family of third-party spellings (views inside the chain, einsum with multi-query K/V,
dead users, softmax by hand, learned temperatures and late scales, 5-D batches, local attention by hand), each
with its twins.  The summary counts fused / skipped per family and variant: the matcher's reach on each spelling.

Replay one case:  ``python tests/passes/_fuzz.py --seed N``.  Long mode: ``--long`` (5,000 cases).  One family:
``--family views -n 200``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import random
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import attnfuse

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
FAILURES = ("wrong", "crash", "negative-fused")
CLASSES = ("fused-equal", "skipped-equal", *FAILURES, "torch-wrong", "torch-crash", "invalid", "uncompiled")


def _ensure_backend() -> None:
    from torch._dynamo.backends.registry import list_backends, register_backend

    if "attnfuse" not in list_backends(exclude_tags=()):
        from attnfuse.backend import attnfuse_backend

        register_backend(attnfuse_backend, "attnfuse")


# ---------------------------------------------------------------------------------------------------------------
# the generator


@dataclasses.dataclass
class Case:
    seed: int
    expect: str  # "pos" / "twin" (fused or skipped, equal either way; a twin is a near miss) | "neg" (skipped)
    tags: dict[str, Any]
    src: str
    dtype: torch.dtype
    dims: list[dict[str, int]]  # one per call
    inputs: list[tuple[str, Callable]]  # (name, builder(gen, dims, dtype) -> tensor); function args in order
    buffers: list[str]  # names among inputs that are module buffers (module cases), not arguments
    grad: list[str]
    mutated: list[str]
    dynamic: Any  # False | True | None (automatic) | "mark"
    inner: str
    family: str = "core"  # the generator family (FAMILIES), for the per-spelling breakdown
    variant: str = ""  # the spelling within the family
    params: list[str] = dataclasses.field(default_factory=list)  # inputs that are module nn.Parameters

    @property
    def kernels(self) -> Any:
        """``options["kernels"]`` of the compiled run: mostly "auto"; some cases allow only PyTorch's kernels
        (sdpa / flex), so the fuzzer checks their exact paths too.  Drawn from its own stream: the seeds' cases
        stay what they were."""
        draw = random.Random(self.seed * 7919 + 17).random()
        return ["sdpa"] if draw < 0.08 else ["flex"] if draw < 0.13 else "auto"

    def describe(self) -> str:
        tags = " ".join(f"{k}={v}" for k, v in self.tags.items())
        shapes = "; ".join(" ".join(f"{k}={v}" for k, v in d.items()) for d in self.dims)
        return (f"seed={self.seed} expect={self.expect} dtype={str(self.dtype)[6:]} inner={self.inner} "
                f"kernels={self.kernels} dynamic={self.dynamic} grad={self.grad or '-'}\n  {tags}\n  calls: {shapes}")


def _randn(*shape, scale=1.0):
    return lambda g, d, dt: (torch.randn(*[d.get(s, s) for s in shape], generator=g) * (
        d["D"] ** -0.25 if scale == "qk" else scale)).to(dt)


def _keep(*shape, empty: bool, p: float = 0.7):
    """A bool mask; ``empty`` makes one or two of its last-but-one rows see no key at all."""
    def build(g, d, dt):
        size = [d.get(s, s) for s in shape]
        m = torch.rand(*size, generator=g) < p
        if empty:
            rows = m.reshape(-1, size[-1])
            n = rows.shape[0]
            for i in torch.randint(0, n, (1 + int(torch.randint(0, 2, (1,), generator=g)),), generator=g).tolist():
                rows[i] = False
        return m
    return build


def _pad(rows: str, empty: bool):
    """Key padding (rows, Lk): a prefix of valid keys per row; ``empty``: one row has none."""
    def build(g, d, dt):
        n, lk = d.get(rows, 1) if rows != "1" else 1, d["Lk"]
        lens = torch.randint(1, lk + 1, (n,), generator=g)
        if empty:
            lens[int(torch.randint(0, n, (1,), generator=g))] = 0
        return torch.arange(lk)[None, :] < lens[:, None]
    return build


def _padadd(empty: bool):
    def build(g, d, dt):
        keep = _pad("B", empty)(g, d, dt)
        return torch.zeros(keep.shape, dtype=dt).masked_fill(~keep, torch.finfo(dt).min)[:, None, None, :]
    return build


def _index(g, d, dt):
    return torch.randperm(d["Lk"], generator=g)[:d["n"]].sort().values


class _Src:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, *lines: str) -> None:
        self.lines.extend(lines)


FILLS = ("NEG_INF", "MIN", "-1e4", "-1e9", "-10000.0")


def _generate_core(seed: int, inductor_rate: float = 0.0) -> Case:  # noqa: C901 - one decision list, read top to bottom
    r = random.Random(seed)
    ch = r.choice
    dtype = r.choices([F32, F16, BF16], weights=[6, 2, 2])[0]
    form = r.choices(["4d", "bthd", "folded", "single", "g5", "kbcast"], weights=[8, 2, 2, 1, 2, 2])[0]
    rank = {"4d": 4, "bthd": 4, "kbcast": 4, "folded": 3, "single": 2, "g5": 5}[form]
    b, d = (1 if form == "single" else ch([1, 2])), ch([3, 5, 8, 11, 16])
    h = 1 if form == "single" else ch([1, 2, 3, 4])
    hkv = h
    kv = "same"
    if form in ("4d", "bthd") and h > 1 and r.random() < 0.35:
        kv = ch(["expand", "interleave", "repeat"])
        hkv = ch([x for x in (1, 2) if h % x == 0 and x < h])
    elif form == "g5":
        h = ch([2, 4])
        hkv = ch([x for x in (1, 2) if x < h])
    elif form == "kbcast":
        h = ch([2, 3, 4])
        hkv = 1
        kv = ch(["k1", "k1", "v1", "both1"])
    g = h // hkv
    lengths = [1, 3, 5, 7, 11, 13, 17, 23]
    lq, lk = ch(lengths), ch(lengths)
    if r.random() < 0.35:
        lk = lq
    tags: dict[str, Any] = {"form": form}
    if kv != "same" or hkv != h:
        tags["kv"] = f"{kv} {h}/{hkv}"

    # a negative (not attention) for about a quarter of the cases
    negs = ["sm_query", "score_used", "prob_used", "sigmoid", "log_softmax", "post_mask", "manual_wrong_sum",
            "p_transposed"]
    if rank >= 4:
        negs += ["sm_heads", "implicit", "implicit", "implicit_module"]
    if rank == 3:
        negs += ["implicit", "implicit"]
    neg = ch(negs) if r.random() < 0.25 else None
    if neg:
        tags["neg"] = neg
    if neg == "p_transposed":  # p.mT @ v type-checks only when Lq == Lk; Lq > 1 keeps it distinct from p @ v
        lq = lk = max(lq, 3)

    mask = ch(["none", "none", "bias", "fill", "fill", "pad_causal", "minmin", "bias_layout", "bool_window",
               "br_causal_bias", "tril", "hf_causal"])
    if mask == "minmin" and rank not in (4, 5):
        mask = "fill"
    if mask == "br_causal_bias" and lq <= lk and neg != "p_transposed":
        lk = ch([1, 2, 3, 5, 7])
        lq = lk + ch([1, 2, 4, 6])
    empty = r.random() < 0.5
    fill = ch([f for f in FILLS if not (dtype == F16 and f == "-1e9")])  # eager rejects the fp16 overflow
    tags["mask"] = mask + (f" fill={fill}" if mask in ("fill", "br_causal_bias") else "") + (" empty" if empty else "")

    pre = ch([None] * 6 + ["qmul_", "cache_wr", "cache_rw", "cache_slice", "side_add_", "side_fill_", "side_copy_",
                           "side_setitem", "v_clone_add_", "bias_mul_", "mask_after_", "scores_mul_",
                           "side_dep_"])
    if pre in ("cache_wr", "cache_rw", "cache_slice") and form not in ("4d", "kbcast", "g5"):
        pre = "qmul_"
    if pre == "bias_mul_" and mask not in ("bias", "bias_layout", "br_causal_bias"):
        pre = "side_add_"
    if pre == "mask_after_" and mask not in ("fill", "bias_layout", "bool_window"):
        pre = "side_fill_"
    module = r.random() < 0.12 and pre in ("cache_wr", "cache_rw", "side_add_", "side_fill_", "side_dep_")
    if pre:
        tags["inplace"] = pre + (" (module buffer)" if module else "")
    n_new = 0
    if pre and pre.startswith("cache"):
        n_new = ch([1, 2, 3])
        lk = max(lk, n_new + 2)
        if neg == "p_transposed":  # p.mT @ v needs Lq == Lk
            lq = lk
    post = ch([None] * 5 + ["view", "as_strided", "mul_", "setitem", "transpose_reshape", "transpose_contig_view",
                            "two_views", "add_view", "unsqueeze_mul_"] + (["transpose_view"] if h == 1 else []))
    if rank == 2 and post in ("transpose_reshape", "transpose_contig_view", "transpose_view", "two_views"):
        post = "view"
    if post:
        tags["out"] = post

    scale = ch(["none", "s_mul", "s_div_sqrt", "q_mul", "split", "s_rmul"])
    softcap = ch([0.0] * 8 + [5.0, 20.0])
    smax = ch(["F", "F", "method", "torch", "lse", "dtype_f32", "upcast_to", "module"] + (
        ["implicit2d"] * 3 if rank == 2 else []))
    dropout = ch([None] * 6 + ["eval", "p0"])
    qk = ch(["at", "matmul"] + (["einsum"] if form in ("4d", "bthd") and kv == "same" else []) + (
        ["bmm"] if form == "folded" else []))
    tags["spelling"] = f"qk={qk} scale={scale} softmax={smax}" + (f" softcap={softcap}" if softcap else "") + (
        f" dropout={dropout}" if dropout else "")

    second = ch([None, None, "masks", "len"])
    dynamic: Any = False
    if second == "len":
        dynamic = ch([True, None, "mark"])
    if module and second == "len":
        second = "masks"
    grad = dtype == F32 and r.random() < 0.35 and not (pre and (pre.startswith("cache") or pre == "mask_after_"))
    inner = "inductor" if r.random() < inductor_rate else "eager"

    # ---- dims per call
    def dims_for(lq_: int, lk_: int) -> dict[str, int]:
        return {"B": b, "H": h, "Hkv": hkv, "Lq": lq_, "Lk": lk_, "D": d, "BH": b * h, "n": n_new}

    dims = [dims_for(lq, lk)]
    if second == "masks":
        dims.append(dims_for(lq, lk))
    elif second == "len":
        lq2, lk2 = ch(lengths[1:]), ch(lengths[1:])
        if lq == lk or neg == "p_transposed":
            lk2 = lq2
        if mask == "br_causal_bias":
            lk2 = min(lk2, 9)
            lq2 = lk2 + ch([1, 3])
        lk2 = max(lk2, n_new + 2)
        if neg == "p_transposed":
            lq2 = lk2
        if post == "transpose_view" and h != 1:
            post = "view"
        dims.append(dims_for(lq2, lk2))
    if second:
        tags["second"] = second

    # ---- inputs
    inputs: list[tuple[str, Callable]] = []
    kvh = "Hkv"
    if form == "single":
        qs, ks = ("Lq", "D"), ("Lk", "D")
    elif form == "bthd":
        qs, ks = ("B", "Lq", "H", "D"), ("B", "Lk", kvh, "D")
    else:
        qs, ks = ("B", "H", "Lq", "D"), ("B", kvh, "Lk", "D")
    vs = ks
    if form == "kbcast":
        if kv == "k1":
            vs = ("B", "H", "Lk", "D")
        elif kv == "v1":
            ks, vs = ("B", "H", "Lk", "D"), ("B", 1, "Lk", "D")
        else:
            ks = vs = ("B", 1, "Lk", "D")
    if pre in ("cache_wr", "cache_rw", "cache_slice"):
        new_k = tuple("n" if s == "Lk" else s for s in ks)
        new_v = tuple("n" if s == "Lk" else s for s in vs)
        inputs += [("q", _randn(*qs, scale="qk")), ("k", _randn(*new_k, scale="qk")), ("v", _randn(*new_v)),
                   ("kc", _randn(*ks, scale="qk")), ("vc", _randn(*vs))]
        if pre != "cache_slice":
            inputs.append(("idx", _index))
    else:
        inputs += [("q", _randn(*qs, scale="qk")), ("k", _randn(*ks, scale="qk")), ("v", _randn(*vs))]

    src = _Src()
    mutated: list[str] = []
    # leading shape reads: symbolic under dynamic shapes
    if form == "bthd":
        src("B, Lq, H, D = q.shape", "q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)")
    elif form == "single":
        src("Lq, D = q.shape", "B, H = 1, 1")
    else:
        src("B, H, Lq, D = q.shape")
    # in-place before the attention
    if pre == "qmul_":
        src("q = q.clone()", "q.mul_(1.25)")
    elif pre == "v_clone_add_":
        src("v = v.clone()", "v.add_(0.5)")
    elif pre in ("cache_wr", "cache_slice"):
        kc, vc = ("self.kc", "self.vc") if module else ("kc", "vc")
        if pre == "cache_wr":
            src(f"{kc}.index_copy_(2, idx, k)", f"{vc}.index_copy_(2, idx, v)")
        else:
            src(f"{kc}[:, :, 1:1 + k.shape[2]] = k", f"{vc}[:, :, 1:1 + v.shape[2]] = v")
        src(f"k, v = {kc}, {vc}")
        mutated += ["kc", "vc"]
    elif pre == "cache_rw":
        kc, vc = ("self.kc", "self.vc") if module else ("kc", "vc")
        src(f"k_new, v_new, k, v = k, v, {kc}, {vc}")
        mutated += ["kc", "vc"]
    elif pre in ("side_add_", "side_fill_", "side_copy_", "side_setitem", "side_dep_"):
        inputs.append(("buf", _randn(3, 5)))
        buf = "self.buf" if module else "buf"
        src({"side_add_": f"{buf}.add_(q.flatten()[0])", "side_fill_": f"{buf}.fill_(0.75)",
             "side_copy_": f"{buf}.copy_(k.flatten()[0] * 2)", "side_setitem": f"{buf}[1] = 2.5",
             "side_dep_": f"{buf}.mul_(0.5)"}[pre])
        mutated.append("buf")
    if form == "folded":
        src("q, k, v = q.reshape(B * H, Lq, D), k.reshape(B * H, -1, D), v.reshape(B * H, -1, D)")
    # repeat K/V (GQA)
    if kv in ("expand", "interleave", "repeat"):
        rep = {"expand": "k[:, :, None].expand(B, {hkv}, {g}, k.shape[2], D).reshape(B, H, k.shape[2], D)",
               "interleave": "k.repeat_interleave({g}, dim=1)", "repeat": "k.repeat(1, {g}, 1, 1)"}[kv]
        rep = rep.format(hkv=hkv, g=g)
        src(f"k, v = {rep}, {rep.replace('k', 'v').replace('v.shape', 'v.shape')}")
    # scale on q / k
    c = 0.37
    if scale == "q_mul":
        src(f"q = q * {c}")
    elif scale == "split":
        src("q, k = q * D ** -0.25, k * D ** -0.25")
    # scores
    if form == "g5":
        src(f"q = q.view(B, {hkv}, {g}, Lq, D)", "k, v = k.unsqueeze(2), v.unsqueeze(2)")
    kt = ch(["k.mT", "k.transpose(-2, -1)", f"k.transpose({rank - 2}, {rank - 1})"]) if rank > 2 else "k.t()"
    if qk == "einsum":
        s_expr = "torch.einsum('bhqd,bhkd->bhqk', q, k)"
    elif qk == "bmm":
        s_expr = f"torch.bmm(q, {kt})"
    elif qk == "matmul":
        s_expr = f"torch.matmul(q, {kt})"
    else:
        s_expr = f"q @ {kt}"
    src(f"s = {s_expr}")
    if scale == "s_mul":
        src(f"s = s * {c}")
    elif scale == "s_rmul":
        src(f"s = {c} * s")
    elif scale == "s_div_sqrt":
        src("s = s / math.sqrt(D)")
    if pre == "scores_mul_":
        src("s.mul_(0.5)")
    if softcap:
        src(f"s = {softcap} * torch.tanh(s / {softcap})")
    src("Lk = s.shape[-1]")

    # masks
    def kp(name: str) -> str:
        return f"{name}[:, {'None, ' * (rank - 2)}:]" if rank > 2 else name

    pad_rows = {4: "B", 5: "B", 3: "BH", 2: "1"}[rank]
    qkshape = ("Lq", "Lk") if rank != 4 or r.random() < 0.5 else ("B", 1, "Lq", "Lk")
    bshape = ("Lq", "Lk") if rank != 4 else (ch([1, "B"]), ch([1, "H"]), "Lq", "Lk")
    band = ("i = torch.arange(Lq, device=s.device)[:, None]", "j = torch.arange(Lk, device=s.device)[None, :]")
    fill_v = "MIN" if fill == "MIN" else "float('-inf')" if fill == "NEG_INF" else fill
    if mask == "bias":
        inputs.append(("bias", _randn(*bshape)))
        if pre == "bias_mul_":
            src("bias = bias.clone()", "bias.mul_(0.5)")
        src("s = s + bias")
    elif mask == "fill":
        inputs.append(("keep", _keep(*qkshape, empty=empty)))
        src(ch([f"s = s.masked_fill(~keep, {fill_v})", f"s = torch.where(keep, s, {fill_v})",
                f"s = s.masked_fill(keep == 0, {fill_v})"]))
    elif mask == "pad_causal":
        inputs.append(("pad", _pad(pad_rows, empty)))
        src(f"s = torch.where({kp('pad')}, s, MIN)",
            "s = s + torch.ones(Lq, Lk, dtype=s.dtype, device=s.device).triu(1) * MIN")
    elif mask == "minmin":
        inputs.append(("padadd", _padadd(empty)))
        pa = "padadd" if rank == 4 else "padadd[:, None]"
        src(f"s = s + {pa} + torch.full((Lq, Lk), MIN, dtype=s.dtype, device=s.device).triu(1)")
    elif mask == "bias_layout":
        inputs += [("bias", _randn(*bshape)), ("layout", _keep(*qkshape, empty=empty))]
        if pre == "bias_mul_":
            src("bias = bias.clone()", "bias.mul_(0.5)")
        src("s = bias + torch.where(layout, s, -1e4)")
    elif mask == "bool_window":
        inputs.append(("keep", _keep(*qkshape, empty=empty)))
        w = ch([1, 2, 4])
        src("s = s.masked_fill(~keep, MIN)", *band, f"s = s.masked_fill((j > i) | (j < i - {w}), -1e4)")
        tags["mask"] += f" w={w}"
    elif mask == "br_causal_bias":
        inputs.append(("bias", _randn(*bshape)))
        if pre == "bias_mul_":
            src("bias = bias.clone()", "bias.mul_(0.5)")
        w = ch([None, 1, 3])
        hide = "(j > i + (Lk - Lq))" + (f" | (j < i + (Lk - Lq) - {w})" if w else "")
        src("s = s + bias", *band, f"s = s.masked_fill({hide}, {fill_v})")
    elif mask == "tril":
        src("s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool, device=s.device).tril() == 0, float('-inf'))")
    elif mask == "hf_causal":
        src("s = s + torch.full((Lq, Lk), MIN, dtype=s.dtype, device=s.device).triu(1)")

    # softmax (or the negative's replacement)
    last = rank - 1
    dim = ch(["-1", str(last)])
    sm = {
        "F": f"p = F.softmax(s, dim={dim})", "method": f"p = s.softmax({dim})", "torch": f"p = torch.softmax(s, {dim})",
        "lse": f"p = torch.exp(s - torch.logsumexp(s, {dim}, keepdim=True))",
        "dtype_f32": f"p = F.softmax(s, dim={dim}, dtype=F32).to(q.dtype)",
        "upcast_to": f"p = s.to(F32).softmax({dim}).to(q.dtype)",
        "module": f"p = torch.nn.Softmax(dim={dim})(s)",
        "implicit2d": ch(["p = F.softmax(s)", "p = torch.nn.Softmax()(s)"]),
    }[smax]
    if neg == "sm_query":
        sm = f"p = F.softmax(s, dim={ch(['-2', str(rank - 2)])})"
    elif neg == "sm_heads":
        sm = "p = s.softmax(1)"
    elif neg == "implicit":
        sm = ch(["p = F.softmax(s)", "p = F.softmax(s, _stacklevel=5)", "p = F.softmax(s, dim=None)"])
    elif neg == "implicit_module":
        sm = "p = torch.nn.Softmax()(s)"
    elif neg == "sigmoid":
        sm = "p = torch.sigmoid(s)"
    elif neg == "log_softmax":
        sm = "p = F.log_softmax(s, -1)"
    elif neg == "manual_wrong_sum":
        sm = "e = torch.exp(s - s.amax(-1, keepdim=True))\n    p = e / e.sum(-2, keepdim=True)"
    src(sm)
    if neg == "post_mask":
        inputs.append(("pkeep", _keep("Lq", "Lk", empty=False)))
        src("p = p * pkeep")
    if dropout == "eval":
        src("p = F.dropout(p, 0.1, training=False)")
    elif dropout == "p0":
        src("p = F.dropout(p, p=0.0)")
    # p @ v
    pt = "p.transpose(-2, -1)" if neg == "p_transposed" else "p"
    if qk == "einsum":
        src(f"out = torch.einsum('bhqk,bhkd->bhqd', {pt}, v)")
    elif qk == "bmm":
        src(f"out = torch.bmm({pt}, v)")
    elif qk == "matmul":
        src(f"out = torch.matmul({pt}, v)")
    else:
        src(f"out = {pt} @ v")
    if form == "g5":
        src("out = out.reshape(B, H, Lq, D)")
    elif form == "folded":
        src("out = out.view(B, H, Lq, D)")
    if pre == "cache_rw":
        kc, vc = ("self.kc", "self.vc") if module else ("kc", "vc")
        src(f"{kc}.index_copy_(2, idx, k_new)", f"{vc}.index_copy_(2, idx, v_new)")
    if pre == "side_dep_":  # the output reads the buffer the graph mutated
        src(f"out = out * {'self.buf' if module else 'buf'}[0, 1]")
    if pre == "mask_after_":
        name = "layout" if mask == "bias_layout" else "keep"
        src(f"{name}.fill_(True)")
        mutated.append(name)
    # the output's consumers
    extra = ""
    if post == "view":
        src("out = out.view(-1, D)" if rank == 2 else "out = out.view(B * H, Lq, D)")
    elif post == "as_strided":
        src("out = out.as_strided((Lq, D), (D, 1))" if rank == 2 else
            "out = out.as_strided((B, H, Lq, D), (H * Lq * D, Lq * D, D, 1))")
    elif post == "mul_":
        src("out.mul_(2.0)")
    elif post == "setitem":
        src("out[..., 0] = 0.5")
    elif post == "transpose_reshape":
        src("out = out.transpose(1, 2).reshape(B, Lq, H * D)")
    elif post == "transpose_contig_view":
        src("out = out.transpose(1, 2).contiguous().view(B, Lq, H * D)")
    elif post == "transpose_view":
        src("out = out.transpose(1, 2).view(B, Lq, H * D)")
    elif post == "two_views":
        extra = ", out.view(B, H * Lq, D), out[..., :1]"
    elif post == "add_view":
        src("out.add_(1.0)", "out = out.view(-1)")
    elif post == "unsqueeze_mul_":
        src("o2 = out.unsqueeze(0)", "o2.mul_(3.0)")
    if neg == "score_used":
        if r.random() < 0.5:
            src("out = out + s.amax()")  # a scalar: broadcasts against any layout of out
        else:
            extra += ", s"
    elif neg == "prob_used":
        extra += ", p"
    src(f"return (out{extra})" if extra else "return out")

    # assemble: a function, or a module whose buffers are the mutated state
    names = [n for n, _ in inputs]
    buffers = [n for n in ("kc", "vc", "buf") if module and n in names]
    args = [n for n in names if n not in buffers]
    body = "\n".join("    " + line for line in src.lines)
    if module:
        body = "\n".join("    " + line for line in body.splitlines())
        code = f"class M(torch.nn.Module):\n    def forward(self, {', '.join(args)}):\n{body}\n"
    else:
        code = f"def f({', '.join(args)}):\n{body}\n"
    grads = [n for n in ("q", "k", "v", "bias") if grad and n in args and not (n == "bias" and pre == "bias_mul_")]
    return Case(seed=seed, expect="neg" if neg else "pos", tags=tags, src=code, dtype=dtype, dims=dims,
                inputs=inputs, buffers=buffers, grad=grads, mutated=mutated, dynamic=dynamic, inner=inner,
                variant=form)


# ---------------------------------------------------------------------------------------------------------------
# generator families: the third-party spellings, each with its twins.  A twin is "neg" where the program is not
# attention (it must be skipped) and "twin" where fusing it as the plain attention it spells is still exact (it may
# be fused, never into the structure it imitates: the comparison with eager decides).


def _pos(*shape, lo: float = 0.5, hi: float = 2.0):
    return lambda g, d, dt: (lo + (hi - lo) * torch.rand(*[d.get(s, s) for s in shape], generator=g)).to(dt)


def _swin(*shape):
    """A Swin shifted-window mask (..., nW, w, w): 0 where query and key lie in the same region of the window,
    else -100 (each query sees its own region, never a row of -100 only)."""
    def build(g, d, dt):
        size = [d.get(s, s) for s in shape]
        region = torch.randint(0, 3, (*size[:-1], 1), generator=g)
        return torch.where(region == region.transpose(-2, -1), 0.0, -100.0).to(dt)
    return build


class _Fam:
    """One family program under construction: seeded choices, inputs, source lines, then `case`."""

    def __init__(self, seed: int, family: str, inductor_rate: float) -> None:
        self.seed, self.family = seed, family
        self.r = r = random.Random(seed)
        self.dtype = r.choices([F32, F16, BF16], weights=[6, 2, 2])[0]
        self.inner = "inductor" if r.random() < inductor_rate else "eager"
        self.grad = self.dtype == F32 and r.random() < 0.35
        self.second = r.random() < 0.25
        self.inputs: list[tuple[str, Callable]] = []
        self.params: list[str] = []
        self.tags: dict[str, Any] = {"family": family}
        self.src = _Src()
        self.min_len = 1  # 3 for twins and negatives: at length 1 a negative can coincide with attention

    def ch(self, seq):
        return self.r.choice(seq)

    def inp(self, name: str, build: Callable) -> None:
        self.inputs.append((name, build))

    def fill(self) -> str:
        f = self.ch([x for x in FILLS if not (self.dtype == F16 and x == "-1e9")])
        return "MIN" if f == "MIN" else "float('-inf')" if f == "NEG_INF" else f

    def mask(self, lead: tuple, kinds: tuple = ("none", "none", "bias", "fill", "fill", "causal")) -> str:
        """Source lines masking ``s`` (..., Lq, Lk); masks are ``lead + (Lq, Lk)``.  Returns the kind."""
        kind, empty = self.ch(kinds), self.r.random() < 0.4
        if kind == "bias":
            self.inp("bias", _randn(*lead, "Lq", "Lk"))
            self.src("s = s + bias")
        elif kind == "fill":
            self.inp("keep", _keep(*lead, "Lq", "Lk", empty=empty))
            fill = self.fill()
            self.src(self.ch([f"s = s.masked_fill(~keep, {fill})", f"s = torch.where(keep, s, {fill})"]))
            kind += f" {fill}" + (" empty" if empty else "")
        elif kind == "causal":
            self.src("s = s.masked_fill(torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, "
                     f"device=s.device).triu(1), {self.fill()})")
        self.tags["mask"] = kind
        return kind

    def case(self, variant: str, expect: str, make_dims: Callable[[], dict[str, int]], args: list[str],
             grad: tuple[str, ...] = ("q", "k", "v")) -> Case:
        self.min_len = 1 if expect == "pos" else 3
        dims = [make_dims()]
        if self.second:
            dims.append(make_dims())
            self.tags["second"] = "len"
        self.tags["variant"] = variant + ("" if expect == "pos" else f" ({expect})")
        if not self.src.lines[-1].startswith("return"):
            self.src("return out")
        names = [n for n, _ in self.inputs]
        body = "\n".join("    " + line for text in self.src.lines for line in text.splitlines())
        if self.params:
            body = "\n".join("    " + line for line in body.splitlines())
            code = f"class M(torch.nn.Module):\n    def forward(self, {', '.join(args)}):\n{body}\n"
        else:
            code = f"def f({', '.join(args)}):\n{body}\n"
        assert set(args) | set(self.params) == set(names), (args, names)
        grads = [n for n in dict.fromkeys((*grad, *self.params)) if self.grad and n in names]
        return Case(seed=self.seed, expect=expect, tags=self.tags, src=code, dtype=self.dtype, dims=dims,
                    inputs=self.inputs, buffers=[], grad=grads, mutated=[], dynamic=None if self.second else False,
                    inner=self.inner, family=self.family, variant=variant, params=list(self.params))

    def sizes(self, **fixed: Any) -> Callable[[], dict[str, int]]:
        """Per-call sizes: B, H, Lq, Lk, D drawn per call unless fixed (a size the source spells as a literal)."""
        def make() -> dict[str, int]:
            d = {"B": self.ch([1, 2]), "H": self.ch([1, 2, 3]), "Lq": self.ch([1, 3, 5, 7, 11][self.min_len // 2:]),
                 "D": self.ch([3, 5, 8])}
            d["Lk"] = d["Lq"] if self.r.random() < 0.35 else self.ch([1, 3, 6, 7, 13][self.min_len // 2:])
            d.update(fixed)
            d["BH"] = d["B"] * d["H"]
            return d
        return make


_QKV4 = (("q", _randn("B", "H", "Lq", "D", scale="qk")), ("k", _randn("B", "H", "Lk", "D", scale="qk")),
         ("v", _randn("B", "H", "Lk", "D")))


def _softmax_line(f: _Fam, x: str = "s") -> str:
    return f.ch([f"p = F.softmax({x}, dim=-1)", f"p = {x}.softmax(-1)",
                 f"p = F.softmax({x}, dim=-1, dtype=F32).to(q.dtype)"])


def _fam_views(f: _Fam) -> Case:
    """Views inside the chain: heads folded into the batch around a 4-D mask, 5-D relative-position biases,
    size-1 axes moved.  Negatives: a view mixing the key axis into the rows, scores transposed between views."""
    v = f.ch(["baddbmm", "bmm", "bmm", "prob_view", "relpos5d", "unit_axes", "unit_axes", "key_into_rows",
              "transpose_between"])
    src, sizes = f.src, f.sizes()
    if v == "relpos5d":  # SAM: (B*H, qh*qw, kh*kw) scores viewed as (B*H, qh, qw, kh, kw) for two decomposed biases
        # kh, kw >= 2: a bias constant along every key of a row has gradient exactly 0 (both sides compare noise)
        qh, qw, kh, kw = f.ch([1, 2, 3]), f.ch([1, 2, 3]), f.ch([2, 3]), f.ch([2, 3])
        sizes = f.sizes(Lq=qh * qw, Lk=kh * kw)
        f.inputs += [("q", _randn("BH", "Lq", "D", scale="qk")), ("k", _randn("BH", "Lk", "D", scale="qk")),
                     ("v", _randn("BH", "Lk", "D"))]
        src("BH, Lq, D = q.shape", f"s = (q * {f.ch(['D ** -0.5', '0.37'])}) @ k.transpose(-2, -1)")
        if f.r.random() < 0.5:
            f.inputs += [("rh", _randn(qh, kh, "D")), ("rw", _randn(qw, kw, "D"))]
            src(f"rq = q.view(BH, {qh}, {qw}, D)", "rel_h = torch.einsum('bhwc,hkc->bhwk', rq, rh)",
                "rel_w = torch.einsum('bhwc,wkc->bhwk', rq, rw)")
        else:
            f.inputs += [("rel_h", _randn("BH", qh, qw, kh)), ("rel_w", _randn("BH", qh, qw, kw))]
        src(f"s = (s.view(BH, {qh}, {qw}, {kh}, {kw}) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :])"
            f".view(BH, {qh * qw}, {kh * kw})", _softmax_line(f), "out = p @ v")
        return f.case(v, "pos", sizes, [n for n, _ in f.inputs], ("q", "k", "v", "rel_h", "rel_w", "rh", "rw"))
    if v == "key_into_rows":  # Lk even: the softmax runs over half rows, or over everything of a batch
        sizes = f.sizes(Lk=f.ch([2, 4, 6, 10]))
    if v == "transpose_between" and f.r.random() < 0.5:
        sizes, v = f.sizes(Lq=7, Lk=7), "transpose_reshape"
    f.inputs += _QKV4
    src("B, H, Lq, D = q.shape", "Lk = k.shape[2]")
    if v in ("baddbmm", "bmm", "key_into_rows", "transpose_between", "transpose_reshape"):
        src("q3, k3, v3 = q.reshape(B * H, Lq, D), k.reshape(B * H, Lk, D), v.reshape(B * H, Lk, D)")
        if v == "baddbmm":  # BLOOM: alibi (B*H, 1, Lk) added by baddbmm, the mask on a (B, H, Lq, Lk) view
            f.inp("alibi", _randn(f.ch(["BH", 1]), f.ch([1, "Lq"]), "Lk"))
            src(f"s = torch.baddbmm(alibi, q3, k3.transpose(1, 2), beta={f.ch(['1.0', '0.5'])}, "
                f"alpha={f.ch(['1 / math.sqrt(D)', '0.37'])})")
        else:
            src(f"s = torch.bmm(q3, k3.transpose(1, 2)){f.ch([' * 0.37', ' / math.sqrt(D)', ''])}")
        if v == "key_into_rows":
            src(f.ch(["s = s.view(B * H, Lq * 2, Lk // 2)", "s = s.view(B, H * Lq * Lk)"]),
                "p = s.softmax(-1).view(B * H, Lq, Lk)", "out = torch.bmm(p, v3).view(B, H, Lq, D)")
            return f.case(v, "neg", sizes, ["q", "k", "v"])
        src(f.ch(["s = s.view(B, H, Lq, Lk)", "s = s.view(B, H, Lq, -1)"]))
        if v == "transpose_between":  # the softmax runs over the queries
            src("p = F.softmax(s.transpose(-2, -1), dim=-1).transpose(-2, -1).reshape(B * H, Lq, Lk)",
                "out = torch.bmm(p, v3).view(B, H, Lq, D)")
            return f.case(v, "neg", sizes, ["q", "k", "v"])
        if v == "transpose_reshape":  # Lq == Lk: the transposed scores read back as (B*H, Lq, Lk)
            src(f"s = s.transpose({f.ch(['2, 3', '-1, -2'])}).reshape(B * H, Lq, Lk)", "p = s.softmax(-1)",
                "out = torch.bmm(p, v3).view(B, H, Lq, D)")
            return f.case(v, "neg", sizes, ["q", "k", "v"])
        f.mask((f.ch(["B", 1]), 1))
        src(_softmax_line(f), f.ch(["p = p.view(B * H, Lq, Lk)", "p = p.reshape(-1, Lq, Lk)"]),
            f.ch(["out = torch.bmm(p, v3).view(B, H, Lq, D)", "out = (p @ v3).reshape(B, H, Lq, D)"]))
        return f.case(v, "pos", sizes, [n for n, _ in f.inputs], ("q", "k", "v", "bias", "alibi"))
    if v == "prob_view":  # 4-D scores, probabilities viewed to (B*H, Lq, Lk) for bmm; or 3-D scores viewed back
        if f.r.random() < 0.5:
            src("s = (q @ k.mT) * 0.37")
            f.mask((f.ch(["B", 1]), f.ch(["H", 1])))
            src(_softmax_line(f), "out = torch.bmm(p.view(B * H, Lq, Lk), v.reshape(B * H, Lk, D)).view(B, H, Lq, D)")
        else:
            src("s = (q @ k.mT).view(B * H, Lq, Lk) * 0.37", _softmax_line(f), "out = p.view(B, H, Lq, Lk) @ v")
        return f.case(v, "pos", sizes, [n for n, _ in f.inputs], ("q", "k", "v", "bias"))
    # unit_axes: unsqueeze / squeeze / flatten that move only size-1 axes
    src(f.ch(["s = (q.unsqueeze(2) @ k.unsqueeze(2).mT).squeeze(2) * 0.37",
              "s = (q @ k.mT * 0.37)[:, :, None].flatten(2, 3)", "s = (q @ k.mT * 0.37).unsqueeze(0).squeeze(0)"]))
    f.mask((f.ch(["B", 1]), 1))
    src(f.ch(["p = F.softmax(s.unsqueeze(1), dim=-1).squeeze(1)", "p = s.softmax(-1).unsqueeze(0).flatten(0, 1)",
              _softmax_line(f)]),
        f.ch(["out = (p.unsqueeze(2) @ v.unsqueeze(2)).squeeze(2)", "out = p @ v"]))
    return f.case(v, "pos", sizes, [n for n, _ in f.inputs], ("q", "k", "v", "bias"))


def _fam_einsum(f: _Fam) -> Case:
    """einsum with multi-query K/V (3-D, no heads axis), spaced and '...' spellings.  Twins: a 3-D K or V
    whose leading axis is the heads; negatives: the contraction over the queries."""
    v = f.ch(["mqa_v", "mqa_k", "mqa_kv", "ellipsis4", "v_heads", "k_heads", "pv_query", "qk_transposed"])
    sizes = f.sizes(Lk=7, Lq=7) if v in ("pv_query", "qk_transposed") else f.sizes()
    k3 = v in ("mqa_k", "mqa_kv", "qk_transposed")
    v3 = v in ("mqa_v", "mqa_kv", "pv_query")
    f.inputs += [("q", _randn("B", "H", "Lq", "D", scale="qk")),
                 ("k", _randn(*(("B", "Lk", "D") if k3 else ("H", "Lk", "D") if v == "k_heads" else
                                ("B", "H", "Lk", "D")), scale="qk")),
                 ("v", _randn(*(("B", "Lk", "D") if v3 else ("H", "Lk", "D") if v == "v_heads" else
                                ("B", "H", "Lk", "D"))))]

    def es(eq: str, a: str, b: str) -> str:
        if f.r.random() < 0.5:  # the spaced spelling: 'b h i d, b j d -> b h i j'
            def spaced(term: str) -> str:
                return " ".join((["..."] if term.startswith("...") else []) + list(term.removeprefix("...")))
            ins, out = eq.split("->")
            eq = ", ".join(spaced(t) for t in ins.split(",")) + " -> " + spaced(out)
        return f.ch([f"torch.einsum('{eq}', {a}, {b})", f"torch.einsum('{eq}', [{a}, {b}])",
                     f"torch.einsum('{eq}', ({a}, {b}))"])

    qk = {"mqa_k": f.ch(["bhid,bjd->bhij", "...hid,...jd->...hij"]), "mqa_kv": "bhid,bjd->bhij",
          "qk_transposed": "bhid,bjd->bhji", "k_heads": "bhid,hjd->bhij",
          "ellipsis4": "...id,...jd->...ij"}.get(v, f.ch(["bhid,bhjd->bhij", "...id,...jd->...ij"]))
    pv = {"mqa_v": f.ch(["bhij,bjd->bhid", "...hij,...jd->...hid"]), "mqa_kv": "bhij,bjd->bhid",
          "pv_query": "bhij,bid->bhjd", "v_heads": "bhij,hjd->bhid",
          "ellipsis4": "...ij,...jd->...id"}.get(v, f.ch(["bhij,bhjd->bhid", "...ij,...jd->...id"]))
    # a 3-D (H, L, D) K or V spelled with matmul broadcasts over the heads too, never over the batch
    mm = v in ("v_heads", "k_heads") and f.r.random() < 0.4
    f.src(f"s = {'q @ k.mT' if mm and v == 'k_heads' else es(qk, 'q', 'k')} * "
          f"{f.ch(['0.37', 'q.shape[-1] ** -0.5'])}")
    if v not in ("qk_transposed",):
        f.mask((f.ch(["B", 1]), 1))
    f.src(_softmax_line(f), f"out = {'p @ v' if mm and v == 'v_heads' else es(pv, 'p', 'v')}")
    expect = {"v_heads": "twin", "k_heads": "twin", "pv_query": "neg", "qk_transposed": "neg"}.get(v, "pos")
    return f.case(v, expect, sizes, [n for n, _ in f.inputs], ("q", "k", "v", "bias"))


def _fam_dead(f: _Fam) -> Case:
    """Intermediates with a second user that nothing reads (dead) or that is returned / used (negative)."""
    dead = f.ch(["s.clone()", "torch.cat([s, s])", "p.view(B * H, Lq, Lk)", "p.detach()", "s.max(-1).values",
                 "p.sum(-1)", "s.to(F32)"])
    used = f.r.random() < 0.35
    f.inputs += _QKV4
    f.src("B, H, Lq, D = q.shape", "Lk = k.shape[2]", "s = q @ k.mT * 0.37")
    early = dead.startswith(("s", "torch")) and f.r.random() < 0.5
    if early:
        f.src(f"x = {dead}")
    f.mask((f.ch(["B", 1]), 1))
    if dead.startswith(("s", "torch")) and not early:
        f.src(f"x = {dead}")
    f.src(_softmax_line(f))
    if dead.startswith("p"):
        f.src(f"x = {dead}")
    f.src("out = p @ v")
    how = f.ch(["return", "add"]) if used else "dead"
    if how == "return":
        f.src("return out, x")
    elif how == "add":
        f.src("out = out + x.mean()")
    f.tags["dead"] = f"x = {dead}" + ("" if how == "dead" else f" ({how})")
    return f.case(dead.split("(")[0].split(".")[-1] + ("_used" if used else ""), "neg" if used else "pos",
                  f.sizes(), [n for n, _ in f.inputs], ("q", "k", "v", "bias"))


def _fam_softmax(f: _Fam) -> Case:
    """Softmax by hand: exp(s - max) / sum, log_softmax(...).exp().  Negatives: max or sum over another axis,
    no max subtraction (overflows as eager does), a global max, log_softmax over the queries."""
    v = f.ch(["amax", "max_values", "max_detach", "log_softmax", "log_softmax", "max_axis", "sum_axis", "no_max",
              "no_max", "global_max", "log_softmax_axis"])
    f.inputs += _QKV4
    big = v == "no_max" and f.r.random() < 0.6
    f.src(f"s = q @ k.mT * {f.ch(['60.0', '12.0']) if big else '0.37'}")
    f.mask((f.ch(["B", 1]), 1), ("none", "bias", "fill", "causal"))
    up = f.r.random() < 0.3
    if up:
        f.src("s = s.to(F32)")
    m = {"amax": f.ch(["s.amax(-1, keepdim=True)", "torch.amax(s, dim=-1, keepdim=True)"]),
         "max_values": f.ch(["s.max(-1, keepdim=True).values", "torch.max(s, dim=-1, keepdim=True)[0]"]),
         "max_detach": f.ch(["s.amax(-1, keepdim=True).detach()", "s.max(dim=-1, keepdim=True).values.detach()"]),
         "max_axis": f.ch(["s.amax(-2, keepdim=True)", "s.amax(1, keepdim=True)"]), "global_max": "s.amax()",
         "sum_axis": "s.amax(-1, keepdim=True)"}.get(v)
    total = "-2" if v == "sum_axis" else "-1"
    if v.startswith("log_softmax"):
        dim = "-2" if v == "log_softmax_axis" else "-1"
        f.src(f.ch([f"p = F.log_softmax(s, {dim}).exp()", f"p = torch.exp(torch.log_softmax(s, dim={dim}))",
                    f"p = s.log_softmax({dim}).exp()"]))
    else:
        e = f"torch.exp(s - {m})" if m else "torch.exp(s)"
        f.src(f.ch([f"e = {e}\np = e / e.sum({total}, keepdim=True)",
                    f"p = {e} / {e}.sum({total}, keepdim=True)",
                    f"e = {e}\np = e.div(torch.sum(e, dim={total}, keepdim=True))"]))
    if up:
        f.src("p = p.to(q.dtype)")
    f.src("out = p @ v")
    expect = "pos" if v in ("amax", "max_values", "max_detach", "log_softmax") else "neg"
    return f.case(v, expect, f.sizes(), [n for n, _ in f.inputs], ("q", "k", "v", "bias"))


def _fam_scale(f: _Fam) -> Case:
    """Learned per-head temperatures (H,1,1) / (1,H,1,1) and scales applied after the mask.  Negatives: a
    tensor scale varying along the queries or keys, a negative scale after a fill."""
    v = f.ch(["temp", "temp", "temp_swinv2", "after_mask", "after_mask", "neg_scalar", "temp_varying",
              "neg_after_fill"])
    f.inputs += _QKV4
    src, sizes = f.src, f.sizes()
    if v != "temp_swinv2":
        src("s = q @ k.mT")
    if v.startswith("temp"):
        shape = {"temp_varying": f.ch([("H", "Lq", 1), (1, "H", 1, "Lk"), ("H", 1, "Lk"), ("Lq", 1)]),
                 "temp_swinv2": ("H", 1, 1)}.get(v, f.ch([("H", 1, 1), (1, "H", 1, 1)]))
        f.inp("temp", _pos(*shape, lo=1.5, hi=3.0) if v == "temp_swinv2" else _pos(*shape))  # swin: log scale
        if f.r.random() < 0.5 and v != "temp_varying":  # a module parameter: its H is the same in every call
            f.params.append("temp")
            sizes = f.sizes(H=f.ch([1, 2, 3]))
        t = "self.temp" if f.params else "temp"
        if v == "temp_swinv2":
            src("s = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)",
                f"s = s * torch.clamp({t}, max=math.log(100.0)).exp()")
        else:
            src(f.ch([f"s = s * {t}", f"s = {t} * s", f"s = s / {t}", f"s = torch.div(s, {t})"]))
        f.mask((f.ch(["B", 1]), 1))
        f.tags["temp"] = str(shape)
    elif v == "neg_scalar":
        src("s = s * -0.5")
        f.mask((f.ch(["B", 1]), 1))
    else:
        f.mask((f.ch(["B", 1]), 1), ("bias", "fill", "fill", "causal") if v == "after_mask" else ("fill",))
        c = f.ch(["-0.5", "-2.0"]) if v == "neg_after_fill" else f.ch(["0.125", "0.37", "2.0", "(D ** -0.5)"])
        if v == "after_mask":
            src("D = q.shape[-1]", f.ch([f"s = s * {c}", f"s = {c} * s"]))
        else:
            src(f"s = s * {c}")
        f.tags["scale"] = c
    src(_softmax_line(f), "out = p @ v")
    expect = "neg" if v in ("temp_varying", "neg_after_fill") else "pos"
    return f.case(v, expect, sizes, [n for n, _ in f.inputs if n not in f.params],
                  ("q", "k", "v", "bias", "temp"))


def _fam_5d(f: _Fam) -> Case:
    """More than two batch dims: grouped GQA (B, Hkv, g, L, L) scores, Swin windows (B, nW, H, w, w) with a
    per-window mask (plain 5-D or viewed from (B*nW, H, w, w)).  Negatives: softmax over a batch axis; twin:
    K/V broadcast along the group axis instead of the K/V heads."""
    v = f.ch(["grouped", "grouped", "windowed", "swin_view", "sm_group", "kv_on_groups"])
    src = f.src
    if v in ("windowed", "swin_view"):
        nw, w = f.ch([1, 2, 3]), f.ch([2, 3, 4])
        sizes = f.sizes(Lq=w, Lk=w, nW=nw)
        lead = ("BnW", "H") if v == "swin_view" else ("B", "nW", "H")

        def sizes_nw() -> dict[str, int]:
            d = sizes()
            d["BnW"] = d["B"] * nw
            return d
        f.inputs += [("q", _randn(*lead, "Lq", "D", scale="qk")), ("k", _randn(*lead, "Lk", "D", scale="qk")),
                     ("v", _randn(*lead, "Lk", "D")), ("rpb", _randn("H", "Lq", "Lk"))]
        swin = f.r.random() < 0.5
        f.inp("mask", (_swin if swin else _randn)("nW", "Lq", "Lk") if v == "swin_view" else
              (_swin if swin else _randn)(1, "nW", 1, "Lq", "Lk"))
        src("s = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)", "s = s + rpb.unsqueeze(0)")
        if v == "swin_view":
            src("nW, N = mask.shape[0], q.shape[-2]", "H = q.shape[1]",
                "s = s.view(-1, nW, H, N, N) + mask.unsqueeze(1).unsqueeze(0)", "s = s.view(-1, H, N, N)")
        else:
            src("s = s + mask")
        src(_softmax_line(f), "out = p @ v")
        return f.case(v, "pos", sizes_nw, [n for n, _ in f.inputs], ("q", "k", "v", "rpb", "mask"))
    hkv, g = f.ch([(1, 2), (2, 2), (2, 1), (1, 3)])
    sizes = f.sizes(H=hkv * g, Hkv=hkv, g=g)
    direct = f.r.random() < 0.5
    f.inputs += [("q", _randn(*(("B", "Hkv", "g", "Lq", "D") if direct else ("B", "H", "Lq", "D")), scale="qk")),
                 ("k", _randn(*(("B", "Hkv", 1, "Lk", "D") if direct else ("B", "Hkv", "Lk", "D")), scale="qk")),
                 ("v", _randn(*(("B", "Hkv", 1, "Lk", "D") if direct else ("B", "Hkv", "Lk", "D"))))]
    if not direct:
        src("B, H, Lq, D = q.shape", f"q = q.view(B, {hkv}, {g}, Lq, D)",
            "k, v = k.unsqueeze(1), v.unsqueeze(1)" if v == "kv_on_groups" else "k, v = k.unsqueeze(2), v.unsqueeze(2)")
    elif v == "kv_on_groups":
        src("k, v = k.transpose(1, 2), v.transpose(1, 2)")
    if v == "kv_on_groups" and hkv != g and hkv != 1:
        v = "grouped"  # not a broadcast eager accepts
        src("k, v = k.transpose(1, 2), v.transpose(1, 2)")
    src(f"s = q @ k.transpose(-2, -1) * {f.ch(['0.37', 'q.shape[-1] ** -0.5'])}")
    f.mask((f.ch(["B", 1]), 1, 1))
    src("p = s.softmax(2)" if v == "sm_group" else f.ch([_softmax_line(f), "p = F.softmax(s, dim=4)"]),
        "out = p @ v")
    if not direct and f.r.random() < 0.5:
        src("out = out.reshape(B, H, Lq, D)")
    expect = {"sm_group": "neg", "kv_on_groups": "twin"}.get(v, "pos")
    return f.case(v, expect, sizes, [n for n, _ in f.inputs], ("q", "k", "v", "bias"))


def _fam_local(f: _Fam) -> Case:
    """Local attention by hand: zero-padded K/V unfolded into per-query windows, and local-attention's bucketed
    look-around (positions padded with -1 mask the pad slots).  Twins (exact only as the plain attention they
    spell): pads that are not zero or not masked, an unfold step of 2."""
    v = f.ch(["unfold", "unfold", "unfold_masked", "buckets", "buckets", "pad_value", "step2", "buckets_unmasked"])
    src = f.src
    f.inputs += _QKV4
    if v.startswith("buckets"):
        ws, back, fwd = f.ch([2, 3, 4]), 1, f.ch([0, 1])
        causal = fwd == 0 and f.r.random() < 0.7
        n = back + fwd + 1

        def sizes() -> dict[str, int]:
            d = f.sizes()()
            d["Lq"] = d["Lk"] = ws * f.ch([1, 2, 3])
            return d
        src("B, H, N, D = q.shape", f"nb = N // {ws}", f"bq = q.reshape(B * H, nb, {ws}, D)",
            f"bk, bv = k.reshape(B * H, nb, {ws}, D), v.reshape(B * H, nb, {ws}, D)",
            f"t = torch.arange(N, device=q.device).reshape(1, nb, {ws})")
        pad = f"(0, 0, 0, 0, {back}, {fwd})"
        if f.r.random() < 0.5:  # look_around by slices + cat
            src(f"bk = torch.cat([F.pad(bk, {pad}, value=-1.0)[:, i:i + nb] for i in range({n})], dim=2)",
                f"bv = torch.cat([F.pad(bv, {pad}, value=-1.0)[:, i:i + nb] for i in range({n})], dim=2)",
                f"tk = torch.cat([F.pad(t, (0, 0, {back}, {fwd}), value=-1)[:, i:i + nb] for i in range({n})], dim=2)")
        else:  # by unfold over the bucket axis
            look = f".unfold(1, {n}, 1).permute(0, 1, 4, 2, 3).reshape(B * H, nb, {n * ws}, D)"
            src(f"bk = F.pad(bk, {pad}, value=-1.0){look}", f"bv = F.pad(bv, {pad}, value=-1.0){look}",
                f"tk = F.pad(t, (0, 0, {back}, {fwd}), value=-1).unfold(1, {n}, 1).transpose(-2, -1)"
                f".reshape(1, nb, {n * ws})")
        src(f"s = torch.einsum('b h i e, b h j e -> b h i j', bq, bk) * {f.ch(['D ** -0.5', '0.37'])}",
            "mask_value = -torch.finfo(s.dtype).max")
        if causal:
            src("s = s.masked_fill(t[..., :, None] < tk[..., None, :], mask_value)")
            if f.r.random() < 0.5:  # exact_windowsize
                src(f"s = s.masked_fill(t[..., :, None] > tk[..., None, :] + {ws * back}, mask_value)")
        if v == "buckets":
            src("s = s.masked_fill((tk == -1)[..., None, :], mask_value)")
        src("p = s.softmax(dim=-1)", "out = torch.einsum('b h i j, b h j e -> b h i e', p, bv).reshape(B, H, N, D)")
        f.tags["local"] = f"w={ws} back={back} fwd={fwd} causal={causal}"
        return f.case(v, "pos" if v == "buckets" else "twin", sizes, ["q", "k", "v"])
    wl, wr = f.ch([(1, 0), (2, 0), (1, 1), (2, 1), (0, 2), (3, 3)])
    w, step = wl + wr + 1, 2 if v == "step2" else 1

    def sizes() -> dict[str, int]:
        d = f.sizes()()
        d["Lk"] = d["Lq"]
        return d
    val = ", value=1.0" if v == "pad_value" else ""
    src("B, H, L, D = q.shape", f"kp, vp = F.pad(k, (0, 0, {wl}, {wr}){val}), F.pad(v, (0, 0, {wl}, {wr}){val})",
        f"vw = vp.unfold(2, {w}, {step}).transpose(-2, -1)")
    if step > 1:
        src("q = q[:, :, ::2]")
    src(f.ch([f"s = q.unsqueeze(3) @ kp.unfold(2, {w}, {step})",
              f"kw = kp.unfold(2, {w}, {step}).transpose(-2, -1)\ns = q.unsqueeze(3) @ kw.transpose(-2, -1)"]),
        "s = s * 0.37")
    if v == "unfold_masked":
        src(f"pos = torch.arange(L + {wl + wr}, device=q.device).unfold(0, {w}, 1)",
            f"s = s.masked_fill(((pos < {wl}) | (pos >= L + {wl}))[:, None, :], {f.fill()})")
    src(_softmax_line(f), "out = (p @ vw).squeeze(3)")
    f.tags["local"] = f"wl={wl} wr={wr} step={step}"
    return f.case(v, "twin" if v in ("pad_value", "step2") else "pos", sizes, ["q", "k", "v"])


# family -> (generator, weight); "core" is `_generate_core`.  A seed's family is drawn from its own stream, so a
# core seed replays the same program it always did.
FAMILIES: dict[str, tuple[Callable[[_Fam], Case] | None, float]] = {
    "core": (None, 60.0), "views": (_fam_views, 6.0), "einsum": (_fam_einsum, 5.0), "dead": (_fam_dead, 5.0),
    "softmax": (_fam_softmax, 6.0), "scale": (_fam_scale, 6.0), "5d": (_fam_5d, 5.0), "local": (_fam_local, 7.0),
}


def family_of(seed: int) -> str:
    names = list(FAMILIES)
    return random.Random(seed * 7919 + 17).choices(names, weights=[FAMILIES[n][1] for n in names])[0]


def generate(seed: int, inductor_rate: float = 0.0) -> Case:
    family = family_of(seed)
    gen = FAMILIES[family][0]
    return _generate_core(seed, inductor_rate) if gen is None else gen(_Fam(seed, family, inductor_rate))


# ---------------------------------------------------------------------------------------------------------------
# running and classifying


def _namespace(dtype: torch.dtype, ref: bool) -> dict[str, Any]:
    return {"torch": torch, "F": F, "math": math, "MIN": torch.finfo(dtype).min,
            "F32": torch.float64 if ref else torch.float32}


def _instantiate(case: Case, ref: bool, buffers: dict[str, torch.Tensor],
                 params: dict[str, torch.Tensor] | None = None) -> Callable:
    ns = _namespace(case.dtype, ref)
    exec(compile(case.src, f"<fuzz case {case.seed}>", "exec"), ns)  # noqa: S102 - our own generated source
    if "M" not in ns:
        return ns["f"]
    mod = ns["M"]()
    for name, t in buffers.items():
        mod.register_buffer(name, t)
    for name, t in (params or {}).items():
        mod.register_parameter(name, torch.nn.Parameter(t.detach(), requires_grad=t.requires_grad))
    return mod


def _flat(out: Any) -> list[Any]:
    return list(out) if isinstance(out, tuple | list) else [out]


def _tol_check(ours: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, what: str) -> str | None:
    """None if ``ours`` meets the 2x rule against ``eager`` and ``ref``; else what is wrong."""
    if not isinstance(eager, torch.Tensor):
        return None if ours == eager else f"{what}: {ours!r} != eager {eager!r}"
    if ours is None or ours.shape != eager.shape or ours.dtype != eager.dtype:
        return f"{what}: got {None if ours is None else (tuple(ours.shape), ours.dtype)}, " \
               f"eager {(tuple(eager.shape), eager.dtype)}"
    if not eager.is_floating_point():
        return None if torch.equal(ours, eager) else f"{what}: differs from eager (exact)"
    o, e, r = ours.detach().double(), eager.detach().double(), ref.detach().double()
    if not torch.equal(o.isnan(), e.isnan()):
        return (f"{what}: NaN pattern differs from eager ({int(o.isnan().sum())} NaN, eager "
                f"{int(e.isnan().sum())})")
    inf = e.isinf()
    if not torch.equal(o.isinf(), inf) or not torch.equal(o[inf], e[inf]):
        return f"{what}: inf pattern differs from eager"
    judged = torch.isfinite(e) & torch.isfinite(r)
    err_o = (o - r)[judged].abs().max().item() if judged.any() else 0.0
    err_e = (e - r)[judged].abs().max().item() if judged.any() else 0.0
    scale = r[judged].abs().max().item() if judged.any() else 1.0
    tol = 2 * err_e + 4 * torch.finfo(eager.dtype).eps * max(scale, 1e-3)
    if err_o > tol:
        return f"{what}: error {err_o:.3g} > 2 x eager error {err_e:.3g} (+floor)"
    unjudged = torch.isfinite(e) & ~torch.isfinite(r)
    if unjudged.any() and (o - e)[unjudged].abs().max().item() > tol:
        return f"{what}: off eager by {(o - e)[unjudged].abs().max().item():.3g} where float64 overflows"
    return None


@dataclasses.dataclass
class Outcome:
    case: Case
    cls: str
    detail: str = ""
    fused: int = 0
    sites: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def _build_inputs(case: Case, call: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(case.seed * 1009 + call)
    return {name: build(gen, case.dims[call], case.dtype) for name, build in case.inputs}


def _copies(base: dict[str, torch.Tensor], case: Case, ref: bool) -> dict[str, torch.Tensor]:
    out = {}
    for n, t in base.items():
        t = t.detach().clone()
        if ref and t.is_floating_point():
            t = t.double()
        out[n] = t.requires_grad_(n in case.grad)
    return out


def _run(case: Case, mode: str, backend: str = "attnfuse",
         reports: list[Any] | None = None) -> tuple[list[dict[str, Any]], list[Any]]:
    """Run ``case`` (every call) eagerly ("eager"), in float64 ("ref"), or compiled ("compiled").

    Returns one record per call (outputs, mutated state, gradients) and the reports attnfuse published
    (appended to ``reports`` as they appear, so a caller still has them when a later step raises).
    """
    ref = mode == "ref"
    base0 = _build_inputs(case, 0)
    buffers = {n: _copies({n: base0[n]}, case, ref)[n] for n in case.buffers}
    fn = mod = _instantiate(case, ref, buffers, {n: _copies({n: base0[n]}, case, ref)[n] for n in case.params})
    if mode == "compiled":
        opts = {"backend": backend, "dynamic": case.dynamic if case.dynamic != "mark" else None}
        if backend == "attnfuse":
            opts["options"] = {"inner": case.inner, "kernels": case.kernels}
        fn = torch.compile(fn, **opts)
    records: list[dict[str, Any]] = []
    reports = [] if reports is None else reports
    gen_grad = torch.Generator().manual_seed(case.seed * 31 + 7)
    for call in range(len(case.dims)):
        base = base0 if call == 0 else _build_inputs(case, call)
        vals = _copies(base, case, ref)
        args = [vals[n] for n, _ in case.inputs if n not in case.buffers and n not in case.params]
        if mode == "compiled" and case.dynamic == "mark":
            for n in ("q", "k", "v"):
                t = vals[n]
                for dim_i in range(t.dim()):
                    if t.shape[dim_i] in (case.dims[call]["Lq"], case.dims[call]["Lk"]) and t.shape[dim_i] > 1:
                        torch._dynamo.maybe_mark_dynamic(t, dim_i)
        before = attnfuse.last_report()
        try:
            out = _flat(fn(*args))
        finally:
            rep = attnfuse.last_report()
            if mode == "compiled" and rep is not None and rep is not before:
                reports.append(rep)
        state = {n: (getattr(fn, n) if n in case.buffers else vals[n]).detach().clone() for n in case.mutated}
        grads = {}
        diff = [o for o in out if isinstance(o, torch.Tensor) and o.requires_grad]
        if case.grad and diff:
            cot = [torch.randn(o.shape, generator=gen_grad) for o in diff]
            sum((o * c.to(o.dtype)).sum() for o, c in zip(diff, cot)).backward()
            grads = {n: vals[n].grad for n in case.grad if n not in case.params}
            for n in case.params:  # read, then cleared: the next call's gradient starts from zero
                grads[n], getattr(mod, n).grad = getattr(mod, n).grad, None
        records.append({"out": [o.detach() if isinstance(o, torch.Tensor) else o for o in out],
                        "state": state, "grads": grads})
    return records, reports


def _compare(ours: list[dict[str, Any]], eager: list[dict[str, Any]], ref: list[dict[str, Any]]) -> str | None:
    for call, (o, e, r) in enumerate(zip(ours, eager, ref)):
        if len(o["out"]) != len(e["out"]):
            return f"call {call}: {len(o['out'])} outputs, eager {len(e['out'])}"
        for i, (a, b) in enumerate(zip(o["out"], e["out"])):
            if isinstance(a, torch.Tensor) and _layout(a) != _layout(b):  # a consumer may view it (DESIGN: layout)
                return f"call {call} output {i}: strides {a.stride()}, eager {b.stride()}"
        checks = [(f"call {call} output {i}", a, b, c) for i, (a, b, c) in enumerate(zip(o["out"], e["out"], r["out"]))]
        checks += [(f"call {call} state of {n}", o["state"][n], e["state"][n], r["state"][n]) for n in e["state"]]
        checks += [(f"call {call} grad of {n}", o["grads"].get(n), e["grads"][n], r["grads"][n]) for n in e["grads"]
                   if e["grads"][n] is not None]
        for what, a, b, c in checks:
            msg = _tol_check(a, b, c, what)
            if msg:
                return msg
    return None


def _layout(t: torch.Tensor) -> tuple:
    """The strides that matter: those of the dims longer than 1."""
    return tuple((d, st) for d, (n, st) in enumerate(zip(t.shape, t.stride())) if n > 1)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return " | ".join(line for line in text[:3])[:400]


def run_case(case: Case) -> Outcome:
    t0 = time.perf_counter()
    try:
        eager, _ = _run(case, "eager")
        ref, _ = _run(case, "ref")
    except Exception as exc:  # noqa: BLE001 - the generator wrote a program eager rejects
        return Outcome(case, "invalid", _short(exc), seconds=time.perf_counter() - t0)
    reports: list[Any] = []
    try:
        ours, _ = _run(case, "compiled", reports=reports)
        err = _compare(ours, eager, ref)
        cls = "wrong" if err else None
    except Exception as exc:  # noqa: BLE001
        err, cls = _short(exc), "crash"
    fused = sum(len(rep.fused) for rep in reports)
    sites = sum(len(rep.sites) for rep in reports)
    notes = [n for rep in reports for n in rep.notes]
    if case.expect == "neg" and fused:  # reported fused: the worst news, whether or not the numbers agree
        what = "; ".join(f"site {s.id}: {s.pattern} mask={s.mask.get('kind')}" for rep in reports for s in rep.fused)
        cls, err = "negative-fused", what + (f" ({err})" if err else " (numbers agree)")
    elif cls is None:
        cls = "uncompiled" if not reports else "fused-equal" if fused else "skipped-equal"
    else:  # is it PyTorch's own failure?  the same program through stock aot_eager
        try:
            stock, _ = _run(case, "compiled", backend="aot_eager")
            stock_err = _compare(stock, eager, ref)
        except Exception as exc:  # noqa: BLE001
            stock_err = _short(exc)
        if stock_err:
            cls = "torch-" + cls
            err = f"{err} (stock aot_eager too: {stock_err})"
    return Outcome(case, cls, err or "", fused, sites, notes, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------------------
# driving many cases


def fuzz(seeds: range | list[int], *, inductor_rate: float = 0.0, progress: bool = False, reset_every: int = 1,
         log: Callable[[str], None] | None = None) -> tuple[Counter, list[Outcome], float, Counter]:
    """Run every seed's case.  Returns the counts per class, the failures (and invalid / uncompiled cases), the
    wall time, and the counts per spelling: ``(family, variant, expect, class) -> n`` (see `table`)."""
    _ensure_backend()
    counts: Counter = Counter()
    spellings: Counter = Counter()
    failures: list[Outcome] = []
    t0 = time.perf_counter()
    it: Any = seeds
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = it = tqdm(seeds, unit="case", dynamic_ncols=True)
        except ImportError:  # tqdm is not a declared test dependency: fall back to a line every 100 cases
            progress = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, seed in enumerate(it):
            if i and i % reset_every == 0:
                torch._dynamo.reset()
            case = generate(seed, inductor_rate)
            out = run_case(case)
            counts[out.cls] += 1
            spellings[case.family, case.variant, case.expect, out.cls] += 1
            if any("raised" in n for n in out.notes):
                counts["(pass fell back)"] += 1
            if out.cls in FAILURES or out.cls in ("invalid", "uncompiled"):
                failures.append(out)
                if log:
                    log(reproducer(out))
            if bar is not None:
                bar.set_postfix({k: counts[k] for k in ("wrong", "crash", "negative-fused") if counts[k]})
            elif log and (i + 1) % 100 == 0:
                log(f"{i + 1} cases, {time.perf_counter() - t0:.0f} s: {dict(counts)}")
    torch._dynamo.reset()
    return counts, failures, time.perf_counter() - t0, spellings


def table(counts: Counter, seconds: float, spellings: Counter | None = None, variants: bool = False) -> str:
    """The counts per class; with ``spellings`` (from `fuzz`), a row per generator family (and per variant with
    ``variants``): how many of its positives and twins attnfuse fused or skipped, its negatives skipped, and its
    failures (wrong, crash, negative-fused) -- the matcher's reach on each spelling."""
    total = sum(counts[c] for c in CLASSES)
    rows = [f"{c:<17} {counts[c]:>6}" for c in (*CLASSES, "(pass fell back)") if counts[c] or c in FAILURES]
    lines = [f"attnfuse fuzz: {total} cases in {seconds:.1f} s", *rows]
    if spellings:
        lines += ["", f"{'spelling':<24}{'cases':>6}{'pos fused/skip':>16}{'twin fused/skip':>17}{'neg skip':>10}"
                      f"{'bad':>5}{'other':>7}"]
        for fam in FAMILIES:
            keys = sorted({v for f, v, _, _ in spellings if f == fam})
            if keys:
                lines.append(_spelling_row(fam, spellings, lambda f, v, fam=fam: f == fam))
            for var in keys if variants else []:
                lines.append(_spelling_row("  " + var, spellings, lambda f, v, fam=fam, var=var: (f, v) == (fam, var)))
    return "\n".join(lines)


def _spelling_row(label: str, spellings: Counter, pick: Callable[[str, str], bool]) -> str:
    n = Counter()
    for (fam, var, expect, cls), k in spellings.items():
        if pick(fam, var):
            n["cases"] += k
            n[expect, cls] += k
            n["bad" if cls in FAILURES else "other" if cls not in ("fused-equal", "skipped-equal") else ""] += k

    def pair(expect: str) -> str:
        return f"{n[expect, 'fused-equal']}/{n[expect, 'skipped-equal']}" if n[expect, "fused-equal"] + n[
            expect, "skipped-equal"] else "-"
    return (f"{label:<24}{n['cases']:>6}{pair('pos'):>16}{pair('twin'):>17}{n['neg', 'skipped-equal']:>10}"
            f"{n['bad']:>5}{n['other']:>7}")


def reproducer(out: Outcome) -> str:
    c = out.case
    return (f"--- {out.cls}: {out.detail}\n  {c.describe()}\n  fused {out.fused} of {out.sites} sites"
            + (f"; notes: {out.notes}" if out.notes else "")
            + f"\n  replay: python tests/passes/_fuzz.py --seed {c.seed}" + (" --inductor" if c.inner == "inductor"
                                                                             else "")
            + "\n" + "\n".join("    " + line for line in c.src.splitlines()))


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", action="store_true", help="5,000 cases with a progress bar")
    ap.add_argument("-n", type=int, default=None, help="number of cases (default 300, --long 5,000)")
    ap.add_argument("--start", type=int, default=0, help="first seed")
    ap.add_argument("--seed", type=int, action="append", help="replay one case (repeatable); prints details")
    ap.add_argument("--inductor", action="store_true", help="with --seed: run the case with the inner Inductor")
    ap.add_argument("--inductor-rate", type=float, default=None, help="fraction of cases with inner Inductor")
    ap.add_argument("--family", action="append", choices=list(FAMILIES),
                    help="only the seeds of this generator family (repeatable): the first N such seeds from --start")
    a = ap.parse_args(argv)
    # as tests/conftest.py does: a private Inductor cache, never code compiled against an older fake op
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="attnfuse-fuzz-inductor-"))
    _ensure_backend()
    if a.seed:
        bad = 0
        for s in a.seed:
            case = generate(s, 1.0 if a.inductor else 0.0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = run_case(case)
            print(reproducer(out).replace("--- ", f"--- [{out.cls}] ", 1) if out.cls not in FAILURES else
                  reproducer(out))
            if out.cls in FAILURES:
                bad += 1
                try:
                    _run(case, "compiled")
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
        return 1 if bad else 0
    n = a.n if a.n is not None else 5000 if a.long else 300
    rate = a.inductor_rate if a.inductor_rate is not None else (0.03 if a.long else 0.0)
    seeds: range | list[int] = range(a.start, a.start + n)
    if a.family:
        seeds = list(itertools.islice((s for s in itertools.count(a.start) if family_of(s) in a.family), n))
    counts, failures, secs, spellings = fuzz(seeds, inductor_rate=rate, progress=a.long,
                                             log=None if a.long else print)
    if a.long:
        for f in failures:
            print(reproducer(f))
    print(table(counts, secs, spellings, variants=True))
    return 1 if any(counts[c] for c in FAILURES) else 0


if __name__ == "__main__":
    sys.exit(main())
