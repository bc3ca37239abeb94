"""The scores chain around a softmax: up to the ``q @ k`` matmul through scales, a softcap and mask terms
(`walk_up`), down to the ``p @ v`` matmul through casts and dropout (`walk_down`), and an attention-sink
column concatenated to the scores (`sink_form`).  Each walk collects the nodes it crosses into the match's
region and returns a `Miss` with a reason where the chain is not the attention pattern.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from .._sizes import hint
from ._canon import canon, reaches_matmul, scalar
from ._graph import arg, eq, name, val
from ._records import MaskTerm, Miss
from .effects import dead

_LARGE_NEGATIVE = -1e4


def op_name(node: fx.Node) -> str:
    """What a node calls, for a reason sentence (no object addresses: reports stay stable between runs)."""
    return name(node) or node.op


def walk_down(sm: fx.Node, region: set, memo: dict, drop: str = "") -> tuple[fx.Node, float] | Miss:
    """Down from the softmax to ``p @ v``; ``drop`` ("first" / "last"): the sink column that a slice must drop."""
    p, dropout_p = sm, 0.0
    while True:
        users = [u for u in p.users if not dead(u, memo)]
        if len(users) != 1:
            others = ", ".join(u.name for u in users)
            return Miss(sm, "the attention probabilities are also used by {} (e.g. output_attentions=True), "
                            "so they must be materialized", others)
        u = users[0]
        op = canon(u)
        if op.kind in ("cast", "identity", "dropout") and op.args[0] is p:
            dropout_p = op.args[1] if op.kind == "dropout" else dropout_p
        elif drop and (op.kind == "getitem" or name(u) in ("narrow", "slice")) and u.args[0] is p:
            if not _drops_column(u, drop):
                return Miss(sm, "the softmax over [scores, sink] is sliced by {} ({}), which does not drop exactly the "
                                "{} (sink) column", u.name, op_name(u), drop)
            drop = ""
        elif op.kind == "matmul" and op.args[0] is p and drop:
            return Miss(sm, "the sink column concatenated to the scores is kept in the probabilities that reach "
                            "{}: not an attention sink (the sink's value would be read as a key)", u.name)
        elif op.kind == "matmul" and op.args[0] is p:
            return u, dropout_p
        else:
            return Miss(sm, "the softmax output feeds {} ({}), not a probabilities @ values matmul", u.name,
                        op_name(u))
        region.add(u)
        p = u


def _drops_column(node: fx.Node, side: str) -> bool:
    """Whether ``node`` (``x[..., :-1]`` / ``x[..., 1:]``, ``narrow``, ATen ``slice``) drops exactly the ``side``
    ("first" / "last") column of its input's last axis and nothing else."""
    x = node.args[0]
    nd, length = val(x).dim(), val(x).shape[-1]
    if name(node) == "getitem":
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if Ellipsis in index:
            if index.count(Ellipsis) != 1 or index[-1] is Ellipsis:
                return False
            rest, last = [i for i in index[:-1] if i is not Ellipsis], index[-1]
        elif len(index) == nd:
            rest, last = list(index[:-1]), index[-1]
        else:
            return False
        if any(i != slice(None) for i in rest) or not isinstance(last, slice) or last.step not in (None, 1):
            return False
        start, stop = last.start, last.stop
    else:
        dim = arg(node, 1, "dim", 0)
        if not isinstance(dim, int) or dim % nd != nd - 1:
            return False
        start = arg(node, 2, "start", None)
        if name(node) == "narrow":
            size = arg(node, 3, "length")
            stop = start + size if isinstance(start, int) and isinstance(size, (int, torch.SymInt)) else None
        else:
            stop = arg(node, 3, "end", None)
            if arg(node, 4, "step", 1) != 1:
                return False

    def at(bound: Any, default: Any) -> Any:
        bound = default if bound is None else bound
        return length + bound if isinstance(bound, int) and bound < 0 else bound

    lo, hi = at(start, 0), at(stop, length)
    if isinstance(hi, int) and hi > 2**60:  # ATen's slice(..., end=INT64_MAX)
        hi = length
    want = (1, length) if side == "first" else (0, length - 1)
    return eq(lo, want[0]) and eq(hi, want[1])


