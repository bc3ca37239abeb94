"""Normal form: one canonical reading of every op spelling the matcher cares about.

Entry point: `canonicalize(gm)`.  It rewrites the few spellings that hide a
matmul inside another op, and only where they touch a softmax, into plain
``matmul`` form (each rule below is an exact algebraic identity):

* ``einsum("...qd,...kd->...qk", a, b)``  = ``matmul(permute(a), permute(b))``
* ``baddbmm(m, a, b, beta, alpha)``          = ``alpha * matmul(a, b) + beta * m``
* ``exp(x - logsumexp(x, d, keepdim=True))``  = ``softmax(x, d)`` (when it weights a matmul)
* ``exp(x - max) / sum``, ``log_softmax(x, d).exp()`` = ``softmax(x, d)`` (`_softmax_forms`)
* ``(s + B) * c`` = ``s*c + B*c``, ``where(K, s, f) * c`` = ``where(K, s*c, f*c)`` (`_scale_forms`)

Everything else is read in place through `canon(node)`, which maps Torch-IR
(dynamo) and ATen spellings to one `COp` vocabulary: ``matmul, permute, scale,
add, masked_fill, where, softmax, cast, identity, dropout, tanh, unsqueeze,
expand, reshape, repeat_interleave, repeat, sdpa, mha``.  Scalars are read
exactly: Python numbers, 0-d constant tensors (``torch.full([], c)``,
``torch.tensor(c)``), or kept as runtime nodes (SymFloat, 0-d buffers).
"""

from __future__ import annotations

import dataclasses
import numbers
import operator
from typing import Any

import torch
import torch.fx as fx


@dataclasses.dataclass(frozen=True)
class COp:
    kind: str
    args: tuple[Any, ...]


def val(node: Any) -> Any:
    """The example value (FakeTensor / SymInt / number) a node produces."""
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get("val", node.meta.get("example_value"))


def name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    if node.op != "call_function":
        return ""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def arg(node: fx.Node, i: int, key: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)


def _ndim(node: Any) -> int:
    v = val(node)
    return v.dim() if isinstance(v, torch.Tensor) else 0


def _constant_tensor(node: fx.Node) -> float | None:
    """Value of a 0-d tensor built in-graph from a literal, else None."""
    n = name(node)
    if n in ("full", "tensor", "scalar_tensor"):
        value = arg(node, 1, "fill_value") if n == "full" else arg(node, 0, "data")
        if n == "full" and tuple(arg(node, 0, "size", (1,))) != ():
            return None
        if isinstance(value, numbers.Number) and not isinstance(value, bool):
            return _as_stored(float(value), node)
    if n in ("lift_fresh_copy", "detach", "clone", "to", "_to_copy") and isinstance(node.args[0], fx.Node):
        inner = _constant_tensor(node.args[0])
        return None if inner is None else _as_stored(inner, node)
    return None


def _as_stored(value: float, node: fx.Node) -> float:
    # the value the tensor holds: torch.tensor(0.3) is float32(0.3), which is what eager multiplies by
    v = val(node)
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return float(torch.tensor(value, dtype=v.dtype))
    return value


def scalar(x: Any) -> float | fx.Node | None:
    """A scalar operand: its float value when known, the node when only known at run time, else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, numbers.Number):
        return float(x)
    if not isinstance(x, fx.Node):
        return None
    v = val(x)
    if isinstance(v, (torch.SymInt, torch.SymFloat, numbers.Number)) and not isinstance(v, bool):
        return x
    if isinstance(v, torch.Tensor) and v.dim() == 0:
        const = _constant_tensor(x)
        return x if const is None else const
    return None


def _perm_transpose(ndim: int, d0: int, d1: int) -> tuple[int, ...]:
    perm = list(range(ndim))
    d0, d1 = d0 % ndim, d1 % ndim
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return tuple(perm)


def _dims(node: fx.Node, start: int) -> tuple[Any, ...]:
    dims = node.args[start:] or (node.kwargs.get("dims") or node.kwargs.get("size") or node.kwargs.get("shape"),)
    if len(dims) == 1 and isinstance(dims[0], (list, tuple, torch.Size)):
        dims = tuple(dims[0])
    return tuple(dims)


def _binary(kind: str, node: fx.Node) -> COp | None:
    a, b = arg(node, 0, "input"), arg(node, 1, "other")
    if kind == "add":
        if arg(node, 2, "alpha", 1) != 1:
            return None
        return COp("add", (a, b))
    sb = scalar(b)
    if sb is not None and isinstance(a, fx.Node) and _ndim(a) > 0:
        return COp("scale", (a, sb, kind == "div"))
    sa = scalar(a)
    if kind == "mul" and sa is not None and isinstance(b, fx.Node) and _ndim(b) > 0:
        return COp("scale", (b, sa, False))
    for x, t in ((a, b), (b, a)) if kind == "mul" else ((a, b),):
        if _row_scale(x, t, node):  # a per-head temperature: the factor node is kept, as a run-time scale
            return COp("scale", (x, t, kind == "div"))
    return None


def _row_scale(x: Any, t: Any, node: fx.Node) -> bool:
    """Whether ``x * t`` multiplies each (..., i, j) matrix of x by one number: t has size 1 on x's last two
    axes ((H, 1, 1), (1, H, 1, 1), (B, H, 1, 1)) and leaves x's shape and dtype as they are."""
    xv, tv, out = val(x), val(t), val(node)
    if not isinstance(x, fx.Node) or not all(isinstance(v, torch.Tensor) for v in (xv, tv, out)):
        return False
    if not 0 < tv.dim() <= xv.dim() or xv.dim() < 2 or out.dtype != xv.dtype or out.dim() != xv.dim():
        return False
    same = [a.node.expr == b.node.expr if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt)
            else not isinstance(a, torch.SymInt) and not isinstance(b, torch.SymInt) and a == b
            for a, b in zip(out.shape, xv.shape)]
    return all(same) and all(not isinstance(d, torch.SymInt) and d == 1 for d in tv.shape[-2:])


