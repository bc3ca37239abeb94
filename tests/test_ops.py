"""attnfuse::attention on CPU: numbers vs float64, autograd, opcheck, edge semantics."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import attnfuse  # noqa: F401 - registers the op
from attnfuse import ops
from attnfuse.kernels import reference
from tests._util import assert_2x, ref_attention

op = ops.attend  # torch.ops.attnfuse.attention(...)[0]


CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "bias_full": dict(mask=(2, 4, 13, 13)),
    "bias_row": dict(mask=(2, 1, 1, 13)),
    "bias_2d": dict(mask=(13, 13)),
    "bool_mask": dict(mask="bool"),
    "softcap": dict(softcap=5.0),
    "gqa4": dict(kv_heads=1, kv_groups=4),
    "gqa2_causal": dict(kv_heads=2, kv_groups=2, causal=True),
    "cross": dict(kv_len=21),
    "qlen1": dict(q_len=1, kv_len=17),
    "head40": dict(head_dim=40),
    "v_dim_differs": dict(v_dim=24),
    "len1": dict(q_len=1, kv_len=1),
    "len97": dict(q_len=97, kv_len=97, causal=True),
}


def _make(dtype, q_len=13, kv_len=13, head_dim=8, v_dim=None, kv_heads=4, mask=None, **kw):
    g = torch.Generator().manual_seed(zlib.crc32(repr((q_len, kv_len, head_dim, mask, kw)).encode()))
    q = torch.randn(2, 4, q_len, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(2, kv_heads, kv_len, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(2, kv_heads, kv_len, v_dim or head_dim, generator=g, dtype=torch.float64)
    m = None
    if mask == "bool":
        m = torch.rand(2, 1, q_len, kv_len, generator=g) > 0.3
        m[..., 0] = True
    elif mask is not None:
        m = torch.randn(*mask[:-2], q_len, kv_len, generator=g, dtype=torch.float64)
    return q, k, v, m, kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", CASES)
def test_forward_backward_2x_rule(name, dtype):
    q64, k64, v64, m64, kw = _make(dtype, **CASES[name])
    low = [x.to(dtype) if x.dtype != torch.bool else x for x in (q64, k64, v64)]
    m_low = m64 if m64 is None or m64.dtype == torch.bool else m64.to(dtype)
    ins = [x.clone().requires_grad_() for x in low]
    ours = op(*ins, m_low, **kw)
    eager_ins = [x.clone().requires_grad_() for x in low]
    eager = ref_attention(*eager_ins, m_low, **kw)
    ref_ins = [x.clone().requires_grad_() for x in (q64, k64, v64)]
    ref = ref_attention(*ref_ins, m64, **kw)
    assert_2x(ours, eager, ref)
    grad = torch.randn_like(ref)
    ours.backward(grad.to(dtype))
    eager.backward(grad.to(dtype))
    ref.backward(grad)
    for a, b, c, what in zip(ins, eager_ins, ref_ins, "qkv"):
        assert_2x(a.grad, b.grad, c.grad, what=f"d{what}")


def test_bias_gradient_broadcast():
    """A learned bias (T5's relative position bias) gets its gradient, reduced over broadcast dims."""
    q, k, v = (torch.randn(2, 3, 11, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 3, 11, 11, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda b: op(q, k, v, b), (bias,))
    row_bias = torch.randn(2, 1, 1, 11, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda *t: op(*t, scale=0.7, softcap=3.0), (q, k, v, row_bias))


def test_blocked_path_matches_across_tiles(monkeypatch):
    q, k, v = (torch.randn(1, 2, 37, 8, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(37, 37, dtype=torch.float64)
    whole = reference.forward(q, k, v, bias, scale=0.3, causal=True, softcap=2.0)
    monkeypatch.setattr(reference, "_TILE_BYTES", 2 * 37 * 4 * 5)  # 5 query rows per tile
    assert reference._block_rows(q, 37) == 5
    tiled = reference.forward(q, k, v, bias, scale=0.3, causal=True, softcap=2.0)
    torch.testing.assert_close(tiled, whole)


def test_fully_masked_rows_follow_eager():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    keep = torch.ones(5, 5, dtype=torch.bool)
    keep[2] = False
    out = op(q, k, v, keep)
    assert torch.isnan(out[:, :, 2]).all() and not torch.isnan(out[:, :, [0, 1, 3, 4]]).any()
    out = op(q, k, v, keep, mask_fill=-1e9)  # finite fill: the row is uniform over all keys
    torch.testing.assert_close(out[:, :, 2], v.mean(-2))
    bias = torch.zeros(5, 5)
    bias[3] = -math.inf
    out = op(q, k, v, bias)
    assert torch.isnan(out[:, :, 3]).all() and not torch.isnan(out[:, :, 2]).any()


def test_nan_inputs_propagate_like_eager():
    q, k, v = (torch.randn(1, 1, 6, 8) for _ in range(3))
    q[0, 0, 1, 0] = math.nan
    out, eager = op(q, k, v), ref_attention(q, k, v)
    assert torch.equal(torch.isnan(out), torch.isnan(eager))


def test_dropout_is_seeded_and_unbiased():
    q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64) for _ in range(3))
    seed = torch.tensor(1234)
    a, b = op(q, k, v, None, seed, dropout_p=0.3), op(q, k, v, None, seed, dropout_p=0.3)
    assert torch.equal(a, b)
    assert not torch.equal(a, op(q, k, v, None, torch.tensor(99), dropout_p=0.3))
    # keep rate: the dropout mask of one block, and the mean output over many seeds
    keep = reference._dropout_keep(7, 0, torch.Size([200, 200]), 0.3, q.device)
    assert abs(keep.double().mean().item() - 0.7) < 0.01
    mean = torch.stack([op(q, k, v, None, torch.tensor(s), dropout_p=0.3) for s in range(400)]).mean(0)
    torch.testing.assert_close(mean, op(q, k, v), atol=0.08, rtol=0)
    # backward regenerates the forward's mask: exact gradient of a fixed-seed function
    qkv = [x.clone().requires_grad_() for x in (q, k, v)]
    torch.autograd.gradcheck(lambda *t: op(*t, None, seed, dropout_p=0.3), qkv)


@pytest.mark.parametrize("kw", [dict(), dict(kv_groups=2), dict(softcap=4.0), dict(causal=True)])
def test_opcheck(kw):
    hk = 4 // kw.get("kv_groups", 1)
    q = torch.randn(2, 4, 7, 8, requires_grad=True)
    k, v = (torch.randn(2, hk, 7, 8, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.attnfuse.attention.default, (q, k, v), kw)
    torch.library.opcheck(torch.ops.attnfuse.attention.default, (q, k, v, torch.randn(7, 7, requires_grad=True)), kw)
    torch.library.opcheck(torch.ops.attnfuse.attention.default, (q, k, v, torch.rand(2, 1, 7, 7) > 0.2), kw)


def test_bad_inputs_raise_with_fix():
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 3, 5, 8)
    with pytest.raises(ValueError, match="kv_groups"):
        op(q, k, k)
    with pytest.raises(ValueError, match="4-D"):
        op(q[0], k[0], k[0])
