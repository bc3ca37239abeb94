"""``window_pad=True`` in the Triton window kernels (`attnfuse.kernels.window`), run by Triton's interpreter.

The reference is the textbook ``unfold`` spelling itself (`_window_pad_helpers.unfold_attention`) in float64,
eager the same code in the input dtype: forward and backward with the 2x rule, float32 and float16, 16-row tiles
so that each case is a handful of programs (about 16 per launch) whose bands and edge rows cross tile edges.
Odd lengths, left != right, causal (right 0, or the causal flag) and two-sided bands, windows wider than the
sequence, GQA rows packed across tiles, softcap, a key mask, the op's dispatch to these kernels, and the split-K
forward (the padded keys enter the softmax once, in split 0).
"""

from __future__ import annotations

import pytest
import torch

import attnfuse  # noqa: F401 - registers torch.ops.attnfuse
from attnfuse.kernels import flash, reference, window
from tests._util import assert_2x
from tests.kernels._helpers import T16, T16x32, T32x16, seed_case
from tests.kernels.window._window_pad_helpers import unfold_attention

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on empty splits: 0/0, log2(0)

DTYPES = [torch.float32, torch.float16]


def _inputs(dtype, b, h, hk, length, d, dv):
    q, k, v = torch.randn(b, h, length, d), torch.randn(b, hk, length, d), torch.randn(b, hk, length, dv)
    return [x.to(dtype) for x in (q, k, v)], torch.randn(b, h, length, dv).to(dtype)


def _references(qkv, grad, left, right, **kw):
    """(eager in the inputs' dtype, float64): each (out, dq, dk, dv) of the unfold spelling."""
    runs = []
    for dt in (qkv[0].dtype, torch.float64):
        ins = [x.detach().to(dt).requires_grad_(True) for x in qkv]
        out = unfold_attention(*ins, left, right, **kw)
        out.backward(grad.to(dt))
        runs.append((out, *(x.grad for x in ins)))
    return runs


def _check(ours, eager, ref, what):
    for name, a, e, r in zip(("out", "dq", "dk", "dv"), ours, eager, ref):
        assert a.dtype == e.dtype and a.shape == r.shape, f"{what} {name}"
        assert_2x(a, e, r, f"{what} {name}")


