"""ONNX: every fused site as one standard ``Attention`` node (opset 23).

`save(ep, path)` runs ``torch.onnx.export`` (the dynamo exporter) on a rewritten
`ExportedProgram` whose op calls are plain (`attnfuse.export._lower.plain_attention`: the
structure already in the mask), with a translation of ``attnfuse::attention`` to
``Attention(Q, K, V, attn_mask)``:

* ``scale`` (written: the op's default 1/sqrt(head_dim) made explicit), ``is_causal``
  (top-left aligned, as the op's), ``softcap`` (applied before the mask, as the op's),
  ``q_num_heads`` / ``kv_num_heads`` (GQA: the node reads K/V head ``h // kv_groups``);
* the mask, bool (True = attend) or additive, expanded to (…, Lq, Lk) as onnxruntime requires.

Every size is read from the tensors at run time (``Shape``), never written in: a program exported with
dynamic dims runs at other batch sizes and lengths.  Where head_dim is dynamic and the op has no explicit
scale, ``scale`` is left to the node's default (the same 1/sqrt(head_dim)); a dynamic head count leaves
``q_num_heads`` / ``kv_num_heads`` out (Q/K/V are 4-D, so ONNX reads them from the shapes).

Sites that ONNX cannot express were left as their original ops by the rewrite (the report says why).
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch

OPSET = 23


def _missing(exc: ImportError) -> ImportError:
    return ImportError(f"ONNX export needs onnx, onnxscript and onnxruntime ({exc.name} is missing): "
                       "pip install 'attnfuse[onnx]'")


def require() -> None:
    """Raise an ImportError naming the extra when the ONNX dependencies are missing."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise _missing(exc) from None


def _static(dim: Any) -> int | None:
    """A dimension of a traced ONNX value as an int, or None where it is symbolic (a dynamic shape)."""
    return dim if isinstance(dim, int) else None


def _attributes(q: Any, k: Any, scale: float | None) -> dict[str, Any]:
    """``scale`` and the head counts, each where it is known at export time.  Q/K/V are 4-D, so ONNX reads
    the head counts from their shapes and the attributes only restate them; a symbolic head_dim with no
    explicit scale leaves ``scale`` to the op's default, which is the same 1/sqrt(head_dim)."""
    attrs = {"scale": None if scale is None else float(scale), "q_num_heads": _static(q.shape[1]),
             "kv_num_heads": _static(k.shape[1])}
    return {key: value for key, value in attrs.items() if value is not None}


def _translation() -> dict[Any, Any]:
    from onnxscript import opset23 as op
    from onnxscript.values import Opset

    op24 = Opset("", 24)  # onnxscript has no opset24 module yet; onnx's schema is there

    def attention(q, k, v, mask=None, seed=None, alibi=None, sinks=None, *, scale=None, causal=False, softcap=0.0,
                  kv_groups=1, dropout_p=0.0, mask_fill=None, window_left=-1, window_right=-1,
                  block_sparse=False, window_pad=False, approx="", tiles=""):
        if alibi is not None or window_left >= 0 or window_right >= 0 or dropout_p or window_pad or sinks is not None:
            raise ValueError("attnfuse: a structured or dropout op reached the ONNX translation")
        head_dim = _static(q.shape[-1])
        if scale is None and head_dim is not None:
            scale = float(head_dim) ** -0.5
        if mask is not None:  # onnxruntime wants the mask's query axis spelled out
            lq = op.Slice(op.Shape(q), [2], [3])
            lk = op.Slice(op.Shape(k), [2], [3])
            mask = op.Expand(mask, op.Concat(op.Constant(value_ints=[1, 1]), lq, lk, axis=0))
        out, _, _, _ = op.Attention(q, k, v, mask, is_causal=int(causal), softcap=float(softcap),
                                    **_attributes(q, k, scale))
        return out, op.ConstantOfShape(op.Constant(value_ints=[0]))  # row statistics: read by the backward only

    def attention_nonpad(q, k, v, kv_lengths, *, scale=None, causal=False, softcap=0.0, kv_groups=1):
        if scale is None and _static(q.shape[-1]) is not None:
            scale = float(q.shape[-1]) ** -0.5
        out, _, _, _ = op24.Attention(q, k, v, None, None, None, op.Cast(kv_lengths, to=7),  # 7: INT64
                                      is_causal=int(causal), softcap=float(softcap), **_attributes(q, k, scale))
        return out

    return {torch.ops.attnfuse.attention.default: attention,
            torch.ops.attnfuse.attention_nonpad.default: attention_nonpad}


def convert(ep: torch.export.ExportedProgram) -> Any:
    """The ``torch.onnx.ONNXProgram`` of ``ep`` (already lowered to plain op calls); its dynamic dims stay
    symbolic (named after torch's symbols), so the model runs at any size ``ep`` accepts."""
    require()
    nonpad = any(n.target is torch.ops.attnfuse.attention_nonpad.default for n in ep.graph.nodes)
    # the exporter's graph optimizer fuses rotary embeddings into opset 23's RotaryEmbedding, which
    # onnxruntime rejects once the sequence length is dynamic: a dynamic program is written unoptimized
    dynamic = any(isinstance(s, torch.SymInt) for n in ep.graph.find_nodes(op="placeholder")
                  if isinstance(n.meta.get("val"), torch.Tensor) for s in n.meta["val"].shape)
    return torch.onnx.export(ep, dynamo=True, opset_version=OPSET + nonpad, optimize=not dynamic,
                             custom_translation_table=_translation(), verbose=False)


def save(ep: torch.export.ExportedProgram, path: str | pathlib.Path) -> pathlib.Path:
    """Write ``ep`` (already lowered to plain op calls) as an ONNX model at ``path``."""
    path = pathlib.Path(path)
    convert(ep).save(str(path))
    return path
