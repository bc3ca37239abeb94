"""`attnfuse.kernels.sdpa` on CPU: the ``cpu`` backend (PyTorch's fused flash-attention CPU kernel) held to the
2x rule against eager in the same dtype and in float64 (forward in fp32/fp64/fp16/bf16, backward in fp16/bf16,
where `applies` lets it train), its per-call guard (NaN/Inf inputs, rows with no visible key, finite fills: NaN
pattern and values as eager, or exactly the reference where it runs), `applies`' reasons, and the CUDA backends'
argument plumbing through their meta kernels (no GPU here).  Odd sizes: L=97 / 200 keys, head dims 40 and 64.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from attnfuse.kernels import reference, sdpa
from attnfuse.kernels.sdpa import _aten, _guard
from tests._util import assert_2x, ref_attention

B, H, L, LK = 2, 4, 97, 200
_INF = float("-inf")
HALF = [torch.float16, torch.bfloat16]
_ATEN = torch.ops.aten


def _seed(*key):
    torch.manual_seed(zlib.crc32(repr(key).encode()))


def _inputs(hk=H, lq=L, lk=L, d=40):
    return [torch.randn(B, H, lq, d, dtype=torch.float64), torch.randn(B, hk, lk, d, dtype=torch.float64),
            torch.randn(B, hk, lk, d, dtype=torch.float64)]


def _eager(q, k, v, mask=None, **kw):
    return ref_attention(q, k, v, mask, kv_groups=q.shape[1] // k.shape[1], **kw)


def _run(dtype, inputs, mask=None, *, grad, mask_grad=False, **kw):
    """ours / eager (dtype) / float64: [out, dq, dk, dv(, dmask)] each; the float64 inputs rounded to dtype first."""
    base = [x.to(dtype) for x in inputs]
    float_mask = mask is not None and mask.dtype != torch.bool
    runs, grad_out = {}, None
    for name, dt in (("ref", torch.float64), ("eager", dtype), ("ours", dtype)):
        leaves = [x.to(dt).clone().requires_grad_(grad) for x in base]  # fresh leaves: no shared .grad
        m = mask.to(dtype).to(dt).clone().requires_grad_(mask_grad) if float_mask else mask
        fn = (lambda *a, **k: sdpa.attention(*a, backend="cpu", **k)) if name == "ours" else _eager
        out = fn(*leaves, mask=m, **kw)
        res = [out.detach()]
        if grad:
            grad_out = torch.randn_like(out) if grad_out is None else grad_out
            out.backward(grad_out.to(dt))
            res += [x.grad for x in leaves] + ([m.grad] if mask_grad else [])
        runs[name] = res
    return runs


def _check(runs, dtype, what):
    for i, (ours, eager, ref) in enumerate(zip(runs["ours"], runs["eager"], runs["ref"])):
        name = f"{what} {['out', 'dq', 'dk', 'dv', 'dmask'][i]}"
        assert ours.dtype == dtype and ours.shape == ref.shape, name
        if dtype == torch.float64:  # no wider reference: within 64 ulps of float64 eager, same NaN pattern
            assert torch.equal(ours.isnan(), ref.isnan()), name
            err = (ours - ref).nan_to_num().abs().max().item()
            assert err <= 64 * torch.finfo(dtype).eps * ref.nan_to_num().abs().max().item(), f"{name}: {err:.3g}"
        else:
            assert_2x(ours, eager, ref, name)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN where the other is NaN."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _keypad(lk, causal=False):
    keep = torch.ones(B, 1, 1, lk, dtype=torch.bool)
    keep[0, ..., lk // 3: lk // 2] = False  # a hole in batch 0's keys; every row keeps some
    keep[1, ..., : 7 if causal else 0] = False  # left padding: under causal, rows 0..6 of batch 1 see no key
    return keep


CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "causal_cross": dict(causal=True, lk=LK),
    "cross": dict(lk=LK),
    "gqa": dict(hk=2, causal=True),
    "mqa_d64": dict(hk=1, d=64),
    "keypad": dict(mask="keypad", lk=LK),
    "bool_full": dict(mask="full"),
    "additive": dict(mask="additive", lk=LK, scale=0.3),
}


def _case(name, dtype):
    _seed(name, dtype)
    kw = dict(CASES[name])
    mask_kind = kw.pop("mask", None)
    shape = {key: kw.pop(key) for key in ("hk", "lk", "d") if key in kw}
    inputs = _inputs(**shape)
    lk = inputs[1].shape[2]
    mask = None
    if mask_kind == "keypad":
        mask = _keypad(lk)
    elif mask_kind == "full":
        mask = torch.rand(B, 1, L, lk) > 0.3
        mask[..., 0] = True
    elif mask_kind == "additive":
        mask = 2 * torch.randn(B, H, L, lk, dtype=torch.float64)
    return inputs, mask, kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", CASES)
def test_forward_2x_rule(name, dtype):
    inputs, mask, kw = _case(name, dtype)
    with torch.no_grad():
        _check(_run(dtype, inputs, mask, grad=False, **kw), dtype, name)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", CASES)
def test_forward_backward_2x_rule(name, dtype):
    inputs, mask, kw = _case(name, dtype)
    _check(_run(dtype, inputs, mask, grad=True, **kw), dtype, name)


def test_peaked_scores_and_a_float32_mask_on_bfloat16():
    _seed("peaked")
    q, k, v = _inputs(lk=LK)
    bias = 3 * torch.randn(B, 1, L, LK, dtype=torch.float64)
    _check(_run(torch.bfloat16, [3 * q, 3 * k, v], grad=True), torch.bfloat16, "peaked")
    base = [x.bfloat16() for x in (q, k, v)]
    ours = sdpa.attention(*base, backend="cpu", mask=bias.float())
    eager = _eager(*base, bias.float().bfloat16())  # eager in bf16 rounds the mask; ours keeps float32
    assert_2x(ours, eager, _eager(*[x.double() for x in base], bias.float().double()), "float32 mask")


# ------------------------------------------------------------------------------ which path runs, per call


def test_finite_inputs_run_the_kernel_forward_and_backward():
    _seed("kernel")
    q, k, v = (x.bfloat16() for x in _inputs(hk=2, lk=LK))
    keep = _keypad(LK)
    out, stats = sdpa.forward(q, k, v, keep, backend="cpu", scale=0.2, causal=True, kv_groups=2)
    bias = torch.zeros(B, 1, 1, LK).masked_fill(~keep, _INF)
    raw, lse = _ATEN._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, attn_mask=bias, scale=0.2)
    assert torch.equal(out, raw) and torch.equal(stats, lse) and out.transpose(1, 2).is_contiguous()
    assert stats.shape == sdpa.stats_like(q, "cpu").shape and stats.dtype == torch.float32
    g = torch.randn_like(out)
    grads = sdpa.backward(g, q, k, v, out, stats, keep, backend="cpu", scale=0.2, causal=True, kv_groups=2)
    expect = _ATEN._scaled_dot_product_flash_attention_for_cpu_backward(g, q, k, v, raw, lse, 0.0, True,
                                                                         attn_mask=bias, scale=0.2)
    assert grads[3] is None and all(torch.equal(a, b) for a, b in zip(grads[:3], expect))


@pytest.mark.parametrize("where", ["q", "k", "v", "mask_nan", "mask_posinf"])
def test_non_finite_inputs_run_the_reference(where):
    """Eager's 0 * NaN reaches rows the fused kernel skips (a causal row never reads a later NaN value)."""
    _seed("nonfinite", where)
    q, k, v = (x.float() for x in _inputs())
    mask = torch.randn(B, 1, L, L)
    if where in ("q", "k", "v"):
        {"q": q, "k": k, "v": v}[where][0, 1, 50, 3] = math.inf if where == "v" else math.nan
    else:
        mask[1, 0, 60, 10] = math.nan if where == "mask_nan" else math.inf
    out, stats = sdpa.forward(q, k, v, mask, backend="cpu", causal=True)
    eager = _eager(q, k, v, mask, causal=True)
    assert torch.equal(out.isnan(), eager.isnan()) and out.isnan().any()
    assert _same(out, reference.forward(q, k, v, mask, scale=1 / math.sqrt(40), causal=True))
    assert stats.isnan().all()  # the backward runs the reference too


