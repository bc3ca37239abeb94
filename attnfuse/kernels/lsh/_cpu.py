"""The plain-CPU path of LSH attention (`forward`): each round's chunk attention as batched block products of
torch ops, differentiable in q/k/v (its backward is autograd through it)."""

from __future__ import annotations

import torch

from .._launch import LOG2E
from ._hashing import Plan, merge

__all__ = ["forward"]

_BLOCK_ELEMS = 2**19  # scores in one group of block pairs of the CPU path
_SUB = 32  # ranks in one block of the CPU path


def _blocks(start: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cut each chunk's ranks [start, end) (flat over (batch * head, chunk)) into blocks of `_SUB`: (chunk of
    each block, its ranks (NB, _SUB), their in-range flags, first block of each chunk, blocks per chunk)."""
    per = torch.div(end - start + _SUB - 1, _SUB, rounding_mode="floor")
    first = torch.cumsum(per, 0) - per
    owner = torch.repeat_interleave(torch.arange(per.numel(), device=per.device), per)
    ranks = (start[owner] + (torch.arange(owner.numel(), device=per.device) - first[owner]) * _SUB)[:, None]
    ranks = ranks + torch.arange(_SUB, device=per.device)
    return owner, ranks, ranks < end[owner, None], first, per


def _rows_at(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (B, Hx, L, X) viewed as (B*Hx*L, X) at ``flat`` (any shape): (*flat.shape, X)."""
    return x.reshape(-1, x.shape[-1]).index_select(0, flat.reshape(-1)).view(*flat.shape, x.shape[-1])


