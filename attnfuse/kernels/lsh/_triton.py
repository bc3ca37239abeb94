"""The Triton kernels of LSH attention's index: `bucket_keys` (a counting sort of keys into buckets) and
`count_votes` (each query row's votes per key block).  They run on CUDA tensors, and on CPU ones under
``TRITON_INTERPRET=1``; `attnfuse.kernels.lsh._index` runs torch ops elsewhere."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _launch

__all__ = ["bucket_keys", "count_votes", "runs_on"]

_SORT_BLOCK = 1024  # keys per `_bucket_kernel` program
_VOTE_ROWS = 32  # query rows per `_vote_kernel` program


def runs_on(x: torch.Tensor) -> bool:
    """Whether these kernels run on ``x``'s device: CUDA, or the CPU under ``TRITON_INTERPRET=1``."""
    return x.is_cuda or (x.device.type == "cpu" and _launch.interpreting())


@triton.jit
def _bucket_kernel(Gid, Cursor, Out, n, kv_len, BLOCK: tl.constexpr, SORT_BLOCK: tl.constexpr):
    """One program: ``SORT_BLOCK`` keys, each written (as its key block) to the next free slot of its bucket.
    ``Cursor`` starts at every bucket's offset; the atomic add hands each key its own slot."""
    idx = tl.program_id(0) * SORT_BLOCK + tl.arange(0, SORT_BLOCK)
    live = idx < n
    gid = tl.load(Gid + idx, mask=live, other=0)
    slot = tl.atomic_add(Cursor + gid, 1, mask=live)
    tl.store(Out + slot, ((idx % kv_len) // BLOCK).to(tl.int32), mask=live)


def bucket_keys(gid: torch.Tensor, offsets: torch.Tensor, kv_len: int, block: int) -> torch.Tensor:
    """int32 key block of every key, grouped by bucket: bucket g's keys fill ``offsets[g]:offsets[g + 1]``.
    ``gid`` (int64, keys in (batch, K/V head, table, position) order) is each key's bucket."""
    out = torch.empty(gid.numel(), dtype=torch.int32, device=gid.device)
    cursor = offsets[:-1].clone()
    n = gid.numel()
    _launch.launch(_bucket_kernel)[(triton.cdiv(n, _SORT_BLOCK),)](
        gid, cursor, out, n, kv_len, BLOCK=block, SORT_BLOCK=_SORT_BLOCK, num_warps=4)
    return out


@triton.jit
def _vote_kernel(Gid, Offsets, KeyBlocks, Acc, n_rows, n_pos, rows, nkb, limit,
                 LOOKUPS: tl.constexpr, ROWS: tl.constexpr):
    """One program: ``ROWS`` query rows of one (batch, K/V head, group head).  For each of a row's ``LOOKUPS``
    buckets (tables x probes) holding at most ``limit`` keys, one vote per key into ``Acc[row, key block]``."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = r < n_rows
    counter = ((r // n_pos) * rows + r % n_pos).to(tl.int64) * nkb  # padded counter row of each query row
    for e in range(LOOKUPS):
        gid = tl.load(Gid + r.to(tl.int64) * LOOKUPS + e, mask=live, other=0)
        start = tl.load(Offsets + gid, mask=live, other=0)
        size = tl.load(Offsets + gid + 1, mask=live, other=0) - start
        size = tl.where(live & (size <= limit), size, 0)
        for s in range(0, tl.max(size, 0)):
            hit = s < size
            kb = tl.load(KeyBlocks + start + s, mask=hit, other=0)
            tl.atomic_add(Acc + counter + kb, 1, mask=hit)


def count_votes(gid: torch.Tensor, offsets: torch.Tensor, key_blocks: torch.Tensor, acc: torch.Tensor,
                limit: int) -> None:
    """`_index.votes`' counters for one chunk: ``gid`` (B, Hkv, G, n_pos, tables, probes) bucket ids of the
    chunk's query rows, ``acc`` (B * Hkv, G, rows, nkb) int32 counters (rows >= n_pos: padding)."""
    bh, g, rows, nkb = acc.shape
    n_pos, lookups = gid.shape[3], gid.shape[4] * gid.shape[5]
    n_rows = bh * g * n_pos
    gid = gid.contiguous()
    _launch.launch(_vote_kernel)[(triton.cdiv(n_rows, _VOTE_ROWS),)](
        gid, offsets, key_blocks, acc, n_rows, n_pos, rows, nkb, limit, LOOKUPS=lookups, ROWS=_VOTE_ROWS,
        num_warps=4)