def test_non_finite_grad_out_runs_the_reference_backward():
    _seed("grad_nan")
    q, k, v = (x.bfloat16() for x in _inputs())
    out, stats = sdpa.forward(q, k, v, backend="cpu", causal=True)
    g = torch.randn_like(out)
    g[0, 0, 3, 1] = math.nan
    ours = sdpa.backward(g, q, k, v, out, stats, backend="cpu", causal=True)
    expect = reference.backward(g, q, k, v, scale=1 / math.sqrt(40), causal=True)
    assert all(_same(a, b) for a, b in zip(ours[:3], expect[:3]))
    assert ours[0].isnan().any()


# ------------------------------------------------------------------------------ rows with no visible key


@pytest.mark.parametrize("kind", ["keypad", "full", "additive"])
def test_rows_without_keys_nan_like_eager(kind):
    """A whole batch padded away (key vector), a dead row in a full mask, an additive -inf row: NaN as eager,
    forward and gradients (dQ 0 on the row, NaN over dV of its head), the rest within 2x."""
    _seed("dead", kind)
    inputs = _inputs(hk=2, lk=LK)
    if kind == "keypad":
        mask = _keypad(LK)
        mask[1] = False
    elif kind == "full":
        mask = torch.rand(B, 1, L, LK) > 0.5
        mask[0, 0, 13] = False
    else:
        mask = torch.randn(B, H, L, LK, dtype=torch.float64)
        mask[1, 2, 40] = _INF
    runs = _run(torch.bfloat16, inputs, mask, grad=True)
    _check(runs, torch.bfloat16, kind)
    assert runs["ours"][0].isnan().any() and runs["ours"][3].isnan().any()
    q, k, v = (x.bfloat16() for x in inputs)
    assert sdpa.forward(q, k, v, mask.bfloat16() if kind == "additive" else mask, backend="cpu",
                        kv_groups=2)[1].isnan().all()


