"""``attnfuse.attention(..., sinks)``: attention sinks (GPT-OSS, x-transformers ``attn_sink``) on the CPU paths.

The reference is the third-party spelling itself (`sink_attention`: ``softmax(cat([s, sinks]))[..., :-1] @ v``)
in float64, eager the same code in the input dtype; the op must meet the 2x rule on the output and on the
gradients of q, k, v and the sinks.  Paths: the blocked reference (no structure) and the tiled band kernel
(window / causal band, ALiBi).  Rows whose every real key is masked are 0, as eager, for -inf and finite fills.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnfuse import ops
from tests.kernels._helpers import seed_case
from tests.kernels.flash._sinks_helpers import compare

# name: (B, H, Hkv, Lq, Lk, D, Dv, kwargs)
CASES = {
    "plain": (2, 3, 3, 37, 53, 40, 40, {}),
    "gqa_scale": (2, 4, 2, 41, 41, 24, 16, dict(scale=0.3)),
    "causal": (1, 2, 2, 97, 97, 40, 40, dict(causal=True)),
    "softcap": (1, 2, 1, 29, 31, 16, 16, dict(softcap=5.0)),
    "window_tiled": (1, 4, 2, 131, 131, 40, 40, dict(window_left=9, window_right=3)),
    "causal_window_tiled": (2, 2, 2, 97, 97, 40, 24, dict(window_left=13, causal=True)),
    "per_batch_sinks": (2, 3, 3, 37, 37, 16, 16, dict(sink_shape=(2, 3))),
    "batch_broadcast_sinks": (2, 3, 3, 37, 37, 16, 16, dict(sink_shape=(1, 3))),
    "tiled_per_batch_sinks": (2, 4, 2, 70, 70, 16, 16, dict(sink_shape=(2, 4), window_left=5, window_right=5)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_the_eager_spelling(name, dtype):
    seed_case(name, dtype)
    b, h, hk, lq, lk, d, dv, kw = CASES[name]
    compare(dtype, b, h, hk, lq, lk, d, dv, **kw)


def test_alibi_tiled():
    torch.manual_seed(3)
    compare(torch.float32, 1, 4, 4, 67, 67, 16, 16, alibi=torch.rand(4), causal=True)


@pytest.mark.parametrize("fill", [-math.inf, torch.finfo(torch.float32).min, -1e4], ids=["-inf", "finfo.min", "-1e4"])
@pytest.mark.parametrize("window", [False, True], ids=["dense", "tiled"])
def test_fully_masked_rows_are_zero(fill, window):
    """Padding that masks every key of some rows: eager's softmax over the sink alone gives out 0 (not NaN) and
    finite gradients; with a finite fill the masked keys still count (exp(fill - sink)), as eager."""
    torch.manual_seed(5)
    keep = torch.rand(2, 1, 45, 45) > 0.4
    keep[0, :, 3] = False  # row 3 of batch 0 sees no key
    keep[1, :, :, :] = False  # batch 1: every row dead
    kw = dict(window_left=20, window_right=20) if window else {}
    fill_kw = {} if fill == -math.inf else dict(mask_fill=fill)
    (out, *grads), (ref, *_) = compare(torch.float32, 2, 2, 2, 45, 45, 16, 16, mask=keep, **fill_kw, **kw)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    if fill == -math.inf:
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.equal(out[0, :, 3], torch.zeros_like(out[0, :, 3]))


def test_additive_mask_gradient():
    torch.manual_seed(6)
    bias = torch.randn(1, 2, 23, 29)
    compare(torch.float32, 1, 2, 2, 23, 29, 16, 16, mask=bias)


def test_sink_gradient_formula():
    """d sink_h = -sum_{b,i} P_sink(b,h,i) * delta(b,h,i), delta_i = dO_i . O_i: derived, checked in float64."""
    torch.manual_seed(7)
    q, k, v = (torch.randn(2, 3, 19, 8, dtype=torch.float64) for _ in range(3))
    sinks = torch.randn(3, dtype=torch.float64, requires_grad=True)
    do = torch.randn(2, 3, 19, 8, dtype=torch.float64)
    out = ops.attend(q, k, v, None, None, None, sinks)
    (ds,) = torch.autograd.grad(out, sinks, do)
    s = q @ k.transpose(-2, -1) / math.sqrt(8)
    lse = torch.logaddexp(torch.logsumexp(s, -1), sinks.detach()[:, None])
    p_sink = torch.exp(sinks.detach()[:, None] - lse)
    want = -(p_sink * (do * out).sum(-1)).sum((0, 2))
    torch.testing.assert_close(ds, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad, message", [
    (lambda: torch.zeros(5), "sinks must be one logit per head"),
    (lambda: torch.zeros(2, 3, 1), "sinks must be one logit per head"),
    (lambda: torch.zeros(3, 2), "sinks must be one logit per head"),
    (lambda: torch.zeros(2, dtype=torch.float64), "sinks must be float32"),
])
def test_invalid_sinks_raise(bad, message):
    q = torch.randn(2, 2, 9, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"attnfuse.attention: {message}"):
        ops.attend(q, q, q, None, None, None, bad())


def test_sinks_do_not_combine_with_window_pad():
    q = torch.randn(1, 2, 9, 8)
    with pytest.raises(ValueError, match="attnfuse.attention: sinks do not combine with window_pad=True"):
        ops.attend(q, q, q, None, None, None, torch.zeros(2), window_left=2, window_right=2, window_pad=True)
