"""A scale applied after the masks, moved before them (the rule of `canonicalize`'s ``_SCALE_RULES``).

    (s + B) * c                  =  s * c + B * c                    c: a number, a run-time scalar or a tensor
                                                                     scale (a per-head temperature)
    where(K, s, fill) * c        =  where(K, s * c, fill * c)        c: a constant > 0 only
    masked_fill(s, M, fill) * c  =  masked_fill(s * c, M, fill * c)  (and ``/ c`` alike, through any number of
                                                                     mask terms down to the scores)

The matcher reads one order (scores, scale, softcap, masks); this puts the scale where it expects it.

Why a canonicalize rule and not `_chain.walk_up`: the matcher and the rewrite stay as they are (no scaled
biases or fills to build in the rewrite), and like every canonicalize rule this one is recorded, so the
backend keeps it only inside a fused region: a site left alone runs its original graph, bit for bit.

``fill * c`` is computed here, once, the way eager computes it: ``where`` stores the fill in the scores'
dtype (-1e9 is -inf in fp16), then the product is taken in fp32 for fp16/bf16/fp32 (c rounded to fp32), in
fp64 for fp64, and rounded back.  A division divides on the CPU; on CUDA ATen multiplies by the fp32
reciprocal of a CPU scalar, so that is what is computed for a CUDA tensor.  Elsewhere (or with a divisor
that lives on the GPU) a finite fill is left alone.  -inf * c is -inf for c > 0 on every device.

A keep term (where / masked_fill) moves only below a constant c > 0: -inf * 0 is NaN and -inf * -1 is +inf,
so a run-time or tensor scale (sign unknown at trace time) after one stays as written, and the matcher
reports the site.  An additive term takes any scale (both sides are the same products, rounded
differently; the op adds the scaled bias in fp32, as it adds any bias).  A scaled fill that is no longer
<= -1e4 (``where(K, s, -1e4) / 8``) is not read as a mask by the matcher: that site is reported, not fused.

Declined (nothing rewritten) unless every node between the scale and the scores has one user, the same
floating dtype (a bias of another dtype would round differently once scaled), and the scale's result
reaches a softmax through the chain.
"""

from __future__ import annotations

import contextlib
import math
import operator
from typing import Any

import torch
import torch.fx as fx

from ._canon import canon, reaches_matmul, scalar
from ._graph import copy_meta, name, val

_MASKS = ("add", "masked_fill", "where")
_CHAIN = ("cast", "identity", "scale", "add", "masked_fill", "where")
_VIEWS = ("view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten", "unflatten")


def _to_softmax(node: fx.Node, hops: int = 16) -> bool:
    """Whether ``node`` feeds a softmax through single-user chain nodes (masks, scales, casts, views)."""
    for _ in range(hops):
        if len(node.users) != 1:
            return False
        (user,) = node.users
        op = canon(user)
        if op.kind == "softmax":
            return op.args[0] is node
        if op.kind not in _CHAIN and name(user) not in _VIEWS:
            return False
        node = user
    return False


def scaled_fill(fill: float, c: float, divide: bool, dtype: torch.dtype, device: torch.device) -> float | None:
    """``where(K, s, fill) * c`` (``/ c``) at a masked entry, as eager computes it on ``device`` for scores of
    ``dtype`` (module docstring); None where that is not known."""
    stored = torch.tensor(fill, dtype=dtype)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    a, b = stored.to(opmath), torch.tensor(c, dtype=opmath)
    if not divide:
        out = a * b
    elif device.type == "cpu":
        out = a / b
    elif device.type == "cuda":
        out = a * (torch.tensor(1.0, dtype=opmath) / b)
    elif bool(torch.isneginf(stored)):
        return float("-inf")
    else:
        return None
    return float(out.to(dtype))


def _plan(x: fx.Node, c: Any, divide: bool, factor: Any) -> tuple[list, fx.Node] | None:
    """The mask terms from ``x`` down to the scores, each (kind, node, what it needs), and the node below
    them; None if one of them cannot take the scale."""
    dtype = val(x).dtype if isinstance(val(x), torch.Tensor) else None
    if dtype is None or not dtype.is_floating_point:
        return None
    positive = isinstance(c, float) and math.isfinite(c) and c > 0
    on_gpu = isinstance(factor, fx.Node) and isinstance(val(factor), torch.Tensor) and val(factor).device.type != "cpu"
    steps = []
    while canon(x).kind in _MASKS:
        op = canon(x)
        if len(x.users) != 1 or getattr(val(x), "dtype", None) != dtype:
            return None
        if op.kind == "add":
            a, b = op.args
            chain, bias = (a, b) if reaches_matmul(a) else (b, a)
            if not reaches_matmul(chain) or not isinstance(bias, fx.Node) or scalar(bias) is not None \
                    or getattr(val(bias), "dtype", None) != dtype:
                return None
            steps.append(("add", x, (bias, chain is a, None)))
            x = chain
            continue
        if not positive:
            return None  # a keep term under a scale whose sign is not known to be positive
        if op.kind == "masked_fill":
            chain, keep, value = op.args
            first = None
        else:
            keep, a, b = op.args
            chain, value, first = (a, b, True) if reaches_matmul(a) else (b, a, False)
        fill = scalar(value)
        if not isinstance(fill, float) or not reaches_matmul(chain):
            return None
        device = val(x).device
        new = None if on_gpu and math.isfinite(fill) else scaled_fill(fill, c, divide, dtype, device)
        if new is None:
            return None
        steps.append((op.kind, x, (keep, new, first)))
        x = chain
    return (steps, x) if steps else None


def rule(graph: fx.Graph, node: fx.Node) -> bool:
    # (s + B)·c = s·c + B·c;  where(K, s, f)·c = where(K, s·c, f·c) for a constant c > 0 (module docstring)
    op = canon(node)
    if op.kind != "scale" or node.op not in ("call_function", "call_method"):
        return False
    x, c, divide = op.args
    if canon(x).kind not in _MASKS or not _to_softmax(node):
        return False
    factor = next((a for a in node.args[:2] if a is not x), None)
    if factor is None or node.kwargs.get("rounding_mode") is not None:
        return False
    plan = _plan(x, c, divide, factor)
    if plan is None:
        return False
    steps, base = plan
    fn = operator.truediv if divide else operator.mul
    with graph.inserting_before(node):
        cur = graph.call_function(fn, (base, factor))
        for kind, _, (what, new, first) in reversed(steps):
            if kind == "add":  # what: the bias; new: whether the scores were the left operand
                bias = graph.call_function(fn, (what, factor))
                cur = graph.call_function(operator.add, (cur, bias) if new else (bias, cur))
            elif kind == "masked_fill":
                cur = graph.call_function(torch.masked_fill, (cur, what, new))
            else:
                cur = graph.call_function(torch.where, (what, cur, new) if first else (what, new, cur))
    mode = getattr(val(base), "fake_mode", None)  # where(K, s, fill) wraps the fill in a tensor: fake it too
    with mode if mode is not None else contextlib.nullcontext():
        copy_meta(node, None, None, cur)
    node.replace_all_uses_with(cur)
    graph.erase_node(node)
    for _, old, _ in steps:  # each fed only the next one down, now erased
        graph.erase_node(old)
    return True


RULES = dict.fromkeys(("mul", "div", "truediv"), rule)
