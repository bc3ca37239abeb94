"""CPU attention that visits only the tiles a band or a block-sparse mask leaves: O(N*w) memory and work.

Same semantics and conventions as `attnfuse.kernels.reference` (read it first), plus the structured masks
of the mask-analysis issue, with ``s = scale * q @ k^T``:

1. softcap ``c``: ``s = c * tanh(s / c)``;
2. ``alibi`` (H,) slopes: ``s[b, h, i, j] += alibi[h] * (j - i)``;
3. dense ``mask``: bool keep (``mask_fill`` elsewhere) or additive, any broadcastable shape;
4. band: key ``j`` is visible from query ``i`` iff ``j >= i - window_left`` and ``j <= i + window_right``
   (-1 = unbounded; ``causal`` caps ``window_right`` at 0); other scores are -inf;
5. softmax in fp32 (fp64 for fp64 inputs); a row without a visible key is NaN; dropout; ``p @ v``;
6. ``window_pad=True`` (a finite band, ``q_len == kv_len``): the textbook ``unfold`` spelling's zero-padded
   keys, `reference.phantom_keys` ``n_pad(i)`` keys of score 0 and value 0 per row (see
   `attnfuse.kernels.reference`).  They are never materialized: the softmax of a row starts from
   ``max(row max, 0)`` and adds ``n_pad * exp(-max)`` to its denominator; the backward is eager's softmax
   backward on those probabilities (a phantom's ``dp`` is 0, so it adds nothing to ``rowsum(p * dp)``).
7. ``sinks`` (one logit per head, see `attnfuse.kernels.reference`): one more key per row, of score
   ``sink[b, h]`` and value 0, never materialized either: the row max starts from the sink and the
   denominator adds ``exp(sink - max)``; a row with no visible key (a skipped tile included) is 0, not NaN.

Why tiles and not the reference's query blocks: the reference multiplies every query block by every key,
so a band of width w still costs O(N^2) time, and a long row block O(N) memory per query.  Here queries
are cut into tiles of ``BLOCK_M`` rows and keys into tiles of ``BLOCK_N``; a tile map says which key tiles
each query tile visits (those meeting the band and, with ``block_sparse=True``, not empty in the mask),
and which of them need an elementwise mask.  Query tiles are sorted by how many key tiles they visit and
batched into chunks of at most ``_CHUNK_ELEMS`` scores; a chunk gathers its key tiles (``index_select``,
one copy of O(chunk) size) and runs one batched matmul, one softmax and one matmul, so Python runs a few
dozen ops per chunk, not per tile.  Memory is O(N*D) for the inputs' working copies plus O(chunk); a
chunk holds at least one query tile, so without a window (or with a one-sided one) it is O(BLOCK_M * N).

GQA never repeats K/V: the ``kv_groups`` query heads that share a K/V head are stacked as rows of one
tile ((B, H_kv, tiles, groups * BLOCK_M, D)), so they multiply the same gathered keys.

``block_sparse=True`` takes ``mask`` as a constant: its tiles are classified once (cached per tensor
identity, ``_version`` and tile size) as empty (every entry masked: skipped), full (every entry keeps
with no bias: computed without reading the mask) or partial (the mask is read).  A bool mask's entries
count as masked only when ``mask_fill`` is -inf or at most the dtype's ``finfo.min``; an additive mask's
when they are -inf or at most ``finfo.min`` of its dtype (a skipped entry behaves as -inf, which only
differs from such a fill in rows that have no other key: the op layer's business).

The backward recomputes the scores chunk by chunk and uses eager's own softmax backward
(``aten._softmax_backward_data``), as the reference does, for its accuracy.  Dropout draws one keep mask
per chunk from a generator seeded by ``(seed, chunk)``; forward and backward build the same chunks.

Deviation from eager, as in every tile-skipping kernel: entries in skipped tiles are never computed, so
NaN/Inf in K or V at keys a query cannot see do not reach that query's gradient.

Layout: `forward` and `backward` here; `_tiling` the tile sizes, mask tile kinds and the plan of chunks;
`_context` the inputs in tile layout and the per-chunk steps both passes share.
"""

