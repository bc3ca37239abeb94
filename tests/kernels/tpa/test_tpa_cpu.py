"""The ``tpa`` family's CPU path (`attnfuse.kernels.tpa._cpu`) against the float64 textbook over the formed tensors
(`attnfuse.kernels.tpa.reference`), forward and backward, with the 2x rule and eager's NaN pattern.

Small key blocks (so several blocks are formed, merged and, under a band, skipped) and small decode splits; odd
lengths, head dim 40, ranks 1, 2 and 5; q plain or factorized; K/V factorized or only K; GQA; causal, window,
key padding (bool with -inf and finfo.min fills, additive bias), softcap, a fully padded batch row (NaN rows),
``sdpa_form``; the decode path (few query rows against a factor cache) and the blocked path on the same inputs.
"""

from __future__ import annotations

import pytest
import torch

from attnfuse.kernels import tpa
from attnfuse.kernels.tpa import Factors
from attnfuse.kernels.tpa import _cpu as tpa_cpu
from tests._util import assert_2x
from tests.kernels._helpers import seed_case

B, H, D = 2, 4, 40


def _factors(length: int, heads: int, rank: int, dtype: torch.dtype) -> Factors:
    a = torch.randn(B, length, heads, rank, dtype=dtype)
    b = torch.randn(B, length, rank, D, dtype=dtype) * 0.5
    return Factors(a, b, 1.0 / rank)


def _key_mask(kind: str, lk: int, dtype: torch.dtype):
    if kind == "none":
        return None, None
    keep = torch.rand(B, 1, 1, lk) > 0.3
    keep[..., 0] = True
    if kind == "dead":  # batch row 1 sees no key: NaN rows
        keep[1] = False
        return keep, None
    if kind == "deadbias":  # batch row 1's keys all removed by an additive -inf bias
        bias = torch.zeros(B, 1, 1, lk, dtype=dtype)
        bias[1] = float("-inf")
        return bias, None
    if kind == "bool":
        return keep, None
    if kind == "finfo":
        return keep, torch.finfo(dtype).min
    return torch.zeros(B, 1, 1, lk, dtype=dtype).masked_fill(~keep, float("-inf")) + 0.3 * torch.randn(B, 1, 1, lk,
                                                                                                     dtype=dtype), None


def _leaves(side, dtype: torch.dtype):
    if isinstance(side, Factors):
        return Factors(side.a.to(dtype).detach().requires_grad_(), side.b.to(dtype).detach().requires_grad_(),
                       side.scale)
    return side.to(dtype).detach().requires_grad_()


def _tensors(side):
    return [side.a, side.b] if isinstance(side, Factors) else [side]


def _run(fn, sides, mask, grad, kw):
    out = fn(*sides, mask, **kw)
    leaves = [t for s in sides for t in _tensors(s)]
    grads = torch.autograd.grad(out, leaves, grad, allow_unused=True) if grad is not None else []
    return out.detach(), [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]


def _check(dtype, q, k, v, mask_kind, grad_too=True, **kw):
    lk = k.length if isinstance(k, Factors) else k.shape[-2]
    mask, fill = _key_mask(mask_kind, lk, dtype)
    kw = dict(kw, mask_fill=fill)
    kw.setdefault("scale", D ** -0.5)
    lq = q.length if isinstance(q, Factors) else q.shape[-2]
    grad = torch.randn(B, H, lq, D, dtype=dtype) if grad_too else None
    results = {}
    for name, fn, dt in (("ref", tpa.reference, torch.float64), ("eager", tpa.reference, dtype),
                         ("ours", tpa.attention, dtype)):
        sides = [_leaves(s, dt) for s in (q, k, v)]
        m = None if mask is None else (mask if mask.dtype == torch.bool else mask.to(dt))
        results[name] = _run(fn, sides, m, None if grad is None else grad.to(dt), kw)
    (o_ref, g_ref), (o_eager, g_eager), (o_ours, g_ours) = results["ref"], results["eager"], results["ours"]
    assert torch.equal(torch.isnan(o_ours), torch.isnan(o_eager)), "output NaN pattern differs from eager's"
    assert_2x(o_ours, o_eager, o_ref.to(dtype), "out")
    for i, (a, e, r) in enumerate(zip(g_ours, g_eager, g_ref)):
        assert torch.equal(torch.isnan(a), torch.isnan(e)), f"grad {i}: NaN pattern differs from eager's"
        assert_2x(a, e, r.to(dtype), f"grad {i}")


