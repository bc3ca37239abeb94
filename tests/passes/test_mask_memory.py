"""Memory and sharing of the by-value mask analysis (`attnfuse.passes._maskvalue`, `_maskslab`).

A constant buffer mask is read in slabs of rows: analyzing an 8192 x 8192 buffer allocates no tensor near its
N x N size.  Layers whose buffers hold equal values share one evaluation (nanoGPT registers one ``tril`` buffer
per layer); a buffer with other values is evaluated on its own and gets its own answer.  The slab readers agree
with a brute-force reading on random grids.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _harness import check
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from attnfuse.passes import _maskeval, _maskslab, _maskvalue, canonicalize, masks, match


class Layer(nn.Module):
    """nanoGPT's slow path with the given ``(n, n)`` buffer as ``bias``."""

    def __init__(self, buffer: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("bias", buffer.view(1, 1, *buffer.shape))

    def forward(self, q, k, v):
        t = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


class Stack(nn.Module):
    def __init__(self, *buffers: torch.Tensor) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(b) for b in buffers)

    def forward(self, q, k, v):
        for layer in self.layers:
            q = q + layer(q, k, v)
        return q


def _qkv(t: int = 13) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(2, 3, t, 8) for _ in range(3))


class Largest(TorchDispatchMode):
    """The bytes of the largest storage any op allocates under it (views and in-place results not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.nbytes = max(self.nbytes, t.untyped_storage().nbytes())
        return out


def test_large_buffer_is_read_in_slabs():
    """An 8192 x 8192 bool tril buffer (64 MB): proven causal for every length, with no allocation above 2 MB."""
    n = 8192
    captured = []

    def backend(gm, example_inputs):
        captured.append((gm, list(example_inputs)))
        return gm

    model = Layer(torch.ones(n, n, dtype=torch.bool).tril_())
    torch.compile(model, backend=backend, fullgraph=True)(*_qkv())
    (gm, example_inputs), = captured
    canonicalize.canonicalize(gm)
    (m,), _ = match.match(gm)
    _maskvalue._BANDS.clear()
    with Largest() as largest:
        m, info = masks.analyze(gm, m, example_inputs)
    assert info.kinds == ("causal",) and m.causal and not m.masks, info
    assert f"any length <= {n}" in " ".join(info.proof), info.proof
    assert largest.nbytes <= 2 << 20, f"{largest.nbytes} bytes allocated at once; the buffer is {n * n}"


def test_equal_buffers_share_one_evaluation(monkeypatch):
    """Four layers with their own (equal) tril buffers: one evaluation.  A tril with a window and a tril with
    one more kept cell hold other values: each is evaluated on its own, and keeps its own answer."""
    n = 64
    window = torch.ones(n, n).tril().triu(-5)
    extra = torch.ones(n, n).tril()
    extra[10, 12] = 1.0  # row 10 also sees key 12: no band
    model = Stack(*(torch.ones(n, n).tril() for _ in range(4)), window, extra).eval()
    evaluations = []
    slab_band = _maskvalue._slab_band

    def counted(cond, ni, nj, values):
        evaluations.append(sorted(node.name for node in values))
        return slab_band(cond, ni, nj, values)

    monkeypatch.setattr(_maskvalue, "_slab_band", counted)
    _maskvalue._BANDS.clear()
    res = check(model, _qkv())
    assert [s.mask["kind"] for s in res.report.sites] == ["causal"] * 4 + ["causal+window", "dense"], str(res.report)
    assert res.report.sites[4].mask["window"] == [5, 0]
    assert all("any length <= 64" in " ".join(s.mask["proof"]) for s in res.report.sites[:5])
    assert len(evaluations) == 3, evaluations
    assert [c["causal"] for c in res.calls] == [True] * 5 + [False]
    assert res.calls[4]["window_left"] == 5 and res.calls[5]["mask"] is not None


def _band_reference(keep: torch.Tensor) -> tuple[int, int] | None:
    """The definition: the extreme diagonals j - i that keep, and equality with that band."""
    ni, nj = keep.shape
    d = torch.arange(nj)[None, :] - torch.arange(ni)[:, None]
    if not bool(keep.any()):
        return None
    lo, hi = int(d[keep].min()), int(d[keep].max())
    return (lo, hi) if lo <= 0 <= hi and torch.equal(keep, (d >= lo) & (d <= hi)) else None


@pytest.mark.parametrize("seed", range(4))
def test_slab_readers_match_the_definition(seed, monkeypatch):
    """`grid_band` (slabs of a few rows, forced by a tiny SLAB_CELLS) and `band_of` agree with the definition on
    bands, bands with one cell flipped, and random grids, square, wide and tall."""
    monkeypatch.setattr(_maskslab, "SLAB_CELLS", 37)
    g = torch.Generator().manual_seed(seed)
    for ni, nj in ((1, 1), (7, 7), (9, 20), (20, 9), (33, 33), (5, 64)):
        d = torch.arange(nj)[None, :] - torch.arange(ni)[:, None]
        for trial in range(12):
            lo = -int(torch.randint(0, ni + 2, (), generator=g))
            hi = int(torch.randint(0, nj + 2, (), generator=g))
            keep = (d >= lo) & (d <= hi)
            if trial % 3 == 1:
                i, j = int(torch.randint(0, ni, (), generator=g)), int(torch.randint(0, nj, (), generator=g))
                keep[i, j] = ~keep[i, j]
            elif trial % 3 == 2:
                keep = torch.rand(ni, nj, generator=g) < 0.5
            want = _band_reference(keep)
            got = _maskslab.grid_band(lambda i0, n, keep=keep: keep[i0:i0 + n], ni, nj)
            assert got == want == _maskvalue.band_of(keep), (ni, nj, trial, got, want)


def test_window_reads_equal_the_gather(monkeypatch):
    """A read by plain (shifted) indices is a view of the buffer; it equals the gather it replaces, and reads
    it cannot serve (out of range, a variable twice, a coefficient) still go through the gather."""
    from attnfuse.passes._maskexpr import KEY, QUERY, Aff, Read

    buf = torch.randn(2, 5, 30, 40)
    q, kv = Aff(((QUERY, 1),)), Aff(((KEY, 1),))
    reads = [(Aff((), 1), Aff((), 3), q, kv), (Aff((), 0), Aff((), 4), q.plus(Aff((), 2)), kv.plus(Aff((), 5))),
             (Aff((), 1), Aff((), 0), kv, q), (Aff((), 0), Aff((), 2), q, q), (Aff((), 0), Aff((), 0), q.times(2), kv),
             (Aff((), -1), Aff((), 0), q, kv), (Aff((), 0), Aff((), 0), q.plus(Aff((), -1)), kv)]
    for index in reads:
        e = Read("buf", index)
        for starts in ({}, {QUERY: 3}, {QUERY: 3, KEY: 7}):
            got = _maskeval.evaluate(e, {QUERY: 6, KEY: 9}, {"buf": buf}, starts)
            with monkeypatch.context() as m:
                m.setattr(_maskeval, "_window", lambda *a: None)
                want = _maskeval.evaluate(e, {QUERY: 6, KEY: 9}, {"buf": buf}, starts)
            assert got.shape == want.shape and torch.equal(got, want), (index, starts)


def test_digest_is_of_values():
    """Equal values in any layout digest equally; one changed value, a dtype or a shape does not; an in-place
    write is seen (the memo is per tensor object and version)."""
    a = torch.arange(24.0).reshape(4, 6)
    b = a.t().contiguous().t()  # the same values, column-major
    assert not b.is_contiguous() and _maskslab.digest(a) == _maskslab.digest(b)
    assert _maskslab.digest(a) != _maskslab.digest(a.double())
    assert _maskslab.digest(a) != _maskslab.digest(a.reshape(6, 4))
    before = _maskslab.digest(b)
    b[3, 5] = -1.0
    assert _maskslab.digest(b) != before


def test_bool_comparisons_equal_the_promoted_ones():
    """``bool_buffer == c`` / ``!= c`` (and their negations) without the int64 promotion give eager's values."""
    from attnfuse.passes._maskexpr import KEY, QUERY, Aff, Const, Not, Op, Read

    buf = torch.rand(1, 1, 9, 11, generator=torch.Generator().manual_seed(0)) < 0.5
    read = Read("buf", (Aff(), Aff(), Aff(((QUERY, 1),)), Aff(((KEY, 1),))))
    for c, scalar in ((Aff((), 0), 0), (Aff((), 1), 1), (Aff((), 2), 2), (Aff((), -1), -1), (Const(True), True),
                      (Const(False), False), (Const(0.5), 0.5), (Const(1.0), 1.0)):
        for fn in ("eq", "ne"):
            want = buf[0, 0] == scalar if fn == "eq" else buf[0, 0] != scalar
            for e, w in ((Op(fn, (read, c)), want), (Op(fn, (c, read)), want), (Not(Op(fn, (read, c))), ~want)):
                got = _maskeval.evaluate(e, {QUERY: 9, KEY: 11}, {"buf": buf})
                assert got.dtype == torch.bool and torch.equal(got[0, 0], w), (e, scalar)
