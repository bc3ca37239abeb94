"""Ulysses context parallelism (DeepSpeed-Ulysses, Jacobs et al. 2023): trade the sequence shard for a head shard.

Every rank holds ``Lc`` rows of the global sequence (in ``cp``'s layout, `attnfuse.parallel.positions`) for all
``H`` heads.  One all-to-all per tensor turns that into ``H / P`` heads over the whole sequence; attnfuse's own op
then runs the site on those heads exactly as on one device (causal and window bands over global positions, the
key mask all-gathered: it is O(L)); a last all-to-all returns the rank's rows of every head.  The collectives are
torch's functional ones (``all_to_all_single_autograd``, ``all_gather_single``), so autograd differentiates
through them (the backward is the mirrored all-to-alls) and ``torch.compile`` traces them into the graph.

Needs ``H % P == 0``.  K/V heads: where ``Hk % P != 0`` they are repeated (the fewest times that makes them split
over the ranks; GQA keeps ``kv_groups / repeat``), so every rank finds its query heads' K/V heads locally; the
repeat's backward sums the copies' gradients.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as fc

from .. import ops
from ._spec import ContextParallel, positions

__all__ = ["kv_repeat", "ulysses"]


def kv_repeat(kv_heads: int, ranks: int) -> int:
    """How many times Ulysses repeats each K/V head so that the K/V heads split evenly over ``ranks``."""
    a, b = kv_heads, ranks  # gcd, spelled out: dynamo traces this (not math.gcd)
    while b:
        a, b = b, a % b
    return ranks // a


def _rank_order(cp: ContextParallel, local_len, device) -> torch.Tensor | None:
    """Global position of each row of the gathered sequence (rank 0's rows, then rank 1's, ...), or None where
    that is already position order (the contiguous layout)."""
    if cp.layout == "contiguous":
        return None
    return torch.cat([positions(cp, r, local_len, device) for r in range(cp.ranks)])


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``order[inv[j]] == j``: gathering rank-ordered rows with it puts them in position order."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def _to_heads(x: torch.Tensor, cp: ContextParallel, inv: torch.Tensor | None) -> torch.Tensor:
    """(B, H, Lc, D) sequence-sharded -> (B, H / P, P * Lc, D) head-sharded, rows in global position order."""
    b, h, lc, d = x.shape
    p = cp.ranks
    x = x.reshape(b, p, h // p, lc, d).transpose(0, 1).contiguous()  # piece i: head group i, for rank i
    x = fc.all_to_all_single_autograd(x, None, None, cp.group_name)  # piece i: rank i's rows of my heads
    x = x.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * lc, d)
    return x if inv is None else x.index_select(2, inv)


def _to_rows(x: torch.Tensor, cp: ContextParallel, order: torch.Tensor | None) -> torch.Tensor:
    """The inverse of `_to_heads`: (B, H / P, L, D) in position order -> (B, H, Lc, D) this rank's rows."""
    if order is not None:
        x = x.index_select(2, order)
    b, hp, length, d = x.shape
    p = cp.ranks
    lc = length // p
    x = x.reshape(b, hp, p, lc, d).permute(2, 0, 1, 3, 4).contiguous()  # piece i: rank i's rows
    x = fc.all_to_all_single_autograd(x, None, None, cp.group_name)  # piece i: head group i, my rows
    return x.transpose(0, 1).reshape(b, p * hp, lc, d)


def _gather_mask(mask: torch.Tensor, cp: ContextParallel, local_len, inv: torch.Tensor | None) -> torch.Tensor:
    """This rank's key mask (broadcastable to (B, 1, 1, Lc)) -> every rank's, (B | 1, 1, 1, L) in position order."""
    if mask.dim() > 4 or (mask.dim() >= 2 and mask.shape[-2] != 1) or (mask.dim() >= 3 and mask.shape[-3] != 1):
        raise ValueError(f"attnfuse context_parallel: the attention mask must be a key mask broadcastable to "
                         f"(batch, 1, 1, {local_len}) (one value per key); got shape {tuple(mask.shape)}")
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    m = m.expand(m.shape[0], 1, 1, local_len).contiguous()
    is_bool = m.dtype == torch.bool
    if is_bool:
        m = m.to(torch.uint8)  # not every backend all-gathers bool
    if m.requires_grad:  # a learned additive bias: the all-gather's backward reduce-scatters its gradient
        g = fc.all_gather_single_autograd(m, 3, cp.group_name)
    else:
        g = fc.all_gather_single(m, 3, cp.group_name)
    if is_bool:
        g = g.to(torch.bool)
    return g if inv is None else g.index_select(3, inv)


def ulysses(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None, *,
            cp: ContextParallel, scale: float, causal: bool = False, softcap: float = 0.0, kv_groups: int = 1,
            mask_fill: float | None = None, window_left: int = -1, window_right: int = -1,
            sdpa_form: bool = False) -> torch.Tensor:
    """Attention over the global sequence of this rank's rows ``q`` (B, H, Lc, D) against every rank's keys
    ``k``/``v`` (B, Hk, Lc, D / Dv), ``H = Hk * kv_groups``; returns this rank's rows of the output,
    (B, H, Lc, Dv).

    ``key_mask``: None, or broadcastable to (B, 1, 1, Lc) over this rank's keys: bool (True = attend; a masked
    score becomes ``mask_fill``, None = -inf) or a float additive bias.  ``causal`` and the window
    (``window_left`` / ``window_right``, -1 = unbounded) are over global positions.  The semantics are
    ``attnfuse::attention``'s (`attnfuse.ops`); ``sdpa_form``: SDPA's convention, a row that sees no key is 0
    (`attnfuse.ops.attention_sdpa`).  A `ValueError` where the heads do not split over the ranks.
    """
    b, h, lc, _ = q.shape
    hk, p = k.shape[1], cp.ranks
    if h != hk * kv_groups or v.shape[1] != hk:
        raise ValueError(f"attnfuse context_parallel: q has {h} heads, k and v {hk} and {v.shape[1]}; expected "
                         f"q heads = K/V heads x kv_groups ({kv_groups})")
    if h % p:
        raise ValueError(f"attnfuse context_parallel strategy 'ulysses': {h} heads do not split over {p} ranks "
                         f"(heads must be a multiple of the ranks); use strategy 'ring' or 'auto'")
    if k.shape[2] != lc or v.shape[2] != lc:
        raise ValueError(f"attnfuse context_parallel: q, k and v must hold the same {lc} rows of the sequence; "
                         f"got k {k.shape[2]}, v {v.shape[2]}")
    repeat = kv_repeat(hk, p)
    if repeat > 1:  # repeat K/V heads so they split over the ranks; repeat divides kv_groups (p | hk * kv_groups)
        k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
        kv_groups //= repeat
    order = _rank_order(cp, lc, q.device)
    inv = None if order is None else _inverse(order)
    qh, kh, vh = (_to_heads(x, cp, inv) for x in (q, k, v))
    mask = None if key_mask is None else _gather_mask(key_mask, cp, lc, inv)
    kwargs = {"scale": scale, "causal": causal, "softcap": softcap, "kv_groups": kv_groups, "mask_fill": mask_fill,
              "window_left": window_left, "window_right": window_right}
    if sdpa_form:
        out = ops.attention_sdpa(qh, kh, vh, mask, **kwargs)
    else:
        out = ops.attention(qh, kh, vh, mask, None, None, **kwargs)[0]
    return _to_rows(out, cp, order)
