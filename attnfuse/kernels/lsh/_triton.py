"""The Triton path of LSH attention: the chunk-attention kernels of every round (`_fwd_kernel`, `_bwd_dq_kernel`,
`_bwd_dkdv_kernel`, their `@triton.jit` helpers beside them) and their launchers (`triton_rounds`,
`triton_grads`), one tile per launch (`_config`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import LOG2E, launch, pow2, precision
from ._hashing import Plan

__all__ = ["triton_grads", "triton_rounds"]


@triton.jit
def _scores(q, kt, qpos, kpos, row_ok, col_ok, QCh, KCh, ch_base, r, L, n_hashes, n_chunks, qk_scale,
            IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scores of one tile in the log2 domain minus log2(n_ij), -inf where masked: out of range, self, causal, or
    not a pair of round r (key chunk neither the query's chunk nor the one before it, wrapping).

    ``qpos``/``kpos`` are original token positions; ``QCh + ch_base + r2 * L + pos`` is the joint chunk of query
    ``pos`` in round r2 (``KCh`` likewise for keys, in the same query head's joint sequences).  n_ij counts the
    rounds in which the pair is adjacent, O(R) per pair; every kept pair has n_ij >= 1 (its own round r).
    """
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
    cnt = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    own = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for r2 in range(0, n_hashes):
        qc = tl.load(QCh + ch_base + r2 * L + qpos)
        qprev = tl.where(qc == 0, n_chunks - 1, qc - 1)
        kc = tl.load(KCh + ch_base + r2 * L + kpos)
        hit = ((kc[None, :] == qc[:, None]) | (kc[None, :] == qprev[:, None])).to(tl.int32)
        cnt += hit
        own += hit * (r2 == r).to(tl.int32)
    s -= tl.log2(tl.maximum(cnt, 1).to(tl.float32))
    keep = (own > 0) & row_ok[:, None] & col_ok[None, :] & (kpos[None, :] != qpos[:, None])
    if IS_CAUSAL:
        keep = keep & (kpos[None, :] <= qpos[:, None])
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _span(Ch, Start, ch_base, s_base, pos, ok, L, n_chunks, TO_KEYS: tl.constexpr):
    """[lo, hi): the ranks (modulo L, so a range may wrap past the end) of the other side's tokens in the chunks
    adjacent to this tile's.  The tile's tokens (original positions ``pos``, chunks ``Ch + ch_base + pos``) lie in
    the consecutive joint chunks c_lo..c_hi; ``Start + s_base + c`` is the other side's first rank in chunk c
    (n_chunks + 1 entries).  Queries (``TO_KEYS``) need the keys of chunks c_lo - 1..c_hi, keys the queries of
    chunks c_lo..c_hi + 1 (wrapping; a range never holds a chunk twice)."""
    c = tl.load(Ch + ch_base + pos, mask=ok, other=0)
    c_lo = tl.min(tl.where(ok, c, n_chunks), 0)
    c_hi = tl.max(tl.where(ok, c, -1), 0)
    if TO_KEYS:
        lo_in = tl.load(Start + s_base + tl.maximum(c_lo - 1, 0))
        hi_in = tl.load(Start + s_base + c_hi + 1)
        wrap = tl.load(Start + s_base + n_chunks - 1)
        everything = c_hi == n_chunks - 1
        lo = tl.where(c_lo > 0, lo_in, tl.where(everything, 0, wrap))
        hi = tl.where(c_lo > 0, hi_in, tl.where(everything, L, hi_in + L))
    else:
        lo_in = tl.load(Start + s_base + c_lo)
        hi_in = tl.load(Start + s_base + tl.minimum(c_hi + 2, n_chunks))
        first = tl.load(Start + s_base + 1)
        inside = c_hi < n_chunks - 1
        lo = tl.where(inside | (c_lo > 0), lo_in, 0)
        hi = tl.where(inside, hi_in, tl.where(c_lo > 0, first + L, L))
    return lo, hi


