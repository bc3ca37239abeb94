"""Export round trips for GPT-2, BERT, LLaMA (GQA), T5 and nanoGPT: pt2, ONNX, MLIR.

* pt2: ``torch.export.load`` (here and in a fresh interpreter that only imports attnfuse) runs one
  ``attnfuse::attention`` per site and equals eager under the 2x rule (float64 model as reference);
* ONNX: one standard ``Attention`` node per fused site and no ``Softmax``; the attributes say what
  the site is (causal, scale, GQA heads); onnxruntime's output equals eager;
* MLIR: one ``torch.aten.scaled_dot_product_attention`` per site (``torch``) and one
  ``tm_tensor.attention`` per site (``linalg-on-tensors``); the SDPA program that torch-mlir
  imports also runs in torch and equals eager.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from _util import assert_2x
from export_models import example

import attnfuse
from attnfuse.export import _lower

pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

SITES = {"gpt2": 2, "bert": 2, "llama": 2, "t5": 6, "nanogpt": 2}
_OP = torch.ops.attnfuse.attention.default


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _double(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


@pytest.fixture(scope="module", params=list(SITES))
def case(request):
    model, args = example(request.param)
    with torch.no_grad():
        eager = _first(model(*args))
        ref = _first(copy.deepcopy(model).double()(*map(_double, args)))
    return request.param, model, args, eager, ref


def _report_all_fused(name):
    report = attnfuse.last_report()
    assert (len(report.fused), len(report.sites)) == (SITES[name], SITES[name]), str(report)
    return report


def test_pt2_round_trip(case, tmp_path):
    name, model, args, eager, ref = case
    path = attnfuse.export(model, args, tmp_path / "m.pt2", format="pt2")
    _report_all_fused(name)
    loaded = torch.export.load(path)
    assert sum(n.target is _OP for n in loaded.graph.nodes) == SITES[name]
    assert not any("softmax" in str(n.target) for n in loaded.graph.nodes)
    with torch.no_grad():
        assert_2x(_first(loaded.module()(*args)), eager, ref.float(), f"{name} pt2")


def test_onnx_attention_nodes_and_onnxruntime(case, tmp_path):
    name, model, args, eager, _ = case
    path = attnfuse.export(model, args, tmp_path / "m.onnx", format="onnx")
    _report_all_fused(name)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    nodes = [n for n in proto.graph.node if n.op_type == "Attention"]
    assert len(nodes) == SITES[name]
    assert not [n for n in proto.graph.node if n.op_type == "Softmax"]
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {23}
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    heads = {"llama": (4, 2)}.get(name, (4, 4))  # GQA: 4 query heads read 2 K/V heads
    assert {(a["q_num_heads"], a["kv_num_heads"]) for a in attrs} == {heads}
    if name == "t5":  # T5 has no 1/sqrt(d) scale and a relative-position bias as the mask input
        assert {a["scale"] for a in attrs} == {1.0}
        assert all(len(n.input) >= 4 and n.input[3] for n in nodes)
    else:
        assert [a["scale"] for a in attrs] == pytest.approx([8 ** -0.5] * SITES[name])
    if name == "nanogpt":  # the tril buffer is proven causal: an attribute, no mask input
        assert [a["is_causal"] for a in attrs] == [1, 1] and all(len(n.input) < 4 or not n.input[3] for n in nodes)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})[0]
    np.testing.assert_allclose(got, eager.numpy(), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("output", ["torch", "linalg-on-tensors"])
def test_mlir_one_attention_op_per_site(case, tmp_path, output):
    pytest.importorskip("torch_mlir")
    name, model, args, _, _ = case
    path = attnfuse.export(model, args, tmp_path / "m.mlir", format="mlir", mlir_output=output)
    _report_all_fused(name)
    text = path.read_text()
    assert "module" in text and "func.func @main" in text
    if output == "torch":
        assert text.count("torch.aten.scaled_dot_product_attention") == SITES[name]
        assert "softmax" not in text and "torch.aten.exp " not in text
    else:
        assert text.count("tm_tensor.attention") == SITES[name]
        assert not re.search(r"\btorch\.(aten|prim|constant|vtensor)\b", text)  # fully lowered


def test_mlir_program_equals_eager(case):
    """What torch-mlir imports (the op as SDPA, `_lower.sdpa_decomposition`) computes the model."""
    name, model, args, eager, ref = case
    ep = attnfuse.rewrite(torch.export.export(model, args))
    sdpa = ep.run_decompositions({_OP: _lower.sdpa_decomposition})
    assert not any(n.target is _OP for n in sdpa.graph.nodes)
    assert sum("scaled_dot_product_attention" in str(n.target) for n in sdpa.graph.nodes) == SITES[name]
    with torch.no_grad():
        assert_2x(_first(sdpa.module()(*args)), eager, ref.float(), f"{name} sdpa program")


def test_pt2_loads_in_a_fresh_interpreter(tmp_path):
    model, args = example("nanogpt")
    path = attnfuse.export(model, args, tmp_path / "m.pt2", format="pt2")
    torch.save(args, tmp_path / "args.pt")
    torch.save(model(*args)[0].detach(), tmp_path / "eager.pt")
    script = (
        "import torch, attnfuse, sys\n"
        f"ep = torch.export.load({str(path)!r})\n"
        f"args = torch.load({str(tmp_path / 'args.pt')!r})\n"
        f"eager = torch.load({str(tmp_path / 'eager.pt')!r})\n"
        "out = ep.module()(*args)[0]\n"
        "assert sum(n.target is torch.ops.attnfuse.attention.default for n in ep.graph.nodes) == 2\n"
        "torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
