"""Reading q, k and v of a match: through permutes and scalar scales (`peel`), through a repeat along the
heads (`unrepeat`: grouped-query K/V), and whether their batch/head dims line up as the op reads them
(`heads_miss`).  A default scale written as a product of symbolic factors is recognized here too
(`is_default_scale`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .._sizes import hint
from ._canon import canon
from ._graph import eq, val
from ._records import Miss
from .effects import Effects


def compose(outer: tuple[int, ...], inner: tuple[int, ...]) -> tuple[int, ...]:
    """``x.permute(inner).permute(outer) == x.permute(compose(outer, inner))``."""
    return tuple(inner[i] for i in outer)


def peel(node: fx.Node, scales: bool, effects: Effects | None = None) -> tuple[fx.Node, tuple[int, ...], float, list]:
    """Walk up through permutes (and scalar scales): node == base.permute(perm) * c * runtime.

    The walk stops at a tensor written in place (``q = q.clone(); q.mul_(s)``): its value is the one
    after the write, not its source's.
    """
    perm = tuple(range(val(node).dim()))
    c, runtime = 1.0, []
    while True:
        if effects is not None and effects.written(node):
            return node, perm, c, runtime
        op = canon(node)
        if op.kind == "permute":
            perm = compose(perm, op.args[1])
        elif op.kind == "identity":
            pass
        elif op.kind == "scale" and scales and getattr(val(op.args[1]), "ndim", 0) == 0:  # a tensor stays q's / k's
            f, divide = op.args[1], op.args[2]
            if isinstance(f, float):
                c = c / f if divide else c * f
            else:
                runtime.append((f, divide))
        else:
            return node, perm, c, runtime
        node = op.args[0]


def unrepeat(node: fx.Node, axis: int = 1) -> tuple[fx.Node, int, str] | None:
    """If ``node`` repeats a 4-D K/V along its head ``axis``, return (un-repeated, groups, layout).

    ``axis`` is 1 for (B, H, T, D) and 2 for (B, T, H, D) K/V (Meta-Llama repeats before transposing).
    """
    op = canon(node)
    if op.kind == "repeat_interleave" and isinstance(op.args[1], int) and op.args[2] in (axis, axis - 4):
        return op.args[0], op.args[1], "interleave"
    if op.kind == "repeat" and len(op.args[1]) == 4 and all(r == 1 for i, r in enumerate(op.args[1]) if i != axis):
        reps = op.args[1][axis]
        return (op.args[0], reps, "tile") if isinstance(reps, int) and reps > 1 else None
    if op.kind != "reshape" or val(node).dim() != 4:
        return None
    # reshape(expand(base.unsqueeze(axis + 1))) that merges the new axis into ``axis``
    expand = op.args[0]
    if canon(expand).kind != "expand" or val(expand).dim() != 5:
        return None
    inner = canon(expand).args[0]
    ev, iv = val(expand), val(inner)
    if iv.dim() != 5 or not eq(iv.shape[axis + 1], 1):
        return None
    merged = [*ev.shape[:axis], ev.shape[axis] * ev.shape[axis + 1], *ev.shape[axis + 2:]]
    if not all(eq(a, b) for a, b in zip(val(node).shape, merged)):
        return None
    src = canon(inner)
    base = None
    if src.kind == "unsqueeze" and src.args[1] in (axis + 1, axis - 4):
        base = src.args[0]
    elif src.kind == "getitem" and isinstance(src.args[1], tuple) and len(src.args[1]) > axis + 1:
        index = src.args[1]
        if index[axis + 1] is None and all(i == slice(None) for j, i in enumerate(index) if j != axis + 1):
            base = src.args[0]
    if base is None or val(base).dim() != 4:
        return None
    groups = ev.shape[axis + 1]
    return (base, hint(groups), "interleave") if isinstance(groups, (int, torch.SymInt)) else None


def perm_or_none(perm: tuple[int, ...]) -> tuple[int, ...] | None:
    """``perm``, or None for the identity (an `Operand` read as is)."""
    return None if perm == tuple(range(len(perm))) else perm


def is_default_scale(c: float, runtime: list, head_dim: Any) -> bool:
    """Whether c * prod(runtime factors) == head_dim ** -0.5 for every value of the shape symbols."""
    import sympy

    total = sympy.Float(c)
    for node, divide in runtime:
        v = val(node)
        if not isinstance(v, (torch.SymInt, torch.SymFloat)):
            return False
        total = total / v.node.expr if divide else total * v.node.expr
    d = head_dim.node.expr if isinstance(head_dim, torch.SymInt) else sympy.Integer(head_dim)
    diff = total - d ** sympy.Rational(-1, 2)
    symbols = sorted(diff.free_symbols, key=str)
    for trial in range(3):
        point = {s: 3 + 17 * trial + 5 * i for i, s in enumerate(symbols)}
        if abs(float(diff.subs(point))) > 1e-9:
            return False
    return True


def heads_miss(sm: fx.Node, qs: list, ks: list, vs: list, groups: int) -> Miss | str:
    """A `Miss` unless K/V's batch dims broadcast against Q's the ways the op reads them; else which of K
    and V (``"k"``, ``"v"`` or ``""``) the rewrite expands over the heads to the other's count.

    K and V agree, or differ only on the heads axis where one of them has a single head (it
    broadcasts to every head of the other, as matmul broadcasting did).  Each K/V batch dim equals
    Q's or is 1, and a 1 only on the heads axis (multi-query: every head reads the one K/V head) or,
    for 4-D, on the batch axis (expanded).
    """
    qb, kb, vb = qs[:-2], ks[:-2], vs[:-2]
    if len(vs) != len(qs) or len(ks) != len(qs):
        return Miss(sm, "q/k/v have ranks {} / {} / {}: the values do not line up with the scores", len(qs),
                    len(ks), len(vs))
    expand = ""
    if not all(eq(a, b) for a, b in zip(kb, vb)):
        same = all(eq(a, b) for a, b in zip(kb[:-1], vb[:-1]))
        expand = "k" if same and eq(kb[-1], 1) and groups == 1 else "v" if same and eq(vb[-1], 1) else ""
        if not expand or groups > 1:
            return Miss(sm, "K has batch/head dims {} and V {}: they neither match nor broadcast over the heads",
                        [hint(x) for x in kb], [hint(x) for x in vb])
        kb = vb if expand == "k" else kb
    if groups > 1:  # K/V were un-repeated: head j of q reads K/V head j // groups (or j % heads)
        kb = [*kb[:-1], kb[-1] * groups]
    broadcast = [i for i, (a, b) in enumerate(zip(qb, kb)) if not eq(a, b)]
    if any(not eq(kb[i], 1) for i in broadcast):
        return Miss(sm, "q batch/head dims {} and k {} do not line up", [hint(x) for x in qb], [hint(x) for x in kb])
    heads = len(qb) - 1
    allowed = {heads} | ({0} if len(qs) == 4 else set())
    if not set(broadcast) <= allowed or (groups > 1 and heads in broadcast):
        return Miss(sm, "K/V broadcast over q's batch dims {}: only the heads axis (or the batch axis of 4-D "
                        "tensors) may broadcast", broadcast)
    return expand
