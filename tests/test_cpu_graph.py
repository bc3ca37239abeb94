"""attnfuse._cpu_graph: the CPU op traced as graph ops (cond(pred, SDPA, the op)) computes what the opaque op does.

Graphs are captured with AOTAutograd (the trace Inductor gets) and run as they are, so a difference in value
is the decomposition's, not a compiler's; one test goes through ``backend="attnfuse"`` and Inductor.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import attnfuse
from attnfuse import ops

COND = torch.ops.higher_order.cond
OP, BWD = torch.ops.attnfuse.attention.default, torch.ops.attnfuse.attention_backward.default


def _capture(fn, dynamic=False):
    """(compiled fn, [(forward graph, backward graph or None), ...]): one entry per compiled graph."""
    graphs: list[list] = []

    def fw(gm, _):
        graphs.append([gm, None])
        return make_boxed_func(gm.forward)

    def bw(gm, _):
        graphs[-1][1] = gm
        return make_boxed_func(gm.forward)

    return torch.compile(fn, backend=aot_autograd(fw_compiler=fw, bw_compiler=bw), dynamic=dynamic), graphs


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _same(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def _qkv(b=2, h=4, lq=7, lk=13, d=8, dv=None, kv_heads=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g, dtype=dtype)
    k = torch.randn(b, kv_heads or h, lk, d, generator=g, dtype=dtype)
    v = torch.randn(b, kv_heads or h, lk, dv or d, generator=g, dtype=dtype)
    return q, k, v


def _bool_mask(b, lq, lk, seed=1):
    m = torch.rand(b, 1, lq, lk, generator=torch.Generator().manual_seed(seed)) > 0.4
    m[..., 0] = True
    return m


CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "bool": dict(mask="bool"),
    "bool_causal": dict(mask="bool", causal=True),
    "float": dict(mask="float"),
    "key_vector": dict(mask="vector"),
    "broadcast_view": dict(mask="expanded", causal=True),
    "gqa_decode": dict(lq=1, lk=37, kv_heads=2, mask="bool"),
    "head40_scale": dict(d=40, scale=0.3),
    "float64": dict(dtype=torch.float64, mask="bool"),
}


def _case(name):
    kw = dict(CASES[name])
    mask_kind, causal, scale = kw.pop("mask", None), kw.pop("causal", False), kw.pop("scale", None)
    q, k, v = _qkv(**kw)
    b, lq, lk = q.shape[0], q.shape[2], k.shape[2]
    mask = {None: None, "bool": _bool_mask(b, lq, lk), "vector": _bool_mask(b, 1, lk)[0, 0, 0],
            "expanded": _bool_mask(b, 1, lk).expand(b, q.shape[1], lq, lk),
            "float": torch.randn(b, 1, lq, lk, dtype=q.dtype) if mask_kind == "float" else None}[mask_kind]
    return q, k, v, mask, dict(scale=scale, causal=causal, kv_groups=q.shape[1] // k.shape[1])


@pytest.mark.parametrize("name", CASES)
def test_traced_op_is_sdpa_under_cond_and_equals_the_opaque_op(name):
    q, k, v, mask, kw = _case(name)

    def fn(q, k, v, mask):
        return ops.attention(q, k, v, mask, **kw)[0]

    compiled, graphs = _capture(fn)
    with torch.no_grad():
        got = compiled(q, k, v, mask)
    targets = _targets(graphs[0][0])
    assert COND in targets and OP not in targets  # the op only in the cond's fallback branch
    _same(got, fn(q, k, v, mask))


@pytest.mark.parametrize("poison", ["q_nan_row", "k_inf_masked_key", "v_nan", "dead_row", "dead_row_finite_fill"])
def test_non_finite_inputs_and_rows_without_a_key_take_the_op(poison):
    """The cond's predicate sends these to the opaque op (the blocked reference or its NaN fill); SDPA's fused
    kernel would differ on some of them (a NaN from an Inf key it masks after the product)."""
    q, k, v = _qkv(b=1, lq=5, lk=9)
    mask = _bool_mask(1, 5, 9)
    fill = None
    if poison == "q_nan_row":
        q[0, 1, 2, 3] = math.nan
    elif poison == "k_inf_masked_key":
        mask[..., 4] = False
        k[0, 0, 4, 1] = math.inf
    elif poison == "v_nan":
        v[0, 2, 6, 0] = math.nan
    else:
        mask[0, 0, 3] = False
        fill = -1e4 if poison == "dead_row_finite_fill" else None

    def fn(q, k, v, mask):
        return ops.attention(q, k, v, mask, mask_fill=fill)[0]

    compiled, graphs = _capture(fn)
    with torch.no_grad():
        got = compiled(q, k, v, mask)
    assert COND in _targets(graphs[0][0])
    want = fn(q, k, v, mask)
    _same(got, want)
    if poison == "dead_row":
        assert want[0, :, 3].isnan().all()
    if poison == "dead_row_finite_fill":  # every key equally likely: the mean of V
        torch.testing.assert_close(want[0, :, 3], v[0].mean(-2))


@pytest.mark.parametrize("mask_kind", ["bool", "float", "key_vector", "broadcast_view"])
def test_attention_sdpa_is_pytorch_sdpa_without_gradients(mask_kind):
    """SDPA-form sites (`ops.attention_sdpa`): with nothing to differentiate the graph calls SDPA on the mask as
    it is (a row that sees no key is 0, SDPA's convention), and the emulation only for non-finite inputs."""
    q, k, v = _qkv(b=2, lq=6, lk=11, kv_heads=2)
    keep = _bool_mask(2, 6, 11)
    keep[1, 0, 4] = False  # a row with no key
    mask = {"bool": keep, "float": torch.zeros(keep.shape).masked_fill(~keep, -math.inf), "key_vector": keep[1, 0, 0],
            "broadcast_view": keep[:, :, :1].expand(2, 4, 6, 11)}[mask_kind]

    def fn(q, k, v, mask):
        return ops.attention_sdpa(q, k, v, mask, kv_groups=2)

    compiled, graphs = _capture(fn)
    with torch.no_grad():
        got = compiled(q, k, v, mask)
        q_nan = q.clone()
        q_nan[0, 3, 2, 0] = math.nan
        got_nan = compiled(q_nan, k, v, mask)
    targets = _targets(graphs[0][0])
    assert targets.count(COND) == 1 and OP not in targets and len(graphs) == 1
    _same(got, fn(q, k, v, mask))
    sdpa_mask = mask.expand(6, 11) if mask.dim() == 1 else mask  # SDPA's CPU kernel takes no 1-D mask
    _same(got, F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, enable_gqa=True))
    if mask_kind in ("bool", "float"):
        assert (got[1, :, 4] == 0).all()
    _same(got_nan, fn(q_nan, k, v, mask))


