"""The sliding-window and ALiBi paths of the Triton kernels (`attnfuse.kernels.window`), run by Triton's interpreter.

Same method as test_flash_interpret.py (whose textbook and `compare`, tests/kernels/_helpers.py, these reuse):
forward and backward against a float64 textbook with the 2x rule, float16 and float32, 16x16 tiles so that each
case is a handful of programs whose bands start, end and cross tile edges: windows narrower and wider than a
tile and than the sequence, left != right, zero widths, one side unbounded, q_len != kv_len (top-left aligned),
GQA rows packed across tiles, softcap, dropout, masks, rows that see no key, and split-K decode.  The band's
skipped tiles are checked by poisoning K/V there: the kernels must never read them.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnfuse.kernels import flash, window
from tests._util import assert_2x, band
from tests.kernels._helpers import (
    DTYPES,
    T16,
    T16x32,
    T32x16,
    alibi_bias,
    compare,
    leaf,
    qkv,
    recover_keep,
    seed_case,
    textbook,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on NaN rows: 0/0, log2(0)


def _window_compare(dtype, q, k, v, g, left, right, *, causal=False, slopes=None, **kw):
    lq, lk = q.shape[2], k.shape[2]
    bias = None if slopes is None else alibi_bias(slopes, lq, lk)
    return compare(dtype, q, k, v, g, attend=window.attention, window_size=(left, right), causal=causal,
                    alibi=slopes, bias=bias, visible=band(lq, lk, left, right, causal), **kw)


# --------------------------------------------------------------------------------------------- the grid

# name: (B, H, Hkv, Lq, Lk, D, Dv, left, right, extra kwargs, tile config)
WINDOWS = {
    "narrow_3_2": (1, 2, 2, 47, 47, 40, 40, 3, 2, {}, T16),
    "wide_20_5": (1, 2, 2, 47, 47, 40, 40, 20, 5, {}, T16),
    "left0_right9": (1, 2, 2, 33, 47, 40, 40, 0, 9, {}, T16),
    "left11_right0_q41_k33": (1, 2, 2, 41, 33, 40, 40, 11, 0, {}, T16),
    "left_unbounded_right4": (1, 2, 2, 33, 33, 40, 40, -1, 4, {}, T16),
    "left6_right_unbounded": (1, 2, 2, 33, 41, 40, 40, 6, -1, {}, T16),
    "wider_than_sequence": (1, 2, 2, 33, 33, 40, 40, 100, 70, {}, T16),
    "causal_left13": (1, 2, 2, 47, 47, 40, 40, 13, -1, dict(causal=True), T16),
    "causal_caps_right": (1, 2, 2, 33, 33, 40, 40, 7, 5, dict(causal=True), T16),
    "q33_k47_5_20": (2, 1, 1, 33, 47, 40, 40, 5, 20, {}, T16),
    "gqa2_6_6": (1, 4, 2, 33, 33, 40, 40, 6, 6, {}, T16),
    "mqa3_9_1": (1, 3, 1, 33, 33, 40, 40, 9, 1, {}, T16),  # tile edges split a row's heads
    "m16n32_10_3": (1, 2, 2, 47, 47, 40, 40, 10, 3, {}, T16x32),
    "m32n16_4_17": (1, 2, 2, 47, 47, 40, 40, 4, 17, {}, T32x16),
    "dv24": (1, 2, 2, 33, 41, 40, 24, 8, 8, {}, T16),
    "softcap_gqa": (1, 4, 2, 33, 33, 40, 40, 9, 0, dict(softcap=3.0, scale=0.5), T16),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(WINDOWS))
def test_forward_backward(name, dtype):
    b, h, hk, lq, lk, d, dv, left, right, kw, cfg = WINDOWS[name]
    seed_case("window", name, dtype)
    q, k, v = qkv(dtype, b, h, hk, lq, lk, d, dv)
    g = torch.randn(b, h, lq, dv).to(dtype)
    det = len(name) % 2 == 0  # both backward variants over the grid
    _window_compare(dtype, q, k, v, g, left, right, config=cfg, deterministic=det, what=name, **kw)


@pytest.mark.parametrize("det", [False, True])
def test_zero_width_band(det):
    """left = right = 0: every row sees its own key only; out = v and dq = dk = 0 up to delta's rounding."""
    seed_case("zero-width", det)
    q, k, v = qkv(torch.float32, 1, 4, 2, 33, 33, 40, 40)
    g = torch.randn(1, 4, 33, 40)
    out = _window_compare(torch.float32, q, k, v, g, 0, 0, config=T16, deterministic=det, one_key=True,
                          what="zero width")
    assert torch.equal(out, v.repeat_interleave(2, 1))


