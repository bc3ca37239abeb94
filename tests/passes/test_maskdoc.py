"""Packed documents and prefix-LM (`attnfuse.passes._maskdoc`): the `FlexMask` beside `MaskInfo`.

Each model builds its mask in the graph from a segment-id tensor ``seg`` (B, L) and/or a prefix (a length per
sequence, or a bool vector).  A test traces it as the mask-analysis tests do (canonicalize, match,
`masks.analyze`), then checks the proof by value: the FlexMask's semantics, materialized here from its
(B, 2, L) ``doc`` node, its band and its remaining terms, must equal the original mask's keep exactly, on
the example inputs and on fresh random ones (unsorted segments, other prefix lengths).  Every spelling has
a negative twin that must give no FlexMask; `MaskInfo` itself stays what it was (the term stays dense).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from _harness import check

from attnfuse.passes import canonicalize, masks, match

B, H, L, DIM = 2, 4, 13, 32
MIN32 = torch.finfo(torch.float32).min


class DocAttention(nn.Module):
    """Self-attention with q/k/v projections; ``keep(x, seg, extra)`` builds the mask in the graph.

    ``fill``: "-inf" (masked_fill), "min" (an additive ``where(keep, 0, finfo.min)``), or a number for
    masked_fill; ``sdpa``: F.scaled_dot_product_attention with the bool mask; ``cache``: keys and values
    are ``cat(cache, x)`` (a longer key axis)."""

    def __init__(self, keep, fill: str | float = "-inf", sdpa: bool = False, cache: int = 0) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(DIM, DIM) for _ in range(3))
        self.keep, self.fill, self.sdpa = keep, fill, sdpa
        self.cache = nn.Parameter(torch.randn(1, cache, DIM)) if cache else None

    def forward(self, x, seg, extra=None):
        b, t, _ = x.shape
        kv = x if self.cache is None else torch.cat([self.cache.expand(b, -1, -1), x], 1)
        q = self.q(x).view(b, t, H, -1).transpose(1, 2)
        k, v = (f(kv).view(b, kv.shape[1], H, -1).transpose(1, 2) for f in (self.k, self.v))
        keep = self.keep(x, seg, extra)
        if self.sdpa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if self.fill == "min":
            s = s + torch.where(keep, 0.0, MIN32)
        else:
            s = s.masked_fill(~keep, float("-inf") if self.fill == "-inf" else self.fill)
        return s.softmax(-1) @ v


def _pos(x):
    ar = torch.arange(x.shape[1], device=x.device)
    return ar[:, None], ar[None, :]  # query column, key row


def _docs(x, seg, extra):
    return seg[:, None, :, None] == seg[:, None, None, :]


def _docs_causal(x, seg, extra):  # (B, L, L), one more broadcast dim added
    q, kv = _pos(x)
    return (seg.unsqueeze(-1) == seg.unsqueeze(-2))[:, None] & (kv <= q)


def _docs_window_padding(x, seg, pad):
    q, kv = _pos(x)
    return (seg[:, None, None, :] == seg[:, None, :, None]) & (kv <= q) & (kv > q - 4) & pad[:, None, None, :]


def _prefix_len(x, seg, plen):
    q, kv = _pos(x)
    return (kv <= q) | (kv < plen[:, None, None, None])


def _prefix_bool(x, seg, is_prefix):
    q, kv = _pos(x)
    return (kv <= q) | is_prefix[:, None, None, :]


def _prefix_window(x, seg, plen):
    q, kv = _pos(x)
    return ((kv <= q) & (kv >= q - 3)) | (kv < plen[:, None, None, None])


def _docs_prefix_padding(x, seg, extra):
    plen, pad = extra
    q, kv = _pos(x)
    docs = seg[:, None, :, None] == seg[:, None, None, :]
    return docs & ((kv <= q) | (kv < plen[:, None, None, None])) & pad[:, None, None, :]


def _doc_ids_indexed(x, seg, extra):  # doc_ids[b, q] == doc_ids[b, kv] with broadcast index tensors
    b = torch.arange(seg.shape[0])[:, None, None, None]
    q, kv = _pos(x)
    return (seg[b, q[None, None]] == seg[b, kv[None, None]]) & (kv <= q)


def _hf(use_vmap: bool, custom: bool = False):
    tf = pytest.importorskip("transformers.masking_utils")

    def keep(x, seg, pad):
        docs = (lambda b, h, q, kv: seg[b][q] == seg[b][kv]) if custom else tf.packed_sequence_mask_function(seg)
        return tf.sdpa_mask(x.shape[0], x.shape[1], x.shape[1], mask_function=tf.and_masks(
            tf.causal_mask_function, docs), attention_mask=pad, allow_is_causal_skip=False, use_vmap=use_vmap)
    return keep


# --- tracing and the by-value check ---------------------------------------------------------------

def analyze(model: nn.Module, *args, dynamic: bool = False):
    """(graph, example inputs, original match, MaskInfo) of the single attention site of ``model(*args)``."""
    got = []

    def backend(gm, example_inputs):
        canonicalize.canonicalize(gm)
        found = match.match(gm)[0]
        assert len(found) == 1, found
        got.append((gm, list(example_inputs), found[0], masks.analyze(gm, found[0], example_inputs)[1]))
        return gm

    torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)(*args)
    assert len(got) == 1
    return got[0]


class _Values(fx.Interpreter):
    def run_node(self, n):
        out = super().run_node(n)
        self.env_all[n] = out
        return out


def _values(gm, example_inputs, replace: dict) -> dict:
    """Every node's value on ``example_inputs`` with the tensors in ``replace`` (by identity) swapped."""
    args = [replace.get(id(a), a) if isinstance(a, torch.Tensor) else (int(a.node.hint) if isinstance(
        a, torch.SymInt) else a) for a in example_inputs]
    it = _Values(gm)
    it.env_all = {}
    with torch.no_grad():
        it.run(*args)
    return it.env_all


