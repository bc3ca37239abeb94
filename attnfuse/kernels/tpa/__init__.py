"""The ``tpa`` family: Tensor Product Attention (arXiv 2501.06425, the T6 model) attended from its factors.

TPA forms each token's queries, keys and values as products of small per-token factors.  A side (q, k or v) given
as `Factors` ``(a, b, scale)`` means

    x[n, h, t, :] = scale * sum_r a[n, t, h, r] * b[n, t, r, :]        a: (B, L, H, R), b: (B, L, R, D)

(``scale`` is the model's ``1 / R``; RoPE applied to ``b`` is part of ``b``).  `attention` computes exact
attention over the formed tensors without writing the formed K/V to memory: each block of keys is formed from
its factors, used and dropped (on the CPU, `_cpu`: one block at a time, through `attnfuse.kernels._partial`;
decode-sized queries attend to the factors directly, never forming K/V at all).  Any side may instead be a plain
(B, H, L, D) tensor (only K/V factorized, or only Q).

Semantics (those of `attnfuse.kernels.reference` on the formed tensors): ``scale`` multiplies the scores;
``softcap`` > 0 caps them (``c * tanh(s / c)``); ``key_mask`` is None or broadcastable to (B, 1, 1, Lk): bool
(True = attend; a masked score becomes ``mask_fill``, None = -inf) or an additive float bias (no gradient flows
to it); ``causal`` and ``window_left``/``window_right`` (-1 = unbounded) keep key ``j`` for query ``i`` iff
``i - left <= j <= i + right`` (top-left aligned, as the op); K/V have ``H / kv_groups`` heads, query head ``h``
reading K/V head ``h // kv_groups``.  A row that sees no key is NaN (eager's softmax), or 0 with no gradient with
``sdpa_form`` (SDPA's safe softmax).
Gradients flow to every tensor of every side (factors included), not to the key mask.

Dispatch: CPU tensors run `_cpu` (unless ``TRITON_INTERPRET=1``); CUDA tensors, and CPU tensors under the
interpreter, run the Triton kernels of `_triton` where they take the case (`_triton.supported`).
"""

from __future__ import annotations

import torch

from . import _cpu, _triton
from ._factors import Factors, Side, form

__all__ = ["Factors", "attention", "form", "reference"]


def _shape(x: Side) -> tuple[int, int, int, int]:
    """(B, H, L, D) of a side."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 4:
            raise ValueError(f"attnfuse tpa: a plain side must be (B, H, L, D); got shape {tuple(x.shape)}")
        return tuple(x.shape)
    return x.a.shape[0], x.heads, x.length, x.head_dim


def check(q: Side, k: Side, v: Side, key_mask: torch.Tensor | None, kv_groups: int) -> None:
    """ValueError naming attnfuse tpa for sides that do not fit together."""
    (bq, hq, lq, dq), (bk, hk, lk, dk), (bv, hv, lv, _) = _shape(q), _shape(k), _shape(v)
    if len({bq, bk, bv}) != 1 or hk != hv or lk != lv or dq != dk or hq != hk * kv_groups:
        raise ValueError(f"attnfuse tpa: sides do not fit: q (B, H, L, D) = {(bq, hq, lq, dq)}, k {(bk, hk, lk, dk)}, "
                         f"v {(bv, hv, lv)}, kv_groups={kv_groups}; allowed: the same batch, k/v with the same "
                         f"heads and length, q heads = k heads * kv_groups, q and k the same head dim")
    if key_mask is not None:
        if key_mask.dim() > 4 or torch.broadcast_shapes(key_mask.shape, (bq, 1, 1, lk)) != (bq, 1, 1, lk):
            raise ValueError(f"attnfuse tpa: key_mask of shape {tuple(key_mask.shape)} does not broadcast to "
                             f"(B, 1, 1, Lk) = {(bq, 1, 1, lk)}; allowed: a key-padding mask or bias")
        if key_mask.requires_grad:
            raise ValueError("attnfuse tpa: key_mask must not require grad (no gradient flows to a key mask)")


def reference(q: Side, k: Side, v: Side, key_mask: torch.Tensor | None = None, *, scale: float,
              causal: bool = False, softcap: float = 0.0, window_left: int = -1, window_right: int = -1,
              kv_groups: int = 1, mask_fill: float | None = None, sdpa_form: bool = False) -> torch.Tensor:
    """Textbook attention over the formed tensors, under autograd (the test oracle in float64, and eager's
    numerics in the inputs' dtype): the meaning of `attention`."""
    qq, kk, vv = form(q), form(k), form(v)
    if kv_groups > 1:
        kk, vv = kk.repeat_interleave(kv_groups, 1), vv.repeat_interleave(kv_groups, 1)
    s = torch.matmul(qq, kk.transpose(-2, -1)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if key_mask is not None:
        m = key_mask.reshape((1,) * (4 - key_mask.dim()) + tuple(key_mask.shape))
        fill = float("-inf") if mask_fill is None else mask_fill
        s = s.masked_fill(~m, fill) if m.dtype == torch.bool else s + m.to(s.dtype)
    lq, lk = s.shape[-2:]
    i, j = torch.arange(lq, device=s.device)[:, None], torch.arange(lk, device=s.device)[None, :]
    right = 0 if causal and window_right < 0 else (min(window_right, 0) if causal else window_right)
    outside = torch.zeros(lq, lk, dtype=torch.bool, device=s.device)
    if window_left >= 0:
        outside |= j < i - window_left
    if right >= 0:
        outside |= j > i + right
    s = s.masked_fill(outside, float("-inf"))
    if sdpa_form:  # SDPA's safe softmax: a row that sees no key is 0, with no gradient
        dead = torch.isneginf(s).all(-1, keepdim=True)
        return torch.matmul(torch.where(dead, 0.0, torch.softmax(s.masked_fill(dead, 0.0), -1)), vv)
    return torch.matmul(torch.softmax(s, -1), vv)


def attention(q: Side, k: Side, v: Side, key_mask: torch.Tensor | None = None, *, scale: float,
              causal: bool = False, softcap: float = 0.0, window_left: int = -1, window_right: int = -1,
              kv_groups: int = 1, mask_fill: float | None = None, sdpa_form: bool = False) -> torch.Tensor:
    """Attention over the sides (module docstring); returns (B, H, Lq, Dv) in q's dtype."""
    check(q, k, v, key_mask, kv_groups)
    kw = dict(scale=float(scale), causal=bool(causal), softcap=float(softcap), window_left=int(window_left),
              window_right=int(window_right), kv_groups=int(kv_groups), mask_fill=mask_fill,
              sdpa_form=bool(sdpa_form))
    if _triton.runs(q, k, v):
        return _triton.attention(q, k, v, key_mask, **kw)
    return _cpu.attention(q, k, v, key_mask, **kw)
