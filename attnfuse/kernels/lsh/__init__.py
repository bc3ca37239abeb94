"""LSH attention: hashing retrieves the key blocks each query block attends, and attention over them is exact.

Semantics (identical on the Triton and the CPU path).  q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv);
the ``H // Hkv`` query heads of a K/V head share one selection.  Queries and keys are cut into blocks of ``block``
positions (top-k attention's blocks, `attnfuse.kernels.topk`).

1. Index (SimHash, Charikar 2002): ``tables`` tables of ``bits`` random hyperplanes each (drawn on the CPU from
   ``seed``, shared by every head); a vector's code in a table is its sign bits there.  Keys are hashed centered
   (minus the mean key of their batch and K/V head: that shifts all of a query's scores by one constant, so it
   changes no ranking, and keeps a shared component from crowding one bucket); queries as they are.  ``bits=-1``
   picks ``round(log2(Lk / 4))`` (about four keys per bucket), clipped to [0, 16].  The keys are bucketed per
   (batch, K/V head, table) by a counting sort: O(Lk * tables), no comparison sort.
2. Retrieval: a query row (one query position of one head) looks up its bucket in every table, and with
   ``probes`` > 0 also the buckets that flip one of its ``probes`` least confident bits (multi-probe LSH, Lv et
   al. 2007; with ``bits=-1``, at most the bits resolved).  Buckets holding more than
   ``max(64, 8 * ceil(Lk / 2**bits))`` keys are skipped: they say little about what a query needs, and would
   make the work quadratic.  Each key found is a vote for its key block.
3. Selection: a query block scores each key block by the most votes any of its rows (the group's heads
   included) gave it, ties broken by the rows' total; always kept are the sink blocks (keys < ``sink``) and the
   local blocks (keys [first - ``local``, last] of the block; [first - local, last + local] without causal) as in
   top-k; of the other candidate blocks (causal: holding a key <= the block's last query) with at least one vote,
   the ``ceil(cap / block)`` best are attended (ties: lower block index).  So a query block attends at most
   sink + local + cap keys -- the cap top-k's ``topk`` is -- and only blocks its hashes found.
4. Exact attention over the selected blocks (`attnfuse.kernels.topk.attend`: causal masking inside partial
   blocks, fp32 softmax, every selected key counted once).  When every key block gets a vote (``bits=0``: one
   bucket) and ``cap`` covers them, this is exact (causal) attention.

Work: hashing O((Lq * H + Lk * Hkv) * D * tables * bits); the index O(Lk * tables); the votes O(Lq * H * tables
* (1 + probes) * keys per bucket) plus one pass over a (query rows, key blocks) counter per chunk of query blocks
(no multiply-adds); selection and attention as top-k's.  The selection is discrete: no gradient flows through it,
and the backward recomputes it.  Not supported: masks, softcap, dropout, ALiBi (ValueError).

Paths.  Triton (CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``): the counting sort is `_bucket_kernel`
(atomic slot counters) and the votes `_vote_kernel`; the attention is flash's block-sparse mode, as top-k's.
On CUDA exact score ties between blocks may break differently (``torch.topk``), as in top-k.  CPU: the counting
sort is PyTorch's stable sort of the 1-D integer bucket ids (ATen runs it as a radix sort), the votes are
enumerated with torch ops, and the attention is top-k's CPU path.

Layout: `attention`, `forward`, `backward` here; `_index` the checks, hashing, index, votes and `select`;
`_triton` the index's Triton kernels.
"""

from __future__ import annotations

import sys

import torch

from ...costmodel import lshknobs
from .. import _family, validate
from ..topk import attend, attend_backward
from ._index import auto_bits, check, select, spill, unsupported

__all__ = ["DEFAULTS", "attention", "auto_bits", "backward", "forward", "select", "spill", "unsupported"]

DEFAULTS = lshknobs.DEFAULTS  # the registry's too (`attnfuse.families`)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, causal: bool = False,
            tables: int = 8, bits: int = -1, probes: int = 0, cap: int = 2048, block: int = 64, sink: int = 64,
            local: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, stats) as `attnfuse.kernels.topk.forward`'s: out (B, H, Lq, Dv) laid out as (B, Lq, H, Dv); stats
    flash's fp32 row statistics on the Triton path, an empty tensor on the CPU path."""
    kw = dict(tables=tables, bits=bits, probes=probes, cap=cap, block=block, sink=sink, local=local, seed=seed)
    check(q, k, v, causal, who="attnfuse.kernels.lsh.forward", **kw)
    return attend(q, k, v, lambda: select(q, k, causal=causal, **kw), scale=scale, causal=causal, block=block)


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             stats: torch.Tensor, *, scale: float | None = None, causal: bool = False, tables: int = 8, bits: int = -1,
             probes: int = 0, cap: int = 2048, block: int = 64, sink: int = 64, local: int = 256,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `forward`: the selection is recomputed (it gets no gradient)."""
    kw = dict(tables=tables, bits=bits, probes=probes, cap=cap, block=block, sink=sink, local=local, seed=seed)
    check(q, k, v, causal, who="attnfuse.kernels.lsh.backward", **kw)
    return attend_backward(grad_out, q, k, v, out, stats, lambda: select(q, k, causal=causal, **kw), scale=scale,
                           causal=causal, block=block)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, causal: bool = False,
              tables: int = 8, bits: int = -1, probes: int = 0, cap: int = 2048, block: int = 64, sink: int = 64,
              local: int = 256, seed: int = 0, mask: torch.Tensor | None = None, softcap: float = 0.0,
              dropout_p: float = 0.0, alibi: torch.Tensor | None = None) -> torch.Tensor:
    """LSH attention on ``(batch, heads, seqlen, head_dim)`` tensors, with autograd (module docstring).

    ``tables``/``bits``/``probes``: the index; ``cap``: keys (rounded up to whole blocks) a query block attends
    beyond its sink and local blocks; ``block`` (a multiple of 32), ``sink``, ``local`` as top-k's; ``seed``: the
    hyperplanes.  GQA: K/V may have fewer heads.  Runs the Triton kernels on CUDA tensors (or CPU ones under
    ``TRITON_INTERPRET=1``), torch ops and top-k's CPU path (what ``torch.ops.attnfuse.attention`` runs for LSH)
    on other CPU tensors, float64 included.  ``mask``/``softcap``/``dropout_p``/``alibi`` raise ValueError."""
    who = "attnfuse.kernels.lsh.attention"
    validate.unsupported(who, "LSH attention", "attnfuse.kernels.flash.attention for exact attention with it",
                         mask=(mask, None), softcap=(softcap, 0.0), dropout_p=(dropout_p, 0.0), alibi=(alibi, None))
    kw = dict(tables=tables, bits=bits, probes=probes, cap=cap, block=block, sink=sink, local=local, seed=seed)
    check(q, k, v, causal, who=who, **kw)
    return _family.attention(sys.modules[__name__], q, k, v, dict(scale=scale, causal=causal, **kw))
