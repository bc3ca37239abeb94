"""Block-sparse tile maps: which key tiles each query tile visits (and which query tiles each key tile visits)
under a constant mask, for the flash kernels' block-sparse mode (`attnfuse.kernels.blocksparse`, and top-k's
selections in `attnfuse.kernels.topk`).

A constant mask decides tile by tile what a kernel program does: an empty tile (every entry masked) is skipped,
a full tile (every entry kept; for an additive mask, every entry exactly 0.0) is computed with no mask read and
no masking, and a partial tile reads the mask.  The map is built on the mask's device with torch ops (no host
sync, so it also traces) and cached per mask tensor (identity and ``_version``: an in-place update rebuilds it)
and launch shape.

Map layout (`TileMap`, int32): one row per (mask batch, K/V head, tile) of the side a program owns,
``[n_full, n_partial, full tile indices..., partial tile indices..., unused]``.  ``rows`` is indexed by packed
query tiles (forward and dQ programs; packed rows r = row * kv_groups + g, as the kernels pack GQA), ``cols``
by key tiles (dK/dV programs).  A mask batch or head dim of size 1 stays 1 (the kernels read it with stride 0);
a per-query-head mask is classified per K/V head over each packed tile, whose rows mix the group's heads.
A band (``window``, causal folded in as right = 0) is intersected into the classification, and the kernels
apply it inside partial tiles.  The last key tile of a ragged key length is never full: the unmasked loops do
not bounds-check.  Masked entries: False, or <= finfo(dtype).min for an additive mask.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import triton

from ._versioned import VersionCache

__all__ = ["TileMap", "listing", "tile_map"]


@dataclasses.dataclass(frozen=True)
class TileMap:
    """The tile lists of one launch shape: ``rows`` (batch, kv heads, query tiles, 2 + key tiles) for the
    query-tile programs, ``cols`` (batch, kv heads, key tiles, 2 + query tiles) for the key-tile programs."""

    rows: torch.Tensor
    cols: torch.Tensor


_CACHE = VersionCache()  # mask -> {launch shape: TileMap}, per in-place version


def tile_map(mask: torch.Tensor, *, batch: int, heads: int, kv_heads: int, q_len: int, kv_len: int, block_m: int,
             block_n: int, window: tuple[int, int] = (-1, -1)) -> TileMap:
    """The (cached) tile map of ``mask`` (bool keep, or additive; broadcastable to (batch, heads, q_len, kv_len))
    for tiles of ``block_m`` packed query rows by ``block_n`` keys, under the band ``window`` (-1: unbounded)."""
    key = (batch, heads, kv_heads, q_len, kv_len, block_m, block_n, tuple(window))
    return _CACHE.get(mask, key, lambda: _build(mask, *key))


def _build(mask, batch, heads, kv_heads, q_len, kv_len, block_m, block_n, window) -> TileMap:
    groups = heads // kv_heads
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    bm, hm = (batch if m.shape[0] != 1 else 1), (heads if m.shape[1] != 1 else 1)
    m = m.expand(bm, hm, m.shape[2], kv_len)  # query rows stay 1 for a key-padding vector
    if mask.dtype == torch.bool:
        keep = zero = m
    else:
        keep, zero = m > torch.finfo(mask.dtype).min, m == 0
    left, right = window
    if (left, right) != (-1, -1):
        i = torch.arange(q_len, device=mask.device).unsqueeze(1)
        j = torch.arange(kv_len, device=mask.device).unsqueeze(0)
        band = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device)
        if left >= 0:
            band &= j >= i - left
        if right >= 0:
            band &= j <= i + right
        keep, zero = keep & band, zero & band

    # per (query row, key tile): any entry kept, every entry full; padding keys are neutral
    n_tiles = triton.cdiv(kv_len, block_n)
    pad = n_tiles * block_n - kv_len
    live = F.pad(keep, (0, pad), value=False).unflatten(-1, (n_tiles, block_n)).any(-1)
    whole = F.pad(zero, (0, pad), value=True).unflatten(-1, (n_tiles, block_n)).all(-1)
    if pad:
        whole = torch.cat((whole.narrow(-1, 0, n_tiles - 1), torch.zeros_like(whole.narrow(-1, 0, 1))), -1)
    live, whole = (x.expand(bm, hm, q_len, n_tiles) for x in (live, whole))

    # packed rows r = row * groups + g of each K/V head
    if hm == heads and groups > 1:
        live, whole = (x.unflatten(1, (kv_heads, groups)).transpose(2, 3).reshape(bm, kv_heads, q_len * groups,
                                                                                   n_tiles) for x in (live, whole))
    elif groups > 1:
        live, whole = (x.repeat_interleave(groups, dim=2) for x in (live, whole))
    packed = q_len * groups
    m_tiles = triton.cdiv(packed, block_m)
    pad = m_tiles * block_m - packed
    live = F.pad(live, (0, 0, 0, pad), value=False).unflatten(2, (m_tiles, block_m)).any(3)
    full = F.pad(whole, (0, 0, 0, pad), value=True).unflatten(2, (m_tiles, block_m)).all(3)
    partial = live & full.logical_not()
    return TileMap(listing(full, partial), listing(full.transpose(-1, -2), partial.transpose(-1, -2)))


def listing(full: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
    """[n_full, n_partial, full indices (ascending), partial indices (ascending), the rest] along the last dim."""
    # 0 full, 1 partial, 2 empty (logical_not, not ~: fake CUDA tensors in a CPU build trace only the former)
    rank = full.logical_not().to(torch.int8) + (full | partial).logical_not().to(torch.int8)
    order = torch.sort(rank, dim=-1, stable=True).indices
    counts = torch.stack((full.sum(-1), partial.sum(-1)), -1)
    return torch.cat((counts, order), -1).to(torch.int32).contiguous()
