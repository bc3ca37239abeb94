"""The Triton FlashAttention kernels, run on the CPU by Triton's interpreter.

Every case checks the forward and the backward (dq, dk, dv and a bias gradient) against a
float64 textbook reference with the project's 2x rule: our error is at most twice the error
of the same textbook attention computed by PyTorch eager in the input dtype.  Small tiles
keep each case to a handful of Triton programs while still crossing tile boundaries (causal
diagonal tiles, tails of odd lengths, GQA rows packed across tiles).  float16 and float32
only: the interpreter's bfloat16 ``tl.dot`` is not exact enough to judge the kernel by.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import attnfuse  # noqa: F401 - registers torch.ops.attnfuse
from attnfuse import ops
from attnfuse.costmodel import tiles
from attnfuse.kernels import flash
from tests._util import assert_2x
from tests.kernels._helpers import (
    DTYPES,
    T16,
    T16x32,
    T32x16,
    compare,
    leaf,
    qkv,
    recover_keep,
    seed_case,
    textbook,
    visible_keys,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on NaN rows: 0/0, log2(0)

T32 = tiles.TileConfig(32, 32, 4, 2)
_INF = float("-inf")


def _lse2(stats: torch.Tensor) -> torch.Tensor:
    """The base-2 row log-sum-exp from the forward's row statistics: (B, H, Lq) lse, or (B, H, Lq, 2) holding
    the row max and log2 of the row sum."""
    return stats[..., 0] + stats[..., 1] if stats.dim() == 4 else stats


# --------------------------------------------------------------------------------------------- the grid

# name: (B, H, Hkv, Lq, Lk, D, Dv, extra kwargs, tile config)
SHAPES = {
    "square97": (1, 2, 2, 97, 97, 64, 64, {}, T32),
    "causal97": (1, 2, 2, 97, 97, 64, 64, dict(causal=True), T32),
    "causal97_m16n32": (1, 1, 1, 97, 97, 40, 40, dict(causal=True), T16x32),
    "causal97_m32n16": (1, 1, 1, 97, 97, 40, 40, dict(causal=True), T32x16),
    "cross_q17_k97": (2, 1, 1, 17, 97, 40, 40, {}, T16),
    "causal_q17_k97": (2, 1, 1, 17, 97, 40, 40, dict(causal=True), T16),
    "causal_q97_k17": (2, 1, 1, 97, 17, 40, 40, dict(causal=True), T16),
    "qlen1": (2, 2, 2, 1, 97, 64, 64, {}, T16),
    "qlen1_causal": (2, 2, 2, 1, 97, 64, 64, dict(causal=True), T16),
    "len1": (2, 2, 2, 1, 1, 40, 40, {}, T16),
    "len17": (2, 2, 2, 17, 17, 64, 64, dict(causal=True), T16),
    "gqa4_causal": (1, 8, 2, 33, 33, 40, 40, dict(causal=True), T32),
    "gqa4_causal_m16": (1, 4, 1, 17, 23, 64, 64, dict(causal=True), T16),
    "mqa3_causal": (1, 3, 1, 33, 33, 40, 40, dict(causal=True), T16),  # tile edges split a row's heads
    "mqa_cross": (2, 4, 1, 17, 37, 64, 64, {}, T16),
    "dv24": (1, 2, 2, 33, 41, 40, 24, {}, T16),
    "dv24_gqa_causal": (1, 4, 2, 41, 33, 40, 24, dict(causal=True), T16),
    "softcap": (1, 2, 2, 33, 33, 64, 64, dict(softcap=5.0, scale=1.0), T16),
    "softcap_causal_gqa": (1, 4, 2, 33, 33, 40, 40, dict(softcap=3.0, scale=0.5, causal=True), T16),
    "scale": (1, 2, 2, 33, 49, 40, 40, dict(scale=0.37), T16),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_forward_backward(name, dtype):
    b, h, hk, lq, lk, d, dv, kw, cfg = SHAPES[name]
    seed_case(name, dtype)
    q, k, v = qkv(dtype, b, h, hk, lq, lk, d, dv)
    grad_out = torch.randn(b, h, lq, dv).to(dtype)
    # the grid alternates the two backward variants; test_deterministic checks they agree
    det = zlib.crc32(name.encode()) % 2 == 0
    one_key = lk == 1 or (lq == 1 and kw.get("causal", False))
    compare(dtype, q, k, v, grad_out, config=cfg, deterministic=det, what=name, one_key=one_key, **kw)


# name: (mask shape, requires grad, causal)
BIASES = {
    "kv_row_grad": ((41,), True, False),
    "full_2d_grad_causal": ((1, 1, 33, 41), True, True),
    "batch_row_grad": ((2, 1, 1, 41), True, False),
    "head_full_grad_causal": ((2, 33, 41), True, True),
    "batch_head_full_grad": ((2, 2, 33, 41), True, False),
    "head_full_nograd": ((2, 33, 41), False, True),
    "kv_row_nograd": ((41,), False, False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(BIASES))
def test_bias(name, dtype):
    shape, grad, causal = BIASES[name]
    seed_case("bias", name, dtype)
    q, k, v = qkv(dtype, 2, 2, 2, 33, 41, 40, 40)
    bias = (2 * torch.randn(shape)).to(dtype)
    grad_out = torch.randn(2, 2, 33, 40).to(dtype)
    compare(dtype, q, k, v, grad_out, mask=bias, mask_grad=grad, causal=causal, config=T16, what=name)


@pytest.mark.parametrize("det", [False, True])
def test_bias_grad_gqa(det):
    """A per-head bias gradient with GQA: the bias gradient of each query head, K/V summed over the group."""
    seed_case("bias_gqa", det)
    q, k, v = qkv(torch.float32, 1, 4, 2, 33, 33, 40, 40)
    bias = torch.randn(4, 33, 33)
    g = torch.randn(1, 4, 33, 40)
    compare(torch.float32, q, k, v, g, mask=bias, mask_grad=True, causal=True, config=T16, deterministic=det,
             what="bias gqa")


# name: (mask shape, fill, causal): True = attend
BOOL_MASKS = {
    "full_inf": ((2, 2, 33, 41), None, False),
    "full_inf_causal": ((2, 2, 33, 41), None, True),
    "bcast_batch_inf": ((2, 1, 33, 41), None, False),
    "bcast_2d_inf_causal": ((33, 41), None, True),
    "kv_row_inf": ((2, 1, 1, 41), None, False),
    "full_finfo_min": ((2, 2, 33, 41), "min", False),
    "full_finfo_min_causal": ((2, 2, 33, 41), "min", True),
    "soft_fill": ((2, 1, 33, 41), -3.0, False),  # masked keys still get weight exp(-3)
    "soft_fill_causal": ((33, 41), -1.0, True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(BOOL_MASKS))
def test_bool_mask(name, dtype):
    shape, fill, causal = BOOL_MASKS[name]
    seed_case("bool", name, dtype)
    q, k, v = qkv(dtype, 2, 2, 2, 33, 41, 64, 64)
    mask = torch.rand(shape) > 0.4
    mask[..., 0] = True  # no fully masked rows by chance (row 0 sees key 0 only when causal)
    mask_fill = torch.finfo(dtype).min if fill == "min" else fill
    if mask_fill is not None and mask.dim() == 4:
        mask[..., 5, :] = False  # a fully masked row: uniform over the (causally) visible keys, as eager
    grad_out = torch.randn(2, 2, 33, 64).to(dtype)
    out = compare(dtype, q, k, v, grad_out, mask=mask, mask_fill=mask_fill, causal=causal, config=T16,
                   deterministic=causal, what=name)
    if mask_fill is not None and mask.dim() == 4:
        assert torch.isfinite(out).all()
        if fill == "min":
            expect = v[..., :6 if causal else 41, :].double().mean(-2)
            tol = 8 * torch.finfo(dtype).eps
            torch.testing.assert_close(out[..., 5, :].double(), expect, atol=tol, rtol=tol)


# --------------------------------------------------------------------------------------------- fully masked rows


def _dead_mask(kind):
    """A mask (33 x 41 scores, 2 batches x 2 heads) killing rows 0, 7, 32 of some (batch, head)."""
    if kind == "bool":
        m = torch.rand(2, 2, 33, 41) > 0.3
        m[0, 1, 7] = False
        m[1, :, 32] = False
        m[:, 0, 0] = False
    else:
        m = torch.randn(2, 2, 33, 41)
        m[0, 1, 7] = _INF
        m[1, :, 32] = _INF
        m[:, 0, 0] = _INF
        m[0, 0, 3, ::2] = _INF  # partly masked: finite
    return m


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "bias"])
def test_fully_masked_rows_nan(kind, dtype):
    """Rows with every score -inf are NaN, exactly where eager softmax is; the others are accurate.

    Non-causal, the gradients have eager's NaN pattern too (dV is NaN everywhere: P^T dO sums a NaN row).
    """
    seed_case("dead", kind, dtype)
    q, k, v = qkv(dtype, 2, 2, 2, 33, 41, 40, 40)
    mask = _dead_mask(kind)
    if kind == "bias":
        mask = mask.to(dtype)
    out = compare(dtype, q, k, v, torch.randn(2, 2, 33, 40).to(dtype), mask=mask, config=T16, what="dead")
    dead = out.isnan().all(-1)
    assert dead.sum() == 1 + 2 + 2 and dead[0, 1, 7] and dead[1, :, 32].all() and dead[:, 0, 0].all()
    assert not out.isnan().any(-1)[~dead].any()


@pytest.mark.parametrize("splits", [None, 3])
def test_fully_masked_rows_nan_causal(splits):
    """Causal: a row is dead when the mask kills its visible keys (key 0 for row 0); split-K merges NaN too."""
    seed_case("dead_causal", splits)
    q, k, v = qkv(torch.float32, 1, 2, 1, 3, 97, 64, 64)
    mask = torch.rand(1, 2, 3, 97) > 0.3
    mask[..., 0, 0] = False  # row 0 sees key 0 only
    mask[0, 1, 2, :3] = False  # row 2 sees keys 0..2 only
    mask[..., 1, 1] = True  # row 1 sees key 1
    out = flash.attention(q, k, v, mask=mask, causal=True, config=T16, splits=splits)
    eager = textbook(q, k, v, mask, causal=True)
    ref = textbook(q.double(), k.double(), v.double(), mask, causal=True)
    assert_2x(out, eager, ref)
    assert out.isnan().all(-1).tolist() == [[[True, False, False], [True, False, True]]]


# --------------------------------------------------------------------------------------------- backward variants


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal,h,hk,lq,lk", [(True, 4, 2, 41, 33), (False, 2, 2, 17, 49), (True, 3, 1, 33, 33)])
def test_deterministic(dtype, causal, h, hk, lq, lk):
    """deterministic=True is bitwise repeatable; it agrees closely with the atomic-dQ backward."""
    seed_case("det", dtype, causal, h, hk, lq, lk)
    q, k, v = qkv(dtype, 1, h, hk, lq, lk, 40, 40)
    mask = torch.randn(lq, lk).to(dtype)  # no grad: the atomic path stays available
    g = torch.randn(1, h, lq, 40).to(dtype)
    runs = []
    for det in (True, True, False):
        ins = [leaf(x) for x in (q, k, v)]
        out = flash.attention(*ins, mask=mask, causal=causal, config=T16, deterministic=det)
        out.backward(g)
        runs.append((out, *(x.grad for x in ins)))
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    for name, a, b in zip(("out", "dq", "dk", "dv"), runs[0], runs[2]):
        tol = 8 * torch.finfo(dtype).eps * b.abs().max().item()
        torch.testing.assert_close(a, b, atol=tol, rtol=0, msg=f"{name}: deterministic vs atomic")
    ref_in = [leaf(x, torch.float64) for x in (q, k, v)]
    textbook(*ref_in, mask.double(), causal=causal).backward(g.double())
    eager_in = [leaf(x) for x in (q, k, v)]
    textbook(*eager_in, mask, causal=causal).backward(g)
    for i in range(3):
        assert_2x(runs[2][i + 1], eager_in[i].grad, ref_in[i].grad, f"atomic d{'qkv'[i]}")
        assert_2x(runs[0][i + 1], eager_in[i].grad, ref_in[i].grad, f"deterministic d{'qkv'[i]}")


def test_deterministic_is_the_default():
    """deterministic=None (the default) is the separate dQ pass, whatever torch's determinism flag says."""
    seed_case("det_default")
    q, k, v = qkv(torch.float32, 1, 2, 2, 33, 33, 40, 40)
    g = torch.randn(1, 2, 33, 40)

    def dq(**kw):
        x = leaf(q)
        flash.attention(x, k, v, causal=True, config=T16, **kw).backward(g)
        return x.grad

    assert torch.equal(dq(), dq(deterministic=True))
    assert not torch.are_deterministic_algorithms_enabled()


