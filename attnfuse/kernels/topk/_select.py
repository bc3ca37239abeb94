"""Which key blocks each top-k query block attends (`select`), and the checks every top-k entry point makes
(`unsupported`, `check`).  The indexer's scores come from `_score_kernel` where Triton runs, else from chunked
torch matmuls."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _launch, validate

__all__ = ["block_masks", "check", "select", "take_best", "unsupported"]

_SELECT_ELEMS = 2**21  # indexer bounds per select chunk
_SCORE_KB = 64  # key blocks per `_score_kernel` step


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


def unsupported(q_shape, k_shape, *, causal: bool) -> str | None:
    """None when top-k attention takes these (B, H, Lq, D) / (B, Hkv, Lk, D) shapes, else why not (one sentence)."""
    if len(q_shape) != 4 or len(k_shape) != 4:
        return "top-k attention takes 4-D (batch, heads, seqlen, head_dim) tensors"
    if q_shape[1] % k_shape[1]:
        return f"top-k attention needs q heads ({q_shape[1]}) divisible by k heads ({k_shape[1]})"
    if causal and q_shape[2] != k_shape[2]:
        return f"causal top-k needs q_len == kv_len (got {q_shape[2]} and {k_shape[2]})"
    return None


def check(q, k, v, causal, topk, block, sink, local, who="attnfuse.kernels.topk") -> None:
    """Raise ValueError (prefixed ``who``) unless top-k attention takes these tensors and settings: the shared
    q/k/v checks (`attnfuse.kernels.validate.qkv`; ``v`` None checks q and k), `unsupported`, and the int
    settings (``block`` a multiple of 32)."""
    validate.qkv(who, q, k, v)
    why = unsupported(tuple(q.shape), tuple(k.shape), causal=causal)
    if why:
        raise ValueError(f"{who}: {why}")
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
    check(q, k, None, causal, topk, block, sink, local, "attnfuse.kernels.topk.select")
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    nqb, nkb = triton.cdiv(lq, block), triton.cdiv(lk, block)
    kept, open_ = block_masks(lq, lk, causal=causal, block=block, sink=sink, local=local, device=q.device)
    n_pick = min(triton.cdiv(topk, block), nkb)
    if not n_pick:
        return kept.expand(b, hkv, nqb, nkb).clone()
    if _launch.supported(q, k, k) is None:
        ranked = _scores_triton(q, k, causal=causal, block=block, sink=sink, local=local)  # -inf unless open
    else:
        scores = _scores_torch(q, k, causal=causal, block=block)
        ranked = torch.where(open_, scores, torch.tensor(float("-inf"), dtype=scores.dtype, device=q.device))
        ranked = torch.nan_to_num(ranked, nan=float("-inf"))
    return take_best(ranked, kept, open_, n_pick)


def block_masks(lq: int, lk: int, *, causal: bool, block: int, sink: int, local: int,
                device) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, open): bool (n_query_blocks, n_key_blocks) -- the candidate key blocks always kept (sink and local),
    and the other candidates (causal: blocks holding a key <= the query block's last position)."""
    nqb, nkb = triton.cdiv(lq, block), triton.cdiv(lk, block)
    qb = torch.arange(nqb, device=device)[:, None]
    kb = torch.arange(nkb, device=device)[None, :]
    first, last = qb * block, torch.clamp((qb + 1) * block, max=lq) - 1
    key_lo, key_hi = kb * block, torch.clamp((kb + 1) * block, max=lk) - 1
    candidate = (key_lo <= last) if causal else torch.ones(nqb, nkb, dtype=torch.bool, device=device)
    local_hi = last if causal else last + local
    kept = ((key_lo < sink) | ((key_hi >= first - local) & (key_lo <= local_hi))) & candidate
    return kept, candidate & ~kept


def take_best(ranked: torch.Tensor, kept: torch.Tensor, open_: torch.Tensor, n_pick: int) -> torch.Tensor:
    """Bool (B, Hkv, nqb, nkb): ``kept`` plus, per query block, the ``n_pick`` best-ranked ``open_`` blocks (ties:
    lower block index on the CPU; ``torch.topk`` on CUDA may break exact ties otherwise).  ``ranked`` (B, Hkv,
    nqb, nkb) float, -inf for blocks that must not be picked; fewer than ``n_pick`` open blocks: all of them."""
    chosen = kept.expand(ranked.shape).clone()
    if not n_pick:
        return chosen
    if ranked.is_cuda:  # k = n_pick is small: a partial selection, not a full sort of every row
        order = torch.topk(ranked, n_pick, dim=-1, sorted=False).indices
    else:  # ranked by score, then index
        order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :n_pick]
    # only open candidates count (there may be fewer than n_pick)
    live = torch.gather(open_.expand(ranked.shape), -1, order)
    chosen.scatter_(-1, order, live | torch.gather(chosen, -1, order))
    return chosen
