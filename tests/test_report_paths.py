"""The report's ``module`` and ``source`` on real third-party models, and K/V read un-repeated under SDPA.

* ``Site.module`` is the dotted path ``model.get_submodule`` takes, whatever way dynamo reached the module:
  ``__dict__['_modules']`` (diffusers' ``__getattr__``), ``getattr(...)``, ``L['args'][0]`` (a decorator's
  ``*args``), ``G[...]``, a compiled submodule's ``._orig_mod``.  Checked on a tiny diffusers UNet and
  Transformer2DModel: every site's path resolves to one of the model's ``Attention`` modules.
* ``Site.source`` is the model's own line, not transformers' ``integrations/sdpa_attention.py`` or torch's.
* K/V repeated along heads before ``scaled_dot_product_attention`` (transformers' ``repeat_kv``,
  ``repeat_interleave``, ``repeat``) reach the op un-repeated with ``kv_groups``; forward and backward
  match eager (2x rule against float64).  The negative twins (a repeat along the sequence, a write to the
  base between the repeat and the call) keep ``kv_groups=1`` and stay exact.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from _util import assert_2x

import attnfuse
from attnfuse import _sources, ops
from attnfuse.backend import attnfuse_backend

EAGER = {"inner": "eager"}
_OPS = (torch.ops.attnfuse.attention.default, ops.attention_sdpa)


def _node(path: str | None = None, trace: str | None = None) -> fx.Node:
    node = fx.Graph().placeholder("x")
    if path is not None:
        node.meta["nn_module_stack"] = {"outer": ("L['self'].outer", nn.Module), "inner": (path, nn.Module)}
    if trace is not None:
        node.meta["stack_trace"] = trace
    return node


@pytest.mark.parametrize("recorded, path", [
    ("L['self'].__dict__['_modules']['down_blocks'].0.attentions.0.__dict__['_modules']['transformer_blocks'].0"
     ".attn1", "down_blocks.0.attentions.0.transformer_blocks.0.attn1"),
    ("L['args'][0].model.layers.0.self_attn", "model.layers.0.self_attn"),
    ("L['kwargs']['model'].h[3]", "h.3"),
    ("G['net'].blocks._modules['b-1']", "blocks.b-1"),
    ("L['self'].inner._orig_mod.layers.0", "inner.layers.0"),
    ("getattr(getattr(L['self'], 'odd name'), '0').attn", "odd name.0.attn"),
    ("___odict_getitem(L['self'].d, 'x')[1]", "d.x.1"),
    ('L["self"].h[\'2\']', "h.2"),
    ("L['self']", ""),
    ("layers.0.attn", "layers.0.attn"),  # torch.export records the path itself
    # a key dynamo read from dict.keys(...) names no path without the model: kept as recorded
    ("L['self']._modules[list(dict.keys(L['self']._modules))[0]]",
     "L['self']._modules[list(dict.keys(L['self']._modules))[0]]"),
])
def test_module_path_spellings(recorded, path):
    assert _sources.module_path(_node(recorded)) == path


_TRACE = '''  File "/home/u/proj/model.py", line 40, in forward
    h = self.attn(x)
  File "/x/site-packages/transformers/models/llama/modeling_llama.py", line 258, in forward
    attn_output, attn_weights = attention_interface(
  File "/x/site-packages/transformers/integrations/sdpa_attention.py", line 183, in sdpa_attention_forward
    attn_output = torch.nn.functional.scaled_dot_product_attention(
'''


def test_source_skips_library_helpers():
    torch_file = torch.nn.functional.__file__
    assert _sources.source(_node(trace=_TRACE)) == "modeling_llama.py:258"
    inner = f'  File "{torch_file}", line 6000, in multi_head_attention_forward\n    x\n'
    assert _sources.source(_node(trace=_TRACE.split("  File \"/x/")[0] + inner)) == "model.py:40"
    only = f'  File "{torch_file}", line 6000, in f\n    x\n'
    assert _sources.source(_node(trace=only)) == "functional.py:6000"  # nothing of the model's: the last frame
    assert _sources.source(_node(trace="")) == ""


# ---------------------------------------------------------------------------------------------- module paths


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(24, 72)

    def forward(self, x):
        q, k, v = self.qkv(x).view(2, 7, 3, 3, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 7, 24)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Attn(), _Attn()])
        self.d = nn.ModuleDict({"a": _Attn(), "b-1": _Attn()})
        self.seq = nn.Sequential(_Attn())
        self.sub = torch.compile(nn.Sequential(_Attn()), backend="eager")  # a compiled submodule: `._orig_mod`
        self.add_module("odd name", _Attn())  # not an identifier: dynamo writes getattr(..., 'odd name')

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        x = self.d["a"](x) + self.d["b-1"](x)
        x = getattr(self, "odd name")(self.seq(x))  # noqa: B009
        return self.sub(x)


def _assert_paths(model: nn.Module, report, cls: type) -> set[str]:
    paths = [s.module for s in report.sites]
    for p in paths:
        assert isinstance(model.get_submodule(p), cls), p
    return set(paths)


def test_module_paths_resolve_on_a_compiled_model():
    net = _Net()
    x = torch.randn(2, 7, 24)
    torch.compile(net, backend="attnfuse", options=EAGER, fullgraph=True)(x)
    report = attnfuse.last_report()
    assert _assert_paths(net, report, _Attn) == {"layers.0", "layers.1", "d.a", "d.b-1", "seq.0", "odd name",
                                                      "sub.0"}

    def through_a_global(x):
        return _GLOBAL_NET(x)

    torch._dynamo.reset()
    torch.compile(through_a_global, backend="attnfuse", options=EAGER)(x)
    assert {s.module for s in attnfuse.last_report().sites} >= {"layers.0", "d.b-1", "odd name"}


_GLOBAL_NET = _Net()


def _tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8).eval()


def _attention_modules(model: nn.Module) -> set[str]:
    from diffusers.models.attention_processor import Attention

    return {name for name, mod in model.named_modules() if isinstance(mod, Attention)}


def test_diffusers_unet_module_paths():
    from diffusers.models.attention_processor import Attention

    unet = _tiny_unet()
    report = attnfuse.audit(unet, torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 5, 16))
    assert len(report.sites) == len(_attention_modules(unet)) == 8
    assert _assert_paths(unet, report, Attention) == _attention_modules(unet)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1" in {s.module for s in report.sites}
    assert all(s.source.startswith("attention_processor.py:") for s in report.sites)


def test_diffusers_transformer2d_module_paths():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention

    model = diffusers.Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, num_layers=2,
                                         norm_num_groups=8, cross_attention_dim=12).eval()
    report = attnfuse.audit(model, torch.randn(1, 16, 5, 3), encoder_hidden_states=torch.randn(1, 7, 12))
    assert len(report.sites) == 4
    assert _assert_paths(model, report, Attention) == _attention_modules(model)


# ---------------------------------------------------------------------------- transformers' sdpa integration


def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa",
        hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        max_position_embeddings=64, attention_dropout=0.0)
    return transformers.LlamaForCausalLM(cfg)


def _attention_call_line() -> int:
    from transformers.models.llama import modeling_llama

    with open(modeling_llama.__file__) as f:
        lines = [i + 1 for i, line in enumerate(f) if re.search(r"= attention_interface\(", line)]
    assert len(lines) == 1
    return lines[0]


def _graphs(options):
    """A backend that keeps the graphs attnfuse returns (``inner="eager"``: the rewritten graph itself)."""
    kept = []

    def backend(gm, example_inputs):
        out = attnfuse_backend(gm, example_inputs, options)
        kept.append(out)
        return out

    return backend, kept


def test_llama_sdpa_gqa_source_groups_and_numbers():
    model = _llama()
    ref = copy.deepcopy(model).double()
    ids = torch.randint(3, 128, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0  # left padding: the mask goes to SDPA, so transformers calls repeat_kv first
    backend, kept = _graphs(EAGER)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out = compiled(ids, attention_mask=mask).logits
    report = attnfuse.last_report()
    assert [s.status for s in report.sites] == ["fused", "fused"]
    line = _attention_call_line()
    for i, site in enumerate(report.sites):
        assert site.module == f"model.layers.{i}.self_attn"
        assert site.source == f"modeling_llama.py:{line}"
        assert site.kv_groups == 6 // 2 and site.shapes["k"][1] == site.shapes["v"][1] == 2
    graph = kept[-1].graph
    calls = [n for n in graph.nodes if n.target in _OPS]
    assert len(calls) == 2 and all(n.kwargs["kv_groups"] == 3 for n in calls)
    assert not [n for n in graph.nodes if n.target == "expand"]  # the repeats are gone

    eager = model(ids, attention_mask=mask).logits
    want = ref(ids, attention_mask=mask).logits
    assert_2x(out, eager, want, "logits")
    w = torch.randn_like(want)
    grads = []
    for m, run in ((model, compiled), (model, model), (ref, ref)):
        m.zero_grad()
        (run(ids, attention_mask=mask).logits * w.to(m.dtype)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name in grads[2]:
        assert_2x(grads[0][name], grads[1][name], grads[2][name], name)


# ------------------------------------------------------------------------------- K/V repeated before SDPA

B, H, L, D = 2, 6, 13, 24


def _repeat_kv(x, n):  # transformers' spelling
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def _sdpa(q, k, v, mask, gqa=False):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


# (q heads, K/V heads, mask kind, fn(q, k, v, mask) -> out, expected kv_groups, repeat nodes left after the rewrite)
_SPELLINGS = {
    "repeat_kv": (6, 2, "keys", lambda q, k, v, m: _sdpa(q, _repeat_kv(k, 3), _repeat_kv(v, 3), m), 3),
    "repeat_interleave": (6, 3, None, lambda q, k, v, m: _sdpa(q, k.repeat_interleave(2, 1),
                                                                 v.repeat_interleave(2, dim=-3), m), 2),
    # tiled heads: head h reads K/V head h % 2; with a per-head additive mask, permuted with q's heads
    "repeat_tile": (6, 2, "heads", lambda q, k, v, m: _sdpa(q, k.repeat(1, 3, 1, 1), v.repeat(1, 3, 1, 1), m), 3),
    # repeat_kv by 3, then enable_gqa by 2: one group count of 6
    "repeat_kv_gqa": (6, 1, None, lambda q, k, v, m: _sdpa(q, _repeat_kv(k, 3), _repeat_kv(v, 3), m, True), 6),
    "gqa_only": (6, 2, "rows", lambda q, k, v, m: _sdpa(q, k, v, m, True), 3),
}


def _mask(kind, heads, lk=L):
    if kind is None:
        return None
    if kind == "keys":  # bool key padding; batch 1 sees only 5 keys
        keep = torch.ones(B, 1, 1, lk, dtype=torch.bool)
        keep[1, ..., 5:] = False
        return keep
    if kind == "rows":  # bool, with a query row that sees no key (SDPA gives it 0)
        keep = torch.rand(B, 1, L, lk) > 0.3
        keep[0, 0, 4] = False
        return keep
    return torch.randn(B, heads, L, lk)  # additive, per head


def _inputs(hq, hk, lk=L):
    return [torch.randn(B, h, n, D, requires_grad=True) for h, n in ((hq, L), (hk, lk), (hk, lk))]


def _check(fn, q, k, v, mask, groups, *, repeats_left=0):
    """Compile ``fn``, check the site's kv_groups and the rewritten graph; compare values and q/k/v
    gradients with eager (2x rule against float64)."""
    backend, kept = _graphs(EAGER)
    ours = torch.compile(fn, backend=backend, fullgraph=True)(q, k, v, mask)
    site, = attnfuse.last_report().sites
    assert site.status == "fused" and site.kv_groups == groups, (site.status, site.kv_groups, site.reason)
    call, = [n for n in kept[-1].graph.nodes if n.target in _OPS]
    assert call.kwargs["kv_groups"] == groups
    left = [n for n in kept[-1].graph.nodes if str(n.target) in ("expand", "repeat", "repeat_interleave")]
    assert len(left) == repeats_left, left
    eager = fn(q, k, v, mask)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = fn(q64, k64, v64, None if mask is None else mask if mask.dtype == torch.bool else mask.double())
    assert_2x(ours, eager, ref)
    w = torch.randn_like(ref)
    got = torch.autograd.grad(ours, (q, k, v), w.float())
    want = torch.autograd.grad(eager, (q, k, v), w.float())
    exact = torch.autograd.grad(ref, (q64, k64, v64), w)
    for name, a, b, c in zip("qkv", got, want, exact):
        assert_2x(a, b, c, f"d{name}")


@pytest.mark.parametrize("spelling", list(_SPELLINGS))
def test_sdpa_reads_kv_unrepeated(spelling):
    hq, hk, kind, fn, groups = _SPELLINGS[spelling]
    q, k, v = _inputs(hq, hk)
    _check(fn, q, k, v, _mask(kind, hq), groups)


def test_sdpa_repeated_kv_also_used_elsewhere_stays():
    def fn(q, k, v, mask):
        kr, vr = _repeat_kv(k, 3), _repeat_kv(v, 3)
        return _sdpa(q, kr, vr, mask) + kr.sum(-1, keepdim=True)

    q, k, v = _inputs(6, 2)
    _check(fn, q, k, v, None, 3, repeats_left=1)  # K's repeat feeds the sum too; V's is gone


# Negative twins: repeats that are not along the heads, and a write between the repeat and the call.
_NOT_HEADS = {
    "expand_seq": lambda q, k, v, m: _sdpa(q, k[:, :, :, None].expand(B, 3, L, 2, D).reshape(B, 3, 2 * L, D),
                                           v[:, :, :, None].expand(B, 3, L, 2, D).reshape(B, 3, 2 * L, D), m),
    "interleave_seq": lambda q, k, v, m: _sdpa(q, k.repeat_interleave(2, 2), v.repeat_interleave(2, dim=-2), m),
    "tile_seq": lambda q, k, v, m: _sdpa(q, k.repeat(1, 1, 2, 1), v.repeat(1, 1, 2, 1), m),
}


@pytest.mark.parametrize("spelling", list(_NOT_HEADS))
def test_sdpa_repeat_along_the_sequence_is_not_groups(spelling):
    q, k, v = _inputs(3, 3)
    _check(_NOT_HEADS[spelling], q, k, v, _mask("keys", 3, 2 * L), 1, repeats_left=2)


def test_sdpa_repeat_heads_then_write_base_keeps_repeat():
    def fn(q, k, v, mask):
        k, v = k * 1.0, v * 1.0
        kr, vr = _repeat_kv(k, 3), _repeat_kv(v, 3)
        k.mul_(2.0)  # eager's repeat read k before this write; an op reading k at the call would not
        return _sdpa(q, kr, vr, mask)

    q, k, v = _inputs(6, 2)
    _check(fn, q, k, v, None, 1, repeats_left=2)