def test_noncontiguous_inputs():
    """q/k from (B, L, H, D) tensors, v a slice of a wider tensor, a transposed bias, an expanded grad."""
    seed_case("noncontig")
    b, h, hk, lq, lk, d, dv = 2, 4, 2, 33, 41, 40, 24
    q = torch.randn(b, lq, h, d).transpose(1, 2)
    k = torch.randn(b, lk, hk, d).transpose(1, 2)
    v = torch.randn(b, hk, lk, dv + 8)[..., 3:3 + dv]
    bias = torch.randn(h, lk, lq).transpose(-2, -1)
    assert not any(x.is_contiguous() for x in (q, k, v, bias))
    g = torch.randn(b, h, dv, lq).transpose(-2, -1)
    compare(torch.float32, q, k, v, g, mask=bias, mask_grad=True, causal=True, config=T16, what="noncontig")
    # out.sum() hands the backward an expanded (all-zero-stride) gradient
    ins = [leaf(x) for x in (q, k, v)]
    flash.attention(*ins, causal=True, config=T16).sum().backward()
    ref = [leaf(x, torch.float64) for x in (q, k, v)]
    textbook(*ref, causal=True).sum().backward()
    eager = [leaf(x) for x in (q, k, v)]
    textbook(*eager, causal=True).sum().backward()
    for i in range(3):
        assert_2x(ins[i].grad, eager[i].grad, ref[i].grad, f"expanded grad d{'qkv'[i]}")


