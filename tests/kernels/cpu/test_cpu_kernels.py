"""The standalone kernels (`attnfuse.kernels.<family>.attention`) on plain CPU tensors, no TRITON_INTERPRET.

There they run the registered op's CPU implementation (`attnfuse.kernels._family`): the exact families
(flash, window, blocksparse) are held to the 2x rule, forward and backward (dq, dk, dv; a bias gradient where
the family takes one), against eager ``F.scaled_dot_product_attention`` with the equivalent dense mask in the
input dtype and the same in float64 (a textbook where SDPA has no spelling: softcap, the ``unfold`` window).
Top-k and LSH (approximate) are held to their own references (tests/kernels/topk, tests/kernels/lsh)
at the odd sizes here, and to the op's approximate path.  Odd sizes: B=2, H=3, L=97, D=40, GQA with one K/V
head.  The ``*_interpret.py`` tests beside them hold the same families on the Triton path.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attnfuse  # noqa: F401 - registers torch.ops.attnfuse
from attnfuse.kernels import _family, _launch, blocksparse, flash, lsh, topk, window
from tests._util import assert_2x, band

pytestmark = pytest.mark.skipif(_launch.interpreting(),
                                reason="the plain-CPU path; the *_interpret.py tests have the kernels'")

B, H, L, D = 2, 3, 97, 40
_INF = float("-inf")
EXACT_DTYPES = [torch.float32, torch.float64]
LOW_DTYPES = [torch.bfloat16, torch.float16]
FLOAT64_ULPS = 64


def _inputs(hkv: int, lq: int = L, lk: int = L, dv: int = D) -> list[torch.Tensor]:
    return [torch.randn(B, H, lq, D, dtype=torch.float64), torch.randn(B, hkv, lk, D, dtype=torch.float64),
            torch.randn(B, hkv, lk, dv, dtype=torch.float64)]


def sdpa(q, k, v, *, keep=None, bias=None, scale=None):
    """Eager SDPA with a dense (…, Lq, Lk) bool ``keep`` and/or additive ``bias`` (cast to q's dtype)."""
    mask = None if bias is None else bias.to(q.dtype)
    if keep is not None:
        mask = keep if mask is None else mask.masked_fill(~keep, _INF)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def check(ours, eager, dtype, inputs, *, backward=True, what="") -> torch.Tensor:
    """``ours`` vs ``eager`` in ``dtype`` vs ``eager`` in float64 on ``inputs`` (float64, rounded to ``dtype``
    first so every run reads the same values): output and, with ``backward``, every input's gradient, 2x rule.
    float64 has no wider reference (eager is the reference): there ours must agree with it within
    ``FLOAT64_ULPS`` ulps of the result's magnitude."""
    base = [x.to(dtype) for x in inputs]
    runs = {}
    for name, fn, dt in (("ref", eager, torch.float64), ("eager", eager, dtype), ("ours", ours, dtype)):
        leaves = [x.to(dt).requires_grad_(backward) for x in base]
        out = fn(*leaves)
        if backward:
            if name == "ref":
                grad = torch.randn_like(out)
            out.backward(grad.to(dt))
        runs[name] = [out.detach(), *(x.grad for x in leaves)] if backward else [out.detach()]
    for i, (ours_t, eager_t, ref_t) in enumerate(zip(runs["ours"], runs["eager"], runs["ref"])):
        name = f"{what} {['out', 'dq', 'dk', 'dv', 'dbias'][i]}"
        assert ours_t is not None and ours_t.dtype == dtype and ours_t.shape == ref_t.shape, name
        if dtype == torch.float64:
            assert torch.equal(ours_t.isnan(), ref_t.isnan()), name
            tol = FLOAT64_ULPS * torch.finfo(dtype).eps * ref_t.nan_to_num().abs().max().item()
            err = (ours_t - ref_t).nan_to_num().abs().max().item()
            assert err <= tol, f"{name}: error {err:.3g} vs float64 eager > {FLOAT64_ULPS} ulps ({tol:.3g})"
        else:
            assert_2x(ours_t, eager_t, ref_t, name)
    return runs["ours"][0]


# --------------------------------------------------------------------------------------------- exact families


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_flash_causal_gqa(dtype):
    keep = band(L, L, causal=True)
    check(lambda q, k, v: flash.attention(q, k, v, causal=True),
          lambda q, k, v: sdpa(q, k, v, keep=keep), dtype, _inputs(1), what="flash causal gqa")


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_flash_key_padding_cross_lengths(dtype):
    keep = torch.rand(B, 1, 1, L) > 0.3
    keep[..., 0] = True  # every row keeps a key: SDPA zeroes fully masked rows where eager softmax is NaN
    check(lambda q, k, v: flash.attention(q, k, v, mask=keep, scale=0.3),
          lambda q, k, v: sdpa(q, k, v, keep=keep, scale=0.3), dtype, _inputs(3, lq=61, dv=24),
          what="flash key padding")


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_flash_learned_bias_gets_its_gradient(dtype):
    inputs = [*_inputs(1), torch.randn(1, H, L, L, dtype=torch.float64)]
    check(lambda q, k, v, bias: flash.attention(q, k, v, mask=bias, causal=True),
          lambda q, k, v, bias: sdpa(q, k, v, bias=bias, keep=band(L, L, causal=True)), dtype, inputs,
          what="flash bias")


def capped(q, k, v, *, softcap, causal):
    """Textbook soft-capped attention (SDPA has no softcap), GQA by repeating K/V."""
    k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], 1) for x in (k, v))
    s = softcap * torch.tanh((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) / softcap)
    if causal:
        s = s.masked_fill(~band(q.shape[2], k.shape[2], causal=True), _INF)
    return s.softmax(-1) @ v


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_flash_softcap(dtype):
    check(lambda q, k, v: flash.attention(q, k, v, causal=True, softcap=2.0),
          lambda q, k, v: capped(q, k, v, softcap=2.0, causal=True), dtype, _inputs(1), what="flash softcap")


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_window_two_sided_gqa(dtype):
    keep = band(L, L, 7, 3)
    check(lambda q, k, v: window.attention(q, k, v, window_size=(7, 3)),
          lambda q, k, v: sdpa(q, k, v, keep=keep), dtype, _inputs(1), what="window (7, 3)")


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_window_causal_alibi(dtype):
    slopes = torch.tensor([2.0 ** -(i + 1) for i in range(H)])
    pos = torch.arange(L, dtype=torch.float64)
    bias = slopes.double()[:, None, None] * (pos[None, None, :] - pos[None, :, None])  # slope[h] * (j - i)
    keep = band(L, L, 15, -1, causal=True)
    check(lambda q, k, v: window.attention(q, k, v, window_size=(15, -1), causal=True, alibi=slopes),
          lambda q, k, v: sdpa(q, k, v, keep=keep, bias=bias), dtype, _inputs(1), what="window alibi")


