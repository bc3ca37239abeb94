"""Top-k block-sparse attention: a training-free indexer picks key blocks per query block, then exact attention.

Semantics (identical on the Triton and the CPU path).  q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv);
the ``kv_groups = H // Hkv`` query heads of a K/V head share one selection.  Queries are cut into query blocks
of ``block`` positions, keys into key blocks of ``block`` keys.  For each (batch, K/V head, query block):

* candidates: every key block; with ``causal`` (top-left aligned, needs Lq == Lk: key j visible from query i
  iff j <= i) the blocks holding a key <= the query block's last position;
* always kept (among the candidates): the "sink" blocks covering keys [0, sink) and the "local" blocks covering
  keys [first - local, last] of the block's first/last query position ([first - local, last + local] without
  causal), clipped to [0, Lk);
* indexer (Quest, Tang et al. 2024): per key block and channel the min and max of k; for a query row the upper
  bound of q.k over the block is ``relu(q) @ kmax - relu(-q) @ kmin``; a query block's score is its max over
  the block's rows and the group's heads.  Cost: 2 / ``block`` of dense QK^T (causal: only candidate blocks);
* select: the ``ceil(topk / block)`` best-scoring candidates not already kept (ties: lower block index), union
  the kept ones (`select` returns that block mask);
* exact attention over the selected keys: ``scale`` (default 1/sqrt(D)) times q.k, causal masking inside
  partial blocks, fp32 softmax.  With ``topk >= Lk`` every candidate is kept: exact (causal) attention.

The selection is a discrete choice: it gets no gradient; the backward recomputes it.  Not supported: softcap,
masks, dropout, ALiBi (ValueError).  A query block with no key at all (only when ``causal=False``, Lq > Lk and
``sink = topk = 0``) gives NaN rows, as exact attention with a fully masked row.

Triton path (CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``): the flash kernels' block-sparse mode with
a tile map built from the selection (`tile_map`): key tiles of ``BLOCK_N`` dividing ``block`` and packed query
tiles lying inside one query block (``BLOCK_M`` divides ``kv_groups * block``), so the map is exact; causal
diagonal tiles are "partial" (the kernels apply the causal band there), the rest "full".  No host sync.
The selection there is two kernels and a few torch ops: `_score_kernel` (the bound dots in q's dtype with fp32
accumulation, max-reduced in registers: no bound tensor) writes ranking scores with -inf for blocks that are
no open candidates; ``torch.topk`` (on CUDA; a stable sort elsewhere) takes the best; `_listing_kernel` writes
the tile listings straight from the block mask (the forward builds only the query-tile one).  On CUDA, blocks
whose scores tie or differ within the 16-bit rounding of the bound may rank differently from the CPU path.
CPU path: per chunk of consecutive query blocks, the selected key blocks are gathered (``index_select``) into
(n, B * Hkv, T * block, D), the group's heads stacked as rows (K/V never repeated).  Slot 0 holds the one
block that may need an elementwise mask (causal: the diagonal block; else a ragged last block), then the other
selected blocks, then pad slots (zero keys, masked) where a query block selects fewer than the chunk's T.  A
chunk without pad slots (fp32, D == Dv) runs PyTorch's fused CPU flash kernel twice -- slot 0 under its mask,
the rest unmasked -- and merges them by log-sum-exp; other chunks run matmul, masked fp32 softmax, matmul.
Memory is O(N * D + chunk).  The backward recomputes each chunk (matmuls and eager's softmax backward).
"""

from __future__ import annotations

import functools
import math
import sys

import torch
import triton
import triton.language as tl

from ..costmodel import tiles
from . import _family, _launch, blocksparse, flash

__all__ = ["attention", "backward", "forward", "pick_config", "select", "tile_map", "unsupported"]

_BIG = 2**30  # key position of a padding slot: visible to no query
_SELECT_ELEMS = 2**21  # indexer bounds per select chunk
_CHUNK_ELEMS = 2**20  # scores per CPU chunk
_SCORE_KB = 64  # key blocks per `_score_kernel` step
_LIST_T = 256  # tiles per `_listing_kernel` step

# --------------------------------------------------------------------------------------------- Triton kernels


