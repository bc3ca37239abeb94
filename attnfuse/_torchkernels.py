"""PyTorch's kernels as candidates for one matched site: whether ``sdpa`` / ``flex`` compute it exactly (the
planner's ``limits``), and the match the rewriter emits when one of them is chosen.

`limits` asks each implementation's own rules (`attnfuse.kernels.sdpa.applies` per backend of the site's device,
`attnfuse.kernels.flex.applies`) with the match's facts; a site shape they share with attnfuse's op wrappers but
not with PyTorch's kernels (``nn.MultiheadAttention``, sinks, the unfold spelling's padded keys, dropout, an
approximate table) is declined here with the reason.  `chosen` turns the plan's choice into the op's ``impl``
and, for ``flex`` over a proven packed-document / prefix-LM mask (`attnfuse.passes.masks.FlexMask`), swaps the
dense mask term for the op's ``doc`` tensor and the band the analysis proved for it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .passes._graph import val
from .passes._records import AttentionMatch
from .passes.rewrite import mask_dtype

__all__ = ["chosen", "flex_mask_for", "limits", "plan_structure", "training", "tunable"]


def training(m: AttentionMatch) -> bool:
    """Whether the site's inputs need gradients in this graph (the fake tensors' ``requires_grad``)."""
    return any(bool(getattr(val(o.node), "requires_grad", False)) for o in (m.q, m.k, m.v))


def _common(m: AttentionMatch) -> str | None:
    if m.form == "mha":
        return "nn.MultiheadAttention / TransformerEncoderLayer sites run through attnfuse's op wrapper (attnfuse._mha)"
    if m.sinks is not None:
        return "PyTorch's attention kernels have no attention sinks"
    if m.window_pad:
        return "the unfold spelling's zero-padded keys run in attnfuse's window kernels only"
    if m.dropout_p:
        return "dropout runs in attnfuse's kernels (their seeded mask); PyTorch's would draw another"
    if m.bucketed or m.approx:
        return "this site runs attnfuse's own kernels (a bucketed window or a per-call approximate table)"
    return None


def flex_mask_for(m: AttentionMatch, flex_mask: Any) -> Any:
    """The analysis' `FlexMask` where the op can take it, else None.  An SDPA call's rows with no visible key are
    0, which `attnfuse.ops.attention_sdpa` finds from the mask tensor and the band alone: with another mask term
    beside the documents a whole document can be masked, which it would not see, so such a site keeps its dense
    mask (FlexAttention then reads that)."""
    if flex_mask is not None and m.form == "sdpa" and flex_mask.terms:
        return None
    return flex_mask


def limits(m: AttentionMatch, flex_mask: Any, shape: dict[str, Any]) -> tuple[dict[str, str | None], str]:
    """({"sdpa": why not or None, "flex": ...}, the SDPA backend to use) for ``m`` as the plan will see it.

    ``flex_mask``: the analysis' `FlexMask` (None: FlexAttention runs the same masks as every kernel)."""
    common = _common(m)
    if common:
        return {"sdpa": common, "flex": common}, "cpu"
    try:
        from .kernels import flex, sdpa
    except ImportError as exc:  # a torch without FlexAttention, or a kernel module that failed to load
        why = f"PyTorch's kernels are not available here ({type(exc).__name__}: {exc})"
        return {"sdpa": why, "flex": why}, "cpu"

    q = val(m.q.node)
    mdt = mask_dtype(m)
    fill = next((t.fill for t in m.masks if t.kind == "keep"), None)
    facts = dict(device_type=q.device.type, dtype=q.dtype, head_dim=shape["head_dim"],
                 v_head_dim=shape["v_head_dim"], dropout_p=m.dropout_p, sinks=m.sinks is not None,
                 window_pad=m.window_pad)
    backend, why_sdpa = "cpu", None
    for candidate in sdpa.backends_for(q.device.type):
        why = sdpa.applies(candidate, **facts, softcap=m.softcap, alibi=m.alibi is not None,
                           window_left=m.window_left, window_right=m.window_right, block_sparse=m.block_sparse,
                           doc=False, mask_dtype=mdt, mask_fill=fill, training=training(m))
        if why is None:
            backend, why_sdpa = candidate, None
            break
        why_sdpa = why_sdpa or f"sdpa ({candidate}): {why}"
    why_flex = flex.applies(**facts, q_len=shape["q_len"], kv_len=shape["kv_len"], doc=flex_mask is not None)
    return {"sdpa": why_sdpa, "flex": why_flex}, backend


def chosen(kernel: str, config: dict[str, Any], m: AttentionMatch, mask_report: dict[str, Any],
           flex_mask: Any) -> tuple[AttentionMatch, dict[str, Any]]:
    """The match to emit and the report's mask entry, for the chosen ``kernel`` (unchanged unless it is
    ``sdpa`` / ``flex``)."""
    if kernel not in ("sdpa", "flex"):
        return m, mask_report
    m = dataclasses.replace(m, impl=config["impl"], tiles="")
    if kernel != "flex" or flex_mask is None:
        return m, mask_report
    m = dataclasses.replace(m, masks=tuple(flex_mask.terms), doc=flex_mask.doc, causal=flex_mask.causal,
                            window_left=flex_mask.window_left, window_right=flex_mask.window_right,
                            block_sparse=False, alibi=m.alibi)
    report = {"kind": "+".join(flex_mask.kinds), "proof": list(flex_mask.proof),
              "dense_for_other_kernels": mask_report.get("kind")}
    if "window" in flex_mask.kinds:
        report["window"] = [flex_mask.window_left, 0 if flex_mask.causal else flex_mask.window_right]
    return m, report


def plan_structure(structure: dict[str, Any], lim: dict[str, str | None], backend: str, flex_mask: Any,
                   train: bool) -> dict[str, Any]:
    """The planner's ``structure`` with PyTorch's candidates' facts added."""
    out = {**structure, "limits": lim, "sdpa_backend": backend, "training": train}
    if flex_mask is not None:
        out["flex_mask"] = {"kinds": tuple(flex_mask.kinds), "window": (flex_mask.window_left, flex_mask.window_right),
                            "causal": flex_mask.causal}
    return out




def _mask_spec(terms, shape: dict[str, Any], dtype) -> tuple[tuple[int, ...], Any] | None:
    """(shape, dtype) of a synthetic mask like the op's for ``terms`` (timing only): a key vector stays one."""
    if not terms or dtype is None:
        return None
    dims = [list(val(t.node).shape) for t in terms]
    per_query = any(len(d) >= 2 and not (isinstance(d[-2], int) and d[-2] == 1) for d in dims)
    b, lq, lk = shape["batch"], shape["q_len"], shape["kv_len"]
    return ((b, 1, lq, lk) if per_query else (b, 1, 1, lk)), dtype


def tunable(m: AttentionMatch, shape: dict[str, Any], flex_mask: Any, mask_kind: str, spec: Any) -> Any:
    """The `attnfuse.autotune.Tunable` of a site: its shape, dtype, device, the op keywords its candidates share,
    a synthetic mask like its own, and FlexAttention's own masks where the analysis proved packed documents."""
    from .autotune import Tunable

    q = val(m.q.node)
    fill = next((t.fill for t in m.masks if t.kind == "keep"), None)
    kwargs = {"scale": m.scale, "causal": m.causal, "softcap": m.softcap, "kv_groups": m.kv_groups,
              "dropout_p": m.dropout_p, "mask_fill": fill, "window_left": m.window_left,
              "window_right": m.window_right, "block_sparse": m.block_sparse, "window_pad": m.window_pad}
    flex_kwargs = flex_spec = None
    if flex_mask is not None:
        flex_kwargs = {"causal": flex_mask.causal, "window_left": flex_mask.window_left,
                       "window_right": flex_mask.window_right, "block_sparse": False,
                       "mask_fill": next((t.fill for t in flex_mask.terms if t.kind == "keep"), None)}
        flex_spec = _mask_spec(flex_mask.terms, shape, torch.bool if all(
            t.kind == "keep" for t in flex_mask.terms) else q.dtype)
    return Tunable(shape=dict(shape), dtype=q.dtype, device=str(q.device), training=training(m), op_kwargs=kwargs,
                   mask=_mask_spec(m.masks, shape, mask_dtype(m)), alibi=m.alibi is not None,
                   sinks=m.sinks is not None, flex_kwargs=flex_kwargs, flex_doc=flex_mask is not None,
                   flex_mask=flex_spec, structure=mask_kind, spec=spec)
