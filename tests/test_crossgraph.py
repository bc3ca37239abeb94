"""Mask structure across graph boundaries (`attnfuse._crossgraph`): a mask built before a graph break (a run-time
certificate), or in eager code (its values verified once), reaches the attention sites of the next graph as
structure; a modified or unstructured mask runs the dense graph.  Outputs and gradients follow the 2x rule."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

import attnfuse
from attnfuse import _crossgraph
from attnfuse.backend import attnfuse_backend
from tests._util import assert_2x

L, D, H = 37, 40, 4  # odd sizes; head_dim 10


def hf_mask(am: torch.Tensor, length: int, window: int | None, dtype: torch.dtype | None) -> torch.Tensor:
    """An HF-style padded causal (or sliding-window) mask: bool, or float with finfo.min where hidden."""
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    keep = j <= i
    if window is not None:
        keep = keep & (j > i - window)
    mask = keep[None, None] & am[:, None, None, :].bool()
    if dtype is not None:
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


class Attn(torch.nn.Module):
    """Two attention layers reading one mask: SDPA (bool masks) or matmul-softmax-matmul (float masks)."""

    def __init__(self, sdpa: bool) -> None:
        super().__init__()
        self.sdpa = sdpa
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(D, 3 * D) for _ in range(2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        for lin in self.qkv:
            q, k, v = lin(x).view(b, n, 3, H, D // H).permute(2, 0, 3, 1, 4)
            if self.sdpa:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            else:
                s = q @ k.transpose(-1, -2) / (D // H) ** 0.5 + mask
                o = torch.softmax(s, dim=-1) @ v
            x = x + o.transpose(1, 2).reshape(b, n, D)
        return x


class WithBreak(torch.nn.Module):
    """The mask is built in one graph and read in the next (an explicit graph break between)."""

    def __init__(self, sdpa: bool, window: int | None) -> None:
        super().__init__()
        self.attn, self.window = Attn(sdpa), window

    def forward(self, x: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
        mask = hf_mask(am, x.shape[1], self.window, None if self.attn.sdpa else x.dtype)
        torch._dynamo.graph_break()
        return self.attn(x, mask)


def _inputs(dtype=torch.float32):
    torch.manual_seed(0)
    x = torch.randn(2, L, D, dtype=dtype)
    am = torch.ones(2, L, dtype=torch.long)
    am[1, :6] = 0  # left padding: rows 0..5 of the second sequence see no key
    return x, am


def _check(model, compiled, args, grads=True):
    """Output (and input / parameter gradients) of ``compiled`` vs eager, 2x rule against float64."""
    ref_model = copy.deepcopy(model).double()
    results = []
    for m, cast in ((compiled, None), (model, None), (ref_model, torch.float64)):
        x = args[0].detach().to(cast).requires_grad_(True)  # the rest (masks) are passed as they are
        rest = [a.to(cast) if cast and a.is_floating_point() else a for a in args[1:]]
        m.zero_grad(set_to_none=True)
        out = m(x, *rest)
        out.square().sum().backward()
        results.append((out, x.grad, [p.grad for p in m.parameters()]))
    (o, gx, gp), (oe, gxe, gpe), (orf, gxr, gpr) = results
    assert_2x(o, oe, orf)
    if grads:
        assert_2x(gx, gxe, gxr, "dx")
        for a, b, c in zip(gp, gpe, gpr):
            assert_2x(a, b, c, "dparam")


def _sources(report) -> list[str]:
    return [s.mask.get("source") for s in report.sites]


@pytest.mark.parametrize("sdpa,window", [(True, None), (False, 5)], ids=["sdpa-bool-causal", "eager-float-window"])
def test_graph_break_certificate(sdpa, window):
    torch._dynamo.reset()
    model = WithBreak(sdpa, window)
    compiled = torch.compile(model, backend="attnfuse", options={"inner": "eager"})
    _check(model, compiled, _inputs())
    report = attnfuse.last_report()
    assert _sources(report) == [_crossgraph.EARLIER] * 2, str(report)
    kinds = {s.mask["kind"] for s in report.sites}
    assert kinds == {"causal+padding" if window is None else "causal+window+padding"}, kinds
    if window is not None:
        assert all(s.mask["window"] == [window - 1, 0] for s in report.sites)


def test_graph_break_training_inductor():
    torch._dynamo.reset()
    model = WithBreak(True, None)
    compiled = torch.compile(model, backend="attnfuse")
    _check(model, compiled, _inputs())
    _check(model, compiled, _inputs())  # the second step reuses the variant
    assert _sources(attnfuse.last_report()) == [_crossgraph.EARLIER] * 2


def _records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "attnfuse.crossgraph"]


def test_eager_mask_verified_then_modified(caplog):
    """A mask built outside the compiled region is verified by value; modified in place so that it is no longer a
    band & key vector, or replaced by an unstructured tensor, the call runs the dense graph (still exact)."""
    torch._dynamo.reset()
    caplog.set_level(logging.DEBUG, logger="attnfuse.crossgraph")
    model = Attn(True)
    compiled = torch.compile(model, backend="attnfuse", options={"inner": "eager"})
    x, am = _inputs()
    mask = hf_mask(am, L, None, None)
    _check(model, compiled, (x, mask))
    report = attnfuse.last_report()
    assert _sources(report) == [_crossgraph.VERIFIED] * 2 and report.sites[0].mask["kind"] == "causal+padding"
    caplog.clear()
    _check(model, compiled, (x, mask))
    assert not any("recognized" in m or "no band" in m for m in _records(caplog))  # checked once per tensor
    mask[0, 0, 20, 3] = False  # in place: no longer band & key vector
    caplog.clear()
    _check(model, compiled, (x, mask))
    assert any(m.startswith("dense call") for m in _records(caplog)), _records(caplog)
    torch.manual_seed(1)
    other = torch.rand(2, 1, L, L) > 0.3
    other[..., 0] = True  # every row sees a key
    caplog.clear()
    _check(model, compiled, (x, other))
    assert any("no band" in m for m in _records(caplog)) and any(m.startswith("dense call") for m in _records(caplog))


def test_dense_report_says_why():
    """The first call's mask is unstructured: the report of the dense graph says why."""
    torch._dynamo.reset()
    model = Attn(True)
    compiled = torch.compile(model, backend="attnfuse", options={"inner": "eager"})
    x, _ = _inputs()
    torch.manual_seed(2)
    mask = torch.rand(2, 1, L, L) > 0.5
    mask[..., 0] = True
    _check(model, compiled, (x, mask), grads=False)
    report = attnfuse.last_report()
    assert _sources(report) == [_crossgraph.DENSE] * 2 and "no certificate" in report.sites[0].mask["why"]


def test_certificate_tracks_versions():
    """A certificate holds while the mask and the inputs its recipe read are unmodified; after an in-place write
    to either the values are checked instead."""
    am = torch.ones(2, 11, dtype=torch.long)
    am[0, :3] = 0
    graphs = []

    def capture(gm, example_inputs):  # dynamo's graph of the mask builder, compiled by attnfuse's backend
        graphs.append(attnfuse_backend(gm, example_inputs, {"inner": "eager"}))
        return graphs[-1]

    torch._dynamo.reset()
    fn = torch.compile(lambda am: hf_mask(am, 11, None, None), backend=capture)
    mask = fn(am)
    assert _crossgraph.decide(mask)[0] == _crossgraph.EARLIER
    before = am.bool()
    am[1, 0] = 0  # the recipe's input changed: the mask no longer equals the recipe's value on it
    got = _crossgraph.decide(mask)
    assert got[0] == _crossgraph.VERIFIED and torch.equal(got[2][0], before)  # the key vector of its values
    mask2 = fn(am)
    assert _crossgraph.decide(mask2)[0] == _crossgraph.EARLIER
    mask2[0, 0, 5, 6] = True  # the mask itself written: a value check, which fails
    assert _crossgraph.decide(mask2) is None


def _noisy(am):
    return hf_mask(am, 11, None, None) & (torch.rand(11, 11) > 0.5)


def _written(am):
    mask = hf_mask(am, 11, None, None)
    mask[:, :, 0, 0] = False
    return mask


def _from_states(am, states):
    return hf_mask(am, 11, None, None) & (states.sum(-1) > 0)[:, None, None, :]


@pytest.mark.parametrize("fn", [hf_mask, _noisy, _written, _from_states], ids=["pure", "random", "in-place",
                                                                                "large-input"])
def test_recipe_only_from_pure_small_slices(fn):
    """A mask output gets a recipe only when it is a pure function of small inputs (negative twins: a random op,
    an in-place write, a large (B, L, D) input)."""
    from attnfuse.passes import _maskrecipe

    found = []

    def capture(gm, example_inputs):
        found.append(_maskrecipe.recipes(gm))
        return gm

    am = torch.ones(2, 11, dtype=torch.long)
    args = (am, torch.randn(2, 11, 64)) if fn is _from_states else (am, 11, None, None) if fn is hf_mask else (am,)
    torch._dynamo.reset()
    torch.compile(fn, backend=capture)(*args)
    assert [bool(r) for r in found] == [fn is hf_mask], found
