"""Normal form: one canonical reading of every op spelling the matcher cares about.

Entry point: `canonicalize(gm)`.  It rewrites the few spellings that hide a
matmul inside another op, and only where they touch a softmax, into plain
``matmul`` form (each rule below is an exact algebraic identity):

* ``einsum("...qd,...kd->...qk", a, b)``  = ``matmul(permute(a), permute(b))``
* ``baddbmm(m, a, b, beta, alpha)``          = ``alpha * matmul(a, b) + beta * m``
* ``exp(x - logsumexp(x, d, keepdim=True))``  = ``softmax(x, d)`` (when it weights a matmul)
* ``exp(x - max) / sum``, ``log_softmax(x, d).exp()`` = ``softmax(x, d)`` (`_softmax_forms`)
* ``(s + B) * c`` = ``s*c + B*c``, ``where(K, s, f) * c`` = ``where(K, s*c, f*c)`` (`_scale_forms`)

Everything else is read in place through `canon(node)` (`_canon`, re-exported
here), which maps Torch-IR (dynamo) and ATen spellings to one `COp` vocabulary:
``matmul, permute, scale, add, masked_fill, where, softmax, cast, identity,
dropout, tanh, unsqueeze, expand, reshape, repeat_interleave, repeat, sdpa,
mha``.  Scalars are read exactly: Python numbers, 0-d constant tensors
(``torch.full([], c)``, ``torch.tensor(c)``), or kept as runtime nodes
(SymFloat, 0-d buffers).  The rules live beside it: views (`_views`), scales
(`_scale_forms`), softmax spellings (`_softmax_forms`); the node helpers they
share are in `_graph`.
"""

from __future__ import annotations

import numbers
import operator

import torch
import torch.fx as fx

from . import _scale_forms, _softmax_forms, _views
from ._canon import RESHAPES, COp, canon, feeds_left_matmul, ndim, reaches_matmul, scalar
from ._graph import Decline, Sizes, arg, carry, copy_meta, name, refresh, val

# what callers read from here (the reading itself lives in `_canon` and `_graph`)
__all__ = ["canonicalize", "used", "LOGSUMEXP", "COp", "canon", "scalar", "reaches_matmul", "val", "name", "arg"]


def _near_softmax(node: fx.Node, hops: int = 10) -> bool:
    """Whether a softmax is reachable from ``node`` (either direction) within a few elementwise hops."""
    frontier, seen = [node], set()
    for _ in range(hops):
        nxt = []
        for n in frontier:
            for m in [*n.users, *n.all_input_nodes]:
                if m in seen:
                    continue
                seen.add(m)
                if canon(m).kind == "softmax":
                    return True
                # cat / getitem: attention sinks (softmax over cat([scores, sink]), then [..., :-1])
                if canon(m).kind in ("cast", "identity", "scale", "add", "masked_fill", "where", "dropout", "tanh") \
                        or name(m) in RESHAPES or name(m) in ("cat", "getitem", "sub"):
                    nxt.append(m)
        frontier = nxt
    return False


def _einsum_as_matmul(eq: str, ranks: tuple[int, int]) -> tuple[str, str, str] | None:
    """Split ``'xa,yb->z'`` into its operand and output letters (``...`` spelled out as letters the equation
    does not use, aligned from the right as broadcasting does), or None if it is not two operands with an
    explicit output."""
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    parts = lhs.split(",")
    if len(parts) != 2:
        return None
    spans = []
    for part, rank in zip(parts, ranks):
        if part.count("...") > 1 or "." in part.replace("...", ""):
            return None
        spans.append(rank - len(part.replace("...", "")) if "..." in part else 0)
    if min(spans) < 0 or "." in out.replace("...", "", 1):
        return None
    wide = max(spans)
    ell = "".join(c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq)[:wide]
    parts = [p.replace("...", ell[wide - n:]) for p, n in zip(parts, spans)]
    out = out.replace("...", ell)
    if any(len(set(p)) != len(p) for p in (*parts, out)):
        return None
    return parts[0], parts[1], out