def _softmax(node: fx.Node) -> COp:
    n = name(node)
    x = arg(node, 0, "input", arg(node, 0, "self"))
    dim = arg(node, 1, "dim")
    if dim is None and n == "softmax":  # F.softmax(x): PyTorch's implicit dim (torch.nn.functional._get_softmax_dim)
        dim = 0 if _ndim(x) in (0, 1, 3) else 1
    return COp("softmax", (x, dim))


def _cast_or_identity(node: fx.Node) -> COp:
    x = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    before, after = val(x), val(node)
    if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.shape == after.shape:
        return COp("cast" if before.dtype != after.dtype else "identity", (x,))
    return COp("other", ())


def _dropout(node: fx.Node) -> COp:
    x = arg(node, 0, "input")
    p = arg(node, 1, "p", 0.5)
    training = arg(node, 2, "training", arg(node, 2, "train", True))
    if not training or p == 0:
        return COp("identity", (x,))
    return COp("dropout", (x, float(p)))


def _permute(node: fx.Node) -> COp:
    x = node.args[0]
    n = name(node)
    nd = _ndim(x)
    if n in ("transpose", "swapaxes", "swapdims"):
        d0, d1 = arg(node, 1, "dim0"), arg(node, 2, "dim1")
        return COp("permute", (x, _perm_transpose(nd, d0, d1)))
    if n == "getattr":
        if node.args[1] == "mT":
            return COp("permute", (x, _perm_transpose(nd, -2, -1)))
        if node.args[1] == "T":
            return COp("permute", (x, tuple(reversed(range(nd)))))
        return COp("other", ())
    if n == "t":
        return COp("permute", (x, tuple(reversed(range(nd)))))
    return COp("permute", (x, tuple(d % nd for d in _dims(node, 1))))


# row-major reshapes: a softmax's chain may pass through them (`_views` folds them away)
_RESHAPES = frozenset(("view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten", "unflatten"))
_CASTS = ("float", "half", "bfloat16", "double", "to", "type", "type_as", "_to_copy", "_to_dtype")
_IDENTITY = ("contiguous", "clone", "alias", "lift_fresh_copy")

# name -> reader; each reads one spelling family into the canonical vocabulary.
_RULES = {
    **dict.fromkeys(("matmul", "bmm", "mm"), lambda n: COp("matmul", (n.args[0], n.args[1]))),
    **dict.fromkeys(("mul", "mul_", "imul"), lambda n: _binary("mul", n)),
    **dict.fromkeys(("truediv", "div", "div_", "itruediv"), lambda n: _binary("div", n)),
    **dict.fromkeys(("add", "add_", "iadd"), lambda n: _binary("add", n)),
    **dict.fromkeys(("masked_fill", "masked_fill_"),
                    lambda n: COp("masked_fill", (n.args[0], arg(n, 1, "mask"), arg(n, 2, "value")))),
    "where": lambda n: COp("where", tuple(n.args[:3])) if len(n.args) >= 3 else COp("other", ()),
    **dict.fromkeys(("softmax", "_softmax"), _softmax),
    **dict.fromkeys(_CASTS + _IDENTITY, _cast_or_identity),
    **dict.fromkeys(("dropout", "dropout_"), _dropout),
    "tanh": lambda n: COp("tanh", (n.args[0],)),
    **dict.fromkeys(("transpose", "swapaxes", "swapdims", "permute", "getattr", "t"), _permute),
    "unsqueeze": lambda n: COp("unsqueeze", (n.args[0], arg(n, 1, "dim"))),
    "getitem": lambda n: COp("getitem", (n.args[0], n.args[1])),
    "expand": lambda n: COp("expand", (n.args[0],)),
    **dict.fromkeys(("reshape", "view", "_unsafe_view"), lambda n: COp("reshape", (n.args[0],))),
    "repeat_interleave": lambda n: COp("repeat_interleave", (n.args[0], arg(n, 1, "repeats"), arg(n, 2, "dim"))),
    "repeat": lambda n: COp("repeat", (n.args[0], _dims(n, 1))),
    "scaled_dot_product_attention": lambda n: COp("sdpa", ()),
    "multi_head_attention_forward": lambda n: COp("mha", ()),
    "_transformer_encoder_layer_fwd": lambda n: COp("mha", ()),  # nn.TransformerEncoderLayer's fast path
}


