"""Dynamic shapes through `attnfuse.export` (``dynamic_shapes=``): the files run at sizes other than the example's.

* ONNX (``"auto"``, GPT-2): onnxruntime at two other batch sizes and lengths (odd, padded) equals eager;
  the graph inputs are symbolic;
* pt2 (named ``Dim``s with bounds, LLaMA): ``torch.export.load`` keeps the names' ranges and runs at other
  sizes; the report's note names the dims;
* MLIR: ``?`` dims in ``@main``'s signature;
* a raw q/k/v model with every dim dynamic (head count and head_dim too): the ONNX node reads them from the
  shapes;
* `_dims.parse` (the CLI's ``--dynamic-dims``): what it builds and each error's message;
* the rewrite's re-export failing on the dims: the original program is exported, the report says why;
* no torch ``LeafSpec`` FutureWarning escapes; the progress bar only on a terminal.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import pytest
import torch
from export_models import VOCAB, example

import attnfuse
from attnfuse.export import _dims, _Progress

pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
_OP = torch.ops.attnfuse.attention.default
Dim = torch.export.Dim


def _ids(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and an attention mask whose second row is right-padded by 3 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -3:] = 0
    return ids, mask


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _note(report) -> str:
    (note,) = [n for n in report.notes if n.startswith("exported as")]
    return note


def test_onnx_auto_runs_at_other_sizes(tmp_path):
    model, args = example("gpt2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = attnfuse.export(model, args, tmp_path / "m.onnx", format="onnx", dynamic_shapes="auto")
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
    report = attnfuse.last_report()
    assert len(report.fused) == 2
    assert re.fullmatch(r"exported as onnx, dynamic dims: ids \((s\d+), (s\d+)\), mask \(\1, \2\); \1 2\.\., \2 2\.\.",
                        _note(report)), _note(report)
    proto = onnx.load(str(path))
    for graph_input in proto.graph.input:  # both dims symbolic, no sizes written in
        dims = graph_input.type.tensor_type.shape.dim
        assert [d.dim_param != "" and d.dim_value == 0 for d in dims] == [True, True], graph_input
    assert [n.op_type for n in proto.graph.node].count("Attention") == 2
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, length, seed in ((3, 11, 1), (5, 29, 2)):
        ids, mask = _ids(batch, length, seed)
        with torch.no_grad():
            eager = _first(model(ids, mask))
        got = session.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[0]
        assert got.shape == (batch, length, VOCAB)
        np.testing.assert_allclose(got, eager.numpy(), rtol=1e-4, atol=2e-5)


def test_pt2_named_dims_keep_their_ranges(tmp_path):
    model, args = example("llama")
    batch, seq = Dim("batch", max=8), Dim("seq", min=2, max=48)
    spec = {"ids": {0: batch, 1: seq}, "mask": {0: batch, 1: seq}}  # by parameter name, as torch.export takes
    path = attnfuse.export(model, args, tmp_path / "m.pt2", dynamic_shapes=spec)
    assert _note(attnfuse.last_report()) == "exported as pt2, dynamic dims: ids (batch, seq), mask (batch, seq); " \
                                            "batch 0..8, seq 2..48"
    loaded = torch.export.load(path)
    assert sum(n.target is _OP for n in loaded.graph.nodes) == 2
    ranges = sorted((int(r.lower), int(r.upper)) for r in loaded.range_constraints.values())
    assert ranges == [(0, 8), (2, 48)]
    for size, seed in (((3, 11), 3), ((5, 29), 4)):
        ids, mask = _ids(*size, seed)
        with torch.no_grad():
            torch.testing.assert_close(_first(loaded.module()(ids, mask)), _first(model(ids, mask)), rtol=1e-4,
                                       atol=1e-5)
    with pytest.raises(AssertionError, match=re.escape("ids.size()[1] <= 48")):  # past the exported range
        loaded.module()(*_ids(3, 49, 5))


def test_mlir_dims_are_dynamic(tmp_path):
    pytest.importorskip("torch_mlir")
    model, args = example("nanogpt")
    path = attnfuse.export(model, args, tmp_path / "m.mlir", format="mlir", dynamic_shapes="auto")
    text = path.read_text()
    assert re.search(r"func\.func @main\(%arg0: !torch\.vtensor<\[\?,\?\],si64>\)", text), text[:500]
    assert text.count("torch.aten.scaled_dot_product_attention") == 2
    assert re.fullmatch(r"exported as mlir, dynamic dims: idx \(s\d+, s\d+\); s\d+ 2\.\., s\d+ 2\.\.64",
                        _note(attnfuse.last_report()))


class QKV(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.125, dim=-1) @ v


def test_onnx_every_dim_dynamic_head_count_and_head_dim(tmp_path):
    """Heads and head_dim symbolic too: the node states neither (ONNX reads them from the 4-D shapes)."""
    args = tuple(torch.randn(2, 3, 7, 8) for _ in range(3))
    path = attnfuse.export(QKV(), args, tmp_path / "m.onnx", format="onnx", dynamic_shapes="auto")
    (node,) = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Attention"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert "q_num_heads" not in attrs and "kv_num_heads" not in attrs and attrs["scale"] == pytest.approx(0.125)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(7)
    for b, h, lq, lk, d, dv in ((3, 5, 11, 13, 6, 9), (1, 2, 29, 3, 40, 40)):
        q, k, v = torch.randn(b, h, lq, d, generator=g), torch.randn(b, h, lk, d, generator=g), \
            torch.randn(b, h, lk, dv, generator=g)
        got = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})[0]
        np.testing.assert_allclose(got, QKV()(q, k, v).numpy(), rtol=1e-4, atol=2e-5)


def test_dynamic_shapes_argument_errors(tmp_path):
    args = tuple(torch.randn(2, 3, 7, 8) for _ in range(3))
    with pytest.raises(ValueError, match=r"dynamic_shapes='dynamic': allowed values are None, 'auto'"):
        attnfuse.export(QKV(), args, tmp_path / "m.pt2", dynamic_shapes="dynamic")
    ep = torch.export.export(QKV(), args)
    with pytest.raises(ValueError, match="ExportedProgram already: pass dynamic_shapes to torch.export.export"):
        attnfuse.export(ep, args, tmp_path / "m.pt2", dynamic_shapes="auto")


def test_failed_reexport_exports_the_original_program(tmp_path, monkeypatch):
    """A rewrite whose re-export cannot keep the dims: the original (dynamic) program is written, sites skipped."""
    args = tuple(torch.randn(2, 3, 7, 8) for _ in range(3))
    real = torch.export.export

    def export(model, *a, **kw):
        if isinstance(model, torch.fx.GraphModule):  # the re-export of the rewritten module
            raise torch._dynamo.exc.UserError(torch._dynamo.exc.UserErrorType.CONSTRAINT_VIOLATION,
                                              "Constraints violated (s0)!")
        return real(model, *a, **kw)

    monkeypatch.setattr(torch.export, "export", export)
    path = attnfuse.export(QKV(), args, tmp_path / "m.pt2", dynamic_shapes="auto")
    report = attnfuse.last_report()
    assert not report.fused and report.sites[0].reason.startswith("the rewritten program would not keep the dynamic")
    assert "re-exporting the rewrite with the dynamic dims failed (Constraints violated (s0)!)" in report.notes[0]
    monkeypatch.undo()
    loaded = torch.export.load(path)
    assert not any(n.target is _OP for n in loaded.graph.nodes)
    q = torch.randn(3, 5, 11, 8)
    torch.testing.assert_close(loaded.module()(q, q, q), QKV()(q, q, q))


# --- the CLI's --dynamic-dims ---------------------------------------------------------------------------------


def test_parse_builds_shared_dims_with_bounds():
    args = (torch.zeros(2, 7, 24), 3, torch.zeros(2, 7))
    spec = _dims.parse("0.0=batch, 0.1=seq:2..4096 2.0=batch,2.1=seq", args)
    assert spec[1] is None and spec[0].keys() == {0, 1} and spec[2].keys() == {0, 1}
    assert spec[0][0] is spec[2][0] and spec[0][1] is spec[2][1]
    assert (spec[0][0].__name__, spec[0][0].min) == ("batch", 0)
    assert (spec[0][1].__name__, spec[0][1].min, spec[0][1].max) == ("seq", 2, 4096)
    assert _dims.parse("0.1=seq:..9", args)[0][1].max == 9 and _dims.parse("0.1=seq:3..", args)[0][1].min == 3


PARSE_ERRORS = {
    "": "--dynamic-dims is empty; expected INPUT.DIM=NAME[:MIN..MAX]",
    "x.0=batch": "cannot read 'x.0=batch'; expected INPUT.DIM=NAME[:MIN..MAX] entries separated by commas",
    "0.0=2b": "cannot read '0.0=2b'",
    "0.1=seq:4-9": "cannot read '0.1=seq:4-9'",
    "3.0=batch": "'3.0=batch': there is no input 3; the example args are inputs 0..2",
    "1.0=n": "'1.0=n': input 1 is a int, not a tensor; only tensor inputs have dims",
    "0.3=d": "'0.3=d': input 0 has 3 dims (shape (2, 7, 24)), so DIM must be 0..2",
    "0.1=seq,0.1=len": "dim 0.1 is named twice (seq, len); name it once",
    "0.1=seq:9..3": "'0.1=seq:9..3': MIN must be at most MAX",
    "0.1=seq:2..9,2.1=seq:2..8": "seq has two ranges (2..9, 2..8); give its range once",
    "0.1=seq:8..": "seq's range 8.. excludes the example size of 0.1 (7); widen the range or change the example",
    "0.0=b,0.2=b": "b names dims of different example sizes (0.0 is 2, 0.2 is 24); the same name means the same size",
    "2.0=one": "input 2 dim 0 has example size 1, which torch.export treats as a constant",
}


@pytest.mark.parametrize("text", list(PARSE_ERRORS))
def test_parse_errors_say_what_is_expected(text):
    args = (torch.zeros(2, 7, 24), 3, torch.zeros(1, 7))
    with pytest.raises(ValueError) as info:
        _dims.parse(text, args)
    assert PARSE_ERRORS[text] in str(info.value)


def test_progress_bar_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, shown in ((io.StringIO(), False), (Terminal(), True)):
        bar = _Progress(3, stream, delay=0)
        for step in ("trace", "rewrite", "save"):
            bar.step(step)
        bar.close()
        text = stream.getvalue()
        assert ("attnfuse export: rewrite" in text) is shown and (text == "") is not shown
