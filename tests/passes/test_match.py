"""Every attention spelling the matcher must read, each with a negative twin.

Each positive case asserts the numbers (compiled output and gradients against eager,
with the 2x rule against float64) AND the rewrite (the report's site is fused with the
recovered scale, kv_groups, mask kind; the op itself was called with the recovered
softcap / K/V heads).  Each negative case asserts a reasoned skip and eager's numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _harness import check, fused, skipped
from _util import assert_2x

import attnfuse
from attnfuse import ops

B, H, L, LK, D = 2, 4, 13, 17, 40
S = 0.3  # a scale that is not the default
NEG = float("-inf")
MIN32 = torch.finfo(torch.float32).min


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def qkv(lq=L, lk=L, d=D, h=H, hkv=None, b=B, dtype=torch.float32):
    hkv = hkv or h
    return rnd(b, h, lq, d, dtype=dtype), rnd(b, hkv, lk, d, dtype=dtype), rnd(b, hkv, lk, d, dtype=dtype)


def bthd(lq=L, lk=L, d=D, h=H):
    return rnd(B, lq, h, d), rnd(B, lk, h, d), rnd(B, lk, h, d)


def keep_mask(*shape, p=0.3):
    """Bool "attend" mask with at least one kept key per row."""
    keep = torch.rand(*shape) > p
    keep[..., 0] = True
    return keep


def attend(s, v):
    return s.softmax(-1) @ v


# --------------------------------------------------------------------------- QK and kᵀ spellings

def qk_at_transpose(q, k, v):
    return attend((q @ k.transpose(-2, -1)) * S, v)


def qk_matmul_transpose23(q, k, v):
    return torch.matmul(F.softmax(torch.matmul(q, k.transpose(2, 3)) * S, dim=-1), v)


def qk_permute(q, k, v):
    return attend((q @ k.permute(0, 1, 3, 2)) * S, v)


def qk_mT(q, k, v):
    return torch.matmul(torch.softmax(torch.matmul(q, k.mT) * S, -1), v)


def qk_k_pre_transposed(q, kt, v):  # k laid out (B, H, D, T) already
    return attend((q @ kt) * S, v)


def qk_bthd_transpose(q, k, v):  # (B, T, H, D) projections, the HF / nanoGPT layout
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return attend((q @ k.transpose(-2, -1)) * S, v).transpose(1, 2)


def qk_bthd_permute(q, k, v):
    s = q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1)
    return (F.softmax(s * S, dim=-1) @ v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)


def qk_bmm_view(q, k, v):  # heads folded into batch with view / reshape
    b, h, lq, d = q.shape
    qf, kf, vf = q.reshape(b * h, lq, d), k.reshape(b * h, -1, d), v.view(b * h, -1, d)
    return torch.bmm(torch.softmax(torch.bmm(qf, kf.transpose(1, 2)) * S, -1), vf).view(b, h, lq, d)


def qk_bmm_from_bthd(q, k, v):
    b, t, h, d = q.shape
    qf, kf, vf = (x.transpose(1, 2).reshape(b * h, -1, d) for x in (q, k, v))
    out = torch.bmm(torch.softmax(torch.bmm(qf * S, kf.transpose(-1, -2)), -1), vf)
    return out.view(b, h, t, d).transpose(1, 2)


def qk_baddbmm_bias(q, k, v, bias):  # mask folded in: bias + S * q @ kᵀ
    b, h, lq, d = q.shape
    qf, kf, vf = q.reshape(b * h, lq, d), k.reshape(b * h, -1, d), v.reshape(b * h, -1, d)
    s = torch.baddbmm(bias, qf, kf.transpose(1, 2), beta=1.0, alpha=S)
    return torch.bmm(s.softmax(-1), vf).view(b, h, lq, d)


def qk_baddbmm_empty(q, k, v):  # HF GPT-2 "reordered" spelling: beta=0 ignores the empty input
    b, h, lq, d = q.shape
    qf, kf, vf = q.reshape(b * h, lq, d), k.reshape(b * h, -1, d), v.reshape(b * h, -1, d)
    s = torch.baddbmm(torch.empty(b * h, lq, kf.shape[1], dtype=q.dtype), qf, kf.transpose(1, 2), beta=0, alpha=S)
    return torch.bmm(s.softmax(-1), vf).view(b, h, lq, d)


def qk_einsum(q, k, v):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * S
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


def qk_einsum_bthd(q, k, v):
    s = torch.einsum("bqhd,bkhd->bhqk", q * S, k)
    return torch.einsum("bhqk,bkhd->bqhd", F.softmax(s, dim=-1), v)


def qk_einsum_kt(q, kt, v):
    return torch.einsum("b h i j, b h j d -> b h i d", (torch.einsum("bhid,bhdj->bhij", q, kt) * S).softmax(-1), v)


def qk_einsum_3d(q, k, v):
    b, h, lq, d = q.shape
    qf, kf, vf = q.reshape(b * h, lq, d), k.reshape(b * h, -1, d), v.reshape(b * h, -1, d)
    p = torch.einsum("bid,bjd->bij", qf, kf).mul(S).softmax(dim=-1)
    return torch.einsum("bij,bjd->bid", p, vf).reshape(b, h, lq, d)


def qk_2d(q, k, v):  # one head, (T, D)
    return attend(q[0, 0] @ k[0, 0].T * S, v[0, 0])


def qk_5d(q, k, v):  # extra batch dim
    q, k, v = (x.unflatten(1, (2, 2)) for x in (q, k, v))
    return attend(q @ k.transpose(-1, -2) * S, v)


def _kt(args):
    q, k, v = args
    return q, k.transpose(-2, -1).contiguous(), v


def _with_bias(args, shape):
    return (*args, rnd(*shape))


QK_CASES = {
    "at_transpose": (qk_at_transpose, lambda: qkv()),
    "matmul_transpose23": (qk_matmul_transpose23, lambda: qkv(lk=LK)),
    "permute": (qk_permute, lambda: qkv()),
    "mT": (qk_mT, lambda: qkv(d=8)),
    "k_pre_transposed": (qk_k_pre_transposed, lambda: _kt(qkv(lk=LK))),
    "bthd_transpose": (qk_bthd_transpose, lambda: bthd()),
    "bthd_permute": (qk_bthd_permute, lambda: bthd(lk=LK)),
    "bmm_view": (qk_bmm_view, lambda: qkv(lk=LK)),
    "bmm_from_bthd": (qk_bmm_from_bthd, lambda: bthd(d=8)),
    "baddbmm_empty": (qk_baddbmm_empty, lambda: qkv()),
    "einsum": (qk_einsum, lambda: qkv()),
    "einsum_bthd": (qk_einsum_bthd, lambda: bthd(lk=LK)),
    "einsum_kt": (qk_einsum_kt, lambda: _kt(qkv())),
    "einsum_3d": (qk_einsum_3d, lambda: qkv(lk=LK)),
    "2d": (qk_2d, lambda: qkv()),
    "5d": (qk_5d, lambda: qkv(d=8)),
}


@pytest.mark.parametrize("case", QK_CASES)
def test_qk_spelling(case):
    fn, make = QK_CASES[case]
    res = check(fn, make())
    fused(res, scale=S, kv_groups=1, mask="none")
    assert res.call["scale"] == S


def test_baddbmm_folds_its_mask():
    args = _with_bias(qkv(lk=LK), (1, L, LK))
    res = check(qk_baddbmm_bias, args)
    fused(res, scale=S, mask="bias", pattern="bias")
    assert res.call["mask"] is not None


# --------------------------------------------------------------------------- scale placement

T = math.sqrt(D)


def sc_none(q, k, v):
    return attend(q @ k.transpose(-2, -1), v)


def sc_times_one(q, k, v):
    return attend((q @ k.transpose(-2, -1)) * 1.0, v)


def sc_rmul(q, k, v):
    return attend(S * (q @ k.transpose(-2, -1)), v)


def sc_div(q, k, v):
    return attend((q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1)), v)


def sc_on_q(q, k, v):
    return attend((q * D**-0.5) @ k.transpose(-2, -1), v)


def sc_on_q_div(q, k, v):
    return attend((q / T) @ k.transpose(-2, -1), v)


def sc_on_k(q, k, v):
    return attend(q @ (k * S).transpose(-2, -1), v)


def sc_on_kt_div(q, k, v):
    return attend(q @ (k.transpose(-2, -1) / T), v)


def sc_split(q, k, v):  # √ split over q and k (the "stable" spelling)
    return attend((q * D**-0.25) @ (k * D**-0.25).transpose(-2, -1), v)


def sc_q_and_scores(q, k, v):
    return attend(((q * 0.5) @ k.transpose(-2, -1)) * 0.7, v)


def sc_tensor_literal(q, k, v):  # a 0-d tensor built in the graph is a constant
    return attend((q @ k.transpose(-2, -1)) / torch.tensor(T), v)


def sc_full_literal(q, k, v):
    return attend((q @ k.transpose(-2, -1)) * torch.full([], S), v)


SCALE_CASES = {
    "none": (sc_none, 1.0),
    "times_one": (sc_times_one, 1.0),
    "rmul": (sc_rmul, S),
    "div": (sc_div, 1.0 / math.sqrt(D)),
    "on_q": (sc_on_q, D**-0.5),
    "on_q_div": (sc_on_q_div, 1.0 / T),
    "on_k": (sc_on_k, S),
    "on_kt_div": (sc_on_kt_div, 1.0 / T),
    "split": (sc_split, D**-0.25 * D**-0.25),
    "q_and_scores": (sc_q_and_scores, 0.7 * 0.5),
    "tensor_literal": (sc_tensor_literal, 1.0 / float(torch.tensor(T))),  # the float32 value eager divides by
    "full_literal": (sc_full_literal, float(torch.full([], S))),
}


@pytest.mark.parametrize("case", SCALE_CASES)
def test_scale(case):
    fn, want = SCALE_CASES[case]
    res = check(fn, qkv(lk=LK))
    fused(res, scale=want, mask="none")
    assert res.call["scale"] == want  # exact, not approximately


def sc_runtime_tensor(q, k, v, c):
    return attend((q @ k.transpose(-2, -1)) * c, v)


def sc_per_head_tensor(q, k, v, temperature):  # varies along the queries: not a scale (temperatures: test_spellings)
    return attend((q @ k.transpose(-2, -1)) * temperature, v)


def test_scale_twin_per_head_tensor():
    skipped(check(sc_per_head_tensor, (*qkv(), torch.rand(H, L, 1) + 0.5)), "not part of the attention pattern")


def test_scale_runtime_tensor():
    res = check(sc_runtime_tensor, (*qkv(), torch.tensor(0.37)))
    fused(res, scale="runtime")


def sc_symbolic(q, k, v):
    return attend((q @ k.transpose(-2, -1)) * (k.size(-1) ** -0.5), v)


def test_scale_symbolic_is_the_default():
    res = check(sc_symbolic, qkv(lk=LK), dynamic=True)
    fused(res, scale=None)
    assert res.call["scale"] is None


# --------------------------------------------------------------------------- softcap

def softcap(q, k, v):
    s = (q @ k.transpose(-2, -1)) * S
    s = 5.0 * torch.tanh(s / 5.0)
    return attend(s, v)


def softcap_mul_inverse(q, k, v, bias):  # Gemma-2: tanh(s * (1/c)) * c, then the mask
    s = torch.tanh((q @ k.transpose(-2, -1)) * S * (1 / 30.0)) * 30.0
    return attend(s + bias, v)


def test_softcap():
    res = check(softcap, qkv(lk=LK))
    fused(res, scale=S, pattern="softcap")
    assert res.call["softcap"] == 5.0


def test_softcap_then_mask():
    res = check(softcap_mul_inverse, (*qkv(), rnd(1, 1, L, L)))
    fused(res, scale=S, mask="bias", pattern="softcap")
    assert res.call["softcap"] == 30.0


def softcap_mismatched(q, k, v):
    return attend(5.0 * torch.tanh((q @ k.transpose(-2, -1)) / 4.0), v)


def test_softcap_twin_mismatched_cap():
    skipped(check(softcap_mismatched, qkv()), "not a softcap")


# --------------------------------------------------------------------------- masks

def mask_add(q, k, v, bias):
    return attend((q @ k.transpose(-2, -1)) * S + bias, v)


@pytest.mark.parametrize("shape", [(B, 1, 1, LK), (1, 1, L, LK), (L, LK), (B, H, L, LK), (1, H, L, LK), (LK,)])
def test_mask_additive(shape):
    res = check(mask_add, (*qkv(lk=LK), rnd(*shape)))  # the bias gets a gradient too
    fused(res, scale=S, mask="bias")
    assert res.call["mask"] is not None


def mask_fill(q, k, v, masked, value):
    return attend(((q @ k.transpose(-2, -1)) * S).masked_fill(masked, value), v)


@pytest.mark.parametrize("value", [NEG, MIN32, -1e9, -1e4], ids=["-inf", "finfo.min", "-1e9", "-1e4"])
def test_mask_masked_fill(value):
    masked = ~keep_mask(B, 1, L, LK)
    res = check(lambda q, k, v, m: mask_fill(q, k, v, m, value), (*qkv(lk=LK), masked))
    fused(res, scale=S, mask="dense")
    assert res.site.mask["tensors"][0]["fill"] == value


def test_mask_twin_masked_fill_small_value():
    masked = ~keep_mask(B, 1, L, LK)
    skipped(check(lambda q, k, v, m: mask_fill(q, k, v, m, -1.0), (*qkv(lk=LK), masked)), "is not a mask")


def mask_where(q, k, v, keep):
    return attend(torch.where(keep, (q @ k.transpose(-2, -1)) * S, NEG), v)


def mask_where_negated(q, k, v, keep):
    return attend(torch.where(~keep, torch.finfo(q.dtype).min, (q @ k.transpose(-2, -1)) * S), v)


def mask_where_tensor_fill(q, k, v, keep):  # HF's torch.full([], finfo.min) mask_value
    value = torch.full([], torch.finfo(q.dtype).min, dtype=q.dtype)
    return attend(torch.where(keep, (q @ k.transpose(-2, -1)) * S, value), v)


@pytest.mark.parametrize("fn", [mask_where, mask_where_negated, mask_where_tensor_fill])
def test_mask_where(fn):
    res = check(fn, (*qkv(lk=LK), keep_mask(L, LK)))
    fused(res, scale=S, mask="dense")


def mask_where_small(q, k, v, keep):
    return attend(torch.where(keep, (q @ k.transpose(-2, -1)) * S, -2.0), v)


def test_mask_twin_where_small_value():
    skipped(check(mask_where_small, (*qkv(), keep_mask(L, L))), "is not a mask")


class NanoGPTAttention(nn.Module):
    """nanoGPT's slow path: a tril buffer slice, masked_fill(-inf), softmax, dropout, @ v."""

    def __init__(self, block=64, p=0.1):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))
        self.attn_dropout = nn.Dropout(p)

    def forward(self, q, k, v):
        t = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        return att @ v


