"""The CUDA backends of `attnfuse.kernels.sdpa` (flash, efficient, cuDNN) end to end on CPU tensors, with
PyTorch's CUDA ops replaced by emulations bound through the ops' own schemas (no GPU here).

Each emulation reads its arguments by the names of the installed op's schema (so an argument passed in the wrong
position reads as the wrong tensor), asserts what the real kernel requires (no mask for flash / cuDNN, K/V at the
query heads where there is no native GQA, the efficient bias as a (B, H, Lq, Lk) view with a unit last stride and
16-aligned other strides, square causal for flash / cuDNN, dO with O's strides, the forward's own logsumexp in
the backward), and computes attention in float32 math.  So the public `forward`/`backward` with those backends
are held to the 2x rule, GQA sums and the bias gradient included; the real kernels' numerics are the GPU suite's.
"""

from __future__ import annotations

import math
import types
import zlib

import pytest
import torch

from attnfuse.kernels import sdpa
from attnfuse.kernels.sdpa import _aten
from tests._util import assert_2x, ref_attention

B, H, L, D = 2, 4, 97, 64
_REAL = torch.ops.aten


def _bind(name: str, args: tuple, kwargs: dict) -> dict:
    schema = getattr(_REAL, name).default._schema
    bound = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    bound.update(zip([a.name for a in schema.arguments], args))
    bound.update(kwargs)
    missing = [a.name for a in schema.arguments if a.name not in bound]
    assert not missing, f"{name}: missing {missing}"
    return bound


def _math(q, k, v, bias, causal, scale):
    """float32 attention with autograd: (out, lse) and the leaves."""
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    b = None if bias is None else bias.detach().float().requires_grad_()
    s = leaves[0] @ leaves[1].transpose(-2, -1) * scale
    if b is not None:
        s = s + b
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    return torch.softmax(s, -1) @ leaves[2], torch.logsumexp(s, -1).detach(), leaves, b