from __future__ import annotations

import math

import torch

from ..reference import sink_grad
from . import _tiling as tiling
from ._context import Ctx, unrows

__all__ = ["backward", "forward"]


def forward(q, k, v, mask=None, seed=0, *, scale, causal=False, softcap=0.0, kv_groups=1, dropout_p=0.0,
            mask_fill=float("-inf"), alibi=None, window_left=-1, window_right=-1, block_sparse=False,
            window_pad=False, sinks=None):
    """Tiled attention forward; see the module docstring.  Returns (B, H, Lq, Dv) laid out as (B, Lq, H, Dv)."""
    ctx = Ctx(q, k, v, mask, alibi, scale=scale, causal=causal, softcap=softcap, kv_groups=kv_groups,
               dropout_p=dropout_p, mask_fill=mask_fill, window_left=window_left, window_right=window_right,
               block_sparse=block_sparse, window_pad=window_pad, sinks=sinks)
    plan, b, lq = ctx.plan, q.shape[0], q.shape[2]
    # (B, tiles, BLOCK_M, H_kv, groups, Dv): the output layout, tiled
    out = q.new_empty(b, plan.nqt, tiling.BLOCK_M, ctx.hkv, ctx.g, ctx.dv, dtype=ctx.ct)
    if plan.dead_tiles:  # rows that see no key: NaN as eager's softmax, or 0 next to a sink
        out.fill_(math.nan if sinks is None else 0.0)
    for index, c in enumerate(plan.chunks):
        s, _, _ = ctx.scores(c, ctx.take(ctx.q, c), ctx.gather(ctx.k, c))
        p = ctx.softmax(s, c)
        del s
        if dropout_p > 0:
            p = p * ctx.keep(seed, index, p.shape) / (1 - dropout_p)
        o = torch.matmul(p.flatten(3, 4), ctx.gather(ctx.v, c))  # (B, H_kv, n, groups * BLOCK_M, Dv)
        o = o.view(b, ctx.hkv, -1, ctx.g, tiling.BLOCK_M, ctx.dv).permute(0, 2, 4, 1, 3, 5)
        if c.span is not None:
            out[:, c.span] = o
        else:
            out[:, c.rows] = o
    out = out.view(b, plan.nqt * tiling.BLOCK_M, ctx.h, ctx.dv)[:, :lq]
    result = torch.empty(b, lq, ctx.h, ctx.dv, dtype=q.dtype, device=q.device)
    result.copy_(out)
    return result.transpose(1, 2)


