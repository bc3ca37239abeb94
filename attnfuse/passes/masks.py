"""Mask analysis: which masks of a match are plain causal masks.

Entry point: `analyze(gm, match, example_inputs) -> (AttentionMatch, dict)`.

A mask term whose value does not depend on the model's inputs (it is built
from buffers, constants and shapes only -- nanoGPT's ``tril`` buffer slice,
a ``torch.ones(T, T).tril()``, HF's arange-based causal mask) is evaluated
once on the example inputs.  If it equals the lower-triangular mask and
``q_len == kv_len`` holds for every shape, the term becomes ``causal=True``.
This assumes mask buffers are not mutated after compilation (they never are
in nanoGPT / HF models).  Every other mask stays a tensor operand; finer
structure (windows, block sparsity, padding lengths) is the mask issue's work.
The returned dict is the report's ``Site.mask``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from .canonicalize import name, val
from .match import AttentionMatch, MaskTerm, _eq, _Graph, _hint, _is_state, _shape

_SHAPE_READS = ("size", "sym_size", "dim", "numel", "getattr", "sym_numel")


def _static_value(gm: fx.GraphModule, node: fx.Node, example_inputs: Sequence[Any]) -> torch.Tensor | None:
    """Evaluate ``node`` on the example inputs if it depends on no input values (only shapes / state)."""
    anc = _Graph.ancestors(node) | {node}
    for n in anc:
        if n.op == "placeholder" and isinstance(val(n), torch.Tensor) and not _is_state(n):
            # the mask is an input itself, or is computed from an input's values: run-time data
            if n is node or any(u in anc and name(u) not in _SHAPE_READS for u in n.users):
                return None
    sub, env = fx.Graph(), {}
    args = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return None
    for i, n in enumerate(placeholders):
        if n in anc:
            x = example_inputs[i]
            if isinstance(x, torch._subclasses.FakeTensor):
                return None
            # Evaluate at the example sizes: a SymInt would put guards on the user's shapes.
            args.append(_hint(x) if isinstance(x, torch.SymInt) else x)
    for n in gm.graph.nodes:
        if n in anc:
            env[n] = sub.node_copy(n, lambda x: env[x])
    sub.output(env[node])
    try:
        with torch.no_grad():
            out = fx.GraphModule(gm, sub)(*args)
    except Exception:  # noqa: BLE001 - a mask we cannot evaluate simply stays a tensor
        return None
    return out if isinstance(out, torch.Tensor) and not isinstance(out, torch._subclasses.FakeTensor) else None


def _keep_of(term: MaskTerm, value: torch.Tensor) -> torch.Tensor | None:
    if term.kind == "keep":
        keep = value.bool()
        return ~keep if term.negate else keep
    if not value.is_floating_point():
        return None
    keep = value == 0
    if not bool((keep | (value <= -1e4)).all()):
        return None
    return keep


def _is_causal(term: MaskTerm, value: torch.Tensor, lq: int, lk: int) -> bool:
    keep = _keep_of(term, value)
    if keep is None or keep.dim() < 2 or tuple(keep.shape[-2:]) != (lq, lk):
        return False
    flat = keep.reshape(-1, lq, lk)
    causal = torch.ones(lq, lk, dtype=torch.bool, device=keep.device).tril()
    return all(torch.equal(m, causal) for m in flat)


def analyze(gm: fx.GraphModule, m: AttentionMatch, example_inputs: Sequence[Any] | None):
    """Fold plain causal masks into ``causal=True``; describe the rest for the report."""
    qs, ks = _shape(m.q), _shape(m.k)
    remaining: list[MaskTerm] = []
    causal = m.causal
    for term in m.masks:
        # (MHA's inputs are (L, N, E): its masks are only described, `_mha.forward` applies them.)
        if example_inputs is not None and m.form != "mha" and _eq(qs[-2], ks[-2]):
            value = _static_value(gm, term.node, example_inputs)
            if value is not None and _is_causal(term, value, _hint(qs[-2]), _hint(ks[-2])):
                causal = True
                continue
        remaining.append(term)
    m = dataclasses.replace(m, causal=causal, masks=tuple(remaining))
    info: dict[str, Any] = {"kind": "none"}
    kinds = []
    if causal:
        kinds.append("causal")
    for term in remaining:
        v = val(term.node)
        kinds.append("bias" if term.kind == "add" else "bool")
        info.setdefault("tensors", []).append({
            "kind": "additive" if term.kind == "add" else "bool",
            "shape": [_hint(s) for s in v.shape], "dtype": str(v.dtype).replace("torch.", ""),
            **({"fill": term.fill} if term.kind == "keep" else {}),
            "requires_grad": bool(getattr(v, "requires_grad", False)),
        })
    if kinds:
        info["kind"] = "+".join(kinds)
    return m, info
