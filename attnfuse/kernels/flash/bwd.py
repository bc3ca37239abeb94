"""The flash backward kernels, part one: `bwd_preprocess` (``delta = rowsum(O * dO)``), the per-tile gradient
math both backward kernels share (`bwd_rows`, `bwd_tile_grads`) and `bwd_dkdv_kernel` (dK/dV of one key tile,
optionally adding dQ with atomics).  dQ in its own pass: `attnfuse.kernels.flash.bwd_dq`.  Launched by
`attnfuse.kernels.flash.launcher.backward`."""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit import band_rows, dropout_keep, f32, packed, scores, slopes

__all__ = ["bwd_dkdv_kernel", "bwd_preprocess", "bwd_rows", "bwd_tile_grads"]


@triton.jit
def bwd_preprocess(
    Out, DO, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_db, stride_dh, stride_dm, stride_dd,
    H, Lq,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(O * dO) in fp32, one (BLOCK_M rows, head) tile per program."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    d = tl.arange(0, BLOCK_DV)
    inb = (rows[:, None] < Lq) & (d[None, :] < HEAD_DIM_V)
    o = tl.load(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + d[None, :] * stride_od,
                mask=inb, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + rows[:, None] * stride_dm + d[None, :] * stride_dd,
                 mask=inb, other=0.0).to(tl.float32)
    tl.store(Delta + bh * Lq + rows, tl.sum(o * do, 1), mask=rows < Lq)


@triton.jit
def bwd_rows(Q, DO, Stats, Delta, b, rows, heads, bh, offs_d, offs_dv,
             stride_qb, stride_qh, stride_qm, stride_qd, stride_dob, stride_doh, stride_dom, stride_dod,
             Lq, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr):
    """What the backward needs of a block of query rows: q, dO, the row statistics and delta."""
    in_m = rows < Lq
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + rows[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=in_m[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(DO + b * stride_dob + heads[:, None] * stride_doh + rows[:, None] * stride_dom
                 + offs_dv[None, :] * stride_dod, mask=in_m[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    # rows past the end get m = +inf, so p = 0 there
    m_row = tl.load(Stats + (bh * Lq + rows) * 2, mask=in_m, other=float("inf"))
    ll_row = tl.load(Stats + (bh * Lq + rows) * 2 + 1, mask=in_m, other=0.0)
    delta = tl.load(Delta + bh * Lq + rows, mask=in_m, other=0.0)
    return q, do, m_row, ll_row, delta


@triton.jit
def bwd_tile_grads(q, do, kt, vt, m_row, ll_row, delta, rows, heads, bh, cols, b, M, seed,
                   stride_mb, stride_mh, stride_mm, stride_mn, Lq, Lk,
                   qk_scale, cap_scale, softcap2, fill2, slope2, win_left, win_right, dropout_p, inv_keep,
                   MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   HAS_DROPOUT: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, CHECK_M: tl.constexpr,
                   CHECK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Recompute one tile: (p after dropout, dS w.r.t. the final scores, dS w.r.t. q·k) in fp32."""
    s, t = scores(q, kt, rows, heads, cols, b, M, stride_mb, stride_mh, stride_mm, stride_mn, Lq, Lk, qk_scale,
                  cap_scale, softcap2, fill2, slope2, win_left, win_right, MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP,
                  HAS_ALIBI=HAS_ALIBI, CAUSAL=CAUSAL, WINDOW=WINDOW, CHECK_M=CHECK_M, CHECK_N=CHECK_N,
                  PRECISION=PRECISION)
    p = tl.exp2((s - m_row[:, None]) - ll_row[:, None])
    dp = tl.dot(do, vt, input_precision=PRECISION)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, bh, rows, cols, Lk, dropout_p)
        pd = tl.where(keep, p * inv_keep, 0.0)
        dp = tl.where(keep, dp * inv_keep, 0.0)
    else:
        pd = p
    ds = p * (dp - delta[:, None])
    # masked scores are the constant fill: no gradient (p is not 0 there for a finite fill, and it is NaN in a
    # row with no visible key, where eager's masked_fill stops the NaN too)
    if MASK_KIND >= 2:
        m_ptrs = M + b * stride_mb + heads[:, None] * stride_mh + rows[:, None] * stride_mm + cols[None, :] * stride_mn
        mv = tl.load(m_ptrs, mask=(rows[:, None] < Lq) & (cols[None, :] < Lk), other=0)
        if MASK_KIND == 4:
            ds = tl.where(mv.to(tl.float32) > fill2, ds, 0.0)
        else:
            ds = tl.where(mv != 0, ds, 0.0)
    if WINDOW:
        dist = cols[None, :] - rows[:, None]
        ds = tl.where((dist >= -win_left) & (dist <= win_right), ds, 0.0)
    dqk = ds
    if HAS_SOFTCAP:
        dqk = ds * (1.0 - t * t)
    return pd, ds, dqk


@triton.jit
def _dkdv_step(dk, dv, kt, vt, Q, DO, Stats, Delta, DQ, M, Alibi, seed, b, hkv, cols, offs_d, offs_dv, start_m,
               stride_qb, stride_qh, stride_qm, stride_qd, stride_mb, stride_mh, stride_mm, stride_mn,
               stride_dob, stride_doh, stride_dom, stride_dod, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
               H, Lq, Lk, sm_scale, qk_scale, cap_scale, softcap2, fill2, win_left, win_right, dropout_p, inv_keep,
               GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
               MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, CHECK_M: tl.constexpr,
               CHECK_N: tl.constexpr, ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr):
    rows, heads, bh = packed(start_m, b, hkv, H, GROUPS=GROUPS, BLOCK_M=BLOCK_M)
    q, do, m_row, ll_row, delta = bwd_rows(Q, DO, Stats, Delta, b, rows, heads, bh, offs_d, offs_dv, stride_qb,
                                           stride_qh, stride_qm, stride_qd, stride_dob, stride_doh, stride_dom,
                                           stride_dod, Lq, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V)
    slope2 = slopes(Alibi, heads, HAS_ALIBI=HAS_ALIBI)
    pd, ds, dqk = bwd_tile_grads(q, do, kt, vt, m_row, ll_row, delta, rows, heads, bh, cols, b, M, seed, stride_mb,
                                 stride_mh, stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, slope2,
                                 win_left, win_right, dropout_p, inv_keep, MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP,
                                 HAS_ALIBI=HAS_ALIBI, HAS_DROPOUT=HAS_DROPOUT, CAUSAL=CAUSAL, WINDOW=WINDOW,
                                 CHECK_M=CHECK_M, CHECK_N=CHECK_N, PRECISION=PRECISION)
    dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=PRECISION)
    dk += tl.dot(tl.trans(dqk.to(q.dtype)), q, input_precision=PRECISION)
    if ATOMIC_DQ:
        dq = tl.dot(dqk.to(q.dtype), tl.trans(kt), input_precision=PRECISION) * sm_scale
        tl.atomic_add(DQ + b * stride_dqb + heads[:, None] * stride_dqh + rows[:, None] * stride_dqm
                      + offs_d[None, :] * stride_dqd, dq, mask=(rows[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM))
    return dk, dv


@triton.jit
def _dkdv_range(dk, dv, lo, hi, Tiles, kt, vt, Q, DO, Stats, Delta, DQ, M, Alibi, seed, b, hkv, cols, offs_d,
                offs_dv, stride_qb, stride_qh, stride_qm, stride_qd, stride_mb, stride_mh, stride_mm, stride_mn,
                stride_dob, stride_doh, stride_dom, stride_dod, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                H, Lq, Lk, sm_scale, qk_scale, cap_scale, softcap2, fill2, win_left, win_right, dropout_p, inv_keep,
                GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
                MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, CHECK_M: tl.constexpr,
                CHECK_N: tl.constexpr, ATOMIC_DQ: tl.constexpr, LISTED: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK/dV over packed query rows: the rows [lo, hi), or (``LISTED``) the row tiles whose indices
    a transposed block-sparse map holds at entries [lo, hi) of ``Tiles``."""
    for i in range(lo, hi, 1 if LISTED else BLOCK_M):
        start_m = tl.load(Tiles + i) * BLOCK_M if LISTED else i
        dk, dv = _dkdv_step(dk, dv, kt, vt, Q, DO, Stats, Delta, DQ, M, Alibi, seed, b, hkv, cols, offs_d, offs_dv,
                            start_m, stride_qb, stride_qh, stride_qm, stride_qd, stride_mb, stride_mh, stride_mm,
                            stride_mn, stride_dob, stride_doh, stride_dom, stride_dod, stride_dqb, stride_dqh,
                            stride_dqm, stride_dqd, H, Lq, Lk, sm_scale, qk_scale, cap_scale, softcap2, fill2, win_left,
                            win_right, dropout_p, inv_keep, GROUPS=GROUPS, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
                            BLOCK_M=BLOCK_M, MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI,
                            HAS_DROPOUT=HAS_DROPOUT, CAUSAL=CAUSAL, WINDOW=WINDOW, CHECK_M=CHECK_M, CHECK_N=CHECK_N,
                            ATOMIC_DQ=ATOMIC_DQ, PRECISION=PRECISION)
    return dk, dv


@triton.jit
def bwd_dkdv_kernel(
    # pointers
    Q, K, V, M, Seed, Alibi, TileMap, DO, Stats, Delta, DQ, DK, DV,
    # strides
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_tb, stride_th, stride_tm,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    # sizes and scalars
    H, Lq, Lk, win_left, win_right, sm_scale, qk_scale, cap_scale, softcap2, fill2, dropout_p,
    # meta
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, BLOCK_SPARSE: tl.constexpr, MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV of one key tile of one K/V head, summed over every query head of its group.

    The query tiles it visits mirror the forward's key tiles: causal, the diagonal's (masked) and those below
    (unmasked); with a window, the band's (masked edges around an unmasked middle); block-sparse, those the
    transposed map ``TileMap`` lists for the key tile (full ones unmasked, then partial ones masked).
    With ``ATOMIC_DQ`` it also adds this tile's dQ share into the fp32 buffer ``DQ`` with atomics
    (fast, not bitwise reproducible); otherwise `bwd_dq_kernel` computes dQ.
    """
    # float scalars may arrive as fp64 (Inductor's launches of user kernels): the math stays fp32
    sm_scale, qk_scale, cap_scale = f32(sm_scale), f32(qk_scale), f32(cap_scale)
    softcap2, fill2, dropout_p = f32(softcap2), f32(fill2), f32(dropout_p)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    hkv = pid_bh % (H // GROUPS)
    b = pid_bh // (H // GROUPS)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kt_ptrs = K + b * stride_kb + hkv * stride_kh + offs_d[:, None] * stride_kd + cols[None, :] * stride_kn
    vt_ptrs = V + b * stride_vb + hkv * stride_vh + offs_dv[:, None] * stride_vd + cols[None, :] * stride_vn
    kt = tl.load(kt_ptrs, mask=(offs_d[:, None] < HEAD_DIM) & (cols[None, :] < Lk), other=0.0)
    vt = tl.load(vt_ptrs, mask=(offs_dv[:, None] < HEAD_DIM_V) & (cols[None, :] < Lk), other=0.0)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    inv_keep = 1.0 / (1.0 - dropout_p)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    if BLOCK_SPARSE:
        tiles = TileMap + b * stride_tb + hkv * stride_th + pid_n * stride_tm
        n_full = tl.load(tiles)
        n_listed = n_full + tl.load(tiles + 1)
        dk, dv = _dkdv_range(dk, dv, 0, n_full, tiles + 2, kt, vt, Q, DO, Stats, Delta, DQ, M, Alibi, seed, b, hkv,
                             cols, offs_d, offs_dv, stride_qb, stride_qh, stride_qm, stride_qd, stride_mb, stride_mh,
                             stride_mm, stride_mn, stride_dob, stride_doh, stride_dom, stride_dod, stride_dqb,
                             stride_dqh, stride_dqm, stride_dqd, H, Lq, Lk, sm_scale, qk_scale, cap_scale, softcap2,
                             fill2, win_left, win_right, dropout_p, inv_keep, GROUPS=GROUPS, HEAD_DIM=HEAD_DIM,
                             HEAD_DIM_V=HEAD_DIM_V, BLOCK_M=BLOCK_M, MASK_KIND=0, HAS_SOFTCAP=HAS_SOFTCAP,
                             HAS_ALIBI=HAS_ALIBI, HAS_DROPOUT=HAS_DROPOUT, CAUSAL=False, WINDOW=False,
                             CHECK_M=not EVEN_M, CHECK_N=not EVEN_N, ATOMIC_DQ=ATOMIC_DQ, LISTED=True,
                             PRECISION=PRECISION)
        dk, dv = _dkdv_range(dk, dv, n_full, n_listed, tiles + 2, kt, vt, Q, DO, Stats, Delta, DQ, M, Alibi, seed, b,
                             hkv, cols, offs_d, offs_dv, stride_qb, stride_qh, stride_qm, stride_qd, stride_mb,
                             stride_mh, stride_mm, stride_mn, stride_dob, stride_doh, stride_dom, stride_dod,
                             stride_dqb, stride_dqh, stride_dqm, stride_dqd, H, Lq, Lk, sm_scale, qk_scale, cap_scale,
                             softcap2, fill2, win_left, win_right, dropout_p, inv_keep, GROUPS=GROUPS,
                             HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_M=BLOCK_M, MASK_KIND=MASK_KIND,
                             HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_DROPOUT=HAS_DROPOUT, CAUSAL=False,
                             WINDOW=HAS_WINDOW, CHECK_M=not EVEN_M, CHECK_N=not EVEN_N, ATOMIC_DQ=ATOMIC_DQ,
                             LISTED=True, PRECISION=PRECISION)
    elif HAS_WINDOW:
        lo, whole_lo, whole_hi, hi = band_rows(pid_n * BLOCK_N, Lq, Lk, win_left, win_right, GROUPS=GROUPS,
                                               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
        dk, dv = _dkdv_range(dk, dv, lo, whole_lo, TileMap, kt, vt, Q, DO, Stats, Delta, DQ, M, Alibi, seed, b, hkv,
                             cols, offs_d, offs_dv, stride_qb, stride_qh, stride_qm, stride_qd, stride_mb, stride_mh,
                             stride_mm, stride_mn, stride_dob, stride_doh, stride_dom, stride_dod, stride_dqb,
                             stride_dqh, stride_dqm, stride_dqd, H, Lq, Lk, sm_scale, qk_scale, cap_scale, softcap2,
                             fill2, win_left, win_right, dropout_p, inv_keep, GROUPS=GROUPS, HEAD_DIM=HEAD_DIM,
                             HEAD_DIM_V=HEAD_DIM_V, BLOCK_M=BLOCK_M, MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP,
                             HAS_ALIBI=HAS_ALIBI, HAS_DROPOUT=HAS_DROPOUT, CAUSAL=False, WINDOW=True,
                             CHECK_M=not EVEN_M, CHECK_N=not EVEN_N, ATOMIC_DQ=ATOMIC_DQ, LISTED=False,
                             PRECISION=PRECISION)
        dk, dv = _dkdv_range(dk, dv, whole_lo, whole_hi, TileMap, kt, vt, Q, DO, Stats, Delta, DQ, M, Alibi, seed, b,
                             hkv, cols, offs_d, offs_dv, stride_qb, stride_qh, stride_qm, stride_qd, stride_mb,
                             stride_mh, stride_mm, stride_mn, stride_dob, stride_doh, stride_dom, stride_dod,
                             stride_dqb, stride_dqh, stride_dqm, stride_dqd, H, Lq, Lk, sm_scale, qk_scale, cap_scale,
                             softcap2, fill2, win_left, win_right, dropout_p, inv_keep, GROUPS=GROUPS,
                             HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_M=BLOCK_M, MASK_KIND=MASK_KIND,
                             HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_DROPOUT=HAS_DROPOUT, CAUSAL=False,
                             WINDOW=False, CHECK_M=not EVEN_M, CHECK_N=not EVEN_N, ATOMIC_DQ=ATOMIC_DQ, LISTED=False,
                             PRECISION=PRECISION)
        dk, dv = _dkdv_range(dk, dv, whole_hi, hi, TileMap, kt, vt, Q, DO, Stats, Delta, DQ, M, Alibi, seed, b, hkv,
                             cols, offs_d, offs_dv, stride_qb, stride_qh, stride_qm, stride_qd, stride_mb, stride_mh,
                             stride_mm, stride_mn, stride_dob, stride_doh, stride_dom, stride_dod, stride_dqb,
                             stride_dqh, stride_dqm, stride_dqd, H, Lq, Lk, sm_scale, qk_scale, cap_scale, softcap2,
                             fill2, win_left, win_right, dropout_p, inv_keep, GROUPS=GROUPS, HEAD_DIM=HEAD_DIM,
                             HEAD_DIM_V=HEAD_DIM_V, BLOCK_M=BLOCK_M, MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP,
                             HAS_ALIBI=HAS_ALIBI, HAS_DROPOUT=HAS_DROPOUT, CAUSAL=False, WINDOW=True,
                             CHECK_M=not EVEN_M, CHECK_N=not EVEN_N, ATOMIC_DQ=ATOMIC_DQ, LISTED=False,
                             PRECISION=PRECISION)
    else:
        # packed query rows r = row * GROUPS + g; causal: rows < the tile's first key see none of it
        n_packed = Lq * GROUPS
        lo = 0
        mid = 0
        if IS_CAUSAL:
            lo = (pid_n * BLOCK_N * GROUPS) // BLOCK_M * BLOCK_M
            # from here on, every row sees every key of the tile
            mid = tl.minimum(tl.cdiv((pid_n * BLOCK_N + BLOCK_N - 1) * GROUPS + GROUPS, BLOCK_M) * BLOCK_M, n_packed)
            mid = tl.maximum(mid, lo)
        dk, dv = _dkdv_range(dk, dv, lo, mid, TileMap, kt, vt, Q, DO, Stats, Delta, DQ, M, Alibi, seed, b, hkv, cols,
                             offs_d, offs_dv, stride_qb, stride_qh, stride_qm, stride_qd, stride_mb, stride_mh,
                             stride_mm, stride_mn, stride_dob, stride_doh, stride_dom, stride_dod, stride_dqb,
                             stride_dqh, stride_dqm, stride_dqd, H, Lq, Lk, sm_scale, qk_scale, cap_scale, softcap2,
                             fill2, win_left, win_right, dropout_p, inv_keep, GROUPS=GROUPS, HEAD_DIM=HEAD_DIM,
                             HEAD_DIM_V=HEAD_DIM_V, BLOCK_M=BLOCK_M, MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP,
                             HAS_ALIBI=HAS_ALIBI, HAS_DROPOUT=HAS_DROPOUT, CAUSAL=True, WINDOW=False,
                             CHECK_M=not EVEN_M, CHECK_N=not EVEN_N, ATOMIC_DQ=ATOMIC_DQ, LISTED=False,
                             PRECISION=PRECISION)
        dk, dv = _dkdv_range(dk, dv, mid, n_packed, TileMap, kt, vt, Q, DO, Stats, Delta, DQ, M, Alibi, seed, b, hkv,
                             cols, offs_d, offs_dv, stride_qb, stride_qh, stride_qm, stride_qd, stride_mb, stride_mh,
                             stride_mm, stride_mn, stride_dob, stride_doh, stride_dom, stride_dod, stride_dqb,
                             stride_dqh, stride_dqm, stride_dqd, H, Lq, Lk, sm_scale, qk_scale, cap_scale, softcap2,
                             fill2, win_left, win_right, dropout_p, inv_keep, GROUPS=GROUPS, HEAD_DIM=HEAD_DIM,
                             HEAD_DIM_V=HEAD_DIM_V, BLOCK_M=BLOCK_M, MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP,
                             HAS_ALIBI=HAS_ALIBI, HAS_DROPOUT=HAS_DROPOUT, CAUSAL=False, WINDOW=False,
                             CHECK_M=not EVEN_M, CHECK_N=not EVEN_N, ATOMIC_DQ=ATOMIC_DQ, LISTED=False,
                             PRECISION=PRECISION)
    dk *= sm_scale
    tl.store(DK + b * stride_dkb + hkv * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=(cols[:, None] < Lk) & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + b * stride_dvb + hkv * stride_dvh + cols[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=(cols[:, None] < Lk) & (offs_dv[None, :] < HEAD_DIM_V))
