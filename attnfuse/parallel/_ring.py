"""Ring context parallelism: K/V chunks travel around the ranks, each rank merges its rows' partial attention.

`ring` computes attention over the global sequence for this rank's query rows.  Step ``s`` (of ``P``) holds rank
``rank - s``'s K/V chunk (and its key-mask chunk); the next step's chunk is sent before the current one is used,
with an asynchronous functional collective (``all_to_all_single`` to the next rank), so the transfer overlaps the
step's compute.  Each step's partial (`attnfuse.kernels._partial`: unnormalized output, row max, row sum, in
float32) is merged into the running one; a step (or a pair of zigzag halves) that the band leaves empty is
skipped, decided from the static global positions of both sides.

The backward (`torch.autograd.Function`) runs the ring again with the global statistics: each step adds the
visiting chunk's contribution to ``dq`` and computes its ``dk``/``dv``, which travel one step behind the chunk and
arrive home after the last step, so every rank ends with the gradients of its own K/V. A row that sees no key
(every score -inf) is NaN, with eager's NaN pattern in the gradients when the masks are spelled with masked_fill /
where (NaN in all of ``dv`` of its K/V head; NaN in ``dq``/``dk`` only where an additive -inf bias, not a bool mask
or the band, removed a key), or 0 with no gradient with ``sdpa_form`` (SDPA's convention). Everything is tensor
code with static Python control flow over functional collectives, so dynamo and AOTAutograd trace it; each step's
partial is one custom op (its row-block loop runs inside it), so the traced graph does not grow with the sequence.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed._functional_collectives as fc

from ..kernels._partial import Segment, empty, expand_kv, merge, partial_backward, partial_forward, right_edge, visible
from ._spec import ContextParallel, check_local_len

__all__ = ["ring", "segments"]


def segments(cp: ContextParallel, rank: int, local_len: int) -> tuple[Segment, ...]:
    """Rank ``rank``'s rows as runs of contiguous global positions ``(local start, local stop, global start)``:
    the same positions as `attnfuse.parallel.positions`, as Python ints."""
    check_local_len(cp, local_len)
    if cp.layout == "contiguous":
        return ((0, local_len, rank * local_len),)
    half = local_len // 2
    return ((0, half, rank * half), (half, local_len, (2 * cp.ranks - 1 - rank) * half))


class _Cfg(NamedTuple):
    group: str
    ranks: int
    rank: int
    layout: str
    scale: float
    softcap: float
    fill: float
    left: int
    right: int
    groups: int
    sdpa_form: bool


@torch.compiler.assume_constant_result
def _rank(cp: ContextParallel) -> int:
    """This process's rank in ``cp``'s group (dynamo evaluates it once while tracing, as a constant: each rank
    traces its own graph)."""
    return cp.rank()


def _spec(cfg: _Cfg) -> ContextParallel:
    return ContextParallel(cfg.group, cfg.ranks, "ring", cfg.layout)


def _shift(x: torch.Tensor, cfg: _Cfg) -> torch.Tensor:
    """``x`` sent to the next rank; returns the previous rank's (asynchronous: waited at first use)."""
    if cfg.ranks == 1:
        return x
    flat = x.reshape(-1)
    wire = flat.view(torch.uint8) if flat.dtype == torch.bool else flat
    sizes_in, sizes_out = [0] * cfg.ranks, [0] * cfg.ranks
    sizes_in[(cfg.rank + 1) % cfg.ranks] = wire.numel()
    sizes_out[(cfg.rank - 1) % cfg.ranks] = wire.numel()
    got = fc.all_to_all_single(wire, sizes_out, sizes_in, cfg.group)
    got = got.view(torch.bool) if flat.dtype == torch.bool else got
    return got.view(x.shape)


def _shift_kv(chunk, anchor: torch.Tensor, cfg: _Cfg):
    """The backward's transfer of a (k, v, mask) chunk, k and v as one buffer, made to depend on ``anchor`` (an
    exact 0 computed from the incoming gradient).  A backward collective that reads only saved forward values is
    hoisted into the forward by the compiled joint graph's partitioner (collectives are never recomputed), and
    the forward would then keep every chunk the backward receives alive until the backward: the ring's memory
    would not fall with the ranks."""
    k, v, mask = chunk
    kv = _shift(torch.cat([k.reshape(-1), v.to(k.dtype).reshape(-1)]) + anchor.to(k.dtype), cfg)
    if mask is not None:
        mask = _shift(mask | (anchor != 0) if mask.dtype == torch.bool else mask + anchor.to(mask.dtype), cfg)
    return kv[:k.numel()].view(k.shape), kv[k.numel():].view(v.shape).to(v.dtype), mask


