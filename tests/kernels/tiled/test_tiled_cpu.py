"""The CPU tiled kernel (attnfuse.kernels.tiled) against a float64 dense textbook: band, GQA, softcap, ALiBi,
masks of every broadcast shape, block-sparse constants, dropout, fully masked rows, and O(N*w) memory."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from attnfuse.kernels import tiled
from attnfuse.kernels.tiled import _context, _tiling
from tests._util import assert_2x, band


def textbook(q, k, v, mask=None, *, scale, causal=False, softcap=0.0, kv_groups=1, mask_fill=-math.inf,
             alibi=None, window_left=-1, window_right=-1):
    """Dense attention that materializes every score, in the inputs' dtype (eager) or float64 (reference)."""
    k, v = k.repeat_interleave(kv_groups, 1), v.repeat_interleave(kv_groups, 1)
    s = q @ k.transpose(-2, -1) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    lq, lk = s.shape[-2:]
    if alibi is not None:
        dist = (torch.arange(lk)[None, :] - torch.arange(lq)[:, None]).to(s.dtype)
        s = s + alibi.to(s.dtype)[:, None, None] * dist
    if mask is not None:
        s = torch.where(mask, s, mask_fill) if mask.dtype == torch.bool else s + mask
    s = s.masked_fill(~band(lq, lk, window_left, window_right, causal), -math.inf)
    return torch.softmax(s, -1) @ v


CASES = {
    "window_lt_block": dict(window_left=5, window_right=3),
    "window_gt_block_left_ne_right": dict(lq=301, lk=301, window_left=100, window_right=70),
    "wider_than_seq": dict(lq=77, lk=77, window_left=500, window_right=400),
    "causal_window": dict(causal=True, window_left=40),
    "causal_only": dict(causal=True),
    "causal_caps_right": dict(causal=True, window_left=9, window_right=30),
    "dense": dict(lq=97, lk=97),
    "cross": dict(lq=90, lk=157, window_left=20, window_right=33),
    "qlen1": dict(lq=1, lk=150, window_right=40),
    "gqa2_window": dict(kv_heads=2, causal=True, window_left=30),
    "mqa_window": dict(kv_heads=1, window_left=12, window_right=12),
    "softcap_window": dict(softcap=4.0, window_left=20, window_right=0),
    "alibi_causal": dict(alibi=True, causal=True),
    "alibi_window_gqa": dict(alibi=True, kv_heads=2, window_left=64, window_right=64),
    "keypad_bool": dict(mask="keypad_bool", causal=True, window_left=50),
    "keypad_additive": dict(mask="keypad_add", window_left=31, window_right=2),
    "bias_heads": dict(mask=(1, 4), window_left=70, window_right=10),
    "bias_batch_heads": dict(mask=(2, 4), causal=True, window_left=60, softcap=3.0),
    "bias_2d": dict(mask=(), window_left=17, window_right=17),
    "bias_1d_keys": dict(mask="keys", causal=True),
    "bool_finite_fill": dict(mask="bool", mask_fill=-2.0, window_left=45, window_right=45),
    "bool_heads_gqa": dict(mask="bool_heads", kv_heads=2, window_left=25, window_right=5),
}


def make(lq=150, lk=150, head_dim=16, kv_heads=4, mask=None, alibi=False, **kw):
    """Float64 inputs (B=2, H=4) for a case; ``kw`` are the kernel's keywords."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((lq, lk, kv_heads, mask, alibi, kw)).encode()))
    q = torch.randn(2, 4, lq, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(2, kv_heads, lk, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(2, kv_heads, lk, head_dim + 3, generator=g, dtype=torch.float64)
    m = None
    if mask == "keypad_bool":
        m = torch.arange(lk).expand(2, 1, 1, lk) < torch.tensor([lk, lk - 37]).view(2, 1, 1, 1)
    elif mask == "keypad_add":
        m = torch.randn(2, 1, 1, lk, generator=g, dtype=torch.float64)
        m[1, ..., lk - 29:] = -math.inf
    elif mask == "keys":
        m = torch.randn(lk, generator=g, dtype=torch.float64)
    elif mask in ("bool", "bool_heads"):
        m = torch.rand(1, 4 if mask == "bool_heads" else 1, lq, lk, generator=g) > 0.3
        m[..., torch.arange(lq), torch.arange(lq).clamp(max=lk - 1)] = True  # no row loses every key
    elif mask is not None:
        m = torch.randn(*mask, lq, lk, generator=g, dtype=torch.float64)
    kw = dict(scale=0.3, kv_groups=4 // kv_heads, **kw)
    if alibi:
        kw["alibi"] = torch.rand(4, generator=g) * 0.2
    return q, k, v, m, kw


def low(x, dtype):
    return x if x is None or x.dtype == torch.bool else x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", CASES)
def test_forward_backward_2x_rule(name, dtype):
    q64, k64, v64, m64, kw = make(**CASES[name])
    q, k, v, m = (low(x, dtype) for x in (q64, k64, v64, m64))
    q, k = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k))  # (B, L, H, D) memory, as models pass
    mask_grad = m is not None and m.dtype != torch.bool
    out = tiled.forward(q, k, v, m, **kw)
    assert out.dtype == dtype and out.transpose(1, 2).is_contiguous()  # (B, Lq, H, Dv) in memory
    eager_in = [x.clone().requires_grad_(x.dtype != torch.bool) if x is not None else None for x in (q, k, v, m)]
    ref_in = [x.clone().requires_grad_(x.dtype != torch.bool) if x is not None else None for x in (q64, k64, v64, m64)]
    eager, ref = textbook(*eager_in, **kw), textbook(*ref_in, **kw)
    assert_2x(out, eager, ref)

    grad = torch.randn_like(ref)
    eager.backward(grad.to(dtype))
    ref.backward(grad)
    grads = tiled.backward(grad.to(dtype), q, k, v, m, mask_grad=mask_grad, **kw)
    for ours, e, r, what in zip(grads, eager_in, ref_in, ("dq", "dk", "dv", "dmask")):
        if what == "dmask" and not mask_grad:
            assert ours is None
            continue
        assert ours.shape == r.shape and ours.dtype == e.grad.dtype
        assert_2x(ours, e.grad, r.grad, what=what)


def test_float64_matches_textbook():
    q, k, v, m, kw = make(**CASES["bias_batch_heads"])
    out = tiled.forward(q, k, v, m, **kw)
    torch.testing.assert_close(out, textbook(q, k, v, m, **kw), rtol=1e-12, atol=1e-12)


class _Tiled(torch.autograd.Function):
    """forward/backward as one autograd function, for gradcheck."""

    @staticmethod
    def forward(ctx, q, k, v, mask, kw):
        ctx.save_for_backward(q, k, v, mask)
        ctx.kw = kw
        return tiled.forward(q, k, v, mask, **kw)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, mask = ctx.saved_tensors
        mask_grad = mask is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dm = tiled.backward(grad, q, k, v, mask, mask_grad=mask_grad, **ctx.kw)
        return dq, dk, dv, dm, None


def test_gradcheck_bias_softcap_alibi_window(monkeypatch):
    monkeypatch.setattr(_tiling, "BLOCK_M", 4)
    monkeypatch.setattr(_tiling, "BLOCK_N", 8)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 19, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, 23, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    bias = torch.randn(2, 19, 23, generator=g, dtype=torch.float64, requires_grad=True)
    kw = dict(scale=0.6, softcap=2.5, kv_groups=2, alibi=torch.tensor([0.3, -0.1]), window_left=6, window_right=3)
    torch.autograd.gradcheck(lambda *t: _Tiled.apply(*t, kw), (q, k, v, bias))


def test_dropout_is_seeded_and_backward_regenerates_it(monkeypatch):
    monkeypatch.setattr(_tiling, "BLOCK_M", 4)
    monkeypatch.setattr(_tiling, "BLOCK_N", 4)
    monkeypatch.setattr(_tiling, "_CHUNK_ELEMS", 200)  # several chunks, each with its own generator
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 21, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kw = dict(scale=0.4, dropout_p=0.3, causal=True, window_left=7)
    a, b = tiled.forward(q, k, v, None, 11, **kw), tiled.forward(q, k, v, None, 11, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, tiled.forward(q, k, v, None, 12, **kw))
    assert len(_context.Ctx(q, k, v, None, None, kv_groups=1, softcap=0.0, mask_fill=-math.inf,
                            block_sparse=False, **{**kw, "window_right": -1}).plan.chunks) > 1
    plain = tiled.forward(q, k, v, **{**kw, "dropout_p": 0.0})
    mean = torch.stack([tiled.forward(q, k, v, None, s, **kw) for s in range(300)]).mean(0)
    torch.testing.assert_close(mean, plain, atol=0.1, rtol=0)  # inverted dropout is unbiased
    torch.autograd.gradcheck(lambda *t: _Tiled.apply(*t, None, {**kw}), (q, k, v))
    torch.autograd.gradcheck(lambda *t: _Tiled.apply(*t, None, {**kw, "kv_groups": 2}),
                             (q, k[:, :1].detach().requires_grad_(), v[:, :1].detach().requires_grad_()))


def test_fully_masked_rows_are_nan():
    q, k, v = (torch.randn(1, 2, 70, 8) for _ in range(3))
    keep = torch.ones(70, 70, dtype=torch.bool)
    keep[3] = False
    bias = torch.zeros(1, 1, 1, 70)
    out = tiled.forward(q, k, v, keep, scale=0.3, window_left=10, window_right=10)
    assert torch.isnan(out[:, :, 3]).all() and not torch.isnan(out[:, :, [2, 4]]).any()
    bias[..., 20:41] = -math.inf  # through a window of 1, rows 21..39 see only keys in 20..40: all -inf
    out = tiled.forward(q, k, v, bias, scale=0.3, window_left=1, window_right=1)
    assert torch.isnan(out[:, :, 21:40]).all() and not torch.isnan(out[:, :, [19, 41]]).any()
    # a band that misses every key: query rows beyond lk + left in cross attention
    out = tiled.forward(q, k[:, :, :30], v[:, :, :30], scale=0.3, window_left=2, window_right=0)
    assert torch.isnan(out[:, :, 32:]).all() and not torch.isnan(out[:, :, :32]).any()


def test_bool_mask_with_finite_fill_keeps_masked_keys():
    """A finite ``mask_fill`` replaces the score (eager's where): a fully masked row is uniform over its band."""
    q, k, v = (torch.randn(1, 1, 40, 8, dtype=torch.float64) for _ in range(3))
    keep = torch.rand(40, 40) > 0.5
    keep[7] = False
    kw = dict(scale=0.5, window_left=3, window_right=2, mask_fill=-1e4)
    out = tiled.forward(q, k, v, keep, **kw)
    torch.testing.assert_close(out, textbook(q, k, v, keep, **kw))
    torch.testing.assert_close(out[0, 0, 7], v[0, 0, 4:10].mean(0))


def _tile_mask(pattern, bm, bn, lq, lk, dtype, g):
    """Expand a per-tile pattern ('e' empty, 'f' full, 'p' partial) to an (lq, lk) mask of ``dtype``."""
    keep = torch.zeros(lq, lk, dtype=torch.bool)
    bias = torch.zeros(lq, lk, dtype=torch.float64)
    for r, row in enumerate(pattern):
        for c, kind in enumerate(row):
            rows, cols = slice(r * bm, (r + 1) * bm), slice(c * bn, (c + 1) * bn)
            if kind == "f":
                keep[rows, cols] = True
            elif kind == "p":
                sub = keep[rows, cols]
                keep[rows, cols] = torch.rand(sub.shape, generator=g) > 0.4
                bias[rows, cols] = torch.randn(sub.shape, generator=g, dtype=torch.float64)
    if dtype == torch.bool:
        return keep
    fill = -math.inf if dtype == torch.float64 else torch.finfo(dtype).min
    return bias.to(dtype).masked_fill(~keep, fill)


PATTERN = ["ffep", "pepf", "eeee", "fppe", "efef"]


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float64, torch.float32])
def test_block_sparse_constant_mask(monkeypatch, mask_dtype):
    monkeypatch.setattr(_tiling, "BLOCK_M", 16)
    monkeypatch.setattr(_tiling, "BLOCK_N", 8)
    monkeypatch.setattr(_tiling, "_CHUNK_ELEMS", 6 * 2 * 4 * 16 * 8)  # 6 tile pairs a chunk: rows out of order
    g = torch.Generator().manual_seed(9)
    lq, lk = 75, 29  # last query tile 11 rows, last key tile 5 keys
    mask = _tile_mask(PATTERN, 16, 8, lq, lk, mask_dtype, g)
    kinds = _tiling._mask_kinds(mask, -math.inf, torch.float64)
    code = {"e": _tiling._EMPTY, "f": _tiling._FULL, "p": _tiling._PARTIAL}
    assert kinds.tolist() == [[code[x] for x in row] for row in PATTERN]
    assert _tiling._mask_kinds(mask, -math.inf, torch.float64) is kinds  # cached for this tensor

    q, k, v = (torch.randn(2, 4, n, 8, generator=g, dtype=torch.float64) for n in (lq, lk, lk))
    k, v = k[:, :2], v[:, :2]
    kw = dict(scale=0.4, kv_groups=2, softcap=5.0)
    ctx = _context.Ctx(q, k, v, mask, None, causal=False, dropout_p=0.0, mask_fill=-math.inf, window_left=-1,
                       window_right=-1, block_sparse=True, **kw)
    visited = sorted((int(r), int(t)) for c in ctx.plan.chunks for r, row in zip(c.rows, c.tiles) for t in row
                     if t < ctx.plan.nkt)
    assert visited == [(r, c) for r, row in enumerate(PATTERN) for c, x in enumerate(row) if x != "e"]
    assert any(c.span is None for c in ctx.plan.chunks)  # rows gathered out of order are exercised
    read = {(int(r), int(t)) for c in ctx.plan.chunks if c.partial is not None
            for r, row, part in zip(c.rows, c.tiles, c.partial) for t, p in zip(row, part) if p}
    assert read == {(r, c) for r, row in enumerate(PATTERN) for c, x in enumerate(row) if x == "p"}

    out = tiled.forward(q, k, v, mask, block_sparse=True, **kw)
    ref = textbook(q, k, v, mask.double() if mask_dtype != torch.bool else mask, **kw)
    # row tile 2 is all empty: NaN like eager's all -inf rows (finfo.min rows are the op layer's business)
    assert torch.isnan(out[:, :, 32:48]).all()
    live = torch.cat([torch.arange(32), torch.arange(48, lq)])
    torch.testing.assert_close(out[:, :, live], ref[:, :, live], rtol=1e-10, atol=1e-10)

    # gradients: the textbook on the live rows alone (the dead rows' NaN would reach its dk / dv)
    grad = torch.randn_like(out).masked_fill(torch.isnan(out), 0.0)
    dq, dk, dv, _ = tiled.backward(grad, q, k, v, mask, block_sparse=True, **kw)
    live_in = [x.clone().requires_grad_() for x in (q[:, :, live], k, v)]
    textbook(*live_in, (mask.double() if mask_dtype != torch.bool else mask)[live], **kw).backward(grad[:, :, live])
    assert (dq[:, :, 32:48] == 0).all()
    for ours, r in zip((dq[:, :, live], dk, dv), live_in):
        torch.testing.assert_close(ours, r.grad, rtol=1e-10, atol=1e-10)


def test_block_sparse_with_window_and_cache_invalidation(monkeypatch):
    monkeypatch.setattr(_tiling, "BLOCK_M", 8)
    monkeypatch.setattr(_tiling, "BLOCK_N", 8)
    g = torch.Generator().manual_seed(4)
    mask = _tile_mask(["fpe", "ffp", "pfe"], 8, 8, 24, 24, torch.bool, g)
    q, k, v = (torch.randn(1, 2, 24, 8, generator=g, dtype=torch.float64) for _ in range(3))
    kw = dict(scale=0.5, causal=True, window_left=9)
    out = tiled.forward(q, k, v, mask, block_sparse=True, **kw)
    torch.testing.assert_close(out, textbook(q, k, v, mask, **kw), equal_nan=True)
    before = _tiling._mask_kinds(mask, -math.inf, torch.float64)
    mask[16:, 8:16] = False  # in place: the cached classification must not be reused
    after = _tiling._mask_kinds(mask, -math.inf, torch.float64)
    assert before[2, 1] == _tiling._FULL and after[2, 1] == _tiling._EMPTY
    out = tiled.forward(q, k, v, mask, block_sparse=True, **kw)
    torch.testing.assert_close(out, textbook(q, k, v, mask, **kw), equal_nan=True)
    # a finite, small fill is not -inf: nothing may be skipped, and the result still matches eager
    kinds = _tiling._mask_kinds(mask, -3.0, torch.float64)
    assert (kinds != _tiling._EMPTY).all()
    out = tiled.forward(q, k, v, mask, block_sparse=True, mask_fill=-3.0, **kw)
    torch.testing.assert_close(out, textbook(q, k, v, mask, mask_fill=-3.0, **kw))