def test_training_keeps_the_ops_backward():
    """With gradients the SDPA-form shortcut is off and the op's own backward differentiates (PyTorch's CPU
    flash backward misses the 2x rule with masks); the forward may still be SDPA under the cond."""
    q, k, v = (x.requires_grad_() for x in _qkv(b=1, lq=6, lk=6))
    mask = _bool_mask(1, 6, 6)

    def fn(q, k, v, mask):
        return ops.attention_sdpa(q, k, v, mask)

    compiled, graphs = _capture(fn)
    out = compiled(q, k, v, mask)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    fw, bw = graphs[0]
    assert COND in _targets(fw) and BWD in _targets(bw)
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    want = fn(q2, k2, v2, mask)
    _same(out, want)
    for got, ref in zip(grads, torch.autograd.grad(want.square().sum(), (q2, k2, v2))):
        torch.testing.assert_close(got, ref)


def test_static_conditions_are_decided_per_compiled_graph():
    """A graph compiled for one shape/dtype is not reused for another (dynamo's guards): each recompile decides
    again, e.g. a V head dim unlike Q's (which the fused kernel cannot run) keeps the op whole."""
    def fn(q, k, v, mask):
        return ops.attend(q, k, v, mask)

    compiled, graphs = _capture(fn, dynamic=True)
    calls = [(_qkv(lq=1, lk=29), _bool_mask(2, 1, 29)), (_qkv(lq=3, lk=17), _bool_mask(2, 3, 17)),
             (_qkv(lq=1, lk=29, dv=12), _bool_mask(2, 1, 29)), (_qkv(lq=1, lk=29, dtype=torch.float64),
                                                                  _bool_mask(2, 1, 29))]
    with torch.no_grad():
        for (q, k, v), mask in calls:
            _same(compiled(q, k, v, mask), fn(q, k, v, mask))
    kinds = [(COND in _targets(fw), OP in _targets(fw)) for fw, _ in graphs]
    assert kinds[-2] == (False, True)  # the V head dim: one opaque op
    assert kinds[0] == kinds[-1] == (True, False) and len(graphs) >= 3