def test_rows_without_keys_under_causal_follow_the_reference():
    """Left padding under causal: the forward's NaN rows equal eager's; the gradients are exactly
    `reference.backward`'s (the op's own), which keeps NaN at a dead row's causally hidden keys."""
    _seed("dead_causal")
    q, k, v = (x.half() for x in _inputs())
    keep = _keypad(L, causal=True)
    out, stats = sdpa.forward(q, k, v, keep, backend="cpu", causal=True)
    assert torch.equal(out.isnan(), _eager(q, k, v, keep, causal=True).isnan()) and out.isnan().any()
    g = torch.randn_like(out)
    ours = sdpa.backward(g, q, k, v, out, stats, keep, backend="cpu", causal=True)
    expect = reference.backward(g, q, k, v, keep, scale=1 / math.sqrt(40), causal=True)
    assert all(_same(a, b) for a, b in zip(ours[:3], expect[:3]))


def test_dead_rows_of_a_key_vector_under_causal():
    """The prefix count equals the dense test, for q_len below and above kv_len (no (Lq, Lk) tensor made)."""
    keep = torch.rand(3, 1, 1, 40) > 0.8
    keep[0] = False
    for lq in (25, 40, 57):
        dense = keep.expand(3, 1, lq, 40) & torch.ones(lq, 40, dtype=torch.bool).tril()
        assert torch.equal(_guard.dead_rows(keep, True, lq, 40), ~dense.any(-1, keepdim=True))
        bias = torch.zeros(3, 1, 1, 40).masked_fill(~keep, _INF)
        assert torch.equal(_guard.dead_rows(bias, True, lq, 40), ~dense.any(-1, keepdim=True))