def backward(grad_out, q, k, v, mask=None, seed=0, *, scale, causal=False, softcap=0.0, kv_groups=1,
             dropout_p=0.0, mask_fill=float("-inf"), alibi=None, window_left=-1, window_right=-1,
             block_sparse=False, mask_grad=False, window_pad=False, sinks=None):
    """Gradients (dq, dk, dv, dmask or None[, dsinks]) of `forward`, recomputing the scores chunk by chunk;
    ``dsinks`` (``sinks``' shape and dtype) only when ``sinks`` is given."""
    ctx = Ctx(q, k, v, mask, alibi, scale=scale, causal=causal, softcap=softcap, kv_groups=kv_groups,
               dropout_p=dropout_p, mask_fill=mask_fill, window_left=window_left, window_right=window_right,
               block_sparse=block_sparse, window_pad=window_pad, sinks=sinks)
    plan = ctx.plan
    do = ctx.by_tile(grad_out)
    dq = torch.zeros_like(ctx.q)
    dk, dv = torch.zeros_like(ctx.k), torch.zeros_like(ctx.v)
    dmask = None
    if mask_grad:
        dmask = torch.zeros(ctx.mask.shape, dtype=ctx.ct)
        mb, mh, mq, mk = dmask.shape
    # float64 accumulator: a sum over every query row, each term a rowsum; eager sums its own order in float32
    dsink = None if sinks is None else torch.zeros(ctx.b, ctx.hkv, ctx.g, dtype=torch.float64)
    for index, c in enumerate(plan.chunks):
        n, t = c.tiles.shape
        qc, kc, vc, doc = ctx.take(ctx.q, c), ctx.gather(ctx.k, c), ctx.gather(ctx.v, c), ctx.take(do, c)
        s, tanh, dead = ctx.scores(c, qc, kc)
        p, p_sink = ctx.sunk_softmax(s) if ctx.sink is not None else (ctx.softmax(s, c), None)
        del s
        pad = ctx.pad_rows(c)
        if pad is not None:
            p.masked_fill_(pad, 0.0)  # padding rows may have no visible key: NaN must not reach dk / dv
            if p_sink is not None:
                p_sink = p_sink.masked_fill(pad, 0.0)
        dp = torch.matmul(doc, vc.transpose(-1, -2)).view(p.shape)
        if dropout_p > 0:
            keep = ctx.keep(seed, index, p.shape) / (1 - dropout_p)
            dv_c = torch.matmul((p * keep).flatten(3, 4).transpose(-1, -2), doc)
            dp.mul_(keep)
        else:
            dv_c = torch.matmul(p.flatten(3, 4).transpose(-1, -2), doc)
        ds = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype)  # the sink's dp is 0: it adds nothing
        if dsink is not None:  # d sink = -P_sink * rowsum(p * dp) (eager's softmax backward at the sink column)
            dsink -= (p_sink.squeeze(-1) * (p * dp).sum(-1)).sum((2, 4), dtype=torch.float64)
        del dp, p
        for cols, m in dead:
            ds[..., cols].masked_fill_(m, 0.0)
        if dmask is not None:
            qi, kj = ctx.positions(c)
            ri, ci = ctx.mask_index(qi, kj)
            g = ds.sum((1, 3)).unsqueeze(1) if mh == 1 else ds.transpose(2, 3).flatten(1, 2)  # (B, mh, n, M, W)
            g = g.sum(0, keepdim=True) if mb == 1 else g
            g = g.sum(3, keepdim=True) if mq == 1 else g
            g = g.sum(4, keepdim=True) if mk == 1 else g
            flat = (ri[:, :, None] * mk + ci[:, None, :]).flatten()
            dmask.view(mb, mh, mq * mk).index_add_(2, flat, g.reshape(mb, mh, -1))
        if softcap:
            ds.mul_(1 - tanh * tanh)
        ds = ds.flatten(3, 4)
        dq_c = torch.matmul(ds, kc)
        if c.span is not None:
            dq[:, :, c.span] = dq_c
        else:
            dq[:, :, c.rows] = dq_c
        dk_c = torch.matmul(ds.transpose(-1, -2), qc).view(ctx.b, ctx.hkv, n * t, tiling.BLOCK_N, ctx.d)
        dk.index_add_(2, c.tiles.flatten(), dk_c)
        dv.index_add_(2, c.tiles.flatten(), dv_c.view(ctx.b, ctx.hkv, n * t, tiling.BLOCK_N, ctx.dv))
    dq = unrows(ctx, dq, plan.lq).mul_(scale)  # scores were taken with scale folded into q
    dk = dk.view(ctx.b, ctx.hkv, -1, ctx.d)[:, :, :plan.lk]
    dv = dv.view(ctx.b, ctx.hkv, -1, ctx.dv)[:, :, :plan.lk]
    if dmask is not None:
        dmask = dmask.view(mask.shape).to(mask.dtype)
    if dsink is not None:
        return (dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(), dmask,
                sink_grad(dsink.reshape(ctx.b, ctx.h), sinks))
    return (dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(), dmask)
