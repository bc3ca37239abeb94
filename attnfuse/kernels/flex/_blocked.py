"""The flex family's exact blocked path: attention one block of query rows at a time, with eager's numerics.

It runs where FlexAttention would not compute what eager computes: inputs holding NaN/Inf (FlexAttention skips
blocks and masks by -inf where eager multiplies ``0 * nan``), every backward on the CPU (FlexAttention has no
CPU backward), and the backward of sites whose spelling FlexAttention's autograd cannot reproduce (see the
package docstring).  Semantics are the package's, i.e. `attnfuse.kernels.reference.forward` plus ALiBi, the
band and packed documents, in eager's order of operations, for a block of rows ``[i0, i1)``:

    s = (q @ k^T) * scale                      (float32; float64 for float64 inputs)
    s = c * tanh(s / c)                         softcap
    s = s + slope[h] * (j - i)                  ALiBi
    s = where(mask, s, fill) | s + mask         the dense mask (bool keep, or additive)
    s = s.masked_fill(~structure, -inf)         causal / window band / documents (`structure`)
    p = softmax(s); out = p @ v

The backward is eager's: ``aten._softmax_backward_data``, then the gradient of each masked_fill (zero where
a bool mask or the structure masked the score), the additive mask's gradient (``mask_grad``), softcap's
``1 - tanh^2``, and the scale.  So a row with no visible key is NaN, and its gradients are those of the
masked_fill spelling (dQ 0, NaN in all of dV of its K/V head), or of the additive spelling where an additive
-inf hid a key.  Only one (batch, heads, rows, kv_len) block of scores exists at a time: never Lq x Lk.
"""

from __future__ import annotations

import torch

from ..reference import compute_dtype, sum_to

__all__ = ["backward", "forward", "structure"]

_TILE_BYTES = 32 * 2**20
_MAX_ROWS = 128
_NEG_INF = float("-inf")


