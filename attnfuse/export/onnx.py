"""ONNX: every fused site as one standard ``Attention`` node (opset 23).

`save(ep, path)` runs ``torch.onnx.export`` (the dynamo exporter) on a rewritten
`ExportedProgram` whose op calls are plain (`attnfuse.export._lower.plain_attention`: the
structure already in the mask), with a translation of ``attnfuse::attention`` to
``Attention(Q, K, V, attn_mask)``:

* ``scale`` (always written: the op's default 1/sqrt(head_dim) made explicit), ``is_causal``
  (top-left aligned, as the op's), ``softcap`` (applied before the mask, as the op's),
  ``q_num_heads`` / ``kv_num_heads`` (GQA: the node reads K/V head ``h // kv_groups``);
* the mask, bool (True = attend) or additive, expanded to (…, Lq, Lk) as onnxruntime requires.

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


def _translation() -> dict[Any, Any]:
    from onnxscript import opset23 as op
    from onnxscript.values import Opset

    op24 = Opset("", 24)  # onnxscript has no opset24 module yet; onnx's schema is there

    def attention(q, k, v, mask=None, seed=None, alibi=None, sinks=None, *, scale=None, causal=False, softcap=0.0,
                  kv_groups=1, dropout_p=0.0, mask_fill=None, window_left=-1, window_right=-1,
                  block_sparse=False, window_pad=False, approx=""):
        if alibi is not None or window_left >= 0 or window_right >= 0 or dropout_p or window_pad or sinks is not None:
            raise ValueError("attnfuse: a structured or dropout op reached the ONNX translation")
        head_dim = q.shape[-1]
        if scale is None:
            scale = float(head_dim) ** -0.5
        if mask is not None:  # onnxruntime wants the mask's query axis spelled out
            lq = op.Slice(op.Shape(q), [2], [3])
            lk = op.Slice(op.Shape(k), [2], [3])
            mask = op.Expand(mask, op.Concat(op.Constant(value_ints=[1, 1]), lq, lk, axis=0))
        out, _, _, _ = op.Attention(q, k, v, mask, is_causal=int(causal), scale=float(scale),
                                    softcap=float(softcap), q_num_heads=int(q.shape[1]),
                                    kv_num_heads=int(k.shape[1]))
        return out, op.ConstantOfShape(op.Constant(value_ints=[0]))  # row statistics: read by the backward only

    def attention_nonpad(q, k, v, kv_lengths, *, scale=None, causal=False, softcap=0.0, kv_groups=1):
        if scale is None:
            scale = float(q.shape[-1]) ** -0.5
        out, _, _, _ = op24.Attention(q, k, v, None, None, None, op.Cast(kv_lengths, to=7),  # 7: INT64
                                      is_causal=int(causal), scale=float(scale), softcap=float(softcap),
                                      q_num_heads=int(q.shape[1]), kv_num_heads=int(k.shape[1]))
        return out

    return {torch.ops.attnfuse.attention.default: attention,
            torch.ops.attnfuse.attention_nonpad.default: attention_nonpad}


def save(ep: torch.export.ExportedProgram, path: str | pathlib.Path) -> pathlib.Path:
    """Write ``ep`` (already lowered to plain op calls) as an ONNX model at ``path``."""
    require()
    path = pathlib.Path(path)
    nonpad = any(n.target is torch.ops.attnfuse.attention_nonpad.default for n in ep.graph.nodes)
    # the exporter's graph optimizer fuses rotary embeddings into opset 23's RotaryEmbedding, which
    # onnxruntime rejects once the sequence length is dynamic: a dynamic program is written unoptimized
    dynamic = any(isinstance(s, torch.SymInt) for n in ep.graph.find_nodes(op="placeholder")
                  if isinstance(n.meta.get("val"), torch.Tensor) for s in n.meta["val"].shape)
    program = torch.onnx.export(ep, dynamo=True, opset_version=OPSET + nonpad, optimize=not dynamic,
                                custom_translation_table=_translation(), verbose=False)
    program.save(str(path))
    return path