def _cpu_round(q, k, v, plan: Plan, r: int, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Round r with torch ops: (o (B, H, L, Dv), lse2 (B, H, L)) at original positions; differentiable in q/k/v.

    A joint chunk's queries and keys are cut into blocks of `_SUB` consecutive ranks, and every query block is
    paired with every key block of its chunk and the chunk before (a block-sparse product without padding each
    chunk to its fullest).  Scores are built for groups of at most `_BLOCK_ELEMS`; each group's rows keep their
    own max, sum and weighted values, merged per row at the end.  Padding: queries at position -1, keys at L
    (beyond every query, so causal's strict ``key < query`` drops them and the self pair).  n_ij starts at 1
    (round r itself) and adds the other rounds' hits."""
    b, h, n, _ = q.shape
    hkv, nc, rounds = k.shape[1], plan.n_chunks, plan.qidx.shape[2]
    dev = q.device
    qs, ks = (x[:, :, r].reshape(b * h, nc + 1) for x in (plan.qstart, plan.kstart))
    qown, qrank, qok, _, _ = _blocks(qs[:, :-1].reshape(-1), qs[:, 1:].reshape(-1))
    kown, krank, kok, kfirst, kper = _blocks(ks[:, :-1].reshape(-1), ks[:, 1:].reshape(-1))
    qhead, khead = torch.div(qown, nc, rounding_mode="floor"), torch.div(kown, nc, rounding_mode="floor")
    kvrow = torch.div(khead, h, rounding_mode="floor") * hkv + torch.div(khead % h, h // hkv, rounding_mode="floor")
    qpos = torch.where(qok, plan.qidx[:, :, r].reshape(-1)[qhead[:, None] * n + qrank.clamp(max=n - 1)], -1)
    kpos = torch.where(kok, plan.kidx[:, :, r].reshape(-1)[kvrow[:, None] * n + krank.clamp(max=n - 1)], n)
    qflat, kflat = qhead[:, None] * n + qpos.clamp(min=0), khead[:, None] * n + kpos.clamp(max=n - 1)
    qrows = _rows_at(q * scale, qflat)  # (NQB, S, D)
    kv_flat = kvrow[:, None] * n + kpos.clamp(max=n - 1)
    krows, vrows = _rows_at(k, kv_flat), _rows_at(v, kv_flat)
    ids = torch.int16 if nc < 2**15 else torch.int32
    others = [r2 for r2 in range(rounds) if r2 != r]
    qc = [plan.qch[:, :, r2].reshape(-1)[qflat].to(ids) for r2 in others]
    qprev = [torch.where(x == 0, nc - 1, x - 1) for x in qc]
    kc = [plan.kch[:, :, r2].reshape(-1)[kflat].to(ids) for r2 in others]
    # pairs (query block, key block): every key block of the chunk before (wrapping; none with one chunk), then
    # of the query block's own chunk
    prev = qhead * nc + (qown % nc - 1) % nc
    n_prev = kper[prev] if nc > 1 else torch.zeros_like(qown)
    count = n_prev + kper[qown]
    pq = torch.repeat_interleave(torch.arange(qown.numel(), device=dev), count)
    u = torch.arange(pq.numel(), device=dev) - (torch.cumsum(count, 0) - count)[pq]
    pk = torch.where(u < n_prev[pq], kfirst[prev[pq]] + u, kfirst[qown[pq]] + u - n_prev[pq])
    counts = torch.uint8 if rounds < 2**8 else torch.int32
    slot = torch.arange(_SUB, device=dev)
    parts = []
    step = max(1, _BLOCK_ELEMS // (_SUB * _SUB))
    for lo in range(0, pq.numel(), step):
        bq, bk = pq[lo:lo + step], pk[lo:lo + step]
        s = qrows[bq] @ krows[bk].transpose(-1, -2)  # (P, S, S)
        if others:
            cnt = torch.ones(s.shape, dtype=counts, device=dev)
            for qci, qpi, kci in zip(qc, qprev, kc):
                kcb = kci[bk][:, None, :]
                hit = (kcb == qci[bq][:, :, None]).logical_or_(kcb == qpi[bq][:, :, None])
                cnt += hit.view(torch.uint8) if counts == torch.uint8 else hit
            s = s.sub_(cnt.to(s.dtype).log_())
        qpb, kpb = qpos[bq][:, :, None], kpos[bk][:, None, :]
        drop = kpb >= qpb if causal else torch.logical_or(kpb >= n, kpb == qpb)
        s = s.masked_fill_(drop, float("-inf"))
        q0 = int(bq[0])
        rid = ((bq - q0)[:, None] * _SUB + slot).reshape(-1)
        size = (int(bq[-1]) - q0 + 1) * _SUB
        mx = torch.full((size,), float("-inf"), dtype=s.dtype, device=dev)
        mx = mx.scatter_reduce_(0, rid, s.detach().amax(-1).reshape(-1), "amax")
        e = (s - torch.where(torch.isinf(mx), 0.0, mx)[rid].view(s.shape[:2])[..., None]).exp_()
        tot = torch.zeros(size, dtype=s.dtype, device=dev).index_add(0, rid, e.sum(-1).reshape(-1))
        acc = (e @ vrows[bk]).reshape(-1, v.shape[-1])
        acc = torch.zeros(size, v.shape[-1], dtype=s.dtype, device=dev).index_add(0, rid, acc)
        parts.append((q0 * _SUB + torch.arange(size, device=dev), mx, tot, acc))
    rows = qpos.numel()
    if parts:
        rid, mx, tot, acc = (torch.cat(x) for x in zip(*parts))
    else:
        rid, mx = torch.zeros(0, dtype=torch.long, device=dev), q.new_zeros(0)
        tot, acc = q.new_zeros(0), q.new_zeros(0, v.shape[-1])
    top = torch.full((rows,), float("-inf"), dtype=q.dtype, device=dev).scatter_reduce_(0, rid, mx, "amax")
    top = torch.where(torch.isinf(top), 0.0, top)
    w = torch.exp(mx - top[rid])
    tot = torch.zeros(rows, dtype=q.dtype, device=dev).index_add(0, rid, tot * w)
    acc = torch.zeros(rows, v.shape[-1], dtype=q.dtype, device=dev).index_add(0, rid, acc * w[:, None])
    live = tot > 0
    safe = torch.where(live, tot, 1.0)
    # back to original positions: each (batch * head, position) has exactly one in-range query slot
    ok = qok.reshape(-1)
    where = torch.empty(b * h * n, dtype=torch.long, device=dev)
    where[(qhead[:, None] * n + qpos).reshape(-1)[ok]] = torch.arange(rows, device=dev)[ok]
    o = (acc / safe[:, None])[where].view(b, h, n, -1)
    lse = torch.where(live, (torch.log(safe) + top) * LOG2E, float("-inf"))[where].view(b, h, n)
    return o, lse


def forward(q, k, v, plan: Plan, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out in fp32 (fp64 for fp64 inputs), LSE2) of the plain-CPU path; differentiable in q/k/v."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    rounds = [_cpu_round(qf, kf, vf, plan, r, scale, causal) for r in range(plan.qidx.shape[2])]
    o_r = torch.stack([o for o, _ in rounds], dim=2)
    lse_r = torch.stack([x for _, x in rounds], dim=2)
    return merge(qf, kf, vf, o_r, lse_r, scale)