def test_mask_nanogpt_tril_is_causal():
    res = check(NanoGPTAttention().eval(), qkv(lq=17, lk=17))
    fused(res, scale=1.0 / math.sqrt(D), mask="causal")
    assert res.call["causal"] is True and res.call["mask"] is None


def mask_tril_inline(q, k, v):
    keep = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).tril()
    return attend(torch.where(keep, (q @ k.transpose(-2, -1)) * S, NEG), v)


def mask_hf_causal_additive(q, k, v):  # HF: full(finfo.min).triu(1) added to the scores
    t = q.size(-2)
    causal = torch.full((t, t), torch.finfo(q.dtype).min, dtype=q.dtype).triu(1)
    return attend((q @ k.transpose(-2, -1)) * S + causal[None, None], v)


@pytest.mark.parametrize("fn", [mask_tril_inline, mask_hf_causal_additive])
def test_mask_static_causal(fn):
    res = check(fn, qkv())
    fused(res, scale=S, mask="causal")
    assert res.call["causal"] is True


def test_mask_twin_tril_on_cross_attention_is_not_causal():
    res = check(mask_tril_inline, qkv(lk=LK))  # q_len != kv_len: a tensor mask, not is_causal
    fused(res, mask="dense")
    assert res.call["causal"] is False


def test_mask_twin_almost_causal():
    keep = torch.ones(L, L, dtype=torch.bool).tril()
    keep[5, 7] = True
    res = check(mask_where, (*qkv(), keep))
    fused(res, mask="dense")
    assert res.call["causal"] is False