def test_output_layout():
    """The output is (B, H, Lq, Dv) laid out as (B, Lq, H, Dv), like ops.output_like."""
    seed_case("layout")
    q, k, v = qkv(torch.float32, 2, 3, 3, 17, 17, 40, 24)
    out = flash.attention(q, k, v, config=T16)
    assert out.shape == (2, 3, 17, 24) and out.transpose(1, 2).is_contiguous()


# --------------------------------------------------------------------------------------------- split-K decode


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lq,h,hk,causal,splits", [
    (1, 2, 2, False, 3), (1, 4, 1, False, 5), (3, 4, 2, True, 3), (3, 4, 1, False, 2), (1, 8, 2, True, 4),
])
def test_split_k(dtype, lq, h, hk, causal, splits):
    """Flash-decoding (keys split over programs, merged by LSE) equals the unsplit kernel and the reference."""
    seed_case("split", dtype, lq, h, hk, causal, splits)
    q, k, v = qkv(dtype, 2, h, hk, lq, 97, 64, 40)
    mask = torch.randn(2, 1, lq, 97).to(dtype)
    whole, lse = flash.forward(q, k, v, mask, causal=causal, config=T16, splits=1)
    split, lse_split = flash.forward(q, k, v, mask, causal=causal, config=T16, splits=splits)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(split, whole, atol=2 * eps, rtol=2 * eps)
    torch.testing.assert_close(_lse2(lse_split), _lse2(lse), atol=1e-5, rtol=1e-6)
    eager = textbook(q, k, v, mask, causal=causal)
    ref = textbook(q.double(), k.double(), v.double(), mask.double(), causal=causal)
    assert_2x(split, eager, ref, "split")
    # attention(splits=...) splits the forward; the backward then runs on the merged log-sum-exp
    g = torch.randn(2, h, lq, 40).to(dtype)
    out = compare(dtype, q, k, v, g, mask=mask, mask_grad=True, causal=causal, config=T16, splits=splits,
                   what="split", one_key=lq == 1 and causal)
    assert torch.equal(out, split)


