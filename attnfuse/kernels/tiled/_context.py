"""The working state of one `attnfuse.kernels.tiled` call (`Ctx`): the inputs in tile layout, the plan, and the
per-chunk steps forward and backward share (gather, scores with every mask, softmax with phantom keys or a
sink, dropout keep masks)."""

from __future__ import annotations

import math

import torch

from ..reference import compute_dtype, phantom_keys, sink_table, window_pad_error
from . import _tiling as tiling

__all__ = ["Ctx", "unrows"]


class Ctx:
    """Inputs in tile layout and the per-call constants both passes need."""

    def __init__(self, q, k, v, mask, alibi, *, scale, causal, softcap, kv_groups, dropout_p, mask_fill,
                 window_left, window_right, block_sparse, window_pad=False, sinks=None):
        if window_pad and sinks is not None:
            raise ValueError("attnfuse tiled attention: sinks do not combine with window_pad=True; allowed: one of "
                             "them")
        if window_pad:
            why = window_pad_error(window_left, window_right, causal, q.shape[2], k.shape[2], alibi=alibi is not None,
                                   block_sparse=block_sparse)
            if why:
                raise ValueError(f"attnfuse tiled attention: {why}")
        self.window_pad = window_pad
        self.ct = ct = compute_dtype(q.dtype)
        self.b, self.h, lq, self.d = q.shape
        self.hkv, lk, self.dv = k.shape[1], k.shape[2], v.shape[-1]
        self.g = kv_groups
        self.softcap, self.dropout_p, self.mask_fill = softcap, dropout_p, mask_fill
        self.mask = None if mask is None else tiling.as4d(mask)
        if self.mask is not None:
            mb, mh = self.mask.shape[:2]
            if mb not in (1, self.b) or mh not in (1, self.h):
                raise ValueError(f"tiled attention: mask of shape {tuple(mask.shape)} does not broadcast to "
                                 f"(batch={self.b}, heads={self.h}, {lq}, {lk})")
        self.block_sparse = block_sparse and mask is not None
        self.plan = tiling.plan(lq, lk, self.h * self.b * tiling.BLOCK_M, causal, window_left, window_right, mask,
                                mask_fill, self.block_sparse, q.dtype)
        self.q = self.by_tile(q).mul_(scale)
        self.k, self.v = self._tiles(k), self._tiles(v)
        self.sink = None
        if sinks is not None:  # (1 | B, H) -> (1 | B, H_kv, 1, groups, 1, 1), against the scores
            table = sink_table(sinks, self.b, self.h, ct)
            self.sink = table.reshape(table.shape[0], self.hkv, 1, self.g, 1, 1)
        self.alibi = None
        if alibi is not None:
            self.alibi = alibi.to(ct).view(1, self.hkv, 1, self.g, 1, 1)

    def by_tile(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, L, D) -> (B, H_kv, tiles, groups * BLOCK_M, D) in the compute dtype, zero-padded."""
        b, _, lq, d = x.shape
        nqt = self.plan.nqt
        out = x.new_zeros(b, self.hkv, nqt, self.g, tiling.BLOCK_M, d, dtype=self.ct)
        dst, src = out.permute(0, 1, 3, 2, 4, 5), x.unflatten(1, (self.hkv, self.g))  # (B, H_kv, groups, ...)
        whole = lq // tiling.BLOCK_M
        dst[:, :, :, :whole].copy_(src[:, :, :, :whole * tiling.BLOCK_M].unflatten(3, (whole, tiling.BLOCK_M)))
        if lq > whole * tiling.BLOCK_M:
            dst[:, :, :, whole, :lq - whole * tiling.BLOCK_M].copy_(src[:, :, :, whole * tiling.BLOCK_M:])
        return out.view(b, self.hkv, nqt, self.g * tiling.BLOCK_M, d)

    def _tiles(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, L, D) -> (B, H_kv, tiles + 1, BLOCK_N, D), zero-padded; the extra tile feeds pad slots."""
        b, hkv, lk, d = x.shape
        out = x.new_zeros(b, hkv, (self.plan.nkt + 1) * tiling.BLOCK_N, d, dtype=self.ct)
        out[:, :, :lk].copy_(x)
        return out.view(b, hkv, self.plan.nkt + 1, tiling.BLOCK_N, d)

    def take(self, x: torch.Tensor, c: tiling.Chunk) -> torch.Tensor:
        if c.span is not None:
            return x[:, :, c.span]
        return x.view(self.b * self.hkv, x.shape[2], -1).index_select(1, c.rows).view(*x.shape[:2], -1, *x.shape[3:])

    def gather(self, x: torch.Tensor, c: tiling.Chunk) -> torch.Tensor:
        # index_select on dim 1 of a 3-D view: ~10x faster than on dim 2 of the 5-D tensor (PyTorch 2.x CPU)
        n, t = c.tiles.shape
        flat = x.view(self.b * self.hkv, x.shape[2], -1).index_select(1, c.tiles.flatten())
        return flat.view(self.b, self.hkv, n, t * tiling.BLOCK_N, x.shape[-1])

    def positions(self, c: tiling.Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute query rows (n, BLOCK_M) and key columns (n, T * BLOCK_N) of a chunk."""
        qi = c.rows[:, None] * tiling.BLOCK_M + torch.arange(tiling.BLOCK_M)
        kj = (c.tiles[:, :, None] * tiling.BLOCK_N + torch.arange(tiling.BLOCK_N)).flatten(1)
        return qi, kj

    def by_kv_head(self, x: torch.Tensor) -> torch.Tensor:
        """(mb, 1 | H, n, X, Y) -> (mb, 1 | H_kv, n, 1 | groups, X, Y), to broadcast against the scores."""
        if x.shape[1] == 1:
            return x.unsqueeze(3)
        return x.unflatten(1, (self.hkv, self.g)).transpose(2, 3)

    def mask_index(self, qi: torch.Tensor, kj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column indices into the mask (clamped; size-1 broadcast dims read index 0)."""
        mq, mk = self.mask.shape[-2:]
        ri = qi.clamp(max=mq - 1) if mq > 1 else qi.new_zeros(qi.shape[0], 1)
        ci = kj.clamp(max=mk - 1) if mk > 1 else kj.new_zeros(kj.shape[0], 1)
        return ri, ci

    def mask_values(self, c: tiling.Chunk, qi: torch.Tensor, kj: torch.Tensor) -> torch.Tensor:
        """The mask entries of a chunk, (mb, mh, n, BLOCK_M | 1, T * BLOCK_N | 1).

        Block-sparse chunks read only their partial tiles; full tiles get the neutral value.
        """
        ri, ci = self.mask_index(qi, kj)
        if c.partial is None:
            return self.mask[:, :, ri[:, :, None], ci[:, None, :]]
        n, t = c.tiles.shape
        neutral = True if self.mask.dtype == torch.bool else 0.0
        mb, mh = self.mask.shape[:2]
        out = self.mask.new_full((mb, mh, n, ri.shape[1], t, tiling.BLOCK_N), neutral)
        pa, pt = c.partial.nonzero(as_tuple=True)
        cols = ci.expand(n, t * tiling.BLOCK_N).view(n, t, tiling.BLOCK_N)[pa, pt]  # (P, BLOCK_N)
        vals = self.mask[:, :, ri[pa][:, :, None], cols[:, None, :]]  # (mb, mh, P, BLOCK_M | 1, BLOCK_N)
        out[:, :, pa, :, pt, :] = vals.permute(2, 0, 1, 3, 4)
        return out.flatten(4)

    def scores(self, c: tiling.Chunk, qc: torch.Tensor, kc: torch.Tensor):
        """Masked scores (B, H_kv, n, groups, BLOCK_M, T * BLOCK_N), the softcap's tanh (or None), and the
        entries whose gradient is structurally zero (out of band, beyond lk, masked by a bool mask) as a list
        of (score columns, bool mask over them)."""
        s = torch.matmul(qc, kc.transpose(-1, -2))
        s = s.view(*s.shape[:3], self.g, tiling.BLOCK_M, s.shape[-1])
        t = None
        if self.softcap:
            t = torch.tanh(s.div_(self.softcap))
            s = torch.mul(t, self.softcap)
        qi, kj = self.positions(c)
        if self.alibi is not None:
            s.add_(self.alibi * (kj[:, None, None, :] - qi[:, None, :, None]).to(self.ct))
        dead = []
        if self.mask is not None and (c.partial is not None or not self.block_sparse):
            m = self.by_kv_head(self.mask_values(c, qi, kj))
            if m.dtype == torch.bool:
                dead.append((slice(None), ~m))
                s.masked_fill_(dead[-1][1], self.mask_fill)
            else:
                s.add_(m)
        for cols in c.band:
            rel = kj[:, None, cols] - qi[:, :, None]
            out = ((rel < -self.plan.left) | (rel > self.plan.right) | (kj[:, None, cols] >= self.plan.lk))[:, None]
            s[..., cols].masked_fill_(out, -math.inf)
            dead.append((cols, out))
        return s, t, dead

    def keep(self, seed: int, index: int, shape: torch.Size) -> torch.Tensor:
        gen = torch.Generator()
        gen.manual_seed((seed * 1_000_003 + index) % (2**63))
        return torch.rand(shape, generator=gen) >= self.dropout_p

    def softmax(self, s: torch.Tensor, c: tiling.Chunk) -> torch.Tensor:
        """softmax over the chunk's keys, plus a padded window's phantom keys (score 0, value 0) per row."""
        if self.sink is not None:
            return self.sunk_softmax(s)[0]
        if not self.window_pad:
            return torch.softmax(s, dim=-1)
        qi, _ = self.positions(c)
        n = phantom_keys(qi, self.plan.lq, self.plan.left, self.plan.right).to(self.ct)[:, None, :, None]
        m = torch.amax(s, dim=-1, keepdim=True)
        m = torch.where(n > 0, m.clamp(min=0.0), m)  # (n, 1, BLOCK_M, 1) broadcasts over (B, H_kv, n, g, M, 1)
        p = s.sub_(m).exp_()
        # rows with phantoms have m >= 0; the clamp keeps exp(-m) finite (0 * inf) in the others
        return p.div_(p.sum(-1, keepdim=True).add_(n * torch.exp(-m.clamp(min=0.0))))

    def sunk_softmax(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(p over the chunk's keys, the sink's probability (..., M, 1)): softmax over ``[s, sink]``."""
        m = torch.maximum(torch.amax(s, dim=-1, keepdim=True), self.sink)  # the sink is finite: so is m
        p = s.sub_(m).exp_()
        e = torch.exp(self.sink - m)
        denom = p.sum(-1, keepdim=True).add_(e)
        return p.div_(denom), e.div_(denom)

    def pad_rows(self, c: tiling.Chunk) -> torch.Tensor | None:
        """(n, 1, BLOCK_M, 1) rows beyond lq, or None when the chunk has none."""
        if not c.pad_rows or self.plan.lq % tiling.BLOCK_M == 0:
            return None
        qi, _ = self.positions(c)
        return (qi >= self.plan.lq)[:, None, :, None]


def unrows(ctx: Ctx, x: torch.Tensor, lq: int) -> torch.Tensor:
    """(B, H_kv, tiles, groups * BLOCK_M, D) -> (B, H, lq, D)."""
    b, _, nqt, _, d = x.shape
    x = x.view(b, ctx.hkv, nqt, ctx.g, tiling.BLOCK_M, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, ctx.h, nqt * tiling.BLOCK_M, d)[:, :, :lq]