def test_mask_twin_tril_passed_in_is_data():
    tril = torch.ones(L, L, dtype=torch.bool).tril()  # causal-looking, but an input: the next call may differ
    res = check(mask_where, (*qkv(), tril))
    fused(res, mask="dense")
    assert res.call["causal"] is False
    q, k, v = qkv()
    other = keep_mask(L, L)
    torch.testing.assert_close(_compile(mask_where)(q, k, v, other), mask_where(q, k, v, other))


def mask_hf_padding(q, k, v, attend_key):  # HF: where(bool, 0, finfo.min) additive mask
    m = torch.where(attend_key[:, None, None, :], torch.zeros((), dtype=q.dtype), torch.finfo(q.dtype).min)
    return attend((q @ k.transpose(-2, -1)) * S + m, v)


def test_mask_hf_padding():
    res = check(mask_hf_padding, (*qkv(lk=LK), keep_mask(B, LK, p=0.4)))
    fused(res, scale=S, mask="padding")  # a key vector: read per key, never as an Lq x Lk tensor


def mask_bias_and_bool(q, k, v, bias, keep):
    s = (q @ k.transpose(-2, -1)) * S + bias
    return attend(s.masked_fill(~keep, NEG), v)


def test_mask_bias_and_bool():
    with torch.no_grad():
        res = check(mask_bias_and_bool, (*qkv(lk=LK), rnd(1, H, 1, LK), keep_mask(B, 1, L, LK)), grad=[])
    fused(res, scale=S, mask="bias+dense")


