"""`attnfuse.parallel.ulysses` (and `attention`, the dispatcher rewritten graphs call) on 2 and 4 gloo processes:
every rank's output rows and dq/dk/dv, put back in global order, against an unsharded float64 attention written
here with plain torch ops and the same attention in eager PyTorch at the inputs' dtype (the 2x rule), for both
layouts, causal / window / key-padding masks, GQA with and without K/V head repeats and the SDPA convention;
`torch.compile` through `attention`; and `choose`'s strategy choice."""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import pytest
import torch
import torch.distributed as dist

import attnfuse.parallel as par
from tests._util import assert_2x, band
from tests.parallel._dist import run


@dataclasses.dataclass(frozen=True)
class Case:
    layout: str = "contiguous"
    dtype: torch.dtype = torch.float32
    heads: int = 4
    kv_heads: int = 4
    mask: str = "none"  # none | causal | window | pad_bool | pad_float_causal | sdpa_causal | sdpa_window
    softcap: float = 0.0
    length: int = 40
    head_dim: int = 40


def _settings(case: Case) -> dict:
    causal = case.mask in ("causal", "pad_float_causal", "sdpa_causal")
    left, right = (5, 0) if case.mask in ("window", "sdpa_window") else (-1, -1)
    return {"causal": causal, "window_left": left, "window_right": right, "softcap": case.softcap,
            "kv_groups": case.heads // case.kv_heads, "sdpa_form": case.mask.startswith("sdpa")}


def _key_mask(case: Case, batch: int) -> torch.Tensor | None:
    """(B, 1, 1, L) global key mask: bool keeps (True = attend) or a finfo.min additive bias."""
    length = case.length
    keep = torch.ones(batch, length, dtype=torch.bool)
    if case.mask == "pad_bool":  # no causal band: every row keeps some key
        keep[0, length - 7:] = False
        keep[1, :3] = False
    elif case.mask in ("pad_float_causal", "sdpa_causal", "sdpa_window"):  # leading keys: rows that see no key
        keep[0, :4] = False
        keep[1, length - 9:] = False
    else:
        return None
    keep = keep[:, None, None, :]
    if case.mask == "pad_float_causal":
        return torch.zeros(keep.shape, dtype=case.dtype).masked_fill(~keep, torch.finfo(case.dtype).min)
    return keep


def textbook(q, k, v, mask, *, scale, causal, window_left, window_right, softcap, kv_groups, sdpa_form):
    """Attention over the whole sequence with plain torch ops, in the inputs' dtype.  ``sdpa_form``: a row whose
    every key is masked (bool mask or band) is 0, with no gradient (SDPA's convention)."""
    k, v = k.repeat_interleave(kv_groups, 1), v.repeat_interleave(kv_groups, 1)
    s = q @ k.transpose(-2, -1) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.to(s.dtype)
    keep = band(q.shape[-2], k.shape[-2], window_left, window_right, causal)
    s = s.masked_fill(~keep, -math.inf)
    if sdpa_form:
        seen = keep & (mask if mask is not None and mask.dtype == torch.bool else True)
        dead = ~seen.any(-1, keepdim=True)
        return torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0) @ v
    return torch.softmax(s, -1) @ v


def _gather(x: torch.Tensor, cp) -> torch.Tensor:
    """Every rank's rows of ``x`` (dim 2), in global order, as float64."""
    chunks = [torch.empty_like(x, dtype=torch.float64) for _ in range(cp.ranks)]
    dist.all_gather(chunks, x.detach().double().contiguous())
    return par.unshard(chunks, 2, cp)


def _inputs(case: Case, seed: int):
    gen = torch.Generator().manual_seed(seed)
    b, length, d = 2, case.length, case.head_dim

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(case.dtype)

    q, k, v = rand(b, case.heads, length, d), rand(b, case.kv_heads, length, d), rand(b, case.kv_heads, length, d)
    return q, k, v, rand(b, case.heads, length, d), _key_mask(case, b)


def _run_case(case: Case, seed: int, cp, fn) -> dict[str, torch.Tensor]:
    """Check ``fn`` (ulysses' signature) on this case: out and grads against eager and float64, 2x rule."""
    q, k, v, grad, mask = _inputs(case, seed)
    kw = _settings(case)
    scale = 1 / math.sqrt(case.head_dim)
    local = [par.shard(x, 2, cp).requires_grad_() for x in (q, k, v)]
    local_mask = None if mask is None else par.shard(mask, 3, cp)
    out = fn(*local, local_mask, cp=cp, scale=scale, **kw)
    out.backward(par.shard(grad, 2, cp))
    ours = [_gather(t, cp) for t in (out, *(x.grad for x in local))]

    results = []
    for dtype in (case.dtype, torch.float64):
        xs = [x.detach().to(dtype, copy=True).requires_grad_() for x in (q, k, v)]
        m = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
        o = textbook(*xs, m, scale=scale, **kw)
        o.backward(grad.to(dtype))
        results.append([o, *(x.grad for x in xs)])
    eager, ref = results
    for name, a, e, r in zip(("out", "dq", "dk", "dv"), ours, eager, ref):
        assert_2x(a.to(case.dtype), e.detach(), r.detach(), f"{case} {name} (rank {cp.rank()})")
    return dict(zip(("out", "dq", "dk", "dv"), ours))


_F32, _BF16 = torch.float32, torch.bfloat16
_MASKS_2 = (("none", 4, 4), ("causal", 4, 2), ("window", 8, 2), ("pad_bool", 4, 4), ("pad_float_causal", 4, 2),
            ("sdpa_causal", 4, 4), ("sdpa_window", 4, 2))
# every mask in both layouts and both dtypes (the dtype swaps with the layout from one mask to the next)
CASES_2 = [Case(layout, (_F32, _BF16)[(i + j) % 2], heads, kv, mask)
           for i, (mask, heads, kv) in enumerate(_MASKS_2) for j, layout in enumerate(("contiguous", "zigzag"))]
CASES_2 += [Case("zigzag", _BF16, 4, 2, "causal"), Case("contiguous", _BF16, 4, 2, "pad_float_causal"),
            Case("zigzag", _F32, 4, 2, "causal", softcap=20.0), Case("contiguous", length=24, head_dim=8)]
CASES_4 = [Case("contiguous", _F32, 4, 2, "causal"), Case("zigzag", _BF16, 4, 1, "window"),
           Case("zigzag", _F32, 8, 1, "pad_float_causal"), Case("contiguous", _F32, 4, 4, "none"),
           Case("zigzag", _BF16, 4, 2, "sdpa_causal"), Case("contiguous", _F32, 4, 1, "pad_bool"),
           Case("zigzag", _F32, 4, 2, "causal")]


def _many(rank: int, ranks: int, cases: list[Case]) -> None:
    group = dist.group.WORLD
    for i, case in enumerate(cases):
        cp = par.from_option({"group": group, "layout": case.layout})
        _run_case(case, 1000 + i, cp, par.ulysses)


@pytest.mark.parametrize("ranks, cases", [(2, CASES_2), (4, CASES_4)], ids=["2ranks", "4ranks"])
def test_ulysses_matches_unsharded_attention(ranks, cases):
    run(_many, ranks, cases, timeout=600)