def _touch(chunk, x: torch.Tensor) -> torch.Tensor:
    """``x`` plus an exact 0 that reads a received chunk no step uses (a band that skips the last step): a traced
    collective whose result is unused is dead code on this rank only, and the ranks' collectives would mismatch
    (and in eager the transfer is waited for).  A sum over an empty slice: no NaN/Inf reaches ``x``."""
    for t in chunk:
        if t is not None:
            x = x + t.reshape(-1)[:0].sum().to(x.dtype)
    return x


def _pairs(cfg: _Cfg, local_len: int, src: int):
    """(row segment index, row segment, key segment) pairs of a step whose band is not empty."""
    cp = _spec(cfg)
    rows, keys = segments(cp, cfg.rank, local_len), segments(cp, src, local_len)
    return [(a, r, kk) for a, r in enumerate(rows) for kk in keys if visible(r, kk, cfg.left, cfg.right)]


def _forward(q, k, v, mask, cfg: _Cfg):
    ct = q.dtype
    rows = segments(_spec(cfg), cfg.rank, q.shape[-2])
    parts = [None] * len(rows)
    chunk, unused = (k, v, mask), ()
    for step in range(cfg.ranks):
        src = (cfg.rank - step) % cfg.ranks
        nxt = tuple(None if x is None else _shift(x, cfg) for x in chunk) if step < cfg.ranks - 1 else None
        todo = _pairs(cfg, q.shape[-2], src)
        if todo:
            kk, vv = expand_kv(chunk[0].to(ct), cfg.groups), expand_kv(chunk[1].to(ct), cfg.groups)
            for a, r, keys in todo:
                part = partial_forward(q[..., r[0]:r[1], :], kk, vv, chunk[2], (0, r[1] - r[0], r[2]), keys,
                                       left=cfg.left, right=cfg.right, scale=cfg.scale, softcap=cfg.softcap,
                                       mask_fill=cfg.fill)
                parts[a] = merge(parts[a], part)
        elif nxt is None:
            unused = chunk
        chunk = nxt
    parts = [empty(q[..., r[0]:r[1], :], r, v.shape[-1]) if p is None else p for p, r in zip(parts, rows)]
    acc, m, rsum = (torch.cat([p[i] for p in parts], -1 if i else -2) for i in range(3))
    return _touch(unused, acc), m, rsum