def test_mask_bias_and_bool_twin_training():
    # where(keep, s + bias, -inf) with gradients: a row the keep empties has eager gradient 0 for q, k and the
    # bias, which one fused mask cannot give (docs/architecture.md, "the no-visible-key rule")
    res = check(mask_bias_and_bool, (*qkv(lk=LK), rnd(1, H, 1, LK), keep_mask(B, 1, L, LK)))
    skipped(res, "cannot reproduce in training")


def mask_from_scores(q, k, v):
    s = (q @ k.transpose(-2, -1)) * S
    return attend(s.masked_fill(s < 0, NEG), v)


def test_mask_twin_depends_on_scores():
    skipped(check(mask_from_scores, qkv()), "depends on the scores")


def mask_before_scale(q, k, v, keep, c):  # a constant c > 0 moves below the mask (test_spellings); run-time c not
    return attend((q @ k.transpose(-2, -1)).masked_fill(~keep, NEG) * c, v)


def test_mask_twin_applied_before_scale():
    skipped(check(mask_before_scale, (*qkv(), torch.rand(L, L) > 0.3, torch.tensor(0.4))), "applied before a scale")


def scalar_shift(q, k, v):
    return attend((q @ k.transpose(-2, -1)) * S + 1.5, v)


def test_mask_twin_scalar_shift():
    skipped(check(scalar_shift, qkv()), "scalar is added")


# --------------------------------------------------------------------------- fully masked rows

def dead_rows(*shape):
    keep = keep_mask(*shape)
    keep[..., 3, :] = False
    return keep


