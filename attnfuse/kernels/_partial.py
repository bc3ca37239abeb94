"""One block of attention rows against one block of keys, forward and backward: a ring step
(`attnfuse.parallel`), or one block of K/V formed from factors (`attnfuse.kernels.tpa`).

Rows and keys are described by `Segment`s, runs of contiguous global positions (``(start, stop, global_start)``
over the local rows), so the band (``i - left <= j <= i + right``, -1 = unbounded) is a static question per pair
of segments: `visible` says whether a pair has any visible (row, key), `covered` whether every key is visible
(then no band mask is built).  Everything runs in the compute dtype (float32, float64 for float64 inputs), blocked
over query rows so that one block of scores (at most `SCORE_BLOCK_BYTES`) exists at a time.  Each partial is one
custom op (``attnfuse::ring_partial``, ``attnfuse::ring_partial_backward``, with fake implementations for tracing):
the row-block loop runs inside the op at run time, so a traced graph (dynamo, AOTAutograd) holds one node per
partial, not one per block, and its size does not grow with the sequence.

The forward keeps the softmax statistics unnormalized, as FlashAttention does: ``(acc, m, l)`` with ``m`` the row
max (-inf where every score is -inf), ``l = sum exp(s - m)`` and ``acc = exp(s - m) @ v``; `merge` combines two
such partials.  Keeping ``m`` and ``l`` apart (not ``lse = m + log l``) matters for finite fills: a row whose
scores are all ``finfo.min`` has ``m = finfo.min`` and ``l`` = the key count, which ``m + log l`` would round
away.  The final row is ``acc / l`` (0 / 0 = NaN for a row that sees no key, as eager's softmax).

The backward recomputes ``p = exp(s - m) / l`` with the global statistics and takes ``delta = rowsum(dO * out)``
(the global output): ``ds = p * (dp - delta)``, then the softcap and scale factors; masked scores of a bool mask
are constants (no gradient).  A row that sees no key contributes nothing here (the caller restores eager's NaN).
"""

from __future__ import annotations

import torch

Segment = tuple[int, int, int]  # (local start, local stop, global position of the local start)
SCORE_BLOCK_BYTES = 4 * 2**20  # one block of float32 scores (read at run time, inside the ops)


def right_edge(causal: bool, window_right: int) -> int:
    """The band's right edge with ``causal`` folded in (-1 = unbounded)."""
    if causal:
        return 0 if window_right < 0 else min(window_right, 0)
    return window_right


def visible(rows: Segment, keys: Segment, left: int, right: int) -> bool:
    """Whether some key of ``keys`` is in the band of some row of ``rows`` (static: from positions only)."""
    r0, r1 = rows[2], rows[2] + rows[1] - rows[0] - 1  # first and last global row
    k0, k1 = keys[2], keys[2] + keys[1] - keys[0] - 1
    if r1 < r0 or k1 < k0:
        return False
    return (right < 0 or k0 <= r1 + right) and (left < 0 or k1 >= r0 - left)


def covered(rows: Segment, keys: Segment, left: int, right: int) -> bool:
    """Whether every key of ``keys`` is in the band of every row of ``rows`` (no band mask needed)."""
    r0, r1 = rows[2], rows[2] + rows[1] - rows[0] - 1
    k0, k1 = keys[2], keys[2] + keys[1] - keys[0] - 1
    return (right < 0 or k1 <= r0 + right) and (left < 0 or k0 >= r1 - left)


def expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """K/V heads repeated for their query heads (head ``h`` reads K/V head ``h // groups``)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _row_blocks(q: torch.Tensor, rows: Segment, kv_len: int) -> list[tuple[int, int]]:
    step = max(1, SCORE_BLOCK_BYTES // max(1, q.shape[0] * q.shape[1] * kv_len * 4))
    return [(i, min(i + step, rows[1])) for i in range(rows[0], rows[1], step)]


def _scores(q_blk, k, mask, row_global: int, key_global: int, band: tuple[int, int] | None, *, scale, softcap,
            mask_fill):
    """Scores of a block of rows (global positions from ``row_global``) against keys (from ``key_global``), after
    softcap, key mask and band (None: the whole block is in the band); the tanh for the softcap backward; and
    the out-of-band (row, key) pairs (None where the band covers the block)."""
    s = torch.matmul(q_blk, k.transpose(-2, -1)) * scale
    t = out = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s = t * softcap
    if mask is not None:
        s = s.masked_fill(~mask, mask_fill) if mask.dtype == torch.bool else s + mask
    if band is not None:
        left, right = band
        i = torch.arange(row_global, row_global + s.shape[-2], device=s.device)[:, None]
        j = torch.arange(key_global, key_global + s.shape[-1], device=s.device)[None, :]
        out = torch.zeros(s.shape[-2:], dtype=torch.bool, device=s.device)
        if left >= 0:
            out = out | (j < i - left)
        if right >= 0:
            out = out | (j > i + right)
        s = s.masked_fill(out, float("-inf"))
    return s, t, out


def _key_cols(x: torch.Tensor | None, keys: Segment) -> torch.Tensor | None:
    return None if x is None else x[..., keys[0]:keys[1]]


def partial_forward(q, k, v, mask, rows: Segment, keys: Segment, *, left: int, right: int, scale: float,
                    softcap: float, mask_fill: float):
    """``(acc, m, l)`` of ``q``'s rows ``rows`` against the keys ``keys`` of ``k``/``v`` (already expanded to the
    query heads, compute dtype); ``mask``: None or (B | 1, 1, 1, Lk) over the chunk's keys (bool or compute dtype).
    The caller checks `visible` first.  One ``attnfuse::ring_partial`` op."""
    return tuple(torch.ops.attnfuse.ring_partial(q, k, v, mask, list(rows), list(keys), left, right, float(scale),
                                                 float(softcap), float(mask_fill)))


def _batch(q: torch.Tensor, k: torch.Tensor) -> tuple[int, ...]:
    return tuple(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]))


@torch.library.custom_op("attnfuse::ring_partial", mutates_args=())
def _ring_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, rows: list[int],
                  keys: list[int], left: int, right: int, scale: float, softcap: float,
                  mask_fill: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, keys = tuple(rows), tuple(keys)
    kk, vv = k[..., keys[0]:keys[1], :], v[..., keys[0]:keys[1], :]
    mk = _key_cols(mask, keys)
    band = None if covered(rows, keys, left, right) else (left, right)
    # the results are allocated once and written per block: small allocations kept across blocks would sit
    # between the blocks' freed score buffers and keep glibc from reusing them (RSS grew ~3 score blocks a block)
    batch, n = _batch(q, kk), rows[1] - rows[0]
    acc, m_all = q.new_empty(*batch, n, vv.shape[-1]), q.new_empty(*batch, n)
    l_all = torch.empty_like(m_all)
    for i0, i1 in _row_blocks(q, rows, kk.shape[-2]):
        s, _, _ = _scores(q[..., i0:i1, :], kk, mk, rows[2] + i0 - rows[0], keys[2], band, scale=scale,
                       softcap=softcap, mask_fill=mask_fill)
        r0, r1 = i0 - rows[0], i1 - rows[0]
        m = s.amax(-1)
        m_all[..., r0:r1] = m
        s.sub_(torch.where(m == float("-inf"), 0.0, m)[..., None]).exp_()
        l_all[..., r0:r1] = s.sum(-1)
        acc[..., r0:r1, :] = torch.matmul(s, vv)
        del s, m
    return acc, m_all, l_all


@_ring_partial.register_fake
def _(q, k, v, mask, rows, keys, left, right, scale, softcap, mask_fill):
    batch, n = _batch(q, k), rows[1] - rows[0]
    return q.new_empty(*batch, n, v.shape[-1]), q.new_empty(*batch, n), q.new_empty(*batch, n)


def merge(a, b):
    """Two partials ``(acc, m, l)`` of the same rows over disjoint keys -> the partial over both (no NaN where
    both rows are empty: m = -inf, l = 0)."""
    if a is None:
        return b
    acc_a, m_a, l_a = a
    acc_b, m_b, l_b = b
    m = torch.maximum(m_a, m_b)
    safe = torch.where(m == float("-inf"), 0.0, m)
    c_a, c_b = torch.exp(m_a - safe), torch.exp(m_b - safe)
    return acc_a * c_a[..., None] + acc_b * c_b[..., None], m, l_a * c_a + l_b * c_b


def empty(q: torch.Tensor, rows: Segment, dv: int):
    """The partial over no keys: acc 0, m -inf, l 0."""
    n = rows[1] - rows[0]
    acc = q.new_zeros(*q.shape[:2], n, dv)
    return acc, q.new_full((*q.shape[:2], n), float("-inf")), q.new_zeros(*q.shape[:2], n)


def partial_backward(q, k, v, mask, do, m, rsum, delta, rows: Segment, keys: Segment, *, left: int, right: int,
                     scale: float, softcap: float, mask_fill: float, dead_nan: bool):
    """``(dq, dk, dv)`` of rows ``rows`` against keys ``keys`` (compute dtype, expanded heads; ``dq`` over the rows,
    ``dk``/``dv`` over the keys), with the rows' global statistics ``m``, ``rsum`` and ``delta`` ((B, H, rows)).

    A row that sees no key contributes nothing to ``dv`` (the caller adds eager's NaN to all of its K/V head's);
    with ``dead_nan`` its score gradients are eager's for a NaN softmax row, masked_fill spelling: NaN, then 0 at
    the scores a bool mask or the band replaced (so NaN only where an additive -inf bias killed a key).  One
    ``attnfuse::ring_partial_backward`` op."""
    return tuple(torch.ops.attnfuse.ring_partial_backward(q, k, v, mask, do, m, rsum, delta, list(rows), list(keys),
                                                          left, right, float(scale), float(softcap),
                                                          float(mask_fill), bool(dead_nan)))


@torch.library.custom_op("attnfuse::ring_partial_backward", mutates_args=())
def _ring_partial_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                           do: torch.Tensor, m: torch.Tensor, rsum: torch.Tensor, delta: torch.Tensor,
                           rows: list[int], keys: list[int], left: int, right: int, scale: float, softcap: float,
                           mask_fill: float, dead_nan: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, keys = tuple(rows), tuple(keys)
    kk, vv = k[..., keys[0]:keys[1], :], v[..., keys[0]:keys[1], :]
    mk = _key_cols(mask, keys)
    band = None if covered(rows, keys, left, right) else (left, right)
    batch = _batch(q, kk)  # results allocated once (see `_ring_partial`)
    dq = q.new_empty(*batch, rows[1] - rows[0], k.shape[-1])
    dk, dv = q.new_zeros(*batch, kk.shape[-2], k.shape[-1]), q.new_zeros(*batch, kk.shape[-2], v.shape[-1])
    for i0, i1 in _row_blocks(q, rows, kk.shape[-2]):
        q_blk, do_blk = q[..., i0:i1, :], do[..., i0:i1, :]
        s, t, outside = _scores(q_blk, kk, mk, rows[2] + i0 - rows[0], keys[2], band, scale=scale, softcap=softcap,
                       mask_fill=mask_fill)
        r0, r1 = i0 - rows[0], i1 - rows[0]
        m_blk, l_blk = m[..., r0:r1, None], rsum[..., r0:r1, None]
        dead = l_blk == 0
        p = torch.exp(s - torch.where(dead, 0.0, m_blk)) / torch.where(dead, 1.0, l_blk)
        dv_blk = torch.matmul(p.transpose(-2, -1), do_blk)
        p_ds = torch.where(dead, float("nan"), p) if dead_nan else p
        ds = p_ds * (torch.matmul(do_blk, vv.transpose(-2, -1)) - delta[..., r0:r1, None])
        if mk is not None and mk.dtype == torch.bool:
            ds = ds.masked_fill(~mk, 0.0)  # a masked score is the constant fill
        if dead_nan and outside is not None:
            ds = ds.masked_fill(outside, 0.0)
        if softcap > 0:
            ds = ds * (1 - t * t)
        ds = ds * scale
        dq[..., r0:r1, :] = torch.matmul(ds, kk)
        dk += torch.matmul(ds.transpose(-2, -1), q_blk)
        dv += dv_blk
        del s, t, outside, p, p_ds, ds, dv_blk
    return dq, dk, dv


@_ring_partial_backward.register_fake
def _(q, k, v, mask, do, m, rsum, delta, rows, keys, left, right, scale, softcap, mask_fill, dead_nan):
    batch, n = _batch(q, k), keys[1] - keys[0]
    return (q.new_empty(*batch, rows[1] - rows[0], k.shape[-1]), q.new_empty(*batch, n, k.shape[-1]),
            q.new_empty(*batch, n, v.shape[-1]))
