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

Layout: `attention`, `forward` and `backward` here; `_select` the checks, the indexer and `select`;
`_tilemap` the flash tile and the tile map the Triton path runs; `_cpu` the CPU path.
"""

from __future__ import annotations

import math
import sys

import torch

from .. import _family, flash, validate
from . import _cpu
from ._select import check, select, unsupported
from ._tilemap import pick_config, tile_config, tile_map

__all__ = ["attend", "attend_backward", "attention", "backward", "forward", "pick_config", "select", "tile_map",
           "unsupported"]


def _triton(q, k, v) -> bool:
    """Whether the Triton path runs (`attnfuse.kernels._family.triton_runs`); the CPU path takes CPU tensors."""
    return _family.triton_runs(q, k, v, "attnfuse.kernels.topk")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chosen, *, scale: float | None, causal: bool,
           block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, stats) of exact attention over the key blocks ``chosen`` selects (a bool (B, Hkv, n_query_blocks,
    n_key_blocks) mask as `select` returns, or a no-argument callable making it): the Triton path (flash's
    block-sparse mode) or the CPU path.  ``stats``: flash's fp32 row statistics, or an empty tensor on the CPU
    path (its backward recomputes).  Shared with `attnfuse.kernels.lsh`, which selects blocks by hashing."""
    if _triton(q, k, v):
        made = _made(chosen)
        builder = lambda cfg: tile_map(made, cfg, q_len=q.shape[2], kv_len=k.shape[2],  # noqa: E731
                                       kv_groups=q.shape[1] // k.shape[1], block=block, causal=causal, cols=False)
        return flash.forward(q, k, v, scale=scale, causal=causal, config=tile_config("fwd", q, k, v, block),
                             tile_map=builder)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    with torch.no_grad():
        out = _cpu.forward(q.detach(), k.detach(), v.detach(), _made(chosen).cpu(), sm_scale, causal, block)
    return out, q.new_empty(0, dtype=torch.float32)


def attend_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    stats: torch.Tensor, chosen, *, scale: float | None, causal: bool,
                    block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `attend` over the same ``chosen`` blocks (the selection gets no gradient)."""
    if _triton(q, k, v):
        made = _made(chosen)
        builder = lambda cfg: tile_map(made, cfg, q_len=q.shape[2], kv_len=k.shape[2],  # noqa: E731
                                       kv_groups=q.shape[1] // k.shape[1], block=block, causal=causal, cols=True)
        dq, dk, dv, _ = flash.backward(grad_out, q, k, v, out, stats, scale=scale, causal=causal,
                                       config=tile_config("bwd", q, k, v, block), tile_map=builder)
        return dq, dk, dv
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    with torch.no_grad():
        return _cpu.backward(grad_out.detach(), q.detach(), k.detach(), v.detach(), _made(chosen).cpu(), sm_scale,
                             causal, block)


def _made(chosen) -> torch.Tensor:
    return chosen() if callable(chosen) else chosen


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, causal: bool = False,
            topk: int = 2048, block: int = 64, sink: int = 64, local: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, stats): out (B, H, Lq, Dv) laid out as (B, Lq, H, Dv); stats the flash kernels' fp32 (B, H, Lq, 2)
    row statistics on the Triton path, an empty tensor on the CPU path (its backward recomputes)."""
    check(q, k, v, causal, topk, block, sink, local, "attnfuse.kernels.topk.forward")
    return attend(q, k, v, lambda: select(q, k, causal=causal, topk=topk, block=block, sink=sink, local=local),
                  scale=scale, causal=causal, block=block)


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             stats: torch.Tensor, *, scale: float | None = None, causal: bool = False, topk: int = 2048,
             block: int = 64, sink: int = 64, local: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `forward` (the selection is recomputed; it gets no gradient).  ``out``/``stats`` are
    `forward`'s (the CPU path ignores them)."""
    check(q, k, v, causal, topk, block, sink, local, "attnfuse.kernels.topk.backward")
    return attend_backward(grad_out, q, k, v, out, stats,
                           lambda: select(q, k, causal=causal, topk=topk, block=block, sink=sink, local=local),
                           scale=scale, causal=causal, block=block)


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
    validate.unsupported(who, "top-k attention", "attnfuse.kernels.flash.attention for exact attention with it",
                         softcap=(softcap, 0.0), mask=(mask, None), dropout_p=(dropout_p, 0.0), alibi=(alibi, None))
    check(q, k, v, causal, topk, block, sink, local, who)
    kwargs = dict(scale=scale, causal=causal, topk=topk, block=block, sink=sink, local=local)
    return _family.attention(sys.modules[__name__], q, k, v, kwargs)
