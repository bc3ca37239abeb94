"""Attention sinks through ``backend="attnfuse"``: GPT-OSS's eager spelling (``cat([scores, sinks])``, optional
row-max shift, softmax, ``[..., :-1]``) and x-transformers' (``cat([sink, scores])``, ``[..., 1:]``) fused into
one op call with ``sinks``, numbers and gradients (the sink parameter's too) within the 2x rule; negative twins
stay unfused with their reason."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _harness import check, fused, skipped

B, H, HKV, L, D = 2, 4, 2, 23, 16


def _repeat(x: torch.Tensor, groups: int) -> torch.Tensor:  # transformers' repeat_kv
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def gpt_oss(q, k, v, sinks, mask=None, *, shift=True, dropout=0.0):
    k, v = _repeat(k, q.shape[1] // k.shape[1]), _repeat(v, q.shape[1] // v.shape[1])
    w = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    if mask is not None:
        w = w + mask
    s = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
    combined = torch.cat([w, s], dim=-1)
    if shift:
        combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = F.softmax(combined, dim=-1, dtype=combined.dtype)
    p = F.dropout(probs[..., :-1], p=dropout, training=dropout > 0)
    return torch.matmul(p, v)


def sink_first(q, k, v, sinks):  # x-transformers: the sink column first, dropped with [..., 1:]
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
    causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).triu(1)
    sim = sim.masked_fill(causal, -torch.finfo(sim.dtype).max)
    col = sinks.unsqueeze(0).unsqueeze(2).expand(q.shape[0], -1, q.shape[-2]).reshape(*sim.shape[:-1], 1)
    attn = torch.cat((col, sim), dim=-1).softmax(-1, dtype=torch.float32).type(sim.dtype)
    return torch.einsum("bhij,bhjd->bhid", attn[..., 1:], v)


def _qkv(hkv=HKV, length=L):
    return torch.randn(B, H, length, D), torch.randn(B, hkv, length, D), torch.randn(B, hkv, length, D)


def _causal_additive(length=L, pad=None):
    keep = torch.ones(length, length, dtype=torch.bool).tril()[None, None].expand(B, 1, -1, -1)
    if pad is not None:
        keep = keep & pad[:, None, None, :]
    return torch.zeros(B, 1, length, length).masked_fill(~keep, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("shift", [True, False], ids=["max-shift", "no-shift"])
def test_gpt_oss_training(shift):
    torch.manual_seed(1)
    q, k, v = _qkv()
    res = check(lambda q, k, v, s: gpt_oss(q, k, v, s, shift=shift), (q, k, v, torch.randn(H)))
    fused(res, pattern="sink", kv_groups=H // HKV)
    assert res.call["sinks"] is not None and res.call["sinks"].shape[-1] == H


def test_gpt_oss_inference_causal_mask():
    torch.manual_seed(2)
    q, k, v = _qkv()
    with torch.no_grad():
        res = check(lambda q, k, v, s, m: gpt_oss(q, k, v, s, m), (q, k, v, torch.randn(H), _causal_additive()),
                    grad=[])
    fused(res, pattern="sink")


def test_padding_with_fully_masked_rows():
    """Left padding: the first rows of the padded sequence see no key (HF's finite finfo.min fill): eager's softmax
    over [min, ..., min, sink] puts everything on the sink, so those rows are 0; gradients everywhere."""
    torch.manual_seed(3)
    q, k, v = _qkv()
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[1, :6] = False
    res = check(lambda q, k, v, s, m: gpt_oss(q, k, v, s, m), (q, k, v, torch.randn(H), _causal_additive(pad=pad)),
                grad=[0, 1, 2, 3])
    fused(res, pattern="sink")
    assert torch.allclose(res.out[0][1, :, :6], torch.zeros(()), atol=1e-30)


def test_bool_mask_inf_fill_dead_rows():
    torch.manual_seed(4)
    q, k, v = _qkv(hkv=H)
    keep = torch.rand(B, 1, L, L) > 0.5
    keep[0, :, 2] = False

    def fn(q, k, v, s, keep):
        w = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        w = w.masked_fill(~keep, float("-inf"))
        combined = torch.cat([w, s[None, :, None, None].expand(B, H, L, 1)], -1)
        return combined.softmax(-1)[..., :-1] @ v

    res = check(fn, (q, k, v, torch.randn(H), keep), grad=[0, 1, 2, 3])
    fused(res, pattern="sink")
    assert torch.equal(res.out[0][0, :, 2], torch.zeros(H, D))


def test_sink_first_x_transformers():
    torch.manual_seed(5)
    q, k, v = _qkv(hkv=H)
    res = check(sink_first, (q, k, v, torch.randn(H)))
    fused(res, pattern="sink")


def test_gqa_sink_gradient():
    torch.manual_seed(6)
    q, k, v = _qkv(hkv=1, length=31)
    res = check(gpt_oss, (q, k, v, torch.randn(H) * 3), grad=[3])
    fused(res, kv_groups=H)


# --- negative twins ----------------------------------------------------------------------------------------------

def test_sink_varying_along_queries_is_not_fused():
    torch.manual_seed(7)
    q, k, v = _qkv(hkv=H)

    def fn(q, k, v, s):
        w = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        col = s[None, :, :, None].expand(B, H, L, 1)  # (H, L): one logit per head AND query
        return torch.cat([w, col], -1).softmax(-1)[..., :-1] @ v

    res = check(fn, (q, k, v, torch.randn(H, L)))
    skipped(res, "not provably constant along the queries")


def test_slice_dropping_another_column_is_not_fused():
    torch.manual_seed(8)
    q, k, v = _qkv(hkv=H)

    def fn(q, k, v, s):
        w = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        p = torch.cat([w, s.reshape(1, -1, 1, 1).expand(B, H, L, 1)], -1).softmax(-1)
        return p[..., 1:] @ v  # drops key 0, keeps the sink column as a key

    res = check(fn, (q, k, v, torch.randn(H)), grad=[])
    skipped(res, "does not drop exactly the last (sink) column")


def test_sink_column_kept_in_p_is_not_fused():
    torch.manual_seed(9)
    q, k, v = _qkv(hkv=H)

    def fn(q, k, v, s, vs):
        w = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        p = torch.cat([w, s.reshape(1, -1, 1, 1).expand(B, H, L, 1)], -1).softmax(-1)
        return p @ torch.cat([v, vs.expand(B, H, 1, D)], -2)  # the sink has a value: it is a key

    res = check(fn, (q, k, v, torch.randn(H), torch.randn(1, 1, 1, D)), grad=[])
    skipped(res, "kept in the probabilities")
