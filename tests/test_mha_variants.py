"""The rest of torch.nn's attention: MHA's bias_k / bias_v / add_zero_attn / static_k / static_v
(`attnfuse._mha.forward`) and nn.TransformerEncoderLayer's inference fast path, the one op
``torch._transformer_encoder_layer_fwd`` (`attnfuse._mha.encoder_layer`).

Each case checks the numbers (2x rule against float64, outputs and gradients incl. bias_k / bias_v) and that
the site was fused (or skipped with its reason: the negative twins).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from _util import assert_2x

import attnfuse
from attnfuse import _mha
from attnfuse.passes import match

B, LQ, LK, E, H = 3, 11, 13, 40, 4


@pytest.fixture(autouse=True)
def _fresh():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _mha_params(bias_kv: bool, dtype=torch.float64, separate: bool = False) -> dict:
    g = lambda *s: (torch.randn(*s, dtype=dtype) * 0.3).requires_grad_()  # noqa: E731
    p = {"in_proj_weight": None if separate else g(3 * E, E), "in_proj_bias": g(3 * E),
         "bias_k": g(1, 1, E) if bias_kv else None, "bias_v": g(1, 1, E) if bias_kv else None,
         "out_proj_weight": g(E, E), "out_proj_bias": g(E)}
    if separate:
        p.update(q_proj_weight=g(E, E), k_proj_weight=g(E, E), v_proj_weight=g(E, E))
    return p


def _leaves(d: dict, dtype) -> dict:
    return {k: v if not isinstance(v, torch.Tensor) else v.detach().to(v.dtype if not v.is_floating_point()
                                                                       else dtype).requires_grad_(v.requires_grad)
            for k, v in d.items()}


def _call(fn, tensors: dict, params: dict, **kw):
    return fn(tensors["query"], tensors["key"], tensors["value"], E, H, params["in_proj_weight"],
              params["in_proj_bias"], params["bias_k"], params["bias_v"], kw.pop("add_zero_attn"), 0.0,
              params["out_proj_weight"], params["out_proj_bias"], training=True, need_weights=False,
              q_proj_weight=params.get("q_proj_weight"), k_proj_weight=params.get("k_proj_weight"),
              v_proj_weight=params.get("v_proj_weight"), use_separate_proj_weight="q_proj_weight" in params,
              **{k: tensors.get(k) for k in ("attn_mask", "key_padding_mask", "static_k", "static_v")}, **kw)[0]


def _masks(kind: str, lq: int, lk: int) -> dict:
    out = {}
    if kind in ("bool", "both"):
        m = torch.rand(lq, lk) > 0.6
        m[2] = True  # a query row with every real key hidden: only the appended bias / zero row is left
        out["attn_mask"] = m
    if kind == "float3d":
        out["attn_mask"] = torch.randn(B * H, lq, lk, dtype=torch.float64)
    if kind in ("padding", "both"):
        p = torch.rand(B, lk) > 0.7
        p[1] = True  # a whole sequence of padding
        out["key_padding_mask"] = p
    return out


def _compare(tensors: dict, params: dict, **kw) -> None:
    """`_mha.forward` against F.multi_head_attention_forward: output and every gradient, 2x rule vs float64."""
    outs, grads = [], []
    for fn, dtype in ((F.multi_head_attention_forward, torch.float32), (_mha.forward, torch.float32),
                      (F.multi_head_attention_forward, torch.float64)):
        t, p = _leaves(tensors, dtype), _leaves(params, dtype)
        out = _call(fn, t, p, **dict(kw))
        out.backward(torch.ones_like(out).mul_(torch.linspace(-1, 1, out.numel()).view(out.shape).to(dtype)))
        outs.append(out.detach())
        grads.append({k: v.grad for k, v in {**t, **p}.items() if isinstance(v, torch.Tensor) and v.requires_grad})
    assert torch.isfinite(outs[1]).all()
    assert_2x(outs[1], outs[0], outs[2], "output")
    assert grads[0].keys() == grads[1].keys() and grads[1]
    for k in grads[0]:
        assert (grads[1][k] is None) == (grads[0][k] is None), k  # static_k/v: the projected K/V are unused
        if grads[0][k] is not None:
            assert_2x(grads[1][k], grads[0][k], grads[2][k], f"grad of {k}")


def _inputs(lq=LQ, lk=LK, unbatched=False) -> dict:
    b = () if unbatched else (B,)
    return {n: torch.randn(lq if n == "query" else lk, *b, E, dtype=torch.float64).requires_grad_()
            for n in ("query", "key", "value")}


@pytest.mark.parametrize("bias_kv,zero", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("masks", ["none", "bool", "padding", "both", "float3d"])
def test_forward_bias_kv_zero_attn(bias_kv, zero, masks):
    _compare({**_inputs(), **_masks(masks, LQ, LK)}, _mha_params(bias_kv), add_zero_attn=zero)


def test_forward_unbatched_separate_weights():
    t = _inputs(unbatched=True)
    m = torch.rand(LQ, LK) > 0.5
    _compare({**t, "attn_mask": m}, _mha_params(True, separate=True), add_zero_attn=True)


@pytest.mark.parametrize("padding", [False, True])
def test_forward_is_causal_with_bias_kv(padding):
    # without key padding PyTorch drops attn_mask for SDPA's top-left causal band over L + 2 keys: the bias and
    # zero rows are hidden from all but the last queries; with padding the (padded) mask is applied instead
    t = {**_inputs(lq=LK), "attn_mask": nn.Transformer.generate_square_subsequent_mask(LK, dtype=torch.float64)}
    if padding:
        t["key_padding_mask"] = torch.zeros(B, LK, dtype=torch.float64).masked_fill(torch.rand(B, LK) > 0.7, -1e9)
    _compare(t, _mha_params(True), add_zero_attn=True, is_causal=True)


def test_forward_static_kv():
    t = _inputs()
    for n in ("static_k", "static_v"):
        t[n] = torch.randn(B * H, LK + 2, E // H, dtype=torch.float64).requires_grad_()
    t["key_padding_mask"] = torch.rand(B, LK + 2) > 0.7  # the static length; the zero row gets a visible column
    _compare(t, _mha_params(False), add_zero_attn=True)


# --------------------------------------------------------------------------- nn.MultiheadAttention compiled

class _Mha(nn.Module):
    def __init__(self, weights: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, add_bias_kv=True, add_zero_attn=True)
        self.weights = weights

    def forward(self, x, mask):
        out, w = self.attn(x, x, x, attn_mask=mask, need_weights=self.weights)
        return out if w is None else (out, w)


def _mask() -> torch.Tensor:
    m = torch.rand(LQ, LQ) > 0.5
    m[3] = True
    return m


def test_compiled_bias_kv_zero_attn_train():
    """Fused, and the gradients of bias_k / bias_v / the input through the compiled model match eager."""
    model, x, mask = _Mha(), torch.randn(LQ, B, E), _mask()
    ref = copy.deepcopy(model).double()
    runs = []
    for m, dtype, compile_ in ((model, torch.float32, False), (copy.deepcopy(model), torch.float32, True),
                               (ref, torch.float64, False)):
        xi = x.detach().to(dtype).clone().requires_grad_()
        fn = torch.compile(m, backend="attnfuse", options={"inner": "eager"}) if compile_ else m
        out = fn(xi, mask)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=dtype).view(out.shape))
        runs.append((out.detach(), xi.grad, m.attn.bias_k.grad, m.attn.bias_v.grad, m.attn.in_proj_weight.grad))
        if compile_:
            report = attnfuse.last_report()
    assert len(report.fused) == 1 and report.sites[0].pattern == "multi_head_attention_forward", str(report)
    for i, what in enumerate(("output", "grad x", "grad bias_k", "grad bias_v", "grad in_proj_weight")):
        assert_2x(runs[1][i], runs[0][i], runs[2][i], what)


def test_compiled_bias_kv_twin_need_weights():
    model, x, mask = _Mha(weights=True).eval(), torch.randn(LQ, B, E), _mask()
    with torch.no_grad():
        out, w = torch.compile(model, backend="attnfuse", options={"inner": "eager"})(x, mask)
        report = attnfuse.last_report()
        want, want_w = model(x, mask)
    assert not report.fused and "need_weights" in report.sites[0].reason, str(report)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(w, want_w, rtol=0, atol=0)


# --------------------------------------------------------------------------- the encoder layer's fast path

def _layer(norm_first=False, activation="relu", e=E, h=H) -> nn.TransformerEncoderLayer:
    layer = nn.TransformerEncoderLayer(e, h, 56, 0.0, activation=activation, batch_first=True, norm_first=norm_first)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer.eval()


def _native_args(layer, gelu: bool, dtype) -> list:
    a, c = layer.self_attn, lambda t: t.detach().to(dtype)  # noqa: E731
    return [a.embed_dim, a.num_heads, c(a.in_proj_weight), c(a.in_proj_bias), c(a.out_proj.weight),
            c(a.out_proj.bias), gelu, layer.norm_first, layer.norm1.eps, c(layer.norm1.weight), c(layer.norm1.bias),
            c(layer.norm2.weight), c(layer.norm2.bias), c(layer.linear1.weight), c(layer.linear1.bias),
            c(layer.linear2.weight), c(layer.linear2.bias)]


def _native_masks() -> dict:
    hide = torch.rand(LK, LK) > 0.6
    hide[4] = True  # a query row with no visible key
    pad = torch.rand(B, LK) > 0.7
    pad[1] = True
    per = torch.rand(B, H, LK, LK) > 0.5
    per[0, 1, 2] = True
    inf = lambda m: torch.zeros(m.shape).masked_fill(m, float("-inf"))  # noqa: E731
    bias = torch.randn(LK, LK) * (torch.rand(LK, LK) > 0.5)  # finite, nonzero where hidden
    return {"none": (None, None), "src bool": (hide, 0), "padding bool": (pad, 1), "merged bool": (per, 2),
            "src -inf": (inf(hide), 0), "padding -inf": (inf(pad), 1), "merged -inf": (inf(per), 2),
            "src finite bias": (bias, 0)}


@pytest.mark.parametrize("mask", list(_native_masks()))
@pytest.mark.parametrize("norm_first,gelu", [(False, False), (True, True), (False, True)])
def test_encoder_layer_matches_native(norm_first, gelu, mask):
    layer = _layer(norm_first)
    m, mask_type = _native_masks()[mask]
    x = torch.randn(B, LK, E)
    with torch.no_grad():
        native = torch._transformer_encoder_layer_fwd(x, *_native_args(layer, gelu, torch.float32), m, mask_type)
        ref_mask = m.double() if m is not None and m.is_floating_point() else m
        ref = torch._transformer_encoder_layer_fwd(x.double(), *_native_args(layer, gelu, torch.float64), ref_mask,
                                                   mask_type)
        ours = _mha.encoder_layer(x, *_native_args(layer, gelu, torch.float32), m, mask_type)
    assert_2x(ours, native, ref, mask)  # also the NaN pattern of rows with no visible key
    if mask != "none":
        assert native.isnan().any() != (mask == "src finite bias")


def test_encoder_layer_mask_is_read_as_bool():
    """The native op hides every key whose mask entry is nonzero, also a finite bias: not an additive mask."""
    layer, x = _layer(), torch.randn(B, LK, E)
    bias = torch.randn(LK, LK) * (torch.rand(LK, LK) > 0.5)
    with torch.no_grad():
        native = torch._transformer_encoder_layer_fwd(x, *_native_args(layer, False, torch.float32), bias, 0)
        additive = layer.train()(x, src_mask=bias)  # the module's slow path adds the bias (dropout is 0)
    assert (native - additive).abs().max() > 1e-2


def _compiled(model, *args, **kwargs):
    with torch.no_grad():
        out = torch.compile(model, backend="attnfuse", fullgraph=True, options={"inner": "eager"})(*args, **kwargs)
        report = attnfuse.last_report()
        eager = model(*args, **kwargs)
        wide = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
        ref = copy.deepcopy(model).double()(*[a.double() for a in args], **wide)
    assert_2x(out, eager, ref)
    return report


@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
def test_compiled_transformer_encoder(norm_first, activation):
    model = nn.TransformerEncoder(_layer(norm_first, activation), 2, enable_nested_tensor=False).eval()
    pad = torch.zeros(B, LK, dtype=torch.bool)
    pad[-1, 9:] = True
    report = _compiled(model, torch.randn(B, LK, E), src_key_padding_mask=pad)
    assert len(report.fused) == 2 == len(report.sites), str(report)
    assert {s.pattern for s in report.sites} == {"transformer_encoder_layer"}
    assert sorted(s.module for s in report.sites) == ["layers.0", "layers.1"]
    assert all(s.mask["kind"] == "padding" for s in report.sites), str(report)


def test_compiled_transformer_causal_mask():
    model = nn.Transformer(E, H, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=56, dropout=0.0,
                           batch_first=True).eval()
    src, tgt = torch.randn(B, LK, E), torch.randn(B, LQ, E)
    src_mask = nn.Transformer.generate_square_subsequent_mask(LK)
    report = _compiled(model, src, tgt, src_mask=src_mask, tgt_mask=nn.Transformer.generate_square_subsequent_mask(LQ),
                       tgt_is_causal=True)
    assert len(report.fused) == 3 == len(report.sites), str(report)
    assert [s.pattern for s in report.sites].count("transformer_encoder_layer") == 1


def test_encoder_layer_twin_masked_off_cpu():
    """A masked fast-path layer whose input is not on the CPU stays native, with the reason."""
    layer = _layer()
    gm = fx.symbolic_trace(lambda x, m: torch._transformer_encoder_layer_fwd(x, *_native_args(
        layer, False, torch.float32), m, 1))
    for node, shape, dtype in zip([n for n in gm.graph.nodes if n.op == "placeholder"], [(B, LK, E), (B, LK)],
                                  [torch.float32, torch.bool]):
        node.meta["val"] = torch.empty(shape, dtype=dtype, device="meta")
    found, misses = match.match(gm)
    assert not found and len(misses) == 1 and "verified on the CPU only" in str(misses[0]), misses