def unfolded(q, k, v, *, left, right):
    """window.py's docstring spelling of ``window_pad=True``: zero-padded K/V unfolded into windows."""
    k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], 1) for x in (k, v))
    w = left + right + 1
    kp, vp = F.pad(k, (0, 0, left, right)), F.pad(v, (0, 0, left, right))
    s = (q.unsqueeze(3) @ kp.unfold(2, w, 1)) / math.sqrt(q.shape[-1])
    return (s.softmax(-1) @ vp.unfold(2, w, 1).transpose(-2, -1)).squeeze(3)


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_window_pad_is_the_unfold_spelling(dtype):
    check(lambda q, k, v: window.attention(q, k, v, window_size=(5, 3), window_pad=True),
          lambda q, k, v: unfolded(q, k, v, left=5, right=3), dtype, _inputs(1), what="window_pad")


def blocks(lq: int, lk: int, size: int = 16) -> torch.Tensor:
    """A random block pattern of ``size`` tiles, diagonal blocks kept (no row loses every key)."""
    tiles = torch.rand(-(-lq // size), -(-lk // size)) > 0.6
    tiles |= torch.eye(*tiles.shape, dtype=torch.bool)
    return tiles.repeat_interleave(size, 0)[:lq].repeat_interleave(size, 1)[:, :lk]


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_blocksparse_bool_causal_gqa(dtype):
    keep = blocks(L, L)
    check(lambda q, k, v: blocksparse.attention(q, k, v, keep, causal=True),
          lambda q, k, v: sdpa(q, k, v, keep=keep & band(L, L, causal=True)), dtype, _inputs(1),
          what="blocksparse bool")


def floored_bias() -> torch.Tensor:
    """Additive float32 (H, L, L): a bias inside kept blocks, -inf and finfo.min (masked, the floor) outside."""
    bias = 0.5 * torch.randn(H, L, L)
    bias = bias.masked_fill(~blocks(L, L), _INF)
    bias[:, ::2] = bias[:, ::2].masked_fill(torch.isneginf(bias[:, ::2]), torch.finfo(torch.float32).min)
    return bias


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_blocksparse_additive_with_band(dtype):
    bias = floored_bias()
    dense = bias.masked_fill(bias <= torch.finfo(torch.float32).min, _INF).double()
    keep = band(L, L, 31, -1)
    check(lambda q, k, v: blocksparse.attention(q, k, v, bias, window_size=(31, -1)),
          lambda q, k, v: sdpa(q, k, v, keep=keep, bias=dense), dtype, _inputs(1), what="blocksparse additive")


def test_blocksparse_floor_row_is_nan_as_on_the_triton_path():
    """A row whose every entry is <= finfo.min is fully masked for block-sparse (NaN), a uniform row for flash
    (eager's arithmetic), on CPU as in the kernels."""
    q, k, v = (x.float() for x in _inputs(1))
    bias = floored_bias()
    bias[:, 5] = torch.finfo(torch.float32).min
    sparse = blocksparse.attention(q, k, v, bias)
    assert sparse[:, :, 5].isnan().all() and not sparse[:, :, 6:].isnan().any()
    dense = flash.attention(q, k, v, mask=bias)
    assert torch.isfinite(dense).all()
    assert torch.allclose(dense[:, :, 5], v.mean(2), atol=1e-5)


@pytest.mark.parametrize("family", ["flash", "window", "blocksparse"])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_low_precision_forward(family, dtype):
    keep = {"flash": band(L, L, causal=True), "window": band(L, L, 9, 9), "blocksparse": blocks(L, L)}[family]
    ours = {"flash": lambda q, k, v: flash.attention(q, k, v, causal=True),
            "window": lambda q, k, v: window.attention(q, k, v, window_size=(9, 9)),
            "blocksparse": lambda q, k, v: blocksparse.attention(q, k, v, keep)}[family]
    check(ours, lambda q, k, v: sdpa(q, k, v, keep=keep), dtype, _inputs(1), backward=False, what=family)


def test_rows_without_a_key_are_nan_as_eager_softmax():
    q, k, v = (x.float() for x in _inputs(1, lq=30, lk=10))
    out = window.attention(q, k, v, window_size=(2, -1))  # rows i >= 12 see no key j < 10 with j >= i - 2
    assert out[:, :, 12:].isnan().all() and not out[:, :, :12].isnan().any()
    keep = torch.ones(B, 1, L, L, dtype=torch.bool)
    keep[:, :, 4] = False
    q, k, v = (x.float() for x in _inputs(1))
    out = flash.attention(q, k, v, mask=keep)
    assert out[:, :, 4].isnan().all() and out.isnan().sum() == B * H * D


# --------------------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("family", ["flash", "window"])
def test_dropout_gradients_match_the_function(family):
    """A fixed seed makes dropout a fixed function: its gradients (the op's CPU backward) pass gradcheck."""
    q, k, v = (x[:1, :2, :13, :8].clone().requires_grad_() for x in _inputs(1))
    extra = {"window_size": (3, 2)} if family == "window" else {}
    fn = {"flash": flash.attention, "window": window.attention}[family]
    assert torch.autograd.gradcheck(lambda q, k, v: fn(q, k, v, dropout_p=0.25, seed=7, causal=True, **extra),
                                    (q, k, v), fast_mode=True)


def test_dropout_keeps_the_expectation_and_draws_a_seed():
    q, k = (x.float() for x in _inputs(1)[:2])
    v = torch.ones(B, 1, L, D)
    a = flash.attention(q, k, v, dropout_p=0.4)
    b = flash.attention(q, k, v, dropout_p=0.4)
    assert not torch.equal(a, b), "seed=None must draw a fresh seed per call"
    assert torch.equal(flash.attention(q, k, v, dropout_p=0.4, seed=3), flash.attention(q, k, v, dropout_p=0.4,
                                                                                        seed=3))
    assert abs(a.mean().item() - 1.0) < 0.02  # E[keep / (1 - p)] = 1; rows of p sum to 1
    assert (a[..., 0] != 1.0).float().mean() > 0.9  # some keys of nearly every row were dropped


# --------------------------------------------------------------------------------------------- approximate families


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_topk_odd_sizes_against_its_reference(dtype):
    """Top-k attention == exact attention over `select`'s blocks (tests/kernels/topk's reference)."""
    from tests.kernels.topk._topk_helpers import visible

    params = dict(topk=32, block=32, sink=0, local=0)
    inputs = _inputs(1)
    q, k = (x.to(dtype) for x in inputs[:2])
    chosen = topk.select(q, k, causal=True, **params)
    assert not chosen[..., -1, :].all(), "the last query block kept every key block: not a sparse test"
    keep = visible(chosen, L, L, H, params["block"]) & band(L, L, causal=True)
    check(lambda q, k, v: topk.attention(q, k, v, causal=True, **params),
          lambda q, k, v: sdpa(q, k, v, keep=keep), dtype, inputs, what="topk")


LSH = dict(tables=2, bits=3, probes=1, cap=32, block=32, sink=0, local=0, seed=5)


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_lsh_odd_sizes_against_its_reference(dtype):
    """LSH attention == exact attention over the key blocks its `select` chose (tests/kernels/lsh checks the
    selection itself against its own reference)."""
    from tests.kernels.topk._topk_helpers import visible

    inputs = _inputs(1)
    q, k = (x.to(dtype) for x in inputs[:2])
    chosen = lsh.select(q, k, causal=True, **LSH)
    assert not chosen[..., -1, :].all(), "the last query block kept every key block: not a sparse test"
    keep = visible(chosen, L, L, H, LSH["block"]) & band(L, L, causal=True)
    check(lambda q, k, v: lsh.attention(q, k, v, causal=True, **LSH),
          lambda q, k, v: sdpa(q, k, v, keep=keep), dtype, inputs, what="lsh")


@pytest.mark.parametrize("family,params", [("topk", {"topk": 32, "block": 32, "sink": 32, "local": 0}),
                                           ("lsh", LSH), ("lsh", dict(LSH, bits=-1, probes=0))])
def test_approximate_kernels_are_the_ops_cpu_path(family, params):
    q, k, v = (x.float() for x in _inputs(1))
    module = {"topk": topk, "lsh": lsh}[family]
    ours = module.attention(q, k, v, causal=True, scale=0.2, **params)
    table = json.dumps({"table": [[0, -1, family]], "params": {family: params}})
    op = torch.ops.attnfuse.attention(q, k, v, scale=0.2, causal=True, kv_groups=H, approx=table)[0]
    assert torch.equal(ours, op)


# --------------------------------------------------------------------------------------------- dispatch, README


def test_dispatch():
    q = torch.randn(1, 2, 8, 16)
    assert _family.triton_runs(q, q, q, "t") is False
    meta = q.to("meta")
    with pytest.raises(ValueError, match=r"flash.attention: the Triton kernel runs on CUDA tensors .* not meta"):
        flash.attention(meta, meta, meta)
    with pytest.raises(ValueError, match=r"must share a dtype"):
        window.attention(q, q.double(), q, window_size=(1, 1))


def test_readme_standalone_snippet_runs_on_cpu():
    text = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    snippet = re.search(r"usable on its own.*?```python\n(.*?)```", text, re.S).group(1)
    q = torch.randn(B, H, L, D, requires_grad=True)
    k, v = (torch.randn(B, 1, L, D, requires_grad=True) for _ in range(2))
    keep = blocks(L, L)
    env = {"q": q, "k": k, "v": v, "keep": keep}
    exec(snippet, env)
    out = env["out"]
    assert out.shape == (B, H, L, D) and torch.isfinite(out).all()
    torch.testing.assert_close(out, sdpa(q, k, v, keep=keep), rtol=1e-5, atol=1e-5)
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))
