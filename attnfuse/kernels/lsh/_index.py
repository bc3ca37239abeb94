"""The hashing index of LSH attention: the checks (`check`), SimHash codes (`key_codes`, `query_codes`), the bucket
index over keys (`key_index`), the votes of each query row's buckets per key block (`votes`) and the block
selection they make (`select`).  Torch ops on every device; the bucket index and the votes run as Triton kernels
(`_triton`) where Triton runs."""

from __future__ import annotations

import functools

import torch
import triton

from ...costmodel.lshknobs import MAX_BITS, auto_bits
from .. import validate
from ..topk._select import block_masks, take_best
from ..topk._select import unsupported as _block_unsupported
from . import _triton

__all__ = ["auto_bits", "check", "key_codes", "key_index", "query_codes", "select", "spill", "unsupported", "votes"]

_SPILL_MIN, _SPILL_FACTOR = 64, 8  # a bucket holding more keys than `spill` votes for nothing
_HASH_ROWS = 2**15  # rows per hashing matmul
_VOTE_ELEMS = 2**22  # (row, key block) vote counters per chunk of query blocks (Triton path)
_VOTE_ROWS = 2**15  # query rows per chunk of enumerated votes (CPU path)


def unsupported(q_shape, k_shape, *, causal: bool) -> str | None:
    """None when LSH attention takes these (B, H, Lq, D) / (B, Hkv, Lk, D) shapes, else why not (one sentence)."""
    why = _block_unsupported(q_shape, k_shape, causal=causal)
    return why.replace("top-k attention", "LSH attention").replace("top-k", "LSH") if why else None


