"""The ``tpa`` forward kernel (`fwd_kernel`) and the jit helper every ``tpa`` kernel forms its tiles with
(`side_tile`).  Launched by `attnfuse.kernels.tpa._triton`.

A side (q, k or v) reaches a kernel as two pointers and nine strides, ``(A, B, sa_b, sa_l, sa_h, sa_r, sb_b,
sb_h, sb_l, sb_r, sb_d)``: factorized (``FACT``), ``x[b, h, l, :] = scale * sum_r A[b, l, h, r] * B[b, l, r, :]``
(``sb_h = 0``); plain, ``x[b, h, l, :] = B[b, h, l, :]`` (A unused).  `side_tile` forms one tile of it in
registers (fp32 accumulation, one rounding to the input dtype): the formed tensor is never written anywhere.

The scores, band bounds and mask kinds are flash's (`attnfuse.kernels.flash._jit`), imported by name (Inductor
copies a user kernel's source with the jit functions it finds among its module's globals).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..flash._jit import band_keys, f32, scores

__all__ = ["fwd_kernel", "side_tile"]


@triton.jit
def side_tile(A, B, b, h, pos, offs_d, L, sa_b, sa_l, sa_h, sa_r, sb_b, sb_h, sb_l, sb_r, sb_d, x_scale,
              DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, R: tl.constexpr, FACT: tl.constexpr,
              TRANS: tl.constexpr, CHECK: tl.constexpr):
    """The side's rows ``pos`` of head ``h`` in batch ``b``: (BLOCK, BLOCK_D), or (BLOCK_D, BLOCK) with ``TRANS``;
    zero outside [0, L) x [0, DIM).  ``CHECK``: bounds-check the loads (lengths or head dim ragged)."""
    if TRANS:
        ptrs = B + b * sb_b + h * sb_h + offs_d[:, None] * sb_d + pos[None, :] * sb_l
        inb = (offs_d[:, None] < DIM) & (pos[None, :] < L)
    else:
        ptrs = B + b * sb_b + h * sb_h + pos[:, None] * sb_l + offs_d[None, :] * sb_d
        inb = (pos[:, None] < L) & (offs_d[None, :] < DIM)
    if FACT:
        if TRANS:
            acc = tl.zeros([BLOCK_D, BLOCK], tl.float32)
        else:
            acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        a_ptrs = A + b * sa_b + h * sa_h + pos * sa_l
        for r in tl.static_range(R):
            if CHECK:
                a_r = tl.load(a_ptrs + r * sa_r, mask=pos < L, other=0.0).to(tl.float32)
                b_r = tl.load(ptrs + r * sb_r, mask=inb, other=0.0).to(tl.float32)
            else:
                a_r = tl.load(a_ptrs + r * sa_r).to(tl.float32)
                b_r = tl.load(ptrs + r * sb_r).to(tl.float32)
            if TRANS:
                acc += a_r[None, :] * b_r
            else:
                acc += a_r[:, None] * b_r
        x = (acc * x_scale).to(B.dtype.element_ty)
    else:
        if CHECK:
            x = tl.load(ptrs, mask=inb, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _fwd_range(acc, l_i, m_i, lo, hi, q, KA, KB, VA, VB, M, b, hkv, rows, heads, offs_d, offs_dv,
               ska_b, ska_l, ska_h, ska_r, skb_b, skb_h, skb_l, skb_r, skb_d,
               sva_b, sva_l, sva_h, sva_r, svb_b, svb_h, svb_l, svb_r, svb_d, stride_mb, stride_mn,
               Lq, Lk, win_left, win_right, k_scale, v_scale, qk_scale, cap_scale, softcap2, fill2,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_N: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr, K_FACT: tl.constexpr,
               V_FACT: tl.constexpr, MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
               CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """Fold the key tiles [lo, hi) into the running softmax, each K/V tile formed from its factors."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kt = side_tile(KA, KB, b, hkv, cols, offs_d, Lk, ska_b, ska_l, ska_h, ska_r, skb_b, skb_h, skb_l, skb_r,
                       skb_d, k_scale, DIM=HEAD_DIM, BLOCK=BLOCK_N, BLOCK_D=BLOCK_D, R=RK, FACT=K_FACT, TRANS=True,
                       CHECK=CHECK_N or not EVEN_D)
        v = side_tile(VA, VB, b, hkv, cols, offs_dv, Lk, sva_b, sva_l, sva_h, sva_r, svb_b, svb_h, svb_l, svb_r,
                      svb_d, v_scale, DIM=HEAD_DIM_V, BLOCK=BLOCK_N, BLOCK_D=BLOCK_DV, R=RV, FACT=V_FACT, TRANS=False,
                      CHECK=CHECK_N or not EVEN_D)
        s, _ = scores(q, kt, rows, heads, cols, b, M, stride_mb, 0, 0, stride_mn, Lq, Lk, qk_scale, cap_scale,
                      softcap2, fill2, 0.0, win_left, win_right, MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP,
                      HAS_ALIBI=False, CAUSAL=False, WINDOW=WINDOW, CHECK_M=CHECK_M, CHECK_N=CHECK_N,
                      PRECISION=PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with no finite score so far keeps p = 0 instead of exp2(-inf + inf) = NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def fwd_kernel(
    QA, QB, KA, KB, VA, VB, M, Out, Stats,
    sqa_b, sqa_l, sqa_h, sqa_r, sqb_b, sqb_h, sqb_l, sqb_r, sqb_d,
    ska_b, ska_l, ska_h, ska_r, skb_b, skb_h, skb_l, skb_r, skb_d,
    sva_b, sva_l, sva_h, sva_r, svb_b, svb_h, svb_l, svb_r, svb_d,
    stride_mb, stride_mn, stride_ob, stride_oh, stride_om, stride_od, stride_os, stride_ls,
    H, Lq, Lk, win_left, win_right, split_len, q_scale, k_scale, v_scale, qk_scale, cap_scale, softcap2, fill2,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RQ: tl.constexpr, RK: tl.constexpr,
    RV: tl.constexpr, Q_FACT: tl.constexpr, K_FACT: tl.constexpr, V_FACT: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, SDPA_FORM: tl.constexpr, SPLIT: tl.constexpr, EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: BLOCK_M query rows of one query head (reading K/V head ``h // GROUPS``) of one batch, and
    with ``SPLIT`` (split-K decode) only the keys of split ``program_id(2)``: the band's first tile
    + split * split_len on, ``split_len`` of them.

    Visits only the key tiles the band ``[i - win_left, i + win_right]`` reaches (masked edge tiles around an
    unmasked middle, as flash's window path); writes the output and each row's statistics (max, log2 of the
    sum, base 2) at ``Stats[b, h, row, 0:2]``.  A row that sees no key keeps max -inf and sum 0: its output is
    0 / 0 = NaN (eager's softmax), or 0 with ``SDPA_FORM``.  With ``SPLIT`` the fp32 partial output (normalized;
    a split without a live key writes its accumulator, 0) and statistics go to ``split * stride_os`` and
    ``split * stride_ls`` on, for flash's `combine_kernel` to merge."""
    q_scale, k_scale, v_scale, qk_scale = f32(q_scale), f32(k_scale), f32(v_scale), f32(qk_scale)
    cap_scale, softcap2, fill2 = f32(cap_scale), f32(softcap2), f32(fill2)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    h = pid_bh % H
    b = pid_bh // H
    hkv = h // GROUPS
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    heads = rows * 0 + h
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = side_tile(QA, QB, b, h, rows, offs_d, Lq, sqa_b, sqa_l, sqa_h, sqa_r, sqb_b, sqb_h, sqb_l, sqb_r, sqb_d,
                  q_scale, DIM=HEAD_DIM, BLOCK=BLOCK_M, BLOCK_D=BLOCK_D, R=RQ, FACT=Q_FACT, TRANS=False,
                  CHECK=not (EVEN_M and EVEN_D))
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lo, whole_lo, whole_hi, hi = band_keys(start_m, Lq, Lk, win_left, win_right, split, split_len, GROUPS=1,
                                           BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, lo, whole_lo, q, KA, KB, VA, VB, M, b, hkv, rows, heads, offs_d,
                               offs_dv, ska_b, ska_l, ska_h, ska_r, skb_b, skb_h, skb_l, skb_r, skb_d, sva_b, sva_l,
                               sva_h, sva_r, svb_b, svb_h, svb_l, svb_r, svb_d, stride_mb, stride_mn, Lq, Lk, win_left,
                               win_right, k_scale, v_scale, qk_scale, cap_scale, softcap2, fill2, HEAD_DIM=HEAD_DIM,
                               HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, BLOCK_N=BLOCK_N, RK=RK,
                               RV=RV, K_FACT=K_FACT, V_FACT=V_FACT, MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP,
                               WINDOW=True, CHECK_M=not EVEN_M, CHECK_N=True, EVEN_D=EVEN_D, PRECISION=PRECISION)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, whole_lo, whole_hi, q, KA, KB, VA, VB, M, b, hkv, rows, heads, offs_d,
                               offs_dv, ska_b, ska_l, ska_h, ska_r, skb_b, skb_h, skb_l, skb_r, skb_d, sva_b, sva_l,
                               sva_h, sva_r, svb_b, svb_h, svb_l, svb_r, svb_d, stride_mb, stride_mn, Lq, Lk, win_left,
                               win_right, k_scale, v_scale, qk_scale, cap_scale, softcap2, fill2, HEAD_DIM=HEAD_DIM,
                               HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, BLOCK_N=BLOCK_N, RK=RK,
                               RV=RV, K_FACT=K_FACT, V_FACT=V_FACT, MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP,
                               WINDOW=False, CHECK_M=not EVEN_M, CHECK_N=False, EVEN_D=EVEN_D, PRECISION=PRECISION)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, whole_hi, hi, q, KA, KB, VA, VB, M, b, hkv, rows, heads, offs_d,
                               offs_dv, ska_b, ska_l, ska_h, ska_r, skb_b, skb_h, skb_l, skb_r, skb_d, sva_b, sva_l,
                               sva_h, sva_r, svb_b, svb_h, svb_l, svb_r, svb_d, stride_mb, stride_mn, Lq, Lk, win_left,
                               win_right, k_scale, v_scale, qk_scale, cap_scale, softcap2, fill2, HEAD_DIM=HEAD_DIM,
                               HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, BLOCK_N=BLOCK_N, RK=RK,
                               RV=RV, K_FACT=K_FACT, V_FACT=V_FACT, MASK_KIND=MASK_KIND, HAS_SOFTCAP=HAS_SOFTCAP,
                               WINDOW=True, CHECK_M=not EVEN_M, CHECK_N=True, EVEN_D=EVEN_D, PRECISION=PRECISION)
    out = acc / l_i[:, None]
    if SPLIT:  # the combine weights a split without a live key 0: its partial must not be 0 / 0
        out = tl.where(l_i[:, None] == 0, acc, out)
    elif SDPA_FORM:
        out = tl.where((m_i == float("-inf"))[:, None], 0.0, out)
    o_ptrs = (Out + split * stride_os + b * stride_ob + h * stride_oh + rows[:, None] * stride_om
              + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(rows[:, None] < Lq) & (offs_dv[None, :] < HEAD_DIM_V))
    stats_ptrs = Stats + split * stride_ls + (pid_bh * Lq + rows) * 2
    tl.store(stats_ptrs, m_i, mask=rows < Lq)
    tl.store(stats_ptrs + 1, tl.log2(l_i), mask=rows < Lq)