def test_fully_masked_rows_neg_inf_are_nan():
    res = check(mask_fill, (*qkv(lk=LK), ~dead_rows(B, 1, L, LK), NEG), grad=[])
    fused(res, mask="dense")
    assert res.out[0][:, :, 3].isnan().all() and not res.out[0][:, :, 2].isnan().any()


@pytest.mark.parametrize("value", [MIN32, -1e9])
def test_fully_masked_rows_finite_fill_are_uniform(value):
    q, k, v = qkv(lk=LK)
    res = check(mask_fill, (q, k, v, ~dead_rows(B, 1, L, LK), value))
    fused(res, mask="dense")
    torch.testing.assert_close(res.out[0][:, :, 3], v.mean(-2))


def test_fully_masked_rows_additive():
    keep = dead_rows(1, 1, L, L)
    neg_inf = torch.zeros(keep.shape).masked_fill(~keep, NEG)
    res = check(mask_add, (*qkv(), neg_inf), grad=[])
    fused(res, mask="bias")
    assert res.out[0][:, :, 3].isnan().all()
    q, k, v = qkv()
    res = check(mask_hf_padding, (q, k, v, torch.zeros(B, L, dtype=torch.bool)))  # every key padded
    torch.testing.assert_close(res.out[0], v.mean(-2, keepdim=True).expand_as(q))


def test_fully_masked_rows_where():
    res = check(mask_where, (*qkv(lk=LK), dead_rows(L, LK)), grad=[])
    fused(res, mask="dense")
    assert res.out[0][:, :, 3].isnan().all()


# --------------------------------------------------------------------------- softmax spellings

def sm_functional_dtype(q, k, v):
    return F.softmax((q @ k.transpose(-2, -1)) * S, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def sm_float_round_trip(q, k, v):
    return ((q @ k.transpose(-2, -1)) * S).float().softmax(-1).to(v.dtype) @ v


def sm_type_as(q, k, v):
    return torch.softmax(((q @ k.transpose(-2, -1)) * S).float(), dim=3).type_as(q) @ v


def sm_upcast_masked(q, k, v, bias):  # HF eager: mask in the input dtype, softmax in float32
    s = (q @ k.transpose(2, 3)) * S + bias
    return nn.functional.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def sm_exp_logsumexp(q, k, v):
    s = (q @ k.transpose(-2, -1)) * S
    return torch.exp(s - torch.logsumexp(s, dim=-1, keepdim=True)) @ v


def sm_exp_logsumexp_einsum(q, k, v):  # canonicalized before the einsums become matmuls
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * S
    return torch.einsum("bhqk,bhkd->bhqd", (s - s.logsumexp(-1, keepdim=True)).exp(), v)


class SoftmaxModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, q, k, v):
        return self.softmax((q @ k.transpose(-2, -1)) * S) @ v


SOFTMAX_CASES = {
    "functional": (qk_matmul_transpose23, torch.float32),
    "method": (qk_at_transpose, torch.float32),
    "torch": (qk_mT, torch.float32),
    "dtype_kwarg_fp32": (sm_functional_dtype, torch.float32),
    "dtype_kwarg_fp16": (sm_functional_dtype, torch.float16),
    "float_round_trip_fp16": (sm_float_round_trip, torch.float16),
    "type_as_fp16": (sm_type_as, torch.float16),
    "module": (SoftmaxModule(), torch.float32),
    "exp_logsumexp": (sm_exp_logsumexp, torch.float32),
    "exp_logsumexp_einsum": (sm_exp_logsumexp_einsum, torch.float32),
}


@pytest.mark.parametrize("case", SOFTMAX_CASES)
def test_softmax_spelling(case):
    fn, dtype = SOFTMAX_CASES[case]
    res = check(fn, qkv(lk=LK, dtype=dtype))
    fused(res, scale=S, dtype=str(dtype).replace("torch.", ""))


def test_softmax_upcast_with_fp16_mask():
    q, k, v = qkv(lk=LK, dtype=torch.float16)
    res = check(sm_upcast_masked, (q, k, v, rnd(B, 1, L, LK, dtype=torch.float16)))
    fused(res, scale=S, mask="bias")


def sm_wrong_axis(q, k, v):
    return ((q @ k.transpose(-2, -1)) * S).softmax(-2) @ v


def test_softmax_twin_wrong_axis():
    skipped(check(sm_wrong_axis, qkv()), "not over the key")


def sm_log(q, k, v):
    return ((q @ k.transpose(-2, -1)) * S).log_softmax(-1) @ v


def test_softmax_twin_log_softmax_is_not_a_site():
    res = check(sm_log, qkv())
    assert not res.report.fused and not res.calls


# --------------------------------------------------------------------------- dropout

def dropout_functional_eval(q, k, v):
    return F.dropout(((q @ k.transpose(-2, -1)) * S).softmax(-1), p=0.2, training=False) @ v


def test_dropout_eval_is_identity():
    res = check(dropout_functional_eval, qkv())
    fused(res, scale=S)
    assert res.call["dropout_p"] == 0.0 and "dropout" not in res.site.pattern
    res = check(NanoGPTAttention(p=0.3).eval(), qkv())
    fused(res, mask="causal")
    assert res.call["dropout_p"] == 0.0


