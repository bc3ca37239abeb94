"""Softmax spellings and scales the normal form reads (`_softmax_forms`, `_scale_forms`, per-head temperatures).

Each positive case: the site is fused, the output and the gradients (the temperature's too) meet the 2x rule
against float64.  Each negative twin: the site is reported as skipped with a reason, no op is called, and the
compiled output is eager's, bit for bit.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
from _harness import check, fused, skipped
from _util import assert_2x

import attnfuse
from attnfuse.passes._scale_forms import scaled_fill
from attnfuse.passes.canonicalize import canon, canonicalize

B, H, L, LK, D = 2, 3, 13, 17, 40
S = 0.3
NEG = float("-inf")
MIN32 = torch.finfo(torch.float32).min


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def qkv(dtype=torch.float32, h=H, hkv=None):
    return rnd(B, h, L, D, dtype=dtype), rnd(B, hkv or h, LK, D, dtype=dtype), rnd(B, hkv or h, LK, D, dtype=dtype)


def temp(*shape):
    """A per-head temperature multiplying raw q @ k^T: about D ** -0.5, as models initialize it.

    Moved onto q, a run-time scale rounds differently from eager's ``s * t``.  At this magnitude that meets the
    2x rule (fp32, 60 random draws of each shape: no miss in outputs and q/k/v gradients); on raw scores times
    U(0.5, 1.5), 1 to 2 draws in 40 miss it in dq / dk, by up to 2.8x (a per-head scale inside the op would not).
    """
    return (torch.rand(shape) + 0.5) * D ** -0.5


def keep(dead_rows=(2, 7)):
    """A (L, LK) keep mask with some rows that see no key."""
    k = torch.rand(L, LK) > 0.4
    k[:, 0] = True
    k[list(dead_rows)] = False
    return k


def compiled(fn):
    return torch.compile(fn, backend="attnfuse", options={"inner": "eager"})


def twin(fn, args, reason):
    """A negative twin: skipped with ``reason``, and the compiled output is eager's bit for bit."""
    res = check(fn, args, grad=[])
    skipped(res, reason)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled(fn)(*args), fn(*args), rtol=0, atol=0, equal_nan=True)
    return res


# --------------------------------------------------------------------------- a) softmax spellings


def sm_amax(q, k, v):
    s = q @ k.mT * S
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return (e / e.sum(-1, keepdim=True)) @ v


def sm_max_values_detached(q, k, v):
    s = q @ k.mT * S
    e = (s - s.max(dim=-1, keepdim=True).values.detach()).exp()
    return torch.div(e, torch.sum(e, dim=3, keepdim=True)) @ v  # axis 3 == -1


def sm_torch_max_two_exps(q, k, v):
    s = q @ k.mT * S
    m = torch.max(s, -1, True)[0]
    return (torch.exp(s - m) / torch.exp(s - m).sum(-1, keepdim=True)) @ v


def sm_two_maxes_detached(q, k, v):
    s = q @ k.mT * S
    num = torch.exp(s - s.amax(-1, keepdim=True).detach())
    den = torch.exp(s - s.amax(3, keepdim=True).detach()).sum(-1, keepdim=True)
    return (num / den) @ v


def sm_log_softmax_exp(q, k, v):
    return torch.log_softmax(q @ k.mT * S, -1).exp() @ v


def sm_exp_of_log_softmax(q, k, v):
    return torch.exp(nn.functional.log_softmax(q @ k.mT * S, dim=3)) @ v


@pytest.mark.parametrize("fn", [sm_amax, sm_max_values_detached, sm_torch_max_two_exps, sm_two_maxes_detached,
                                sm_log_softmax_exp, sm_exp_of_log_softmax])
def test_softmax_spelling_fuses(fn):
    res = check(fn, qkv())
    fused(res, scale=S, pattern="softmax")


def sm_masked(fill):
    def fn(q, k, v, kp):
        s = (q @ k.mT * S).masked_fill(~kp, fill)
        e = torch.exp(s - s.amax(-1, keepdim=True))
        return (e / e.sum(-1, keepdim=True)) @ v
    return fn


@pytest.mark.parametrize("fill", [NEG, MIN32])
def test_softmax_spelling_rows_that_see_no_key(fill):
    # -inf rows: NaN in eager's spelling and in the op; finfo.min rows: x - max is 0, uniform in both
    q, k, v = qkv()
    res = check(sm_masked(fill), (q, k, v, keep()))
    fused(res)
    out = res.out[0]
    assert out[:, :, 2].isnan().all() == (fill == NEG)
    if fill == MIN32:
        torch.testing.assert_close(out[:, :, 2], v.mean(-2))