# --------------------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal,h,hk,det", [(False, 2, 2, False), (True, 4, 2, True), (True, 3, 1, False)])
def test_dropout_backward_uses_forward_mask(dtype, causal, h, hk, det):
    """The mask read off one forward explains another forward with a random V, and its backward.

    The keep mask depends only on (seed, batch*head, row, col): we recover it in float32 from V = identity,
    then check dtype's forward and dq/dk/dv against float64 textbook attention with that fixed mask.
    """
    seed_case("dropout_bwd", dtype, causal, h, hk)
    p, seed = 0.3, 1234
    q, k, v = qkv(dtype, 1, h, hk, 33, 40, 24, 24)
    keep = recover_keep(q.float(), k.float(), causal=causal, p=p, seed=seed, config=T16)
    vis = visible_keys(33, 40, causal).expand_as(keep)
    rate = keep[vis].double().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / vis.sum().item()), rate
    g = torch.randn(1, h, 33, 24).to(dtype)
    compare(dtype, q, k, v, g, keep=keep, causal=causal, dropout_p=p, seed=seed, config=T16, deterministic=det,
             what="dropout")


def test_dropout_same_mask_across_tiles_and_splits():
    """The mask is keyed by position, not by program: other tiles and split-K give the same dropout."""
    seed_case("dropout_tiles")
    q, k, v = qkv(torch.float32, 1, 2, 1, 3, 97, 40, 40)
    kw = dict(dropout_p=0.4, seed=99)
    base = flash.attention(q, k, v, config=T16, splits=1, **kw)
    for cfg, splits in ((T32, 1), (T16, 3), (T32x16, 2)):
        torch.testing.assert_close(flash.attention(q, k, v, config=cfg, splits=splits, **kw), base,
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate(p):
    """Over several seeds the keep rate is 1 - p within 5 binomial sigmas; heads and rows get their own masks."""
    seed_case("keep_rate", p)
    b, h, lq, lk = 1, 2, 48, 64
    q, k, _ = qkv(torch.float32, b, h, h, lq, lk, 16, 16)
    masks = torch.stack([recover_keep(q, k, causal=False, p=p, seed=s, config=T32) for s in range(4)])
    n = masks.numel()
    rate = masks.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), rate
    # independent draws agree with probability p^2 + (1 - p)^2, not 1
    agree = p * p + (1 - p) ** 2
    for a, b_ in ((masks[:, :, 0], masks[:, :, 1]), (masks[0], masks[1]), (masks[..., :24, :], masks[..., 24:, :])):
        same = (a == b_).double().mean().item()
        assert abs(same - agree) < 5 * math.sqrt(agree * (1 - agree) / a.numel()), same


