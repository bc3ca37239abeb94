"""The checks the top-k tests share, so its plain-CPU path (test_topk_cpu.py) and its Triton kernels
(test_topk_interpret.py) are held to one semantics: top-k attention against the float64 textbook of
`tests.kernels._helpers.compare` masked with `select`'s blocks (`visible`, `check_masked`), exact attention when
every block is kept (`check_covering`), and planted keys found (`check_planted`).
"""

from __future__ import annotations

import math

import torch

from attnfuse.kernels import topk
from tests.kernels._helpers import compare, qkv, seed_case


def visible(chosen: torch.Tensor, lq: int, lk: int, groups: int, block: int) -> torch.Tensor:
    """(B, H, Lq, Lk) bool: the token mask of a (B, Hkv, nqb, nkb) block selection, per query head."""
    m = chosen.repeat_interleave(block, 2)[:, :, :lq].repeat_interleave(block, 3)[..., :lk]
    return m.repeat_interleave(groups, 1)


def attend(**params):
    """`compare`'s ``attend``: top-k attention with ``params`` (``compare`` passes mask=None)."""
    def run(q, k, v, mask=None, **kw):
        assert mask is None
        return topk.attention(q, k, v, **params, **kw)
    return run


def check_masked(dtype, b, h, hkv, lq, lk, d, dv, *, causal, what, **params):
    """Top-k attention == the float64 textbook masked with `select`'s blocks (forward and backward, 2x rule)."""
    seed_case(what, dtype, causal)
    q, k, v = qkv(dtype, b, h, hkv, lq, lk, d, dv)
    chosen = topk.select(q, k, causal=causal, **params)
    block = params.get("block", 64)
    vis = visible(chosen, lq, lk, h // hkv, block)
    compare(dtype, q, k, v, torch.randn(b, h, lq, dv).to(dtype), attend=attend(**params), visible=vis,
             causal=causal, what=what)
    return chosen


def check_covering(dtype, shape, what, *, seed) -> torch.Tensor:
    """``topk >= Lk`` (every block kept) must be exact attention under the 2x rule; returns the selection."""
    b, h, hkv, lq, lk, d, dv, causal = shape
    seed_case(*seed)
    q, k, v = qkv(dtype, b, h, hkv, lq, lk, d, dv)
    params = dict(topk=lk, block=32, sink=0, local=0)
    chosen = topk.select(q, k, causal=causal, **params)
    compare(dtype, q, k, v, torch.randn(b, h, lq, dv).to(dtype), attend=attend(**params), causal=causal, what=what)
    return chosen


def planted(dtype, *, lq: int, heads: int, kv_heads: int, d: int, block: int, qb: int, kb: int):
    """Inputs where query block ``qb``'s rows (every head) align with a unit direction u and three keys of key
    block ``kb`` are 6 * |u| = 6 * sqrt(d) along it: their scores dwarf every other key's."""
    u = torch.randn(d)
    u = u / u.norm() * math.sqrt(d)
    q = torch.randn(1, heads, lq, d) * 0.3
    k = torch.randn(1, kv_heads, lq, d) * 0.3
    v = torch.randn(1, kv_heads, lq, d)
    rows = slice(qb * block, min((qb + 1) * block, lq))
    q[:, :, rows] += 2 * u
    keys = [kb * block + 3, kb * block + 11, kb * block + 20]
    k[:, :, keys] = 6 * u
    return q.to(dtype), k.to(dtype), v.to(dtype), rows, keys


def check_planted(dtype, *, causal: bool, lq: int, heads: int, kv_heads: int, d: int, block: int):
    """The planted block is selected for its query block, and that block's output is exact attention's."""
    nqb = -(-lq // block)
    qb, kb = nqb - 1, 2
    q, k, v, rows, keys = planted(dtype, lq=lq, heads=heads, kv_heads=kv_heads, d=d, block=block, qb=qb, kb=kb)
    params = dict(topk=block, block=block, sink=0, local=0)
    chosen = topk.select(q, k, causal=causal, **params)
    assert chosen[:, :, qb, kb].all()
    assert chosen[:, :, qb].sum(-1).tolist() == [[2] * kv_heads]  # the planted block + the diagonal one
    out = topk.attention(q, k, v, causal=causal, **params)
    g = heads // kv_heads
    s = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) / math.sqrt(d)
    if causal:
        s = s.masked_fill(torch.ones(lq, lq, dtype=torch.bool).triu(1), -math.inf)
    exact = torch.softmax(s, -1) @ v.double().repeat_interleave(g, 1)
    size = exact[:, :, rows].abs().max().item()
    err = (out[:, :, rows].double() - exact[:, :, rows]).abs().max().item()
    # scores near 50 carry fp32 rounding of ~1e-5 into exp(); missing the planted keys would be off by O(1)
    assert err <= 1e-4 * size, err
    missed = topk.attention(q, k, v, causal=causal, **{**params, "topk": 0})
    assert (missed[:, :, rows].double() - exact[:, :, rows]).abs().max().item() > 0.1 * size
