"""LSH attention (Reformer, Kitaev et al. 2020) for separate queries and keys: O(N log N) memory, O(N*C*R) work.

Each query attends a subset of the keys chosen by hashing, in ``n_hashes`` rounds R, and the rounds are merged
into the exact softmax over the union of the keys they chose:

1. Asymmetric transform (Neyshabur & Srebro's MIPS reduction): per (batch, K/V head) ``M = max_j |k_j|``,
   ``k' = [k / M, sqrt(1 - |k|^2 / M^2)]``, ``q' = [q / |q|, 0]`` (dim D+1; zero norms give zero vectors), so
   that the angle between q' and k' orders keys by inner product with q.
2. Random rotations: ``n_buckets = max(2, 2 * round(L / (2 * bucket_size)))``; ``R`` (n_hashes, D+1,
   n_buckets/2) from ``torch.Generator().manual_seed(seed)`` on the CPU (every device hashes alike), shared by
   all heads; ``bucket(x) = argmax([x'R, -x'R])`` per round (`buckets`).
3. Per round and query head, the L queries and the L keys (of its K/V head) are sorted jointly: one sequence
   of 2L items ordered by (bucket, position, kind), a key before the query at the same (bucket, position).  It
   is cut into joint chunks of 2 * min(bucket_size, L) items, so a chunk holds about bucket_size queries and
   bucket_size keys when the buckets are balanced (n_buckets ~ L / bucket_size; with the asymmetric transform
   they are not: keys crowd a few buckets).  A query in joint chunk c attends the keys in joint chunks c and
   c-1, where c-1 wraps to the last chunk for c = 0 (as Reformer; with one chunk it is attended once).  A
   query and a key that share a bucket are thus attended when few items of that bucket lie between their
   positions.  With bucket_size >= L there is one chunk: every key is attended.  Causal: key
   position <= query position.  A query's own key is excluded inside the chunks and added once as an extra
   "self" term, so every row has a key.
4. Duplicates across rounds count once (Reformer's correction): with n_ij the number of rounds in which key j
   lies in one of query i's attended chunks, every round subtracts log(n_ij) from the pair's score.  The
   rounds and the self term merge by log-sum-exp, ``LSE_i = logsumexp(lse_1..R, s_ii)``,
   ``out_i = sum_r exp(lse_r - LSE) o_r + exp(s_ii - LSE) v_i``: exactly the softmax over the union of the
   attended keys.  With bucket_size >= L (one joint chunk) it is exact attention.

Paths.  Hashing, sorting and merging are torch ops on every path: `_plan` sorts queries and keys separately
by (bucket, position) (the joint order restricted to each kind) and merges the two orders with searchsorted
into joint ranks, giving each token its joint chunk and each chunk its first query and key rank; a chunk's
queries (keys) are consecutive in the query (key) order.  On CUDA tensors (CPU ones under
``TRITON_INTERPRET=1``) the chunk attention is Triton: `_fwd_kernel` (per tile of consecutive sorted queries
and (batch, head, round): the keys of the chunks c_lo - 1..c_hi adjacent to the tile's chunks c_lo..c_hi, one
contiguous, possibly wrapping range of key ranks, masked to the pairs of the round; -log2 n_ij computed in the
kernel from every round's chunk ids, O(R) per pair) writes each round's normalized output and log2-sum-exp
at the queries' original positions; the backward kernels (`_bwd_dq_kernel` per query tile, `_bwd_dkdv_kernel`
per key tile over the group's query heads and the queries of the chunks c_lo..c_hi + 1 that attend it) need
no per-round output: with the merged LSE the round's probabilities are ``exp(s - log n - LSE)`` and
``dS = P (dP - Delta)``, ``Delta = rowsum(dO * O)`` (the gradient through lse_r folds into Delta).  The kernels
gather q/k/v/dO rows by the sort permutation (no sorted copies); per-round dQ/dK/dV (fp32, original
positions) are summed over the rounds in torch.  Plain CPU tensors take `_cpu_forward` (each chunk's queries
and keys cut into blocks of 32 ranks, every query block paired with the key blocks of its chunk and the one
before: batched block products with no padding of chunks to their fullest; memory bounded by groups of
pairs); its backward recomputes the forward under autograd.

The hash and the transform's M are discrete / treated as constants: no gradient flows through them.

Limitations: q_len must equal kv_len; no mask, softcap, dropout or ALiBi; head dims up to 256.  Quality
depends on the bucket balance: the asymmetric transform puts most keys in a few buckets, so a query in a
query-heavy bucket attends few keys in that round (on inputs with planted strong keys, as
benchmarks/bench_longcontext.py makes, a query attends about 40 keys per round at bucket_size 64, not 2 * 64),
and many queries aimed at one key, all in its bucket, push it out of the later ones' chunks.  n_buckets grows
with L (as Reformer's), so hashing costs O(N * D * L / C) multiply-adds (a matmul done in blocks of bounded
memory); capping n_buckets would make buckets, and the items between a query and its key, grow with L.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys

import torch
import triton
import triton.language as tl

from . import _family
from ._launch import LOG2E, launch, pow2, precision

__all__ = ["attention", "backward", "buckets", "forward", "unsupported"]

_HASH_ELEMS = 2**20  # elements of one hashing projection block
_BLOCK_ELEMS = 2**19  # scores in one group of block pairs of the CPU path
_SUB = 32  # ranks in one block of the CPU path


# --------------------------------------------------------------------------------------------- kernels


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


# --------------------------------------------------------------------------------------------- launcher


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One hashing of (q, k): per round the sorted orders (positions, int64), each token's joint chunk and each
    joint chunk's first query / key rank (module docstring, step 3)."""

    qidx: torch.Tensor  # (B, H, R, L) query positions in (bucket, position) order
    kidx: torch.Tensor  # (B, Hkv, R, L) key positions in (bucket, position) order
    qch: torch.Tensor  # (B, H, R, L) joint chunk of each query position
    kch: torch.Tensor  # (B, H, R, L) joint chunk of each key position, in query head h's joint sequence
    qstart: torch.Tensor  # (B, H, R, n_chunks + 1) first query rank of each joint chunk (last entry L)
    kstart: torch.Tensor  # (B, H, R, n_chunks + 1) first key rank of each joint chunk (last entry L)
    chunk: int  # joint items per chunk: 2 * min(bucket_size, L)
    n_chunks: int


