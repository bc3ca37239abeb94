"""Exact FlashAttention in Triton: forward, split-K decode forward, backward.

Implements FlashAttention-2 (Dao, 2023): the forward streams key tiles through
an online softmax in the base-2 domain (``exp2`` with ``scale * log2(e)``
folded into the scores) and saves each row's statistics (max and log2 of the
sum, kept apart so that a ``finfo.min`` max cannot round the sum away); the
backward recomputes the probabilities from them after a preprocessing pass
``delta = rowsum(O * dO)``.
Semantics are exactly `attnfuse.kernels.reference` (softcap, bool mask with a
fill value, additive bias, top-left causal, GQA, NaN rows for fully masked
rows), with one difference: dropout draws its keep mask from Philox keyed by
``(seed, batch*heads + head, row*kv_len + col)``, so it is reproducible on
every device and across the split-K path, but not the CPU reference's stream.
The same kernels also run ALiBi (``s += slope[h] * (j - i)`` after softcap),
a sliding-window band (`attnfuse.kernels.window`) and constant block-sparse
masks from a tile map (`attnfuse.kernels.blocksparse`): compile-time modes
that change which tiles a program visits, not how a tile is computed.  A padded
window (``window_pad``: the ``unfold`` spelling's zero keys, see
`attnfuse.kernels.reference`) only changes a row's initial softmax state.

Layout choices:

* GQA is packed: one program owns a block of (query row, head-in-group) pairs
  of one K/V head, so every K/V tile is read once per group; with
  ``kv_groups == 1`` this is the usual one-head-per-program kernel.
* Causal programs run an unmasked loop over the key tiles left of the diagonal
  and a masked loop over the diagonal tiles; tiles right of it are skipped.
  Band programs run a masked stage on each edge of the band around an unmasked
  middle and skip the rest; block-sparse programs walk their map row (full
  tiles unmasked with no mask read, then partial tiles masked).  The backward's
  key-tile programs visit the query tiles the same way, transposed.
* Bounds checks are compiled out when lengths divide the tiles
  (``EVEN_M``/``EVEN_N``/``EVEN_D``).
* The mask is read through its own (possibly zero) strides: a broadcast bias is
  never expanded in memory.
* Decode (few query rows, long K/V) splits the keys over extra programs
  (flash-decoding) and merges the partial results by their row statistics.

Limitations: head dims up to 256; float16/bfloat16/float32 (float32 uses IEEE
fp32 dots, not TF32, to keep the accuracy contract); a causal forward whose V
holds NaN/Inf visits every tile (eager's ``0 * nan`` must reach the output) but
the backward does not replay that NaN pattern, and a band or block map reaches
NaN/Inf in V outside it only in the tiles it visits; under a band or map, a row
with no visible key gets eager's masked_fill gradients (dQ 0, NaN in all of dV
of its K/V head); for a row with exactly one visible key, dQ/dK carry fp32
rounding of ``delta`` where eager is exactly 0; the dropout offsets wrap when
``q_len * kv_len >= 2**32``; block-sparse launches are never split over keys.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..costmodel.tiles import TileConfig, band, num_splits, pick, widths
from . import _family, blocksparse
from ._launch import LOG2E, hint, launch, mask_elem, pow2, precision, spec_for
from .reference import sink_error, sink_grad, sink_table, sum_to, window_pad_error

_FLT_MAX = 3.4028234663852886e38
# MASK_KIND: no mask, additive bias, bool mask filled with -inf, bool mask with a finite fill, block-sparse
# additive mask (entries <= finfo.min are -inf).  The fill is a constexpr choice rather than a -inf scalar
# argument so that a traced launch never carries an inf.
MASK_NONE, MASK_BIAS, MASK_BOOL, MASK_BOOL_FILL, MASK_BIAS_FLOOR = 0, 1, 2, 3, 4


# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _tanh(y):
    """tanh(y * log2(e) / 2), to about an ulp, from plain Triton ops (same code compiled and interpreted).

    A Taylor polynomial near 0, where 1 - 2 / (e^2x + 1) cancels; that formula elsewhere, with exact
    limits at +-inf.
    """
    x = y * 0.34657359027997264  # ln(2) / 2
    x2 = x * x
    poly = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (-0.05396825396825397 + x2 * (
        0.021869488536155203 + x2 * (-0.008863235529902197 + x2 * 0.003592128036572481))))))
    return tl.where(tl.abs(x) < 0.4, poly, 1.0 - 2.0 / (tl.exp2(y) + 1.0))


@triton.jit
def _scores(q, kt, rows, heads, cols, b, M, stride_mb, stride_mh, stride_mm, stride_mn, Lq, Lk,
            qk_scale, cap_scale, softcap2, fill2, slope2, win_left, win_right,
            MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, CAUSAL: tl.constexpr,
            WINDOW: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Scores of one tile in the log2 domain, and tanh(s / softcap) for the softcap backward.

    ``qk_scale = scale * log2(e)``; with softcap, ``cap_scale = 2 * scale / softcap * log2(e)`` and
    ``softcap2 = softcap * log2(e)``; ``fill2`` is the finite bool-mask fill (MASK_KIND 3) in the log2 domain,
    or, for a block-sparse additive mask (MASK_KIND 4), finfo(mask dtype).min: entries at or below it are
    masked, -inf like the tiles the map skips.  ``slope2``: the rows' ALiBi slopes times log2(e).  ``WINDOW``
    keeps the keys j of row i with ``-win_left <= j - i <= win_right``.
    """
    qk = tl.dot(q, kt, input_precision=PRECISION)
    if HAS_SOFTCAP:
        t = _tanh(qk * cap_scale)
        s = t * softcap2
    else:
        t = qk
        s = qk * qk_scale
    if HAS_ALIBI:
        s += slope2[:, None] * (cols[None, :] - rows[:, None]).to(tl.float32)
    if MASK_KIND != 0:
        m_ptrs = M + b * stride_mb + heads[:, None] * stride_mh + rows[:, None] * stride_mm + cols[None, :] * stride_mn
        if CHECK_M or CHECK_N:
            inb = (rows[:, None] < Lq) & (cols[None, :] < Lk)
            mv = tl.load(m_ptrs, mask=inb, other=0)
        else:
            mv = tl.load(m_ptrs)
        if MASK_KIND == 1:
            # finfo.min * log2(e) would overflow to -inf and turn eager's uniform rows into NaN rows
            bias = mv.to(tl.float32)
            s += tl.where(bias == float("-inf"), bias, tl.maximum(bias * 1.4426950408889634, -3.4028234663852886e38))
        elif MASK_KIND == 2:
            s = tl.where(mv != 0, s, float("-inf"))
        elif MASK_KIND == 3:
            s = tl.where(mv != 0, s, fill2)
        else:
            bias = mv.to(tl.float32)
            s = tl.where(bias <= fill2, float("-inf"),
                         s + tl.maximum(bias * 1.4426950408889634, -3.4028234663852886e38))
    if CAUSAL:
        s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
    if WINDOW:
        dist = cols[None, :] - rows[:, None]
        s = tl.where((dist >= -win_left) & (dist <= win_right), s, float("-inf"))
    if CHECK_N:
        s = tl.where(cols[None, :] < Lk, s, float("-inf"))
    return s, t