def test_dropout_seeds():
    """p = 0 is exactly no dropout; the same seed repeats bitwise; another seed differs; an int and a tensor
    seed are the same seed."""
    seed_case("seeds")
    q, k, v = qkv(torch.float32, 1, 2, 2, 33, 41, 40, 40)
    plain = flash.attention(q, k, v, config=T16)
    assert torch.equal(flash.attention(q, k, v, config=T16, dropout_p=0.0), plain)
    assert torch.equal(flash.attention(q, k, v, config=T16, dropout_p=0.0, seed=torch.tensor(5)), plain)
    a = flash.attention(q, k, v, config=T16, dropout_p=0.2, seed=7)
    assert torch.equal(flash.attention(q, k, v, config=T16, dropout_p=0.2, seed=7), a)
    assert torch.equal(flash.attention(q, k, v, config=T16, dropout_p=0.2, seed=torch.tensor(7)), a)
    b = flash.attention(q, k, v, config=T16, dropout_p=0.2, seed=8)
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, plain)
    # seed=None draws from torch's generator: reproducible under manual_seed
    torch.manual_seed(3)
    c = flash.attention(q, k, v, config=T16, dropout_p=0.2)
    torch.manual_seed(3)
    assert torch.equal(flash.attention(q, k, v, config=T16, dropout_p=0.2), c)


def test_dropout_zero_with_int_seed_backward():
    """dropout_p = 0 with an int seed (as callers pass unconditionally) differentiates like no dropout."""
    seed_case("p0_int_seed")
    q, k, v = qkv(torch.float32, 1, 2, 2, 17, 17, 40, 40)
    g = torch.randn(1, 2, 17, 40)
    grads = []
    for kw in ({}, dict(dropout_p=0.0, seed=11)):
        x = leaf(q)
        flash.attention(x, k, v, config=T16, **kw).backward(g)
        grads.append(x.grad)
    assert torch.equal(*grads)