def _config(bucket: int, head_dim: int, head_dim_v: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of every launch for ``bucket`` = min(bucket_size, L) (a joint
    chunk's mean number of queries and of keys): tiles of at most 64 rows (32 past head dim 128);
    test_lsh_aot.py compiles them for sm_90/sm_80 and checks their shared memory."""
    cap = 64 if max(head_dim, head_dim_v) <= 128 else 32
    block = min(cap, pow2(bucket))
    return block, block, 4, 2


def _meta(q, k, v, plan: _Plan, causal: bool) -> tuple[dict, tuple]:
    d, dv = q.shape[-1], v.shape[-1]
    block_m, block_n, warps, stages = _config(plan.chunk // 2, d, dv)
    meta = dict(GROUPS=q.shape[1] // k.shape[1], HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_D=pow2(d), BLOCK_DV=pow2(dv),
                BLOCK_M=block_m, BLOCK_N=block_n, IS_CAUSAL=bool(causal), PRECISION=precision(q.dtype),
                num_warps=warps, num_stages=stages)
    sizes = (q.shape[1], q.shape[2], plan.n_chunks, plan.qidx.shape[2])
    return meta, sizes


def _index_args(plan: _Plan) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(torch.int32).contiguous()
                 for t in (plan.qidx, plan.kidx, plan.qch, plan.kch, plan.qstart, plan.kstart))


def _triton_rounds(q, k, v, plan: _Plan, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
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


def _triton_grads(grad_out, q, k, v, stats, delta, plan: _Plan, scale: float, causal: bool):
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


# --------------------------------------------------------------------------------------------- hashing


@functools.lru_cache(maxsize=16)
def _rotations(seed: int, n_hashes: int, dim: int, half: int) -> torch.Tensor:
    """(n_hashes, dim, half) float32 standard normal rotations, drawn on the CPU from ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(n_hashes, dim, half, generator=gen, dtype=torch.float32, device="cpu")


def _n_buckets(n: int, bucket_size: int) -> int:
    return max(2, 2 * round(n / (2 * bucket_size)))


def _hash(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """argmax([x R_r, -x R_r]) for every round r of ``rot``: (B, Hx, L, D+1) -> (B, Hx, R, L) int64, in row blocks
    whose projection holds at most `_HASH_ELEMS` elements.  The argmax of the concatenation is the argmax of
    x R_r when its max is at least minus its min (first index wins ties, as argmax), else half + its argmin."""
    b, hx, n, _ = x.shape
    rounds, _, half = rot.shape
    out = torch.empty(b, hx, rounds, n, dtype=torch.int64, device=x.device)
    step = max(1, _HASH_ELEMS // max(1, b * hx * half))
    for r in range(rounds):
        for lo in range(0, n, step):
            proj = x[:, :, lo:lo + step] @ rot[r]
            hi_val, hi_idx = proj.max(-1)
            lo_val, lo_idx = proj.min(-1)
            out[:, :, r, lo:lo + step] = torch.where(hi_val >= -lo_val, hi_idx, lo_idx + half)
    return out


def _buckets(q, k, n_hashes: int, bucket_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query buckets (B, H, R, L) and key buckets (B, Hkv, R, L) of the asymmetric transform (module docstring)."""
    d, n = q.shape[-1], k.shape[2]
    rot = _rotations(seed, n_hashes, d + 1, _n_buckets(n, bucket_size) // 2).to(q.device)
    with torch.no_grad():
        qf, kf = q.detach().float(), k.detach().float()
        tiny = torch.finfo(torch.float32).tiny
        qn = qf / torch.linalg.vector_norm(qf, dim=-1, keepdim=True).clamp_min(tiny)
        kn2 = (kf * kf).sum(-1, keepdim=True)
        m2 = kn2.amax(dim=2, keepdim=True).clamp_min(tiny)
        kx = torch.cat([kf / m2.sqrt(), (1 - kn2 / m2).clamp_min(0).sqrt()], dim=-1)
        qx = torch.cat([qn, torch.zeros_like(qn[..., :1])], dim=-1)
        return _hash(qx, rot), _hash(kx, rot)


def buckets(q: torch.Tensor, k: torch.Tensor, *, n_hashes: int, bucket_size: int,
            seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bucket of every query and key per round: two int64 (B, H, R, L) tensors (the keys' expanded from their
    K/V heads to the query heads, a view).  Deterministic in ``seed`` on every device (up to float ties)."""
    _check_params(n_hashes, bucket_size, seed)
    qb, kb = _buckets(q, k, n_hashes, bucket_size, seed)
    b, h, r, n = qb.shape
    groups = h // kb.shape[1]
    return qb, kb[:, :, None].expand(b, kb.shape[1], groups, r, n).reshape(b, h, r, n)


def _plan(q, k, n_hashes: int, bucket_size: int, seed: int) -> _Plan:
    """Hash, sort and chunk (module docstring, steps 2-3).  The joint order is the merge of the query order and
    the key order, so a query's joint rank is its query rank plus the number of keys that sort before it
    (``searchsorted``; keys first at equal (bucket, position)), and a key's likewise."""
    qb, kb = _buckets(q, k, n_hashes, bucket_size, seed)
    b, h, rounds, n = qb.shape
    chunk = 2 * min(bucket_size, n)
    n_chunks = -(-2 * n // chunk)
    pos = torch.arange(n, device=qb.device)
    qkey, qidx = torch.sort(qb * n + pos, dim=-1)  # distinct sort keys: (bucket, position) order
    kkey, kidx = torch.sort(kb * n + pos, dim=-1)
    kkey, kidx_h = _expand_kv(kkey, h).contiguous(), _expand_kv(kidx, h)
    jq = torch.searchsorted(kkey, qkey, right=True).add_(pos)  # joint rank of each query rank
    jk = torch.searchsorted(qkey, kkey).add_(pos)  # joint rank of each key rank
    qch = torch.empty_like(qidx).scatter_(-1, qidx, torch.div(jq, chunk, rounding_mode="floor"))
    kch = torch.empty_like(qidx).scatter_(-1, kidx_h, torch.div(jk, chunk, rounding_mode="floor"))
    bounds = (torch.arange(n_chunks + 1, device=qb.device) * chunk).expand(b, h, rounds, n_chunks + 1).contiguous()
    return _Plan(qidx, kidx, qch, kch, torch.searchsorted(jq, bounds), torch.searchsorted(jk, bounds), chunk,
                 n_chunks)


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv, L, X) -> (B, H, L, X): each K/V head repeated for its query heads (expand + reshape)."""
    b, hkv, n, e = x.shape
    return x[:, :, None].expand(b, hkv, heads // hkv, n, e).reshape(b, heads, n, e)


def _self_scores(q, k, scale: float) -> torch.Tensor:
    """s_ii in log2 units, fp32 (fp64 for fp64 inputs) (B, H, L)."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.to(ct) * _expand_kv(k, q.shape[1]).to(ct)).sum(-1) * (scale * LOG2E)


def _merge(q, k, v, o_r, lse_r, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the rounds (o_r (B, H, R, L, Dv), lse_r log2 (B, H, R, L)) and the self term by log-sum-exp:
    (out fp32 (fp64 for fp64 inputs) (B, H, L, Dv), LSE2 (B, H, L)).  Differentiable (the CPU path's backward
    runs through it)."""
    s2 = _self_scores(q, k, scale)
    m = torch.maximum(lse_r.amax(dim=2), s2).detach()
    w_r = torch.exp2(lse_r - m[:, :, None])
    w_s = torch.exp2(s2 - m)
    total = w_r.sum(2) + w_s
    vs = _expand_kv(v, q.shape[1]).to(w_s.dtype)
    out = ((w_r[..., None] * o_r).sum(2) + w_s[..., None] * vs) / total[..., None]
    return out, m + torch.log2(total)


# --------------------------------------------------------------------------------------------- CPU path


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


def _cpu_round(q, k, v, plan: _Plan, r: int, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
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


def _cpu_forward(q, k, v, plan: _Plan, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out in fp32 (fp64 for fp64 inputs), LSE2) of the plain-CPU path; differentiable in q/k/v."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    rounds = [_cpu_round(qf, kf, vf, plan, r, scale, causal) for r in range(plan.qidx.shape[2])]
    o_r = torch.stack([o for o, _ in rounds], dim=2)
    lse_r = torch.stack([x for _, x in rounds], dim=2)
    return _merge(qf, kf, vf, o_r, lse_r, scale)


# --------------------------------------------------------------------------------------------- API


def unsupported(q_shape, k_shape, *, causal: bool = False) -> str | None:
    """None when LSH attention takes these (B, H, L, D) shapes, else why not (one sentence, for the policy)."""
    if len(q_shape) != 4 or len(k_shape) != 4:
        return "LSH attention takes 4-D (batch, heads, seqlen, head_dim) tensors"
    if q_shape[2] != k_shape[2]:
        return f"LSH attention hashes queries and keys into one set of chunks: it needs q_len == kv_len, " \
               f"not {q_shape[2]} != {k_shape[2]}"
    if q_shape[2] < 1:
        return "LSH attention needs at least one token"
    return None


def _check_params(n_hashes, bucket_size, seed) -> None:
    for name, val, low in (("n_hashes", n_hashes, 1), ("bucket_size", bucket_size, 1), ("seed", seed, None)):
        if not isinstance(val, int) or isinstance(val, bool) or (low is not None and val < low):
            allowed = "an int" if low is None else f"an int >= {low}"
            raise ValueError(f"attnfuse.kernels.lsh: {name} must be {allowed}; got {val!r}")


def _triton_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Triton path runs (`attnfuse.kernels._family.triton_runs`); the CPU path takes CPU tensors."""
    return _family.triton_runs(q, k, v, "attnfuse.kernels.lsh")


def _validate(q, k, v, causal, n_hashes, bucket_size, seed, mask=None, softcap=0.0, dropout_p=0.0,
              alibi=None) -> None:
    who = "attnfuse.kernels.lsh"
    for name, val, off in (("mask", mask, None), ("alibi", alibi, None), ("softcap", softcap, 0.0),
                           ("dropout_p", dropout_p, 0.0)):
        if (val is not None) if off is None else (val != off):
            raise ValueError(f"{who}: {name} is not supported by LSH attention (it must be {off}); use the flash "
                             f"kernels for masked, soft-capped, dropout or ALiBi attention")
    _check_params(n_hashes, bucket_size, seed)
    why = unsupported(tuple(q.shape), tuple(k.shape), causal=causal)
    if why:
        raise ValueError(f"{who}: {why}")
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1] or k.shape[-1] != q.shape[-1] or k.shape[:3] != \
            v.shape[:3] or q.shape[0] != k.shape[0]:
        raise ValueError(f"{who}: need q heads divisible by k heads, equal k/v heads and lengths, equal q/k head dims;"
                         f" got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"{who}: q, k, v must share a floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    _triton_path(q, k, v)  # raises for tensors neither path takes


def _scale(q, scale) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def forward(q, k, v, *, scale=None, causal=False, n_hashes=4, bucket_size=64, seed=0, mask=None, softcap=0.0,
            dropout_p=0.0, alibi=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, L, Dv) in q's dtype, stats (B, H, L, 2) fp32): stats holds the merged log-sum-exp of each row
    in log2 units and 0 (flash's (max, log2 sum) convention), which `backward` needs on the Triton path."""
    _validate(q, k, v, causal, n_hashes, bucket_size, seed, mask, softcap, dropout_p, alibi)
    sc = _scale(q, scale)
    with torch.no_grad():
        plan = _plan(q, k, n_hashes, bucket_size, seed)
        if _triton_path(q, k, v):
            out, lse2 = _merge(q, k, v, *_triton_rounds(q, k, v, plan, sc, causal), sc)
        else:
            out, lse2 = _cpu_forward(q, k, v, plan, sc, causal)
    stats = torch.stack([lse2.float(), torch.zeros_like(lse2, dtype=torch.float32)], dim=-1)
    return out.to(q.dtype), stats


def backward(grad_out, q, k, v, out, stats, *, scale=None, causal=False, n_hashes=4, bucket_size=64,
             seed=0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `forward`'s output.  Recomputes the hashing; the Triton path reads the merged LSE from
    ``stats`` and ``Delta = rowsum(grad_out * out)``, the CPU path recomputes its forward under autograd."""
    sc = _scale(q, scale)
    if not _triton_path(q, k, v):
        with torch.enable_grad():
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
            o, _ = _cpu_forward(qq, kk, vv, _plan(qq, kk, n_hashes, bucket_size, seed), sc, causal)
            grads = torch.autograd.grad(o, (qq, kk, vv), grad_out.to(o.dtype))
        return tuple(g.to(x.dtype) for g, x in zip(grads, (q, k, v)))
    b, h, n, d = q.shape
    hkv = k.shape[1]
    with torch.no_grad():
        plan = _plan(q, k, n_hashes, bucket_size, seed)
        go = grad_out.to(q.dtype)
        stats = stats.float().contiguous()
        delta = (go.float() * out.float()).sum(-1).contiguous()
        dq_r, dk_r, dv_r = _triton_grads(go, q, k, v, stats, delta, plan, sc, causal)
        # the self term: p_ii = exp2(s_ii - LSE2), dS_ii = p_ii (dO_i . v_i - Delta_i)
        p_self = torch.exp2(_self_scores(q, k, sc) - stats[..., 0])
        gof = go.float()
        ds = p_self * ((gof * _expand_kv(v, h).float()).sum(-1) - delta)
        dq = dq_r.sum(2) + (ds * sc)[..., None] * _expand_kv(k, h).float()
        dk = dk_r.sum(2) + ((ds * sc)[..., None] * q.float()).view(b, hkv, h // hkv, n, d).sum(2)
        dv = dv_r.sum(2) + (p_self[..., None] * gof).view(b, hkv, h // hkv, n, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, causal: bool = False,
              n_hashes: int = 4, bucket_size: int = 64, seed: int = 0, mask=None, softcap: float = 0.0,
              dropout_p: float = 0.0, alibi=None) -> torch.Tensor:
    """LSH attention on ``(batch, heads, seqlen, head_dim)`` tensors, with autograd (module docstring).

    K/V may have fewer heads (GQA).  ``n_hashes`` rounds, chunks of ``bucket_size`` sorted tokens, rotations
    from ``seed``.  ``mask``/``softcap``/``dropout_p``/``alibi`` exist only to raise a clear ValueError.  Runs the
    Triton kernels on CUDA tensors (CPU ones under ``TRITON_INTERPRET=1``), torch ops (what
    ``torch.ops.attnfuse.attention`` runs for LSH) on other CPU tensors, float64 included
    (`attnfuse.kernels._family.triton_runs`).
    """
    _validate(q, k, v, causal, n_hashes, bucket_size, seed, mask, softcap, dropout_p, alibi)
    kwargs = dict(scale=scale, causal=causal, n_hashes=n_hashes, bucket_size=bucket_size, seed=seed)
    return _family.attention(sys.modules[__name__], q, k, v, kwargs)
