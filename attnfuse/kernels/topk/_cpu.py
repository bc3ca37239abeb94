"""The CPU path of top-k attention: per chunk of consecutive query blocks, the selected key blocks gathered and
attended by PyTorch's fused CPU kernel or matmul-softmax-matmul (the package docstring's "CPU path")."""

from __future__ import annotations

import torch

__all__ = ["backward", "forward"]

_CHUNK_ELEMS = 2**20  # scores per CPU chunk


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


def forward(q, k, v, chosen, scale, causal, block):
    """Output (B, H, Lq, Dv) in q's dtype, laid out as (B, Lq, H, Dv), of attention over the ``chosen`` blocks."""
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


def backward(grad_out, q, k, v, chosen, scale, causal, block):
    """(dq, dk, dv) of `forward`, recomputing each chunk's probabilities."""
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