def dropout_train(q, k, v, p=0.25):
    return F.dropout(((q @ k.transpose(-2, -1)) * S).softmax(-1), p=p, training=True) @ v


def _compile(fn):
    return torch.compile(fn, backend="attnfuse", options={"inner": "eager"}, dynamic=False)


def test_dropout_training_is_fused_and_random():
    q, k, v = qkv(d=8)
    compiled = _compile(dropout_train)
    a, b = compiled(q, k, v), compiled(q, k, v)
    site = attnfuse.last_report().sites[0]
    assert site.status == "fused" and "dropout" in site.pattern
    plain = qk_at_transpose(q, k, v)
    assert (a - plain).abs().max() > 0.1 and (a - b).abs().max() > 0.1  # fresh mask each call


def test_dropout_training_keeps_and_rescales():
    # v = identity makes the output the dropped-out probabilities themselves
    p, lk = 0.25, 16
    q, k, _ = qkv(lk=lk, d=8)
    v = torch.eye(lk).expand(B, H, lk, lk)
    out = _compile(dropout_train)(q, k, v, p)
    probs = ((q @ k.transpose(-2, -1)) * S).softmax(-1)
    kept = out != 0
    frac = 1 - kept.float().mean().item()
    n = kept.numel()
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / n)
    torch.testing.assert_close(out[kept], probs[kept] / (1 - p))


def test_dropout_training_mean_over_seeds():
    q, k, v = qkv(d=8)
    compiled = _compile(dropout_train)
    plain = qk_at_transpose(q, k, v)
    runs = torch.stack([compiled(q, k, v) for _ in range(400)])
    err_400 = (runs.mean(0) - plain).abs().mean().item()
    err_25 = (runs[:25].mean(0) - plain).abs().mean().item()
    assert err_400 < 0.03 and err_400 < err_25 / 2  # ~ 1/sqrt(n) convergence to no-dropout


def test_dropout_training_gradients_follow_its_mask():
    # v = [I | v] reads the dropped-out probabilities out of the same call that computes p @ v;
    # with that keep mask fixed, eager autograd gives the gradients the fused op must produce.
    p, lk = 0.25, 16
    q, k, v = qkv(lk=lk, d=8)
    vi = torch.cat([torch.eye(lk).expand(B, H, lk, lk), v], -1)
    leaves = [x.clone().requires_grad_() for x in (q, k, vi)]
    out = _compile(dropout_train)(*leaves, p)
    g = torch.randn(out.shape)
    (out * g).sum().backward()
    keep = out[..., :lk].detach() != 0

    def fixed(q, k, vi):
        return ((((q @ k.transpose(-2, -1)) * S).softmax(-1) * keep) / (1 - p)) @ vi

    eager = [x.clone().requires_grad_() for x in (q, k, vi)]
    ref = [x.double().requires_grad_() for x in (q, k, vi)]
    e_out, r_out = fixed(*eager), fixed(*ref)
    (e_out * g).sum().backward()
    (r_out * g.double()).sum().backward()
    assert_2x(out.detach(), e_out.detach(), r_out.detach())
    for name, o, e, r in zip("q k v".split(), leaves, eager, ref):
        assert_2x(o.grad, e.grad, r.grad, what=f"grad of {name}")


def test_dropout_op_fixed_seed_is_deterministic_and_differentiable():
    q, k, v = (x.double().requires_grad_() for x in qkv(lq=5, lk=7, d=4, h=2, b=1))
    seed = torch.tensor(1234)
    a = ops.attend(q, k, v, None, seed, dropout_p=0.3)
    b = ops.attend(q, k, v, None, seed, dropout_p=0.3)
    assert torch.equal(a, b)
    assert not torch.equal(a, ops.attend(q, k, v, None, torch.tensor(99), dropout_p=0.3))
    op = lambda q, k, v: ops.attend(q, k, v, None, seed, dropout_p=0.3, scale=S)
    assert torch.autograd.gradcheck(op, (q, k, v))
    bias = torch.randn(1, 1, 5, 7, dtype=torch.float64, requires_grad=True)
    op = lambda q, k, v, m: ops.attend(q, k, v, m, seed, dropout_p=0.3, softcap=2.0)
    assert torch.autograd.gradcheck(op, (q, k, v, bias))


def dropout_before_softmax(q, k, v):
    return F.dropout((q @ k.transpose(-2, -1)) * S, p=0.2, training=True).softmax(-1) @ v


def test_dropout_twin_on_scores():
    q, k, v = qkv()
    compiled = _compile(dropout_before_softmax)
    compiled(q, k, v)
    report = attnfuse.last_report()
    assert not report.fused and "not part of the attention pattern" in report.sites[0].reason


# --------------------------------------------------------------------------- GQA / MQA

def repeat_kv_expand(x, n):  # HF repeat_kv
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, t, d).reshape(b, h * n, t, d)


def repeat_kv_unsqueeze(x, n):
    b, h, t, d = x.shape
    return x.unsqueeze(2).expand(-1, -1, n, -1, -1).reshape(b, h * n, t, d)


GQA_STYLES = {
    "expand_reshape": repeat_kv_expand,
    "unsqueeze_expand": repeat_kv_unsqueeze,
    "repeat_interleave": lambda x, n: x.repeat_interleave(n, dim=1),
    "torch_repeat_interleave": lambda x, n: torch.repeat_interleave(x, n, dim=1),
    "repeat": lambda x, n: x.repeat(1, n, 1, 1),
}


GQA_MASKS = {  # per-head masks: "repeat" (tiled heads) must reorder them with q
    "bias": (lambda h: rnd(1, h, L, LK), lambda s, m: s + m, "bias"),
    "bias_3d": (lambda h: rnd(h, L, LK), lambda s, m: s + m, "bias"),
    "bool": (lambda h: ~keep_mask(B, h, L, LK), lambda s, m: s.masked_fill(m, NEG), "dense"),
}


@pytest.mark.parametrize("mask", GQA_MASKS)
@pytest.mark.parametrize("style", GQA_STYLES)
@pytest.mark.parametrize("heads", [(6, 2), (4, 1)], ids=["gqa", "mqa"])
def test_gqa(style, heads, mask):
    h, hkv = heads
    rep = GQA_STYLES[style]
    make_mask, apply_mask, kind = GQA_MASKS[mask]

    def fn(q, k, v, m):
        n = q.size(1) // k.size(1)
        return attend(apply_mask((q @ rep(k, n).transpose(-2, -1)) * S, m), rep(v, n))

    res = check(fn, (*qkv(h=h, hkv=hkv, lk=LK), make_mask(h)))
    fused(res, kv_groups=h // hkv, mask=kind)
    assert res.call["k"].shape[1] == hkv and res.call["v"].shape[1] == hkv  # the op gets un-repeated K/V


def test_gqa_repeated_before_transpose():
    # Meta-Llama: repeat_kv on (B, T, H, D), then transpose(1, 2)
    def fn(q, k, v):
        q, k, v = q.transpose(1, 2), repeat_kv_bthd(k, 3).transpose(1, 2), repeat_kv_bthd(v, 3).transpose(1, 2)
        return attend(torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.size(-1)), v).transpose(1, 2)

    q, k, v = rnd(B, L, 6, D), rnd(B, LK, 2, D), rnd(B, LK, 2, D)
    res = check(fn, (q, k, v))
    fused(res, kv_groups=3, scale=1.0 / math.sqrt(D))
    assert res.call["k"].shape[1] == 2


def repeat_kv_bthd(x, n):
    b, t, h, d = x.shape
    return x[:, :, :, None, :].expand(b, t, h, n, d).reshape(b, t, h * n, d)


def gqa_broadcast(q, k, v):
    return attend((q @ k.transpose(-2, -1)) * S, v)


def test_mqa_broadcast():
    res = check(gqa_broadcast, qkv(h=4, hkv=1, lk=LK))
    fused(res, kv_groups=4)
    assert res.call["k"].shape[1] == 1


def test_gqa_twin_mismatched_repeats():
    # K interleaved, V tiled: not one GQA layout, so attention runs on the repeated K/V.
    def fn(q, k, v):
        return attend((q @ k.repeat_interleave(2, dim=1).transpose(-2, -1)) * S, v.repeat(1, 2, 1, 1))

    res = check(fn, qkv(h=4, hkv=2))
    fused(res, kv_groups=1)
    assert res.call["k"].shape[1] == 4


# --------------------------------------------------------------------------- shapes

def test_cross_attention_with_padding_bias():
    res = check(mask_add, (*qkv(lq=L, lk=97), rnd(B, 1, 1, 97)))
    fused(res, mask="bias", shapes={"q": [B, H, L, D], "k": [B, H, 97, D], "v": [B, H, 97, D]})


def test_q_len_one_decode():
    res = check(NanoGPTAttention().eval(), qkv(lq=1, lk=LK))
    fused(res, shapes={"q": [B, H, 1, D], "k": [B, H, LK, D], "v": [B, H, LK, D]})


def test_new_sequence_lengths_recompile_dynamic_and_stay_fused():
    model = NanoGPTAttention().eval()
    compiled = _compile_dynamic_on_recompile(model)
    for t in (13, 17, 29):  # the second length makes dynamo recompile with a symbolic T
        q, k, v = qkv(lq=t, lk=t)
        torch.testing.assert_close(compiled(q, k, v), model(q, k, v))
        site = attnfuse.last_report().sites[0]
        assert site.status == "fused" and site.mask["kind"] == "causal", str(attnfuse.last_report())


def _compile_dynamic_on_recompile(fn):
    return torch.compile(fn, backend="attnfuse", options={"inner": "eager"})


def test_different_value_head_dim():
    q, k, _ = qkv(lk=LK)
    res = check(qk_at_transpose, (q, k, rnd(B, H, LK, 8)))
    fused(res, scale=S)