@triton.jit
def _rows(Idx, z, start, end, L, BLOCK: tl.constexpr):
    """(in-range flags, original positions) of ranks start..start+BLOCK (< end, modulo L) of sorted row ``z``."""
    i = start + tl.arange(0, BLOCK)
    ok = i < end
    i = tl.where(i >= L, i - L, i)
    pos = tl.load(Idx + z * L + i, mask=ok, other=0)
    return ok, pos


@triton.jit
def _query_program(H, n_hashes, GROUPS: tl.constexpr):
    """The ids of a query-side program: axis 1 is z = (b * H + h) * n_hashes + r; zk is the same round of its
    K/V head (b * Hkv + hkv) * n_hashes + r.  Returns (z, r, bh, h, b, hkv, zk)."""
    z = tl.program_id(1)
    r = z % n_hashes
    bh = z // n_hashes
    h = bh % H
    b = bh // H
    hkv = h // GROUPS
    zk = (b * (H // GROUPS) + hkv) * n_hashes + r
    return z, r, bh, h, b, hkv, zk


@triton.jit
def _fwd_kernel(
    # pointers
    Q, K, V, QIdx, KIdx, QCh, KCh, QStart, KStart, Out, Lse,
    # strides
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    # sizes and scalars
    H, L, n_chunks, n_hashes, qk_scale,
    # meta
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program: BLOCK_M consecutive queries in round r's (bucket, position) order of (batch, head), against
    the keys of their joint chunks and of the chunk before each.  Writes the round's normalized output (fp32, 0
    for a row with no key) and log2-sum-exp (-inf) at the rows' original positions of Out (B, H, R, L, Dv) /
    Lse (B, H, R, L).

    QIdx (B, H, R, L) / KIdx (B, Hkv, R, L) int32: positions in sorted order; QCh/KCh (B, H, R, L): joint chunk
    of each position; QStart/KStart (B, H, R, n_chunks + 1): first query / key rank of each joint chunk.
    """
    z, r, bh, h, b, hkv, zk = _query_program(H, n_hashes, GROUPS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok, qpos = _rows(QIdx, z, tl.program_id(0) * BLOCK_M, L, L, BLOCK_M)
    q = tl.load(Q + b * stride_qb + h * stride_qh + qpos[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    ch_base = bh * n_hashes * L
    lo, hi = _span(QCh, KStart, ch_base + r * L, z * (n_chunks + 1), qpos, row_ok, L, n_chunks, True)
    K += b * stride_kb + hkv * stride_kh
    V += b * stride_vb + hkv * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        col_ok, kpos = _rows(KIdx, zk, start, hi, L, BLOCK_N)
        kt = tl.load(K + kpos[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=col_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        v = tl.load(V + kpos[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        s = _scores(q, kt, qpos, kpos, row_ok, col_ok, QCh, KCh, ch_base, r, L, n_hashes, n_chunks, qk_scale,
                    IS_CAUSAL, PRECISION, BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    live = l_i > 0
    l_safe = tl.where(live, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(live, m_i + tl.log2(l_safe), float("-inf"))
    rows = z.to(tl.int64) * L + qpos
    tl.store(Out + rows[:, None] * HEAD_DIM_V + offs_dv[None, :], out,
             mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(Lse + rows, lse, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    # pointers
    Q, K, V, DO, Stats, Delta, QIdx, KIdx, QCh, KCh, QStart, KStart, DQ,
    # strides
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    # sizes and scalars
    H, L, n_chunks, n_hashes, qk_scale, sm_scale,
    # meta
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ of one round from the tile's rows, as `_fwd_kernel` visits them: P = exp2(s - LSE2) with the merged
    LSE (``Stats`` (B, H, L, 2) fp32, [LSE2, 0]), dS = P (dO V^T - Delta).  Writes DQ (B, H, R, L, D) fp32."""
    z, r, bh, h, b, hkv, zk = _query_program(H, n_hashes, GROUPS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok, qpos = _rows(QIdx, z, tl.program_id(0) * BLOCK_M, L, L, BLOCK_M)
    q = tl.load(Q + b * stride_qb + h * stride_qh + qpos[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + qpos[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    lse = tl.load(Stats + (bh * L + qpos) * 2, mask=row_ok, other=0.0)
    delta = tl.load(Delta + bh * L + qpos, mask=row_ok, other=0.0)
    ch_base = bh * n_hashes * L
    lo, hi = _span(QCh, KStart, ch_base + r * L, z * (n_chunks + 1), qpos, row_ok, L, n_chunks, True)
    K += b * stride_kb + hkv * stride_kh
    V += b * stride_vb + hkv * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        col_ok, kpos = _rows(KIdx, zk, start, hi, L, BLOCK_N)
        k = tl.load(K + kpos[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        vt = tl.load(V + kpos[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
                     mask=col_ok[None, :] & (offs_dv[:, None] < HEAD_DIM_V), other=0.0)
        s = _scores(q, tl.trans(k), qpos, kpos, row_ok, col_ok, QCh, KCh, ch_base, r, L, n_hashes, n_chunks,
                    qk_scale, IS_CAUSAL, PRECISION, BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    rows = z.to(tl.int64) * L + qpos
    tl.store(DQ + rows[:, None] * HEAD_DIM + offs_d[None, :], dq * sm_scale,
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _bwd_dkdv_kernel(
    # pointers
    Q, K, V, DO, Stats, Delta, QIdx, KIdx, QCh, KCh, QStart, KStart, DK, DV,
    # strides
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    # sizes and scalars
    H, L, n_chunks, n_hashes, qk_scale, sm_scale,
    # meta
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dK/dV of one round for BLOCK_N consecutive keys in round r's (bucket, position) order of (batch, K/V head):
    for each of the group's query heads, over the queries of the keys' joint chunks (in that head's joint
    sequence) and of the chunk after each (wrapping).  Writes DK/DV (B, Hkv, R, L, D|Dv) fp32 at the keys'
    original positions."""
    zk = tl.program_id(1)  # (b * Hkv + hkv) * n_hashes + r
    r = zk % n_hashes
    hkv = zk // n_hashes % (H // GROUPS)
    b = zk // n_hashes // (H // GROUPS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok, kpos = _rows(KIdx, zk, tl.program_id(0) * BLOCK_N, L, L, BLOCK_N)
    k = tl.load(K + b * stride_kb + hkv * stride_kh + kpos[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    v = tl.load(V + b * stride_vb + hkv * stride_vh + kpos[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for g in range(0, GROUPS):
        h = hkv * GROUPS + g
        bh = b * H + h
        z = bh * n_hashes + r
        ch_base = bh * n_hashes * L
        lo, hi = _span(KCh, QStart, ch_base + r * L, z * (n_chunks + 1), kpos, col_ok, L, n_chunks, False)
        for start in range(lo, hi, BLOCK_M):
            row_ok, qpos = _rows(QIdx, z, start, hi, L, BLOCK_M)
            q = tl.load(Q + b * stride_qb + h * stride_qh + qpos[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
            do = tl.load(DO + b * stride_dob + h * stride_doh + qpos[:, None] * stride_dom
                         + offs_dv[None, :] * stride_dod, mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V),
                         other=0.0)
            lse = tl.load(Stats + (bh * L + qpos) * 2, mask=row_ok, other=0.0)
            delta = tl.load(Delta + bh * L + qpos, mask=row_ok, other=0.0)
            s = _scores(q, tl.trans(k), qpos, kpos, row_ok, col_ok, QCh, KCh, ch_base, r, L, n_hashes, n_chunks,
                        qk_scale, IS_CAUSAL, PRECISION, BLOCK_M, BLOCK_N)
            p = tl.exp2(s - lse[:, None])
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    rows = zk.to(tl.int64) * L + kpos
    tl.store(DK + rows[:, None] * HEAD_DIM + offs_d[None, :], dk * sm_scale,
             mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + rows[:, None] * HEAD_DIM_V + offs_dv[None, :], dv,
             mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


def _config(bucket: int, head_dim: int, head_dim_v: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of every launch for ``bucket`` = min(bucket_size, L) (a joint
    chunk's mean number of queries and of keys): tiles of at most 64 rows (32 past head dim 128);
    test_lsh_aot.py compiles them for sm_90/sm_80 and checks their shared memory."""
    cap = 64 if max(head_dim, head_dim_v) <= 128 else 32
    block = min(cap, pow2(bucket))
    return block, block, 4, 2


def _meta(q, k, v, plan: Plan, causal: bool) -> tuple[dict, tuple]:
    d, dv = q.shape[-1], v.shape[-1]
    block_m, block_n, warps, stages = _config(plan.chunk // 2, d, dv)
    meta = dict(GROUPS=q.shape[1] // k.shape[1], HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_D=pow2(d), BLOCK_DV=pow2(dv),
                BLOCK_M=block_m, BLOCK_N=block_n, IS_CAUSAL=bool(causal), PRECISION=precision(q.dtype),
                num_warps=warps, num_stages=stages)
    sizes = (q.shape[1], q.shape[2], plan.n_chunks, plan.qidx.shape[2])
    return meta, sizes


def _index_args(plan: Plan) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(torch.int32).contiguous()
                 for t in (plan.qidx, plan.kidx, plan.qch, plan.kch, plan.qstart, plan.kstart))


def triton_rounds(q, k, v, plan: Plan, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Every round's chunk attention: (o_r (B, H, R, L, Dv) fp32, lse2_r (B, H, R, L) fp32) at original positions."""
    b, h, n, _ = q.shape
    rounds = plan.qidx.shape[2]
    meta, sizes = _meta(q, k, v, plan, causal)
    o_r = torch.empty(b, h, rounds, n, v.shape[-1], dtype=torch.float32, device=q.device)
    lse_r = torch.empty(b, h, rounds, n, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(n, meta["BLOCK_M"]), b * h * rounds)
    launch(_fwd_kernel)[grid](q, k, v, *_index_args(plan), o_r, lse_r, *q.stride(), *k.stride(), *v.stride(),
                               *sizes, scale * LOG2E, **meta)
    return o_r, lse_r


def triton_grads(grad_out, q, k, v, stats, delta, plan: Plan, scale: float, causal: bool):
    """Every round's (dQ (B, H, R, L, D), dK, dV (B, Hkv, R, L, D|Dv)) fp32, without the self term."""
    b, h, n, d = q.shape
    hkv, dv_ = k.shape[1], v.shape[-1]
    rounds = plan.qidx.shape[2]
    meta, sizes = _meta(q, k, v, plan, causal)
    idx = _index_args(plan)
    dq = torch.empty(b, h, rounds, n, d, dtype=torch.float32, device=q.device)
    dk = torch.empty(b, hkv, rounds, n, d, dtype=torch.float32, device=q.device)
    dv = torch.empty(b, hkv, rounds, n, dv_, dtype=torch.float32, device=q.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    scalars = (*sizes, scale * LOG2E, scale)
    launch(_bwd_dq_kernel)[(triton.cdiv(n, meta["BLOCK_M"]), b * h * rounds)](
        q, k, v, grad_out, stats, delta, *idx, dq, *strides, *scalars, **meta)
    launch(_bwd_dkdv_kernel)[(triton.cdiv(n, meta["BLOCK_N"]), b * hkv * rounds)](
        q, k, v, grad_out, stats, delta, *idx, dk, dv, *strides, *scalars, **meta)
    return dq, dk, dv