CASES = {
    # name: (lq, lk, q factorized, rank, q rank, groups, mask, kwargs)
    "plain_q_causal": (37, 37, False, 2, 0, 1, "none", {"causal": True}),
    "factored_q_causal_gqa": (45, 45, True, 1, 5, 2, "bool", {"causal": True}),
    "window": (41, 41, True, 2, 3, 1, "none", {"window_left": 7, "window_right": 3}),
    "finfo_padding": (29, 33, False, 5, 0, 1, "finfo", {}),
    "bias_softcap": (23, 39, True, 2, 2, 4, "bias", {"softcap": 5.0}),
    "dead_rows": (19, 19, False, 2, 0, 1, "dead", {"causal": True}),
    "dead_rows_sdpa": (19, 19, False, 2, 0, 2, "dead", {"sdpa_form": True}),
    "dead_bias": (19, 19, True, 2, 2, 1, "deadbias", {"causal": True}),
    "dead_bias_sdpa": (19, 19, False, 2, 0, 2, "deadbias", {"sdpa_form": True}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_blocked_against_float64(name, dtype, monkeypatch):
    monkeypatch.setattr(tpa_cpu, "KEY_BLOCK", 8)
    monkeypatch.setattr(tpa_cpu, "DECODE_ROWS", 0)
    seed_case("tpa-blocked", name, dtype)
    lq, lk, q_factored, rank, q_rank, groups, mask, kw = CASES[name]
    q = _factors(lq, H, q_rank, torch.float32) if q_factored else torch.randn(B, H, lq, D)
    k, v = (_factors(lk, H // groups, rank, torch.float32) for _ in range(2))
    _check(dtype, q, k, v, mask, kv_groups=groups, **kw)


def test_only_k_factorized(monkeypatch):
    monkeypatch.setattr(tpa_cpu, "KEY_BLOCK", 16)
    seed_case("tpa-only-k")
    q = torch.randn(B, H, 31, D)
    k = _factors(31, H, 2, torch.float32)
    v = torch.randn(B, H, 31, D)
    _check(torch.float32, q, k, v, "bool", causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mask", ["none", "finfo", "dead"])
def test_decode_against_float64(dtype, mask, monkeypatch):
    """A few query rows against a factor cache: the reassociated path (split over the cache), forward and
    backward; GQA and softcap."""
    monkeypatch.setattr(tpa_cpu, "DECODE_BLOCK", 16)
    seed_case("tpa-decode", dtype, mask)
    q = torch.randn(B, H, 3, D)
    k, v = (_factors(53, H // 2, 2, torch.float32) for _ in range(2))
    _check(dtype, q, k, v, mask, kv_groups=2, softcap=4.0)


def test_decode_reads_no_formed_kv(monkeypatch):
    """The decode path never forms K/V: `form` is called only for the query."""
    seed_case("tpa-decode-no-form")
    calls = []
    real = tpa_cpu.form

    def spy(x, dtype=None):
        calls.append(isinstance(x, Factors))
        return real(x, dtype)

    monkeypatch.setattr(tpa_cpu, "form", spy)
    q = _factors(1, H, 3, torch.float32)
    k, v = (_factors(40, H, 2, torch.float32) for _ in range(2))
    with torch.no_grad():
        out = tpa.attention(q, k, v, scale=0.2)
    assert calls == [True], calls  # the query's factors only
    torch.testing.assert_close(out, tpa.reference(q, k, v, scale=0.2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["blocked", "decode"])
def test_paths_skip_keys_outside_the_band(path, monkeypatch):
    """Under a window, key blocks (decode: cache splits) no query sees are never read: poisoned factors there
    change nothing."""
    monkeypatch.setattr(tpa_cpu, "KEY_BLOCK", 8)
    monkeypatch.setattr(tpa_cpu, "DECODE_BLOCK", 8)
    monkeypatch.setattr(tpa_cpu, "DECODE_ROWS", 0 if path == "blocked" else 16)
    seed_case("tpa-band-skip", path)
    q = torch.randn(B, H, 16, D)
    k, v = (_factors(64, H, 2, torch.float32) for _ in range(2))
    want = tpa.reference(q, k, v, scale=0.2, window_left=4, window_right=0)
    for side in (k, v):
        side.a[:, 24:].fill_(float("nan"))
    got = tpa.attention(q, k, v, scale=0.2, window_left=4, window_right=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_sides_raise():
    k = _factors(10, 2, 2, torch.float32)
    with pytest.raises(ValueError, match="attnfuse tpa"):
        tpa.attention(torch.randn(B, 3, 10, D), k, k, scale=1.0)
    with pytest.raises(ValueError, match="attnfuse tpa"):
        tpa.attention(torch.randn(B, 2, 10, D), k, k, torch.ones(B, 10, 10, dtype=torch.bool), scale=1.0)
    with pytest.raises(ValueError, match="attnfuse tpa"):
        Factors(torch.randn(B, 10, 2, 2), torch.randn(B, 10, 3, D))
