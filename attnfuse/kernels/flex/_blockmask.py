"""The `BlockMask` of a call, from the structure of its arguments: never from an Lq x Lk evaluation.

Each (query block, key block) pair of ``BLOCK`` x ``BLOCK`` positions gets a class: ``EMPTY`` (no key visible:
FlexAttention skips it), ``FULL`` (every key visible to every query: FlexAttention skips ``mask_mod``; the
``score_mod`` still runs) or ``PARTIAL``.  Each source of masking gives a class per block pair and they are
intersected (the minimum of the classes; a union is the maximum):

* the band (causal folded in), per shape and cached: from the extreme key - query offsets of the pair;
* packed documents, per call, by interval logic: per block the min and max segment id (O(N)); a pair whose
  ranges are disjoint is empty, a pair whose blocks hold one and the same id is full, any other pair partial
  (O(N^2 / BLOCK^2)).  Exact for sorted segment ids; conservative (partial, never wrongly empty or full) for
  unsorted ones.  Prefix keys: per key block none / some / all prefix keys, united with the band;
* a bool mask with fill -inf or an additive mask (only its -inf entries hide keys; its values are a score_mod):
  a key-padding vector (one row for every query) per call, a ``block_sparse`` constant by its tile occupancy,
  cached per tensor identity and ``_version``; any other mask: partial (bool) or full (additive) everywhere.

A pair reaching past the sequence's end is never full (as ``create_block_mask``, which pads with False).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .._versioned import VersionCache

__all__ = ["BLOCK", "EMPTY", "FULL", "PARTIAL", "band_classes", "block_mask", "classes", "doc_classes",
           "mask_classes"]

BLOCK = 128
EMPTY, PARTIAL, FULL = 0, 1, 2
_INT64 = torch.iinfo(torch.int64)
# mask -> (its _version, {(q_len, kv_len, device): classes})
_SPARSE_CACHE = VersionCache()


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


@functools.lru_cache(maxsize=64)
def band_classes(q_len: int, kv_len: int, left: int, right: int, device: torch.device) -> torch.Tensor:
    """(1, 1, QB, KB) int8 classes of the band ``q - left <= kv <= q + right`` (-1: unbounded); a cached constant:
    never written to."""
    qs = torch.arange(_blocks(q_len), device=device) * BLOCK
    ks = torch.arange(_blocks(kv_len), device=device) * BLOCK
    q_last = (qs + BLOCK).clamp(max=q_len) - 1
    k_last = (ks + BLOCK).clamp(max=kv_len) - 1
    lo = ks[None, :] - q_last[:, None]  # the smallest kv - q of the pair
    hi = k_last[None, :] - qs[:, None]  # the largest
    empty = torch.zeros(lo.shape, dtype=torch.bool, device=device)
    full = torch.ones(lo.shape, dtype=torch.bool, device=device)
    if left >= 0:
        empty |= hi < -left
        full &= lo >= -left
    if right >= 0:
        empty |= lo > right
        full &= hi <= right
    return _classes(empty, full)[None, None]


def _classes(empty: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    return torch.where(empty, EMPTY, torch.where(full, FULL, PARTIAL)).to(torch.int8)


def _per_block(x: torch.Tensor, pad) -> torch.Tensor:
    """(..., L) -> (..., blocks, BLOCK), the tail padded with ``pad``."""
    n = x.shape[-1]
    extra = _blocks(n) * BLOCK - n
    if extra:  # not F.pad: its float fill value cannot hold int64's extremes
        x = torch.cat([x, torch.full((*x.shape[:-1], extra), pad, dtype=x.dtype, device=x.device)], -1)
    return x.unflatten(-1, (_blocks(n), BLOCK))


def doc_classes(doc: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """(Bd, 1, NB, NB) classes of ``same segment and (in band or prefix key)`` for doc (Bd, 2, L) and the band's
    classes ``band`` (1, 1, NB, NB)."""
    seg, prefix = doc[:, 0], doc[:, 1] != 0
    lo = _per_block(seg, _INT64.max).amin(-1)  # (Bd, NB)
    hi = _per_block(seg, _INT64.min).amax(-1)
    disjoint = (hi[:, :, None] < lo[:, None, :]) | (lo[:, :, None] > hi[:, None, :])
    single = lo == hi
    same = single[:, :, None] & single[:, None, :] & (lo[:, :, None] == lo[:, None, :])
    segments = _classes(disjoint, same)[:, None]
    keys = _per_block(prefix, False)
    prefixes = _classes(~keys.any(-1), keys.all(-1))[:, None, None, :]  # (Bd, 1, 1, NB)
    return torch.minimum(segments, torch.maximum(band, prefixes))


def mask_classes(mask: torch.Tensor, q_len: int, kv_len: int, *, hides: bool) -> torch.Tensor:
    """(mb, mh, QB | 1, KB | 1) classes of a 4-D ``mask`` by its tile occupancy: bool keep (``hides``: its fill is
    -inf), or additive (only -inf hides a key: where a tile keeps some key it is full, since the values are a
    score_mod).  A bool mask with a finite fill hides nothing: full everywhere."""
    if mask.dtype == torch.bool and not hides:
        return torch.full((1, 1, 1, 1), FULL, dtype=torch.int8, device=mask.device)
    keep = mask if mask.dtype == torch.bool else ~torch.isneginf(mask)
    # the query and key dims the mask does not broadcast over are cut into blocks (tails padded with False)
    if keep.shape[2] != 1:
        keep = F.pad(keep, (0, 0, 0, _blocks(q_len) * BLOCK - q_len), value=False).unflatten(2, (-1, BLOCK))
    else:
        keep = keep.unsqueeze(3)
    tiles = _per_block(keep, False) if keep.shape[-1] != 1 else keep.unsqueeze(-1)  # (mb, mh, QB, BQ, KB, BK)
    any_kept = tiles.any(-1).any(3)
    if mask.dtype != torch.bool:
        return _classes(~any_kept, any_kept)
    return _classes(~any_kept, tiles.all(-1).all(3))


def _sparse_classes(mask: torch.Tensor, q_len: int, kv_len: int, hides: bool) -> torch.Tensor:
    """`mask_classes` of a block_sparse constant, cached per tensor identity and ``_version``."""
    key = (q_len, kv_len, hides, mask.device)
    return _SPARSE_CACHE.get(mask, key, lambda: mask_classes(mask, q_len, kv_len, hides=hides))


def _tail(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor | None:
    """(1, 1, QB, KB): PARTIAL on the pairs reaching past either length (never full), FULL elsewhere."""
    rq, rk = q_len % BLOCK, kv_len % BLOCK
    if not rq and not rk:
        return None
    cap = torch.full((1, 1, _blocks(q_len), _blocks(kv_len)), FULL, dtype=torch.int8, device=device)
    if rq:
        cap[:, :, -1, :] = PARTIAL
    if rk:
        cap[:, :, :, -1] = PARTIAL
    return cap


def classes(q_len: int, kv_len: int, *, mask: torch.Tensor | None, mask_hides: bool, doc: torch.Tensor | None,
            left: int, right: int, block_sparse: bool, device: torch.device) -> torch.Tensor:
    """(B' | 1, H' | 1, QB, KB) int8 classes of every block pair (``mask`` 4-D or None; ``right`` with causal
    folded in)."""
    band = band_classes(q_len, kv_len, left, right, device)
    out = band if doc is None else doc_classes(doc, band)
    if mask is not None:
        is_vector = mask.shape[2] == 1
        if block_sparse and not is_vector:
            got = _sparse_classes(mask, q_len, kv_len, mask_hides)
        elif is_vector:
            got = mask_classes(mask, q_len, kv_len, hides=mask_hides)
        elif mask.dtype == torch.bool and mask_hides:
            got = torch.full((1, 1, 1, 1), PARTIAL, dtype=torch.int8, device=device)
        else:
            got = None
        if got is not None:
            out = torch.minimum(out, got)
    tail = _tail(q_len, kv_len, device)
    return out if tail is None else torch.minimum(out, tail)


def _listing(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts, indices) of the chosen key blocks of each query block, the chosen ones first, ascending."""
    order = torch.sort(chosen.logical_not().to(torch.int8), dim=-1, stable=True).indices
    return chosen.sum(-1, dtype=torch.int32).contiguous(), order.to(torch.int32).contiguous()


def block_mask(cls: torch.Tensor, q_len: int, kv_len: int, mask_mod):
    """The `BlockMask` of the classes ``cls`` (B' | 1, H' | 1, QB, KB) with ``mask_mod`` (None: keep all)."""
    from torch.nn.attention.flex_attention import BlockMask

    num, idx = _listing(cls == PARTIAL)
    full_num, full_idx = _listing(cls == FULL)
    return BlockMask.from_kv_blocks(num, idx, full_kv_num_blocks=full_num, full_kv_indices=full_idx,
                                    BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(q_len, kv_len))
