"""Softmax written out by hand, read as ``softmax`` (rules of `canonicalize`'s ``_SOFTMAX_RULES``).

* ``e / e.sum(d, keepdim=True)`` with ``e = exp(x - m)``, ``m`` the row max of ``x`` over ``d`` with keepdim
  (``amax(x, d, keepdim=True)``, ``x.max(d, keepdim=True).values``, ``torch.max(x, d, True)[0]``), optionally
  ``.detach()``-ed  =  ``softmax(x, d)``.  The sum may read a second ``exp(x - m')`` node equal to the first.
* ``log_softmax(x, d).exp()`` / ``torch.exp(log_softmax(x, d))``  =  ``softmax(x, d)``.

Like ``exp(x - logsumexp(x))`` they are rewritten only where the result weights a matmul (``p @ v``), and the
backend keeps a rewrite only inside a fused region.  Unlike it they are softmax on every row, so the result
carries no `canonicalize.LOGSUMEXP` flag: a row whose every score is -inf is NaN in both (``-inf - -inf``), a
row of equal huge finite scores is uniform in both (``x - max`` is 0).  Every axis (max, sum, log_softmax)
must be the same one, negative axes normalized.

Not softmax, and left alone: ``exp(x) / exp(x).sum()`` without the max (exp overflows to inf and the row to
NaN in eager where softmax does not), a max over another axis or the whole tensor (rows far below it
underflow to 0/0), a sum over another axis or another exp, a max of another tensor.  Such a near miss that
weights a matmul is recorded in ``gm.meta[SPELLING_MISSES]`` as (node, reason), and the matcher reports it.

Gradients: with one ``m`` in numerator and denominator (or two with the same spelling and the same
``detach``), the derivative through ``m`` cancels and autograd of the spelled form is softmax's; a sum over
an ``exp(x - m')`` whose ``m'`` is spelled or detached differently is a near miss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ._canon import feeds_left_matmul
from ._graph import arg, copy_meta, name, val

SPELLING_MISSES = "attnfuse_spelling_misses"  # gm.meta key: [(node, reason)] of softmax spellings left alone

_CALLS = ("call_function", "call_method")


def _is(node: Any, *names: str) -> bool:
    return isinstance(node, fx.Node) and node.op in _CALLS and name(node) in names


def _axis(dim: Any, ndim: int) -> int | None:
    """``dim`` as one non-negative axis of an ``ndim``-D tensor, else None (no dim, several, out of range)."""
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    if isinstance(dim, bool) or not isinstance(dim, int) or not -ndim <= dim < ndim:
        return None
    return dim % ndim


def _ndim(node: Any) -> int:
    v = val(node)
    return v.dim() if isinstance(v, torch.Tensor) else -1


def _undetach(node: Any) -> tuple[Any, bool]:
    """``node`` read through ``.detach()`` calls, and whether there was one."""
    detached = False
    while _is(node, "detach") and node.args:
        node, detached = node.args[0], True
    return node, detached


def _row_max(m: Any) -> tuple[Any, int | None, bool, str] | str:
    """(x, axis, keepdim, signature) when ``m`` is a max of ``x`` over one axis, else a reason.

    ``axis`` is None for a max over several axes or the whole tensor.  ``signature`` tells spellings with other
    gradients apart (``amax`` splits it between ties, ``max.dim`` gives it to one; ``detach`` stops it)."""
    m, detached = _undetach(m)
    if _is(m, "getitem") and m.args[1] == 0 and _is(m.args[0], "max"):
        op, kind = m.args[0], "max"
    elif _is(m, "amax"):
        op, kind = m, "amax"
    else:
        return "the value subtracted before exp is not the row max (amax / max(dim).values)"
    x, detached_x = _undetach(arg(op, 0, "input", arg(op, 0, "self")))
    dim = arg(op, 1, "dim", () if kind == "amax" else None)
    keepdim = arg(op, 2, "keepdim", False)
    return x, _axis(dim, _ndim(x)), bool(keepdim), f"{kind}{'-detached' if detached or detached_x else ''}"


def _shifted_exp(e: fx.Node) -> tuple[fx.Node, Any, str] | str:
    """(x, the row max's reading (`_row_max`), its node) when ``e`` is ``exp(x - m)``, else a reason."""
    sub = e.args[0] if e.args else None
    if not _is(sub, "sub") or len(sub.args) != 2 or arg(sub, 2, "alpha", 1) != 1:
        return ("exp(x) / exp(x).sum() without subtracting the row max is not softmax: exp overflows to inf "
                "(and the row to NaN) in eager where softmax does not")
    x, m = sub.args
    rm = _row_max(m)
    if isinstance(rm, str):
        return rm
    if not isinstance(x, fx.Node) or rm[0] is not _undetach(x)[0]:
        return "the max subtracted before exp is taken of another tensor than the one exponentiated"
    return x, rm, m


def _softmax_of(div: fx.Node) -> tuple[fx.Node, int] | str | None:
    """(x, axis) when ``div`` is ``exp(x - max) / exp(x - max).sum(axis)``, a reason for a near miss, or None
    when it is no softmax spelling at all."""
    if len(div.args) != 2 or div.kwargs.get("rounding_mode") is not None:
        return None
    e, total = div.args
    if not _is(e, "exp") or not _is(total, "sum"):
        return None
    e2 = arg(total, 0, "input", arg(total, 0, "self"))
    if not _is(e2, "exp"):
        return None
    num, den = _shifted_exp(e), _shifted_exp(e2)
    for r in (num, den):
        if isinstance(r, str):
            return r
    (x, (_, axis, keepdim, sig), m), (x2, (_, axis2, keepdim2, sig2), m2) = num, den
    nd = _ndim(x)
    if axis is None or not keepdim:
        return ("the max subtracted before exp is not over one axis with keepdim=True: rows far below it "
                "underflow to 0/0, which softmax does not")
    total_axis = _axis(arg(total, 1, "dim"), nd)
    if total_axis is None or not arg(total, 2, "keepdim", False) or total.kwargs.get("dtype") is not None:
        return "the sum of the exps is not over one axis with keepdim=True (and the input's dtype)"
    if total_axis != axis:
        return f"the max is over axis {axis} but the sum over axis {total_axis}: not a softmax"
    if x2 is not x or (m2 is not m and (sig2, axis2, keepdim2) != (sig, axis, keepdim)):
        return "the sum is over another exp(x - max) than the numerator's: not a softmax (or not its gradient)"
    outs = [val(n) for n in (x, div)]  # the shapes agree: every reduction kept its axis
    if not all(isinstance(o, torch.Tensor) for o in outs) or outs[0].dtype != outs[1].dtype:
        return "exp(x - max) / sum changes the dtype of x: not a softmax"
    return x, axis


def _record(graph: fx.Graph, node: fx.Node, reason: str) -> None:
    gm = graph.owning_module
    if gm is not None:
        gm.meta.setdefault(SPELLING_MISSES, []).append((node, reason))


def _replace(graph: fx.Graph, node: fx.Node, x: fx.Node, axis: int, spelled: list[fx.Node]) -> None:
    with graph.inserting_before(node):
        out = graph.call_function(torch.softmax, (x, axis))
    copy_meta(node, x, None, out)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    erased = True
    while erased:  # the spelled-out nodes that fed only the division (a getitem before its max)
        erased = False
        for n in spelled:
            if n.graph is graph and not getattr(n, "_erased", False) and not n.users:
                graph.erase_node(n)
                erased = True


def _chain(e: fx.Node) -> list[fx.Node]:
    """``e`` and the nodes of its ``x - max`` (as `_shifted_exp` read them), not x itself."""
    sub = e.args[0]
    out, m = [e, sub], sub.args[1]
    while _is(m, "detach"):
        out.append(m)
        m = m.args[0]
    if _is(m, "getitem"):
        out.append(m)
        m = m.args[0]
    out.append(m)
    y = arg(m, 0, "input", arg(m, 0, "self"))
    while _is(y, "detach") and y is not sub.args[0]:
        out.append(y)
        y = y.args[0]
    return out


def div_rule(graph: fx.Graph, node: fx.Node) -> bool:
    # exp(x - max(x, d)) / exp(x - max(x, d)).sum(d, keepdim=True) = softmax(x, d), when it weights a matmul
    if node.op not in _CALLS:
        return False
    found = _softmax_of(node)
    if found is None or not feeds_left_matmul(node):
        return False
    if isinstance(found, str):
        _record(graph, node, found)
        return False
    x, axis = found
    e, total = node.args
    e2 = arg(total, 0, "input", arg(total, 0, "self"))
    _replace(graph, node, x, axis, [total, *_chain(e2), *_chain(e)])
    return True


def exp_rule(graph: fx.Graph, node: fx.Node) -> bool:
    # exp(log_softmax(x, d)) = softmax(x, d), when it weights a matmul
    ls = node.args[0] if node.args and node.op in _CALLS else None
    if not _is(ls, "log_softmax", "_log_softmax") or not feeds_left_matmul(node):
        return False
    x = arg(ls, 0, "input", arg(ls, 0, "self"))
    axis = _axis(arg(ls, 1, "dim"), _ndim(x))
    if axis is None or ls.kwargs.get("dtype") is not None or arg(ls, 2, "half_to_float", False) is True:
        return False
    if not all(isinstance(val(n), torch.Tensor) for n in (x, node)) or val(x).dtype != val(node).dtype:
        return False
    _replace(graph, node, x, axis, [ls])
    return True


RULES = {"exp": exp_rule, **dict.fromkeys(("div", "truediv"), div_rule)}
