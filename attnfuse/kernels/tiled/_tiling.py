"""The tile plan of `attnfuse.kernels.tiled`: tile sizes, a constant mask's tile kinds (cached), and which key
tiles each query tile visits, batched into chunks (`plan`).  Forward and backward build the same plan.

The tile sizes and the chunk budget are read from this module at call time (tests shrink them)."""

from __future__ import annotations

import dataclasses
import functools
import weakref

import torch

__all__ = ["BLOCK_M", "BLOCK_N", "Chunk", "Plan", "as4d", "plan"]

BLOCK_M = 64
BLOCK_N = 64
_CHUNK_ELEMS = 2**19  # scores per chunk (2 MiB in fp32; measured fastest of 2**18..2**23 at 16k, window 512)

_EMPTY, _FULL, _PARTIAL = 0, 1, 2
_KIND_CACHE: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}


def as4d(x: torch.Tensor) -> torch.Tensor:
    """``x`` with leading size-1 dims up to 4-D (a mask of any broadcastable shape)."""
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
    m = as4d(mask)
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
class Chunk:
    rows: torch.Tensor  # (n,) query tile ids
    span: slice | None  # the same rows as a slice when they are consecutive (no gather needed)
    tiles: torch.Tensor  # (n, T) key tile ids; pad slots hold the zero tile nkt
    band: tuple[slice, ...]  # score columns (runs of slots) that need the elementwise band / key-range mask
    partial: torch.Tensor | None  # block-sparse: (n, T) slots that read the mask (None: all or none do)
    pad_rows: bool  # holds the last query tile, whose rows beyond lq are padding


@dataclasses.dataclass(frozen=True)
class Plan:
    lq: int
    lk: int
    left: int
    right: int
    nqt: int
    nkt: int
    chunks: list[Chunk]
    dead_tiles: bool  # some query tile visits no key tile: its rows are NaN


def plan(lq, lk, rows_per_tile, causal, window_left, window_right, mask, mask_fill, block_sparse, dtype) -> Plan:
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
    return Plan(lq, lk, left, right, nqt, nkt, chunks, len(order) < nqt)


def _chunk(rows, tiles, valid, left, right, lq, lk, mask_partial, nqt) -> Chunk:
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
    return Chunk(rows, span, tiles, tuple(band), partial, nqt - 1 in ids)
