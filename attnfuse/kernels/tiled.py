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
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref

import torch

from .reference import phantom_keys, sink_grad, sink_table, window_pad_error

BLOCK_M = 64
BLOCK_N = 64
_CHUNK_ELEMS = 2**19  # scores per chunk (2 MiB in fp32; measured fastest of 2**18..2**23 at 16k, window 512)

_EMPTY, _FULL, _PARTIAL = 0, 1, 2
_KIND_CACHE: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as4d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape((1,) * (4 - x.dim()) + tuple(x.shape)) if x.dim() < 4 else x


def _band(causal: bool, left: int, right: int, lq: int, lk: int) -> tuple[int, int]:
    """(left, right) with -1 replaced by a bound that no (i, j) pair reaches, and causal folded in."""
    if causal:
        right = 0 if right < 0 else min(right, 0)
    unbounded = lq + lk + 1
    return (unbounded if left < 0 else left), (unbounded if right < 0 else right)


def _masked_is_neg_inf(mask: torch.Tensor, mask_fill: float, dtype: torch.dtype) -> bool:
    """Whether a bool mask's masked entries act as -inf for inputs of ``dtype`` (so tiles of them may be
    skipped): a fill of at most ``finfo.min`` leaves exp() exactly 0 unless the row has no other key."""
    return mask.dtype != torch.bool or mask_fill <= torch.finfo(dtype).min


