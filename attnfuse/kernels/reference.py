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

Padded windows (``window_pad=True``, the band kernels only: `attnfuse.kernels.tiled` and the Triton window
kernels) reproduce the textbook ``unfold`` spelling of local attention, which pads K/V with zero rows and
takes a window of ``left + right + 1`` keys per query: the window's zero rows are real keys of score 0
(after scale and softcap: no mask, bias or ALiBi reaches them) and value 0.  So query ``i`` sees the band's
real keys plus `phantom_keys` ``n_pad(i)`` keys at positions outside ``[0, L)``, each adding ``exp(0 - m)``
to its softmax denominator and nothing to its output; they are constants (no gradient).  It needs a finite
band (``causal`` caps its right side at 0) and ``q_len == kv_len``: `window_pad_error` says why not.

Attention sinks (``sinks``: one learned logit per head, (H,) or broadcastable to (B, H); GPT-OSS,
x-transformers' ``attn_sink``): each row has one more key, of score ``sinks[b, h]`` (not scaled, capped or
masked) and value 0, so ``p = softmax([s, sink])[..., :-1]``: ``out_i = sum_j e^(s_ij - m) v_j / (sum_j
e^(s_ij - m) + e^(sink - m))``.  A row whose every real key is -inf gives ``out = 0`` (not NaN), as eager.
The sink's gradient is ``-sum_i P_sink(i) * delta_i`` with ``delta_i = sum_j p_ij dp_ij = dO_i . O_i`` (its
own ``dp`` is 0: the value is 0).  `sink_table` checks and normalizes the argument.
"""

from __future__ import annotations

import torch

_TILE_BYTES = 32 * 2**20


def window_pad_error(window_left: int, window_right: int, causal: bool, q_len, kv_len, *,
                     alibi: bool = False, block_sparse: bool = False) -> str | None:
    """Why ``window_pad=True`` cannot apply to these settings (one sentence naming the allowed values), or None."""
    right = (0 if window_right < 0 else min(window_right, 0)) if causal else window_right
    if window_left < 0 or right < 0:
        return (f"window_pad=True needs a finite band, window_left >= 0 and window_right >= 0 (or causal=True); "
                f"got window_left={window_left}, window_right={window_right}, causal={causal}; pass "
                f"window_pad=False for any other band")
    if q_len != kv_len:
        return (f"window_pad=True needs q_len == kv_len (its band is relative to one sequence's positions); got "
                f"q_len={q_len}, kv_len={kv_len}")
    if alibi or block_sparse:
        return (f"window_pad=True does not combine with {'alibi' if alibi else 'block_sparse=True'} (the padded "
                f"keys' scores are exactly 0); allowed: window_pad=False")
    return None


def sink_error(sinks, batch: int, heads: int, dtype: torch.dtype) -> str | None:
    """Why ``sinks`` is not a valid per-head sink argument (one sentence naming the allowed values), or None."""
    if sinks is None:
        return None
    shape = tuple(sinks.shape)
    ok = (sinks.dim() == 1 and shape[0] == heads) or (
        sinks.dim() == 2 and shape[0] in (1, batch) and shape[1] in (1, heads))
    if not ok:
        return (f"sinks must be one logit per head, shape ({heads},) or broadcastable to (batch, heads) = "
                f"({batch}, {heads}); got {shape}")
    if sinks.dtype not in (torch.float32, dtype):
        return f"sinks must be float32 or the inputs' dtype {dtype}; got {sinks.dtype}"
    return None


def sink_table(sinks: torch.Tensor, batch: int, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """``sinks`` as a (1 | B, H) tensor of ``dtype`` (the compute dtype), for (B, H, L, ...) broadcasting."""
    s = sinks.view(1, -1) if sinks.dim() == 1 else sinks
    return s.to(dtype).expand(s.shape[0], heads)


def sink_grad(grad: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """The (B, H) sink gradient summed back to ``sinks``' own shape and dtype."""
    g = grad.sum(0) if sinks.dim() == 1 else sum_to(grad, sinks.shape)
    return g.reshape(sinks.shape).to(sinks.dtype)


