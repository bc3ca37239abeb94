"""attnfuse::attention's structured masks (window, ALiBi, block-sparse) through the op, on the CPU path.

Each structured call must equal the same attention with the structure written out as a dense mask
(the textbook, in float64), under the 2x rule, forward and backward; bad structure arguments raise.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import attnfuse  # noqa: F401 - registers the op
from attnfuse import ops
from tests._util import assert_2x, band, ref_attention


def _inputs(key, b=2, h=4, hk=2, lq=37, lk=37, d=16):
    g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    q = torch.randn(b, h, lq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hk, lk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hk, lk, d, generator=g, dtype=torch.float64)
    grad = torch.randn(b, h, lq, d, generator=g, dtype=torch.float64)
    return q, k, v, grad


def _check(dtype, q, k, v, grad, structured: dict, dense_mask, causal=False, softcap=0.0):
    """The op with ``structured`` kwargs vs the float64 textbook with ``dense_mask``; eager in ``dtype``
    sets the error budget."""
    groups = q.shape[1] // k.shape[1]
    kw = dict(causal=causal, softcap=softcap, kv_groups=groups)

    def run(fn, xs):
        xs = [x.detach().requires_grad_() for x in xs]
        out = fn(*xs)
        out.backward(grad.to(out.dtype))
        return out.detach(), [x.grad for x in xs]

    lowp = [x.to(dtype) for x in (q, k, v)]
    ours = run(lambda a, b_, c: ops.attend(a, b_, c, structured.get("mask"), None, structured.get("alibi"),
                                          **kw, **{n: x for n, x in structured.items() if n not in ("mask", "alibi")}),
               lowp)
    eager = run(lambda a, b_, c: ref_attention(a, b_, c, _cast(dense_mask, dtype), **kw), lowp)
    ref = run(lambda a, b_, c: ref_attention(a, b_, c, dense_mask, **kw), [q, k, v])
    assert_2x(ours[0], eager[0], ref[0], "out")
    for name, a, e, r in zip("qkv", ours[1], eager[1], ref[1]):
        assert_2x(a, e, r, f"d{name}")


def _cast(mask, dtype):
    return mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("left,right,causal", [(3, 3, False), (5, 0, False), (0, 7, False), (6, -1, True),
                                               (100, 100, False), (2, -1, False), (-1, 4, False), (0, 0, False)])
def test_window(dtype, left, right, causal):
    q, k, v, grad = _inputs(("window", left, right, causal))
    mask = band(37, 37, left, right, causal)
    _check(dtype, q, k, v, grad, dict(window_left=left, window_right=right), mask, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_window_softcap_and_key_padding(dtype):
    q, k, v, grad = _inputs(("softcap-pad",))
    pad = torch.ones(2, 1, 1, 37, dtype=torch.bool)
    pad[1, ..., 33:] = False  # every row keeps a key in its band (no NaN rows)
    mask = band(37, 37, 4, 0) & pad
    _check(dtype, q, k, v, grad, dict(window_left=4, window_right=0, mask=pad), mask, softcap=3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_alibi(dtype):
    q, k, v, grad = _inputs(("alibi",))
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / 4) for i in range(4)], dtype=torch.float32)
    i, j = torch.arange(37)[:, None], torch.arange(37)[None, :]
    bias = (slopes[:, None, None].double() * (j - i)).masked_fill(j > i, -math.inf)
    _check(dtype, q, k, v, grad, dict(alibi=slopes), bias, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_block_sparse(dtype):
    q, k, v, grad = _inputs(("blocks",), lq=150, lk=150)
    g = torch.Generator().manual_seed(7)
    tiles = torch.rand(3, 3, generator=g) > 0.5
    tiles[:, 0] = True  # every row keeps a tile
    keep = tiles.repeat_interleave(64, 0).repeat_interleave(64, 1)[:150, :150].clone()
    keep[70:90, 10:40] = False  # a partial tile
    _check(dtype, q, k, v, grad, dict(mask=keep, block_sparse=True), keep)


@pytest.mark.parametrize("kwargs,match", [
    (dict(window_left=-2), "window_left"), (dict(window_right=-5), "window_right"),
    (dict(block_sparse=True), "block_sparse"),
])
def test_bad_structure_raises(kwargs, match):
    q, k, v, _ = _inputs(("bad",))
    with pytest.raises(ValueError, match=match):
        ops.attend(q, k, v, kv_groups=2, **kwargs)


def test_bad_alibi_shape_raises():
    q, k, v, _ = _inputs(("bad-alibi",))
    with pytest.raises(ValueError, match="alibi"):
        ops.attend(q, k, v, None, None, torch.ones(3), kv_groups=2)


@pytest.mark.parametrize("left", [3, -1])
def test_sdpa_band_with_key_padding_zeroes_rows_without_keys(left):
    """SDPA form: a band with a (B, 1, 1, Lk) padding vector; rows the padding leaves without a key are 0 with
    no gradient, as eager SDPA; found from the vector (no (Lq, Lk) mask), forward and backward."""
    q, k, v, grad = _inputs(("sdpa-pad", left), hk=4)
    pad = torch.ones(2, 1, 1, 37, dtype=torch.bool)
    pad[0, ..., :20] = False  # left padding: under the causal band, rows 0..19 of batch 0 see no key
    pad[1, ..., 30:] = False
    kw = dict(scale=None, causal=True, softcap=0.0, kv_groups=1, dropout_p=0.0, mask_fill=None, window_left=left)

    def run(fn, xs):
        xs = [x.detach().requires_grad_() for x in xs]
        out = fn(*xs)
        return out.detach(), torch.autograd.grad(out, xs, grad.to(out.dtype))

    dense = pad & band(37, 37, left, 0)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ours = run(lambda a, b, c: ops.attention_sdpa(a, b, c, pad, **kw), [x.float() for x in (q, k, v)])
    eager = run(lambda a, b, c: sdpa(a, b, c, attn_mask=dense), [x.float() for x in (q, k, v)])
    ref = run(lambda a, b, c: sdpa(a, b, c, attn_mask=dense), [q, k, v])
    assert bool((ours[0][0, :, :20] == 0).all()) and bool((ours[0][0, :, 20:] != 0).any())
    assert_2x(ours[0], eager[0], ref[0], "out")
    for name, a, e, r in zip("qkv", ours[1], eager[1], ref[1]):
        assert_2x(a, e, r, f"d{name}")