def test_band_work_is_linear_in_sequence_length():
    """Each query tile visits only the key tiles its band reaches: at most (BLOCK_M + left + right) / BLOCK_N + 2."""
    n, left, right = 5000, 100, 37
    q = torch.randn(1, 1, n, 8)
    ctx = _context.Ctx(q, q, q, None, None, scale=1.0, causal=False, softcap=0.0, kv_groups=1, dropout_p=0.0,
                       mask_fill=-math.inf, window_left=left, window_right=right, block_sparse=False)
    per_tile = (_tiling.BLOCK_M + left + right) // _tiling.BLOCK_N + 2
    assert sum(c.tiles.numel() for c in ctx.plan.chunks) <= ctx.plan.nqt * per_tile
    assert all(c.tiles.shape[1] <= per_tile for c in ctx.plan.chunks)
    # tiles wholly inside a wide band are computed without a mask: only the slots at its two edges get one
    ctx = _context.Ctx(q, q, q, None, None, scale=1.0, causal=False, softcap=0.0, kv_groups=1, dropout_p=0.0,
                       mask_fill=-math.inf, window_left=600, window_right=400, block_sparse=False)
    masked = [sum(cols.stop - cols.start for cols in c.band) for c in ctx.plan.chunks]  # columns per chunk
    assert sorted(masked)[len(masked) // 2] <= 4 * _tiling.BLOCK_N  # rows near the ends differ; the rest do not
    scores = sum(c.tiles.numel() * _tiling.BLOCK_N for c in ctx.plan.chunks)
    assert sum(w * c.tiles.shape[0] for w, c in zip(masked, ctx.plan.chunks)) < 0.35 * scores


def _peak_alloc_bytes(fn) -> int:
    """Most bytes live at once in PyTorch's CPU allocator while ``fn`` runs (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = top = 0
    for _, nbytes in events:
        live += nbytes
        top = max(top, live)
    return top


def test_memory_is_linear_in_sequence_length():
    """At N = 16384 with a window of 64, the forward's peak stays far below one N x N bool (256 MiB):
    inputs' working copies (a few MiB) plus a chunk's scores.  The same probe sees a dense N x N."""
    n, w = 16384, 64
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    kw = dict(scale=0.25, causal=True, window_left=w - 1)
    budget = 48 * 2**20
    peak = _peak_alloc_bytes(lambda: tiled.forward(q, k, v, **kw))
    assert peak < budget, f"tiled forward peaked at {peak / 2**20:.0f} MiB"
    peak_bwd = _peak_alloc_bytes(lambda: tiled.backward(torch.ones_like(q), q, k, v, **kw))
    assert peak_bwd < budget, f"tiled backward peaked at {peak_bwd / 2**20:.0f} MiB"
    m = 4096  # the probe works: a dense band mask alone, at a quarter of the length, exceeds the budget
    assert _peak_alloc_bytes(lambda: textbook(q[:, :1, :m], k[:, :1, :m], v[:, :1, :m], **kw)) > budget