def _max_shift(x: fx.Node) -> tuple[fx.Node, set] | None:
    """``c - c.max(-1, keepdim=True).values`` (or ``amax``; ``sub`` or ``add(c, neg(m))``): (c, the shift's nodes).
    Softmax is shift-invariant along its axis, so the shift can be dropped wherever the max is finite."""
    if name(x) == "sub" and len(x.args) == 2:
        c, m, nodes = x.args[0], x.args[1], {x}
    elif name(x) == "add" and len(x.args) == 2 and isinstance(x.args[1], fx.Node) and name(x.args[1]) == "neg":
        c, m, nodes = x.args[0], x.args[1].args[0], {x, x.args[1]}
    else:
        return None
    while isinstance(m, fx.Node) and name(m) == "detach":
        nodes.add(m)
        m = m.args[0]
    if not isinstance(m, fx.Node) or not isinstance(c, fx.Node):
        return None
    if name(m) == "getitem" and m.args[1] == 0 and isinstance(m.args[0], fx.Node) and name(m.args[0]) == "max":
        nodes.add(m)
        m = m.args[0]
    elif name(m) != "amax":
        return None
    nd = val(c).dim()
    dim, keep = arg(m, 1, "dim"), arg(m, 2, "keepdim", False)
    dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    if m.args[0] is not c or not keep or len(dims) != 1 or not isinstance(dims[0], int) or dims[0] % nd != nd - 1:
        return None
    return c, nodes | {m}


def _query_constant(node: Any, axis: int = -2, depth: int = 16) -> bool:
    """Whether ``node`` is provably constant along ``axis`` (counted from the end): it broadcasts along it
    through expands, casts and unit-dim views (``reshape(1, -1, 1, 1).expand(B, -1, Lq, 1)``)."""
    while depth > 0 and isinstance(node, fx.Node):
        v = val(node)
        if not isinstance(v, torch.Tensor):
            return False
        nd = v.dim()
        if -axis > nd or eq(v.shape[axis], 1):
            return True
        op = canon(node)
        inner = op.args[0] if op.args else None
        if op.kind in ("cast", "identity", "expand"):  # expand aligns from the right
            pass
        elif op.kind == "unsqueeze" and isinstance(op.args[1], int):
            at = op.args[1] % nd
            axis = axis + 1 if at > nd + axis else axis  # a dim inserted after ours
        elif op.kind in ("reshape", "getitem") and isinstance(inner, fx.Node) and isinstance(val(inner), torch.Tensor):
            if op.kind == "getitem" and not all(i is None or i is Ellipsis or i == slice(None) for i in (
                    op.args[1] if isinstance(op.args[1], tuple) else (op.args[1],))):
                return False
            before, after = [d for d in val(inner).shape if not eq(d, 1)], [d for d in v.shape if not eq(d, 1)]
            if len(before) != len(after) or not all(eq(a, b) for a, b in zip(before, after)):
                return False
            later = sum(1 for d in v.shape[nd + axis + 1:] if not eq(d, 1))  # non-unit dims after ours
            dims = [i for i, d in enumerate(val(inner).shape) if not eq(d, 1)]
            axis = dims[len(dims) - 1 - later] - val(inner).dim()
        else:
            return False
        node, depth = inner, depth - 1
    return False


def sink_form(sm: fx.Node, x: fx.Node, region: set) -> tuple[fx.Node, fx.Node, str] | Miss | None:
    """softmax over ``cat([chain, sink], -1)`` (or ``[sink, chain]``), optionally shifted by the row max:
    (chain, the (B, H, Lq, 1) sink column, its side), the cat and shift joining ``region``; None if not this form."""
    shift = _max_shift(x)
    c, nodes = shift if shift else (x, set())
    if name(c) != "cat":
        return None
    parts = arg(c, 0, "tensors")
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not all(isinstance(t, fx.Node) for t in parts):
        return None
    nd = val(c).dim()
    dim = arg(c, 1, "dim", 0)
    if not isinstance(dim, int) or dim % nd != nd - 1:
        return None
    reach = [reaches_matmul(t) for t in parts]
    if reach == [True, False]:
        chain, col, side = parts[0], parts[1], "last"
    elif reach == [False, True]:
        chain, col, side = parts[1], parts[0], "first"
    else:
        return None
    if not eq(val(col).shape[-1], 1):
        return Miss(sm, "the softmax runs over the scores concatenated with {} columns of {}: only one sink column "
                        "per row is an attention sink", hint(val(col).shape[-1]), col.name)
    if nd != 4:
        return Miss(sm, "attention sinks are fused on 4-D (batch, heads, queries, keys) scores; these are {}-D", nd)
    if not _query_constant(col):
        return Miss(sm, "the column {} concatenated to the scores is not provably constant along the queries: a "
                        "per-head attention sink varies at most along batch and heads", col.name)
    region |= nodes | {c}
    return chain, col, side