# ------------------------------------------------------------------------------ finite fills


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_fill_far_below_the_scores_runs_the_kernel(dtype):
    _seed("fill", dtype)
    inputs = _inputs(lk=LK)
    keep = _keypad(LK)
    runs = _run(dtype, inputs, keep, grad=dtype != torch.float32, mask_fill=-1e4, causal=True)
    _check(runs, dtype, "fill -1e4")
    q, k, v = (x.to(dtype) for x in inputs)
    assert not sdpa.forward(q, k, v, keep, backend="cpu", causal=True, mask_fill=-1e4)[1].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_fill_rows_without_keys_are_uniform(dtype):
    """Dead rows under a finite fill: uniform over the (causally) visible keys as eager, through the kernel with
    the fill as an exact additive bias; their gradients take the reference backward."""
    _seed("uniform", dtype)
    inputs = _inputs()
    keep = _keypad(L, causal=True)
    keep[0, ..., :] = False  # batch 0: every row dead
    runs = _run(dtype, inputs, keep, grad=dtype != torch.float32, mask_fill=-1e30, causal=True)
    _check(runs, dtype, "fill -1e30")
    q, k, v = (x.to(dtype) for x in inputs)
    out, stats = sdpa.forward(q, k, v, keep, backend="cpu", causal=True, mask_fill=-1e30)
    torch.testing.assert_close(out[0, :, 5].float(), v[0, :, :6].float().mean(1), rtol=0.02, atol=0.02)
    assert stats.isnan().all() and not out.isnan().any()


def test_finite_fill_near_the_scores_runs_the_reference():
    _seed("near")
    q, k, v = (x.float() for x in _inputs())
    keep = torch.rand(B, 1, L, L) > 0.3
    out, stats = sdpa.forward(q, k, v, keep, backend="cpu", mask_fill=-3.0)
    assert torch.equal(out, reference.forward(q, k, v, keep, scale=1 / math.sqrt(40), mask_fill=-3.0))
    assert stats.isnan().all()
    assert_2x(out, _eager(q, k, v, keep, mask_fill=-3.0),
              _eager(q.double(), k.double(), v.double(), keep, mask_fill=-3.0), "fill -3")


def test_float_mask_gradient():
    """A learned bias (broadcast over batch): the cpu kernel has no bias gradient, so the reference backward runs."""
    _seed("bias_grad")
    inputs = _inputs(lk=LK)
    bias = torch.randn(1, H, L, LK, dtype=torch.float64)
    _check(_run(torch.float16, inputs, bias, grad=True, mask_grad=True), torch.float16, "bias grad")


# ------------------------------------------------------------------------------ applies


def _facts(backend, **over):
    facts = dict(device_type="cpu" if backend == "cpu" else "cuda", dtype=torch.bfloat16, head_dim=64,
                 v_head_dim=64, softcap=0.0, dropout_p=0.0, sinks=False, alibi=False, window_left=-1,
                 window_right=-1, block_sparse=False, window_pad=False, doc=False, mask_dtype=None, mask_fill=None,
                 training=False)
    return {**facts, **over}