def test_spelled_softmax_that_weights_nothing_is_left_alone():
    def fn(x):
        e = torch.exp(x - x.amax(-1, keepdim=True))
        return (e / e.sum(-1, keepdim=True)).sum(0)

    graphs = []
    torch.compile(fn, backend=lambda gm, _: graphs.append(gm) or gm)(rnd(4, 5))
    gm = canonicalize(graphs[0])
    assert "softmax" not in [canon(n).kind for n in gm.graph.nodes]


def tw_no_max(q, k, v):
    s = q @ k.mT * S
    return (torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)) @ v


def test_twin_exp_without_the_max_overflows_and_stays():
    twin(tw_no_max, qkv(), "without subtracting the row max")
    q, k, v = qkv()
    q = q * 30  # scores of a few hundred: exp overflows in eager, softmax would not
    eager = tw_no_max(q, k, v)
    assert eager.isnan().any()
    torch._dynamo.reset()
    torch.testing.assert_close(compiled(tw_no_max)(q, k, v), eager, rtol=0, atol=0, equal_nan=True)


def tw_axes(q, k, v):
    s = q @ k.mT * S
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return (e / e.sum(-2, keepdim=True)) @ v


def tw_no_keepdim(q, k, v):  # square 2-D scores: x - amax(x, -1) broadcasts the max along the wrong axis
    s = q[0, 0] @ k[0, 0].mT * S
    e = torch.exp(s - s.amax(-1))
    return (e / e.sum(-1, keepdim=True)) @ v[0, 0]


def tw_max_of_other(q, k, v):
    s = q @ k.mT * S
    e = torch.exp(s - (s * 2).amax(-1, keepdim=True))
    return (e / e.sum(-1, keepdim=True)) @ v


def tw_other_exp(q, k, v):  # numerator's max detached, denominator's not: another gradient
    s = q @ k.mT * S
    num = torch.exp(s - s.amax(-1, keepdim=True).detach())
    return (num / torch.exp(s - s.amax(-1, keepdim=True)).sum(-1, keepdim=True)) @ v


def tw_global_max(q, k, v):
    s = q @ k.mT * S
    e = torch.exp(s - s.amax())
    return (e / e.sum(-1, keepdim=True)) @ v


def tw_query_axis(q, k, v):  # a consistent softmax, but over the query axis
    s = q @ k.mT * S
    e = torch.exp(s - s.amax(-2, keepdim=True))
    return (e / e.sum(-2, keepdim=True)) @ v


def tw_log_softmax_query_axis(q, k, v):
    return torch.log_softmax(q @ k.mT * S, -2).exp() @ v


@pytest.mark.parametrize("fn, reason", [
    (tw_axes, "the max is over axis 3 but the sum over axis 2"),
    (tw_no_keepdim, "not over one axis with keepdim=True"),
    (tw_max_of_other, "taken of another tensor"),
    (tw_other_exp, "another exp(x - max)"),
    (tw_global_max, "not over one axis with keepdim=True"),
])
def test_twin_softmax_spelling_near_miss(fn, reason):
    q, k, v = qkv()
    twin(fn, (q, k[:, :, :L], v[:, :, :L]), reason)


@pytest.mark.parametrize("fn", [tw_query_axis, tw_log_softmax_query_axis])
def test_twin_softmax_spelling_over_the_query_axis(fn):
    twin(fn, qkv(), "not over the key (last) axis")


# --------------------------------------------------------------------------- b) per-head temperature


def tp_mul(q, k, v, t):
    return torch.softmax((q @ k.mT) * t, -1) @ v


def tp_mul_cast(q, k, v, t):
    return torch.softmax((q @ k.mT) * t, -1).to(v.dtype) @ v


def tp_div_then_mask(q, k, v, t, kp):
    s = (q @ k.mT) / t
    return torch.softmax(s.masked_fill(~kp, NEG), -1) @ v


def tp_left(q, k, v, t):
    return torch.softmax(t * (q @ k.transpose(-2, -1)), dim=-1) @ v


@pytest.mark.parametrize("shape", [(H, 1, 1), (1, H, 1, 1), (B, H, 1, 1), (1, 1)])
def test_temperature_fuses(shape):
    # q, k, v get gradients through it; a temperature that needs one itself is a twin (below)
    res = check(tp_mul, (*qkv(), temp(*shape)), grad=[0, 1, 2])
    fused(res, scale="runtime")


def test_temperature_divides_and_multiplies_from_the_left():
    t = temp(1, H, 1, 1)
    res = check(tp_div_then_mask, (*qkv(), 1 / t, keep()), grad=[0, 1, 2])
    fused(res, scale="runtime", mask="dense")
    assert res.call["mask"].dtype == torch.bool
    fused(check(tp_left, (*qkv(), t), grad=[0, 1, 2]), scale="runtime")


def test_twin_temperature_that_needs_a_gradient():
    # moved onto q, the temperature's gradient is sum(q * dq), which can miss the 2x rule against eager's
    # sum(s * ds) (fp32, random draws: 2 to 4 in 40-60, up to 2.6x, at any magnitude): such a site stays as written
    args = (*qkv(), temp(H, 1, 1))
    skipped(check(tp_mul, args), "needs a gradient")  # t gets a gradient (2x rule: trivially, it is eager's)
    mine, theirs = ([a.clone().requires_grad_() for a in args] for _ in range(2))
    out, want = compiled(tp_mul)(*mine), tp_mul(*theirs)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (want * g).sum().backward()
    assert torch.equal(out, want) and all(torch.equal(a.grad, b.grad) for a, b in zip(mine, theirs))
    fused(check(tp_mul, args, grad=[0, 1, 2]))  # its twin: t needs no gradient


