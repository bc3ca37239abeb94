"""Pure-torch attention, blocked over queries: the semantic reference and the
CPU fallback for what PyTorch's fused SDPA cannot express.

Semantics (shared by every attnfuse kernel), with ``s = scale * q @ k^T``:

1. softcap ``c``:        ``s = c * tanh(s / c)``
2. mask, bool:           ``s = where(mask, s, mask_fill)``   (True = attend)
   mask, float:          ``s = s + mask``                    (additive bias)
3. causal (top-left):    ``s[i, j] = -inf`` for ``j > i``
4. ``p = softmax(s)`` in float32; a row whose scores are all ``-inf`` is NaN,
   exactly as eager PyTorch's softmax (SDPA returns zeros there instead).
5. dropout ``p_drop``:   ``p = p * keep / (1 - p_drop)`` with ``keep`` drawn
   per query block from a generator seeded by ``(seed, block)``, so the
   backward pass regenerates the same mask.
6. ``out = p @ v``; K/V carry ``heads / kv_groups`` heads (GQA/MQA), head
   ``h`` reads K/V head ``h // kv_groups``.

Only one block of ``block_q`` query rows of scores exists at a time.
"""

from __future__ import annotations

import torch

_TILE_BYTES = 32 * 2**20


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_rows(q: torch.Tensor, kv_len: int) -> int:
    rows = _TILE_BYTES // max(1, q.shape[0] * q.shape[1] * kv_len * 4)
    return max(1, min(q.shape[2], rows))


def _mask_rows(mask: torch.Tensor | None, i0: int, i1: int) -> torch.Tensor | None:
    if mask is None or mask.dim() < 2 or mask.shape[-2] == 1:
        return mask
    return mask[..., i0:i1, :]


def _dropout_keep(seed: int, block: int, shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + block) % (2**63))
    return torch.rand(shape, generator=gen, device=device) >= p


def _scores(q_blk, k, mask_blk, i0, scale, causal, softcap, mask_fill):
    """Returns (scores after every step, tanh value for the softcap backward)."""
    s = torch.matmul(q_blk, k.transpose(-2, -1)) * scale
    t = None
    if softcap:
        t = torch.tanh(s / softcap)
        s = t * softcap
    if mask_blk is not None:
        if mask_blk.dtype == torch.bool:
            s = s.masked_fill(~mask_blk, mask_fill)
        else:
            s = s + mask_blk.to(s.dtype)
    if causal:
        rows = torch.arange(i0, i0 + s.shape[-2], device=s.device)[:, None]
        cols = torch.arange(s.shape[-1], device=s.device)[None, :]
        s = s.masked_fill(cols > rows, float("-inf"))
    return s, t


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def forward(q, k, v, mask=None, seed=0, *, scale, causal=False, softcap=0.0, kv_groups=1,
            dropout_p=0.0, mask_fill=float("-inf")):
    """Blocked attention forward; see the module docstring for the semantics."""
    ct = _compute_dtype(q.dtype)
    qf, kf, vf = q.to(ct), _expand_kv(k, kv_groups).to(ct), _expand_kv(v, kv_groups).to(ct)
    # (B, H, Lq, Dv) laid out as (B, Lq, H, Dv): the layout every attnfuse kernel writes
    out = torch.empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device).transpose(1, 2)
    step = _block_rows(q, k.shape[-2])
    for block, i0 in enumerate(range(0, q.shape[-2], step)):
        i1 = min(i0 + step, q.shape[-2])
        s, _ = _scores(qf[..., i0:i1, :], kf, _mask_rows(mask, i0, i1), i0, scale, causal, softcap, mask_fill)
        p = torch.softmax(s, dim=-1)
        if dropout_p > 0:
            p = p * _dropout_keep(seed, block, p.shape, dropout_p, p.device) / (1 - dropout_p)
        out[..., i0:i1, :] = torch.matmul(p, vf).to(q.dtype)
    return out


def sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to ``shape`` (right-aligned broadcasting)."""
    lead = grad.dim() - len(shape)
    if lead:
        grad = grad.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def backward(grad_out, q, k, v, mask=None, seed=0, *, scale, causal=False, softcap=0.0, kv_groups=1,
             dropout_p=0.0, mask_fill=float("-inf"), mask_grad=False):
    """Gradients (dq, dk, dv, dmask or None) of `forward`, recomputing scores per block."""
    ct = _compute_dtype(q.dtype)
    qf, kf, vf = q.to(ct), _expand_kv(k, kv_groups).to(ct), _expand_kv(v, kv_groups).to(ct)
    do = grad_out.to(ct)
    dq = torch.empty_like(qf)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    dmask = torch.zeros(mask.shape, dtype=ct, device=q.device) if mask_grad else None
    step = _block_rows(q, k.shape[-2])
    for block, i0 in enumerate(range(0, q.shape[-2], step)):
        i1 = min(i0 + step, q.shape[-2])
        mask_blk = _mask_rows(mask, i0, i1)
        s, t = _scores(qf[..., i0:i1, :], kf, mask_blk, i0, scale, causal, softcap, mask_fill)
        p = torch.softmax(s, dim=-1)
        dp = torch.matmul(do[..., i0:i1, :], vf.transpose(-2, -1))
        if dropout_p > 0:
            keep = _dropout_keep(seed, block, p.shape, dropout_p, p.device) / (1 - dropout_p)
            dv += torch.matmul((p * keep).transpose(-2, -1), do[..., i0:i1, :])
            dp = dp * keep
        else:
            dv += torch.matmul(p.transpose(-2, -1), do[..., i0:i1, :])
        # softmax backward with eager's own kernel, p * (dp - rowsum(p * dp)): the flash-style
        # rowsum(dO * O) cancels badly in float32 (up to ~10x eager's gradient error on short rows)
        ds = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype)
        if mask_blk is not None and mask_blk.dtype == torch.bool:
            # masked scores are the constant mask_fill: no gradient (matters for finite fills, where a
            # fully masked row is uniform and p is not 0 at the masked keys)
            ds = ds.masked_fill(~mask_blk, 0.0)
        if dmask is not None:
            reduced = sum_to(ds, mask_blk.shape)
            if mask.dim() >= 2 and mask.shape[-2] != 1:
                dmask[..., i0:i1, :] += reduced
            else:
                dmask += reduced
        if softcap:
            ds = ds * (1 - t * t)
        ds = ds * scale
        dq[..., i0:i1, :] = torch.matmul(ds, kf)
        dk += torch.matmul(ds.transpose(-2, -1), qf[..., i0:i1, :])
    if kv_groups > 1:
        dk = dk.unflatten(1, (k.shape[1], kv_groups)).sum(2)
        dv = dv.unflatten(1, (v.shape[1], kv_groups)).sum(2)
    dmask = None if dmask is None else dmask.to(mask.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask
