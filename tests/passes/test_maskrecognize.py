"""`_maskrecognize.recognize` against a brute-force oracle: every (left, right) band with the key vector read as
"some query keeps key j" is tried on small masks; `recognize` must find a structure exactly when one fits, and
the structure it returns must rebuild the mask.  Floating fills, per-head patterns, broadcast (stride-0) views
and blockwise reading (a tiny block budget) are covered."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnfuse.passes import _maskrecognize as mr


def _rebuild(s: mr.Structure, batch: int, lq: int, lk: int) -> torch.Tensor:
    i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    band = torch.ones(lq, lk, dtype=torch.bool)
    if s.right >= 0:
        band &= (j - i) <= s.right
    if s.left >= 0:
        band &= (i - j) <= s.left
    kv = torch.ones(batch, lk, dtype=torch.bool) if s.kv is None else s.kv
    return band[None] & kv[:, None, :]


def _fits(keep: torch.Tensor) -> bool:
    """keep (B, H, Lq, Lk): whether some band & key vector equals it (brute force)."""
    if not bool((keep == keep[:, :1]).all()):
        return False
    keep = keep[:, 0]
    batch, lq, lk = keep.shape
    kv = keep.any(1)
    for left, right in itertools.product(range(-1, lq), range(-1, lk)):
        s = mr.Structure(left, right, kv, None)
        if torch.equal(_rebuild(s, batch, lq, lk), keep):
            return True
    return False


def _structured(gen, batch, heads, lq, lk) -> torch.Tensor:
    left = int(torch.randint(-1, lq, (1,), generator=gen))
    right = int(torch.randint(-1, lk, (1,), generator=gen))
    kv = torch.rand(batch, lk, generator=gen) > 0.3
    keep = _rebuild(mr.Structure(left, right, kv, None), batch, lq, lk)
    return keep[:, None].expand(batch, heads, lq, lk).clone()


def _check(x: torch.Tensor, keep: torch.Tensor) -> None:
    got = mr.recognize(x)
    fits = _fits(keep)
    assert (got is not None) == fits, (got, keep)
    if got is not None:
        batch, _, lq, lk = keep.shape
        assert torch.equal(_rebuild(got, batch, lq, lk), keep[:, 0]), got


@pytest.mark.parametrize("block", [mr._BLOCK_ELEMENTS, 1, 7])
def test_random_masks_against_the_oracle(block, monkeypatch):
    monkeypatch.setattr(mr, "_BLOCK_ELEMENTS", block)
    gen = torch.Generator().manual_seed(11 + block)
    fitted = 0
    for case in range(120):
        batch, heads = int(torch.randint(1, 3, (1,), generator=gen)), int(torch.randint(1, 3, (1,), generator=gen))
        lq, lk = (int(torch.randint(2, 7, (1,), generator=gen)) for _ in range(2))
        keep = _structured(gen, batch, heads, lq, lk)
        if case % 3 == 1:  # one entry flipped: usually no structure fits any more
            b, h, i, j = (int(torch.randint(0, n, (1,), generator=gen)) for n in keep.shape)
            keep[b, h, i, j] = ~keep[b, h, i, j]
        if case % 3 == 2:  # uniformly random
            keep = torch.rand(keep.shape, generator=gen) > 0.5
        fitted += _fits(keep)
        _check(keep, keep)
        fill = (-math.inf, torch.finfo(torch.float32).min)[case % 2]
        _check(torch.zeros(keep.shape).masked_fill(~keep, fill), keep)
    assert 20 < fitted < 110  # both outcomes were exercised


def test_floating_values_that_are_not_one_fill():
    keep = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    for bad in (-1.0, float("nan"), float("inf")):
        assert mr.recognize(torch.zeros(keep.shape).masked_fill(~keep, bad)) is None
    two = torch.zeros(keep.shape).masked_fill(~keep, -math.inf)
    two[0, 0, 0, 4] = -1e9
    assert mr.recognize(two) is None
    assert mr.recognize(keep.int()) is None


def test_broadcast_views_are_read_where_stored():
    """A key vector expanded over heads and query rows (stride 0) is recognized from its stored (B, Lk) values
    (the view `_stored` reads has B * Lk entries), with the same answer as the materialized tensor's."""
    gen = torch.Generator().manual_seed(3)
    kv = torch.rand(3, 1, 1, 9, generator=gen) > 0.4
    kv[..., 0] = True
    expanded = kv.expand(3, 4, 9, 9)
    assert mr._stored(expanded).numel() == 3 * 9
    got = mr.recognize(expanded)
    want = mr.recognize(expanded.contiguous())
    assert got is not None and want is not None
    assert torch.equal(_rebuild(got, 3, 9, 9), expanded[:, 0])
    assert torch.equal(_rebuild(want, 3, 9, 9), expanded[:, 0])
    bias = torch.zeros(3, 1, 1, 9).masked_fill(~kv, -math.inf).expand(3, 2, 9, 9)
    got = mr.recognize(bias)
    assert got is not None and got.fill == -math.inf and torch.equal(got.kv, kv[:, 0, 0])
    # a batch broadcast too: the key vector comes back with the full batch
    one = kv[:1].expand(5, 1, 9, 9)
    got = mr.recognize(one)
    assert got is not None and got.kv.shape == (5, 9)


def test_two_and_three_dims_are_right_aligned():
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    got = mr.recognize(causal)
    assert got is not None and (got.left, got.right, got.kv) == (-1, 0, None)
    per_head = torch.stack([causal, causal.T])  # (H, Lq, Lk): differs per head
    assert mr.recognize(per_head) is None