def _term_keep(t, env) -> torch.Tensor:
    x = env[t.node]
    if t.kind == "keep":
        k = x if x.dtype == torch.bool else x != 0
        return ~k if t.negate else k
    assert bool(((x == 0) | (x <= torch.finfo(x.dtype).min)).all()), "an additive term other than 0 / min"
    return x == 0


def _band(n: int, causal: bool, left: int, right: int) -> torch.Tensor:
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    keep = torch.ones(n, n, dtype=torch.bool)
    if left >= 0:
        keep &= j >= i - left
    if causal:
        keep &= j <= i
    elif right >= 0:
        keep &= j <= i + right
    return keep


def _flex_keep(flex, env, n: int) -> torch.Tensor:
    doc = env[flex.doc]
    assert doc.dtype == torch.int64 and doc.shape == (B, 2, n), (doc.dtype, doc.shape)
    same = doc[:, 0, :, None] == doc[:, 0, None, :]
    visible = _band(n, flex.causal, flex.window_left, flex.window_right) | (doc[:, 1, None, :] != 0)
    keep = (same & visible)[:, None]
    for t in flex.terms:
        keep = keep & _term_keep(t, env)
    return keep.expand(B, H, n, n)


def _orig_keep(m, env, n: int) -> torch.Tensor:
    keep = torch.ones(B, H, n, n, dtype=torch.bool)
    for t in m.masks:
        keep = keep & _term_keep(t, env)
    return keep & _band(n, True, -1, -1) if m.causal else keep


def assert_flex(model, x, seg, extra, kinds: tuple, fresh) -> masks.FlexMask:
    """FlexMask present with ``kinds``, and equal to the mask by value on the inputs and on ``fresh()`` ones."""
    gm, inputs, m, info = analyze(model, x, seg, extra)
    assert info.flex is not None, info.proof
    assert info.flex.kinds == kinds, info.flex
    assert info.report()["flex"]["kind"] == "+".join(kinds)
    assert "documents" not in info.kinds and "prefix" not in info.kinds  # MaskInfo as before
    extras = extra if isinstance(extra, tuple) else (extra,)
    for k in range(6):
        new = {} if k == 0 else dict(zip((id(seg), *map(id, extras)), (fresh(seg), *map(fresh, extras))))
        env = _values(gm, inputs, new)
        want, got = _orig_keep(m, env, L), _flex_keep(info.flex, env, L)
        assert torch.equal(want, got), f"round {k}: {(want != got).nonzero()[:5].tolist()}"
    return info.flex


