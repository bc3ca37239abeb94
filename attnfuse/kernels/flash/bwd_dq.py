"""The flash backward kernels, part two: `bwd_dq_kernel`, dQ of a block of packed query rows in its own pass
(no atomics: bitwise reproducible), visiting the forward's key tiles; optionally the mask's gradient dS.
Launched by `attnfuse.kernels.flash.launcher.backward`."""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit import band_keys, diagonal, f32, packed, slopes
from .bwd import bwd_rows, bwd_tile_grads

__all__ = ["bwd_dq_kernel"]


@triton.jit
def _dq_step(dq, q, do, m_row, ll_row, delta, K, V, M, DM, seed, b, rows, heads, bh, offs_d, offs_dv, slope2, start_n,
             stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh, stride_mm, stride_mn,
             Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left, win_right, dropout_p, inv_keep,
             HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
             HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, CAUSAL: tl.constexpr,
             WINDOW: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, MASK_GRAD: tl.constexpr,
             PRECISION: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    kt = tl.load(K + offs_d[:, None] * stride_kd + cols[None, :] * stride_kn,
                 mask=(offs_d[:, None] < HEAD_DIM) & (cols[None, :] < Lk), other=0.0)
    vt = tl.load(V + offs_dv[:, None] * stride_vd + cols[None, :] * stride_vn,
                 mask=(offs_dv[:, None] < HEAD_DIM_V) & (cols[None, :] < Lk), other=0.0)
    _, ds, dqk = bwd_tile_grads(q, do, kt, vt, m_row, ll_row, delta, rows, heads, bh, cols, b, M, seed, stride_mb,
                                stride_mh, stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, slope2,
                                win_left, win_right, dropout_p, inv_keep, MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP,
                                HAS_ALIBI=HAS_ALIBI, HAS_DROPOUT=HAS_DROPOUT, CAUSAL=CAUSAL, WINDOW=WINDOW,
                                CHECK_M=CHECK_M, CHECK_N=CHECK_N, PRECISION=PRECISION)
    if MASK_GRAD:
        tl.store(DM + (bh[:, None] * Lq + rows[:, None]) * Lk + cols[None, :], ds,
                 mask=(rows[:, None] < Lq) & (cols[None, :] < Lk))
    return dq + tl.dot(dqk.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)


@triton.jit
def _dq_range(dq, lo, hi, Tiles, q, do, m_row, ll_row, delta, K, V, M, DM, seed, b, rows, heads, bh, offs_d, offs_dv,
              slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh, stride_mm, stride_mn,
              Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left, win_right, dropout_p, inv_keep,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, CAUSAL: tl.constexpr,
              WINDOW: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, MASK_GRAD: tl.constexpr,
              LISTED: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dQ over the keys [lo, hi), or (``LISTED``) the key tiles at entries [lo, hi) of ``Tiles``."""
    for i in range(lo, hi, 1 if LISTED else BLOCK_N):
        start_n = tl.load(Tiles + i) * BLOCK_N if LISTED else i
        dq = _dq_step(dq, q, do, m_row, ll_row, delta, K, V, M, DM, seed, b, rows, heads, bh, offs_d, offs_dv, slope2,
                      start_n, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh, stride_mm, stride_mn,
                      Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left, win_right, dropout_p, inv_keep,
                      HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_N=BLOCK_N, MASK_KIND=MASK_KIND,
                      HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_DROPOUT=HAS_DROPOUT, CAUSAL=CAUSAL,
                      WINDOW=WINDOW, CHECK_M=CHECK_M, CHECK_N=CHECK_N, MASK_GRAD=MASK_GRAD, PRECISION=PRECISION)
    return dq


@triton.jit
def bwd_dq_kernel(
    # pointers
    Q, K, V, M, Seed, Alibi, TileMap, DO, Stats, Delta, DQ, DM,
    # strides
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_tb, stride_th, stride_tm,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    # sizes and scalars
    H, Lq, Lk, win_left, win_right, sm_scale, qk_scale, cap_scale, softcap2, fill2, dropout_p,
    # meta
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, BLOCK_SPARSE: tl.constexpr, MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    MASK_GRAD: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ of BLOCK_M packed query rows (no atomics), visiting the forward's key tiles; with ``MASK_GRAD`` also dS
    into DM (B, H, Lq, Lk) fp32, which the launcher zero-fills (the tiles a program skips keep their zeros)."""
    # float scalars may arrive as fp64 (Inductor's launches of user kernels): the math stays fp32
    sm_scale, qk_scale, cap_scale = f32(sm_scale), f32(qk_scale), f32(cap_scale)
    softcap2, fill2, dropout_p = f32(softcap2), f32(fill2), f32(dropout_p)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    hkv = pid_bh % (H // GROUPS)
    b = pid_bh // (H // GROUPS)
    rows, heads, bh = packed(pid_m * BLOCK_M, b, hkv, H, GROUPS=GROUPS, BLOCK_M=BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q, do, m_row, ll_row, delta = bwd_rows(Q, DO, Stats, Delta, b, rows, heads, bh, offs_d, offs_dv, stride_qb,
                                           stride_qh, stride_qm, stride_qd, stride_dob, stride_doh, stride_dom,
                                           stride_dod, Lq, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V)
    K += b * stride_kb + hkv * stride_kh
    V += b * stride_vb + hkv * stride_vh
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    inv_keep = 1.0 / (1.0 - dropout_p)
    slope2 = slopes(Alibi, heads, HAS_ALIBI=HAS_ALIBI)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if BLOCK_SPARSE:
        tiles = TileMap + b * stride_tb + hkv * stride_th + pid_m * stride_tm
        n_full = tl.load(tiles)
        n_listed = n_full + tl.load(tiles + 1)
        dq = _dq_range(dq, 0, n_full, tiles + 2, q, do, m_row, ll_row, delta, K, V, M, DM, seed, b, rows, heads, bh,
                       offs_d, offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh,
                       stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left, win_right,
                       dropout_p, inv_keep, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_N=BLOCK_N, MASK_KIND=0,
                       HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_DROPOUT=HAS_DROPOUT, CAUSAL=False,
                       WINDOW=False, CHECK_M=not EVEN_M, CHECK_N=False, MASK_GRAD=MASK_GRAD, LISTED=True,
                       PRECISION=PRECISION)
        dq = _dq_range(dq, n_full, n_listed, tiles + 2, q, do, m_row, ll_row, delta, K, V, M, DM, seed, b, rows, heads,
                       bh, offs_d, offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh,
                       stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left, win_right,
                       dropout_p, inv_keep, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_N=BLOCK_N,
                       MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_DROPOUT=HAS_DROPOUT,
                       CAUSAL=False, WINDOW=HAS_WINDOW, CHECK_M=not EVEN_M, CHECK_N=not EVEN_N, MASK_GRAD=MASK_GRAD,
                       LISTED=True, PRECISION=PRECISION)
    elif HAS_WINDOW:
        lo, whole_lo, whole_hi, hi = band_keys(pid_m * BLOCK_M, Lq, Lk, win_left, win_right, 0, Lk, GROUPS=GROUPS,
                                               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
        dq = _dq_range(dq, lo, whole_lo, TileMap, q, do, m_row, ll_row, delta, K, V, M, DM, seed, b, rows, heads, bh,
                       offs_d, offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh,
                       stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left, win_right,
                       dropout_p, inv_keep, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_N=BLOCK_N,
                       MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_DROPOUT=HAS_DROPOUT,
                       CAUSAL=False, WINDOW=True, CHECK_M=not EVEN_M, CHECK_N=not EVEN_N, MASK_GRAD=MASK_GRAD,
                       LISTED=False, PRECISION=PRECISION)
        dq = _dq_range(dq, whole_lo, whole_hi, TileMap, q, do, m_row, ll_row, delta, K, V, M, DM, seed, b, rows, heads,
                       bh, offs_d, offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh,
                       stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left, win_right,
                       dropout_p, inv_keep, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_N=BLOCK_N,
                       MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_DROPOUT=HAS_DROPOUT,
                       CAUSAL=False, WINDOW=False, CHECK_M=not EVEN_M, CHECK_N=False, MASK_GRAD=MASK_GRAD, LISTED=False,
                       PRECISION=PRECISION)
        dq = _dq_range(dq, whole_hi, hi, TileMap, q, do, m_row, ll_row, delta, K, V, M, DM, seed, b, rows, heads, bh,
                       offs_d, offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh,
                       stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left, win_right,
                       dropout_p, inv_keep, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_N=BLOCK_N,
                       MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_DROPOUT=HAS_DROPOUT,
                       CAUSAL=False, WINDOW=True, CHECK_M=not EVEN_M, CHECK_N=not EVEN_N, MASK_GRAD=MASK_GRAD,
                       LISTED=False, PRECISION=PRECISION)
    else:
        hi = Lk
        mid = Lk // BLOCK_N * BLOCK_N
        if IS_CAUSAL:
            seen_by_all, seen_by_none = diagonal(pid_m * BLOCK_M, Lq, GROUPS=GROUPS, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
            hi = tl.minimum(hi, seen_by_none)
            mid = tl.minimum(mid, seen_by_all)
        mid = tl.minimum(mid, hi)
        dq = _dq_range(dq, 0, mid, TileMap, q, do, m_row, ll_row, delta, K, V, M, DM, seed, b, rows, heads, bh, offs_d,
                       offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh, stride_mm,
                       stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left, win_right, dropout_p,
                       inv_keep, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_N=BLOCK_N, MASK_KIND=MASK_KIND,
                       HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_DROPOUT=HAS_DROPOUT, CAUSAL=False,
                       WINDOW=False, CHECK_M=not EVEN_M, CHECK_N=False, MASK_GRAD=MASK_GRAD, LISTED=False,
                       PRECISION=PRECISION)
        dq = _dq_range(dq, mid, hi, TileMap, q, do, m_row, ll_row, delta, K, V, M, DM, seed, b, rows, heads, bh, offs_d,
                       offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh, stride_mm,
                       stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left, win_right, dropout_p,
                       inv_keep, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_N=BLOCK_N, MASK_KIND=MASK_KIND,
                       HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_DROPOUT=HAS_DROPOUT, CAUSAL=IS_CAUSAL,
                       WINDOW=False, CHECK_M=not EVEN_M, CHECK_N=not EVEN_N, MASK_GRAD=MASK_GRAD, LISTED=False,
                       PRECISION=PRECISION)
    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + heads[:, None] * stride_dqh + rows[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),
             mask=(rows[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM))