@pytest.mark.parametrize("layout", ["qkv_slices", "k_is_v"])
def test_operands_sharing_memory(layout):
    """q, k, v sliced from one fused projection (copied into dense operands: Inductor could not pin a slice's
    layout), or one tensor passed as both K and V: operands that share memory, which the branches only read."""
    x = torch.randn(2, 7, 3 * 32)
    if layout == "k_is_v":
        x = x.view(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4).contiguous()  # three dense (2, 4, 7, 8) blocks

    def fn(x):
        if layout == "k_is_v":
            return ops.attend(x[0], x[1], x[1], causal=True)
        q, k, v = (t.view(2, 7, 4, 8).transpose(1, 2) for t in x.split(32, -1))
        return ops.attend(q, k, v, causal=True)

    compiled, graphs = _capture(fn)
    with torch.no_grad():
        _same(compiled(x), fn(x))
    targets = _targets(graphs[0][0])
    assert COND in targets and OP not in targets


def test_export_keeps_the_op_whole():
    class M(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return ops.attend(q, k, v, mask)

    q, k, v = _qkv()
    ep = torch.export.export(M(), (q, k, v, _bool_mask(2, 7, 13)))
    targets = _targets(ep.graph_module)
    assert OP in targets and COND not in targets


def test_decode_step_through_the_backend_calls_sdpa_in_the_inductor_code():
    """An SDPA-form decode site (GQA, key-padding bool mask) through backend="attnfuse": fused, Inductor's code
    calls PyTorch's fused CPU kernel under a cond and never the attnfuse op outside the fallback branch."""
    from torch._inductor.utils import run_and_get_code

    class Decode(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2) * 2

    q, k, v = _qkv(b=1, lq=1, lk=41, d=16, kv_heads=2)
    mask = _bool_mask(1, 1, 41)
    compiled = torch.compile(Decode(), backend="attnfuse")
    with torch.no_grad():
        got, (code, *_) = run_and_get_code(compiled, q, k, v, mask)
        want = Decode()(q, k, v, mask)
    assert len(attnfuse.last_report().fused) == 1
    main = code.split("def call(self, args):")[-1]
    assert "_scaled_dot_product_flash_attention_for_cpu" in code and ".item()" in main
    assert "torch.ops.attnfuse.attention.default" not in main
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_folded_symbolic_sizes_keep_the_op_whole():
    """Heads folded into a symbolic batch (``B * H`` with dynamic sizes): Inductor cannot generate a cond whose
    operand sizes are products of symbols, so the op stays whole there, and the compiled function equals eager
    (a differential-fuzzer case that crashed Inductor)."""
    def f(q, k, v, keep):
        B, H, Lq, D = q.shape
        q, k, v = q.reshape(B * H, Lq, D), k.reshape(B * H, -1, D), v.reshape(B * H, -1, D)
        s = torch.where(keep, torch.bmm(q, k.transpose(1, 2)), float("-inf"))
        return torch.bmm(s.softmax(-1), v).view(B, H, Lq, D)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="attnfuse", dynamic=True)
    for lq in (1, 13):
        q, k, v = torch.randn(2, 3, lq, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
        keep = torch.rand(lq, 7) > 0.3
        keep[:, 0] = True
        torch.testing.assert_close(compiled(q, k, v, keep), f(q, k, v, keep), rtol=2e-6, atol=2e-6)
    assert len(attnfuse.last_report().fused) == 1