class Temperature(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.temperature = nn.Parameter(temp(*shape))

    def forward(self, q, k, v):
        return torch.softmax(q @ k.mT * self.temperature, -1) @ v


@pytest.mark.parametrize("shape", [(H, 1, 1), (1, H, 1, 1)])
def test_learned_temperature_parameter(shape):
    model = Temperature(shape)
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    args = qkv()
    with torch.no_grad():  # inference: fused
        out = compiled(model)(*args)
        assert len(attnfuse.last_report().fused) == 1
        assert_2x(out, eager(*args), ref(*[a.double() for a in args]))
    # training: the parameter needs its gradient, so the site stays eager's, gradient included, bit for bit
    torch._dynamo.reset()
    args = [a.requires_grad_() for a in args]
    out, want = compiled(model)(*args), eager(*args)
    assert attnfuse.last_report().sites[0].status == "skipped"
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (want * g).sum().backward()
    assert torch.equal(out, want) and torch.equal(model.temperature.grad, eager.temperature.grad)


def test_temperature_on_gqa_keys_stays_with_the_keys():
    # k scaled per K/V head, then repeated: the tensor belongs to K (3 heads), never moved onto q (6 heads)
    def fn(q, k, v, tk):
        k = (k * tk).repeat_interleave(2, dim=1)
        return torch.softmax(q @ k.mT * S, -1) @ v.repeat_interleave(2, dim=1)

    res = check(fn, (*qkv(h=6, hkv=3), temp(3, 1, 1)))
    fused(res, kv_groups=2)


def test_temperature_on_rank5_scores():
    def fn(q, k, v, t):
        return torch.softmax(q @ k.mT * t, -1) @ v

    q, k, v = (rnd(2, 2, H, n, D) for n in (L, LK, LK))
    fused(check(fn, (q, k, v, temp(2, H, 1, 1)), grad=[0, 1, 2]), scale="runtime")


@pytest.mark.parametrize("shape, dtype", [((H, L, 1), torch.float32), ((H, 1, LK), torch.float32),
                                          ((H, 1, 1), torch.bfloat16)])
def test_twin_temperature_that_is_not_a_scale(shape, dtype):
    # varies along the query or key axis, or promotes the scores' dtype (bf16 * fp32): not a scale
    q, k, v = qkv(dtype)
    twin(tp_mul_cast, (q, k, v, temp(*shape)), "is not part of the attention pattern")


# --------------------------------------------------------------------------- c) a scale after the mask


def ms_bias(q, k, v, bias):
    return torch.softmax((q @ k.mT + bias) * S, -1) @ v


def ms_where(fill, c):
    def fn(q, k, v, kp):
        return torch.softmax(torch.where(kp, q @ k.mT, fill) / c, -1) @ v
    return fn


def ms_chain(q, k, v, bias, kp):
    s = (q @ k.mT + bias).masked_fill(~kp, NEG)
    return torch.softmax(s * 0.5 * 0.25, -1) @ v


def ms_temperature(q, k, v, bias, t):
    return torch.softmax((q @ k.mT + bias) * t, -1) @ v


def test_scale_after_an_additive_mask():
    res = check(ms_bias, (*qkv(), rnd(L, LK)))
    fused(res, scale=S, mask="bias")


def test_scale_after_masks_in_a_chain_and_a_temperature_after_a_bias():
    # a bias and a fill in one mask: fused without gradients only (`rewrite.mask_semantics`)
    fused(check(ms_chain, (*qkv(), rnd(L, LK), keep()), grad=[]), scale=0.125)
    fused(check(ms_temperature, (*qkv(), rnd(1, H, 1, LK), temp(H, 1, 1)), grad=[0, 1, 2, 3]),
          scale="runtime")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fill", [NEG, "min", -1e9])
def test_scale_after_a_keep_mask_scales_the_fill_as_eager_does(dtype, fill):
    fill = torch.finfo(dtype).min if fill == "min" else fill
    if dtype == torch.float16 and fill == -1e9:
        fill = -65000.0  # -1e9 is -inf in fp16 (covered by NEG); -65000 is stored as -65024
    c = math.sqrt(D)
    res = check(ms_where(fill, c), (*qkv(dtype), keep()))
    fused(res, mask="dense")
    assert res.call["mask"].dtype == torch.bool
    masked = torch.where(torch.tensor([False]), torch.zeros(1, dtype=dtype), fill) / c  # eager's own kernel
    assert res.call["mask_fill"] == masked.item() or (fill == NEG and res.call["mask_fill"] is None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("divide", [False, True])
def test_scaled_fill_is_eagers_value(dtype, divide):
    # where(K, s, fill) * c at a masked entry, by eager's own CPU kernel, for random fills and scales (c is
    # rounded to fp32 first for fp32 scores: computing in fp64 would differ in about a quarter of these)
    fills = (-torch.rand(300, dtype=torch.float64) * 6e4 - 1e4).tolist() + [NEG, torch.finfo(dtype).min]
    scales = (torch.rand(302, dtype=torch.float64) * 8 + 0.01).tolist()
    for fill, c in zip(fills, scales):
        stored = torch.where(torch.tensor([False]), torch.zeros(1, dtype=dtype), fill)
        want = (stored / c if divide else stored * c).item()
        assert scaled_fill(fill, c, divide, dtype, torch.device("cpu")) == want, (fill, c)


@pytest.mark.parametrize("fn, args, reason", [
    # a scale that is not a positive constant after a keep term: its sign decides the fill
    (lambda q, k, v, kp, t: torch.softmax(torch.where(kp, q @ k.mT, NEG) * t, -1) @ v,
     (torch.tensor(0.4),), "not known to be positive"),
    (lambda q, k, v, kp, t: torch.softmax((q @ k.mT).masked_fill(~kp, MIN32) * t, -1) @ v,
     (temp(H, 1, 1),), "not known to be positive"),
    (lambda q, k, v, kp: torch.softmax(torch.where(kp, q @ k.mT, NEG) * -0.5, -1) @ v, (),
     "not known to be positive"),
    # a scaled fill that is no longer a large negative: where(K, s, -1e4) / 8 fills -1250
    (lambda q, k, v, kp: torch.softmax(torch.where(kp, q @ k.mT, -1e4) / 8, -1) @ v, (), "is not a mask"),
    # a mask inside the softcap: the scale does not move into tanh
    (lambda q, k, v, kp: torch.softmax(torch.tanh((q @ k.mT).masked_fill(~kp, NEG) / 30) * 30, -1) @ v, (),
     "softcap"),
])
def test_twin_scale_after_a_mask(fn, args, reason):
    twin(fn, (*qkv(), keep(), *args), reason)


def test_scale_after_mask_unfused_site_keeps_its_original_graph():
    # probabilities also returned: not fused, so (s + B) * c must not become s * c + B * c (other rounding)
    def fn(q, k, v, bias):
        p = torch.softmax((q @ k.mT + bias) * S, -1)
        return p @ v, p

    args = (*qkv(), rnd(L, LK) * 100)
    res = check(fn, args, grad=[])
    skipped(res, "also used")
    torch._dynamo.reset()
    for got, want in zip(compiled(fn)(*args), fn(*args)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