class _Emulated:
    """The namespace `attnfuse.kernels.sdpa._aten` calls as ``torch.ops.aten``."""

    def __init__(self):
        self.saved = {}

    def _forward(self, name, backend, args, kwargs):
        a = _bind(name, args, kwargs)
        q, k, v, bias = a["query"], a["key"], a["value"], a.get("attn_bias")
        assert a["dropout_p"] == 0.0 and all(x.stride(-1) == 1 for x in (q, k, v))
        if backend != "flash":
            assert k.shape[1] == q.shape[1], f"{backend} has no native GQA"
        if backend in ("flash", "cudnn"):
            assert bias is None and not (a["is_causal"] and q.shape[2] != k.shape[2]), "bottom-right causal"
        if bias is not None:
            assert bias.dtype == q.dtype and bias.shape == (*q.shape[:3], k.shape[2]) and bias.stride(-1) == 1
            assert all(s % 16 == 0 for s in bias.stride()[:-1]), bias.stride()
        kk, vv = (x.repeat_interleave(q.shape[1] // k.shape[1], 1) for x in (k, v))
        scale = a["scale"] if a["scale"] is not None else 1 / math.sqrt(q.shape[-1])
        out, lse, _, _ = _math(q, kk, vv, bias, a["is_causal"], scale)
        out = out.detach().to(q.dtype)
        seed, offset = torch.tensor(7), torch.tensor(11)
        self.saved[backend] = (seed, offset)
        if backend == "efficient":
            padded = torch.full((*lse.shape[:2], math.ceil(lse.shape[2] / 32) * 32), math.nan)
            padded[..., : lse.shape[2]] = lse
            return out, padded, seed, offset
        lse = lse[..., None] if backend == "cudnn" else lse
        return out, lse, None, None, q.shape[2], k.shape[2], seed, offset, None

    def _backward(self, name, backend, args, kwargs):
        a = _bind(name, args, kwargs)
        q, k, v, out = a["query"], a["key"], a["value"], a["out"]
        grad, bias = a.get("grad_out", a.get("grad_out_")), a.get("attn_bias")
        assert grad.stride() == out.stride() and a["dropout_p"] == 0.0
        assert (a["philox_seed"], a["philox_offset"]) == self.saved[backend], "the forward's philox tensors"
        if backend != "efficient":
            assert (a["max_q"], a["max_k"]) == (q.shape[2], k.shape[2]) and a["cum_seq_q"] is None
        scale = a["scale"] if a["scale"] is not None else 1 / math.sqrt(q.shape[-1])
        groups = q.shape[1] // k.shape[1]
        kk, vv = (x.repeat_interleave(groups, 1) for x in (k, v))
        o, lse, leaves, b = _math(q, kk, vv, bias, a["is_causal"], scale)
        got = a["logsumexp"].flatten(2)[..., : q.shape[2]]
        torch.testing.assert_close(got, lse.reshape(got.shape), msg="the forward's logsumexp")
        o.backward(grad.float())
        dq, dk, dv = (x.grad.to(q.dtype) for x in leaves)
        dk, dv = (x.unflatten(1, (k.shape[1], groups)).sum(2) for x in (dk, dv))  # flash: native GQA
        if backend != "efficient":
            return dq, dk, dv
        want_bias = a["grad_input_mask"][3]
        return dq, dk, dv, (b.grad.to(bias.dtype) if want_bias else None)


@pytest.fixture
def emulated(monkeypatch):
    emu = _Emulated()
    names = {"flash": "_scaled_dot_product_flash_attention", "efficient": "_scaled_dot_product_efficient_attention",
             "cudnn": "_scaled_dot_product_cudnn_attention"}
    ns = types.SimpleNamespace()
    for backend, name in names.items():
        setattr(ns, name, lambda *a, _n=name, _b=backend, **k: emu._forward(_n, _b, a, k))
        setattr(ns, name + "_backward", lambda *a, _n=name + "_backward", _b=backend, **k: emu._backward(_n, _b, a, k))
    monkeypatch.setattr(_aten, "_ATEN", ns)
    monkeypatch.setattr(_aten, "_RNG", {})
    return emu


def _run(backend, q, k, v, mask=None, *, causal=False, mask_fill=None, mask_grad=False):
    groups = q.shape[1] // k.shape[1]
    out, stats = sdpa.forward(q, k, v, mask, backend=backend, causal=causal, kv_groups=groups, mask_fill=mask_fill)
    assert stats.shape == sdpa.stats_like(q, backend).shape and out.transpose(1, 2).is_contiguous()
    grad = torch.randn_like(out)
    grads = sdpa.backward(grad, q, k, v, out, stats, mask, backend=backend, causal=causal, kv_groups=groups,
                          mask_fill=mask_fill, mask_grad=mask_grad)
    return out, grads, grad, stats


def _check(backend, hk=H, lk=L, mask=None, *, causal=False, mask_grad=False, dtype=torch.bfloat16, what=""):
    torch.manual_seed(zlib.crc32(repr((backend, hk, lk, causal, what)).encode()))
    q, k, v = (torch.randn(B, h, n, D).to(dtype) for h, n in ((H, L), (hk, lk), (hk, lk)))
    m = mask.to(dtype) if mask is not None and mask.dtype != torch.bool else mask
    out, grads, grad, stats = _run(backend, q, k, v, m, causal=causal, mask_grad=mask_grad)
    assert not stats.flatten(2)[..., :L].isnan().any(), "the kernel path ran"
    runs = []
    for dt in (dtype, torch.float64):
        leaves = [x.to(dt).clone().requires_grad_() for x in (q, k, v)]
        mm = m.to(dt).clone().requires_grad_() if mask_grad else (m if m is None or m.dtype == torch.bool else m.to(dt))
        o = ref_attention(*leaves, mm, causal=causal, kv_groups=H // hk)
        o.backward(grad.to(dt))
        runs.append([o, *(x.grad for x in leaves)] + ([mm.grad] if mask_grad else []))
    ours = [out, *grads[:3]] + ([grads[3]] if mask_grad else [])
    for name, a, e, r in zip(("out", "dq", "dk", "dv", "dmask"), ours, *runs):
        assert_2x(a, e, r, f"{backend} {what} {name}")


@pytest.mark.parametrize("backend", ["flash", "cudnn", "efficient"])
@pytest.mark.parametrize("hk", [H, 2, 1])
def test_causal_and_gqa(emulated, backend, hk):
    _check(backend, hk=hk, causal=True, what="causal")


@pytest.mark.parametrize("backend", ["flash", "cudnn", "efficient"])
def test_cross_lengths(emulated, backend):
    _check(backend, lk=200, what="cross")


@pytest.mark.parametrize("shape", [(B, 1, 1, 200), (L, 200), (B, H, L, 200), (1, H, L, 208)])
def test_efficient_masks_and_bias_gradient(emulated, shape):
    lk = shape[-1]
    keep = torch.rand(shape) > 0.3
    keep[..., 0] = True
    _check("efficient", hk=2, lk=lk, mask=keep, causal=True, what=f"bool {shape}")
    bias = torch.randn(shape, dtype=torch.float64)
    full = len(shape) == 4 and shape[:2] == (B, H)
    _check("efficient", hk=2, lk=lk, mask=bias, mask_grad=full, what=f"bias {shape}")


def test_flash_causal_with_unequal_lengths_runs_the_reference(emulated):
    q, k, v = torch.randn(B, H, L, D).half(), torch.randn(B, H, 200, D).half(), torch.randn(B, H, 200, D).half()
    out, _, _, stats = _run("flash", q, k, v, causal=True)
    assert stats.isnan().all()
    assert_2x(out, ref_attention(q, k, v, causal=True), ref_attention(q.double(), k.double(), v.double(), causal=True))
