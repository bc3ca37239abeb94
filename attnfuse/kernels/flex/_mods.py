"""FlexAttention's ``score_mod`` and ``mask_mod`` for the op's arguments: closures that index the argument
tensors, so nothing of Lq x Lk is ever built.

``score_mod`` (every score that changes but stays a score), in eager's order: softcap ``c * tanh(s / c)``,
ALiBi ``+ slope[h] * (kv - q)``, an additive mask ``+ mask[b, h, q, kv]``, a bool mask with a finite fill
``where(mask, s, fill)`` (the fill is a score, not a hidden key).  ``mask_mod`` (keys hidden with -inf): a bool
mask with fill -inf, the band ``q - left <= kv <= q + right`` (``causal`` caps ``right`` at 0) and packed
documents ``doc[b, 0, q] == doc[b, 0, kv] and (in band or doc[b, 1, kv] != 0)``.

A tensor argument broadcast over a dimension (size 1) is read at index 0 there.  `Mods.key` names everything
the closures specialize on apart from shapes (flags, constants, broadcast patterns, dtypes), so one compiled
FlexAttention serves every call with that key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

__all__ = ["Mods", "band_right", "build"]


@dataclasses.dataclass(frozen=True)
class Mods:
    """The closures of one call (None: not needed) and the key they specialize on."""

    score_mod: Callable | None
    mask_mod: Callable | None
    key: tuple


def band_right(causal: bool, window_right: int) -> int:
    """The band's right side with ``causal`` folded in (-1: unbounded)."""
    if not causal:
        return window_right
    return 0 if window_right < 0 else min(window_right, 0)


def _at(t: torch.Tensor, b, h, q, kv):
    """``t[b, h, q, kv]`` of a 4-D tensor broadcast to (B, H, Lq, Lk) (index 0 along its size-1 dims)."""
    return t[b if t.shape[0] != 1 else 0, h if t.shape[1] != 1 else 0, q if t.shape[2] != 1 else 0,
             kv if t.shape[3] != 1 else 0]


def _pattern(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (t.dtype, tuple(n != 1 for n in t.shape))


def _score_mod(softcap: float, alibi: torch.Tensor | None, bias: torch.Tensor | None, keep: torch.Tensor | None,
               fill: float) -> Callable:
    def score_mod(score, b, h, q_idx, kv_idx):
        if softcap:
            score = torch.tanh(score / softcap) * softcap
        if alibi is not None:
            score = score + alibi[h] * (kv_idx - q_idx)
        if bias is not None:
            score = score + _at(bias, b, h, q_idx, kv_idx)
        if keep is not None:
            score = torch.where(_at(keep, b, h, q_idx, kv_idx), score, fill)
        return score

    return score_mod


def _mask_mod(keep: torch.Tensor | None, left: int, right: int, doc: torch.Tensor | None) -> Callable:
    def mask_mod(b, h, q_idx, kv_idx):
        visible = None
        if left >= 0:
            visible = kv_idx >= q_idx - left
        if right >= 0:
            inside = kv_idx <= q_idx + right
            visible = inside if visible is None else visible & inside
        if doc is not None:
            row = b if doc.shape[0] != 1 else 0
            if visible is not None:
                visible = visible | (doc[row, 1, kv_idx] != 0)
            same = doc[row, 0, q_idx] == doc[row, 0, kv_idx]
            visible = same if visible is None else same & visible
        if keep is not None:
            kept = _at(keep, b, h, q_idx, kv_idx)
            visible = kept if visible is None else visible & kept
        return visible

    return mask_mod


def build(mask: torch.Tensor | None, doc: torch.Tensor | None, alibi: torch.Tensor | None, *, softcap: float,
          mask_fill: float | None, causal: bool, window_left: int, window_right: int) -> Mods:
    """The closures for these arguments; ``mask`` is 4-D (broadcastable to (B, H, Lq, Lk)) or None."""
    fill = -math.inf if mask_fill is None else float(mask_fill)
    right = band_right(causal, window_right)
    bias = keep_score = keep_mask = None
    if mask is not None and mask.dtype != torch.bool:
        bias = mask
    elif mask is not None and fill == -math.inf:
        keep_mask = mask
    elif mask is not None:
        keep_score = mask
    scored = bool(softcap) or alibi is not None or bias is not None or keep_score is not None
    masked = keep_mask is not None or window_left >= 0 or right >= 0 or doc is not None
    key = (float(softcap), alibi is not None, _pattern(bias), _pattern(keep_score), fill if keep_score is not None
           else None, _pattern(keep_mask), window_left, right, doc is not None and doc.shape[0] != 1,
           doc is not None)
    return Mods(_score_mod(float(softcap), alibi, bias, keep_score, fill) if scored else None,
                _mask_mod(keep_mask, window_left, right, doc) if masked else None, key)
