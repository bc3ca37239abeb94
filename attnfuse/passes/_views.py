"""Normal form for views inside the attention chain: one shape from the scores matmul to the values matmul.

Real code reshapes between the scores matmul, the masks, the softmax and the PV matmul: heads folded into
the batch for ``bmm``/``baddbmm`` and unfolded to add a 4-D mask, probabilities viewed before PV, scores
viewed to 5-D to add decomposed relative-position biases along two spatial axes, ``unsqueeze``/``squeeze``
pairs.  A row-major reshape commutes with every elementwise op of the chain
(``reshape(s + m) == reshape(s) + reshape(expand(m))``), and it keeps each key row whole when the
softmax's last two axes are the scores' (query, key) axes.  So the chain can be read in one shape, the
softmax's ``T = (batch..., Lq, Lk)``:

* the scores matmul reads q, k reshaped to T's batch dims (``(B*H, L, D) -> (B, H, L, D)``);
* each mask term, bias or tensor scale is mapped from the shape where it was applied to T: the groups of
  axes a reshape merges or splits are kept broadcast where the term broadcasts over the whole group,
  expanded where it varies along part of it;
* the reshapes of the chain disappear; the PV matmul reads v in T's batch dims and its result is reshaped
  back to what the graph had.

`rule` rewrites one softmax's chain so (in place, reusing the softmax and matmul nodes); it declines
(returns False) unless every chain node has one user, the shapes prove the (query, key) axes line up, and
every size it needs is a constant or a symbol the graph already has.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from .._sizes import hint
from ._canon import RESHAPES, canon, scalar
from ._graph import Decline, Sizes, carry, eq, name, refresh, val

_ELEMENTWISE = ("cast", "identity", "dropout", "tanh")
_MASKS = ("add", "masked_fill", "where", "scale")


def _new_axes(node: fx.Node) -> bool:
    """``x[:, :, None]``: indexing that only inserts size-1 axes (full slices, ``None``, ``...``)."""
    index = node.args[1] if len(node.args) > 1 else None
    index = index if isinstance(index, tuple) else (index,)
    return any(i is None for i in index) and all(
        i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in index)


def is_reshape(node: Any) -> bool:
    """A row-major reshape of one tensor (same dtype, same element count)."""
    if not isinstance(node, fx.Node) or not node.args:
        return False
    if name(node) not in RESHAPES and not (name(node) == "getitem" and _new_axes(node)):
        return False
    src, out = val(node.args[0]), val(node)
    return isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dtype == out.dtype \
        and eq(src.numel(), out.numel())


def _chain_input(node: fx.Node) -> fx.Node | None:
    """The operand of a chain node that carries the scores (None if ``node`` is not a chain node)."""
    if is_reshape(node):
        return node.args[0]
    op = canon(node)
    if op.kind in _ELEMENTWISE or op.kind == "scale":
        return op.args[0]
    if op.kind == "add":
        return next((a for a in op.args if _reaches_scores(a)), None)
    if op.kind == "masked_fill":
        return op.args[0]
    if op.kind == "where":
        return next((a for a in op.args[1:] if _reaches_scores(a)), None)
    return None


def _reaches_scores(node: Any, depth: int = 16) -> bool:
    while isinstance(node, fx.Node) and depth > 0:
        if canon(node).kind == "matmul":
            return True
        node, depth = _chain_input(node), depth - 1
    return False


def _blocks(src: list, dst: list) -> list[tuple[range, range]] | None:
    """The smallest groups of consecutive axes a row-major reshape from ``src`` to ``dst`` maps onto each other
    (equal products), or None if the products never line up."""
    out, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        i0, j0, a, b = i, j, 1, 1
        if i < len(src):
            a, i = hint(src[i]), i + 1
        if j < len(dst):
            b, j = hint(dst[j]), j + 1
        while a != b:
            if a < b and i < len(src):
                a, i = a * hint(src[i]), i + 1
            elif b < a and j < len(dst):
                b, j = b * hint(dst[j]), j + 1
            else:
                return None
        while i < len(src) and hint(src[i]) == 1 and (j == len(dst) or hint(dst[j]) != 1):
            i += 1  # size-1 axes join the group before them
        while j < len(dst) and hint(dst[j]) == 1 and (i == len(src) or hint(src[i]) != 1):
            j += 1
        if not eq(math.prod(src[i0:i]), math.prod(dst[j0:j])):
            return None  # equal at these sizes only: not a proof for every size
        out.append((range(i0, i), range(j0, j)))
    return out


def _to_shape(graph: fx.Graph, sizes: Sizes, t: fx.Node, src: list, dst: list) -> fx.Node:
    """``t`` (broadcasting against shape ``src``) as a tensor broadcasting against ``dst``, where ``dst`` is a
    row-major reshape of ``src``: ``reshape(expand(t, src), dst)`` without expanding the axis groups ``t``
    broadcasts over entirely."""
    tv = val(t)
    blocks = _blocks(src, dst)
    if blocks is None or tv.dim() > len(src):
        raise Decline
    shape = [1] * (len(src) - tv.dim()) + list(tv.shape)
    expand, target, dims, need_expand = [], [], [], False
    for s_axes, d_axes in blocks:
        ones = all(hint(shape[i]) == 1 for i in s_axes)
        full = all(eq(shape[i], src[i]) for i in s_axes)
        if ones and not full:
            expand += [-1] * len(s_axes)
            target += [1] * len(d_axes)
            dims += [1] * len(d_axes)
        else:
            need_expand |= not full
            expand += [-1 if full else sizes(src[i]) for i in s_axes]
            target += [sizes(dst[i]) for i in d_axes]
            dims += [dst[i] for i in d_axes]
    if len(dims) == tv.dim() and all(eq(a, b) for a, b in zip(dims, tv.shape)):
        return t
    x = graph.call_method("expand", (t, *expand)) if need_expand else t
    return graph.call_method("reshape", (x, *target))


def _live_single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _transposed_pv(graph: fx.Graph, sm: fx.Node) -> set:
    """``a @ p.transpose(-2, -1)`` (timm's NCHW layouts: values as (..., D, Lk)) == ``(p @ a.transpose(-2, -1))
    .transpose(-2, -1)``: rewrite it so, and return the new nodes (empty when it is not that spelling)."""
    node = sm
    while True:
        u = _live_single_user(node)
        if u is None:
            return set()
        op = canon(u)
        if op.kind in ("cast", "identity", "dropout") and u.args[0] is node:
            node = u
            continue
        break
    nd = val(node).dim()
    swap = tuple(range(nd - 2)) + (nd - 1, nd - 2)
    if op.kind != "permute" or op.args[0] is not node or tuple(op.args[1]) != swap:
        return set()
    mm = _live_single_user(u)
    if mm is None or canon(mm).kind != "matmul" or mm.args[1] is not u or mm.args[0] is u:
        return set()
    a = mm.args[0]
    if not isinstance(a, fx.Node) or not isinstance(val(a), torch.Tensor) or val(a).dim() < 2:
        return set()
    with graph.inserting_before(mm):
        at = graph.call_method("transpose", (a, -2, -1))
        pv = graph.call_function(torch.matmul, (node, at))
        flipped = graph.call_method("transpose", (pv, -2, -1))
        out = graph.call_method("contiguous", (flipped,))  # eager's matmul result is contiguous: views rely on it
    for n in (at, pv, flipped, out):
        refresh(n)
        carry(mm, n)
    mm.replace_all_uses_with(out)
    graph.erase_node(mm)
    graph.erase_node(u)
    return {at, pv, flipped, out}


def rule(graph: fx.Graph, sm: fx.Node) -> set | bool:
    """Rewrite the chain around softmax ``sm`` into the softmax's shape (see the module docstring), after
    reading ``a @ pᵀ`` as ``(p @ aᵀ)ᵀ`` (`_transposed_pv`).

    Returns the nodes it changed or made (for `canonicalize.used`), or False when it does nothing."""
    flipped = _transposed_pv(graph, sm)
    chained = _chain(graph, sm)
    return (chained | flipped) if chained else (flipped or False)


def _chain(graph: fx.Graph, sm: fx.Node) -> set | bool:
    x, dim = canon(sm).args
    t_val = val(x)
    if not isinstance(t_val, torch.Tensor) or not isinstance(dim, int) or t_val.dim() < 2 \
            or dim % t_val.dim() != t_val.dim() - 1:
        return False
    up, node = [], x  # chain nodes from the softmax input up to (not including) the scores matmul
    while canon(node).kind != "matmul":
        nxt = _chain_input(node)
        if nxt is None or _live_single_user(nxt) is not node:
            return False
        up.append(node)
        node = nxt
    mm, down, node = node, [], sm
    while True:
        u = _live_single_user(node)
        if u is None:
            return False
        if canon(u).kind == "matmul" and u.args[0] is node:
            pv = u
            break
        if not (is_reshape(u) or canon(u).kind in ("cast", "identity", "dropout")) or u.args[0] is not node:
            return False
        down.append(u)
        node = u
    if not any(is_reshape(n) for n in (*up, *down)):
        return False
    T = list(t_val.shape)
    M, P = list(val(mm).shape), list(val(pv.args[0]).shape)
    if len(M) < 2 or not all(eq(a, b) for a, b in zip(M[-2:], T[-2:])) or not all(
            eq(a, b) for a, b in zip(P[-2:], T[-2:])) or not eq(math.prod(M), math.prod(T)):
        return False
    R = list(val(pv).shape)
    if len(R) != len(P) or not all(eq(a, b) for a, b in zip(R[:-2], P[:-2])):
        return False  # V widens the batch: not a reshape of the chain's rows
    try:
        return _rewrite(graph, sm, mm, list(reversed(up)), down, pv, T, M, P, R)
    except Decline:
        return False


def _rewrite(graph, sm, mm, up, down, pv, T, M, P, R) -> set:
    sizes = Sizes(graph)
    before = set(graph.nodes)
    a, b = canon(mm).args
    da, db = val(a).shape[-1], val(b).shape[-2]
    # every new operand is built before anything changes: a Decline leaves only dead new nodes behind
    with graph.inserting_before(mm):
        a2 = _to_shape(graph, sizes, a, [*M[:-1], da], [*T[:-1], da])
        b2 = _to_shape(graph, sizes, b, [*M[:-2], db, M[-1]], [*T[:-2], db, T[-1]])
    terms = {}
    for n in up:
        if is_reshape(n):
            continue
        inp = _chain_input(n)
        for t in n.all_input_nodes:
            tv = val(t)
            if t is inp or not isinstance(tv, torch.Tensor) or tv.dim() == 0 or scalar(t) is not None:
                continue
            with graph.inserting_before(n):
                terms[(n, t)] = _to_shape(graph, sizes, t, list(val(n).shape), T)
    dv = val(pv.args[1]).shape[-1]
    with graph.inserting_before(pv):
        v2 = _to_shape(graph, sizes, pv.args[1], [*P[:-2], P[-1], dv], [*T[:-2], T[-1], dv])
        out_sizes = [sizes(s) for s in R]
    made = [n for n in graph.nodes if n not in before]
    for n in made:
        refresh(n)
    # the change
    touched: set = set()
    if mm.op == "call_function" and mm.target is torch.matmul:
        mm.args = (a2, b2)
    else:
        with graph.inserting_before(mm):
            mm2 = graph.call_function(torch.matmul, (a2, b2))
        carry(mm, mm2)
        mm.replace_all_uses_with(mm2)
        graph.erase_node(mm)
        mm = mm2
    prev = _redo(mm, touched)
    for n in (*up, sm, *down):  # each reads the previous one, now in T's shape; its terms are mapped to T
        if is_reshape(n):
            n.replace_all_uses_with(prev)
            graph.erase_node(n)
            continue
        inp = _chain_input(n) if n in up else n.args[0]
        n.args = fx.node.map_arg(n.args, lambda y, n=n, inp=inp: prev if y is inp else terms.get((n, y), y))
        n.kwargs = fx.node.map_arg(n.kwargs, lambda y, n=n: terms.get((n, y), y))
        prev = _redo(n, touched)
    with graph.inserting_before(pv):
        out2 = graph.call_function(torch.matmul, (prev, v2))
        out = graph.call_method("reshape", (out2, *out_sizes))
    for n in (out2, out):
        carry(pv, n)
        _redo(n, touched)
    pv.replace_all_uses_with(out)
    graph.erase_node(pv)
    return touched | {n for n in made if n.graph is graph}


def _redo(node: fx.Node, touched: set) -> fx.Node:
    refresh(node)
    touched.add(node)
    return node