# name: (B, H, Hkv, L, D, Dv, left, right, extra kwargs, tile config)
CASES = {
    "two_sided_5_3": (1, 2, 2, 47, 40, 40, 5, 3, {}, T16),
    "wide_20_9": (1, 2, 2, 47, 40, 40, 20, 9, {}, T16),
    "left0_right17": (1, 2, 2, 41, 40, 24, 0, 17, {}, T16),
    "causal_as_right0": (1, 2, 2, 47, 40, 40, 13, 0, {}, T16),
    "causal_flag": (1, 2, 2, 47, 40, 40, 13, -1, dict(causal=True), T16),
    "causal_caps_right": (1, 2, 2, 33, 40, 40, 7, 5, dict(causal=True), T16),
    "wider_than_sequence": (1, 2, 2, 33, 40, 40, 40, 51, {}, T16),
    "mqa3_9_2": (1, 3, 1, 33, 40, 40, 9, 2, {}, T16),  # tile edges split a row's heads
    "gqa2_m16n32": (1, 4, 2, 41, 40, 40, 10, 3, {}, T16x32),
    "m32n16_4_17": (2, 1, 1, 47, 40, 40, 4, 17, {}, T32x16),
    "softcap_gqa": (1, 4, 2, 33, 40, 40, 9, 4, dict(softcap=3.0, scale=0.5), T16),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_window_attention_matches_the_unfold_spelling(name, dtype):
    b, h, hk, length, d, dv, left, right, kw, cfg = CASES[name]
    seed_case("window_pad", name, dtype)
    qkv, grad = _inputs(dtype, b, h, hk, length, d, dv)
    kw = dict(kw)
    causal = kw.pop("causal", False)
    ref_right = (0 if right < 0 else min(right, 0)) if causal else right
    eager, ref = _references(qkv, grad, left, ref_right, **kw)
    ins = [x.detach().requires_grad_(True) for x in qkv]
    det = len(name) % 2 == 0  # both backward variants over the grid
    out = window.attention(*ins, window_size=(left, right), causal=causal, window_pad=True, config=cfg,
                           deterministic=det, **kw)
    out.backward(grad)
    _check((out, *(x.grad for x in ins)), eager, ref, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_mask_reaches_real_keys_only(dtype):
    """Row 0's real keys are all masked: its padded keys make it 0 (not NaN), with finite gradients."""
    seed_case("window_pad mask", dtype)
    qkv, grad = _inputs(dtype, 2, 2, 2, 37, 24, 24)
    keep = torch.rand(2, 37) > 0.3
    keep[:, :4] = False
    eager, ref = _references(qkv, grad, 6, 3, keep=keep)
    ins = [x.detach().requires_grad_(True) for x in qkv]
    out = window.attention(*ins, window_size=(6, 3), mask=keep[:, None, None, :], window_pad=True, config=T16)
    out.backward(grad)
    _check((out, *(x.grad for x in ins)), eager, ref, "key mask")
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_dispatches_to_the_window_kernel(dtype):
    """torch.ops.attnfuse.attention with window_pad under the interpreter: the Triton path (non-empty row
    statistics that count the padded keys), forward and backward."""
    seed_case("window_pad op", dtype)
    qkv, grad = _inputs(dtype, 1, 4, 2, 37, 40, 40)
    eager, ref = _references(qkv, grad, 11, 4)
    ins = [x.detach().requires_grad_(True) for x in qkv]
    out, stats = torch.ops.attnfuse.attention(*ins, window_left=11, window_right=4, kv_groups=2, window_pad=True)
    assert stats.shape == (1, 4, 37, 2)
    out.backward(grad)
    _check((out, *(x.grad for x in ins)), eager, ref, "op")
    # rows with padded keys start from m = 0: their max is never below 0
    edge = reference.phantom_keys(torch.arange(37), 37, 11, 4) > 0
    assert (stats[:, :, edge, 0] >= 0).all()


@pytest.mark.parametrize("splits", [2, 3])
def test_split_k_counts_the_padded_keys_once(splits):
    """Split-K forward (the padded keys folded into split 0 only) equals the one-split launch, and its
    statistics drive the backward to the unfold spelling's gradients."""
    seed_case("window_pad split", splits)
    qkv, grad = _inputs(torch.float32, 1, 2, 2, 47, 40, 40)
    eager, ref = _references(qkv, grad, 9, 14)
    kw = dict(window_size=(9, 14), window_pad=True, config=T16)
    one, one_stats = flash.forward(*qkv, splits=1, **kw)
    out, stats = flash.forward(*qkv, splits=splits, **kw)
    torch.testing.assert_close(out, one, rtol=1e-5, atol=1e-5)
    lse = stats[..., 0] + stats[..., 1]
    torch.testing.assert_close(lse, one_stats[..., 0] + one_stats[..., 1], rtol=1e-5, atol=1e-5)
    dq, dk, dv, _ = flash.backward(grad, *qkv, out, stats, **kw)
    _check((out, dq, dk, dv), eager, ref, f"splits={splits}")


@pytest.mark.parametrize("kw,match", [
    (dict(window_size=(-1, 3)), "needs a finite band"),
    (dict(window_size=(3, -1)), "needs a finite band"),
    (dict(window_size=(3, 2), lk=9), "q_len == kv_len"),
    (dict(window_size=(3, 2), alibi=True), "alibi"),
])
def test_refusals(kw, match):
    kw = dict(kw)
    lk = kw.pop("lk", 7)
    q, k = torch.randn(1, 2, 7, 8), torch.randn(1, 2, lk, 8)
    if kw.pop("alibi", False):
        kw["alibi"] = torch.ones(2)
    with pytest.raises(ValueError, match=f"attnfuse.kernels.window.attention: window_pad=True .*{match}"):
        window.attention(q, k, k, window_pad=True, **kw)
    with pytest.raises(ValueError, match="window_pad must be True or False"):
        window.attention(q, q, q, window_size=(2, 2), window_pad=1)