def test_full_band_is_flash():
    """An unbounded band runs flash's own paths bit for bit: none, and causal (with its NaN-in-V rule)."""
    seed_case("full-band")
    q, k, v = qkv(torch.float32, 1, 4, 2, 33, 41, 40, 40)
    plain = flash.attention(q, k, v, config=T16)
    assert torch.equal(window.attention(q, k, v, window_size=(-1, -1), config=T16), plain)
    causal = flash.attention(q, k, v, causal=True, config=T16)
    assert torch.equal(window.attention(q, k, v, window_size=(-1, 0), config=T16), causal)
    assert torch.equal(window.attention(q, k, v, window_size=(-1, -1), causal=True, config=T16), causal)


# band edges at tile residues: widths one short of, at and past a tile, left/right asymmetric, and pairs wide on
# both sides whose whole-tile bounds fall one row or key off a tile edge (for 16-row tiles, and packed by 3)
EDGES = [(0, 14), (15, 1), (16, 17), (14, 0), (31, -1), (-1, 33), (1, 1), (17, 30), (30, 15), (14, 20), (4, 16),
         (20, 4)]


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("cfg", [T16, T16x32, T32x16], ids=["m16n16", "m16n32", "m32n16"])
def test_band_edges_equal_the_dense_masked_kernel(cfg, groups):
    """The band's tile bounds (forward, dQ and dK/dV programs) against the dense kernel with the band as a bool
    mask: skipping a tile whose scores are all -inf adds exactly nothing, so the results agree to rounding
    (bitwise when interpreted; compiled, the unmasked tiles may contract other multiply-adds).  A wrong bound
    drops or adds whole keys: errors of order 1."""
    seed_case("edges", cfg, groups)
    lq, lk = 37, 45
    q, k, v = qkv(torch.float32, 1, groups, 1, lq, lk, 16, 16)
    g = torch.randn(1, groups, lq, 16)
    for left, right in EDGES:
        runs = []
        for attend in (lambda *x: window.attention(*x, window_size=(left, right), config=cfg, deterministic=True),
                       lambda *x: flash.attention(*x, mask=band(lq, lk, left, right), config=cfg, deterministic=True)):
            ins = [leaf(x) for x in (q, k, v)]
            out = attend(*ins)
            out.backward(g)
            runs.append((out, *(x.grad for x in ins)))
        for name, a, b in zip(("out", "dq", "dk", "dv"), *runs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{name} differs for ({left}, {right})")


# --------------------------------------------------------------------------------------------- ALiBi

# name: (B, H, Hkv, Lq, Lk, left, right, extra kwargs)
ALIBI = {
    "dense": (1, 4, 4, 33, 41, -1, -1, {}),  # ALiBi alone: the flash path with slopes
    "causal_gqa": (1, 4, 2, 33, 33, -1, -1, dict(causal=True)),  # flash's causal path with slopes
    "window_gqa": (1, 4, 2, 47, 47, 12, 0, {}),
    "window_softcap": (1, 2, 2, 33, 33, 5, 5, dict(softcap=4.0)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(ALIBI))
def test_alibi(name, dtype):
    b, h, hk, lq, lk, left, right, kw = ALIBI[name]
    seed_case("alibi", name, dtype)
    q, k, v = qkv(dtype, b, h, hk, lq, lk, 40, 40)
    slopes = torch.rand(h) + 0.05  # up to ~50 score units across the sequence: the bias dominates
    g = torch.randn(b, h, lq, 40).to(dtype)
    _window_compare(dtype, q, k, v, g, left, right, slopes=slopes, config=T16, deterministic=len(name) % 2 == 0,
                    what=name, **kw)


# --------------------------------------------------------------------------------------------- masks and dead rows


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_window_with_bool_mask_finite_fill(dtype):
    """A row the mask kills inside its band is uniform over the band (the fill is finite), as eager."""
    seed_case("mask-fill", dtype)
    q, k, v = qkv(dtype, 2, 2, 2, 33, 41, 40, 40)
    mask = torch.rand(2, 1, 33, 41) > 0.3
    mask[:, :, 9] = False
    out = _window_compare(dtype, q, k, v, torch.randn(2, 2, 33, 40).to(dtype), 4, 4, mask=mask, mask_fill=-2.0,
                          config=T16, what="finite fill")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("det", [False, True])
def test_window_with_bias_grad(det):
    """An additive bias inside the band gets its gradient; outside the band it gets 0 (p = 0 there)."""
    seed_case("bias-grad", det)
    q, k, v = qkv(torch.float32, 1, 4, 2, 33, 41, 40, 40)
    bias = torch.randn(4, 33, 41)
    _window_compare(torch.float32, q, k, v, torch.randn(1, 4, 33, 40), 7, 2, mask=bias, mask_grad=True,
                    config=T16, deterministic=det, what="bias grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,det", [("band", False), ("band", True), ("mask", False), ("mask", True)])
def test_rows_without_keys_are_nan(kind, dtype, det):
    """Rows that see no key are NaN: rows whose band misses every key (q_len > kv_len + left; from row 40 on,
    whole programs of them visit no tile), or a row a mask kills inside its band.  The gradients have eager's
    NaN pattern: the dead rows' dQ, and all of dK/dV of their K/V head (eager's P^T dO sums every row), so a
    band-dead row poisons every head and a masked one only its own; `compare` checks the patterns exactly."""
    seed_case("dead", kind, dtype, det)
    lq, lk, left, right = (65, 17, 2, 0) if kind == "band" else (33, 33, 5, 5)
    q, k, v = qkv(dtype, 2, 4, 2, lq, lk, 40, 40)
    mask = torch.ones(2, 4, lq, lk, dtype=torch.bool)
    mask[0, 1, 5] = False
    out = _window_compare(dtype, q, k, v, torch.randn(2, 4, lq, 40).to(dtype), left, right, mask=mask, config=T16,
                          deterministic=det, what=f"dead rows ({kind})")
    dead = out.isnan().all(-1)
    expect = torch.zeros(2, 4, lq, dtype=torch.bool)
    expect[:, :, lk + left:] = True
    expect[0, 1, 5] = True
    assert torch.equal(dead, expect) and not out.isnan().any(-1)[~dead].any()


# --------------------------------------------------------------------------------------------- skipping


def _poisoned(x: torch.Tensor, keys: slice, value: float) -> torch.Tensor:
    y = x.clone()
    y[:, :, keys] = value
    return y


@pytest.mark.parametrize("left,right", [(5, 5), (20, 0)])
def test_tiles_outside_the_band_are_never_read(left, right):
    """NaN in K and Inf in V at keys 66..73 (inside the 16-key tile 64..79) reach no output row, dQ or dK/dV
    whose programs' bands stay clear of that tile: the kernels skip it instead of masking it.  Those parts are
    bitwise the unpoisoned run (deterministic backward).  (No row sees only poisoned keys: such a row would
    look like a row without keys, whose NaN reaches all of dV.)"""
    seed_case("poison", left, right)
    lq = lk = 97
    q, k, v = qkv(torch.float32, 1, 2, 2, lq, lk, 40, 40)
    g = torch.randn(1, 2, lq, 40)
    runs = []
    for kk, vv in ((k, v), (_poisoned(k, slice(66, 74), float("nan")), _poisoned(v, slice(66, 74), float("inf")))):
        ins = [leaf(x) for x in (q, kk, vv)]
        out = window.attention(*ins, window_size=(left, right), config=T16, deterministic=True)
        out.backward(g)
        runs.append((out, *(x.grad for x in ins)))
    # query tiles whose rows' bands end before key 64 (whole tiles: rows < 64 - right), key tiles whose rows
    # (key j is seen by rows <= j + left, whole tiles) end before the poisoned query tiles (rows >= 48)
    clean_rows = slice(0, (64 - right - 1) // 16 * 16)
    clean_keys = slice(0, (48 - left - 1) // 16 * 16)
    assert clean_rows.stop >= 32 and clean_keys.stop >= 16
    for i, (a, b) in enumerate(zip(*runs)):
        part = clean_rows if i < 2 else clean_keys
        assert torch.isfinite(b[:, :, part]).all(), i
        assert torch.equal(a[:, :, part], b[:, :, part]), i


# --------------------------------------------------------------------------------------------- dropout, split-K


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("det", [False, True])
def test_dropout_window(dtype, det):
    """Dropout keys its mask by position, so the band's keep mask is the one read off the dense kernel; the
    windowed forward and backward agree with textbook attention under that mask and band."""
    seed_case("dropout-window", dtype, det)
    p, seed = 0.3, 4321
    q, k, v = qkv(dtype, 1, 4, 2, 33, 40, 24, 24)
    keep = recover_keep(q.float(), k.float(), causal=False, p=p, seed=seed, config=T16)
    g = torch.randn(1, 4, 33, 24).to(dtype)
    _window_compare(dtype, q, k, v, g, 6, 3, keep=keep, dropout_p=p, seed=seed, config=T16, deterministic=det,
                    what="dropout window")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lq,h,hk,left,right", [(1, 2, 2, 10, 60), (3, 4, 1, 30, 40), (2, 2, 1, -1, 50)])
def test_split_k_window(dtype, lq, h, hk, left, right):
    """Decode-size query sides split the band's keys over programs and merge them: equal to the unsplit run."""
    seed_case("split-window", dtype, lq, h, hk, left, right)
    q, k, v = qkv(dtype, 2, h, hk, lq, 97, 64, 40)
    kw = dict(window_size=(left, right), config=T16)
    whole, stats = flash.forward(q, k, v, **kw, splits=1)
    split, stats_split = flash.forward(q, k, v, **kw, splits=3)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(split, whole, atol=2 * eps, rtol=2 * eps)
    torch.testing.assert_close(stats_split.sum(-1), stats.sum(-1), atol=1e-5, rtol=1e-6)
    vis = band(lq, 97, left, right)
    eager = textbook(q, k, v, visible=vis)
    ref = textbook(q.double(), k.double(), v.double(), visible=vis)
    assert_2x(split, eager, ref, "split window")


# --------------------------------------------------------------------------------------------- validation


def test_validation():
    q, k, v = qkv(torch.float32, 1, 2, 2, 8, 8, 16, 16)
    with pytest.raises(ValueError, match="window_size"):
        window.attention(q, k, v, window_size=(2.5, 0))
    with pytest.raises(ValueError, match="one slope per query head"):
        window.attention(q, k, v, window_size=(2, 0), alibi=torch.rand(3))
    with pytest.raises(ValueError, match="no gradient"):
        window.attention(q, k, v, window_size=(2, 0), alibi=torch.rand(2, requires_grad=True))


def test_slopes_scale_like_eager():
    """ALiBi is in the scores' natural units: a slope of ln(2) halves a key's weight per step of distance."""
    q = torch.zeros(1, 1, 1, 16)
    k = torch.zeros(1, 1, 5, 16)
    v = torch.eye(5)[None, None]
    out = window.attention(q, k, v, window_size=(-1, -1), alibi=torch.tensor([math.log(2.0)]), config=T16)
    weights = 2.0 ** torch.arange(5.0)
    torch.testing.assert_close(out[0, 0, 0], weights / weights.sum(), atol=1e-6, rtol=1e-6)