def _mask_kinds(mask: torch.Tensor, mask_fill: float, dtype: torch.dtype) -> torch.Tensor:
    """(nqt | 1, nkt | 1) int8 tile kinds (_EMPTY / _FULL / _PARTIAL) of a constant mask, cached.

    A tile is classified over every batch and head the mask has: skipped only if it is empty for all.
    """
    key = (mask._version, tuple(mask.shape), mask.stride(), mask.dtype, mask.data_ptr(), BLOCK_M, BLOCK_N,
           _masked_is_neg_inf(mask, mask_fill, dtype))
    hit = _KIND_CACHE.get(id(mask))
    if hit is not None and hit[0]() is mask and hit[1] == key:
        return hit[2]
    m = _as4d(mask)
    if m.dtype == torch.bool:
        masked = ~m if _masked_is_neg_inf(mask, mask_fill, dtype) else torch.zeros_like(m)
        full = m
    else:
        masked = m <= torch.finfo(m.dtype).min
        full = m == 0
    masked, full = masked.all(1).all(0), full.all(1).all(0)  # (Mq, Mk)
    # Pad to whole tiles with entries that are both "masked" and "full": they do not exist and must not
    # change a tile's verdict.
    rows, cols = masked.shape
    tm, tn = (BLOCK_M if rows > 1 else 1), (BLOCK_N if cols > 1 else 1)
    pad = (0, -cols % tn, 0, -rows % tm)
    masked = torch.nn.functional.pad(masked, pad, value=True)
    full = torch.nn.functional.pad(full, pad, value=True)
    shape = (masked.shape[0] // tm, tm, masked.shape[1] // tn, tn)
    empty_t, full_t = masked.view(shape).all(3).all(1), full.view(shape).all(3).all(1)
    kinds = torch.where(empty_t, _EMPTY, torch.where(full_t, _FULL, _PARTIAL)).to(torch.int8)
    _KIND_CACHE[id(mask)] = (weakref.ref(mask, functools.partial(_forget, id(mask))), key, kinds)
    return kinds


def _forget(mask_id: int, _ref: weakref.ref) -> None:
    _KIND_CACHE.pop(mask_id, None)


@dataclasses.dataclass(frozen=True)
class _Chunk:
    rows: torch.Tensor  # (n,) query tile ids
    span: slice | None  # the same rows as a slice when they are consecutive (no gather needed)
    tiles: torch.Tensor  # (n, T) key tile ids; pad slots hold the zero tile nkt
    band: tuple[slice, ...]  # score columns (runs of slots) that need the elementwise band / key-range mask
    partial: torch.Tensor | None  # block-sparse: (n, T) slots that read the mask (None: all or none do)
    pad_rows: bool  # holds the last query tile, whose rows beyond lq are padding


@dataclasses.dataclass(frozen=True)
class _Plan:
    lq: int
    lk: int
    left: int
    right: int
    nqt: int
    nkt: int
    chunks: list[_Chunk]
    dead_tiles: bool  # some query tile visits no key tile: its rows are NaN


def _plan(lq, lk, rows_per_tile, causal, window_left, window_right, mask, mask_fill, block_sparse,
          dtype) -> _Plan:
    """Which key tiles each query tile visits, and the chunks that batch them; built the same way by
    forward and backward (the dropout masks depend on it).

    A band's tiles are a range per query tile, computed in closed form (O(N / BLOCK_M) work and memory);
    only a block-sparse mask, itself N x N, gets an (nqt, nkt) tile map.
    """
    left, right = _band(causal, window_left, window_right, lq, lk)
    nqt, nkt = -(-lq // BLOCK_M), -(-lk // BLOCK_N)
    qt = torch.arange(nqt)
    r0, r1 = qt * BLOCK_M, torch.clamp((qt + 1) * BLOCK_M, max=lq) - 1  # real rows of each query tile
    lo = torch.div(r0 - left, BLOCK_N, rounding_mode="floor").clamp(min=0)
    hi = torch.div(r1 + right, BLOCK_N, rounding_mode="floor").clamp(max=nkt - 1)
    counts = (hi - lo + 1).clamp(min=0)
    slots = mask_partial = None
    if block_sparse and mask is not None:
        kt = torch.arange(nkt)
        kinds = _mask_kinds(mask, mask_fill, dtype).expand(nqt, nkt)
        visit = (kt >= lo[:, None]) & (kt <= hi[:, None]) & (kinds != _EMPTY)
        counts = visit.sum(1)
        slots = torch.argsort((~visit).to(torch.uint8), dim=1, stable=True)  # visited tiles first, ascending
        mask_partial = kinds == _PARTIAL
    order = torch.argsort(counts, stable=True)
    order = order[counts[order] > 0].tolist()
    counts_l = counts.tolist()
    chunks, start = [], 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and (stop + 1 - start) * counts_l[order[stop]] * rows_per_tile * BLOCK_N \
                <= _CHUNK_ELEMS:
            stop += 1
        rows = torch.tensor(order[start:stop])
        t = counts_l[order[stop - 1]]
        valid = torch.arange(t) < counts[rows][:, None]
        tiles = slots[rows, :t] if slots is not None else lo[rows][:, None] + torch.arange(t)
        tiles = torch.where(valid, tiles, nkt)
        chunks.append(_chunk(rows, tiles, valid, left, right, lq, lk, mask_partial, nqt))
        start = stop
    return _Plan(lq, lk, left, right, nqt, nkt, chunks, len(order) < nqt)


def _chunk(rows, tiles, valid, left, right, lq, lk, mask_partial, nqt) -> _Chunk:
    ids = rows.tolist()
    span = slice(ids[0], ids[-1] + 1) if ids == list(range(ids[0], ids[0] + len(ids))) else None
    # a slot needs the elementwise band mask unless every (row, key) pair of its tile is inside the band;
    # keys beyond lk (the last tile's zero padding, and pad slots) always need it.  In a band chunk only
    # the first and last slots do: the others are computed without any mask.
    r0, r1 = rows[:, None] * BLOCK_M, torch.clamp((rows[:, None] + 1) * BLOCK_M, max=lq) - 1
    c0, c1 = tiles * BLOCK_N, (tiles + 1) * BLOCK_N - 1
    need = ((c1 - r0 > right) | (c0 - r1 < -left) | (c1 >= lk) | ~valid).any(0).tolist()
    band: list[slice] = []  # runs of needy slots, as score columns
    for t, needed in enumerate(need):
        if needed and band and band[-1].stop == t * BLOCK_N:
            band[-1] = slice(band[-1].start, (t + 1) * BLOCK_N)
        elif needed:
            band.append(slice(t * BLOCK_N, (t + 1) * BLOCK_N))
    partial = None
    if mask_partial is not None:
        partial = mask_partial[rows[:, None], tiles.clamp(max=mask_partial.shape[1] - 1)] & valid
        partial = partial if bool(partial.any()) else None
    return _Chunk(rows, span, tiles, tuple(band), partial, nqt - 1 in ids)


class _Ctx:
    """Inputs in tile layout and the per-call constants both passes need."""

    def __init__(self, q, k, v, mask, alibi, *, scale, causal, softcap, kv_groups, dropout_p, mask_fill,
                 window_left, window_right, block_sparse, window_pad=False, sinks=None):
        if window_pad and sinks is not None:
            raise ValueError("attnfuse tiled attention: sinks do not combine with window_pad=True; allowed: one of "
                             "them")
        if window_pad:
            why = window_pad_error(window_left, window_right, causal, q.shape[2], k.shape[2], alibi=alibi is not None,
                                   block_sparse=block_sparse)
            if why:
                raise ValueError(f"attnfuse tiled attention: {why}")
        self.window_pad = window_pad
        self.ct = ct = _compute_dtype(q.dtype)
        self.b, self.h, lq, self.d = q.shape
        self.hkv, lk, self.dv = k.shape[1], k.shape[2], v.shape[-1]
        self.g = kv_groups
        self.softcap, self.dropout_p, self.mask_fill = softcap, dropout_p, mask_fill
        self.mask = None if mask is None else _as4d(mask)
        if self.mask is not None:
            mb, mh = self.mask.shape[:2]
            if mb not in (1, self.b) or mh not in (1, self.h):
                raise ValueError(f"tiled attention: mask of shape {tuple(mask.shape)} does not broadcast to "
                                 f"(batch={self.b}, heads={self.h}, {lq}, {lk})")
        self.block_sparse = block_sparse and mask is not None
        self.plan = _plan(lq, lk, self.h * self.b * BLOCK_M, causal, window_left, window_right, mask, mask_fill,
                          self.block_sparse, q.dtype)
        self.q = self.by_tile(q).mul_(scale)
        self.k, self.v = self._tiles(k), self._tiles(v)
        self.sink = None
        if sinks is not None:  # (1 | B, H) -> (1 | B, H_kv, 1, groups, 1, 1), against the scores
            table = sink_table(sinks, self.b, self.h, ct)
            self.sink = table.reshape(table.shape[0], self.hkv, 1, self.g, 1, 1)
        self.alibi = None
        if alibi is not None:
            self.alibi = alibi.to(ct).view(1, self.hkv, 1, self.g, 1, 1)

    def by_tile(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, L, D) -> (B, H_kv, tiles, groups * BLOCK_M, D) in the compute dtype, zero-padded."""
        b, _, lq, d = x.shape
        nqt = self.plan.nqt
        out = x.new_zeros(b, self.hkv, nqt, self.g, BLOCK_M, d, dtype=self.ct)
        dst, src = out.permute(0, 1, 3, 2, 4, 5), x.unflatten(1, (self.hkv, self.g))  # (B, H_kv, groups, ...)
        whole = lq // BLOCK_M
        dst[:, :, :, :whole].copy_(src[:, :, :, :whole * BLOCK_M].unflatten(3, (whole, BLOCK_M)))
        if lq > whole * BLOCK_M:
            dst[:, :, :, whole, :lq - whole * BLOCK_M].copy_(src[:, :, :, whole * BLOCK_M:])
        return out.view(b, self.hkv, nqt, self.g * BLOCK_M, d)

    def _tiles(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, L, D) -> (B, H_kv, tiles + 1, BLOCK_N, D), zero-padded; the extra tile feeds pad slots."""
        b, hkv, lk, d = x.shape
        out = x.new_zeros(b, hkv, (self.plan.nkt + 1) * BLOCK_N, d, dtype=self.ct)
        out[:, :, :lk].copy_(x)
        return out.view(b, hkv, self.plan.nkt + 1, BLOCK_N, d)

    def take(self, x: torch.Tensor, c: _Chunk) -> torch.Tensor:
        if c.span is not None:
            return x[:, :, c.span]
        return x.view(self.b * self.hkv, x.shape[2], -1).index_select(1, c.rows).view(*x.shape[:2], -1, *x.shape[3:])

    def gather(self, x: torch.Tensor, c: _Chunk) -> torch.Tensor:
        # index_select on dim 1 of a 3-D view: ~10x faster than on dim 2 of the 5-D tensor (PyTorch 2.x CPU)
        n, t = c.tiles.shape
        flat = x.view(self.b * self.hkv, x.shape[2], -1).index_select(1, c.tiles.flatten())
        return flat.view(self.b, self.hkv, n, t * BLOCK_N, x.shape[-1])

    def positions(self, c: _Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute query rows (n, BLOCK_M) and key columns (n, T * BLOCK_N) of a chunk."""
        qi = c.rows[:, None] * BLOCK_M + torch.arange(BLOCK_M)
        kj = (c.tiles[:, :, None] * BLOCK_N + torch.arange(BLOCK_N)).flatten(1)
        return qi, kj

    def by_kv_head(self, x: torch.Tensor) -> torch.Tensor:
        """(mb, 1 | H, n, X, Y) -> (mb, 1 | H_kv, n, 1 | groups, X, Y), to broadcast against the scores."""
        if x.shape[1] == 1:
            return x.unsqueeze(3)
        return x.unflatten(1, (self.hkv, self.g)).transpose(2, 3)

    def mask_index(self, qi: torch.Tensor, kj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column indices into the mask (clamped; size-1 broadcast dims read index 0)."""
        mq, mk = self.mask.shape[-2:]
        ri = qi.clamp(max=mq - 1) if mq > 1 else qi.new_zeros(qi.shape[0], 1)
        ci = kj.clamp(max=mk - 1) if mk > 1 else kj.new_zeros(kj.shape[0], 1)
        return ri, ci

    def mask_values(self, c: _Chunk, qi: torch.Tensor, kj: torch.Tensor) -> torch.Tensor:
        """The mask entries of a chunk, (mb, mh, n, BLOCK_M | 1, T * BLOCK_N | 1).

        Block-sparse chunks read only their partial tiles; full tiles get the neutral value.
        """
        ri, ci = self.mask_index(qi, kj)
        if c.partial is None:
            return self.mask[:, :, ri[:, :, None], ci[:, None, :]]
        n, t = c.tiles.shape
        neutral = True if self.mask.dtype == torch.bool else 0.0
        mb, mh = self.mask.shape[:2]
        out = self.mask.new_full((mb, mh, n, ri.shape[1], t, BLOCK_N), neutral)
        pa, pt = c.partial.nonzero(as_tuple=True)
        cols = ci.expand(n, t * BLOCK_N).view(n, t, BLOCK_N)[pa, pt]  # (P, BLOCK_N)
        vals = self.mask[:, :, ri[pa][:, :, None], cols[:, None, :]]  # (mb, mh, P, BLOCK_M | 1, BLOCK_N)
        out[:, :, pa, :, pt, :] = vals.permute(2, 0, 1, 3, 4)
        return out.flatten(4)

    def scores(self, c: _Chunk, qc: torch.Tensor, kc: torch.Tensor):
        """Masked scores (B, H_kv, n, groups, BLOCK_M, T * BLOCK_N), the softcap's tanh (or None), and the
        entries whose gradient is structurally zero (out of band, beyond lk, masked by a bool mask) as a list
        of (score columns, bool mask over them)."""
        s = torch.matmul(qc, kc.transpose(-1, -2))
        s = s.view(*s.shape[:3], self.g, BLOCK_M, s.shape[-1])
        t = None
        if self.softcap:
            t = torch.tanh(s.div_(self.softcap))
            s = torch.mul(t, self.softcap)
        qi, kj = self.positions(c)
        if self.alibi is not None:
            s.add_(self.alibi * (kj[:, None, None, :] - qi[:, None, :, None]).to(self.ct))
        dead = []
        if self.mask is not None and (c.partial is not None or not self.block_sparse):
            m = self.by_kv_head(self.mask_values(c, qi, kj))
            if m.dtype == torch.bool:
                dead.append((slice(None), ~m))
                s.masked_fill_(dead[-1][1], self.mask_fill)
            else:
                s.add_(m)
        for cols in c.band:
            rel = kj[:, None, cols] - qi[:, :, None]
            out = ((rel < -self.plan.left) | (rel > self.plan.right) | (kj[:, None, cols] >= self.plan.lk))[:, None]
            s[..., cols].masked_fill_(out, -math.inf)
            dead.append((cols, out))
        return s, t, dead

    def keep(self, seed: int, index: int, shape: torch.Size) -> torch.Tensor:
        gen = torch.Generator()
        gen.manual_seed((seed * 1_000_003 + index) % (2**63))
        return torch.rand(shape, generator=gen) >= self.dropout_p

    def softmax(self, s: torch.Tensor, c: _Chunk) -> torch.Tensor:
        """softmax over the chunk's keys, plus a padded window's phantom keys (score 0, value 0) per row."""
        if self.sink is not None:
            return self.sunk_softmax(s)[0]
        if not self.window_pad:
            return torch.softmax(s, dim=-1)
        qi, _ = self.positions(c)
        n = phantom_keys(qi, self.plan.lq, self.plan.left, self.plan.right).to(self.ct)[:, None, :, None]
        m = torch.amax(s, dim=-1, keepdim=True)
        m = torch.where(n > 0, m.clamp(min=0.0), m)  # (n, 1, BLOCK_M, 1) broadcasts over (B, H_kv, n, g, M, 1)
        p = s.sub_(m).exp_()
        # rows with phantoms have m >= 0; the clamp keeps exp(-m) finite (0 * inf) in the others
        return p.div_(p.sum(-1, keepdim=True).add_(n * torch.exp(-m.clamp(min=0.0))))

    def sunk_softmax(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(p over the chunk's keys, the sink's probability (..., M, 1)): softmax over ``[s, sink]``."""
        m = torch.maximum(torch.amax(s, dim=-1, keepdim=True), self.sink)  # the sink is finite: so is m
        p = s.sub_(m).exp_()
        e = torch.exp(self.sink - m)
        denom = p.sum(-1, keepdim=True).add_(e)
        return p.div_(denom), e.div_(denom)

    def pad_rows(self, c: _Chunk) -> torch.Tensor | None:
        """(n, 1, BLOCK_M, 1) rows beyond lq, or None when the chunk has none."""
        if not c.pad_rows or self.plan.lq % BLOCK_M == 0:
            return None
        qi, _ = self.positions(c)
        return (qi >= self.plan.lq)[:, None, :, None]


def _unrows(ctx: _Ctx, x: torch.Tensor, lq: int) -> torch.Tensor:
    """(B, H_kv, tiles, groups * BLOCK_M, D) -> (B, H, lq, D)."""
    b, _, nqt, _, d = x.shape
    x = x.view(b, ctx.hkv, nqt, ctx.g, BLOCK_M, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, ctx.h, nqt * BLOCK_M, d)[:, :, :lq]


def forward(q, k, v, mask=None, seed=0, *, scale, causal=False, softcap=0.0, kv_groups=1, dropout_p=0.0,
            mask_fill=float("-inf"), alibi=None, window_left=-1, window_right=-1, block_sparse=False,
            window_pad=False, sinks=None):
    """Tiled attention forward; see the module docstring.  Returns (B, H, Lq, Dv) laid out as (B, Lq, H, Dv)."""
    ctx = _Ctx(q, k, v, mask, alibi, scale=scale, causal=causal, softcap=softcap, kv_groups=kv_groups,
               dropout_p=dropout_p, mask_fill=mask_fill, window_left=window_left, window_right=window_right,
               block_sparse=block_sparse, window_pad=window_pad, sinks=sinks)
    plan, b, lq = ctx.plan, q.shape[0], q.shape[2]
    # (B, tiles, BLOCK_M, H_kv, groups, Dv): the output layout, tiled
    out = q.new_empty(b, plan.nqt, BLOCK_M, ctx.hkv, ctx.g, ctx.dv, dtype=ctx.ct)
    if plan.dead_tiles:  # rows that see no key: NaN as eager's softmax, or 0 next to a sink
        out.fill_(math.nan if sinks is None else 0.0)
    for index, c in enumerate(plan.chunks):
        s, _, _ = ctx.scores(c, ctx.take(ctx.q, c), ctx.gather(ctx.k, c))
        p = ctx.softmax(s, c)
        del s
        if dropout_p > 0:
            p = p * ctx.keep(seed, index, p.shape) / (1 - dropout_p)
        o = torch.matmul(p.flatten(3, 4), ctx.gather(ctx.v, c))  # (B, H_kv, n, groups * BLOCK_M, Dv)
        o = o.view(b, ctx.hkv, -1, ctx.g, BLOCK_M, ctx.dv).permute(0, 2, 4, 1, 3, 5)
        if c.span is not None:
            out[:, c.span] = o
        else:
            out[:, c.rows] = o
    out = out.view(b, plan.nqt * BLOCK_M, ctx.h, ctx.dv)[:, :lq]
    result = torch.empty(b, lq, ctx.h, ctx.dv, dtype=q.dtype, device=q.device)
    result.copy_(out)
    return result.transpose(1, 2)


def backward(grad_out, q, k, v, mask=None, seed=0, *, scale, causal=False, softcap=0.0, kv_groups=1,
             dropout_p=0.0, mask_fill=float("-inf"), alibi=None, window_left=-1, window_right=-1,
             block_sparse=False, mask_grad=False, window_pad=False, sinks=None):
    """Gradients (dq, dk, dv, dmask or None[, dsinks]) of `forward`, recomputing the scores chunk by chunk;
    ``dsinks`` (``sinks``' shape and dtype) only when ``sinks`` is given."""
    ctx = _Ctx(q, k, v, mask, alibi, scale=scale, causal=causal, softcap=softcap, kv_groups=kv_groups,
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
    dsink = None if sinks is None else torch.zeros(ctx.b, ctx.hkv, ctx.g, dtype=ctx.ct)
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
            dsink -= (p_sink.squeeze(-1) * (p * dp).sum(-1)).sum((2, 4))
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
        dk_c = torch.matmul(ds.transpose(-1, -2), qc).view(ctx.b, ctx.hkv, n * t, BLOCK_N, ctx.d)
        dk.index_add_(2, c.tiles.flatten(), dk_c)
        dv.index_add_(2, c.tiles.flatten(), dv_c.view(ctx.b, ctx.hkv, n * t, BLOCK_N, ctx.dv))
    dq = _unrows(ctx, dq, plan.lq).mul_(scale)  # scores were taken with scale folded into q
    dk = dk.view(ctx.b, ctx.hkv, -1, ctx.d)[:, :, :plan.lk]
    dv = dv.view(ctx.b, ctx.hkv, -1, ctx.dv)[:, :, :plan.lk]
    if dmask is not None:
        dmask = dmask.view(mask.shape).to(mask.dtype)
    if dsink is not None:
        return (dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(), dmask,
                sink_grad(dsink.reshape(ctx.b, ctx.h), sinks))
    return (dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(), dmask)
