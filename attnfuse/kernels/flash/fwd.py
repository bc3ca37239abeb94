"""The flash forward kernels: `fwd_kernel` (one program per block of packed query rows of one K/V head and one
key split: the online softmax over the key tiles its mode visits) and `combine_kernel` (merges split-K
partials by their row statistics), with their per-tile and per-range helpers.  Launched by
`attnfuse.kernels.flash.launcher.forward`."""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit import band_keys, diagonal, dropout_keep, f32, packed, scores, slopes

__all__ = ["combine_kernel", "fwd_kernel"]


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, K, V, M, seed, b, rows, heads, bh, offs_d, offs_dv, slope2, start_n,
              stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh, stride_mm, stride_mn,
              Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left, win_right, dropout_p, inv_keep,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, CAUSAL: tl.constexpr,
              WINDOW: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, EVEN_D: tl.constexpr,
              PRECISION: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    kt_ptrs = K + offs_d[:, None] * stride_kd + cols[None, :] * stride_kn
    v_ptrs = V + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    if CHECK_N or not EVEN_D:
        kt = tl.load(kt_ptrs, mask=(offs_d[:, None] < HEAD_DIM) & (cols[None, :] < Lk), other=0.0)
        v = tl.load(v_ptrs, mask=(cols[:, None] < Lk) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    else:
        kt = tl.load(kt_ptrs)
        v = tl.load(v_ptrs)
    s, _ = scores(q, kt, rows, heads, cols, b, M, stride_mb, stride_mh, stride_mm, stride_mn, Lq, Lk, qk_scale,
                  cap_scale, softcap2, fill2, slope2, win_left, win_right, MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP,
                  HAS_ALIBI=HAS_ALIBI, CAUSAL=CAUSAL, WINDOW=WINDOW, CHECK_M=CHECK_M, CHECK_N=CHECK_N,
                  PRECISION=PRECISION)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row with no finite score so far keeps p = 0 instead of exp2(-inf + inf) = NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        p = tl.where(dropout_keep(seed, bh, rows, cols, Lk, dropout_p), p * inv_keep, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_range(acc, l_i, m_i, lo, hi, Tiles, q, K, V, M, seed, b, rows, heads, bh, offs_d, offs_dv, slope2,
               stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh, stride_mm, stride_mn,
               Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left, win_right, dropout_p, inv_keep,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, EVEN_D: tl.constexpr,
               LISTED: tl.constexpr, PRECISION: tl.constexpr):
    """Fold key tiles into the running softmax: the keys [lo, hi), or (``LISTED``) the key tiles whose indices
    a block-sparse map holds at entries [lo, hi) of ``Tiles``."""
    for i in range(lo, hi, 1 if LISTED else BLOCK_N):
        start_n = tl.load(Tiles + i) * BLOCK_N if LISTED else i
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, M, seed, b, rows, heads, bh, offs_d, offs_dv, slope2, start_n,
                                  stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh, stride_mm,
                                  stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left, win_right,
                                  dropout_p, inv_keep, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_N=BLOCK_N,
                                  MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI,
                                  HAS_DROPOUT=HAS_DROPOUT, CAUSAL=CAUSAL, WINDOW=WINDOW, CHECK_M=CHECK_M,
                                  CHECK_N=CHECK_N, EVEN_D=EVEN_D, PRECISION=PRECISION)
    return acc, l_i, m_i


@triton.jit
def fwd_kernel(
    # pointers
    Q, K, V, M, Seed, VBad, Alibi, TileMap, Sinks, Out, Stats,
    # strides
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_tb, stride_th, stride_tm, stride_sb, stride_sh,
    stride_os, stride_ob, stride_oh, stride_om, stride_od, stride_ls,
    # sizes and scalars
    H, Lq, Lk, split_len, win_left, win_right, pad_keys, qk_scale, cap_scale, softcap2, fill2, dropout_p,
    # meta
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, BLOCK_SPARSE: tl.constexpr, MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    EVEN_D: tl.constexpr, PRECISION: tl.constexpr, HAS_SINKS: tl.constexpr = False,
):
    """One program: BLOCK_M packed (row, head-in-group) pairs of one K/V head, keys of one split.

    The key tiles it visits: every one; causal, those left of the diagonal (unmasked) and on it (masked);
    with a window, the band's (masked edges around an unmasked middle); block-sparse, the map's full tiles
    (no mask read, no masking) then its partial ones (masked), at ``TileMap`` row ``(b, hkv, pid_m)``:
    ``[n_full, n_partial, full tile indices..., partial tile indices...]``.
    With a split grid it writes fp32 partial outputs (normalized) and partial row statistics at
    ``split * stride_os`` / ``split * stride_ls``; `combine_kernel` merges them.
    ``pad_keys`` (0 or 1, a padded window): each row also holds the band's n_pad keys outside [0, Lk), of score 0
    and value 0, folded into the softmax state it starts from (split 0 only): m = 0, l = n_pad.
    ``HAS_SINKS``: each row also holds one key of score ``Sinks[b, h]`` (natural units) and value 0, likewise
    (split 0 only): m = sink, l = 1; the saved statistics then include it, and a row with no visible key is 0.
    """
    # float scalars may arrive as fp64 (Inductor's launches of user kernels): the math stays fp32
    qk_scale, cap_scale = f32(qk_scale), f32(cap_scale)
    softcap2, fill2, dropout_p = f32(softcap2), f32(fill2), f32(dropout_p)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heavy causal tiles first
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    hkv = pid_bh % (H // GROUPS)
    b = pid_bh // (H // GROUPS)
    rows, heads, bh = packed(pid_m * BLOCK_M, b, hkv, H, GROUPS=GROUPS, BLOCK_M=BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd
    if EVEN_M and EVEN_D:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=(rows[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    K += b * stride_kb + hkv * stride_kh
    V += b * stride_vb + hkv * stride_vh
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    inv_keep = 1.0 / (1.0 - dropout_p)
    slope2 = slopes(Alibi, heads, HAS_ALIBI=HAS_ALIBI)
    # a padded window's zero keys (score 0, value 0): n_pad of them start the row at m = 0, l = n_pad, acc = 0;
    # the saved statistics then count them, so the backward needs nothing else (their dp is 0)
    n_pad = (tl.maximum(win_left - rows, 0) + tl.maximum(rows + win_right + 1 - Lk, 0)) * tl.where(
        split == 0, pad_keys, 0)
    m_i = tl.where(n_pad > 0, 0.0, float("-inf")).to(tl.float32)
    l_i = n_pad.to(tl.float32)
    if HAS_SINKS:  # the sink key (score sink, value 0) starts the row: m = sink (log2 units), l = 1, acc = 0
        sink2 = tl.load(Sinks + b * stride_sb + heads * stride_sh).to(tl.float32) * 1.4426950408889634
        m_i = tl.where(split == 0, sink2, m_i)
        l_i = tl.where(split == 0, 1.0, l_i)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    if BLOCK_SPARSE:
        tiles = TileMap + b * stride_tb + hkv * stride_th + pid_m * stride_tm
        n_full = tl.load(tiles)
        n_listed = n_full + tl.load(tiles + 1)
        acc, l_i, m_i = _fwd_range(acc, l_i, m_i, 0, n_full, tiles + 2, q, K, V, M, seed, b, rows, heads, bh, offs_d,
                                   offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh,
                                   stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left,
                                   win_right, dropout_p, inv_keep, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
                                   BLOCK_N=BLOCK_N, MASK_KIND=0, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI,
                                   HAS_DROPOUT=HAS_DROPOUT, CAUSAL=False, WINDOW=False, CHECK_M=not EVEN_M,
                                   CHECK_N=False, EVEN_D=EVEN_D, LISTED=True, PRECISION=PRECISION)
        acc, l_i, m_i = _fwd_range(acc, l_i, m_i, n_full, n_listed, tiles + 2, q, K, V, M, seed, b, rows, heads, bh,
                                   offs_d, offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb,
                                   stride_mh, stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2,
                                   win_left, win_right, dropout_p, inv_keep, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
                                   BLOCK_N=BLOCK_N, MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI,
                                   HAS_DROPOUT=HAS_DROPOUT, CAUSAL=False, WINDOW=HAS_WINDOW, CHECK_M=not EVEN_M,
                                   CHECK_N=not EVEN_N, EVEN_D=EVEN_D, LISTED=True, PRECISION=PRECISION)
    elif HAS_WINDOW:
        lo, whole_lo, whole_hi, hi = band_keys(pid_m * BLOCK_M, Lq, Lk, win_left, win_right, split, split_len,
                                               GROUPS=GROUPS, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
        acc, l_i, m_i = _fwd_range(acc, l_i, m_i, lo, whole_lo, TileMap, q, K, V, M, seed, b, rows, heads, bh, offs_d,
                                   offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh,
                                   stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left,
                                   win_right, dropout_p, inv_keep, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
                                   BLOCK_N=BLOCK_N, MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI,
                                   HAS_DROPOUT=HAS_DROPOUT, CAUSAL=False, WINDOW=True, CHECK_M=not EVEN_M,
                                   CHECK_N=not EVEN_N, EVEN_D=EVEN_D, LISTED=False, PRECISION=PRECISION)
        acc, l_i, m_i = _fwd_range(acc, l_i, m_i, whole_lo, whole_hi, TileMap, q, K, V, M, seed, b, rows, heads, bh,
                                   offs_d, offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb,
                                   stride_mh, stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2,
                                   win_left, win_right, dropout_p, inv_keep, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
                                   BLOCK_N=BLOCK_N, MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI,
                                   HAS_DROPOUT=HAS_DROPOUT, CAUSAL=False, WINDOW=False, CHECK_M=not EVEN_M,
                                   CHECK_N=False, EVEN_D=EVEN_D, LISTED=False, PRECISION=PRECISION)
        acc, l_i, m_i = _fwd_range(acc, l_i, m_i, whole_hi, hi, TileMap, q, K, V, M, seed, b, rows, heads, bh, offs_d,
                                   offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh,
                                   stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left,
                                   win_right, dropout_p, inv_keep, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
                                   BLOCK_N=BLOCK_N, MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI,
                                   HAS_DROPOUT=HAS_DROPOUT, CAUSAL=False, WINDOW=True, CHECK_M=not EVEN_M,
                                   CHECK_N=not EVEN_N, EVEN_D=EVEN_D, LISTED=False, PRECISION=PRECISION)
    else:
        # key range of this program: [lo, hi); full unmasked tiles in [lo, mid), masked ones in [mid, hi)
        lo = split * split_len
        hi = tl.minimum(Lk, lo + split_len)
        full_end = Lk // BLOCK_N * BLOCK_N
        if IS_CAUSAL:
            seen_by_all, seen_by_none = diagonal(pid_m * BLOCK_M, Lq, GROUPS=GROUPS, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
            # eager multiplies V by 0 right of the diagonal: a NaN/Inf there (VBad) must reach the output,
            # so such a V keeps those tiles (masked) instead of skipping them
            hi = tl.where(tl.load(VBad) != 0, hi, tl.minimum(hi, seen_by_none))
            full_end = tl.minimum(full_end, seen_by_all)
        mid = tl.maximum(lo, tl.minimum(hi, full_end))
        acc, l_i, m_i = _fwd_range(acc, l_i, m_i, lo, mid, TileMap, q, K, V, M, seed, b, rows, heads, bh, offs_d,
                                   offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh,
                                   stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left,
                                   win_right, dropout_p, inv_keep, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
                                   BLOCK_N=BLOCK_N, MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI,
                                   HAS_DROPOUT=HAS_DROPOUT, CAUSAL=False, WINDOW=False, CHECK_M=not EVEN_M,
                                   CHECK_N=False, EVEN_D=EVEN_D, LISTED=False, PRECISION=PRECISION)
        acc, l_i, m_i = _fwd_range(acc, l_i, m_i, mid, hi, TileMap, q, K, V, M, seed, b, rows, heads, bh, offs_d,
                                   offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh,
                                   stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left,
                                   win_right, dropout_p, inv_keep, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
                                   BLOCK_N=BLOCK_N, MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI,
                                   HAS_DROPOUT=HAS_DROPOUT, CAUSAL=IS_CAUSAL, WINDOW=False, CHECK_M=not EVEN_M,
                                   CHECK_N=not EVEN_N, EVEN_D=EVEN_D, LISTED=False, PRECISION=PRECISION)

    # 0 / 0 = NaN for rows whose scores are all -inf, as eager softmax; a split partial with no live key
    # stays acc (0, or NaN from 0 * NaN in V) so that the combine can weight it 0 and still see V's NaN
    out = acc / l_i[:, None]
    if stride_ls != 0:
        out = tl.where(l_i[:, None] == 0, acc, out)
    o_ptrs = (Out + split * stride_os + b * stride_ob + heads[:, None] * stride_oh + rows[:, None] * stride_om
              + offs_dv[None, :] * stride_od)
    # row statistics (max, log2 of the sum), not their sum: for rows whose scores are all a huge finite
    # fill (finfo.min), m + log2(l) would round to m and the backward's probabilities would be wrong
    stats_ptrs = Stats + split * stride_ls + (bh * Lq + rows) * 2
    if EVEN_M and EVEN_D:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty))
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(rows[:, None] < Lq) & (offs_dv[None, :] < HEAD_DIM_V))
    if EVEN_M:
        tl.store(stats_ptrs, m_i)
        tl.store(stats_ptrs + 1, tl.log2(l_i))
    else:
        tl.store(stats_ptrs, m_i, mask=rows < Lq)
        tl.store(stats_ptrs + 1, tl.log2(l_i), mask=rows < Lq)


@triton.jit
def combine_kernel(
    # pointers
    Part, PartStats, Out, Stats,
    # strides
    stride_ob, stride_oh, stride_om, stride_od,
    # sizes
    H, Lq, n_rows, splits,
    # meta
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Merge split-K partials of one (batch*head, row), each weighted by its share of the row's sum."""
    pid = tl.program_id(0)  # over batch*heads*rows
    row = pid % Lq
    bh = pid // Lq
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_s = tl.load(PartStats + (offs_s * n_rows + pid) * 2, mask=offs_s < splits, other=float("-inf"))
    ll_s = tl.load(PartStats + (offs_s * n_rows + pid) * 2 + 1, mask=offs_s < splits, other=float("-inf"))
    m = tl.max(m_s, 0)
    w = tl.exp2((m_s - m) + ll_s)  # all -inf (fully masked row): NaN, as eager
    part = tl.load(Part + (offs_s[:, None] * n_rows + pid) * HEAD_DIM_V + offs_dv[None, :],
                   mask=(offs_s[:, None] < splits) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / total
    b = bh // H
    h = bh % H
    tl.store(Out + b * stride_ob + h * stride_oh + row * stride_om + offs_dv * stride_od,
             out.to(Out.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)
    tl.store(Stats + pid * 2, m)
    tl.store(Stats + pid * 2 + 1, tl.log2(total))
