"""The flash tile a top-k launch uses (`pick_config`) and the block-sparse tile map of a selection (`tile_map`):
written by `_listing_kernel` where Triton runs, else by torch ops."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ...costmodel import tiles
from .. import _launch, blocksparse

__all__ = ["pick_config", "tile_config", "tile_map"]

_LIST_T = 256  # tiles per `_listing_kernel` step


@triton.jit
def _tile_class(Chosen, stride_cq, mt, kt, n_mt, n_kt, q_len, kv_len, GROUPS: tl.constexpr, BLOCK: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(full, partial) of packed query tiles ``mt`` x key tiles ``kt`` (one of them a scalar): `tile_map`'s rule."""
    start = mt * BLOCK_M
    first = start // GROUPS
    last = tl.minimum((start + BLOCK_M - 1) // GROUPS, q_len - 1)
    valid = (mt + 0 * kt < n_mt) & (kt + 0 * mt < n_kt)  # both as blocks (one of mt / kt is a scalar)
    live = tl.load(Chosen + (first // BLOCK) * stride_cq + kt * BLOCK_N // BLOCK, mask=valid, other=0) != 0
    whole = (kt + 1) * BLOCK_N <= kv_len
    if CAUSAL:
        live = live & (kt * BLOCK_N <= last)
        whole = whole & ((kt + 1) * BLOCK_N - 1 <= first)
    return live & whole, live & ~whole


@triton.jit
def _list_tiles(out, Chosen, stride_cq, own, lo, hi, n_mt, n_kt, q_len, kv_len, GROUPS: tl.constexpr,
                BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                BY_KEY: tl.constexpr, BLOCK_T: tl.constexpr, FULL: tl.constexpr):
    """Write the ``FULL`` (else partial) tiles of row ``own`` among ``[lo, hi)`` to ``out[0:n]``; returns n."""
    n = 0
    for t0 in range(lo, hi, BLOCK_T):
        other = t0 + tl.arange(0, BLOCK_T)
        if BY_KEY:
            full, part = _tile_class(Chosen, stride_cq, other, own, n_mt, n_kt, q_len, kv_len, GROUPS, BLOCK,
                                     BLOCK_M, BLOCK_N, CAUSAL)
        else:
            full, part = _tile_class(Chosen, stride_cq, own, other, n_mt, n_kt, q_len, kv_len, GROUPS, BLOCK,
                                     BLOCK_M, BLOCK_N, CAUSAL)
        if FULL:
            f = full.to(tl.int32)
        else:
            f = part.to(tl.int32)
        tl.store(out + n + tl.cumsum(f, 0) - 1, other, mask=f != 0)
        n += tl.sum(f, 0)
    return n


@triton.jit
def _listing_kernel(
    Chosen, Out,
    stride_cb, stride_ch, stride_cq,
    stride_ob, stride_oh, stride_or,
    HKV, n_mt, n_kt, q_len, kv_len,
    GROUPS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, BY_KEY: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One program: the listing row ``[n_full, n_partial, full tiles..., partial tiles...]`` of one query tile
    (``BY_KEY``: key tile) of one (batch, K/V head), from the block selection ``Chosen`` (uint8, last stride 1).
    Only the listed entries are written (the rest of the row is left as it is)."""
    own = tl.program_id(0)
    pid_bh = tl.program_id(1)
    Chosen += (pid_bh // HKV) * stride_cb + (pid_bh % HKV) * stride_ch
    row = Out + (pid_bh // HKV) * stride_ob + (pid_bh % HKV) * stride_oh + own * stride_or
    out = row + 2
    lo = 0
    if BY_KEY:
        hi = n_mt
        if CAUSAL:  # packed query tiles before the key tile's first key see none of it
            lo = (own * BLOCK_N * GROUPS) // BLOCK_M // BLOCK_T * BLOCK_T
    else:
        hi = n_kt
        if CAUSAL:
            hi = tl.minimum(n_kt, tl.minimum(((own * BLOCK_M + BLOCK_M - 1) // GROUPS), q_len - 1) // BLOCK_N + 1)
    n_full = _list_tiles(out, Chosen, stride_cq, own, lo, hi, n_mt, n_kt, q_len, kv_len, GROUPS, BLOCK, BLOCK_M,
                         BLOCK_N, CAUSAL, BY_KEY, BLOCK_T, True)
    n_part = _list_tiles(out + n_full, Chosen, stride_cq, own, lo, hi, n_mt, n_kt, q_len, kv_len, GROUPS, BLOCK,
                         BLOCK_M, BLOCK_N, CAUSAL, BY_KEY, BLOCK_T, False)
    tl.store(row, n_full)
    tl.store(row + 1, n_part)


def _triton_ok(x: torch.Tensor) -> bool:
    """Whether Triton kernels run on ``x``'s device: CUDA, or the CPU under ``TRITON_INTERPRET=1``."""
    return x.is_cuda or (x.device.type == "cpu" and _launch.interpreting())


def tile_config(kind: str, q, k, v, block: int) -> tiles.TileConfig:
    """`pick_config` for these tensors on their device (cached per shape, dtype and device spec)."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    return _pick_cached(kind, lq, lk, b, h, hkv, d, v.shape[-1], q.element_size(), block, _launch.spec_for(q))


@functools.lru_cache(maxsize=256)
def _pick_cached(kind, lq, lk, b, h, hkv, d, dv, elem, block, spec) -> tiles.TileConfig:
    return pick_config(kind, q_len=lq, kv_len=lk, batch=b, heads=h, kv_heads=hkv, head_dim=d, head_dim_v=dv,
                       elem=elem, block=block, spec=spec)


def pick_config(kind: str, *, q_len: int, kv_len: int, batch: int, heads: int, kv_heads: int, head_dim: int,
                head_dim_v: int, elem: int, block: int, spec) -> tiles.TileConfig:
    """The flash tile (``kind`` "fwd" or "bwd") a top-k launch uses on ``spec``: the cheapest of
    `tiles.kept_configs` whose key tile divides ``block`` and whose packed query tile lies in one query block
    (BLOCK_M divides kv_groups * block), so that the block selection maps onto tiles exactly."""
    g = heads // kv_heads
    fits = [c for c in tiles.kept_configs(kind, head_dim, head_dim_v, elem, spec)
            if block % c.block_n == 0 and (g * block) % c.block_m == 0]
    if not fits:
        raise ValueError(f"attnfuse.kernels.topk: no flash tile fits block={block} with head dims {head_dim}/"
                         f"{head_dim_v} on {spec.name}; use block=64 or 128")
    return min(fits, key=lambda c: tiles.estimate_s(c, kind, q_len * g, kv_len, batch * kv_heads, head_dim,
                                                    head_dim_v, elem, spec, groups=g))


def tile_map(chosen: torch.Tensor, cfg: tiles.TileConfig, *, q_len: int, kv_len: int, kv_groups: int, block: int,
             causal: bool, cols: bool = True) -> blocksparse.TileMap:
    """The flash kernels' `blocksparse.TileMap` of a `select` mask for tile ``cfg`` (BLOCK_N divides ``block``,
    BLOCK_M divides ``kv_groups * block``): a key tile is listed for a packed query tile iff its key block is
    selected for the tile's query block (and, causal, it starts at or before the tile's last row); "partial"
    (masked by the kernels' causal band and length checks) on the causal diagonal and for a ragged last tile,
    "full" otherwise.  ``cols=False`` leaves the key-tile listing (only the backward's dK/dV reads it) empty.
    Device ops only (no host sync).  Where Triton runs, `_listing_kernel` writes each listing row directly
    (only its listed entries: the rest of a row is uninitialized); else torch ops (a sort per row)."""
    bm, bn, g = cfg.block_m, cfg.block_n, kv_groups
    if block % bn or (g * block) % bm:
        raise ValueError(f"attnfuse.kernels.topk: tile {bm}x{bn} does not nest in block {block} "
                         f"with kv_groups {g}")
    dev = chosen.device
    nmt, nkt = triton.cdiv(q_len * g, bm), triton.cdiv(kv_len, bn)
    if _triton_ok(chosen):
        b, hkv = chosen.shape[:2]
        c8 = chosen.contiguous().view(torch.uint8)

        def listing(by_key: bool) -> torch.Tensor:
            n_own, n_other = (nkt, nmt) if by_key else (nmt, nkt)
            out = torch.empty(b, hkv, n_own, 2 + n_other, dtype=torch.int32, device=dev)
            _launch.launch(_listing_kernel)[(n_own, b * hkv)](
                c8, out, *c8.stride()[:3], *out.stride()[:3], hkv, nmt, nkt, q_len, kv_len,
                GROUPS=g, BLOCK=block, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, BY_KEY=by_key, BLOCK_T=_LIST_T,
                num_warps=4)
            return out

        rows = listing(False)
        return blocksparse.TileMap(rows, listing(True) if cols else rows.new_empty(0))
    start = torch.arange(nmt, device=dev) * bm
    first = start // g
    last = torch.clamp((start + bm - 1) // g, max=q_len - 1)
    kt = torch.arange(nkt, device=dev)
    live = chosen.index_select(2, first // block).index_select(3, kt * bn // block)  # (B, Hkv, nmt, nkt)
    full = torch.ones(nmt, nkt, dtype=torch.bool, device=dev)
    if kv_len % bn:
        full[:, -1] = False
    if causal:
        live = live & (kt[None, :] * bn <= last[:, None])
        full &= (kt[None, :] + 1) * bn - 1 <= first[:, None]
    full = live & full
    partial = live & full.logical_not()
    rows = blocksparse.listing(full, partial)
    return blocksparse.TileMap(rows, blocksparse.listing(full.transpose(-1, -2), partial.transpose(-1, -2))
                               if cols else rows.new_empty(0))