def _fresh(t):
    if t is None:
        return None
    if t.dtype == torch.bool:
        return torch.rand(t.shape) > 0.3
    if t.dim() == 1:  # a prefix length
        return torch.randint(0, L + 1, t.shape)
    return torch.randint(0, 4, t.shape, dtype=t.dtype)  # unsorted segment ids


def _inputs():
    x = torch.randn(B, L, DIM)
    seg = torch.tensor([[0] * 5 + [1] * 6 + [2] * 2, [3] * 4 + [1] * 9])
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[1, 10:] = False
    return x, seg, pad, torch.tensor([3, 6])


# --- proven -----------------------------------------------------------------------------------------

_CASES = {
    "docs": (_docs, "-inf", None, ("documents",)),
    "docs unsqueeze causal": (_docs_causal, "-inf", None, ("documents", "causal")),
    "docs window padding": (_docs_window_padding, "-inf", "pad", ("documents", "causal", "window", "padding")),
    "prefix length": (_prefix_len, "-inf", "plen", ("prefix", "causal")),
    "prefix bool vector": (_prefix_bool, "-inf", "prefix", ("prefix", "causal")),
    "prefix window": (_prefix_window, "-inf", "plen", ("prefix", "causal", "window")),
    "docs prefix padding": (_docs_prefix_padding, "-inf", "plen,pad", ("documents", "prefix", "causal", "padding")),
    "docs causal finfo.min": (_docs_causal, "min", None, ("documents", "causal")),
    "doc_ids[b, q] indexed": (_doc_ids_indexed, "-inf", None, ("documents", "causal")),
    "sdpa docs causal": (_docs_causal, "sdpa", None, ("documents", "causal")),
    "hf packed sequence": (_hf(False), "-inf", "pad", ("documents", "causal", "padding")),
    "hf packed sequence vmap": (_hf(True), "-inf", "pad", ("documents", "causal", "padding")),
    "hf vmap seg[b][q]": (_hf(True, custom=True), "-inf", "pad", ("documents", "causal", "padding")),
}


def _extra(name, seg, pad, plen):
    return {None: None, "pad": pad, "plen": plen, "prefix": torch.arange(L)[None].expand(B, L) < plen[:, None],
            "plen,pad": (plen, pad)}[name]


@pytest.mark.parametrize("case", list(_CASES))
def test_flex_mask_equals_the_mask(case):
    keep, fill, extra, kinds = _CASES[case]
    x, seg, pad, plen = _inputs()
    model = DocAttention(keep, fill="-inf" if fill == "sdpa" else fill, sdpa=fill == "sdpa")
    flex = assert_flex(model, x, seg, _extra(extra, seg, pad, plen), kinds, _fresh)
    assert "documents" not in kinds or any("documents" in p for p in flex.proof)


def test_mask_info_unchanged_and_compiles():
    """The term stays dense in MaskInfo (its band folded with -inf, as before) and the compiled model is eager's."""
    x, seg, pad, _ = _inputs()
    _, _, m, info = analyze(DocAttention(_docs_window_padding), x, seg, pad)
    assert info.kinds == ("causal", "window", "dense") and info.causal and info.window_left == 3, info
    assert not any(p.startswith("flex:") for p in info.proof)
    _, _, _, info = analyze(DocAttention(_docs_causal, fill="min"), x, seg, None)
    assert info.kinds == ("dense",) and info.flex.kinds == ("documents", "causal")  # finite fill: not folded
    res = check(DocAttention(_docs_prefix_padding), (x, seg, (_inputs()[3], pad)), grad=[])
    assert res.site.status == "fused" and res.site.mask["flex"]["kind"] == "documents+prefix+causal+padding"


def test_two_terms_documents_then_causal():
    """masked_fill(~docs).masked_fill(~causal): the band of the second term joins the FlexMask."""
    class TwoTerms(DocAttention):
        def forward(self, x, seg, extra=None):
            q, k, v = (f(x).view(B, L, H, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
            qp, kp = _pos(x)
            s = (q @ k.transpose(-2, -1)).masked_fill(~_docs(x, seg, None), float("-inf"))
            return s.masked_fill(kp > qp, float("-inf")).softmax(-1) @ v

    x, seg, _, _ = _inputs()
    assert_flex(TwoTerms(None), x, seg, None, ("documents", "causal"), _fresh)


def test_dynamic_shapes():
    x, seg, _, _ = _inputs()
    gm, inputs, m, info = analyze(DocAttention(_docs_causal), x, seg, None, dynamic=True)
    assert info.flex is not None and info.flex.kinds == ("documents", "causal"), info.proof
    shape = info.flex.doc.meta["example_value"].shape
    assert isinstance(shape[-1], torch.SymInt) and shape[1] == 2
    env = _values(gm, inputs, {})
    assert torch.equal(_orig_keep(m, env, L), _flex_keep(info.flex, env, L))


# --- negative twins -----------------------------------------------------------------------------------

def _other_tensor(x, seg, other):  # seg[q] == other[kv]
    return seg[:, None, :, None] == other[:, None, None, :]


def _shifted(x, seg, extra):  # seg[q + 1] == seg[kv]: seg has L + 1 entries
    return seg[:, None, 1:, None] == seg[:, None, None, :-1]


def _query_or(x, seg, extra):  # a query-dependent condition under the OR
    q, kv = _pos(x)
    return (seg[:, None, :, None] == seg[:, None, None, :]) & ((kv <= q) | (x.sum(-1) > 0)[:, None, :, None])


def _band_outside_prefix(x, seg, plen):  # the window also hides prefix keys
    q, kv = _pos(x)
    return ((kv <= q) | (kv < plen[:, None, None, None])) & (kv >= q - 3)


def _float_segments(x, seg, extra):
    s = seg.float() / 3
    return s[:, None, :, None] == s[:, None, None, :]


def _cache_docs(x, seg, extra):  # the same tensor, but 13 queries over 17 keys
    return seg[:, None, :x.shape[1], None] == seg[:, None, None, :]


_TWINS = {
    "other tensor": (_other_tensor, "-inf", "other", "does not read one tensor"),
    "shifted index": (_shifted, "-inf", "long", "does not read one tensor"),
    "query condition under OR": (_query_or, "-inf", None, "an OR other than"),
    "band outside the prefix OR": (_band_outside_prefix, "-inf", "plen", "band outside the prefix's OR"),
    "float segment ids": (_float_segments, "-inf", None, "compares values of dtype torch.float32"),
    "fill -1e4": (_docs_causal, -1e4, None, "does not swallow every score"),
    "finite fill with padding": (_docs_window_padding, "min", "pad", None),
}


@pytest.mark.parametrize("twin", list(_TWINS))
def test_negative_twins(twin):
    keep, fill, extra, why = _TWINS[twin]
    x, seg, pad, plen = _inputs()
    arg = {None: None, "pad": pad, "plen": plen, "other": torch.randint(0, 3, (B, L)), "long": None}[extra]
    if extra == "long":
        seg = torch.randint(0, 3, (B, L + 1))
    _, _, _, info = analyze(DocAttention(keep, fill=fill), x, seg, arg)
    assert info.flex is None and "flex" not in info.report(), info.flex
    assert "dense" in info.kinds
    if why is not None:
        assert any(p.startswith("flex:") and why in p for p in info.proof), info.proof


def test_cache_needs_equal_lengths():
    x, _, _, _ = _inputs()
    seg = torch.randint(0, 3, (B, L + 4))
    _, _, m, info = analyze(DocAttention(_cache_docs, cache=4), x, seg, None)
    assert info.flex is None and any("q_len == kv_len is not proven" in p for p in info.proof), info.proof


def test_prefix_with_another_terms_band():
    """(causal | prefix) in one term, a window in another: the window hides prefix keys, no FlexMask."""
    class Windowed(DocAttention):
        def forward(self, x, seg, plen):
            q, k, v = (f(x).view(B, L, H, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
            qp, kp = _pos(x)
            s = (q @ k.transpose(-2, -1)).masked_fill(~_prefix_len(x, seg, plen), float("-inf"))
            return s.masked_fill(kp < qp - 3, float("-inf")).softmax(-1) @ v

    x, seg, _, plen = _inputs()
    _, _, _, info = analyze(Windowed(None), x, seg, plen)
    assert info.flex is None and info.window_left == 3
