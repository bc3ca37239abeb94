"""``window_pad=True``: the textbook ``unfold`` spelling of local attention, exactly, on the CPU path of
``attnfuse::attention`` (`attnfuse.kernels.tiled`).

The reference is that spelling itself (`unfold_attention`: pad K/V with zero rows, take windows with ``unfold``,
softmax over each window), in float64; eager is the same code in the input dtype, for the 2x rule.  Odd lengths
whose bands cross the 64-row tiles, left != right, causal (right 0) and two-sided bands, windows wider than the
sequence, softcap, GQA, a key mask, float32 and float16, forward and backward.  Also: the padded keys matter
only on the edge rows (and there by more than rounding), the per-row count against the unfold spelling's own
zeros, gradcheck through dropout, opcheck, every refusal's ValueError, the cost model and the export's refusal.
"""

from __future__ import annotations

import math
import types
import zlib

import pytest
import torch
import torch.nn.functional as F

import attnfuse  # noqa: F401 - registers the op
from attnfuse import ops
from attnfuse.costmodel import plan as planner
from attnfuse.export import _lower
from attnfuse.kernels import reference, tiled
from tests._util import assert_2x
from tests.kernels.window._window_pad_helpers import unfold_attention

DTYPES = [torch.float32, torch.float16]


def _seed(*key) -> None:
    torch.manual_seed(zlib.crc32(repr(key).encode()))


def _leaf(x, dtype):
    return x.detach().to(dtype).requires_grad_(True)


def compare(dtype, b, h, hk, length, d, dv, left, right, *, causal=False, keep=None, mask_fill=None, **kw):
    """Ours (the op, ``window_pad=True``) vs eager vs float64, forward and the gradients of q, k, v."""
    q, k, v = torch.randn(b, h, length, d), torch.randn(b, hk, length, d), torch.randn(b, hk, length, dv)
    grad = torch.randn(b, h, length, dv)
    ref_right = (0 if right < 0 else min(right, 0)) if causal else right
    fill = -math.inf if mask_fill is None else mask_fill
    results = {}
    for name, dt in (("eager", dtype), ("ref", torch.float64)):
        ins = [_leaf(x, dt) for x in (q, k, v)]
        out = unfold_attention(*ins, left, ref_right, keep=keep, mask_fill=fill, **kw)
        out.backward(grad.to(dt))
        results[name] = (out, *(x.grad for x in ins))
    ins = [_leaf(x, dtype) for x in (q, k, v)]
    mask = None if keep is None else keep[:, None, None, :]
    out = ops.attend(*ins, mask, window_left=left, window_right=right, causal=causal, kv_groups=h // hk,
                     mask_fill=mask_fill, window_pad=True, **kw)
    out.backward(grad.to(dtype))
    ours = (out, *(x.grad for x in ins))
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert ours[i].dtype == dtype, name
        assert_2x(ours[i], results["eager"][i], results["ref"][i], f"{name}")
    return ours, results["ref"]


