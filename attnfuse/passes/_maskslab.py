"""Constant masks read in slabs of rows, and proofs shared by content.

The helpers of `_maskvalue` that keep the analysis of an N x N constant mask at O(N) memory beyond the
constant itself (which the model already holds, as a buffer):

* `Rows`: per-row facts of a 2-D keep grid fed a slab of rows at a time (``slab_rows`` rows of at most
  `SLAB_CELLS` cells): whether a row keeps a key, its first and last kept key, and whether it keeps exactly
  the keys between them; from them, whether the whole grid is a band ``lo <= j - i <= hi`` (`Rows.band`);
* `digest`: a SHA-256 of a tensor's dtype, shape and values (row-major), hashed slab by slab;
* `ProofCache`: results keyed by the digests of the tensors they were computed from, so that layers whose
  buffers hold the same values (nanoGPT registers one ``tril`` buffer per layer) share one evaluation, and
  tensors with different values never share one.
"""

from __future__ import annotations

import collections
import hashlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

SLAB_CELLS = 1 << 20  # cells in one slab of rows (a bool slab is 1 MB)


def slab_rows(cols: int) -> int:
    """Rows per slab of a grid ``cols`` wide."""
    return max(1, SLAB_CELLS // max(1, cols))


class Rows:
    """Per-row facts of an (ni, nj) bool grid, fed in slabs of rows (`add`); O(ni) memory."""

    def __init__(self, ni: int, nj: int) -> None:
        if ni < 1 or nj < 1:
            raise ValueError(f"an empty grid ({ni} x {nj}) has no band")
        self.ni, self.nj = ni, nj
        self.first = torch.zeros(ni, dtype=torch.int64)  # first kept key of each row
        self.last = torch.zeros(ni, dtype=torch.int64)  # last kept key
        self.kept = torch.zeros(ni, dtype=torch.bool)  # the row keeps some key
        self.interval = True  # every row keeps exactly the keys from its first to its last

    def add(self, i0: int, keep: torch.Tensor) -> None:
        """Rows ``i0 .. i0 + len(keep) - 1`` of the grid: ``keep`` is (n, nj) bool (any strides, any device)."""
        n, u8 = keep.shape[0], keep.cpu().view(torch.uint8)
        first, last = u8.argmax(1), self.nj - 1 - u8.flip(1).argmax(1)  # argmax: the first maximal entry
        kept, count = u8.amax(1).bool(), u8.sum(1, dtype=torch.int64)
        self.first[i0:i0 + n], self.last[i0:i0 + n], self.kept[i0:i0 + n] = first, last, kept
        self.interval = self.interval and bool(((count == last - first + 1) | ~kept).all())

    def band(self) -> tuple[int, int] | None:
        """(lo, hi) if the grid is exactly ``lo <= j - i <= hi`` with the diagonal inside (lo <= 0 <= hi)."""
        if not self.interval or not bool(self.kept.any()):
            return None
        i = torch.arange(self.ni)
        lo, hi = int((self.first - i)[self.kept].min()), int((self.last - i)[self.kept].max())
        if lo > 0 or hi < 0:
            return None
        first, last = (i + lo).clamp(min=0), (i + hi).clamp(max=self.nj - 1)
        in_band = first <= last  # the band leaves this row some key
        if not torch.equal(in_band, self.kept):
            return None
        if not (torch.equal(first[in_band], self.first[in_band]) and torch.equal(last[in_band], self.last[in_band])):
            return None
        return lo, hi


def grid_band(slab: Callable[[int, int], torch.Tensor], ni: int, nj: int) -> tuple[int, int] | None:
    """`Rows.band` of the (ni, nj) bool grid whose rows ``i0 .. i0 + n - 1`` ``slab(i0, n)`` returns, read once.

    If the grid is a band with the diagonal inside, row 0 keeps exactly the keys 0 .. hi and (when ni <= nj,
    so that it holds a diagonal cell) the last row exactly ni - 1 + lo .. nj - 1: those two rows give the
    only candidate, and every slab is compared with the candidate band, a slice of one precomputed
    (rows x (ni + nj)) stripe.  Equal everywhere: the grid is that band; else it is no band.  A taller grid
    (ni > nj) is read through `Rows`."""
    if ni > nj:
        rows, step = Rows(ni, nj), slab_rows(nj)
        for i0 in range(0, ni, step):
            rows.add(i0, slab(i0, min(step, ni - i0)))
        return rows.band()
    top, bottom = slab(0, 1)[0].cpu(), slab(ni - 1, 1)[0].cpu()
    if not bool(top[0]) or not bool(bottom.any()):
        return None  # the diagonal cell (0, 0) is masked, or (ni - 1, ni - 1) is
    hi = nj - 1 - int(top.flip(0).view(torch.uint8).argmax())
    lo = int(bottom.view(torch.uint8).argmax()) - (ni - 1)
    if lo > 0 or hi < 0:
        return None
    step = slab_rows(ni + nj)
    d = torch.arange(ni + nj + step - 1) - (step - 1 + ni)  # d[x - r + step - 1] = (x - ni) - r
    d = (d >= lo) & (d <= hi)
    stripe = d.as_strided((step, ni + nj), (1, 1)).flip(0)  # stripe[r, x]: whether key x - ni of row r is in band
    for i0 in range(0, ni, step):
        n = min(step, ni - i0)
        if not torch.equal(slab(i0, n).cpu(), stripe[:n, ni - i0:ni - i0 + nj]):  # row i0 + r: key j - i0 - r
            return None
    return lo, hi


def _chunks(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """``t``'s values in row-major order as contiguous CPU pieces of at most about `SLAB_CELLS` cells (views of
    a contiguous CPU ``t``, else copies of one slab at a time)."""
    if t.dim() == 0:
        yield t.reshape(1).cpu()
    elif t.is_contiguous():
        flat = t.reshape(-1)
        for i in range(0, flat.numel(), SLAB_CELLS):
            yield flat[i:i + SLAB_CELLS].cpu()
    elif t.shape[0] == 1 or t[0].numel() > SLAB_CELLS:
        for row in t:
            yield from _chunks(row)
    else:
        step = slab_rows(t[0].numel())
        for i in range(0, t.shape[0], step):
            yield t[i:i + step].contiguous().reshape(-1).cpu()


_DIGESTS: dict[int, tuple[Any, int, str]] = {}  # id(tensor) -> (weakref, version, digest)


def digest(t: torch.Tensor) -> str:
    """SHA-256 of ``t``'s dtype, shape and values in row-major order (equal values <=> equal digests, bar a
    SHA-256 collision).  Memoized for the same tensor object at the same version counter: an in-place write
    through the tensor or a view of it bumps the counter, so a changed tensor is hashed again."""
    memo = _DIGESTS.get(id(t))
    if memo is not None and memo[0]() is t and memo[1] == t._version:
        return memo[2]
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
    for piece in _chunks(t.detach()):
        if piece.numel():
            h.update(memoryview(piece.view(torch.uint8).numpy()))
    out = h.hexdigest()
    for key in [k for k, (ref, _, _) in _DIGESTS.items() if ref() is None]:
        del _DIGESTS[key]
    try:
        _DIGESTS[id(t)] = (weakref.ref(t), t._version, out)
    except TypeError:  # a tensor type without weak references: not memoized
        pass
    return out


class ProofCache:
    """A bounded (least recently used) map from a key built with `digest` to a result (None included)."""

    def __init__(self, size: int = 256) -> None:
        self.size, self.entries = size, collections.OrderedDict()

    def get(self, key: Any, compute: Any) -> Any:
        """The result for ``key``, computed by ``compute()`` the first time."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        out = self.entries[key] = compute()
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return out

    def clear(self) -> None:
        self.entries.clear()