def _dispatched(rank: int, ranks: int) -> None:
    cp = par.from_option({"group": dist.group.WORLD, "layout": "zigzag", "strategy": "ulysses"})
    enc = par.encode(cp)

    def through(strategy):
        def fn(q, k, v, mask, *, cp, **kw):
            return par.attention(q, k, v, mask, cp=enc, strategy=strategy, **kw)
        return fn

    case = Case("zigzag", torch.float32, 4, 2, "pad_float_causal")
    direct = _run_case(case, 7, cp, par.ulysses)
    via = _run_case(case, 7, cp, through("ulysses"))
    for name in direct:
        assert torch.equal(direct[name], via[name]), name

    # the op form traces whole; the SDPA form's `attnfuse.ops.attention_sdpa` asks for the dispatch mode, which
    # dynamo breaks the graph at (a rewritten graph reaches it through AOTAutograd, after dynamo)
    whole = torch.compile(through("ulysses"), backend="aot_eager", fullgraph=True, dynamic=True)
    split = torch.compile(through("ulysses"), backend="aot_eager")
    sdpa = Case("zigzag", torch.float32, 4, 4, "sdpa_window")
    shorter = dataclasses.replace(case, length=24)  # dynamic lengths: the same graph
    for seed, each, compiled in ((8, case, whole), (11, shorter, whole), (9, sdpa, split)):
        got, want = _run_case(each, seed, cp, compiled), _run_case(each, seed, cp, par.ulysses)
        for name in got:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)

    if importlib.util.find_spec("attnfuse.parallel._ring") is not None:
        _run_case(case, 10, cp, through("ring"))
    try:
        par.attention(*(torch.randn(1, 4, 4, 8) for _ in range(3)), cp=enc, strategy="tree", scale=1.0)
    except ValueError as e:
        assert "attnfuse" in str(e) and "'ring'" in str(e)
    else:
        raise AssertionError("an unknown strategy was accepted")


def test_attention_dispatches_and_compiles():
    run(_dispatched, 2, timeout=600)


def test_ulysses_needs_heads_divisible_by_ranks():
    cp = par.ContextParallel("unused", 4)
    q, k, v = torch.randn(1, 6, 8, 8), torch.randn(1, 6, 8, 8), torch.randn(1, 6, 8, 8)
    with pytest.raises(ValueError, match=r"attnfuse .*6 heads do not split over 4 ranks"):
        par.ulysses(q, k, v, cp=cp, scale=1.0)
    with pytest.raises(ValueError, match="attnfuse"):
        par.ulysses(q, k[:, :4], v[:, :4], cp=cp, scale=1.0, kv_groups=2)
    assert [par.kv_repeat(kv, 4) for kv in (1, 2, 4, 8, 6)] == [4, 2, 1, 1, 2]


SHAPE = {"batch": 1, "heads": 8, "kv_heads": 8, "head_dim": 64, "v_head_dim": 64, "elem": 2, "causal": False}


def test_choose_forced_and_indivisible():
    auto, uly, ring = (par.ContextParallel("g", 2, s) for s in ("auto", "ulysses", "ring"))
    assert par.choose(ring, **SHAPE, local_len=16, device_type="cpu")[0] == "ring"
    strategy, why = par.choose(uly, **SHAPE, local_len=2**16, device_type="cpu")
    assert strategy == "ulysses" and "asks for it" in why
    odd = {**SHAPE, "heads": 3, "kv_heads": 1}
    strategy, why = par.choose(uly, **odd, local_len=16, device_type="cpu")
    assert strategy == "ring" and "3 heads do not split over 2 ranks" in why and "'ulysses'" in why
    assert par.choose(auto, **odd, local_len=16, device_type="cpu")[0] == "ring"


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_choose_auto_flips_with_length(device_type):
    """Short sequences are communication-bound (Ulysses moves less), long ones compute-bound (the ring hides its
    sends); the reason quotes both estimates."""
    cp = par.ContextParallel("g", 4)
    short, why = par.choose(cp, **SHAPE, local_len=8, device_type=device_type)
    long, why_long = par.choose(cp, **SHAPE, local_len=2**15, device_type=device_type)
    assert (short, long) == ("ulysses", "ring"), (why, why_long)
    assert why.startswith("ulysses: 8 heads over 4 ranks; estimated") and "vs ring" in why
    t = par.estimate(ranks=4, **SHAPE, local_len=8, device_type=device_type)
    assert t["ulysses"] < t["ring"]
    causal = par.estimate(ranks=4, **{**SHAPE, "causal": True}, local_len=2**15, device_type=device_type)
    full = par.estimate(ranks=4, **SHAPE, local_len=2**15, device_type=device_type)
    assert causal["ring"] < full["ring"]