@triton.jit
def _score_kernel(
    Q, KMax, KMin, Scores,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn,
    stride_sb, stride_sh, stride_sm,
    H, Lq, Lk, n_kb, sink, local,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_KB: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: the ranking scores of one (batch, K/V head, query block) against every key block.

    Score = max over the block's rows and the group's heads of ``relu(q) @ kmax - relu(-q) @ kmin`` (two dots
    in q's dtype, fp32 accumulation), -inf where the key block is no open candidate (not a candidate, or kept
    anyway) and for NaN.  The (rows, key blocks) bounds never leave registers; causal skips future blocks."""
    qb = tl.num_programs(0) - 1 - tl.program_id(0)  # heavy causal rows first
    pid_bh = tl.program_id(1)
    hkv = pid_bh % (H // GROUPS)
    b = pid_bh // (H // GROUPS)
    first = qb * BLOCK
    last = tl.minimum(first + BLOCK, Lq) - 1
    offs_d = tl.arange(0, BLOCK_D)
    Q += b * stride_qb
    KMax += b * stride_kb + hkv * stride_kh
    KMin += b * stride_kb + hkv * stride_kh
    out = Scores + b * stride_sb + hkv * stride_sh + qb * stride_sm
    n_live = n_kb
    if CAUSAL:
        n_live = tl.minimum(n_kb, qb + 1)
    if GROUPS * BLOCK == ROWS:  # the whole query block in one tile: loaded once
        r = tl.arange(0, ROWS)
        pos = first + r % BLOCK
        q = tl.load(Q + (hkv * GROUPS + r // BLOCK)[:, None] * stride_qh + pos[:, None] * stride_qm
                    + offs_d[None, :] * stride_qd, mask=(pos[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        q_pos = tl.maximum(q, 0.0).to(Q.dtype.element_ty)
        q_neg = tl.minimum(q, 0.0).to(Q.dtype.element_ty)
    for kb0 in range(0, n_kb, BLOCK_KB):
        kb = kb0 + tl.arange(0, BLOCK_KB)
        best = tl.full([BLOCK_KB], float("-inf"), tl.float32)
        if kb0 < n_live:
            k_mask = (kb[:, None] < n_kb) & (offs_d[None, :] < HEAD_DIM)
            k_off = kb[:, None] * stride_kn + offs_d[None, :]
            kmax = tl.load(KMax + k_off, mask=k_mask, other=0.0)
            kmin = tl.load(KMin + k_off, mask=k_mask, other=0.0)
            if GROUPS * BLOCK == ROWS:
                s = tl.dot(q_pos, tl.trans(kmax), input_precision=PRECISION)
                s = tl.dot(q_neg, tl.trans(kmin), s, input_precision=PRECISION)
                s = tl.where((pos < Lq)[:, None], s, float("-inf"))
                best = tl.max(s, 0)
            else:
                for r0 in range(0, GROUPS * BLOCK, ROWS):
                    r = r0 + tl.arange(0, ROWS)
                    pos_c = first + r % BLOCK
                    qc = tl.load(Q + (hkv * GROUPS + r // BLOCK)[:, None] * stride_qh + pos_c[:, None] * stride_qm
                                 + offs_d[None, :] * stride_qd, mask=(pos_c[:, None] < Lq) &
                                 (offs_d[None, :] < HEAD_DIM), other=0.0)
                    s = tl.dot(tl.maximum(qc, 0.0).to(Q.dtype.element_ty), tl.trans(kmax), input_precision=PRECISION)
                    s = tl.dot(tl.minimum(qc, 0.0).to(Q.dtype.element_ty), tl.trans(kmin), s,
                               input_precision=PRECISION)
                    s = tl.where((pos_c < Lq)[:, None], s, float("-inf"))
                    best = tl.maximum(best, tl.max(s, 0))
        key_lo = kb * BLOCK
        key_hi = tl.minimum(key_lo + BLOCK, Lk) - 1
        if CAUSAL:
            open_ = key_lo <= last
            local_hi = last
        else:
            open_ = kb < n_kb
            local_hi = last + local
        open_ = open_ & ~((key_lo < sink) | ((key_hi >= first - local) & (key_lo <= local_hi)))
        best = tl.where(open_ & (best == best), best, float("-inf"))
        tl.store(out + kb, best, mask=kb < n_kb)


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


# --------------------------------------------------------------------------------------------- selection


def unsupported(q_shape, k_shape, *, causal: bool) -> str | None:
    """None when top-k attention takes these (B, H, Lq, D) / (B, Hkv, Lk, D) shapes, else why not (one sentence)."""
    if len(q_shape) != 4 or len(k_shape) != 4:
        return "top-k attention takes 4-D (batch, heads, seqlen, head_dim) tensors"
    if q_shape[1] % k_shape[1]:
        return f"top-k attention needs q heads ({q_shape[1]}) divisible by k heads ({k_shape[1]})"
    if causal and q_shape[2] != k_shape[2]:
        return f"causal top-k needs q_len == kv_len (got {q_shape[2]} and {k_shape[2]})"
    return None


def _check(q, k, v, causal, topk, block, sink, local, who="attnfuse.kernels.topk"):
    if q.dim() != 4 or k.dim() != 4 or (v is not None and v.dim() != 4):
        raise ValueError(f"{who}: q, k, v must be 4-D (batch, heads, seqlen, head_dim)")
    why = unsupported(tuple(q.shape), tuple(k.shape), causal=causal)
    if why:
        raise ValueError(f"{who}: {why}")
    if k.shape[-1] != q.shape[-1] or k.shape[0] != q.shape[0] or (
            v is not None and (v.shape[:3] != k.shape[:3])):
        raise ValueError(f"{who}: need equal batch and q/k head dims, and v shaped like k up to its head dim; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {None if v is None else tuple(v.shape)}")
    if v is not None and not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{who}: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, val, low in (("topk", topk, 0), ("sink", sink, 0), ("local", local, 0), ("block", block, 32)):
        if not isinstance(val, int) or isinstance(val, bool) or val < low:
            raise ValueError(f"{who}: {name} must be an int >= {low}; got {val!r}")
    if block % 32:
        raise ValueError(f"{who}: block must be a multiple of 32 (32, 64, 128, ...); got {block}")


def _block_bounds(k: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kmin, kmax): (B, Hkv, key blocks, D) per-channel min and max of k over each key block (fp32/fp64)."""
    b, hkv, lk, d = k.shape
    nkb = triton.cdiv(lk, block)
    x = k.to(torch.float64 if k.dtype == torch.float64 else torch.float32)
    if nkb * block != lk:  # repeat the last key: min and max stay those of the real keys
        x = torch.cat((x, x[:, :, -1:].expand(b, hkv, nkb * block - lk, d)), 2)
    x = x.view(b, hkv, nkb, block, d)
    return x.amin(3), x.amax(3)


def _block_bounds_native(k: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_block_bounds` in k's own dtype (min and max are exact in any dtype), contiguous, one pass over k."""
    whole = k.shape[2] // block
    lo, hi = torch.aminmax(k[:, :, :whole * block].unflatten(2, (whole, block)), dim=3)
    if whole * block < k.shape[2]:  # a ragged last block: its real keys only
        tlo, thi = torch.aminmax(k[:, :, whole * block:], dim=2, keepdim=True)
        lo, hi = torch.cat((lo, tlo), 2), torch.cat((hi, thi), 2)
    return lo.contiguous(), hi.contiguous()


def _triton_ok(x: torch.Tensor) -> bool:
    """Whether Triton kernels run on ``x``'s device: CUDA, or the CPU under ``TRITON_INTERPRET=1``."""
    return x.is_cuda or (x.device.type == "cpu" and _launch.interpreting())


def _scores_triton(q: torch.Tensor, k: torch.Tensor, *, causal: bool, block: int, sink: int,
                   local: int) -> torch.Tensor:
    """fp32 (B, Hkv, nqb, nkb) ranking scores by `_score_kernel`: the Quest score of open candidates, -inf for
    every other block (and NaN).  The bound dots run in q's dtype (16-bit on tensor cores; fp32 as tf32) with
    fp32 accumulation, so near-ties may rank differently from the CPU path's fp32/fp64 matmul."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = h // hkv
    nqb, nkb = triton.cdiv(lq, block), triton.cdiv(lk, block)
    kmin, kmax = _block_bounds_native(k, block)
    scores = torch.empty(b, hkv, nqb, nkb, dtype=torch.float32, device=q.device)
    rows = min(64, (g * block) & -(g * block))  # a power of two dividing the query block's packed rows
    _launch.launch(_score_kernel)[(nqb, b * hkv)](
        q, kmax, kmin, scores, *q.stride(), kmax.stride(0), kmax.stride(1), kmax.stride(2),
        scores.stride(0), scores.stride(1), scores.stride(2), h, lq, lk, nkb, sink, local,
        GROUPS=g, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK=block, ROWS=rows,
        BLOCK_KB=_SCORE_KB, CAUSAL=causal, PRECISION="tf32", num_warps=4, num_stages=2)
    return scores


def _scores_torch(q: torch.Tensor, k: torch.Tensor, *, causal: bool, block: int) -> torch.Tensor:
    """fp32/fp64 (B, Hkv, nqb, nkb) Quest scores by chunked matmuls (-inf for causal blocks past a chunk)."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = h // hkv
    nqb, nkb = triton.cdiv(lq, block), triton.cdiv(lk, block)
    kmin, kmax = _block_bounds(k, block)
    ct = kmin.dtype
    # bound = relu(q) @ kmax^T - relu(-q) @ kmin^T = [max(q, 0), min(q, 0)] @ [kmax, kmin]^T: one matmul
    kk = torch.cat((kmax, kmin), -1).transpose(-1, -2).unsqueeze(2)  # (B, Hkv, 1, 2D, nkb)
    scores = torch.full((b, hkv, nqb, nkb), float("-inf"), dtype=ct, device=q.device)
    per_qb = max(1, (_SELECT_ELEMS * (16 if q.is_cuda else 1)) // max(1, b * h * block * nkb))
    for c0 in range(0, nqb, per_qb):
        c1 = min(nqb, c0 + per_qb)
        x = q[:, :, c0 * block:c1 * block].to(ct)
        if x.shape[2] < (c1 - c0) * block:  # repeat the last query: a block's max stays that of its real rows
            x = torch.cat((x, x[:, :, -1:].expand(b, h, (c1 - c0) * block - x.shape[2], d)), 2)
        qq = torch.cat((x.clamp(min=0), x.clamp(max=0)), -1).view(b, hkv, g, (c1 - c0) * block, 2 * d)
        cols = min(c1, nkb) if causal else nkb  # causal (lq == lk): blocks past the chunk's last are no candidates
        bound = torch.matmul(qq, kk[..., :cols])  # (B, Hkv, G, n * block, cols)
        scores[:, :, c0:c1, :cols] = bound.view(b, hkv, g, c1 - c0, block, cols).amax((2, 4))
    return scores


@torch.no_grad()
def select(q: torch.Tensor, k: torch.Tensor, *, causal: bool, topk: int, block: int = 64, sink: int = 64,
           local: int = 256) -> torch.Tensor:
    """Bool (B, Hkv, n_query_blocks, n_key_blocks): the key blocks each query block attends (module docstring).

    Device ops on q's device, no host sync.  Where Triton runs (`_launch.supported`) the scores come from
    `_score_kernel` (no bound tensor; memory O(scores)), else from chunked fp32/fp64 matmuls (memory O(chunk)
    beyond the scores).  On CUDA the best blocks are taken by ``torch.topk`` and the bounds are multiplied in
    q's dtype: exact ties and near-ties (within the 16-bit rounding) may break differently from the CPU path's
    "lower block index first"."""
    _check(q, k, None, causal, topk, block, sink, local, "attnfuse.kernels.topk.select")
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    nqb, nkb = triton.cdiv(lq, block), triton.cdiv(lk, block)
    dev = q.device
    qb = torch.arange(nqb, device=dev)[:, None]
    kb = torch.arange(nkb, device=dev)[None, :]
    first, last = qb * block, torch.clamp((qb + 1) * block, max=lq) - 1
    key_lo, key_hi = kb * block, torch.clamp((kb + 1) * block, max=lk) - 1
    candidate = (key_lo <= last) if causal else torch.ones(nqb, nkb, dtype=torch.bool, device=dev)
    local_hi = last if causal else last + local
    kept = ((key_lo < sink) | ((key_hi >= first - local) & (key_lo <= local_hi))) & candidate  # (nqb, nkb)
    open_ = candidate & ~kept
    n_pick = min(triton.cdiv(topk, block), nkb)
    chosen = kept.expand(b, hkv, nqb, nkb).clone()
    if not n_pick:
        return chosen
    if _launch.supported(q, k, k) is None:
        ranked = _scores_triton(q, k, causal=causal, block=block, sink=sink, local=local)  # -inf unless open
    else:
        scores = _scores_torch(q, k, causal=causal, block=block)
        ranked = torch.where(open_, scores, torch.tensor(float("-inf"), dtype=scores.dtype, device=dev))
        ranked = torch.nan_to_num(ranked, nan=float("-inf"))
    if q.is_cuda:  # k = n_pick is small: a partial selection, not a full sort of every row
        order = torch.topk(ranked, n_pick, dim=-1, sorted=False).indices
    else:  # ranked by score, then index
        order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :n_pick]
    # only open candidates count (there may be fewer than n_pick)
    live = torch.gather(open_.expand(b, hkv, nqb, nkb), -1, order)
    chosen.scatter_(-1, order, live | torch.gather(chosen, -1, order))
    return chosen


# --------------------------------------------------------------------------------------------- Triton launcher


def _config(kind: str, q, k, v, block: int) -> tiles.TileConfig:
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
    rows = blocksparse._listing(full, partial)
    return blocksparse.TileMap(rows, blocksparse._listing(full.transpose(-1, -2), partial.transpose(-1, -2))
                               if cols else rows.new_empty(0))


def _map_builder(q, k, causal, topk, block, sink, local, cols):
    chosen = select(q, k, causal=causal, topk=topk, block=block, sink=sink, local=local)
    return lambda cfg: tile_map(chosen, cfg, q_len=q.shape[2], kv_len=k.shape[2], kv_groups=q.shape[1] // k.shape[1],
                                block=block, causal=causal, cols=cols)


# --------------------------------------------------------------------------------------------- CPU path


class _Plan:
    """Inputs in block layout -- queries (nqb, B * Hkv, G * block, D), key blocks (B * Hkv * (nkb + 1), block * D)
    -- and the chunks of query blocks, shared by the CPU forward and backward."""

    def __init__(self, q, k, v, chosen, scale, causal, block):
        self.ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.b, self.h, self.lq, self.d = q.shape
        self.hkv, self.lk, self.dv = k.shape[1], k.shape[2], v.shape[-1]
        self.g, self.block, self.causal = self.h // self.hkv, block, causal
        self.bh = self.b * self.hkv
        self.nqb, self.nkb = chosen.shape[-2:]
        chosen = chosen.reshape(self.bh, self.nqb, self.nkb).transpose(0, 1)  # (nqb, BH, nkb)
        self.counts = counts = chosen.sum(-1)
        # slots: the one block that may need an elementwise mask first (causal: the diagonal block, always
        # selected; else a ragged last block when selected), the other selected blocks (ascending), then pad
        # slots pointing at the zero block nkb.  So only slot 0 and a chunk's pad slots are ever masked.
        rank = 2 - chosen.to(torch.uint8)  # 1 selected, 2 not
        if causal:
            rank.diagonal(dim1=0, dim2=2).zero_()
        else:
            rank[..., -1] -= chosen[..., -1].to(torch.uint8)  # harmless when the last block is whole
        order = torch.argsort(rank, dim=-1, stable=True)
        self.order = torch.where(torch.arange(self.nkb) < counts[..., None], order, self.nkb)
        self.q = self.by_block(q).mul_(scale)
        self.k, self.v = self.key_blocks(k), self.key_blocks(v)
        # chunks of consecutive query blocks with at most _CHUNK_ELEMS scores (t = the chunk's most slots)
        most, least = counts.amax(1).tolist(), counts.amin(1).tolist()
        rows = self.bh * self.g * block * block
        self.chunks, start = [], 0
        while start < self.nqb:
            stop, width, low = start + 1, most[start], least[start]
            while stop < self.nqb and (stop + 1 - start) * max(width, most[stop]) * rows <= _CHUNK_ELEMS:
                width, low = max(width, most[stop]), min(low, least[stop])
                stop += 1
            self.chunks.append((start, stop, max(1, width), low))
            start = stop

    def by_block(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, L, D) -> (nqb, B * Hkv, G * block, D) in the compute dtype, zero-padded rows."""
        b, _, lq, d = x.shape
        out = x.new_empty(self.nqb, b, self.hkv, self.g, self.block, d, dtype=self.ct)
        out[-1].zero_()  # the last block's padding rows
        src, dst = x.unflatten(1, (self.hkv, self.g)), out.permute(1, 2, 3, 0, 4, 5)  # (B, Hkv, G, L | nqb, ...)
        whole = lq // self.block
        dst[:, :, :, :whole].copy_(src[:, :, :, :whole * self.block].unflatten(3, (whole, self.block)))
        if lq > whole * self.block:
            dst[:, :, :, whole, :lq - whole * self.block].copy_(src[:, :, :, whole * self.block:])
        return out.view(self.nqb, self.bh, self.g * self.block, d)

    def unblock(self, x: torch.Tensor, dtype) -> torch.Tensor:
        """(nqb, B * Hkv, G * block, D) -> (B, H, Lq, D) laid out as (B, Lq, H, D)."""
        d = x.shape[-1]
        x = x.view(self.nqb, self.b, self.hkv, self.g, self.block, d).permute(1, 0, 4, 2, 3, 5)
        x = x.reshape(self.b, self.nqb * self.block, self.h, d)[:, :self.lq]
        out = torch.empty(self.b, self.lq, self.h, d, dtype=dtype, device=x.device)
        return out.copy_(x).transpose(1, 2)

    def key_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, Lk, D) -> (B * Hkv * (nkb + 1), block * D), zero-padded; block nkb of each head is zero."""
        out = x.new_empty(self.bh, self.nkb + 1, self.block, x.shape[-1], dtype=self.ct)
        out.flatten(1, 2)[:, self.lk:].zero_()
        out.flatten(1, 2)[:, :self.lk].copy_(x.reshape(self.bh, self.lk, x.shape[-1]))
        return out.view(self.bh * (self.nkb + 1), -1)

    def slots(self, c0: int, c1: int, t: int) -> torch.Tensor:
        """(n, B * Hkv, t) flat block indices into `key_blocks` rows."""
        return self.order[c0:c1, :, :t] + (torch.arange(self.bh) * (self.nkb + 1))[:, None]

    def gather(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        n, bh, t = idx.shape
        return x.index_select(0, idx.flatten()).view(n, bh, t * self.block, -1)

    def slot0_hidden(self, c0: int, c1: int) -> torch.Tensor:
        """(n | 1, BH | 1, 1, block | 1, block) True where slot 0 is hidden: causal, or keys past Lk."""
        c = torch.arange(self.block)
        if self.causal:  # slot 0 is the diagonal block: key c of it is hidden from row r when c > r
            return (c > c[:, None]).view(1, 1, 1, self.block, self.block)
        return (self.order[c0:c1, :, :1] * self.block + c >= self.lk)[:, :, None, None, :]

    def mask_(self, s: torch.Tensor, c0: int, c1: int, t: int, least: int) -> torch.Tensor:
        """Scores (n, B * Hkv, G, block, t * block) with -inf where hidden: slot 0 by position, and pad slots
        (only in chunks where some query block selects fewer than t blocks)."""
        s[..., :self.block].masked_fill_(self.slot0_hidden(c0, c1), float("-inf"))
        if least < t:
            pad = (torch.arange(least, t) >= self.counts[c0:c1, :, None]).repeat_interleave(self.block, -1)
            s[..., least * self.block:].masked_fill_(pad[:, :, None, None, :], float("-inf"))
        return s

    def scores(self, qc, kc, c0, c1, t, least):
        """Masked scores (n, B * Hkv, G, block, t * block)."""
        s = torch.matmul(qc, kc.transpose(-1, -2))
        return self.mask_(s.view(c1 - c0, self.bh, self.g, self.block, t * self.block), c0, c1, t, least)

    def fused(self, qc, kc, vc, c0, c1, t, out):
        """Attention of a chunk whose query blocks all fill their t slots (no pad slot), by PyTorch's fused CPU
        kernel: slot 0 under its mask, the other slots unmasked, merged by their log-sum-exp, into ``out``."""
        n, blk = c1 - c0, self.block
        q4 = qc.view(n * self.bh, 1, self.g * blk, self.d)
        k4, v4 = kc.view(n * self.bh, 1, t * blk, self.d), vc.view(n * self.bh, 1, t * blk, self.dv)
        hide = self.slot0_hidden(c0, c1)
        hide = hide.expand(-1, -1, self.g, -1, -1).reshape(-1, 1, self.g * blk, blk) if self.causal else \
            hide.reshape(n * self.bh, 1, 1, blk)
        bias = torch.zeros(hide.shape, dtype=self.ct).masked_fill_(hide, float("-inf"))
        o0, l0 = _sdpa(q4, k4[:, :, :blk], v4[:, :, :blk], 0.0, False, attn_mask=bias, scale=1.0)
        if t == 1:
            return out.copy_(o0.view(out.shape))
        o1, l1 = _sdpa(q4, k4[:, :, blk:], v4[:, :, blk:], 0.0, False, scale=1.0)
        w0 = torch.sigmoid(l0 - l1)[..., None]  # exp(l0) / (exp(l0) + exp(l1))
        return torch.lerp(o1, o0, w0, out=out.view(o1.shape))


_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _cpu_forward(q, k, v, chosen, scale, causal, block):
    p_ = _Plan(q, k, v, chosen, scale, causal, block)
    out = torch.empty(p_.nqb, p_.bh, p_.g * block, p_.dv, dtype=p_.ct)
    for c0, c1, t, least in p_.chunks:
        idx = p_.slots(c0, c1, t)
        qc, kc, vc = p_.q[c0:c1], p_.gather(p_.k, idx), p_.gather(p_.v, idx)
        if least == t and p_.ct == torch.float32 and p_.d == p_.dv:  # the fused kernel wants equal head dims
            p_.fused(qc, kc, vc, c0, c1, t, out[c0:c1])
            continue
        prob = torch.softmax(p_.scores(qc, kc, c0, c1, t, least), dim=-1).flatten(2, 3)
        torch.matmul(prob, vc, out=out[c0:c1])
        del prob
    return p_.unblock(out, q.dtype)


def _cpu_backward(grad_out, q, k, v, chosen, scale, causal, block):
    p_ = _Plan(q, k, v, chosen, scale, causal, block)
    do = p_.by_block(grad_out)
    dq = torch.empty_like(p_.q)
    dk, dv = torch.zeros_like(p_.k), torch.zeros_like(p_.v)
    for c0, c1, t, least in p_.chunks:
        idx = p_.slots(c0, c1, t)
        qc, kc, vc, doc = p_.q[c0:c1], p_.gather(p_.k, idx), p_.gather(p_.v, idx), do[c0:c1]
        prob = torch.softmax(p_.scores(qc, kc, c0, c1, t, least), dim=-1)
        dp = torch.matmul(doc, vc.transpose(-1, -2)).view(prob.shape)
        # hidden scores have p = 0, so dS = p * (dp - rowsum(p * dp)) is 0 there (pad slots read zero V)
        ds = torch.ops.aten._softmax_backward_data(dp, prob, -1, prob.dtype).flatten(2, 3)
        del dp
        dv_c = torch.matmul(prob.flatten(2, 3).transpose(-1, -2), doc)  # (n, BH, t * block, Dv)
        del prob
        torch.matmul(ds, kc, out=dq[c0:c1])
        dk_c = torch.matmul(ds.transpose(-1, -2), qc)
        flat = idx.flatten()
        dk.index_add_(0, flat, dk_c.reshape(flat.numel(), -1))
        dv.index_add_(0, flat, dv_c.reshape(flat.numel(), -1))
    dq = p_.unblock(dq.mul_(scale), q.dtype)  # scores were taken with scale folded into q
    dk = dk.view(p_.b, p_.hkv, -1, p_.d)[:, :, :p_.lk].to(k.dtype).contiguous()
    dv = dv.view(p_.b, p_.hkv, -1, p_.dv)[:, :, :p_.lk].to(v.dtype).contiguous()
    return dq.contiguous(), dk, dv


# --------------------------------------------------------------------------------------------- public API


def _triton(q, k, v) -> bool:
    """Whether the Triton path runs (`attnfuse.kernels._family.triton_runs`); the CPU path takes CPU tensors."""
    return _family.triton_runs(q, k, v, "attnfuse.kernels.topk")


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, causal: bool = False,
            topk: int = 2048, block: int = 64, sink: int = 64, local: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, stats): out (B, H, Lq, Dv) laid out as (B, Lq, H, Dv); stats the flash kernels' fp32 (B, H, Lq, 2)
    row statistics on the Triton path, an empty tensor on the CPU path (its backward recomputes)."""
    _check(q, k, v, causal, topk, block, sink, local, "attnfuse.kernels.topk.forward")
    if _triton(q, k, v):
        builder = _map_builder(q, k, causal, topk, block, sink, local, cols=False)  # the forward reads rows
        return flash.forward(q, k, v, scale=scale, causal=causal, config=_config("fwd", q, k, v, block),
                             tile_map=builder)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    chosen = select(q, k, causal=causal, topk=topk, block=block, sink=sink, local=local).cpu()
    with torch.no_grad():
        out = _cpu_forward(q.detach(), k.detach(), v.detach(), chosen, sm_scale, causal, block)
    return out, q.new_empty(0, dtype=torch.float32)


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             stats: torch.Tensor, *, scale: float | None = None, causal: bool = False, topk: int = 2048,
             block: int = 64, sink: int = 64, local: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `forward` (the selection is recomputed; it gets no gradient).  ``out``/``stats`` are
    `forward`'s (the CPU path ignores them)."""
    _check(q, k, v, causal, topk, block, sink, local, "attnfuse.kernels.topk.backward")
    if _triton(q, k, v):
        builder = _map_builder(q, k, causal, topk, block, sink, local, cols=True)
        dq, dk, dv, _ = flash.backward(grad_out, q, k, v, out, stats, scale=scale, causal=causal,
                                       config=_config("bwd", q, k, v, block), tile_map=builder)
        return dq, dk, dv
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    chosen = select(q, k, causal=causal, topk=topk, block=block, sink=sink, local=local).cpu()
    with torch.no_grad():
        return _cpu_backward(grad_out.detach(), q.detach(), k.detach(), v.detach(), chosen, sm_scale, causal, block)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, causal: bool = False,
              topk: int = 2048, block: int = 64, sink: int = 64, local: int = 256, softcap: float = 0.0,
              mask: torch.Tensor | None = None, dropout_p: float = 0.0,
              alibi: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k block-sparse attention on ``(batch, heads, seqlen, head_dim)`` tensors, with autograd.

    ``topk``: keys (tokens) each query block attends beyond its sink and local blocks, rounded up to whole
    blocks of ``block`` keys (a multiple of 32); ``sink``/``local``: the always-kept first keys and local
    window (module docstring).  GQA: K/V may have fewer heads.  Runs the Triton kernels on CUDA tensors (or CPU
    ones under ``TRITON_INTERPRET=1``), the CPU path (torch ops, what ``torch.ops.attnfuse.attention`` runs for
    top-k) on other CPU tensors, float64 included (`attnfuse.kernels._family.triton_runs`).  ``softcap``, ``mask``,
    ``dropout_p`` and ``alibi`` are not supported: setting one raises ValueError.
    """
    who = "attnfuse.kernels.topk.attention"
    for name, is_set, off in (("softcap", bool(softcap), 0.0), ("mask", mask is not None, None),
                              ("dropout_p", bool(dropout_p), 0.0), ("alibi", alibi is not None, None)):
        if is_set:
            raise ValueError(f"{who}: {name} is not supported by top-k attention (leave it at {off}); use "
                             f"attnfuse.kernels.flash.attention for exact attention with it")
    _check(q, k, v, causal, topk, block, sink, local, who)
    kwargs = dict(scale=scale, causal=causal, topk=topk, block=block, sink=sink, local=local)
    return _family.attention(sys.modules[__name__], q, k, v, kwargs)
