"""The `@triton.jit` helpers the flash kernels share, forward and backward alike: the scores of one tile (softcap,
ALiBi, mask kinds, causal and band masking), the dropout keep mask (Philox), GQA row packing, ALiBi slopes, and
the causal and band tile bounds.

Inductor copies a user kernel's source with the jit functions it calls, found by name among the kernel module's
globals, but not the other globals of their modules: each kernel module imports these by name at module level
(``from ._jit import scores, ...``), and they use only literals, ``tl`` and each other.  Constants inside them are
literals or ``tl.constexpr`` arguments.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["band_keys", "band_rows", "diagonal", "dropout_keep", "f32", "packed", "philox_word", "scores", "slopes",
           "softcap_tanh"]


@triton.jit
def softcap_tanh(y):
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
def scores(q, kt, rows, heads, cols, b, M, stride_mb, stride_mh, stride_mm, stride_mn, Lq, Lk,
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
        t = softcap_tanh(qk * cap_scale)
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
def f32(x):
    return tl.cast(x, tl.float32)


@triton.jit
def philox_word(seed, c0, c1):
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
def dropout_keep(seed, bh, rows, cols, Lk, dropout_p):
    """Dropout keep mask of one tile: Philox keyed by (seed, batch*head, row*kv_len + col); the word becomes a
    uniform float in [0, 1) as ``triton.language.random.uint_to_uniform_float`` does."""
    c0 = rows[:, None] * Lk + cols[None, :]
    r = philox_word(seed, c0, bh[:, None] + c0 * 0).to(tl.int32, bitcast=True)
    return tl.where(r < 0, ~r, r) * 4.6566127342e-10 >= dropout_p


@triton.jit
def packed(start, b, hkv, H, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr):
    """(query row, head, batch*heads + head) of the BLOCK_M packed pairs r = row * GROUPS + g from ``start``."""
    r = start + tl.arange(0, BLOCK_M)
    heads = hkv * GROUPS + r % GROUPS
    return r // GROUPS, heads, b * H + heads


@triton.jit
def slopes(Alibi, heads, HAS_ALIBI: tl.constexpr):
    """The ALiBi slopes of the rows' heads in log2 units (unused without ALiBi)."""
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + heads) * 1.4426950408889634
    return slope2


@triton.jit
def diagonal(start, Lq, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Causal key bounds of the packed rows from ``start``: keys below the first bound are visible to
    every row (whole tiles), keys from the second on to none."""
    row_lo = start // GROUPS
    row_hi = tl.minimum((start + BLOCK_M - 1) // GROUPS, Lq - 1)
    return (row_lo + 1) // BLOCK_N * BLOCK_N, row_hi + 1


@triton.jit
def band_keys(start, Lq, Lk, win_left, win_right, split, split_len, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr,
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
def band_rows(start_n, Lq, Lk, win_left, win_right, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr,
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