@triton.jit
def _f32(x):
    return tl.cast(x, tl.float32)


@triton.jit
def _philox_word(seed, c0, c1):
    """The first output word of Philox4x32-10 (Salmon et al., SC'11) for key ``seed`` (64 bits) and counter
    (c0, c1, 0, 0): the same bits as ``triton.language.random.philox``.  Written out here because Inductor copies
    a user kernel's source with the functions it calls but not their module globals (Triton's own philox has a
    default argument ``N_ROUNDS_DEFAULT`` that is then undefined)."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = c0.to(tl.uint32, bitcast=True)
    c1 = c1.to(tl.uint32, bitcast=True)
    c2 = c0 * 0
    c3 = c0 * 0
    for _ in tl.static_range(10):
        a0, a2 = c0, c2
        c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
        c1 = a2 * 0xCD9E8D57
        c3 = a0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0


@triton.jit
def _keep(seed, bh, rows, cols, Lk, dropout_p):
    """Dropout keep mask of one tile: Philox keyed by (seed, batch*head, row*kv_len + col); the word becomes a
    uniform float in [0, 1) as ``triton.language.random.uint_to_uniform_float`` does."""
    c0 = rows[:, None] * Lk + cols[None, :]
    r = _philox_word(seed, c0, bh[:, None] + c0 * 0).to(tl.int32, bitcast=True)
    return tl.where(r < 0, ~r, r) * 4.6566127342e-10 >= dropout_p


@triton.jit
def _packed(start, b, hkv, H, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr):
    """(query row, head, batch*heads + head) of the BLOCK_M packed pairs r = row * GROUPS + g from ``start``."""
    r = start + tl.arange(0, BLOCK_M)
    heads = hkv * GROUPS + r % GROUPS
    return r // GROUPS, heads, b * H + heads


@triton.jit
def _slopes(Alibi, heads, HAS_ALIBI: tl.constexpr):
    """The ALiBi slopes of the rows' heads in log2 units (unused without ALiBi)."""
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + heads) * 1.4426950408889634
    return slope2