APPLY = [  # (backend, facts that differ from _facts, None or a word the reason must contain)
    ("cpu", dict(mask_dtype=torch.bool, training=True), None),
    ("cpu", dict(dtype=torch.float32, mask_dtype=torch.float32, mask_fill=None), None),
    ("cpu", dict(dtype=torch.float64, mask_dtype=torch.bool, mask_fill=-1e300), None),
    ("cpu", dict(mask_dtype=torch.float32), None),
    ("flash", dict(dtype=torch.float16, training=True), None),
    ("cudnn", dict(training=True), None),
    ("efficient", dict(mask_dtype=torch.bool, mask_fill=-1e4, training=True, v_head_dim=32), None),
    ("efficient", dict(dtype=torch.float32, head_dim=40, v_head_dim=40, mask_dtype=torch.float32), None),
    ("flash", dict(device_type="cpu"), "CUDA"),
    ("cpu", dict(device_type="cuda"), "CPU"),
    ("cpu", dict(softcap=30.0), "softcap"),
    ("efficient", dict(dropout_p=0.1), "dropout"),
    ("cpu", dict(sinks=True), "sinks"),
    ("efficient", dict(alibi=True), "ALiBi"),
    ("cpu", dict(window_left=128), "band"),
    ("flash", dict(window_right=0), "band"),
    ("efficient", dict(block_sparse=True, mask_dtype=torch.bfloat16), "block-sparse"),
    ("cpu", dict(window_pad=True), "window_pad"),
    ("cpu", dict(doc=True), "doc"),
    ("flash", dict(dtype=torch.float32), "float32"),
    ("cudnn", dict(dtype=torch.float64), "float64"),
    ("cpu", dict(dtype=torch.int32), "int32"),
    ("flash", dict(v_head_dim=32), "head dims"),
    ("cpu", dict(v_head_dim=32), "head dims"),
    ("flash", dict(head_dim=40, v_head_dim=40, dtype=torch.float16), None),
    ("flash", dict(head_dim=36, v_head_dim=36), "multiples of 8"),
    ("efficient", dict(dtype=torch.float32, head_dim=42, v_head_dim=42), "multiples of 4"),
    ("flash", dict(head_dim=288, v_head_dim=288), "up to 256"),
    ("cudnn", dict(head_dim=192, v_head_dim=192), "up to 128"),
    ("flash", dict(mask_dtype=torch.bool), "mask"),
    ("cudnn", dict(mask_dtype=torch.bfloat16), "cuDNN"),
    ("efficient", dict(mask_dtype=torch.float32), "dtype"),
    ("cpu", dict(dtype=torch.float32, mask_dtype=torch.float16), "dtype"),
    ("cpu", dict(mask_dtype=torch.bool, mask_fill=float("nan")), "fill"),
    ("cpu", dict(mask_dtype=torch.bool, mask_fill=float("inf")), "fill"),
    ("cpu", dict(dtype=torch.float32, mask_dtype=torch.bool, mask_fill=-1e39), "representable"),
    ("cpu", dict(dtype=torch.float32, training=True), "2x"),
    ("cpu", dict(dtype=torch.float64, mask_dtype=torch.bool, training=True), "float64"),
    ("efficient", dict(dtype=torch.float32, training=True), "2x"),
]


@pytest.mark.parametrize("backend, over, word", APPLY)
def test_applies_reasons(backend, over, word):
    why = sdpa.applies(backend, **_facts(backend, **over))
    if word is None:
        assert why is None
    else:
        assert isinstance(why, str) and word in why and why[0].isalpha() and not why.endswith("."), why


def test_backends_and_bad_names():
    assert sdpa.backends_for("cuda") == ("flash", "cudnn", "efficient") and sdpa.backends_for("cpu") == ("cpu",)
    assert set(sdpa.BACKENDS) == {"flash", "efficient", "cudnn", "cpu"}
    for call in (lambda: sdpa.applies("math", **_facts("cpu")), lambda: sdpa.stats_like(torch.zeros(1, 1, 1, 8), "x"),
                 lambda: sdpa.attention(*_inputs(), backend="math")):
        with pytest.raises(ValueError, match=r"attnfuse\.kernels\.sdpa.*backend.*'flash'"):
            call()