def _rows(q: torch.Tensor, kv_len: int) -> int:
    per_row = max(1, q.shape[0] * q.shape[1] * kv_len * 4)
    return max(1, min(q.shape[2], _MAX_ROWS, _TILE_BYTES // per_row))


def _as4d(x: torch.Tensor | None) -> torch.Tensor | None:
    if x is None:
        return None
    while x.dim() < 4:
        x = x.unsqueeze(0)
    return x


def structure(i0: int, i1: int, kv_len: int, *, causal: bool, window_left: int, window_right: int,
              doc: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Bool (Bd | 1, 1, i1 - i0, kv_len): key j visible from query i under the band (``causal`` caps the right
    side at 0) and the packed documents ``doc`` (same segment, and in band or a prefix key); None: all visible."""
    right = (0 if window_right < 0 else min(window_right, 0)) if causal else window_right
    band = None
    if window_left >= 0 or right >= 0:
        i = torch.arange(i0, i1, device=device)[:, None]
        j = torch.arange(kv_len, device=device)[None, :]
        band = torch.ones(i1 - i0, kv_len, dtype=torch.bool, device=device)
        if window_left >= 0:
            band &= j >= i - window_left
        if right >= 0:
            band &= j <= i + right
    if doc is None:
        return None if band is None else band[None, None]
    seg = doc[:, 0]
    keep = seg[:, i0:i1, None] == seg[:, None, :]
    if band is not None:
        keep &= band | (doc[:, 1, None, :] != 0)
    return keep[:, None]


class _Block:
    """The inputs in compute dtype (K/V repeated per query head) and the per-block score recipe."""

    def __init__(self, q, k, v, mask, doc, alibi, *, scale, causal, softcap, kv_groups, mask_fill, window_left,
                 window_right):
        self.ct = compute_dtype(q.dtype)
        self.q = q.to(self.ct)
        self.k = (k if kv_groups == 1 else k.repeat_interleave(kv_groups, dim=1)).to(self.ct)
        self.v = (v if kv_groups == 1 else v.repeat_interleave(kv_groups, dim=1)).to(self.ct)
        self.mask = _as4d(mask)
        self.doc = doc
        self.alibi = None if alibi is None else alibi.to(self.ct).view(1, -1, 1, 1)
        self.scale, self.causal, self.softcap = scale, causal, softcap
        self.fill = _NEG_INF if mask_fill is None else mask_fill
        self.left, self.right = window_left, window_right
        self.lq, self.lk = q.shape[2], k.shape[2]
        self.step = _rows(q, self.lk)

    def mask_rows(self, i0: int, i1: int) -> torch.Tensor | None:
        m = self.mask
        return m if m is None or m.shape[2] == 1 else m[:, :, i0:i1]

    def scores(self, i0: int, i1: int):
        """(scores, softcap's tanh or None, bool mask's masked entries or None, structure or None)."""
        s = torch.matmul(self.q[:, :, i0:i1], self.k.transpose(-2, -1)) * self.scale
        t = None
        if self.softcap:
            t = torch.tanh(s / self.softcap)
            s = t * self.softcap
        if self.alibi is not None:
            i = torch.arange(i0, i1, device=s.device)[:, None]
            j = torch.arange(self.lk, device=s.device)[None, :]
            s = s + self.alibi * (j - i).to(self.ct)
        hidden = None
        m = self.mask_rows(i0, i1)
        if m is not None:
            if m.dtype == torch.bool:
                hidden = ~m
                s = s.masked_fill(hidden, self.fill)
            else:
                s = s + m.to(s.dtype)
        keep = structure(i0, i1, self.lk, causal=self.causal, window_left=self.left, window_right=self.right,
                         doc=self.doc, device=s.device)
        if keep is not None:
            s = s.masked_fill(~keep, _NEG_INF)
        return s, t, hidden, keep

    def blocks(self):
        for i0 in range(0, self.lq, self.step):
            yield i0, min(i0 + self.step, self.lq)


def forward(q, k, v, mask=None, doc=None, alibi=None, *, scale: float, causal: bool = False, softcap: float = 0.0,
            kv_groups: int = 1, mask_fill: float | None = None, window_left: int = -1,
            window_right: int = -1) -> torch.Tensor:
    """The output (B, H, Lq, Dv) in q's dtype, laid out in memory as (B, Lq, H, Dv)."""
    blk = _Block(q, k, v, mask, doc, alibi, scale=scale, causal=causal, softcap=softcap, kv_groups=kv_groups,
                 mask_fill=mask_fill, window_left=window_left, window_right=window_right)
    out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1]).transpose(1, 2)
    for i0, i1 in blk.blocks():
        s, _, _, _ = blk.scores(i0, i1)
        out[:, :, i0:i1] = torch.matmul(torch.softmax(s, dim=-1), blk.v).to(q.dtype)
    return out


def backward(grad_out, q, k, v, mask=None, doc=None, alibi=None, *, scale: float, causal: bool = False,
             softcap: float = 0.0, kv_groups: int = 1, mask_fill: float | None = None, window_left: int = -1,
             window_right: int = -1, mask_grad: bool = False):
    """(dq, dk, dv, dmask or None) of `forward`, contiguous, in the inputs' dtypes; ``dmask`` (the additive
    mask's gradient, its shape) only with ``mask_grad``."""
    blk = _Block(q, k, v, mask, doc, alibi, scale=scale, causal=causal, softcap=softcap, kv_groups=kv_groups,
                 mask_fill=mask_fill, window_left=window_left, window_right=window_right)
    do = grad_out.to(blk.ct)
    dq = torch.empty_like(blk.q)
    dk, dv = torch.zeros_like(blk.k), torch.zeros_like(blk.v)
    dmask = None
    if mask_grad and blk.mask is not None:
        dmask = torch.zeros(blk.mask.shape, dtype=blk.ct, device=q.device)
    for i0, i1 in blk.blocks():
        s, t, hidden, keep = blk.scores(i0, i1)
        p = torch.softmax(s, dim=-1)
        del s
        do_blk = do[:, :, i0:i1]
        dv += torch.matmul(p.transpose(-2, -1), do_blk)
        dp = torch.matmul(do_blk, blk.v.transpose(-2, -1))
        ds = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype)
        del dp, p
        if keep is not None:  # the structure's masked_fill: no gradient through a hidden score
            ds = ds.masked_fill(~keep, 0.0)
        if hidden is not None:  # the bool mask's masked_fill (fill is a constant)
            ds = ds.masked_fill(hidden, 0.0)
        if dmask is not None:
            if dmask.shape[2] == 1:
                dmask += sum_to(ds, dmask.shape)
            else:
                dmask[:, :, i0:i1] += sum_to(ds, (*dmask.shape[:2], i1 - i0, dmask.shape[3]))
        if softcap:
            ds = ds * (1 - t * t)
        ds = ds * scale
        dq[:, :, i0:i1] = torch.matmul(ds, blk.k)
        dk += torch.matmul(ds.transpose(-2, -1), blk.q[:, :, i0:i1])
    if kv_groups > 1:
        dk = dk.unflatten(1, (k.shape[1], kv_groups)).sum(2)
        dv = dv.unflatten(1, (v.shape[1], kv_groups)).sum(2)
    if dmask is not None:
        dmask = dmask.reshape(mask.shape).to(mask.dtype).contiguous()
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(), dmask
