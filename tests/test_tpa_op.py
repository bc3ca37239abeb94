"""``torch.ops.attnfuse.tpa_attention``: the ``tpa`` family as one registered op.  Forward and backward against
the float64 textbook (2x rule), `torch.library.opcheck` (schema, fake tensors, autograd registration, AOT
dispatch), ``torch.compile(fullgraph=True)`` through Inductor, and ``torch.export`` keeping the op whole."""

from __future__ import annotations

import pytest
import torch

import attnfuse._tpaop  # noqa: F401  (registers the op)
from attnfuse.kernels import tpa
from attnfuse.kernels.tpa import Factors
from tests._util import assert_2x
from tests.kernels._helpers import seed_case

B, H, HK, D = 2, 4, 2, 24


def _inputs(lq: int, lk: int, dtype=torch.float32):
    q_a, q_b = torch.randn(B, lq, H, 3, dtype=dtype), torch.randn(B, lq, 3, D, dtype=dtype) * 0.5
    k_a, k_b = torch.randn(B, lk, HK, 2, dtype=dtype), torch.randn(B, lk, 2, D, dtype=dtype) * 0.5
    v = torch.randn(B, HK, lk, D, dtype=dtype)
    mask = torch.rand(B, 1, 1, lk) > 0.2
    mask[..., 0] = True
    return [None, q_a, q_b, None, k_a, k_b, v, None, None], mask


KW = dict(q_scale=1 / 3, k_scale=0.5, v_scale=1.0, scale=D ** -0.5, causal=True, kv_groups=2)


def _call(args, mask, **kw):
    return torch.ops.attnfuse.tpa_attention(*args, mask, **kw)


def _ref(args, mask, dtype, causal=True):
    q = Factors(args[1].to(dtype), args[2].to(dtype), KW["q_scale"])
    k = Factors(args[4].to(dtype), args[5].to(dtype), KW["k_scale"])
    return tpa.reference(q, k, args[6].to(dtype), mask, scale=KW["scale"], causal=causal, kv_groups=2)


@pytest.mark.parametrize("lq", [1, 29])
def test_forward_and_backward_against_float64(lq):
    """29 query rows (the blocked path, causal) and 1 (decode: every key, a query at the end of the cache)."""
    seed_case("tpa-op", lq)
    args, mask = _inputs(lq, 29)
    grad = torch.randn(B, H, lq, D)
    causal = lq > 1
    kw = dict(KW, causal=causal)
    results = []
    for fn, dtype in ((lambda a: _call(a, mask, **kw), torch.float32),
                      (lambda a: _ref(a, mask, torch.float64, causal), torch.float64),
                      (lambda a: _ref(a, mask, torch.float32, causal), torch.float32)):
        leaves = [None if t is None else t.to(dtype).detach().requires_grad_() for t in args]
        out = fn(leaves)
        used = [t for t in leaves if t is not None]
        results.append([out.detach(), *torch.autograd.grad(out, used, grad.to(dtype))])
    ours, ref, eager = results
    for i, (a, r, e) in enumerate(zip(ours, ref, eager)):
        assert_2x(a, e, r.to(torch.float32), f"tensor {i}")


def test_opcheck():
    seed_case("tpa-opcheck")
    args, mask = _inputs(7, 11)
    args = [None if t is None else t.requires_grad_() for t in args]
    torch.library.opcheck(torch.ops.attnfuse.tpa_attention.default, (*args, mask), KW)


def test_compiled_through_inductor():
    seed_case("tpa-compile")
    args, mask = _inputs(13, 13)

    def fn(q_a, q_b, k_a, k_b, v):
        return _call([None, q_a * 1.5, q_b, None, k_a, k_b, v, None, None], mask, **KW).sin()

    leaves = [args[i].clone().requires_grad_() for i in (1, 2, 4, 5, 6)]
    compiled = torch.compile(fn, backend="inductor", fullgraph=True)
    want = fn(*leaves)
    got = compiled(*leaves)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g), rtol=1e-5,
                               atol=1e-5)


def test_export_keeps_the_op():
    seed_case("tpa-export")
    args, mask = _inputs(9, 9)

    class M(torch.nn.Module):
        def forward(self, q_a, q_b, k_a, k_b, v):
            return _call([None, q_a, q_b, None, k_a, k_b, v, None, None], mask, **KW)

    ep = torch.export.export(M(), tuple(args[i] for i in (1, 2, 4, 5, 6)))
    assert "attnfuse.tpa_attention" in str(ep.graph)
    torch.testing.assert_close(ep.module()(*(args[i] for i in (1, 2, 4, 5, 6))),
                               M()(*(args[i] for i in (1, 2, 4, 5, 6))))


def test_bad_sides_raise():
    args, mask = _inputs(5, 5)
    args[0] = torch.randn(B, H, 5, D)  # q both plain and factorized
    with pytest.raises(ValueError, match="attnfuse.tpa_attention: side q"):
        _call(args, mask, **KW)