# --------------------------------------------------------------------------------------------- the op path


@pytest.mark.parametrize("causal,kv_groups", [(False, 1), (True, 2)])
def test_op_runs_flash_and_differentiates(causal, kv_groups):
    """torch.ops.attnfuse.attention on CPU tensors under the interpreter runs the Triton kernel: it returns
    the base-2 row log-sum-exp (the CPU path returns an empty one), and its autograd is the flash backward."""
    seed_case("op", causal, kv_groups)
    b, h, lq, lk = 2, 4, 19, 23
    q, k, v = qkv(torch.float32, b, h, h // kv_groups, lq, lk, 40, 40)
    mask = torch.rand(b, 1, lq, lk) > 0.2
    mask[..., 0] = True
    kw = dict(causal=causal, kv_groups=kv_groups, scale=0.2)
    out, lse = torch.ops.attnfuse.attention(q, k, v, mask, None, **kw)
    assert lse.shape[:3] == (b, h, lq) and lse.dtype == torch.float32  # the CPU path's is empty
    kd = k.double().repeat_interleave(kv_groups, 1)
    s = (q.double() @ kd.transpose(-2, -1) * 0.2).masked_fill(~mask, _INF)
    if causal:
        s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(1), _INF)
    torch.testing.assert_close(_lse2(lse).double(), torch.logsumexp(s, -1) / math.log(2), atol=1e-5, rtol=1e-6)
    eager = textbook(q, k, v, mask, causal=causal, scale=0.2)
    ref = textbook(q.double(), k.double(), v.double(), mask, causal=causal, scale=0.2)
    assert_2x(out, eager, ref, "op out")

    g = torch.randn(b, h, lq, 40)
    ins = [leaf(x) for x in (q, k, v)]
    ops.attend(*ins, mask, **kw).backward(g)
    eager_in = [leaf(x) for x in (q, k, v)]
    textbook(*eager_in, mask, causal=causal, scale=0.2).backward(g)
    ref_in = [leaf(x, torch.float64) for x in (q, k, v)]
    textbook(*ref_in, mask, causal=causal, scale=0.2).backward(g.double())
    for i in range(3):
        assert_2x(ins[i].grad, eager_in[i].grad, ref_in[i].grad, f"op d{'qkv'[i]}")


def test_op_bias_grad_and_dropout_seed():
    """Through the op: a float bias gets its gradient; a seed tensor gives flash.attention's dropout."""
    seed_case("op_bias")
    q, k, v = qkv(torch.float32, 1, 2, 2, 17, 29, 64, 64)
    bias = torch.randn(2, 1, 29)
    g = torch.randn(1, 2, 17, 64)
    ins = [leaf(x) for x in (q, k, v, bias)]
    ops.attend(*ins, causal=True).backward(g)
    eager_in = [leaf(x) for x in (q, k, v, bias)]
    textbook(*eager_in, causal=True).backward(g)
    ref_in = [leaf(x, torch.float64) for x in (q, k, v, bias)]
    textbook(*ref_in, causal=True).backward(g.double())
    for i in range(4):
        assert_2x(ins[i].grad, eager_in[i].grad, ref_in[i].grad, f"op grad {i}")
    seed = torch.tensor(42)
    via_op = ops.attend(q, k, v, None, seed, dropout_p=0.25)
    assert torch.equal(via_op, flash.attention(q, k, v, dropout_p=0.25, seed=42))
    assert not torch.equal(via_op, ops.attend(q, k, v, None, torch.tensor(43), dropout_p=0.25))


# --------------------------------------------------------------------------------------------- validation