def canon(node: Any) -> COp:
    """The canonical reading of ``node`` (kind "other" when it is none of ours)."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return COp("other", ())
    rule = _RULES.get(name(node))
    op = rule(node) if rule else None
    return op or COp("other", ())


def reaches_matmul(node: Any, depth: int = 16) -> bool:
    """Whether ``node`` is the scores chain: a matmul reached through chain ops and reshapes (an ``add`` or
    ``where`` through either operand)."""
    while isinstance(node, fx.Node) and depth > 0:
        op = canon(node)
        if op.kind == "matmul":
            return True
        if op.kind == "add":
            return any(reaches_matmul(a, depth - 1) for a in op.args)
        if op.kind == "where":
            return any(reaches_matmul(a, depth - 1) for a in op.args[1:])
        if op.kind in ("cast", "identity", "scale", "masked_fill", "tanh"):
            node = op.args[0]
        elif name(node) in _RESHAPES and node.args:
            node = node.args[0]
        else:
            return False
        depth -= 1
    return False


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
                        or name(m) in _RESHAPES or name(m) in ("cat", "getitem", "sub"):
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
    roles = _einsum_as_matmul(eq, (_ndim(ops[0]), _ndim(ops[1])))
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
    _copy_meta(node, a, b, out)
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
    _copy_meta(node, a, b, out)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return True


def _copy_meta(node: fx.Node, a: Any, b: Any, out: fx.Node) -> None:
    """Give new nodes example values by running them on the fake values of their inputs."""
    for new in out.graph.nodes:
        if new.meta or new.op != "call_function" or new is node:
            continue
        args = fx.node.map_arg(new.args, val)
        try:
            new.meta["example_value"] = new.target(*args, **fx.node.map_arg(new.kwargs, val))
        except Exception:  # noqa: BLE001 - meta is best-effort; the matcher skips nodes without it
            pass
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in node.meta:
                new.meta[key] = node.meta[key]


def _feeds_left_matmul(node: fx.Node) -> bool:
    while len(node.users) == 1:
        user = next(iter(node.users))
        op = canon(user)
        if op.kind == "matmul":
            return op.args[0] is node
        if name(user) == "einsum":  # p @ v still spelled as einsum: the matmul rules run after this one
            operands = user.args[1:] if len(user.args) > 2 else tuple(user.args[1])
            return len(operands) == 2 and operands[0] is node
        if op.kind not in ("cast", "identity", "dropout") and name(user) not in _RESHAPES:
            return False
        node = user
    return False


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
    if not keepdim or not isinstance(dim, int) or not _feeds_left_matmul(node):
        return False
    with graph.inserting_before(node):
        out = graph.call_function(torch.softmax, (x, dim))
    _copy_meta(node, x, None, out)
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
    _copy_meta(node, a, b, add)
    node.replace_all_uses_with(add)
    graph.erase_node(node)
    return True


def _as_rule(graph: fx.Graph, node: fx.Node) -> set | bool:
    # x.reshape_as(s) == x.reshape(*s.shape): a term that read the scores only for their shape no longer reads them
    from ._views import _Decline, _refresh, _Sizes

    x, y = node.args[:2] if len(node.args) >= 2 else (None, None)
    if not isinstance(x, fx.Node) or not isinstance(y, fx.Node) or not isinstance(val(y), torch.Tensor):
        return False
    before = set(graph.nodes)
    try:
        with graph.inserting_before(node):
            sizes = [_Sizes(graph)(s) for s in val(y).shape]
            new = graph.call_method(name(node)[:-3], (x, *sizes))
    except _Decline:
        return False
    for n in [n for n in graph.nodes if n not in before]:  # the size products too
        _refresh(n)
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in node.meta:
            new.meta[key] = node.meta[key]
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
# the spellings of `_softmax_forms` and `_scale_forms` (bound at the end of this module: they import it)
_SOFTMAX_RULES = {"exp": lambda g, n: _exp_rule(g, n) or _softmax_forms.exp_rule(g, n),
                  **dict.fromkeys(("div", "truediv"), lambda g, n: _softmax_forms.div_rule(g, n))}
_SCALE_RULES = dict.fromkeys(("mul", "div", "truediv"), lambda g, n: _scale_forms.rule(g, n))


def canonicalize(gm: fx.GraphModule, only: frozenset[str] | None = None) -> fx.GraphModule:
    """Rewrite matmul-hiding spellings next to a softmax into plain matmuls (in place).

    ``only``: rewrite just the nodes of these names (None: every one a rule applies to).  Each rewrite is
    recorded in ``gm.meta["attnfuse_canonical"]`` as (the original node's name, the new nodes), so that
    the backend can keep only the rewrites a fused region replaced (`used`): the others are not
    bit-identical (``exp(s - logsumexp(s))`` is not ``softmax(s)`` on a row of huge finite values), and a
    site attnfuse does not fuse must run exactly as written.
    """
    from . import _views

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


from . import _scale_forms, _softmax_forms  # noqa: E402 - they read this module's helpers
