"""Recognize a mask tensor's structure from its values: a band and/or one key-padding vector.

`recognize(x)` reads ``x`` right-aligned as (B, H, Lq, Lk) (missing leading dims are 1) and returns a
`Structure` when, exactly,

    keep[b, h, i, j] == (j - i <= right) & (i - j <= left) & kv[b, j]

for all entries (-1: no bound), where ``keep`` is ``x`` for a bool mask, and ``x == 0`` for a floating mask
whose other entries all equal one ``fill`` (-inf, or <= -1e4 such as finfo.min).  ``kv`` is read as "some
query keeps key j"; the band bounds as the widest offsets kept; then the equation is checked over the whole
tensor (one vectorized pass), so any tensor it accepts is exactly what the structure's recipe rebuilds.
Anything else (NaN, +inf, a second fill, per-head or per-query patterns) returns None.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["Structure", "recognize"]


@dataclasses.dataclass(frozen=True)
class Structure:
    left: int  # key j kept from query i only if i - j <= left (-1: unbounded)
    right: int  # ... and j - i <= right (-1: unbounded)
    kv: torch.Tensor | None  # (batch, Lk) bool keep vector; None: every key is kept
    fill: float | None  # a floating mask's value where not kept; None for bool masks

    def describe(self) -> str:
        parts = [f"band (left {self.left}, right {self.right})"] if self.left >= 0 or self.right >= 0 else []
        parts += ["key padding (B, Lk)"] if self.kv is not None else []
        return " & ".join(parts) or "all keys kept"


def recognize(x: torch.Tensor) -> Structure | None:
    """``x``'s `Structure`, or None (module docstring)."""
    if not isinstance(x, torch.Tensor) or not 2 <= x.dim() <= 4 or x.is_sparse or x.is_complex():
        return None
    lq, lk = x.shape[-2], x.shape[-1]
    if lq < 2 or lk < 2 or x.numel() == 0:
        return None
    with torch.no_grad():
        x = x.detach()
        fill = None
        if x.dtype == torch.bool:
            keep = x
        elif x.dtype.is_floating_point:
            keep = x == 0
            hidden = x[~keep]
            if hidden.numel():
                fill = float(hidden[0])
                if not (fill == float("-inf") or fill <= -1e4) or not bool((hidden == fill).all()):
                    return None
            else:
                fill = float("-inf")
        else:
            return None
        keep = keep.reshape((1,) * (4 - x.dim()) + tuple(x.shape))
        if keep.shape[1] > 1 and not bool((keep == keep[:, :1]).all()):
            return None  # differs per head
        keep = keep[:, 0]  # (B, Lq, Lk)
        kv = keep.any(dim=1)  # (B, Lk)
        i = torch.arange(lq, device=x.device)[:, None]
        j = torch.arange(lk, device=x.device)[None, :]
        offset = (j - i).expand(keep.shape[0], lq, lk)
        kept = offset[keep]
        left = right = -1
        if kept.numel():
            right, left = int(kept.max()), int(-kept.min())
            if right < 0 or left < 0:
                return None  # every kept key is strictly on one side of the diagonal
            right, left = -1 if right >= lk - 1 else right, -1 if left >= lq - 1 else left
        band = torch.ones(lq, lk, dtype=torch.bool, device=x.device)
        if right >= 0:
            band &= (j - i) <= right
        if left >= 0:
            band &= (i - j) <= left
        if not torch.equal(band[None] & kv[:, None, :], keep):
            return None
        return Structure(left, right, None if bool(kv.all()) else kv.clone(), fill)
