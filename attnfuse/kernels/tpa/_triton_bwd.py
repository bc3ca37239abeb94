"""The ``tpa`` backward kernels: `dkdv_kernel` (dK/dV of one key tile of one K/V head, summed over its query
heads) and `dq_kernel` (dQ of one query tile of one head).  Both recompute the probabilities from the forward's
row statistics, forming every Q/K/V tile from its factors on chip (`attnfuse.kernels.tpa._triton_fwd.side_tile`);
they write dQ/dK/dV per head in fp32, which `attnfuse.kernels.tpa._triton` contracts to the factor gradients.

A row that saw no key (statistics max -inf) contributes nothing: its probabilities are read as 0 (max +inf, log2
sum 0) and the launcher passes its ``delta`` as 0.  The per-tile gradient math is flash's (`bwd_tile_grads`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..flash._jit import band_keys, band_rows, f32
from ..flash.bwd import bwd_tile_grads
from ._triton_fwd import side_tile

__all__ = ["dkdv_kernel", "dq_kernel"]


@triton.jit
def _rows(DO, Stats, Delta, b, h, pid_bh, rows, offs_dv, stride_dob, stride_doh, stride_dom, stride_dod, Lq,
          HEAD_DIM_V: tl.constexpr):
    """dO, and the row statistics and delta of rows ``rows`` of head ``h``: past Lq or without keys, p = 0."""
    in_m = rows < Lq
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=in_m[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    m_row = tl.load(Stats + (pid_bh * Lq + rows) * 2, mask=in_m, other=float("inf"))
    ll_row = tl.load(Stats + (pid_bh * Lq + rows) * 2 + 1, mask=in_m, other=0.0)
    dead = m_row == float("-inf")
    m_row = tl.where(dead, float("inf"), m_row)
    ll_row = tl.where(dead, 0.0, ll_row)
    delta = tl.load(Delta + pid_bh * Lq + rows, mask=in_m, other=0.0)
    return do, m_row, ll_row, delta


@triton.jit
def _dkdv_range(dk, dv, lo, hi, kt, vt, QA, QB, DO, Stats, Delta, M, b, h, pid_bh, cols, offs_d, offs_dv,
                sqa_b, sqa_l, sqa_h, sqa_r, sqb_b, sqb_h, sqb_l, sqb_r, sqb_d,
                stride_dob, stride_doh, stride_dom, stride_dod, stride_mb, stride_mn,
                Lq, Lk, win_left, win_right, q_scale, qk_scale, cap_scale, softcap2, fill2,
                HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                RQ: tl.constexpr, Q_FACT: tl.constexpr, MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                WINDOW: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK/dV of one key tile over the query rows [lo, hi) of head ``h``."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = side_tile(QA, QB, b, h, rows, offs_d, Lq, sqa_b, sqa_l, sqa_h, sqa_r, sqb_b, sqb_h, sqb_l, sqb_r, sqb_d,
                      q_scale, DIM=HEAD_DIM, BLOCK=BLOCK_M, BLOCK_D=BLOCK_D, R=RQ, FACT=Q_FACT, TRANS=False, CHECK=True)
        do, m_row, ll_row, delta = _rows(DO, Stats, Delta, b, h, pid_bh, rows, offs_dv, stride_dob, stride_doh,
                                         stride_dom, stride_dod, Lq, HEAD_DIM_V=HEAD_DIM_V)
        pd, _, dqk = bwd_tile_grads(q, do, kt, vt, m_row, ll_row, delta, rows, rows * 0 + h, pid_bh, cols, b, M, 0,
                                    stride_mb, 0, 0, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, 0.0,
                                    win_left, win_right, 0.0, 1.0, MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP,
                                    HAS_ALIBI=False, HAS_DROPOUT=False, CAUSAL=False, WINDOW=WINDOW, CHECK_M=CHECK_M,
                                    CHECK_N=CHECK_N, PRECISION=PRECISION)
        dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(dqk.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def dkdv_kernel(
    QA, QB, KA, KB, VA, VB, M, DO, Stats, Delta, DK, DV,
    sqa_b, sqa_l, sqa_h, sqa_r, sqb_b, sqb_h, sqb_l, sqb_r, sqb_d,
    ska_b, ska_l, ska_h, ska_r, skb_b, skb_h, skb_l, skb_r, skb_d,
    sva_b, sva_l, sva_h, sva_r, svb_b, svb_h, svb_l, svb_r, svb_d,
    stride_mb, stride_mn, stride_dob, stride_doh, stride_dom, stride_dod,
    H, Lq, Lk, win_left, win_right, q_scale, k_scale, v_scale, sm_scale, qk_scale, cap_scale, softcap2, fill2,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RQ: tl.constexpr, RK: tl.constexpr,
    RV: tl.constexpr, Q_FACT: tl.constexpr, K_FACT: tl.constexpr, V_FACT: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV (fp32, contiguous (B, H / GROUPS, Lk, D)) of one key tile of one K/V head: the query tiles the band
    reaches, of every query head of the group (masked edges around an unmasked middle, as flash's window path)."""
    q_scale, k_scale, v_scale, sm_scale = f32(q_scale), f32(k_scale), f32(v_scale), f32(sm_scale)
    qk_scale, cap_scale, softcap2, fill2 = f32(qk_scale), f32(cap_scale), f32(softcap2), f32(fill2)
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    hkv = pid_bkv % (H // GROUPS)
    b = pid_bkv // (H // GROUPS)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kt = side_tile(KA, KB, b, hkv, cols, offs_d, Lk, ska_b, ska_l, ska_h, ska_r, skb_b, skb_h, skb_l, skb_r, skb_d,
                   k_scale, DIM=HEAD_DIM, BLOCK=BLOCK_N, BLOCK_D=BLOCK_D, R=RK, FACT=K_FACT, TRANS=True, CHECK=True)
    vt = side_tile(VA, VB, b, hkv, cols, offs_dv, Lk, sva_b, sva_l, sva_h, sva_r, svb_b, svb_h, svb_l, svb_r, svb_d,
                   v_scale, DIM=HEAD_DIM_V, BLOCK=BLOCK_N, BLOCK_D=BLOCK_DV, R=RV, FACT=V_FACT, TRANS=True, CHECK=True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo, whole_lo, whole_hi, hi = band_rows(pid_n * BLOCK_N, Lq, Lk, win_left, win_right, GROUPS=1, BLOCK_M=BLOCK_M,
                                           BLOCK_N=BLOCK_N)
    for g in range(GROUPS):
        h = hkv * GROUPS + g
        pid_bh = b * H + h
        dk, dv = _dkdv_range(dk, dv, lo, whole_lo, kt, vt, QA, QB, DO, Stats, Delta, M, b, h, pid_bh, cols, offs_d,
                             offs_dv, sqa_b, sqa_l, sqa_h, sqa_r, sqb_b, sqb_h, sqb_l, sqb_r, sqb_d, stride_dob,
                             stride_doh, stride_dom, stride_dod, stride_mb, stride_mn, Lq, Lk, win_left, win_right,
                             q_scale, qk_scale, cap_scale, softcap2, fill2, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
                             BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, RQ=RQ, Q_FACT=Q_FACT, MASK_KIND=MASK_KIND,
                             HAS_SOFTCAP=HAS_SOFTCAP, WINDOW=True, CHECK_M=not EVEN_M, CHECK_N=not EVEN_N,
                             PRECISION=PRECISION)
        dk, dv = _dkdv_range(dk, dv, whole_lo, whole_hi, kt, vt, QA, QB, DO, Stats, Delta, M, b, h, pid_bh, cols,
                             offs_d, offs_dv, sqa_b, sqa_l, sqa_h, sqa_r, sqb_b, sqb_h, sqb_l, sqb_r, sqb_d, stride_dob,
                             stride_doh, stride_dom, stride_dod, stride_mb, stride_mn, Lq, Lk, win_left, win_right,
                             q_scale, qk_scale, cap_scale, softcap2, fill2, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
                             BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, RQ=RQ, Q_FACT=Q_FACT, MASK_KIND=MASK_KIND,
                             HAS_SOFTCAP=HAS_SOFTCAP, WINDOW=False, CHECK_M=not EVEN_M, CHECK_N=not EVEN_N,
                             PRECISION=PRECISION)
        dk, dv = _dkdv_range(dk, dv, whole_hi, hi, kt, vt, QA, QB, DO, Stats, Delta, M, b, h, pid_bh, cols, offs_d,
                             offs_dv, sqa_b, sqa_l, sqa_h, sqa_r, sqb_b, sqb_h, sqb_l, sqb_r, sqb_d, stride_dob,
                             stride_doh, stride_dom, stride_dod, stride_mb, stride_mn, Lq, Lk, win_left, win_right,
                             q_scale, qk_scale, cap_scale, softcap2, fill2, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
                             BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, RQ=RQ, Q_FACT=Q_FACT, MASK_KIND=MASK_KIND,
                             HAS_SOFTCAP=HAS_SOFTCAP, WINDOW=True, CHECK_M=not EVEN_M, CHECK_N=not EVEN_N,
                             PRECISION=PRECISION)
    dk *= sm_scale
    base = (pid_bkv * Lk + cols[:, None])
    tl.store(DK + base * HEAD_DIM + offs_d[None, :], dk, mask=(cols[:, None] < Lk) & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + base * HEAD_DIM_V + offs_dv[None, :], dv,
             mask=(cols[:, None] < Lk) & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _dq_range(dq, lo, hi, q, do, m_row, ll_row, delta, KA, KB, VA, VB, M, b, hkv, rows, heads, pid_bh, offs_d,
              offs_dv, ska_b, ska_l, ska_h, ska_r, skb_b, skb_h, skb_l, skb_r, skb_d,
              sva_b, sva_l, sva_h, sva_r, svb_b, svb_h, svb_l, svb_r, svb_d, stride_mb, stride_mn,
              Lq, Lk, win_left, win_right, k_scale, v_scale, qk_scale, cap_scale, softcap2, fill2,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_N: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr, K_FACT: tl.constexpr, V_FACT: tl.constexpr,
              MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, CHECK_M: tl.constexpr,
              CHECK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dQ of one query tile over the key tiles [lo, hi), each formed from its factors."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kt = side_tile(KA, KB, b, hkv, cols, offs_d, Lk, ska_b, ska_l, ska_h, ska_r, skb_b, skb_h, skb_l, skb_r,
                       skb_d, k_scale, DIM=HEAD_DIM, BLOCK=BLOCK_N, BLOCK_D=BLOCK_D, R=RK, FACT=K_FACT, TRANS=True,
                       CHECK=True)
        vt = side_tile(VA, VB, b, hkv, cols, offs_dv, Lk, sva_b, sva_l, sva_h, sva_r, svb_b, svb_h, svb_l, svb_r,
                       svb_d, v_scale, DIM=HEAD_DIM_V, BLOCK=BLOCK_N, BLOCK_D=BLOCK_DV, R=RV, FACT=V_FACT, TRANS=True,
                       CHECK=True)
        _, _, dqk = bwd_tile_grads(q, do, kt, vt, m_row, ll_row, delta, rows, heads, pid_bh, cols, b, M, 0, stride_mb,
                                   0, 0, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, 0.0, win_left,
                                   win_right, 0.0, 1.0, MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=False,
                                   HAS_DROPOUT=False, CAUSAL=False, WINDOW=WINDOW, CHECK_M=CHECK_M, CHECK_N=CHECK_N,
                                   PRECISION=PRECISION)
        dq += tl.dot(dqk.to(q.dtype), tl.trans(kt), input_precision=PRECISION)
    return dq


@triton.jit
def dq_kernel(
    QA, QB, KA, KB, VA, VB, M, DO, Stats, Delta, DQ,
    sqa_b, sqa_l, sqa_h, sqa_r, sqb_b, sqb_h, sqb_l, sqb_r, sqb_d,
    ska_b, ska_l, ska_h, ska_r, skb_b, skb_h, skb_l, skb_r, skb_d,
    sva_b, sva_l, sva_h, sva_r, svb_b, svb_h, svb_l, svb_r, svb_d,
    stride_mb, stride_mn, stride_dob, stride_doh, stride_dom, stride_dod,
    H, Lq, Lk, win_left, win_right, split_len, q_scale, k_scale, v_scale, sm_scale, qk_scale, cap_scale, softcap2,
    fill2,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RQ: tl.constexpr, RK: tl.constexpr,
    RV: tl.constexpr, Q_FACT: tl.constexpr, K_FACT: tl.constexpr, V_FACT: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ (fp32, contiguous (B, H, Lq, D)) of one query tile of one head: the key tiles the forward visited."""
    q_scale, k_scale, v_scale, sm_scale = f32(q_scale), f32(k_scale), f32(v_scale), f32(sm_scale)
    qk_scale, cap_scale, softcap2, fill2 = f32(qk_scale), f32(cap_scale), f32(softcap2), f32(fill2)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    h = pid_bh % H
    b = pid_bh // H
    hkv = h // GROUPS
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    heads = rows * 0 + h
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = side_tile(QA, QB, b, h, rows, offs_d, Lq, sqa_b, sqa_l, sqa_h, sqa_r, sqb_b, sqb_h, sqb_l, sqb_r, sqb_d,
                  q_scale, DIM=HEAD_DIM, BLOCK=BLOCK_M, BLOCK_D=BLOCK_D, R=RQ, FACT=Q_FACT, TRANS=False, CHECK=True)
    do, m_row, ll_row, delta = _rows(DO, Stats, Delta, b, h, pid_bh, rows, offs_dv, stride_dob, stride_doh,
                                     stride_dom, stride_dod, Lq, HEAD_DIM_V=HEAD_DIM_V)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, whole_lo, whole_hi, hi = band_keys(start_m, Lq, Lk, win_left, win_right, 0, split_len, GROUPS=1,
                                           BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    dq = _dq_range(dq, lo, whole_lo, q, do, m_row, ll_row, delta, KA, KB, VA, VB, M, b, hkv, rows, heads, pid_bh,
                   offs_d, offs_dv, ska_b, ska_l, ska_h, ska_r, skb_b, skb_h, skb_l, skb_r, skb_d, sva_b, sva_l, sva_h,
                   sva_r, svb_b, svb_h, svb_l, svb_r, svb_d, stride_mb, stride_mn, Lq, Lk, win_left, win_right,
                   k_scale, v_scale, qk_scale, cap_scale, softcap2, fill2, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
                   BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, BLOCK_N=BLOCK_N, RK=RK, RV=RV, K_FACT=K_FACT, V_FACT=V_FACT,
                   MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP, WINDOW=True, CHECK_M=not EVEN_M, CHECK_N=True,
                   PRECISION=PRECISION)
    dq = _dq_range(dq, whole_lo, whole_hi, q, do, m_row, ll_row, delta, KA, KB, VA, VB, M, b, hkv, rows, heads, pid_bh,
                   offs_d, offs_dv, ska_b, ska_l, ska_h, ska_r, skb_b, skb_h, skb_l, skb_r, skb_d, sva_b, sva_l, sva_h,
                   sva_r, svb_b, svb_h, svb_l, svb_r, svb_d, stride_mb, stride_mn, Lq, Lk, win_left, win_right,
                   k_scale, v_scale, qk_scale, cap_scale, softcap2, fill2, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
                   BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, BLOCK_N=BLOCK_N, RK=RK, RV=RV, K_FACT=K_FACT, V_FACT=V_FACT,
                   MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP, WINDOW=False, CHECK_M=not EVEN_M, CHECK_N=False,
                   PRECISION=PRECISION)
    dq = _dq_range(dq, whole_hi, hi, q, do, m_row, ll_row, delta, KA, KB, VA, VB, M, b, hkv, rows, heads, pid_bh,
                   offs_d, offs_dv, ska_b, ska_l, ska_h, ska_r, skb_b, skb_h, skb_l, skb_r, skb_d, sva_b, sva_l, sva_h,
                   sva_r, svb_b, svb_h, svb_l, svb_r, svb_d, stride_mb, stride_mn, Lq, Lk, win_left, win_right,
                   k_scale, v_scale, qk_scale, cap_scale, softcap2, fill2, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
                   BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, BLOCK_N=BLOCK_N, RK=RK, RV=RV, K_FACT=K_FACT, V_FACT=V_FACT,
                   MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP, WINDOW=True, CHECK_M=not EVEN_M, CHECK_N=True,
                   PRECISION=PRECISION)
    dq *= sm_scale
    tl.store(DQ + (pid_bh * Lq + rows[:, None]) * HEAD_DIM + offs_d[None, :], dq,
             mask=(rows[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM))
