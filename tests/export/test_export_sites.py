"""Export of the sites with structure (window, ALiBi, block-sparse, softcap), the sites a format cannot
express (left as their original ops, with the reason), `attnfuse.rewrite` itself, dynamic shapes,
bad arguments and missing optional dependencies.

Structured sites run ``attnfuse::attention`` with a band, ALiBi slopes or a block-sparse hint; the
export spells that as the standard op's mask (`attnfuse.export._lower.dense_mask`), and both the ONNX
model (in onnxruntime) and the SDPA program torch-mlir imports must still compute the model.
"""

from __future__ import annotations

import math
import pathlib
import re
import sys

import numpy as np
import pytest
import torch
from nanogpt import GPT, GPTConfig

import attnfuse
from attnfuse.export import _lower
from attnfuse.report import Site

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "passes"))
import _mask_models as mm  # noqa: E402

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
_OP = torch.ops.attnfuse.attention.default


def _ort(path, args):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})[0]


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _x(t: int = 97):
    torch.manual_seed(1)
    return (torch.randn(2, t, mm.DIM),)


STRUCTURED = {
    # name: (model, args, what the op gets)
    "window": (lambda: mm.Stack(mm.Attention(mask=mm.band_keep(5, 0)), mm.Attention(mask=mm.band_keep(3, 2))),
               _x, "window_left"),
    "alibi": (lambda: mm.ALiBi(), _x, "alibi"),
    "blocksparse": (lambda: mm.ConstantMask(mm.block_pattern(130, 64)), lambda: _x(130), "block_sparse"),
    "mistral": (lambda: mm.mistral(6), lambda: (torch.randint(3, mm.VOCAB, (2, 19)),), "window_left"),
}


@pytest.mark.parametrize("name", list(STRUCTURED))
def test_structured_sites(name, tmp_path):
    build, make_args, feature = STRUCTURED[name]
    torch.manual_seed(0)
    model, args = build().eval(), make_args()
    with torch.no_grad():
        eager = model(*args)
    ep = attnfuse.rewrite(torch.export.export(model, args))
    ops = [n for n in ep.graph.nodes if n.target is _OP]
    sites = len(attnfuse.last_report().sites)
    assert len(ops) == len(attnfuse.last_report().fused) == sites >= 1
    used = [n.kwargs.get(feature) if feature in n.kwargs else (n.args[5] if feature == "alibi" else None)
            for n in ops]
    assert all(u not in (None, -1, False) for u in used), f"the op did not get the {feature} structure: {used}"
    path = attnfuse.export(model, args, tmp_path / "m.onnx", format="onnx")
    assert _ops(path).count("Attention") == sites and "Softmax" not in _ops(path)
    np.testing.assert_allclose(_ort(path, args), eager.numpy(), rtol=1e-4, atol=2e-5)
    sdpa = ep.run_decompositions({_OP: _lower.sdpa_decomposition})
    with torch.no_grad():
        torch.testing.assert_close(sdpa.module()(*args), eager, rtol=1e-4, atol=2e-5)
    pytest.importorskip("torch_mlir")
    text = attnfuse.export(model, args, tmp_path / "m.mlir", format="mlir").read_text()
    assert text.count("torch.aten.scaled_dot_product_attention") == sites


def test_softcap_is_onnx_attribute_but_not_sdpa(tmp_path):
    """Gemma 2: ONNX Attention has softcap; SDPA has not, so MLIR keeps those sites as their original ops."""
    torch.manual_seed(0)
    model = mm.gemma2(4, 5.0).eval()
    ids = torch.randint(3, mm.VOCAB, (2, 11))
    args = (ids, torch.ones(2, 11, dtype=torch.long))
    with torch.no_grad():
        eager = model(*args)
    path = attnfuse.export(model, args, tmp_path / "m.onnx", format="onnx")
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Attention"]
    assert len(nodes) == 2
    assert {onnx.helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "softcap"} == {5.0}
    np.testing.assert_allclose(_ort(path, args), eager.numpy(), rtol=1e-4, atol=2e-5)
    pytest.importorskip("torch_mlir")
    text = attnfuse.export(model, args, tmp_path / "m.mlir", format="mlir").read_text()
    report = attnfuse.last_report()
    assert not report.fused and len(report.skipped) == 2
    assert all("has no softcap" in s.reason and "original ops" in s.reason for s in report.skipped)
    assert "scaled_dot_product_attention" not in text


def test_dropout_site_stays_original_in_onnx(tmp_path):
    """A train-mode model keeps attention dropout: ONNX Attention has none, so the site is its original ops."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=16, dropout=0.1)).train()
    args = (torch.randint(0, 64, (1, 9)),)
    path = attnfuse.export(model, args, tmp_path / "m.onnx", format="onnx")
    report = attnfuse.last_report()
    assert len(report.sites) == 1 and not report.fused
    assert "no dropout" in report.skipped[0].reason and "original ops" in report.skipped[0].reason
    assert "Attention" not in _ops(path) and "Softmax" in _ops(path)
    attnfuse.export(model, args, tmp_path / "m.pt2", format="pt2")  # pt2 keeps everything: the op does dropout
    assert len(attnfuse.last_report().fused) == 1


def test_approximate_kernels_are_not_expressible():
    site = Site(id=0, module="m", source="", status="fused", kernel="topk")
    match = type("M", (), {"dropout_p": 0.0, "softcap": 0.0})()
    for fmt in ("onnx", "mlir"):
        assert "no topk attention" in _lower.unsupported(fmt, match, site)
    site.kernel, site.table = "flash", [{"kv_len": [0, 4096], "kernel": "flash"}, {"kv_len": [4096, None],
                                                                               "kernel": "lsh"}]
    assert "no lsh attention" in _lower.unsupported("onnx", match, site)
    assert _lower.unsupported("pt2", match, site) is None


def test_dynamic_shapes_survive_rewrite_and_onnx(tmp_path):
    torch.manual_seed(0)
    model = mm.llama().eval()
    seq = torch.export.Dim("seq", min=2, max=64)
    ids, mask = torch.randint(3, mm.VOCAB, (2, 13)), torch.ones(2, 13, dtype=torch.long)
    exported = torch.export.export(model, (ids, mask), dynamic_shapes=({1: seq}, {1: seq}))
    ep = attnfuse.rewrite(exported)
    assert sum(n.target is _OP for n in ep.graph.nodes) == 2
    path = attnfuse.export(exported, (ids, mask), tmp_path / "m.onnx", format="onnx")
    assert _ops(path).count("Attention") == 2 and "Softmax" not in _ops(path)
    for length in (5, 29):
        ids, mask = torch.randint(3, mm.VOCAB, (2, length)), torch.ones(2, length, dtype=torch.long)
        mask[0, :3] = 0  # left padding
        with torch.no_grad():
            eager = model(ids, mask)
            torch.testing.assert_close(ep.module()(ids, mask), eager, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(_ort(path, (ids, mask)), eager.numpy(), rtol=1e-4, atol=2e-5)


def test_rewrite_without_sites_returns_the_program():
    ep = torch.export.export(torch.nn.Linear(4, 3), (torch.randn(2, 4),))
    assert attnfuse.rewrite(ep) is ep
    assert attnfuse.last_report().sites == []


def test_bad_arguments(tmp_path):
    model, args = mm.Attention(), _x(7)
    with pytest.raises(ValueError, match=r"format='tflite'.*'pt2', 'onnx', 'mlir'"):
        attnfuse.export(model, args, tmp_path / "m", format="tflite")
    with pytest.raises(ValueError, match=r"mlir_output='stablehlo'.*'torch', 'linalg-on-tensors'"):
        attnfuse.export(model, args, tmp_path / "m", format="mlir", mlir_output="stablehlo")
    with pytest.raises(ValueError, match="kernels"):
        attnfuse.export(model, args, tmp_path / "m", format="pt2", options={"kernels": ["nope"]})


@pytest.mark.parametrize(("fmt", "module", "extra"), [("onnx", "onnxscript", "attnfuse[onnx]"),
                                                      ("onnx", "onnx", "attnfuse[onnx]"),
                                                      ("mlir", "torch_mlir", "attnfuse[mlir]")])
def test_missing_dependency_names_the_extra(fmt, module, extra, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(ImportError, match=re.escape(extra)):
        attnfuse.export(mm.Attention(), _x(7), tmp_path / "m", format=fmt)


def test_scale_default_is_written_out(tmp_path):
    """The op's default scale (1/sqrt(head_dim)) is written as the node's attribute, not left implicit."""
    path = attnfuse.export(mm.Attention().eval(), _x(7), tmp_path / "m.onnx", format="onnx")
    node = next(n for n in onnx.load(str(path)).graph.node if n.op_type == "Attention")
    scale = next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "scale")
    assert scale == pytest.approx(1 / math.sqrt(mm.DIM // mm.HEADS))


class LengthsAttention(torch.nn.Module):
    """Self-attention whose keys are masked from per-batch lengths: right padding (``kv < lengths[b]``), or
    with ``left=True`` left padding (``kv >= T - lengths[b]``), which nonpad_kv_seqlen cannot express."""

    def __init__(self, left: bool = False, causal: bool = False) -> None:
        super().__init__()
        self.qkv, self.left, self.causal = torch.nn.Linear(mm.DIM, 3 * mm.DIM), left, causal

    def forward(self, x, lengths):
        b, t, _ = x.shape
        q, k, v = (y.view(b, t, mm.HEADS, -1).transpose(1, 2) for y in self.qkv(x).split(mm.DIM, -1))
        pos = torch.arange(t, device=x.device)[None, :]
        keep = pos >= t - lengths[:, None] if self.left else lengths[:, None] > pos
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        if self.causal:
            s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, mm.DIM)


# right padding from lengths reaches the op as a key vector, with or without causal (every fill is -inf, so a
# row that saw no key is NaN with the band too: `backend._with_structure`); with causal the mask stays an input
# (onnxruntime aligns is_causal to the non-padded length); left padding is not a prefix of the keys
@pytest.mark.parametrize(("left", "causal", "nonpad"), [(False, False, True), (False, True, False),
                                                        (True, False, False)])
def test_key_padding_lengths_become_nonpad_kv_seqlen(left, causal, nonpad, tmp_path):
    torch.manual_seed(0)
    model, x = LengthsAttention(left, causal).eval(), torch.randn(3, 23, mm.DIM)
    path = attnfuse.export(model, (x, torch.tensor([23, 17, 5])), tmp_path / "m.onnx", format="onnx")
    proto = onnx.load(str(path))
    (node,) = [n for n in proto.graph.node if n.op_type == "Attention"]
    opset = {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")}
    if not nonpad:  # not (provably) a prefix of the keys: the mask stays an input, opset 23
        assert opset == {23} and node.input[3] and len(node.input) <= 4
    else:  # opset 24: nonpad_kv_seqlen is the model's lengths input, and no mask input
        assert opset == {24} and len(node.input) == 7 and node.input[6] == "lengths" and not node.input[3]
    for lengths in ([23, 17, 5], [1, 22, 12]):
        lengths = torch.tensor(lengths)
        with torch.no_grad():
            eager = model(x, lengths)
        np.testing.assert_allclose(_ort(path, (x, lengths)), eager.numpy(), rtol=1e-4, atol=2e-5)


class TwoMHA(torch.nn.Module):
    """``nn.MultiheadAttention`` self-attention with key padding, then cross-attention to a shorter memory."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = torch.nn.MultiheadAttention(mm.DIM, mm.HEADS, batch_first=True)
        self.cross_attn = torch.nn.MultiheadAttention(mm.DIM, mm.HEADS, batch_first=True)

    def forward(self, x, memory, key_padding_mask):
        x = x + self.self_attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return x + self.cross_attn(x, memory, memory, need_weights=False)[0]


def _padded_ids(length: int = 13):
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, -4:] = 0
    return torch.randint(3, mm.VOCAB, (2, length)), mask


SDPA_SITES = {  # models whose attention is already F.scaled_dot_product_attention / nn.MultiheadAttention
    "gpt2-sdpa": (lambda: mm.gpt2("sdpa"), _padded_ids),
    "llama-sdpa": (lambda: mm.llama("sdpa"), _padded_ids),
    "mha": (TwoMHA, lambda: (torch.randn(2, 9, mm.DIM), torch.randn(2, 5, mm.DIM),
                             torch.tensor([[False] * 9, [False] * 7 + [True] * 2]))),
}


@pytest.mark.parametrize("name", list(SDPA_SITES))
def test_sdpa_and_mha_sites(name, tmp_path):
    build, make_args = SDPA_SITES[name]
    torch.manual_seed(0)
    model, args = build().eval(), make_args()
    with torch.no_grad():
        eager = model(*args)
    path = attnfuse.export(model, args, tmp_path / "m.onnx", format="onnx")
    report = attnfuse.last_report()
    assert len(report.fused) == len(report.sites) == 2, str(report)
    assert _ops(path).count("Attention") == 2 and "Softmax" not in _ops(path)
    np.testing.assert_allclose(_ort(path, args), eager.numpy(), rtol=1e-4, atol=2e-5)
    ep = torch.export.load(attnfuse.export(model, args, tmp_path / "m.pt2", format="pt2"))
    assert sum(n.target is _OP for n in ep.graph.nodes) == 2
    assert not any("scaled_dot_product" in str(n.target) for n in ep.graph.nodes)  # the originals are gone
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*args), eager, rtol=1e-4, atol=2e-5)
    pytest.importorskip("torch_mlir")
    text = attnfuse.export(model, args, tmp_path / "m.mlir", format="mlir").read_text()
    assert text.count("torch.aten.scaled_dot_product_attention") == 2