def spill(kv_len: int, bits: int) -> int:
    """The most keys a bucket may hold and still vote: `_SPILL_FACTOR` times the mean bucket, at least
    `_SPILL_MIN` (a crowded bucket says little about which keys a query needs, and would make the votes
    quadratic)."""
    return max(_SPILL_MIN, _SPILL_FACTOR * -(-kv_len // (1 << bits)))


def check(q, k, v, causal, tables, bits, probes, cap, block, sink, local, seed, who="attnfuse.kernels.lsh") -> None:
    """Raise ValueError (prefixed ``who``) unless LSH attention takes these tensors (`validate.qkv`, ``v`` None
    checks q and k; `unsupported`) and settings (ints: ``tables`` >= 1, ``bits`` in [-1, `MAX_BITS`],
    ``probes`` >= 0 and, with explicit ``bits``, <= bits (with ``bits=-1`` they are clipped to the bits a call
    resolves, so one setting serves every length), ``cap``/``sink``/``local`` >= 0, ``block`` a multiple of 32,
    ``seed`` in [0, 2**63))."""
    validate.qkv(who, q, k, v)
    why = unsupported(tuple(q.shape), tuple(k.shape), causal=causal)
    if why:
        raise ValueError(f"{who}: {why}")
    for name, val, low, high in (("tables", tables, 1, None), ("bits", bits, -1, MAX_BITS), ("probes", probes, 0, None),
                                 ("cap", cap, 0, None), ("block", block, 32, None), ("sink", sink, 0, None),
                                 ("local", local, 0, None), ("seed", seed, 0, 2**63 - 1)):
        if not isinstance(val, int) or isinstance(val, bool) or (low is not None and val < low) or (
                high is not None and val > high):
            allowed = "an int" + (f" >= {low}" if low is not None else "") + (f" and <= {high}" if high else "")
            raise ValueError(f"{who}: {name} must be {allowed}; got {val!r}")
    if block % 32:
        raise ValueError(f"{who}: block must be a multiple of 32 (32, 64, 128, ...); got {block}")
    if bits >= 0 and probes > bits:
        raise ValueError(f"{who}: probes ({probes}) must be <= the bits per table ({bits}): each probe flips one "
                         "bit of the query's code")


@functools.lru_cache(maxsize=16)
def _planes(seed: int, dim: int, n: int) -> torch.Tensor:
    """(dim, n) float32 standard normal hyperplanes, drawn on the CPU from ``seed`` (every device hashes alike)."""
    return torch.randn(dim, n, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float32)


def _project(x: torch.Tensor, seed: int, tables: int, bits: int):
    """Yield (row slice, projections (rows, tables, bits) fp32) of the rows of ``x`` (..., D) in row chunks."""
    planes = _planes(seed, x.shape[-1], tables * bits).to(x.device)
    flat = x.reshape(-1, x.shape[-1])
    for lo in range(0, flat.shape[0], _HASH_ROWS):
        rows = slice(lo, min(flat.shape[0], lo + _HASH_ROWS))
        yield rows, (flat[rows].float() @ planes).view(-1, tables, bits)


def _pack(proj: torch.Tensor) -> torch.Tensor:
    """int64 codes (rows, tables) of sign bits (rows, tables, bits): bit i set where projection i is > 0."""
    weights = (2.0 ** torch.arange(proj.shape[-1], device=proj.device, dtype=torch.float32))
    return ((proj > 0).float() @ weights).long()  # exact: codes < 2**16


def key_codes(k: torch.Tensor, *, tables: int, bits: int, seed: int) -> torch.Tensor:
    """int64 (B, Hkv, Lk, tables) SimHash codes of the keys, centered per (batch, K/V head): subtracting the mean
    key shifts every score of a query by one constant, so the order of its keys is unchanged, while keys that
    share a large common component would otherwise crowd one bucket."""
    b, hkv, lk, _ = k.shape
    out = torch.zeros(b, hkv, lk, tables, dtype=torch.int64, device=k.device)
    if bits:
        kc = k.float() - k.float().mean(2, keepdim=True)
        flat = out.view(-1, tables)
        for rows, proj in _project(kc, seed, tables, bits):
            flat[rows] = _pack(proj)
    return out


def query_codes(q: torch.Tensor, *, tables: int, bits: int, probes: int, seed: int) -> torch.Tensor:
    """int64 (B, H, Lq, tables, 1 + probes): each query's bucket per table, then the ``probes`` neighbouring
    buckets that flip one of its least confident bits (the smallest |projection|), most doubtful first."""
    b, h, lq, _ = q.shape
    out = torch.zeros(b, h, lq, tables, 1 + probes, dtype=torch.int64, device=q.device)
    if bits:
        flat = out.view(-1, tables, 1 + probes)
        for rows, proj in _project(q, seed, tables, bits):
            code = _pack(proj)
            flat[rows, :, 0] = code
            if probes == 1:
                flat[rows, :, 1] = code ^ (1 << proj.abs().argmin(-1))
            elif probes:
                doubt = proj.abs().topk(probes, dim=-1, largest=False, sorted=True).indices
                flat[rows, :, 1:] = code[..., None] ^ (1 << doubt)
    return out


def key_index(codes: torch.Tensor, *, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets int64 (B * Hkv * tables * 2**bits + 1), key blocks int32 (B * Hkv * tables * Lk)): the keys
    bucketed by a counting sort over (batch, K/V head, table, code) -- bucket g's keys are entries
    offsets[g]:offsets[g + 1], each given by its key block (their order inside a bucket is not part of the
    result).  Where Triton runs, `_triton.bucket_keys` (atomic counters, no sort); else PyTorch's stable sort of
    the 1-D integer bucket ids, which ATen runs as a radix sort (counting passes)."""
    b, hkv, lk, tables = codes.shape
    n_buckets = b * hkv * tables << bits
    gid = (codes.transpose(2, 3) + (torch.arange(b * hkv * tables, device=codes.device) << bits).view(
        b, hkv, tables, 1)).reshape(-1)
    counts = torch.zeros(n_buckets, dtype=torch.int64, device=codes.device)
    counts.index_add_(0, gid, torch.ones((), dtype=torch.int64, device=codes.device).expand(gid.numel()))
    offsets = torch.zeros(n_buckets + 1, dtype=torch.int64, device=codes.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    if _triton.runs_on(codes):
        return offsets, _triton.bucket_keys(gid, offsets, lk, block)
    order = torch.argsort(gid.to(torch.int32) if n_buckets < 2**31 else gid, stable=True)  # int32 sorts faster
    return offsets, ((order % lk) // block).to(torch.int32)


def votes(qcodes: torch.Tensor, offsets: torch.Tensor, key_blocks: torch.Tensor, *, kv_heads: int, kv_len: int,
          bits: int, block: int) -> torch.Tensor:
    """int64 (B, Hkv, nqb, nkb) block scores: for each query row (a query position of one of the group's heads),
    its votes for key block kb are the keys of kb in its buckets over every table and probe (buckets holding more
    than `spill` keys excluded); a query block scores kb by its rows' most votes, then by their sum (as
    ``most * 2**32 + sum``)."""
    b, h, lq, tables, width = qcodes.shape
    g = h // kv_heads
    nqb, nkb = triton.cdiv(lq, block), triton.cdiv(kv_len, block)
    base = (torch.arange(b * kv_heads * tables, device=qcodes.device) << bits).view(b, kv_heads, 1, 1, tables, 1)
    gid = qcodes.view(b, kv_heads, g, lq, tables, width) + base
    limit = spill(kv_len, bits)
    if not _triton.runs_on(qcodes):
        return _votes_torch(gid, offsets, key_blocks, limit, nqb, nkb, block)
    score = torch.empty(b, kv_heads, nqb, nkb, dtype=torch.int64, device=qcodes.device)
    per = max(1, _VOTE_ELEMS // max(1, b * h * block * nkb))  # query blocks per chunk of counters
    for c0 in range(0, nqb, per):
        c1 = min(nqb, c0 + per)
        acc = torch.zeros(b * kv_heads, g, (c1 - c0) * block, nkb, dtype=torch.int32, device=qcodes.device)
        _triton.count_votes(gid[:, :, :, c0 * block:min(lq, c1 * block)], offsets, key_blocks, acc, limit)
        acc = acc.view(b, kv_heads, g, c1 - c0, block, nkb)
        score[:, :, c0:c1] = (acc.amax((2, 4)).long() << 32) + acc.sum((2, 4), dtype=torch.int32)
    return score


def _votes_torch(gid: torch.Tensor, offsets: torch.Tensor, key_blocks: torch.Tensor, limit: int, nqb: int, nkb: int,
                 block: int) -> torch.Tensor:
    """`votes` by torch ops, linear in the votes: per chunk of query rows, every (row, table, probe) bucket's keys
    are enumerated (``repeat_interleave``) as (row, key block) pairs, sorted (1-D integers) and
    counted; the counts are max- and sum-reduced into their (query block, key block) cell."""
    b, hkv, g, lq, tables, width = gid.shape
    dev = gid.device
    most = torch.zeros(b * hkv * nqb * nkb, dtype=torch.int64, device=dev)
    total = torch.zeros_like(most)
    per = max(1, _VOTE_ROWS // max(1, b * hkv * g * block))  # query blocks per chunk
    for c0 in range(0, nqb, per):
        i0, i1 = c0 * block, min(lq, (c0 + per) * block)
        flat = gid[:, :, :, i0:i1].reshape(-1)
        start = offsets.index_select(0, flat)
        size = offsets.index_select(0, flat + 1) - start
        size.masked_fill_(size > limit, 0)
        n = int(size.sum())
        if not n:
            continue
        # entries are (B, Hkv, G, positions, tables, probes): row = entry // (tables * probes)
        row = torch.arange(flat.numel() // (tables * width), device=dev)
        cell = ((row // ((i1 - i0) * g)) * nqb + (row % (i1 - i0) + i0) // block) * nkb  # the row's first cell
        ends = torch.cumsum(size, 0)
        at = torch.arange(n, device=dev) + torch.repeat_interleave(start - (ends - size), size, output_size=n)
        # (row, key block) as one integer: entries are row-major, so sorting groups each row's key blocks
        small = torch.int32 if row.numel() * nkb < 2**31 else torch.int64  # int32 sorts about twice as fast
        pair = torch.repeat_interleave((row * nkb).to(small).repeat_interleave(tables * width), size, output_size=n)
        pair += key_blocks.index_select(0, at).to(small)
        pair, count = torch.unique_consecutive(torch.sort(pair).values, return_counts=True)
        where = cell.index_select(0, (pair // nkb).long()) + pair % nkb
        most.scatter_reduce_(0, where, count, "amax")
        total.index_add_(0, where, count)
    return ((most << 32) + total).view(b, hkv, nqb, nkb)


@torch.no_grad()
def select(q: torch.Tensor, k: torch.Tensor, *, causal: bool, tables: int, bits: int, probes: int, cap: int,
           block: int, sink: int, local: int, seed: int) -> torch.Tensor:
    """Bool (B, Hkv, n_query_blocks, n_key_blocks): the key blocks each query block attends -- the sink and
    local blocks, plus the ``ceil(cap / block)`` open candidates with the best `votes` among those with any
    (the package docstring)."""
    check(q, k, None, causal, tables, bits, probes, cap, block, sink, local, seed, "attnfuse.kernels.lsh.select")
    bits = auto_bits(bits, k.shape[2])
    probes = min(probes, bits)
    lq, lk = q.shape[2], k.shape[2]
    kept, open_ = block_masks(lq, lk, causal=causal, block=block, sink=sink, local=local, device=q.device)
    n_pick = min(triton.cdiv(cap, block), open_.shape[-1])
    if not n_pick:
        return kept.expand(q.shape[0], k.shape[1], *kept.shape).clone()
    offsets, key_blocks = key_index(key_codes(k, tables=tables, bits=bits, seed=seed), bits=bits, block=block)
    score = votes(query_codes(q, tables=tables, bits=bits, probes=probes, seed=seed), offsets, key_blocks,
                  kv_heads=k.shape[1], kv_len=lk, bits=bits, block=block)
    live = open_ & (score > 0)
    return take_best(torch.where(live, score, -1), kept, live, n_pick)