def phantom_keys(rows: torch.Tensor, length: int, left: int, right: int) -> torch.Tensor:
    """``n_pad(i)`` for each query row ``i`` of ``rows`` (any int tensor): the positions of the band
    ``[i - left, i + right]`` outside ``[0, length)`` (``causal`` already folded into ``right``)."""
    return (left - rows).clamp(min=0) + (rows + right + 1 - length).clamp(min=0)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the scores and softmax run in for inputs of ``dtype``: float64 for float64, else float32."""
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


def _softmax(s: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """softmax over the keys, or over the keys and the sink column (dropped from the result)."""
    if sink is None:
        return torch.softmax(s, dim=-1)
    col = sink[:, :, None, None].expand(*s.shape[:-1], 1)
    return torch.softmax(torch.cat([s, col], dim=-1), dim=-1)


def forward(q, k, v, mask=None, seed=0, *, scale, causal=False, softcap=0.0, kv_groups=1,
            dropout_p=0.0, mask_fill=float("-inf"), sinks=None):
    """Blocked attention forward; see the module docstring for the semantics."""
    ct = compute_dtype(q.dtype)
    sink = None if sinks is None else sink_table(sinks, q.shape[0], q.shape[1], ct)
    qf, kf, vf = q.to(ct), _expand_kv(k, kv_groups).to(ct), _expand_kv(v, kv_groups).to(ct)
    # (B, H, Lq, Dv) laid out as (B, Lq, H, Dv): the layout every attnfuse kernel writes
    out = torch.empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device).transpose(1, 2)
    step = _block_rows(q, k.shape[-2])
    for block, i0 in enumerate(range(0, q.shape[-2], step)):
        i1 = min(i0 + step, q.shape[-2])
        s, _ = _scores(qf[..., i0:i1, :], kf, _mask_rows(mask, i0, i1), i0, scale, causal, softcap, mask_fill)
        p = _softmax(s, sink)
        p = p if sink is None else p[..., :-1]
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
             dropout_p=0.0, mask_fill=float("-inf"), mask_grad=False, sinks=None):
    """Gradients (dq, dk, dv, dmask or None[, dsinks]) of `forward`, recomputing scores per block; ``dsinks``
    (``sinks``' shape and dtype) is returned only when ``sinks`` is given."""
    ct = compute_dtype(q.dtype)
    sink = None if sinks is None else sink_table(sinks, q.shape[0], q.shape[1], ct)
    dsink = None if sinks is None else torch.zeros(q.shape[0], q.shape[1], dtype=torch.float64, device=q.device)
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
        p_all = _softmax(s, sink)  # with the sink column, if any: the softmax backward needs it
        p = p_all if sink is None else p_all[..., :-1]
        dp = torch.matmul(do[..., i0:i1, :], vf.transpose(-2, -1))
        if dropout_p > 0:
            keep = _dropout_keep(seed, block, p.shape, dropout_p, p.device) / (1 - dropout_p)
            dv += torch.matmul((p * keep).transpose(-2, -1), do[..., i0:i1, :])
            dp = dp * keep
        else:
            dv += torch.matmul(p.transpose(-2, -1), do[..., i0:i1, :])
        # softmax backward with eager's own kernel, p * (dp - rowsum(p * dp)): the flash-style
        # rowsum(dO * O) cancels badly in float32 (up to ~10x eager's gradient error on short rows)
        if sink is not None:  # the sink's value is 0: its dp is 0, and its ds is the sink's gradient
            ds = torch.ops.aten._softmax_backward_data(torch.nn.functional.pad(dp, (0, 1)), p_all, -1, p.dtype)
            dsink += ds[..., -1].sum(-1, dtype=torch.float64)  # a sum over every row
            ds = ds[..., :-1]
        else:
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
    if sinks is not None:
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask, sink_grad(dsink, sinks)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask
