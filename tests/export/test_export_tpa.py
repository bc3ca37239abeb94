"""Export of Tensor Product Attention sites (the ``tpa`` family, issue 19 item 5), on the T6-style model.

* pt2 (torch.export) keeps ``attnfuse::tpa_attention``: the loaded program attends from the factors (no formed
  side reaches the op, no SDPA is left) and equals eager, at the traced size and, exported with dynamic dims, at
  others; also a decode step over a cache of factors;
* ONNX and MLIR have no such attention (`attnfuse.families`: ``tpa`` exports ``"original"``): the site is written
  as its original ops -- the factor products formed in full, then the model's own attention (ONNX ``Attention``
  from torch's exporter, ``torch.aten.scaled_dot_product_attention`` / ``tm_tensor.attention`` in MLIR), no
  attnfuse op -- and the report's site says so with the reason; onnxruntime's output equals eager.

The family is forced with ``options={"kernels": ["tpa"]}`` (the planner's choice is not under test here).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnfuse

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from t6_model import SPELLINGS, T6  # noqa: E402

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

_TPA = torch.ops.attnfuse.tpa_attention.default
OPTIONS = {"kernels": ["tpa"]}
LAYERS, HEADS, HEAD_DIM, Q_RANK, RANK, VOCAB = 2, 4, 16, 3, 2, 40
RTOL, ATOL = 1e-4, 2e-5  # fp32, as the other export tests


def _model(spelling: str = "bmm") -> T6:
    return T6(VOCAB, 48, LAYERS, HEADS, HEAD_DIM, Q_RANK, RANK, spelling=spelling, seed=3).eval()


def _tokens(batch: int = 2, length: int = 23, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _ort(path, args):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})[0]


def _assert_kept_original(fmt_target: str, sites: str = "Q/K/V", count: int = LAYERS) -> None:
    """Every site of the last report was skipped for ``fmt_target`` lacking tpa, written as its original ops."""
    report = attnfuse.last_report()
    assert len(report.sites) == count and not report.fused, [(s.status, s.kernel, s.reason) for s in report.sites]
    for site in report.sites:
        assert site.kernel is None and site.status == "skipped"
        assert f"{fmt_target} has no tpa attention" in site.reason, site.reason
        assert "exported as its original (exact) ops" in site.reason, site.reason
        assert f"{sites} formed from the factors, then the model's own attention" in site.reason, site.reason


def _assert_tpa_program(ep: torch.export.ExportedProgram, factorized: tuple[bool, bool, bool] = (True,) * 3,
                        count: int = LAYERS) -> None:
    """``ep`` runs ``count`` tpa ops, each reading the factorized sides as factors (plain argument None), and
    no SDPA is left."""
    ops = [n for n in ep.graph.nodes if n.target is _TPA]
    assert len(ops) == count, [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    for node in ops:
        for i, factors in enumerate(factorized):
            plain, a, b = node.args[3 * i: 3 * i + 3]
            assert (plain is None and a is not None and b is not None) if factors else plain is not None
    assert not any("scaled_dot_product" in str(n.target) for n in ep.graph.nodes)


# torch.export writes einsum as aten.einsum(eq, [a, b]) (operands in a list): `passes._tpa` reads both forms


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_pt2_keeps_the_tpa_op(spelling, tmp_path):
    model, tokens = _model(spelling), _tokens()
    with torch.no_grad():
        eager = model(tokens)
    path = attnfuse.export(model, (tokens,), tmp_path / "m.pt2", format="pt2", options=OPTIONS)
    assert [s.kernel for s in attnfuse.last_report().sites] == ["tpa"] * LAYERS
    ep = torch.export.load(path)
    _assert_tpa_program(ep)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(tokens), eager, rtol=RTOL, atol=ATOL)


def test_onnx_writes_formed_factors_and_attention(tmp_path):
    model, tokens = _model(), _tokens()
    with torch.no_grad():
        eager = model(tokens)
    path = attnfuse.export(model, (tokens,), tmp_path / "m.onnx", format="onnx", options=OPTIONS)
    _assert_kept_original("ONNX Attention")
    nodes = onnx.load(str(path)).graph.node
    assert {n.domain for n in nodes} <= {"", "ai.onnx"}, {n.domain for n in nodes}  # no attnfuse op
    # the model's own SDPA, which torch's exporter writes as the standard node; the formed sides are MatMuls
    assert [n.op_type for n in nodes].count("Attention") == LAYERS
    np.testing.assert_allclose(_ort(path, (tokens,)), eager.numpy(), rtol=RTOL, atol=ATOL)


def test_dynamic_shapes_pt2_and_onnx(tmp_path):
    """Exported with ``dynamic_shapes="auto"``, both formats run at other batch sizes and lengths."""
    model = _model("matmul")
    tokens = _tokens()
    pt2 = torch.export.load(attnfuse.export(model, (tokens,), tmp_path / "m.pt2", format="pt2", options=OPTIONS,
                                            dynamic_shapes="auto"))
    _assert_tpa_program(pt2)
    path = attnfuse.export(model, (tokens,), tmp_path / "m.onnx", format="onnx", options=OPTIONS,
                           dynamic_shapes="auto")
    _assert_kept_original("ONNX Attention")
    for batch, length in ((3, 5), (1, 31)):
        other = _tokens(batch, length, seed=length)
        with torch.no_grad():
            eager = model(other)
            torch.testing.assert_close(pt2.module()(other), eager, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(_ort(path, (other,)), eager.numpy(), rtol=RTOL, atol=ATOL)


class _DecodeStep(torch.nn.Module):
    """One decode step of a T6 over a cache of factors given as flat inputs (A_k, B_k, A_v, B_v per layer)."""

    def __init__(self, model: T6) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens, *flat):
        past = tuple(tuple(flat[4 * i: 4 * i + 4]) for i in range(len(flat) // 4))
        return self.model(tokens, past, use_cache=True)[0]


def test_decode_over_a_factor_cache(tmp_path):
    """One new token over 37 cached tokens: pt2 keeps the op (it reads the cached factors), ONNX forms K/V."""
    step = _DecodeStep(_model())
    cache = step.model.random_cache(2, 37, torch.Generator().manual_seed(5))
    args = (_tokens(2, 1), *(t for layer in cache.layers for t in layer))
    with torch.no_grad():
        eager = step(*args)
    ep = torch.export.load(attnfuse.export(step, args, tmp_path / "m.pt2", format="pt2", options=OPTIONS))
    _assert_tpa_program(ep)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*args), eager, rtol=RTOL, atol=ATOL)
    path = attnfuse.export(step, args, tmp_path / "m.onnx", format="onnx", options=OPTIONS)
    _assert_kept_original("ONNX Attention")
    np.testing.assert_allclose(_ort(path, args), eager.numpy(), rtol=RTOL, atol=ATOL)


class _KVOnly(torch.nn.Module):
    """A plain query over K/V formed from one pair of factors (the partial case): only K/V are factorized."""

    def forward(self, q, x_a, x_b):
        bsz, t, h, r = x_a.shape
        d = x_b.shape[-1]
        k = torch.bmm(x_a.reshape(bsz * t, h, r), x_b.reshape(bsz * t, r, d)).div_(r).view(bsz, t, h, d)
        v = torch.matmul(x_a * 0.5, x_b) / r
        return F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), is_causal=True)


def test_partial_site_names_the_formed_sides(tmp_path):
    gen = torch.Generator().manual_seed(7)
    args = (torch.randn(2, HEADS, 19, HEAD_DIM, generator=gen), torch.randn(2, 19, HEADS, RANK, generator=gen),
            torch.randn(2, 19, RANK, HEAD_DIM, generator=gen))
    model = _KVOnly().eval()
    with torch.no_grad():
        eager = model(*args)
    ep = torch.export.load(attnfuse.export(model, args, tmp_path / "m.pt2", format="pt2", options=OPTIONS))
    _assert_tpa_program(ep, (False, True, True), count=1)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*args), eager, rtol=RTOL, atol=ATOL)
    path = attnfuse.export(model, args, tmp_path / "m.onnx", format="onnx", options=OPTIONS)
    _assert_kept_original("ONNX Attention", sites="K/V", count=1)
    np.testing.assert_allclose(_ort(path, args), eager.numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("output", ["torch", "linalg-on-tensors"])
def test_mlir_writes_formed_factors_and_attention(output, tmp_path):
    pytest.importorskip("torch_mlir")
    model, tokens = _model(), _tokens()
    path = attnfuse.export(model, (tokens,), tmp_path / "m.mlir", format="mlir", options=OPTIONS,
                           mlir_output=output)
    _assert_kept_original("aten.scaled_dot_product_attention")
    text = path.read_text()
    assert "attnfuse" not in text
    if output == "torch":  # the bmm spelling's three products per layer, then the model's own SDPA
        assert text.count("torch.aten.bmm") == 3 * LAYERS
        assert text.count("torch.aten.scaled_dot_product_attention") == LAYERS
    else:
        assert text.count("tm_tensor.attention") == LAYERS