@triton.jit
def _diagonal(start, Lq, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Causal key bounds of the packed rows from ``start``: keys below the first bound are visible to
    every row (whole tiles), keys from the second on to none."""
    row_lo = start // GROUPS
    row_hi = tl.minimum((start + BLOCK_M - 1) // GROUPS, Lq - 1)
    return (row_lo + 1) // BLOCK_N * BLOCK_N, row_hi + 1


@triton.jit
def _band_keys(start, Lq, Lk, win_left, win_right, split, split_len, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Key bounds of the packed rows from ``start`` under the band, within key split ``split`` (its keys from
    the band's first tile + split * split_len on): lo <= whole_lo <= whole_hi <= hi (or an empty [lo, hi)).

    [lo, hi) holds every key some row sees; the tiles in [whole_lo, whole_hi) are seen whole by every row and
    end before a ragged last tile (the unmasked loop does not check lengths); the edges are masked.
    """
    row_lo = start // GROUPS
    row_hi = tl.minimum((start + BLOCK_M - 1) // GROUPS, Lq - 1)
    lo = tl.maximum(row_lo - win_left, 0) // BLOCK_N * BLOCK_N + split * split_len
    hi = tl.minimum(tl.minimum(row_hi + win_right + 1, Lk), lo + split_len)
    whole_lo = tl.cdiv(tl.maximum(row_hi - win_left, 0), BLOCK_N) * BLOCK_N
    whole_hi = tl.minimum(row_lo + win_right + 1, Lk) // BLOCK_N * BLOCK_N
    whole_lo = tl.minimum(tl.maximum(whole_lo, lo), hi)
    whole_hi = tl.minimum(tl.maximum(whole_hi, whole_lo), hi)
    return lo, whole_lo, whole_hi, hi


@triton.jit
def _band_rows(start_n, Lq, Lk, win_left, win_right, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Packed query-row bounds of the key tile at ``start_n`` under the band: lo <= whole_lo <= whole_hi <= hi
    (or an empty [lo, hi)).  [lo, hi) holds every row that sees a key of the tile; the row tiles in
    [whole_lo, whole_hi) see all of its keys (a ragged last row tile included: rows past Lq have p = 0)."""
    last = tl.minimum(start_n + BLOCK_N, Lk) - 1
    lo = tl.maximum(start_n - win_right, 0) * GROUPS // BLOCK_M * BLOCK_M
    hi = tl.minimum(last + win_left + 1, Lq) * GROUPS
    whole_lo = tl.cdiv(tl.maximum(last - win_right, 0) * GROUPS, BLOCK_M) * BLOCK_M
    whole_end = tl.minimum(start_n + win_left + 1, Lq)
    whole_hi = tl.where(whole_end == Lq, hi, whole_end * GROUPS // BLOCK_M * BLOCK_M)
    whole_lo = tl.minimum(tl.maximum(whole_lo, lo), hi)
    whole_hi = tl.minimum(tl.maximum(whole_hi, whole_lo), hi)
    return lo, whole_lo, whole_hi, hi


@triton.jit
def _bwd_rows(Q, DO, Stats, Delta, b, rows, heads, bh, offs_d, offs_dv,
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
    s, _ = _scores(q, kt, rows, heads, cols, b, M, stride_mb, stride_mh, stride_mm, stride_mn, Lq, Lk,
                   qk_scale, cap_scale, softcap2, fill2, slope2, win_left, win_right,
                   MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, CAUSAL, WINDOW, CHECK_M, CHECK_N, PRECISION)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row with no finite score so far keeps p = 0 instead of exp2(-inf + inf) = NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        p = tl.where(_keep(seed, bh, rows, cols, Lk, dropout_p), p * inv_keep, 0.0)
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
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, M, seed, b, rows, heads, bh, offs_d, offs_dv, slope2,
                                  start_n, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh,
                                  stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left,
                                  win_right, dropout_p, inv_keep, HEAD_DIM, HEAD_DIM_V, BLOCK_N, MASK_KIND,
                                  HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, CAUSAL, WINDOW, CHECK_M, CHECK_N, EVEN_D,
                                  PRECISION)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
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
    ``split * stride_os`` / ``split * stride_ls``; `_combine_kernel` merges them.
    ``pad_keys`` (0 or 1, a padded window): each row also holds the band's n_pad keys outside [0, Lk), of score 0
    and value 0, folded into the softmax state it starts from (split 0 only): m = 0, l = n_pad.
    ``HAS_SINKS``: each row also holds one key of score ``Sinks[b, h]`` (natural units) and value 0, likewise
    (split 0 only): m = sink, l = 1; the saved statistics then include it, and a row with no visible key is 0.
    """
    # float scalars may arrive as fp64 (Inductor's launches of user kernels): the math stays fp32
    qk_scale, cap_scale = _f32(qk_scale), _f32(cap_scale)
    softcap2, fill2, dropout_p = _f32(softcap2), _f32(fill2), _f32(dropout_p)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heavy causal tiles first
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    hkv = pid_bh % (H // GROUPS)
    b = pid_bh // (H // GROUPS)
    rows, heads, bh = _packed(pid_m * BLOCK_M, b, hkv, H, GROUPS, BLOCK_M)
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
    slope2 = _slopes(Alibi, heads, HAS_ALIBI)
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
        acc, l_i, m_i = _fwd_range(acc, l_i, m_i, 0, n_full, tiles + 2, q, K, V, M, seed, b, rows, heads, bh,
                                   offs_d, offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb,
                                   stride_mh, stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2,
                                   win_left, win_right, dropout_p, inv_keep, HEAD_DIM, HEAD_DIM_V, BLOCK_N, 0,
                                   HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, False, False, not EVEN_M, False, EVEN_D,
                                   True, PRECISION)
        acc, l_i, m_i = _fwd_range(acc, l_i, m_i, n_full, n_listed, tiles + 2, q, K, V, M, seed, b, rows, heads,
                                   bh, offs_d, offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb,
                                   stride_mh, stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2,
                                   win_left, win_right, dropout_p, inv_keep, HEAD_DIM, HEAD_DIM_V, BLOCK_N, MASK_KIND,
                                   HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, False, HAS_WINDOW, not EVEN_M, not EVEN_N,
                                   EVEN_D, True, PRECISION)
    elif HAS_WINDOW:
        lo, whole_lo, whole_hi, hi = _band_keys(pid_m * BLOCK_M, Lq, Lk, win_left, win_right, split, split_len,
                                                GROUPS, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_range(acc, l_i, m_i, lo, whole_lo, TileMap, q, K, V, M, seed, b, rows, heads, bh,
                                   offs_d, offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb,
                                   stride_mh, stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2,
                                   win_left, win_right, dropout_p, inv_keep, HEAD_DIM, HEAD_DIM_V, BLOCK_N, MASK_KIND,
                                   HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, False, True, not EVEN_M, not EVEN_N, EVEN_D,
                                   False, PRECISION)
        acc, l_i, m_i = _fwd_range(acc, l_i, m_i, whole_lo, whole_hi, TileMap, q, K, V, M, seed, b, rows, heads, bh,
                                   offs_d, offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb,
                                   stride_mh, stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2,
                                   win_left, win_right, dropout_p, inv_keep, HEAD_DIM, HEAD_DIM_V, BLOCK_N, MASK_KIND,
                                   HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, False, False, not EVEN_M, False, EVEN_D,
                                   False, PRECISION)
        acc, l_i, m_i = _fwd_range(acc, l_i, m_i, whole_hi, hi, TileMap, q, K, V, M, seed, b, rows, heads, bh,
                                   offs_d, offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb,
                                   stride_mh, stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2,
                                   win_left, win_right, dropout_p, inv_keep, HEAD_DIM, HEAD_DIM_V, BLOCK_N, MASK_KIND,
                                   HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, False, True, not EVEN_M, not EVEN_N, EVEN_D,
                                   False, PRECISION)
    else:
        # key range of this program: [lo, hi); full unmasked tiles in [lo, mid), masked ones in [mid, hi)
        lo = split * split_len
        hi = tl.minimum(Lk, lo + split_len)
        full_end = Lk // BLOCK_N * BLOCK_N
        if IS_CAUSAL:
            seen_by_all, seen_by_none = _diagonal(pid_m * BLOCK_M, Lq, GROUPS, BLOCK_M, BLOCK_N)
            # eager multiplies V by 0 right of the diagonal: a NaN/Inf there (VBad) must reach the output,
            # so such a V keeps those tiles (masked) instead of skipping them
            hi = tl.where(tl.load(VBad) != 0, hi, tl.minimum(hi, seen_by_none))
            full_end = tl.minimum(full_end, seen_by_all)
        mid = tl.maximum(lo, tl.minimum(hi, full_end))
        acc, l_i, m_i = _fwd_range(acc, l_i, m_i, lo, mid, TileMap, q, K, V, M, seed, b, rows, heads, bh,
                                   offs_d, offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb,
                                   stride_mh, stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2,
                                   win_left, win_right, dropout_p, inv_keep, HEAD_DIM, HEAD_DIM_V, BLOCK_N, MASK_KIND,
                                   HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, False, False, not EVEN_M, False, EVEN_D,
                                   False, PRECISION)
        acc, l_i, m_i = _fwd_range(acc, l_i, m_i, mid, hi, TileMap, q, K, V, M, seed, b, rows, heads, bh,
                                   offs_d, offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb,
                                   stride_mh, stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2,
                                   win_left, win_right, dropout_p, inv_keep, HEAD_DIM, HEAD_DIM_V, BLOCK_N, MASK_KIND,
                                   HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, IS_CAUSAL, False, not EVEN_M, not EVEN_N,
                                   EVEN_D, False, PRECISION)

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
def _combine_kernel(
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


@triton.jit
def _bwd_preprocess(
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
def _bwd_tile_grads(q, do, kt, vt, m_row, ll_row, delta, rows, heads, bh, cols, b, M, seed,
                    stride_mb, stride_mh, stride_mm, stride_mn, Lq, Lk,
                    qk_scale, cap_scale, softcap2, fill2, slope2, win_left, win_right, dropout_p, inv_keep,
                    MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                    HAS_DROPOUT: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, CHECK_M: tl.constexpr,
                    CHECK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Recompute one tile: (p after dropout, dS w.r.t. the final scores, dS w.r.t. q·k) in fp32."""
    s, t = _scores(q, kt, rows, heads, cols, b, M, stride_mb, stride_mh, stride_mm, stride_mn, Lq, Lk,
                   qk_scale, cap_scale, softcap2, fill2, slope2, win_left, win_right,
                   MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, CAUSAL, WINDOW, CHECK_M, CHECK_N, PRECISION)
    p = tl.exp2((s - m_row[:, None]) - ll_row[:, None])
    dp = tl.dot(do, vt, input_precision=PRECISION)
    if HAS_DROPOUT:
        keep = _keep(seed, bh, rows, cols, Lk, dropout_p)
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
    rows, heads, bh = _packed(start_m, b, hkv, H, GROUPS, BLOCK_M)
    q, do, m_row, ll_row, delta = _bwd_rows(Q, DO, Stats, Delta, b, rows, heads, bh, offs_d, offs_dv,
                                            stride_qb, stride_qh, stride_qm, stride_qd,
                                            stride_dob, stride_doh, stride_dom, stride_dod, Lq, HEAD_DIM, HEAD_DIM_V)
    slope2 = _slopes(Alibi, heads, HAS_ALIBI)
    pd, ds, dqk = _bwd_tile_grads(q, do, kt, vt, m_row, ll_row, delta, rows, heads, bh, cols, b, M, seed,
                                  stride_mb, stride_mh, stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale,
                                  softcap2, fill2, slope2, win_left, win_right, dropout_p, inv_keep, MASK_KIND,
                                  HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, CAUSAL, WINDOW, CHECK_M, CHECK_N, PRECISION)
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
                            stride_mn, stride_dob, stride_doh, stride_dom, stride_dod,
                            stride_dqb, stride_dqh, stride_dqm, stride_dqd, H, Lq, Lk, sm_scale, qk_scale, cap_scale,
                            softcap2, fill2, win_left, win_right, dropout_p, inv_keep, GROUPS, HEAD_DIM, HEAD_DIM_V,
                            BLOCK_M, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, CAUSAL, WINDOW, CHECK_M, CHECK_N,
                            ATOMIC_DQ, PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
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
    (fast, not bitwise reproducible); otherwise `_bwd_dq_kernel` computes dQ.
    """
    # float scalars may arrive as fp64 (Inductor's launches of user kernels): the math stays fp32
    sm_scale, qk_scale, cap_scale = _f32(sm_scale), _f32(qk_scale), _f32(cap_scale)
    softcap2, fill2, dropout_p = _f32(softcap2), _f32(fill2), _f32(dropout_p)
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
                             stride_mm, stride_mn, stride_dob, stride_doh, stride_dom, stride_dod,
                             stride_dqb, stride_dqh, stride_dqm, stride_dqd, H, Lq, Lk, sm_scale, qk_scale, cap_scale,
                             softcap2, fill2, win_left, win_right, dropout_p, inv_keep, GROUPS, HEAD_DIM, HEAD_DIM_V,
                             BLOCK_M, 0, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, False, False, not EVEN_M, not EVEN_N,
                             ATOMIC_DQ, True, PRECISION)
        dk, dv = _dkdv_range(dk, dv, n_full, n_listed, tiles + 2, kt, vt, Q, DO, Stats, Delta, DQ, M, Alibi, seed, b,
                             hkv, cols, offs_d, offs_dv, stride_qb, stride_qh, stride_qm, stride_qd, stride_mb,
                             stride_mh, stride_mm, stride_mn, stride_dob, stride_doh, stride_dom, stride_dod,
                             stride_dqb, stride_dqh, stride_dqm, stride_dqd, H, Lq, Lk, sm_scale, qk_scale, cap_scale,
                             softcap2, fill2, win_left, win_right, dropout_p, inv_keep, GROUPS, HEAD_DIM, HEAD_DIM_V,
                             BLOCK_M, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, False, HAS_WINDOW, not EVEN_M,
                             not EVEN_N, ATOMIC_DQ, True, PRECISION)
    elif HAS_WINDOW:
        lo, whole_lo, whole_hi, hi = _band_rows(pid_n * BLOCK_N, Lq, Lk, win_left, win_right, GROUPS, BLOCK_M,
                                                BLOCK_N)
        dk, dv = _dkdv_range(dk, dv, lo, whole_lo, TileMap, kt, vt, Q, DO, Stats, Delta, DQ, M, Alibi, seed, b, hkv,
                             cols, offs_d, offs_dv, stride_qb, stride_qh, stride_qm, stride_qd, stride_mb, stride_mh,
                             stride_mm, stride_mn, stride_dob, stride_doh, stride_dom, stride_dod,
                             stride_dqb, stride_dqh, stride_dqm, stride_dqd, H, Lq, Lk, sm_scale, qk_scale, cap_scale,
                             softcap2, fill2, win_left, win_right, dropout_p, inv_keep, GROUPS, HEAD_DIM, HEAD_DIM_V,
                             BLOCK_M, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, False, True, not EVEN_M,
                             not EVEN_N, ATOMIC_DQ, False, PRECISION)
        dk, dv = _dkdv_range(dk, dv, whole_lo, whole_hi, TileMap, kt, vt, Q, DO, Stats, Delta, DQ, M, Alibi, seed, b,
                             hkv, cols, offs_d, offs_dv, stride_qb, stride_qh, stride_qm, stride_qd, stride_mb,
                             stride_mh, stride_mm, stride_mn, stride_dob, stride_doh, stride_dom, stride_dod,
                             stride_dqb, stride_dqh, stride_dqm, stride_dqd, H, Lq, Lk, sm_scale, qk_scale, cap_scale,
                             softcap2, fill2, win_left, win_right, dropout_p, inv_keep, GROUPS, HEAD_DIM, HEAD_DIM_V,
                             BLOCK_M, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, False, False, not EVEN_M,
                             not EVEN_N, ATOMIC_DQ, False, PRECISION)
        dk, dv = _dkdv_range(dk, dv, whole_hi, hi, TileMap, kt, vt, Q, DO, Stats, Delta, DQ, M, Alibi, seed, b, hkv,
                             cols, offs_d, offs_dv, stride_qb, stride_qh, stride_qm, stride_qd, stride_mb, stride_mh,
                             stride_mm, stride_mn, stride_dob, stride_doh, stride_dom, stride_dod,
                             stride_dqb, stride_dqh, stride_dqm, stride_dqd, H, Lq, Lk, sm_scale, qk_scale, cap_scale,
                             softcap2, fill2, win_left, win_right, dropout_p, inv_keep, GROUPS, HEAD_DIM, HEAD_DIM_V,
                             BLOCK_M, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, False, True, not EVEN_M,
                             not EVEN_N, ATOMIC_DQ, False, PRECISION)
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
        dk, dv = _dkdv_range(dk, dv, lo, mid, TileMap, kt, vt, Q, DO, Stats, Delta, DQ, M, Alibi, seed, b, hkv,
                             cols, offs_d, offs_dv, stride_qb, stride_qh, stride_qm, stride_qd, stride_mb, stride_mh,
                             stride_mm, stride_mn, stride_dob, stride_doh, stride_dom, stride_dod,
                             stride_dqb, stride_dqh, stride_dqm, stride_dqd, H, Lq, Lk, sm_scale, qk_scale, cap_scale,
                             softcap2, fill2, win_left, win_right, dropout_p, inv_keep, GROUPS, HEAD_DIM, HEAD_DIM_V,
                             BLOCK_M, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, True, False, not EVEN_M,
                             not EVEN_N, ATOMIC_DQ, False, PRECISION)
        dk, dv = _dkdv_range(dk, dv, mid, n_packed, TileMap, kt, vt, Q, DO, Stats, Delta, DQ, M, Alibi, seed, b, hkv,
                             cols, offs_d, offs_dv, stride_qb, stride_qh, stride_qm, stride_qd, stride_mb, stride_mh,
                             stride_mm, stride_mn, stride_dob, stride_doh, stride_dom, stride_dod,
                             stride_dqb, stride_dqh, stride_dqm, stride_dqd, H, Lq, Lk, sm_scale, qk_scale, cap_scale,
                             softcap2, fill2, win_left, win_right, dropout_p, inv_keep, GROUPS, HEAD_DIM, HEAD_DIM_V,
                             BLOCK_M, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, False, False, not EVEN_M,
                             not EVEN_N, ATOMIC_DQ, False, PRECISION)
    dk *= sm_scale
    tl.store(DK + b * stride_dkb + hkv * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=(cols[:, None] < Lk) & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + b * stride_dvb + hkv * stride_dvh + cols[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=(cols[:, None] < Lk) & (offs_dv[None, :] < HEAD_DIM_V))


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
    _, ds, dqk = _bwd_tile_grads(q, do, kt, vt, m_row, ll_row, delta, rows, heads, bh, cols, b, M, seed,
                                 stride_mb, stride_mh, stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale,
                                 softcap2, fill2, slope2, win_left, win_right, dropout_p, inv_keep, MASK_KIND,
                                 HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, CAUSAL, WINDOW, CHECK_M, CHECK_N, PRECISION)
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
                      HEAD_DIM, HEAD_DIM_V, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, CAUSAL, WINDOW,
                      CHECK_M, CHECK_N, MASK_GRAD, PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
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
    sm_scale, qk_scale, cap_scale = _f32(sm_scale), _f32(qk_scale), _f32(cap_scale)
    softcap2, fill2, dropout_p = _f32(softcap2), _f32(fill2), _f32(dropout_p)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    hkv = pid_bh % (H // GROUPS)
    b = pid_bh // (H // GROUPS)
    rows, heads, bh = _packed(pid_m * BLOCK_M, b, hkv, H, GROUPS, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q, do, m_row, ll_row, delta = _bwd_rows(Q, DO, Stats, Delta, b, rows, heads, bh, offs_d, offs_dv,
                                            stride_qb, stride_qh, stride_qm, stride_qd,
                                            stride_dob, stride_doh, stride_dom, stride_dod, Lq, HEAD_DIM, HEAD_DIM_V)
    K += b * stride_kb + hkv * stride_kh
    V += b * stride_vb + hkv * stride_vh
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    inv_keep = 1.0 / (1.0 - dropout_p)
    slope2 = _slopes(Alibi, heads, HAS_ALIBI)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if BLOCK_SPARSE:
        tiles = TileMap + b * stride_tb + hkv * stride_th + pid_m * stride_tm
        n_full = tl.load(tiles)
        n_listed = n_full + tl.load(tiles + 1)
        dq = _dq_range(dq, 0, n_full, tiles + 2, q, do, m_row, ll_row, delta, K, V, M, DM, seed, b, rows, heads, bh,
                       offs_d, offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh,
                       stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left, win_right,
                       dropout_p, inv_keep, HEAD_DIM, HEAD_DIM_V, BLOCK_N, 0, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
                       False, False, not EVEN_M, False, MASK_GRAD, True, PRECISION)
        dq = _dq_range(dq, n_full, n_listed, tiles + 2, q, do, m_row, ll_row, delta, K, V, M, DM, seed, b, rows, heads,
                       bh, offs_d, offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh,
                       stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left, win_right,
                       dropout_p, inv_keep, HEAD_DIM, HEAD_DIM_V, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI,
                       HAS_DROPOUT, False, HAS_WINDOW, not EVEN_M, not EVEN_N, MASK_GRAD, True, PRECISION)
    elif HAS_WINDOW:
        lo, whole_lo, whole_hi, hi = _band_keys(pid_m * BLOCK_M, Lq, Lk, win_left, win_right, 0, Lk, GROUPS, BLOCK_M,
                                                BLOCK_N)
        dq = _dq_range(dq, lo, whole_lo, TileMap, q, do, m_row, ll_row, delta, K, V, M, DM, seed, b, rows, heads, bh,
                       offs_d, offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh,
                       stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left, win_right,
                       dropout_p, inv_keep, HEAD_DIM, HEAD_DIM_V, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI,
                       HAS_DROPOUT, False, True, not EVEN_M, not EVEN_N, MASK_GRAD, False, PRECISION)
        dq = _dq_range(dq, whole_lo, whole_hi, TileMap, q, do, m_row, ll_row, delta, K, V, M, DM, seed, b, rows, heads,
                       bh, offs_d, offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh,
                       stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left, win_right,
                       dropout_p, inv_keep, HEAD_DIM, HEAD_DIM_V, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI,
                       HAS_DROPOUT, False, False, not EVEN_M, False, MASK_GRAD, False, PRECISION)
        dq = _dq_range(dq, whole_hi, hi, TileMap, q, do, m_row, ll_row, delta, K, V, M, DM, seed, b, rows, heads, bh,
                       offs_d, offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh,
                       stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left, win_right,
                       dropout_p, inv_keep, HEAD_DIM, HEAD_DIM_V, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI,
                       HAS_DROPOUT, False, True, not EVEN_M, not EVEN_N, MASK_GRAD, False, PRECISION)
    else:
        hi = Lk
        mid = Lk // BLOCK_N * BLOCK_N
        if IS_CAUSAL:
            seen_by_all, seen_by_none = _diagonal(pid_m * BLOCK_M, Lq, GROUPS, BLOCK_M, BLOCK_N)
            hi = tl.minimum(hi, seen_by_none)
            mid = tl.minimum(mid, seen_by_all)
        mid = tl.minimum(mid, hi)
        dq = _dq_range(dq, 0, mid, TileMap, q, do, m_row, ll_row, delta, K, V, M, DM, seed, b, rows, heads, bh,
                       offs_d, offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh,
                       stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left, win_right,
                       dropout_p, inv_keep, HEAD_DIM, HEAD_DIM_V, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI,
                       HAS_DROPOUT, False, False, not EVEN_M, False, MASK_GRAD, False, PRECISION)
        dq = _dq_range(dq, mid, hi, TileMap, q, do, m_row, ll_row, delta, K, V, M, DM, seed, b, rows, heads, bh,
                       offs_d, offs_dv, slope2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mb, stride_mh,
                       stride_mm, stride_mn, Lq, Lk, qk_scale, cap_scale, softcap2, fill2, win_left, win_right,
                       dropout_p, inv_keep, HEAD_DIM, HEAD_DIM_V, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI,
                       HAS_DROPOUT, IS_CAUSAL, False, not EVEN_M, not EVEN_N, MASK_GRAD, False, PRECISION)
    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + heads[:, None] * stride_dqh + rows[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),
             mask=(rows[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM))


# --------------------------------------------------------------------------------------------- launcher


def _band_mode(window: tuple[int, int], causal: bool, block_sparse: bool) -> tuple[bool, bool, int, int]:
    """(IS_CAUSAL, HAS_WINDOW, left, right): a plain causal band runs the causal path (the one that keeps
    eager's NaN from V right of the diagonal), any other band, or any band under block-sparse, the window path."""
    left, right = band(window, causal)
    is_causal = (left, right) == (-1, 0) and not block_sparse
    return is_causal, (left, right) != (-1, -1) and not is_causal, left, right


def _nonfinite(v: torch.Tensor) -> torch.Tensor:
    """Device flag: does V hold a NaN/Inf (no host sync; the causal forward then visits every tile).

    One reduction and no V-sized temporary: min + max is NaN/Inf iff V holds a NaN, an inf or a -inf.
    """
    lo, hi = torch.aminmax(v)
    total = lo.float() + hi.float()
    return (total - total) != 0  # NaN exactly when total is NaN or +-inf


def _mask_args(mask, mask_fill, q, b, h, lq, lk, block_sparse=False):
    """(mask tensor or q as a dummy pointer, its 4 broadcast strides, MASK_KIND, fill in log2 units).

    Block-sparse masked entries are -inf whatever the fill, like the empty tiles the map skips: a bool mask
    ignores ``mask_fill``; an additive one treats entries <= finfo(dtype).min as -inf (``fill2`` carries
    that threshold)."""
    if mask is None:
        return q, (0, 0, 0, 0), MASK_NONE, 0.0
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(b, h, lq, lk)  # a view: broadcast dims get stride 0, nothing is copied
    if mask.dtype != torch.bool:
        if block_sparse:
            return m, tuple(m.stride()), MASK_BIAS_FLOOR, float(torch.finfo(mask.dtype).min)
        return m, tuple(m.stride()), MASK_BIAS, 0.0
    if block_sparse or mask_fill is None or mask_fill == float("-inf"):
        return m, tuple(m.stride()), MASK_BOOL, 0.0
    # finfo.min * log2(e) must stay finite: a fully masked row is uniform, as in eager
    return m, tuple(m.stride()), MASK_BOOL_FILL, max(float(mask_fill) * LOG2E, -_FLT_MAX)


def _scalars(q, scale, softcap):
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    cap_scale = 2.0 * sm_scale / softcap * LOG2E if softcap else 0.0
    return sm_scale, sm_scale * LOG2E, cap_scale, softcap * LOG2E


def _alibi_arg(alibi, q):
    """The ALiBi slopes as the kernels read them (fp32, contiguous, on q's device), or q as a dummy pointer."""
    if alibi is None:
        return q
    if tuple(alibi.shape) != (q.shape[1],):
        raise ValueError(f"attnfuse flash: alibi holds one slope per query head, shape ({q.shape[1]},); "
                         f"got {tuple(alibi.shape)}")
    return alibi.detach().to(device=q.device, dtype=torch.float32).contiguous()


def _map_args(tile_map: torch.Tensor | None, q):
    """A block-sparse map (or q as a dummy pointer) and its (batch, head, tile) strides, 0 where broadcast."""
    if tile_map is None:
        return q, (0, 0, 0)
    return tile_map, tuple(0 if n == 1 else st for n, st in zip(tile_map.shape[:2], tile_map.stride()[:2])) + (
        tile_map.stride(2),)


def _tile_maps(block_sparse, mask, b, h, hkv, lq, lk, cfg, left, right, tile_map=None):
    if tile_map is not None:  # precomputed (e.g. top-k's selection): a TileMap, or built for the chosen tile
        return tile_map(cfg) if callable(tile_map) else tile_map
    if not block_sparse:
        return None
    if mask is None:
        raise ValueError("attnfuse flash: block_sparse=True needs the constant mask its tile map is built from")
    return blocksparse.tile_map(mask, batch=b, heads=h, kv_heads=hkv, q_len=lq, kv_len=lk, block_m=cfg.block_m,
                                block_n=cfg.block_n, window=(left, right))


def forward(q, k, v, mask=None, seed=None, *, scale=None, causal=False, softcap=0.0, dropout_p=0.0,
            mask_fill=None, config: TileConfig | None = None, splits: int | None = None,
            alibi: torch.Tensor | None = None, window_size: tuple[int, int] = (-1, -1), block_sparse: bool = False,
            tile_map=None, window_pad: bool = False, sinks: torch.Tensor | None = None):
    """(out, stats): out is (B, H, Lq, Dv) laid out as (B, Lq, H, Dv); stats is (B, H, Lq, 2) fp32, each row's
    score max and the log2 of its sum of exp2(score - max), in log2 units (what the backward needs).

    ``alibi``: (H,) slopes, ``s += alibi[h] * (j - i)`` (a constant: no gradient).  ``window``: the band
    (left, right), -1 unbounded; ``causal`` folds in as right = 0.  ``block_sparse``: ``mask`` is a constant
    whose tile map (`blocksparse.tile_map`, cached per mask) lists each query tile's non-empty key tiles;
    its masked entries are -inf (see `_mask_args`) and the launch is never split.  ``tile_map``: instead of a
    mask's, a precomputed `blocksparse.TileMap` for ``config``'s tile, or a callable ``(TileConfig) -> TileMap``
    (used with mask=None; implies block_sparse; partial tiles get only the band, causal included).
    ``window_pad``: a padded window (`attnfuse.kernels.reference`: the band's positions outside the sequence are
    keys of score 0 and value 0); needs a finite band and ``q_len == kv_len``.  ``sinks``: attention sinks,
    (H,) or broadcastable to (B, H) (`attnfuse.kernels.reference`), one key of that score and value 0 per row.
    """
    block_sparse = block_sparse or tile_map is not None
    _check_window_pad(window_pad, window_size, causal, q, k, alibi, block_sparse)
    sk, s_strides = _sink_args(sinks, q)
    b, h, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    # head dims and the group size are compile-time constants of the kernel: specialize on them (a guard)
    d, dv, groups = int(d), int(dv), int(h // hkv)
    elem = q.element_size()
    rows = lq * groups
    spec = spec_for(q)
    is_causal, has_window, left, right = _band_mode(window_size, causal, block_sparse)
    wl, wr = widths(left, right)
    # the tile and split choice only affects speed: under dynamic shapes it uses the size hints (no guards)
    hrows, hlk, hbh = hint(rows), hint(lk), hint(b * hkv)
    cfg = config or pick("fwd", hrows, hlk, hbh, d, dv, elem, spec, mask_elem(mask), groups,
                         (left, right) if has_window or is_causal else (-1, -1))
    # the keys one program visits, which splits share: a two-sided band bounds them whatever the shapes
    keys = lk
    if has_window and left >= 0 and right >= 0:
        keys = (cfg.block_m - 1) // groups + 1 + wl + wr + cfg.block_n
    hkeys = min(hlk, hint(keys))
    n_split = 1 if block_sparse else min(splits or num_splits(cfg, hrows, hkeys, hbh, spec),
                                         max(1, triton.cdiv(hkeys, cfg.block_n)))
    # splits past the end of a shorter K/V (or band) get no keys; the combine gives them weight 0
    split_len = triton.cdiv(triton.cdiv(keys, n_split), cfg.block_n) * cfg.block_n
    m, m_strides, mask_kind, fill2 = _mask_args(mask, mask_fill, q, b, h, lq, lk, block_sparse)
    maps = _tile_maps(block_sparse, mask, b, h, hkv, lq, lk, cfg, left, right, tile_map)
    tmap, t_strides = _map_args(maps.rows if maps else None, q)
    _, qk_scale, cap_scale, softcap2 = _scalars(q, scale, softcap)
    out = q.new_empty(b, lq, h, dv).transpose(1, 2)
    stats = torch.empty(b, h, lq, 2, dtype=torch.float32, device=q.device)
    if n_split > 1:
        part = torch.empty(n_split, b, h, lq, dv, dtype=torch.float32, device=q.device)
        part_stats = torch.empty(n_split, b, h, lq, 2, dtype=torch.float32, device=q.device)
        dst, dst_stats, o_strides, ls = part, part_stats, part.stride(), part_stats.stride(0)
    else:
        dst, dst_stats, o_strides, ls = out, stats, (0, *out.stride()), 0
    bd, bdv = pow2(d), pow2(dv)
    grid = (triton.cdiv(rows, cfg.block_m), b * hkv, n_split)
    launch(_fwd_kernel)[grid](
        q, k, v, m, q if seed is None else seed, _nonfinite(v) if is_causal else q, _alibi_arg(alibi, q), tmap,
        sk, dst, dst_stats, *q.stride(), *k.stride(), *v.stride(), *m_strides, *t_strides, *s_strides, *o_strides,
        ls,
        h, lq, lk, split_len, wl, wr, int(window_pad), qk_scale, cap_scale, softcap2, fill2, float(dropout_p),
        GROUPS=groups, HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_D=bd, BLOCK_DV=bdv, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, IS_CAUSAL=is_causal, HAS_WINDOW=has_window, BLOCK_SPARSE=block_sparse,
        MASK_KIND=mask_kind, HAS_SOFTCAP=bool(softcap), HAS_ALIBI=alibi is not None, HAS_DROPOUT=dropout_p > 0,
        EVEN_M=rows % cfg.block_m == 0, EVEN_N=lk % cfg.block_n == 0, EVEN_D=(d == bd and dv == bdv),
        PRECISION=precision(q.dtype), HAS_SINKS=sinks is not None, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    if n_split > 1:
        launch(_combine_kernel)[(b * h * lq,)](
            part, part_stats, out, stats, *out.stride(), h, lq, b * h * lq, n_split,
            HEAD_DIM_V=dv, BLOCK_DV=bdv, BLOCK_S=max(2, triton.next_power_of_2(n_split)), num_warps=4)
    return out, stats


def _sink_args(sinks, q):
    """(the sinks as an fp32 (1 | B, H) tensor on q's device, or q as a dummy pointer; its (batch, head) strides)."""
    if sinks is None:
        return q, (0, 0)
    why = sink_error(sinks, q.shape[0], q.shape[1], q.dtype)
    if why:
        raise ValueError(f"attnfuse flash: {why}")
    table = sink_table(sinks, q.shape[0], q.shape[1], torch.float32).to(q.device)
    return table, (table.stride(0) if table.shape[0] > 1 else 0, table.stride(1))


def _sink_grad(sinks, stats, delta):
    """d sink = -sum_i P_sink(i) * delta_i, with P_sink = exp2(sink * log2(e) - m - log2(l)) from the saved
    statistics (they include the sink) and delta_i = rowsum(dO * O)."""
    table = sink_table(sinks, stats.shape[0], stats.shape[1], torch.float32).to(stats.device)
    p_sink = torch.exp2(table[:, :, None] * LOG2E - stats[..., 0] - stats[..., 1])
    return sink_grad(-(p_sink * delta).sum(-1), sinks)


def _check_window_pad(window_pad, window_size, causal, q, k, alibi, block_sparse) -> None:
    if window_pad:
        why = window_pad_error(*window_size, causal, q.shape[-2], k.shape[-2], alibi=alibi is not None,
                               block_sparse=block_sparse)
        if why:
            raise ValueError(f"attnfuse flash: {why}")


def _dead_rows_nan(stats, dv):
    """A row with no visible key is NaN in the forward, and eager's dV = P^T dO sums its NaN probabilities into
    every key of its K/V head; the band and block-sparse kernels skip most of those keys' tiles, so the NaN
    is written here.  (Its masked scores get no gradient, as under eager's masked_fill: dQ/dK stay finite.)"""
    b, hkv = dv.shape[:2]
    dead = torch.isneginf(stats.select(-1, 0)).reshape(b, hkv, -1).any(-1)
    dv.masked_fill_(dead.reshape(b, hkv, 1, 1), float("nan"))


def backward(grad_out, q, k, v, out, stats, mask=None, seed=None, *, scale=None, causal=False, softcap=0.0,
             dropout_p=0.0, mask_fill=None, mask_grad=False, deterministic=True,
             config: TileConfig | None = None, alibi: torch.Tensor | None = None,
             window_size: tuple[int, int] = (-1, -1),
             block_sparse: bool = False, tile_map=None, window_pad: bool = False, sinks: torch.Tensor | None = None):
    """(dq, dk, dv, dmask or None[, dsinks]); ``dsinks`` (`_sink_grad`) only when ``sinks`` is given: ``stats``
    include the sink, whose ``dp`` is 0, so the kernels' dS of every real key is unchanged.
    ``deterministic`` computes dQ in its own pass instead of fp32 atomics.
    ``alibi``/``window``/``block_sparse``/``tile_map`` as in `forward` (a block-sparse mask is a constant: no
    ``mask_grad``).  ``window_pad`` changes nothing here: ``stats`` already count the padded keys, whose
    ``dp = dO . 0`` is 0, so ``delta = rowsum(O * dO)`` and every real key's dS are unchanged."""
    block_sparse = block_sparse or tile_map is not None
    _check_window_pad(window_pad, window_size, causal, q, k, alibi, block_sparse)
    if block_sparse and mask_grad:
        raise ValueError("attnfuse flash: a block-sparse mask is a constant and gets no gradient (mask_grad=True)")
    b, h, lq, d = q.shape
    hkv, lk, dv_ = k.shape[1], k.shape[2], v.shape[-1]
    d, dv_, groups = int(d), int(dv_), int(h // hkv)
    elem = q.element_size()
    rows = lq * groups
    spec = spec_for(q)
    is_causal, has_window, left, right = _band_mode(window_size, causal, block_sparse)
    cfg = config or pick("bwd", hint(rows), hint(lk), hint(b * hkv), d, dv_, elem, spec, mask_elem(mask),
                         groups, (left, right) if has_window or is_causal else (-1, -1))
    m, m_strides, mask_kind, fill2 = _mask_args(mask, mask_fill, q, b, h, lq, lk, block_sparse)
    maps = _tile_maps(block_sparse, mask, b, h, hkv, lq, lk, cfg, left, right, tile_map)
    sm_scale, qk_scale, cap_scale, softcap2 = _scalars(q, scale, softcap)
    bd, bdv = pow2(d), pow2(dv_)
    delta = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
    launch(_bwd_preprocess)[(triton.cdiv(lq, 64), b * h)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), h, lq,
        HEAD_DIM_V=dv_, BLOCK_DV=bdv, BLOCK_M=64, num_warps=4)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    separate_dq = deterministic or mask_grad
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if separate_dq else torch.zeros(
        q.shape, dtype=torch.float32, device=q.device)
    common = dict(GROUPS=groups, HEAD_DIM=d, HEAD_DIM_V=dv_, BLOCK_D=bd, BLOCK_DV=bdv, BLOCK_M=cfg.block_m,
                  BLOCK_N=cfg.block_n, IS_CAUSAL=is_causal, HAS_WINDOW=has_window, BLOCK_SPARSE=block_sparse,
                  MASK_KIND=mask_kind, HAS_SOFTCAP=bool(softcap), HAS_ALIBI=alibi is not None,
                  HAS_DROPOUT=dropout_p > 0, EVEN_M=rows % cfg.block_m == 0, EVEN_N=lk % cfg.block_n == 0,
                  PRECISION=precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    sd = q if seed is None else seed
    al = _alibi_arg(alibi, q)
    scalars = (h, lq, lk, *widths(left, right), sm_scale, qk_scale, cap_scale, softcap2, fill2, float(dropout_p))
    cmap, c_strides = _map_args(maps.cols if maps else None, q)
    launch(_bwd_dkdv_kernel)[(triton.cdiv(lk, cfg.block_n), b * hkv)](
        q, k, v, m, sd, al, cmap, grad_out, stats, delta, dq, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *m_strides, *c_strides, *grad_out.stride(), *dq.stride(),
        *dk.stride(), *dv.stride(), *scalars, ATOMIC_DQ=not separate_dq, **common)
    dm = None
    if separate_dq:
        dm = torch.zeros(b, h, lq, lk, dtype=torch.float32, device=q.device) if mask_grad else None
        rmap, r_strides = _map_args(maps.rows if maps else None, q)
        launch(_bwd_dq_kernel)[(triton.cdiv(rows, cfg.block_m), b * hkv)](
            q, k, v, m, sd, al, rmap, grad_out, stats, delta, dq, q if dm is None else dm,
            *q.stride(), *k.stride(), *v.stride(), *m_strides, *r_strides, *grad_out.stride(), *dq.stride(),
            *scalars, MASK_GRAD=mask_grad, **common)
    else:
        dq = dq.to(q.dtype)
    if has_window or block_sparse:
        _dead_rows_nan(stats, dv)
    if dm is not None:
        dm = sum_to(dm, mask.shape).to(mask.dtype)
    if sinks is not None:
        return dq, dk, dv, dm, _sink_grad(sinks, stats, delta)
    return dq, dk, dv, dm


class _Flash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, seed, kwargs, deterministic, config):
        out, stats = forward(q, k, v, mask, seed, config=config, **kwargs)
        ctx.save_for_backward(q, k, v, out, stats, mask, seed)
        ctx.kwargs, ctx.deterministic, ctx.config = kwargs, deterministic, config
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, stats, mask, seed = ctx.saved_tensors
        mask_grad = mask is not None and ctx.needs_input_grad[3]
        kwargs = {key: val for key, val in ctx.kwargs.items() if key != "splits"}
        dq, dk, dv, dm = backward(grad, q, k, v, out, stats, mask, seed, mask_grad=mask_grad,
                                  deterministic=ctx.deterministic, config=ctx.config, **kwargs)
        return dq, dk, dv, dm, None, None, None, None


def autograd_attention(family: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          seed: int | torch.Tensor | None, deterministic: bool | None, config: TileConfig | None,
          **kwargs) -> torch.Tensor:
    """Validate, settle the dropout seed and run `forward`/`backward` under autograd with ``kwargs``: the body of
    every exact kernel family's ``attention`` (``family`` names it in error messages).  CPU tensors outside the
    Triton interpreter (or in a dtype / head dim the kernels do not take) run the op's CPU implementation
    instead, with the same keywords (`attnfuse.kernels._family`)."""
    who = f"attnfuse.kernels.{family}.attention"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{who}: q, k, v must be 4-D (batch, heads, seqlen, head_dim)")
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{who}: need q heads divisible by k heads, equal k/v heads and equal q/k head dims; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{who}: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    dropout_p = kwargs.get("dropout_p", 0.0)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{who}: dropout_p must be in [0, 1); got {dropout_p}")
    alibi = kwargs.get("alibi")
    if alibi is not None and alibi.requires_grad:
        raise ValueError(f"{who}: ALiBi slopes are constants and get no gradient; pass alibi.detach()")
    if dropout_p == 0:
        seed = None  # unused; an int seed would also reach save_for_backward, which takes tensors only
    elif not isinstance(seed, torch.Tensor):
        seed = torch.tensor(int(torch.randint(0, 2**62, ())) if seed is None else seed, dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device=q.device, dtype=torch.int64).reshape(())
    if not _family.triton_runs(q, k, v, who):
        return _family.exact_on_cpu(q, k, v, mask, seed, **kwargs)
    return _Flash.apply(q, k, v, mask, seed, kwargs, deterministic is not False, config)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
              scale: float | None = None, causal: bool = False, softcap: float = 0.0, dropout_p: float = 0.0,
              seed: int | torch.Tensor | None = None, mask_fill: float | None = None,
              deterministic: bool | None = None, config: TileConfig | None = None,
              splits: int | None = None) -> torch.Tensor:
    """FlashAttention on ``(batch, heads, seqlen, head_dim)`` tensors, with autograd.

    K/V may have fewer heads (GQA/MQA: ``kv_groups = heads // kv_heads``).  ``mask`` broadcasts to
    ``(batch, heads, q_len, kv_len)``: bool keeps True (others become ``mask_fill``, default -inf),
    float is added to the scores (and gets a gradient if it requires one).  ``seed`` seeds dropout
    (default: drawn from torch's generator).  ``deterministic`` (default True) computes dQ in its own pass,
    bitwise reproducible and, on an H100, 5-9x faster than ``False``, which adds dQ with fp32 atomics inside
    the dK/dV pass (benchmarks/results/bwd-sweep-h100-2026-11-23.json).  ``config``/``splits``
    override the tile choice and the number of key splits.  Sliding windows and ALiBi:
    `attnfuse.kernels.window`; constant block-sparse masks: `attnfuse.kernels.blocksparse`.

    Where it runs (`attnfuse.kernels._family`): CUDA tensors run the Triton kernels; CPU tensors run the op's
    CPU implementation (``torch.ops.attnfuse.attention``: PyTorch's fused CPU kernel or the blocked reference),
    float64 and head dims above 256 included; CPU tensors under ``TRITON_INTERPRET=1`` run the Triton kernels in
    the interpreter.  The keywords mean the same everywhere, except that CPU dropout draws another keep mask
    (same ``dropout_p``) and ``deterministic``/``config``/``splits`` only tune the Triton launch.
    """
    return autograd_attention("flash", q, k, v, mask, seed, deterministic, config, scale=scale, causal=causal,
                              softcap=softcap, dropout_p=dropout_p, mask_fill=mask_fill, splits=splits)