F16, F64 = torch.float16, torch.float64
# id: (q, k, v shapes), (q, k, v dtypes), kwargs, message
INVALID = {
    "dtype_mismatch": (((1, 2, 8, 16),) * 3, (None, F16, None), {}, "share a dtype"),
    "dropout_1": (((1, 2, 8, 16),) * 3, (None,) * 3, dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
    "dropout_neg": (((1, 2, 8, 16),) * 3, (None,) * 3, dict(dropout_p=-0.1), r"dropout_p must be in \[0, 1\)"),
    "dropout_1.5": (((1, 2, 8, 16),) * 3, (None,) * 3, dict(dropout_p=1.5), r"dropout_p must be in \[0, 1\)"),
    "3d": (((2, 8, 16),) * 3, (None,) * 3, {}, "must be 4-D"),
    "3d_kv": (((1, 2, 8, 16), (2, 8, 16), (2, 8, 16)), (None,) * 3, {}, "must be 4-D"),
    "head_dim_272": (((1, 1, 4, 272),) * 3, (None,) * 3, {}, "head dims up to 256"),
    "v_head_dim_260": (((1, 1, 4, 64), (1, 1, 4, 64), (1, 1, 4, 260)), (None,) * 3, {}, "head dims up to 256"),
    "heads_not_divisible": (((1, 3, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), (None,) * 3, {}, "multiple of k heads"),
    "qk_head_dims": (((1, 2, 8, 16), (1, 2, 8, 24), (1, 2, 8, 16)), (None,) * 3, {}, "equal q/k head dims"),
    "float64": (((1, 2, 8, 16),) * 3, (F64,) * 3, {}, "float16, bfloat16 or float32"),
}


# the Triton kernels' own limits: CUDA tensors beyond them raise, CPU ones run the op's CPU implementation
TRITON_LIMITS = ("head_dim_272", "v_head_dim_260", "float64")


@pytest.mark.parametrize("name", list(INVALID))
def test_validation(name):
    shapes, dtypes, kw, match = INVALID[name]
    args = [torch.randn(shape).to(dt or torch.float32) for shape, dt in zip(shapes, dtypes)]
    if name in TRITON_LIMITS and args[0].device.type == "cpu":
        ref = textbook(*(x.double() for x in args))
        torch.testing.assert_close(flash.attention(*args, **kw).double(), ref, rtol=1e-5, atol=1e-5)
        return
    with pytest.raises(ValueError, match=match):
        flash.attention(*args, **kw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("lq,splits", [(37, None), (1, 3)])
def test_nonfinite_v_right_of_the_diagonal_reaches_the_output(bad, lq, splits):
    """Eager computes 0 * v for the keys causal masking removes, so a NaN/Inf there poisons that column of
    every row; the kernel must not lose it by skipping those tiles (or by dropping an all-masked split)."""
    seed_case("nonfinite-v", lq)
    q, k, v = qkv(torch.float32, 1, 2, 2, lq, 37, 16, 16)
    v = v.clone()
    v[0, 1, 36, 5] = bad  # the last key: right of the diagonal for every row but the last
    eager = textbook(q, k, v, causal=True)
    ours = flash.attention(q, k, v, causal=True, config=tiles.TileConfig(16, 16, 4, 2), splits=splits)
    assert not torch.isfinite(eager[0, 1, :, 5]).any()  # the premise: eager poisons the whole column
    assert torch.equal(torch.isnan(ours), torch.isnan(eager)) and torch.equal(torch.isinf(ours), torch.isinf(eager))
    finite = torch.isfinite(eager)
    torch.testing.assert_close(ours[finite], eager[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"causal": True, "kv_groups": 2}, {"softcap": 2.0, "dropout_p": 0.2}],
                         ids=["plain", "causal-gqa", "softcap-dropout"])
def test_opcheck_on_the_flash_path(kw):
    """The op's fake impl (stats shape), autograd registration and schema agree with the Triton path."""
    seed_case("opcheck", str(kw))
    hk = 4 // kw.get("kv_groups", 1)
    q = torch.randn(2, 4, 19, 16, requires_grad=True)
    k, v = (torch.randn(2, hk, 19, 16, requires_grad=True) for _ in range(2))
    seed = torch.tensor(5) if kw.get("dropout_p") else None
    assert torch.ops.attnfuse.attention(q, k, v, None, seed, **kw)[1].shape == (2, 4, 19, 2)
    torch.library.opcheck(torch.ops.attnfuse.attention.default, (q, k, v, None, seed), kw)
    bias = torch.randn(19, 19, requires_grad=True)
    torch.library.opcheck(torch.ops.attnfuse.attention.default, (q, k, v, bias, seed), kw)