def _backward(q, k, v, mask, out, m, rsum, do, cfg: _Cfg):
    ct, lc = q.dtype, q.shape[-2]
    rows = segments(_spec(cfg), cfg.rank, lc)
    # rowsum(dO * out), summed in float64: a float32 sum here costs up to ~3x eager's dq error (eager sums p * dp)
    delta = (do.double() * out.double()).sum(-1).to(do.dtype)
    dqs = [torch.zeros_like(q[..., r[0]:r[1], :]) for r in rows]
    poison = None
    if not cfg.sdpa_form:  # eager: a NaN row of p reaches every key's dv of its K/V head
        nan_bh = torch.where((rsum == 0).any(-1), float("nan"), 0.0)
        poison = nan_bh.unflatten(1, (k.shape[1], cfg.groups)).sum(2)[..., None, None]
    anchor = do.reshape(-1)[:0].sum()  # an exact 0 that depends on the gradient (see _shift_kv)
    chunk, sent = (k, v, mask), None
    for step in range(cfg.ranks):
        src = (cfg.rank - step) % cfg.ranks
        nxt = _shift_kv(chunk, anchor, cfg) if step < cfg.ranks - 1 else None
        dk, dv = torch.zeros(k.shape, dtype=ct, device=q.device), torch.zeros(v.shape, dtype=ct, device=q.device)
        todo = _pairs(cfg, lc, src)
        if todo:
            kk, vv = expand_kv(chunk[0].to(ct), cfg.groups), expand_kv(chunk[1].to(ct), cfg.groups)
            dke, dve = torch.zeros_like(kk), torch.zeros_like(vv)
            for a, r, keys in todo:
                sl = slice(r[0], r[1])
                dq_r, dk_r, dv_r = partial_backward(
                    q[..., sl, :], kk, vv, chunk[2], do[..., sl, :], m[..., sl], rsum[..., sl], delta[..., sl],
                    (0, r[1] - r[0], r[2]), keys, left=cfg.left, right=cfg.right, scale=cfg.scale,
                    softcap=cfg.softcap, mask_fill=cfg.fill, dead_nan=not cfg.sdpa_form)
                dqs[a] = dqs[a] + dq_r
                pad = (0, 0, keys[0], lc - keys[1])
                dke = dke + torch.nn.functional.pad(dk_r, pad)
                dve = dve + torch.nn.functional.pad(dv_r, pad)
            if cfg.groups > 1:
                dke, dve = (x.unflatten(1, (k.shape[1], cfg.groups)).sum(2) for x in (dke, dve))
            dk, dv = dke, dve
        elif nxt is None:
            dk = _touch(chunk, dk)
        if poison is not None:
            dv = dv + poison
        if sent is not None:  # the gradients of this chunk so far, one step behind it
            dk, dv = dk + sent[0], dv + sent[1]
        both = _shift(torch.cat([dk.reshape(-1), dv.reshape(-1)]), cfg)
        if step == cfg.ranks - 1 and cfg.ranks > 1:  # home: nothing left to overlap with
            both = fc.wait_tensor(both)
        sent = (both[:dk.numel()].view(dk.shape), both[dk.numel():].view(dv.shape))
        chunk = nxt
    return torch.cat(dqs, -2), sent[0], sent[1]


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, cfg: _Cfg):
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        acc, m, rsum = _forward(q.to(ct), k, v, mask, cfg)
        out = acc / rsum[..., None]  # 0 / 0 = NaN where a row sees no key (eager's softmax)
        if cfg.sdpa_form:
            out = torch.where((rsum == 0)[..., None], 0.0, out)
        ctx.save_for_backward(q, k, v, mask, out, m, rsum)
        ctx.cfg = cfg
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, mask, out, m, rsum = ctx.saved_tensors
        ct = out.dtype
        dq, dk, dv = _backward(q.to(ct), k, v, mask, out, m, rsum, grad.to(ct), ctx.cfg)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def _key_mask(key_mask: torch.Tensor | None, q: torch.Tensor, local_len: int) -> torch.Tensor | None:
    """The key mask as (B | 1, 1, 1, Lc): bool as given, a bias in the compute dtype."""
    if key_mask is None:
        return None
    if key_mask.requires_grad:
        raise ValueError("attnfuse context_parallel ring: key_mask must not require grad (no gradient flows to a "
                         "key mask); allowed: a constant bool or float mask")
    batch = q.shape[0]
    if key_mask.dim() > 4 or torch.broadcast_shapes(key_mask.shape, (batch, 1, 1, local_len)) != (
            batch, 1, 1, local_len):
        raise ValueError(f"attnfuse context_parallel ring: key_mask of shape {tuple(key_mask.shape)} does not "
                         f"broadcast to (batch, 1, 1, local_len) = {(batch, 1, 1, local_len)}; allowed: a mask "
                         f"over this rank's keys only")
    m = key_mask.reshape((1,) * (4 - key_mask.dim()) + tuple(key_mask.shape))
    m = m.expand(m.shape[0], 1, 1, local_len).contiguous()
    if m.dtype != torch.bool:
        m = m.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return m


def ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None, *,
         cp: ContextParallel, scale: float, causal: bool = False, softcap: float = 0.0, kv_groups: int = 1,
         mask_fill: float | None = None, window_left: int = -1, window_right: int = -1,
         sdpa_form: bool = False) -> torch.Tensor:
    """Attention of this rank's rows ``q`` (B, H, Lc, D) over every rank's keys ``k``/``v`` (B, Hk, Lc, D / Dv),
    ``H = Hk * kv_groups``, all at the global positions of ``cp``'s layout; returns this rank's (B, H, Lc, Dv).

    ``key_mask``: None or broadcastable to (B, 1, 1, Lc) over this rank's keys: bool (True = attend, a masked
    score becomes ``mask_fill``, None = -inf) or an additive float bias; it gets no gradient.  ``causal`` and
    ``window_left``/``window_right`` (-1 = unbounded) band the global positions.  Semantics as
    `attnfuse.kernels.reference`; a row that sees no key is NaN, or 0 with ``sdpa_form``."""
    lc = q.shape[-2]
    check_local_len(cp, lc)
    if k.shape[-2] != lc or v.shape[-2] != lc or q.shape[1] != k.shape[1] * kv_groups:
        raise ValueError(f"attnfuse context_parallel ring: needs q (B, Hk * kv_groups, Lc, D) and k/v (B, Hk, Lc, "
                         f"D / Dv) with the same Lc; got q {tuple(q.shape)}, k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)}, kv_groups={kv_groups}")
    mask = _key_mask(key_mask, q, lc)
    cfg = _Cfg(cp.group_name, cp.ranks, _rank(cp), cp.layout, float(scale), float(softcap),
               -math.inf if mask_fill is None else float(mask_fill), int(window_left),
               right_edge(causal, int(window_right)), int(kv_groups), bool(sdpa_form))
    return _Ring.apply(q, k, v, mask, cfg)
