"""The LSH tests' float64 references, shared by its plain-CPU path (test_lsh_cpu.py) and its Triton kernels
(test_lsh_interpret.py): `union_mask`, the keys LSH attention attends, written independently of the module from
`lsh.buckets` alone; `dense` softmax attention over them; `compare` (2x rule, forward and q/k/v gradients) and
`check_one_chunk` (one chunk: exact attention).
"""

from __future__ import annotations

import math

import torch

from attnfuse.kernels import lsh
from tests._util import assert_2x


def union_mask(q, k, *, n_hashes, bucket_size, seed, causal) -> torch.Tensor:
    """(B, H, L, L) bool: the keys LSH attention attends from each query (union over rounds, plus itself)."""
    qb, kb = lsh.buckets(q, k, n_hashes=n_hashes, bucket_size=bucket_size, seed=seed)
    n = q.shape[2]
    chunk = 2 * min(bucket_size, n)  # joint items (queries and keys) per chunk
    n_chunks = -(-2 * n // chunk)
    pos = torch.arange(n)
    seen = torch.zeros(*qb.shape[:2], n, n, dtype=torch.bool)
    for r in range(n_hashes):
        q_chunk = torch.empty_like(qb[:, :, r])
        k_chunk = torch.empty_like(kb[:, :, r])
        for b in range(qb.shape[0]):
            for h in range(qb.shape[1]):
                # one joint sequence of 2L items ordered by (bucket, position, key before query): distinct values
                order = torch.argsort(torch.cat([kb[b, h, r] * 2 * n + 2 * pos, qb[b, h, r] * 2 * n + 2 * pos + 1]))
                rank = torch.empty_like(order)
                rank[order] = torch.arange(2 * n)
                k_chunk[b, h], q_chunk[b, h] = rank[:n] // chunk, rank[n:] // chunk
        qc, kc = q_chunk[..., :, None], k_chunk[..., None, :]
        seen |= (kc == qc) | (kc == (qc - 1) % n_chunks)
    if causal:
        seen &= pos[None, :] <= pos[:, None]
    return seen | torch.eye(n, dtype=torch.bool)


def dense(q, k, v, visible, scale=None) -> torch.Tensor:
    """Softmax attention over ``visible`` (B, H, L, L) in the inputs' dtype (GQA by repeating K/V)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    return torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1) @ v


def qkv(dtype, b, h, hk, n, d, dv=None):
    return (torch.randn(b, h, n, d).to(dtype), torch.randn(b, hk, n, d).to(dtype),
            torch.randn(b, hk, n, dv or d).to(dtype))


def compare(dtype, q, k, v, visible, **kw) -> torch.Tensor:
    """`lsh.attention` vs `dense` over ``visible`` in ``dtype`` (eager) and float64 (reference): output and
    q/k/v gradients under the 2x rule.  Returns our output."""
    leaf = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = lsh.attention(*leaf, **kw)
    grad = torch.randn_like(out)
    out.backward(grad)
    res = {}
    for name, dt in (("eager", dtype), ("ref", torch.float64)):
        ins = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
        o = dense(*ins, visible, kw.get("scale"))
        o.backward(grad.to(dt))
        res[name] = (o, *(x.grad for x in ins))
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        ours = out if i == 0 else leaf[i - 1].grad
        assert ours.dtype == dtype and ours.shape == res["ref"][i].shape, name
        assert_2x(ours, res["eager"][i], res["ref"][i], name)
    return out


def check_one_chunk(dtype, b, h, hk, n, d, *, causal, **kw) -> None:
    """A bucket size that puts every position in one chunk: LSH must be exact (causal) attention."""
    q, k, v = qkv(dtype, b, h, hk, n, d)
    visible = torch.ones(n, n, dtype=torch.bool)
    if causal:
        visible = visible.tril()
    compare(dtype, q, k, v, visible.expand(b, h, n, n), causal=causal, **kw)