# --------------------------------------------------------------------------- SDPA and nn.MultiheadAttention

SDPA_CASES = {
    "plain": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), lambda: qkv(lk=LK), None, "none", 1),
    "causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), lambda: qkv(),
               None, "causal", 1),
    "scale": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=S), lambda: qkv(), S, "none", 1),
    "bool_mask": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                  lambda: (*qkv(lk=LK), keep_mask(L, LK)), None, "dense", 1),
    "float_mask": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                   lambda: (*qkv(lk=LK), rnd(B, 1, L, LK)), None, "bias", 1),
    "gqa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=0.2),
            lambda: qkv(h=6, hkv=2), 0.2, "none", 3),
}


@pytest.mark.parametrize("case", SDPA_CASES)
def test_sdpa(case):
    fn, make, scale, mask, groups = SDPA_CASES[case]
    res = check(fn, make())
    fused(res, scale=scale, mask=mask, kv_groups=groups)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_sdpa_fully_masked_rows_are_zero(kind):  # SDPA's convention, unlike softmax's NaN
    keep = dead_rows(B, 1, L, LK)
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, NEG)
    res = check(SDPA_CASES["bool_mask"][0], (*qkv(lk=LK), mask), grad=[0, 1, 2])
    fused(res, mask="dense" if kind == "bool" else "bias")
    assert (res.out[0][:, :, 3] == 0).all()


class MHA(nn.Module):
    def __init__(self, need_weights=False):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, 5, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x, y, key_padding_mask=None):
        out, w = self.mha(x, y, y, key_padding_mask=key_padding_mask, need_weights=self.need_weights)
        return out if w is None else (out, w)


def test_multihead_attention():
    res = check(MHA(), (rnd(B, L, D), rnd(B, LK, D)))
    fused(res, pattern="multi_head_attention_forward")
    padded = ~keep_mask(B, LK)
    padded[1] = True  # every key of the second sequence is padding: eager MHA returns the out_proj bias there
    res = check(MHA(), (rnd(B, L, D), rnd(B, LK, D), padded))
    fused(res)


def test_multihead_attention_twin_need_weights():
    skipped(check(MHA(need_weights=True), (rnd(B, L, D), rnd(B, LK, D))), "need_weights")


# --------------------------------------------------------------------------- regions that must stay as they are

def returns_probs(q, k, v):  # output_attentions=True
    p = ((q @ k.transpose(-2, -1)) * S).softmax(-1)
    return p @ v, p


def returns_scores(q, k, v):
    s = (q @ k.transpose(-2, -1)) * S
    return s.softmax(-1) @ v, s


def probs_reused(q, k, v):
    p = ((q @ k.transpose(-2, -1)) * S).softmax(-1)
    return p @ v + p.sum(-1, keepdim=True)


def probs_not_into_matmul(q, k, v):
    return (((q @ k.transpose(-2, -1)) * S).softmax(-1) * 2.0).sum(-1)


class Router(nn.Module):
    """matmul -> softmax -> matmul with learned weights: a mixture / classifier, not attention."""

    def __init__(self, rank4=False):
        super().__init__()
        shape = (1, 1) if rank4 else ()
        self.w = nn.Parameter(torch.randn(*shape, D, 7))
        self.e = nn.Parameter(torch.randn(*shape, 7, D))

    def forward(self, q, k, v):
        return (q @ self.w * S).softmax(-1) @ self.e


NEGATIVE_CASES = {  # fn, reason, arguments with gradients
    "returns_probs": (returns_probs, "also used by", None),
    "returns_scores": (returns_scores, "also used by", None),
    "probs_reused": (probs_reused, "also used by", None),
    "probs_not_into_matmul": (probs_not_into_matmul, "not a probabilities @ values matmul", [0, 1]),
    "router": (Router(), "learned weights", [0]),
    "router_rank4": (Router(rank4=True), "learned weights", [0]),
}


@pytest.mark.parametrize("case", NEGATIVE_CASES)
def test_not_fused(case):
    fn, reason, grad = NEGATIVE_CASES[case]
    skipped(check(fn, qkv(), grad=grad), reason)


# --------------------------------------------------------------------------- with the Inductor inner compiler

def test_inductor_nanogpt_causal():
    res = check(NanoGPTAttention().eval(), qkv(lq=17, lk=17), inner="inductor")
    fused(res, mask="causal")
    assert res.call["causal"] is True


def test_inductor_gqa_bias_softcap():
    def fn(q, k, v, bias):
        s = 20.0 * torch.tanh((q @ repeat_kv_expand(k, 3).transpose(2, 3)) * S / 20.0)
        return F.softmax(s + bias, dim=-1, dtype=torch.float32).to(q.dtype) @ repeat_kv_expand(v, 3)

    res = check(fn, (*qkv(h=6, hkv=2, lk=LK), rnd(B, 1, L, LK)), inner="inductor")
    fused(res, kv_groups=3, mask="bias", pattern="softcap")
    assert res.call["softcap"] == 20.0 and res.call["k"].shape[1] == 2
