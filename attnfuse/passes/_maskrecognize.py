"""Recognize a mask tensor's structure from its values: a band and/or one key-padding vector.

`recognize(x)` reads ``x`` right-aligned as (B, H, Lq, Lk) (missing leading dims are 1) and returns a
`Structure` when, exactly,

    keep[b, h, i, j] == (j - i <= right) & (i - j <= left) & kv[b, j]

for all entries (-1: no bound), where ``keep`` is ``x`` for a bool mask, and ``x == 0`` for a floating mask
whose other entries all equal one ``fill`` (-inf, or <= -1e4 such as finfo.min).  ``kv`` is read as "some
query keeps key j"; the band bounds as the widest offsets kept; then the equation is checked over every entry,
so any tensor it accepts is exactly what the structure's recipe rebuilds.  Anything else (NaN, +inf, a second
fill, per-head or per-query patterns) returns None.

Cost: the values are read where they are stored.  A dimension broadcast by ``expand`` (stride 0) is read once,
so a key-padding vector expanded to (B, H, Lq, Lk) costs O(B * Lk); a materialized (B, Lq, Lk) mask is read in
blocks of query rows (a few passes over one block at a time, no N x N temporary).
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["Structure", "recognize"]

_BLOCK_ELEMENTS = 1 << 22  # entries of one block of query rows (all batches)


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


def _stored(x: torch.Tensor) -> torch.Tensor:
    """``x`` as (B, H, Lq, Lk) with every broadcast (stride-0) dimension of size > 1 narrowed to size 1."""
    x = x.reshape((1,) * (4 - x.dim()) + tuple(x.shape))
    for d in range(3):
        if x.shape[d] > 1 and x.stride(d) == 0:
            x = x.narrow(d, 0, 1)
    return x


def _keep(x: torch.Tensor) -> tuple[torch.Tensor, float | None] | None:
    """(the bool keep tensor, the fill) of a bool or floating mask, or None if its values are not one."""
    if x.dtype == torch.bool:
        return x, None
    if not x.dtype.is_floating_point:
        return None
    keep = x == 0
    hidden = ~keep
    if not bool(hidden.any()):
        return keep, float("-inf")
    fill = float(x.reshape(-1)[hidden.reshape(-1).byte().argmax()])  # the first entry that is not 0
    if not (fill == float("-inf") or fill <= -1e4) or not bool((keep | (x == fill)).all()):
        return None  # NaN, +inf, a small negative, or a second fill
    return keep, fill


def _bounds(keep: torch.Tensor, lq: int, lk: int) -> tuple[int, int]:
    """(left, right): the widest offsets of kept entries below and above the diagonal (at least 0), blockwise
    over the rows of ``keep`` (B, Lq, Lk); -1 where unbounded.  The narrowest band that can fit: if any fits,
    this one does."""
    j = torch.arange(lk, device=keep.device)
    rows = max(1, _BLOCK_ELEMENTS // max(1, keep.shape[0] * lk))
    right = left = None
    for r0 in range(0, keep.shape[1], rows):
        blk = keep[:, r0:r0 + rows]
        first = torch.where(blk, j, lk).amin(-1)  # (B, rows): lk where the row keeps nothing
        last = torch.where(blk, j, -1).amax(-1)
        live = last >= 0
        if not bool(live.any()):
            continue
        i = torch.arange(r0, r0 + blk.shape[1], device=keep.device).expand_as(first)
        r, le = int((last - i)[live].max()), int((i - first)[live].max())
        right, left = r if right is None else max(right, r), le if left is None else max(left, le)
    if right is None:
        return -1, -1
    left, right = max(left, 0), max(right, 0)  # every kept key on one side: the diagonal bounds the other
    return (-1 if left >= lq - 1 else left), (-1 if right >= lk - 1 else right)


def _matches(keep: torch.Tensor, kv: torch.Tensor, left: int, right: int) -> bool:
    """Whether ``keep`` (B, Lq, Lk) equals band & kv, blockwise over the rows."""
    lq, lk = keep.shape[-2], keep.shape[-1]
    j = torch.arange(lk, device=keep.device)
    rows = max(1, _BLOCK_ELEMENTS // max(1, keep.shape[0] * lk))
    for r0 in range(0, lq, rows):
        i = torch.arange(r0, min(lq, r0 + rows), device=keep.device)[:, None]
        band = torch.ones(i.shape[0], lk, dtype=torch.bool, device=keep.device)
        if right >= 0:
            band &= (j - i) <= right
        if left >= 0:
            band &= (i - j) <= left
        if not torch.equal(band[None] & kv[:, None, :], keep[:, r0:r0 + i.shape[0]]):
            return False
    return True


def recognize(x: torch.Tensor) -> Structure | None:
    """``x``'s `Structure`, or None (module docstring)."""
    if not isinstance(x, torch.Tensor) or not 2 <= x.dim() <= 4 or x.is_sparse or x.is_complex():
        return None
    lq, lk = x.shape[-2], x.shape[-1]
    if lq < 2 or lk < 2 or x.numel() == 0:
        return None
    with torch.no_grad():
        found = _keep(_stored(x.detach()))
        if found is None:
            return None
        keep, fill = found
        if keep.shape[1] > 1 and not bool((keep == keep[:, :1]).all()):
            return None  # differs per head
        keep = keep[:, 0]  # (B | 1, Lq | 1, Lk)
        kv = keep.any(dim=1)  # (B | 1, Lk)
        if keep.shape[1] == 1 and lq > 1:  # every query row is the same stored row: key padding, no band
            left = right = -1
        else:
            bounds = _bounds(keep, lq, lk)
            if not _matches(keep, kv, *bounds):
                return None
            left, right = bounds
        batch = x.shape[0] if x.dim() == 4 else 1
        return Structure(left, right, None if bool(kv.all()) else kv.expand(batch, lk).clone(), fill)