def _einsum_rule(graph: fx.Graph, node: fx.Node) -> bool:
    """einsum(a, b) = permute_out(matmul(a', b')) with a' = [batch, m, c] and b' = [batch, c, n].

    One contracted letter; m (n) is the last output letter only ``a`` (``b``) has.  Output letters only one
    operand has besides m and n are batch dims the other operand lacks: it gets a size-1 axis there, which
    matmul broadcasts exactly as einsum does (``'bhij,bjd->bhid'``: multi-query V without a heads axis).
    """
    eq = node.args[0]
    ops = node.args[1:] if len(node.args) > 2 else tuple(node.args[1])
    if not isinstance(eq, str) or len(ops) != 2 or not all(isinstance(o, fx.Node) for o in ops):
        return False
    roles = _einsum_as_matmul(eq, (ndim(ops[0]), ndim(ops[1])))
    if roles is None:
        return False
    sa, sb, so = roles
    contracted = [c for c in sa if c in sb and c not in so]
    a_only = [c for c in so if c in sa and c not in sb]
    b_only = [c for c in so if c in sb and c not in sa]
    if len(contracted) != 1 or not a_only or not b_only or any(c not in sa and c not in sb for c in so):
        return False
    m, n = a_only[-1], b_only[-1]
    batch = [c for c in so if c not in (m, n)]
    if set(sa) != set(batch + [m] + contracted) - set(b_only[:-1]) or \
            set(sb) != set(batch + [n] + contracted) - set(a_only[:-1]):
        return False
    with graph.inserting_before(node):
        a = _einsum_operand(graph, ops[0], sa, [*batch, m, *contracted])
        b = _einsum_operand(graph, ops[1], sb, [*batch, *contracted, n])
        out = graph.call_function(torch.matmul, (a, b))
        mm_out = [*batch, m, n]
        out_order = [mm_out.index(c) for c in so]
        if out_order != sorted(out_order):
            out = graph.call_function(torch.permute, (out, out_order))
    copy_meta(node, a, b, out)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return True


def _einsum_operand(graph: fx.Graph, x: fx.Node, letters: str, want: list[str]) -> fx.Node:
    """``x`` (axes named by ``letters``) permuted to the order of ``want``, with a size-1 axis for each wanted
    letter it lacks."""
    have = [c for c in want if c in letters]
    order = [letters.index(c) for c in have]
    if order != sorted(order):
        x = graph.call_function(torch.permute, (x, order))
    for i, c in enumerate(want):
        if c not in letters:
            x = graph.call_function(torch.unsqueeze, (x, i))
    return x


def _baddbmm_rule(graph: fx.Graph, node: fx.Node) -> bool:
    # baddbmm(m, a, b, beta=β, alpha=α) = α·(a @ b) + β·m
    inp, a, b = arg(node, 0, "input"), arg(node, 1, "batch1"), arg(node, 2, "batch2")
    beta, alpha = arg(node, 3, "beta", 1), arg(node, 4, "alpha", 1)
    if not all(isinstance(x, numbers.Number) for x in (beta, alpha)):
        return False
    with graph.inserting_before(node):
        out = graph.call_function(torch.matmul, (a, b))
        if alpha != 1:
            out = graph.call_function(operator.mul, (out, alpha))
        if beta != 0:
            term = inp if beta == 1 else graph.call_function(operator.mul, (inp, beta))
            out = graph.call_function(operator.add, (out, term))
    copy_meta(node, a, b, out)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return True


def _exp_rule(graph: fx.Graph, node: fx.Node) -> bool:
    # exp(x - logsumexp(x, d, keepdim=True)) = softmax(x, d), when it weights a matmul
    sub = node.args[0] if node.args else None
    if not isinstance(sub, fx.Node) or name(sub) != "sub" or len(sub.args) != 2:
        return False
    x, lse = sub.args
    if not isinstance(lse, fx.Node) or name(lse) != "logsumexp" or lse.args[0] is not x:
        return False
    dim, keepdim = arg(lse, 1, "dim"), arg(lse, 2, "keepdim", False)
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    if not keepdim or not isinstance(dim, int) or not feeds_left_matmul(node):
        return False
    with graph.inserting_before(node):
        out = graph.call_function(torch.softmax, (x, dim))
    copy_meta(node, x, None, out)
    out.meta[LOGSUMEXP] = True  # not softmax on a row of huge finite scores: the matcher checks the masks
    node.replace_all_uses_with(out)
    for dead in (node, sub, lse):
        if not dead.users:
            graph.erase_node(dead)
    return True


# meta key of a softmax read from exp(x - logsumexp(x)): on a row of huge finite scores (a finite mask fill on
# every key) logsumexp rounds to the row's value and the "probabilities" are all 1, in any precision
LOGSUMEXP = "attnfuse_logsumexp"


def _sub_rule(graph: fx.Graph, node: fx.Node) -> bool:
    # s - m == s + (-m), bit for bit (and in the gradient): XLNet's ``scores - 1e30 * mask`` is an additive mask
    a, b = arg(node, 0, "input"), arg(node, 1, "other")
    if arg(node, 2, "alpha", 1) != 1 or not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        return False
    av, bv, out = val(a), val(b), val(node)
    if not all(isinstance(x, torch.Tensor) for x in (av, bv, out)) or bv.dim() == 0 or out.shape != av.shape:
        return False
    with graph.inserting_before(node):
        neg = graph.call_function(torch.neg, (b,))
        add = graph.call_function(operator.add, (a, neg))
    copy_meta(node, a, b, add)
    node.replace_all_uses_with(add)
    graph.erase_node(node)
    return True


def _as_rule(graph: fx.Graph, node: fx.Node) -> set | bool:
    # x.reshape_as(s) == x.reshape(*s.shape): a term that read the scores only for their shape no longer reads them
    x, y = node.args[:2] if len(node.args) >= 2 else (None, None)
    if not isinstance(x, fx.Node) or not isinstance(y, fx.Node) or not isinstance(val(y), torch.Tensor):
        return False
    before = set(graph.nodes)
    try:
        with graph.inserting_before(node):
            sizes = [Sizes(graph)(s) for s in val(y).shape]
            new = graph.call_method(name(node)[:-3], (x, *sizes))
    except Decline:
        return False
    for n in [n for n in graph.nodes if n not in before]:  # the size products too
        refresh(n)
    carry(node, new)
    users = set(node.users)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return users  # the chain node that reads the term: it lies in the region when the site is fused


def _only_softmax_reads(node: fx.Node, depth: int = 16) -> bool:
    """Whether ``node``'s value reaches nothing but a softmax, through single-user chain ops."""
    while depth > 0 and len(node.users) == 1:
        node, depth = next(iter(node.users)), depth - 1
        kind = canon(node).kind
        if kind == "softmax":
            return True
        if kind not in ("cast", "identity", "scale", "add", "masked_fill", "where", "tanh") and name(node) != "sub":
            return False
    return False


def _zero_add_rule(graph: fx.Graph, node: fx.Node) -> set | bool:
    # s + 0 == s (XLNet's ``ac + bd + ef`` with ``ef = 0``): the same values up to the sign of a zero, so only
    # where the sum reaches nothing but a softmax, which cannot see that sign; the same gradient
    a, b = arg(node, 0, "input"), arg(node, 1, "other")
    if arg(node, 2, "alpha", 1) != 1:
        return False
    x = a if isinstance(a, fx.Node) and not isinstance(b, fx.Node) and b == 0 and not isinstance(b, bool) else \
        b if isinstance(b, fx.Node) and not isinstance(a, fx.Node) and a == 0 and not isinstance(a, bool) else None
    if x is None or not isinstance(val(x), torch.Tensor) or val(x).shape != val(node).shape \
            or val(x).dtype != val(node).dtype or not _only_softmax_reads(node):
        return False
    users = set(node.users)
    node.replace_all_uses_with(x)
    graph.erase_node(node)
    return users


_MATMUL_RULES = {"einsum": _einsum_rule, "baddbmm": _baddbmm_rule}
# rewrites that change no value a program can observe: always kept, never recorded (later rules build on them)
_EXACT_RULES = {"sub": _sub_rule, "add": _zero_add_rule,
                **dict.fromkeys(("reshape_as", "view_as", "expand_as"), _as_rule)}

# the spellings of `_softmax_forms` and `_scale_forms`
_SOFTMAX_RULES = {"exp": lambda g, n: _exp_rule(g, n) or _softmax_forms.exp_rule(g, n),
                  **dict.fromkeys(("div", "truediv"), _softmax_forms.div_rule)}
_SCALE_RULES = dict.fromkeys(("mul", "div", "truediv"), _scale_forms.rule)


def canonicalize(gm: fx.GraphModule, only: frozenset[str] | None = None) -> fx.GraphModule:
    """Rewrite matmul-hiding spellings next to a softmax into plain matmuls (in place).

    ``only``: rewrite just the nodes of these names (None: every one a rule applies to).  Each rewrite is
    recorded in ``gm.meta["attnfuse_canonical"]`` as (the original node's name, the new nodes), so that
    the backend can keep only the rewrites a fused region replaced (`used`): the others are not
    bit-identical (``exp(s - logsumexp(s))`` is not ``softmax(s)`` on a row of huge finite values), and a
    site attnfuse does not fuse must run exactly as written.
    """
    applied = gm.meta.setdefault("attnfuse_canonical", [])
    exact = False
    for node in list(gm.graph.nodes):
        rule = _EXACT_RULES.get(name(node))
        if rule is not None and _near_softmax(node):
            exact = bool(rule(gm.graph, node)) or exact
    view_rules = dict.fromkeys(("softmax", "_softmax"), _views.rule)
    for rules, near in ((_SOFTMAX_RULES, False), (_MATMUL_RULES, True), (_SCALE_RULES, False),
                        (view_rules, False)):
        for node in list(gm.graph.nodes):
            rule = rules.get(name(node))
            if rule is None or (only is not None and node.name not in only) or (near and not _near_softmax(node)):
                continue
            before, original = set(gm.graph.nodes), node.name
            done = rule(gm.graph, node)
            if done:  # a rule may also return the existing nodes it changed
                changed = done if isinstance(done, (set, frozenset)) else set()
                applied.append((original, frozenset((set(gm.graph.nodes) - before) | changed)))
    if applied or exact:
        gm.recompile()
    return gm


def used(gm: fx.GraphModule, regions: list[set]) -> tuple[frozenset[str], bool]:
    """The names of the rewrites (`canonicalize`) whose new nodes lie in one of ``regions``, and whether
    every rewrite did."""
    applied = gm.meta.get("attnfuse_canonical", [])
    inside = set().union(*regions) if regions else set()
    names = frozenset(n for n, new in applied if new & inside)
    return names, len(names) == len({n for n, _ in applied})