def walk_up(sm: fx.Node, x: fx.Node, region: set) -> dict | Miss:
    """Up from the softmax input ``x`` to the scores matmul: {"qk": the matmul, "masks", "softcap", "scale" (the
    constant factor), "runtime" (run-time factors), "parts" (for the pattern name)}, or a `Miss`."""
    st = {"masks": [], "softcap": 0.0, "scale": 1.0, "runtime": [], "parts": []}
    phase = 0  # 0: masks allowed; 1: after the softcap; 2: in the scales before it
    while True:
        op = canon(x)
        region.add(x)
        if op.kind in ("cast", "identity"):
            x = op.args[0]
            continue
        if op.kind == "matmul":
            st["qk"] = x
            return st
        if op.kind == "scale":
            inner, f, divide = op.args
            if phase == 0 and canon(inner).kind == "tanh":
                cap = _softcap(inner, f, divide)
                if not cap:
                    return Miss(sm, "{} * tanh(...) is not a softcap c * tanh(s / c) with the same c", f)
                st["softcap"], phase = cap[0], 1
                region.update(cap[1])
                x = cap[2]
                st["parts"].append("softcap")
                continue
            if isinstance(f, float):
                st["scale"] = st["scale"] / f if divide else st["scale"] * f
            else:
                st["runtime"].append((f, divide))
            phase, x = 2, inner
            continue
        if op.kind in ("masked_fill", "where") and phase == 2 and (st["runtime"] or st["scale"] <= 0):
            return Miss(sm, "a where/masked_fill mask is applied before a scale not known to be positive (run-time, "
                            "tensor or <= 0): -inf * 0 is NaN and -inf * -1 is +inf, so it cannot move before the mask")
        if op.kind in ("add", "masked_fill", "where") and phase:
            return Miss(sm, "a mask is applied before the {}; attnfuse expects scale, softcap, then masks",
                        "softcap" if phase == 1 else "scale")
        if op.kind in ("add", "masked_fill", "where"):
            term = _mask_term(sm, op)
            if not term:
                return term
            st["masks"].append(term[0])
            st["parts"].append(term[0].kind == "add" and "bias" or "mask")
            x = term[1]
            continue
        return Miss(sm, "{} ({}) between the scores and the softmax is not part of the attention pattern",
                    x.name, op_name(x))


def _fill(x: Any) -> float | None:
    f = scalar(x)
    return f if isinstance(f, float) else None


def _mask_term(sm: fx.Node, op) -> tuple[MaskTerm, fx.Node] | Miss:
    if op.kind == "add":
        a, b = op.args
        if isinstance(b, (int, float)) or scalar(b) is not None:
            return Miss(sm, "a scalar is added to the scores; attnfuse does not fold constant shifts")
        chain, mask = (a, b) if reaches_matmul(a) else (b, a)
        return MaskTerm("add", mask), chain
    if op.kind == "masked_fill":
        chain, mask, value = op.args
        fill = _fill(value)
        if fill is None or fill > _LARGE_NEGATIVE:
            return Miss(sm, "masked_fill with {} is not a mask (needs -inf, finfo.min or a value <= -1e4)", value)
        return MaskTerm("keep", mask, negate=True, fill=fill), chain
    cond, a, b = op.args
    for chain, other, negate in ((a, b, False), (b, a, True)):
        if reaches_matmul(chain):
            fill = _fill(other)
            if fill is None or fill > _LARGE_NEGATIVE:
                return Miss(sm, "where(..., {}) is not a mask (needs -inf, finfo.min or a value <= -1e4)", other)
            return MaskTerm("keep", cond, negate=negate, fill=fill), chain
    return Miss(sm, "where() between the scores and the softmax does not select the scores")


def _softcap(tanh_node: fx.Node, c: Any, divide: bool):
    # cap · tanh(s / cap) == cap · tanh(s · (1/cap))
    if divide or not isinstance(c, float):
        return None
    inner = canon(canon(tanh_node).args[0])
    if inner.kind != "scale" or not isinstance(inner.args[1], float):
        return None
    d = inner.args[1] if inner.args[2] else 1.0 / inner.args[1]
    if not math.isclose(d, c, rel_tol=1e-6):
        return None
    return c, {tanh_node, canon(tanh_node).args[0]}, inner.args[0]