def test_attention_errors_name_the_reason():
    q, k, v = (x.float().requires_grad_() for x in _inputs())
    with pytest.raises(ValueError, match="no SDPA backend.*2x"):
        sdpa.attention(q, k, v)  # fp32 training on CPU
    with pytest.raises(ValueError, match="flash.*CUDA"):
        sdpa.attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="mask must broadcast"):
        sdpa.attention(q.detach(), k.detach(), v.detach(), mask=torch.ones(3, L, dtype=torch.bool))
    with pytest.raises(ValueError, match="takes no mask"):
        sdpa.forward(q, k, v, torch.ones(L, L, dtype=torch.bool), backend="flash")
    with torch.no_grad():  # inference: the same call applies
        assert sdpa.attention(q, k, v).shape == q.shape


# ------------------------------------------------------------------------------ CUDA plumbing (meta kernels)


@pytest.mark.parametrize("backend, mask", [("flash", None), ("cudnn", None), ("efficient", None),
                                           ("efficient", "vector"), ("efficient", "full")])
def test_cuda_backends_plumbing_on_meta(backend, mask):
    """Each CUDA backend's forward and backward calls on the real ops' meta kernels: the schemas take every
    argument, the logsumexp is what `stats_like` says, GQA gradients come back at K/V's heads, a bias gradient
    only where asked (efficient).  Values: tests/kernels/sdpa/test_sdpa_emulated.py."""
    dt = torch.bfloat16
    q = torch.empty(B, H, L, 64, dtype=dt, device="meta")
    k = torch.empty(B, 2, L + 6, 64, dtype=dt, device="meta")
    v = torch.empty(B, 2, L + 6, 64, dtype=dt, device="meta")
    shape = {None: None, "vector": (B, 1, 1, L + 6), "full": (B, H, L, L + 6)}[mask]
    bias = None if shape is None else _aten.bias(backend, torch.empty(shape, dtype=torch.bool, device="meta"), q)
    causal = backend == "efficient"  # top-left there; flash / cuDNN only take it square (the guard's job)
    out, lse = _aten.forward(backend, q, k, v, bias, causal=causal, scale=0.125)
    assert out.shape == q.shape and lse.contiguous().shape == sdpa.stats_like(q, backend).shape
    grad_bias = mask == "full"
    dq, dk, dv, db = _aten.backward(backend, out, q, k, v, out, lse.contiguous(), bias, causal=causal, scale=0.125,
                                    bias_grad=grad_bias)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert (db is not None) == grad_bias and (db is None or db.shape == (B, H, L, L + 6))
    assert _aten.gives_bias_grad(backend, torch.empty(shape or (1,), device="meta"), q, k) == grad_bias


def test_guard_keeps_flash_causal_square():
    q, k, v = (torch.zeros(1, 1, 8, 16) for _ in range(3))
    run = _guard.plan("flash", q, k[:, :, :6], v[:, :, :6], None, causal=True, fill=_INF, scale=0.25)
    assert not run.kernel and "bottom-right" in run.why
    assert _guard.plan("efficient", q, k[:, :, :6], v[:, :, :6], None, causal=True, fill=_INF, scale=0.25).kernel
    assert not _guard.plan("efficient", q, k, v, torch.ones(8, 1, dtype=torch.bool), causal=False, fill=_INF,
                           scale=0.25).kernel  # a mask broadcast over the keys: N x N for that kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_stats_like_is_what_forward_returns(dtype):
    q, k, v = (x.to(dtype) for x in _inputs())
    for mask in (None, torch.zeros(L, dtype=torch.bool)):  # plain, and every row dead (NaN, stats marked)
        out, stats = sdpa.forward(q, k, v, mask, backend="cpu")
        like = sdpa.stats_like(q, "cpu")
        assert stats.shape == like.shape and stats.dtype == like.dtype and stats.is_contiguous()
        assert bool(stats.isnan().all()) == bool(out.isnan().all()) == (mask is not None)
    for backend, shape in (("flash", (B, H, L)), ("efficient", (B, H, 128)), ("cudnn", (B, H, L, 1))):
        assert sdpa.stats_like(q.half(), backend).shape == shape