# name: (B, H, Hkv, L, D, Dv, left, right, extra kwargs)
CASES = {
    "two_sided_5_3": (2, 2, 2, 97, 40, 40, 5, 3, {}),
    "wide_70_9_gqa": (1, 4, 2, 131, 40, 40, 70, 9, {}),
    "right_heavy_2_66": (1, 2, 2, 131, 40, 24, 2, 66, {}),
    "causal_as_right0": (1, 2, 2, 97, 40, 40, 13, 0, {}),
    "causal_flag": (1, 2, 2, 97, 40, 40, 13, -1, dict(causal=True)),
    "causal_caps_right": (1, 2, 2, 97, 40, 40, 7, 5, dict(causal=True)),
    "wider_than_sequence": (1, 3, 1, 37, 40, 40, 50, 61, {}),
    "left0_right9": (1, 2, 2, 67, 40, 40, 0, 9, {}),
    "softcap_scale_gqa": (1, 4, 2, 97, 40, 40, 9, 4, dict(softcap=3.0, scale=0.5)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_the_unfold_spelling(name, dtype):
    _seed(name, dtype)
    b, h, hk, length, d, dv, left, right, kw = CASES[name]
    compare(dtype, b, h, hk, length, d, dv, left, right, **kw)


def test_float64_inputs():
    _seed("fp64")
    (out, *_), (ref, *_) = compare(torch.float64, 1, 2, 1, 45, 16, 16, 6, 11)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_mask_reaches_real_keys_only(dtype):
    """A key mask masks real keys; the padded ones stay: row 0, whose real keys are all masked, is 0 (its
    phantoms), not NaN, and its gradients are finite."""
    _seed("mask", dtype)
    keep = torch.rand(2, 61) > 0.3
    keep[:, :4] = False  # row 0 sees keys 0..3 only: all masked
    (out, *grads), _ = compare(dtype, 2, 2, 2, 61, 24, 24, 6, 3, keep=keep)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    assert all(torch.isfinite(g).all() for g in grads)


def test_key_mask_with_a_finite_fill():
    _seed("finite-fill")
    keep = torch.rand(1, 53) > 0.4
    keep[:, 40:] = False
    compare(torch.float32, 1, 2, 1, 53, 16, 16, 4, 7, keep=keep, mask_fill=-1e4)


@pytest.mark.parametrize("left,right", [(5, 3), (0, 6), (70, 9), (40, 25)])
def test_padded_keys_matter_on_the_edge_rows_only(left, right):
    """Edge rows (with n_pad > 0) differ from the plain band by more than rounding; the other rows agree."""
    _seed("edges", left, right)
    length = 97
    q, k, v = torch.randn(1, 2, length, 32), torch.randn(1, 2, length, 32), torch.randn(1, 2, length, 32)
    padded = ops.attend(q, k, v, window_left=left, window_right=right, window_pad=True)
    plain = ops.attend(q, k, v, window_left=left, window_right=right)
    edge = reference.phantom_keys(torch.arange(length), length, left, right) > 0
    assert edge.any() and (~edge).any()
    torch.testing.assert_close(padded[:, :, ~edge], plain[:, :, ~edge], rtol=1e-6, atol=1e-6)
    assert ((padded - plain)[:, :, edge].abs().amax(dim=(0, 1, 3)) > 1e-3).all()


@pytest.mark.parametrize("length,left,right", [(97, 5, 3), (13, 20, 2), (13, 0, 30), (9, 4, 4), (1, 2, 3)])
def test_phantom_count_is_the_unfold_spellings_zero_rows(length, left, right):
    """`reference.phantom_keys` against the unfold spelling itself: the padded positions in each row's window."""
    w = left + right + 1
    real = F.pad(torch.ones(length), (left, right)).unfold(0, w, 1)  # (L, W): 1 where the window holds a real key
    expected = (real == 0).sum(-1)
    assert torch.equal(reference.phantom_keys(torch.arange(length), length, left, right), expected)


def test_gradcheck_with_dropout_softcap_and_gqa():
    """float64 gradcheck of the CPU op: the backward (dropout replayed from the seed) is the forward's exact
    derivative with the padded keys in every edge row's denominator."""
    _seed("gradcheck")
    q = torch.randn(1, 2, 11, 6, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, 11, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    seed = torch.tensor(1234)

    def fn(q, k, v):
        return ops.attend(q, k, v, None, seed, window_left=3, window_right=2, window_pad=True, kv_groups=2,
                          softcap=2.0, dropout_p=0.3)

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("kw", [dict(window_left=2, window_right=1), dict(window_left=3, causal=True),
                                dict(window_left=1, window_right=4, kv_groups=2, softcap=2.0)])
def test_opcheck(kw):
    hk = 4 // kw.get("kv_groups", 1)
    q = torch.randn(2, 4, 7, 8, requires_grad=True)
    k, v = (torch.randn(2, hk, 7, 8, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.attnfuse.attention.default, (q, k, v), {**kw, "window_pad": True})


@pytest.mark.parametrize("kw,match", [
    (dict(), "needs a finite band"),
    (dict(window_left=-1, window_right=3), "needs a finite band"),
    (dict(window_left=3, window_right=-1), "needs a finite band"),
    (dict(window_left=3, window_right=2, lk=9), "q_len == kv_len"),
    (dict(window_left=3, window_right=2, alibi=True), "alibi"),
    (dict(window_left=3, window_right=2, block_sparse=True), "block_sparse"),
])
def test_refusals_name_attnfuse_the_option_and_the_allowed_values(kw, match):
    kw = dict(kw)
    lk = kw.pop("lk", 7)
    q, k = torch.randn(1, 2, 7, 8), torch.randn(1, 2, lk, 8)
    alibi = torch.ones(2) if kw.pop("alibi", False) else None
    mask = torch.ones(7, lk, dtype=torch.bool) if kw.get("block_sparse") else None
    with pytest.raises(ValueError, match=f"attnfuse.attention: window_pad=True .*{match}") as info:
        ops.attend(q, k, k, mask, None, alibi, window_pad=True, **kw)
    assert "window_pad" in str(info.value)
    with pytest.raises(ValueError, match=f"attnfuse tiled attention: window_pad=True .*{match}"):
        tiled.forward(q, k, k, mask, alibi=alibi, scale=1.0, window_pad=True, **kw)


def test_causal_with_an_unbounded_right_side_is_a_finite_band():
    _seed("causal-unbounded")
    q, k, v = torch.randn(1, 2, 19, 8), torch.randn(1, 2, 19, 8), torch.randn(1, 2, 19, 8)
    out = ops.attend(q, k, v, window_left=4, causal=True, window_pad=True)
    ref = unfold_attention(q.double(), k.double(), v.double(), 4, 0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_attention_sdpa_refuses_window_pad_with_a_mask():
    q = torch.randn(1, 2, 7, 8)
    with pytest.raises(ValueError, match="attnfuse.attention_sdpa: window_pad=True"):
        ops.attention_sdpa(q, q, q, torch.ones(1, 1, 1, 7, dtype=torch.bool), window_left=2, window_right=2,
                           window_pad=True)


# --------------------------------------------------------------------------------------------- cost model

SHAPE = dict(batch=2, heads=8, kv_heads=8, q_len=4096, kv_len=4096, head_dim=64, v_head_dim=64, elem=2)


def test_costmodel_plans_a_padded_window_as_the_window_family():
    spec = planner.PRESETS["h100"]
    band = {"window": (127, 128), "causal": False}
    plain = planner.plan(SHAPE, spec, planner.EXACT, structure=band)
    padded = planner.plan(SHAPE, spec, planner.EXACT, structure={**band, "window_pad": True})
    assert plain.kernel == padded.kernel == "window"
    assert padded.config == plain.config
    row = {r["kernel"]: r for r in padded.candidates}
    assert row["window"]["est_time_s"] == {r["kernel"]: r for r in plain.candidates}["window"]["est_time_s"]
    assert "window kernel only" in row["flash"]["rejected"]


def test_costmodel_never_sends_a_padded_window_to_blocksparse():
    spec = planner.PRESETS["h100"]
    sparse = {"window": (2000, 2000), "causal": False, "block_sparse": True, "density": 0.01}
    assert planner.plan(SHAPE, spec, planner.EXACT, structure=sparse).kernel == "blocksparse"
    padded = planner.plan(SHAPE, spec, planner.EXACT, structure={**sparse, "window_pad": True})
    assert padded.kernel == "window"
    assert "window kernel only" in {r["kernel"]: r for r in padded.candidates}["blocksparse"]["rejected"]
    with pytest.raises(ValueError, match="window_pad"):
        planner.plan(SHAPE, spec, planner.EXACT, structure={"window_pad": True})


# --------------------------------------------------------------------------------------------- export

def test_export_keeps_a_padded_window_as_its_original_ops():
    site = types.SimpleNamespace(kernel="window", table=[])
    padded = types.SimpleNamespace(dropout_p=0.0, softcap=0.0, window_pad=True)
    plain = types.SimpleNamespace(dropout_p=0.0, softcap=0.0, window_pad=False)
    for fmt, target in (("onnx", "ONNX Attention"), ("mlir", "aten.scaled_dot_product_attention")):
        why = _lower.unsupported(fmt, padded, site)
        assert why is not None and why.startswith(f"{target} has no zero-padded keys") and "original ops" in why
        assert _lower.unsupported(fmt, plain, site) is None
    assert _lower.unsupported("pt2", padded, site) is None  # pt2 keeps the op itself
    q = torch.randn(1, 2, 7, 8)
    for lowering in (_lower.sdpa_decomposition, _lower.plain_attention):
        with pytest.raises(ValueError, match="window_pad=True"):
            lowering(q, q, q, window_left=2, window_right=2, window_pad=True)
