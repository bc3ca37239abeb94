"""Read the nodes of a mask-building graph as `attnfuse.passes._maskexpr` expressions.

`Builder.of(node)` is the node's value as an expression over its own index
variables (a dim of size 1 is always read at index 0, so its variable never
appears); `Builder.final(term)` re-indexes a mask term onto the score axes
``BATCH, HEAD, QUERY, KEY`` (right-aligned, as broadcasting does).

Rules (Torch-IR spellings, operator / torch / method forms): ``arange`` with
integer start and step; ``+ - *`` and negation; comparisons; ``& | ~`` and the
``logical_*`` forms on bools; ``where``, ``masked_fill``, ``tril``/``triu``; constant
factories (``zeros``, ``new_ones``, ``full`` ...); dtype/device casts; views that only
re-index (``unsqueeze``, ``[None]``, slices with a non-negative start, integer
indices, ``expand``, ``permute``/``transpose``, reshapes that add or drop size-1 dims);
advanced indexing by provably non-negative affine index tensors (HF's
``padding_mask[batch_idx, kv_idx]``, which substitutes the indices); torch.vmap as dynamo
inlines it (``_add_batch_dim`` gives a vmap level a variable of its own, ``_remove_batch_dim``
puts it back as a dim).  Any other node is an opaque `Read` of itself, and its inputs are
not read.  A node written in place (or sharing storage with one), or a vmap-batched value
that no rule reads, makes the term unreadable (`Builder.final` returns None): an expression
could not say when, or for which batch element, it is read.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ._graph import arg, eq, name, val
from ._maskexpr import Aff, Const, Op, Read, add, and_, atom, compare, ite, mul, ne0, neg, not_, or_, subst


def size1(s: Any) -> bool:
    return bool(statically_known_true(s == 1)) if isinstance(s, torch.SymInt) else s == 1


def _rank(x: Any) -> int:
    v = val(x)
    return v.dim() if isinstance(v, torch.Tensor) else 0


def _dtype(x: Any) -> torch.dtype | None:
    v = val(x)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _shift(e, r_in: int, r_out: int):
    """Re-index an operand of rank r_in for an output of rank r_out (right-aligned broadcasting)."""
    return e if r_in == r_out else subst(e, {v: Aff(((v + r_out - r_in, 1),)) for v in range(r_in)})


_COMPARE = {"le": "le", "lt": "lt", "ge": "ge", "gt": "gt", "eq": "eq", "ne": "ne", "less_equal": "le",
            "less": "lt", "greater_equal": "ge", "greater": "gt", "not_equal": "ne", "__eq__": "eq", "__ne__": "ne",
            "__le__": "le", "__lt__": "lt", "__ge__": "ge", "__gt__": "gt"}
_BOOL_BINARY = {"and_": and_, "logical_and": and_, "bitwise_and": and_, "__and__": and_,
                "or_": or_, "logical_or": or_, "bitwise_or": or_, "__or__": or_}
_IDENTITY = ("contiguous", "clone", "detach", "lift_fresh_copy", "alias", "to", "type", "type_as", "_to_copy",
             "float", "double", "half", "bfloat16", "bool", "int", "long")
_EXACT = (torch.int32, torch.int64, torch.float32, torch.float64)  # hold every index exactly (< 2**24)
_FACTORIES = {"zeros": 0, "zeros_like": 0, "new_zeros": 0, "ones": 1, "ones_like": 1, "new_ones": 1}
_MAX_DEPTH = 64
_LEVEL = 1000  # index variable of vmap level L: _LEVEL + L
# ops whose output may share storage with their first input (a mutation of one changes the other)
_ALIASING = _IDENTITY + ("getitem", "view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "expand", "expand_as",
                         "permute", "transpose", "t", "narrow", "select", "flatten", "unflatten", "view_as",
                         "_add_batch_dim", "_remove_batch_dim")
_IN_PLACE = ("iadd", "isub", "imul", "itruediv", "iand", "ior", "ixor", "setitem")


class _Unreadable(Exception):
    """A node whose value cannot be written as an expression without losing a dependence."""


def _mutates(n: fx.Node) -> bool:
    """An in-place op: ``operator.iadd`` & co., or a torch op / method with a trailing underscore."""
    f = name(n)
    if n.op == "call_function" and getattr(n.target, "__module__", None) in ("_operator", "operator"):
        return f in _IN_PLACE  # (operator.and_ is not in place)
    return f.endswith("_") and not f.startswith("_")


def written(graph: fx.Graph) -> set[fx.Node]:
    """Every node that may share storage with a tensor some op writes in place (its value then depends
    on when it is read, which an expression cannot say)."""
    alias: dict[fx.Node, fx.Node] = {}  # union-find over may-alias edges

    def root(m: fx.Node) -> fx.Node:
        while alias.get(m, m) is not m:
            m = alias[m]
        return m

    targets = set()
    for m in graph.nodes:
        first = m.args[0] if m.args and isinstance(m.args[0], fx.Node) else None
        if first is not None and (name(m) in _ALIASING or _mutates(m)):
            alias[root(m)] = root(first)
        if first is not None and _mutates(m):
            targets.add(first)
    roots = {root(t) for t in targets}
    return {m for m in graph.nodes if root(m) in roots} if roots else set()


class Builder:
    """Memoized reading of nodes into expressions over their own index variables."""

    def __init__(self) -> None:
        self.memo: dict[fx.Node, Any] = {}
        self.depth = 0  # mask graphs are shallow; past _MAX_DEPTH a node is simply read as opaque
        self.levels: dict[fx.Node, frozenset] = {}
        self.mutated: set[fx.Node] = set()

    def final(self, node: fx.Node):
        """``node`` (a mask term, rank <= 4) as an expression over the score axes, or None."""
        r = _rank(node)
        try:
            return None if r > 4 else _shift(self.of(node), r, 4)
        except _Unreadable:
            return None

    def of(self, x: Any):
        if isinstance(x, bool):
            return Const(x)
        if isinstance(x, numbers.Integral):
            return Aff((), int(x))
        if isinstance(x, numbers.Real):
            return Const(float(x))
        if not isinstance(x, fx.Node):
            return None
        if x not in self.memo:
            self._scan(x.graph)
            if x in self.mutated:
                raise _Unreadable(x)  # written in place somewhere: its value depends on when it is read
            self.depth += 1
            try:
                e = self._rule(x) if self.depth < _MAX_DEPTH else None
            except (IndexError, KeyError, TypeError, ValueError, ZeroDivisionError):
                e = None  # a spelling the rules do not read (keyword arguments, odd signatures): opaque
            finally:
                self.depth -= 1
            v = val(x)
            if e is None or not isinstance(v, torch.Tensor):
                e = self.opaque(x)
            else:  # a size-1 dim is read at index 0 only
                e = subst(e, {d: Aff() if size1(s) else Aff(((d, 1),)) for d, s in enumerate(v.shape)})
            self.memo[x] = e
        return self.memo[x]

    def opaque(self, node: fx.Node) -> Read:
        if self._levels(node):
            raise _Unreadable(node)  # a vmap-batched value: its Read would hide the batch variables
        v = val(node)
        shape = v.shape if isinstance(v, torch.Tensor) else ()
        return Read(node, tuple(Aff() if size1(s) else Aff(((d, 1),)) for d, s in enumerate(shape)))

    def _at(self, x: Any, r_out: int):
        e = self.of(x)
        return None if e is None else _shift(e, _rank(x), r_out)

    def _rule(self, n: fx.Node):
        if n.op not in ("call_function", "call_method") or not isinstance(val(n), torch.Tensor):
            return None
        f = name(n)
        r = _rank(n)
        if f in _COMPARE or f in _BOOL_BINARY or f in ("add", "sub", "mul", "iadd", "isub", "imul", "rsub"):
            a, b = self._at(arg(n, 0, "input"), r), self._at(arg(n, 1, "other"), r)
            if a is None or b is None or arg(n, 2, "alpha", 1) != 1:
                return None
            if f in _COMPARE:
                return compare(_COMPARE[f], a, b)
            if f in _BOOL_BINARY:
                return _BOOL_BINARY[f](a, b) if _dtype(n) == torch.bool else None
            if f in ("sub", "isub", "rsub"):
                return add(b, neg(a)) if f == "rsub" else add(a, neg(b))
            return add(a, b) if f in ("add", "iadd") else mul(a, b)
        if f in ("invert", "logical_not", "bitwise_not", "__invert__", "neg", "abs"):
            a = self._at(n.args[0], r)
            if a is None:
                return None
            if f == "neg":
                return neg(a)
            if f == "abs":
                return Op("abs", (a,))
            return not_(a) if _dtype(n) == torch.bool else None
        if f == "arange":
            return self._arange(n)
        if f in _FACTORIES or f in ("full", "full_like", "new_full", "scalar_tensor", "tensor"):
            return self._factory(n, f)
        if f in ("where", "masked_fill"):
            x, c, other = (n.args[0], n.args[1], n.args[2]) if f == "masked_fill" else (n.args[2], *n.args[:2])
            parts = [self._at(p, r) for p in (c, other, x)]
            return None if any(p is None for p in parts) or _dtype(c) != torch.bool else ite(*parts)
        if f in ("tril", "triu"):
            return self._tril(n, f == "tril")
        if f in _IDENTITY:
            return self._cast(n)
        if f in ("_add_batch_dim", "_remove_batch_dim"):
            return self._vmap(n, f)
        return self._view(n, f)

    def _scan(self, graph: fx.Graph) -> None:
        """The vmap levels each node is batched over (vmap under dynamo: ``_add_batch_dim`` ...
        ``_remove_batch_dim``), and the nodes written in place; one pass in graph order."""
        if self.levels:
            return
        for m in graph.nodes:
            inner = frozenset().union(*(self.levels[a] for a in m.all_input_nodes))
            f = name(m)
            self.levels[m] = (inner | {m.args[2]} if f == "_add_batch_dim"
                              else inner - {m.args[1]} if f == "_remove_batch_dim" else inner)
        self.mutated = written(graph)

    def _levels(self, n: fx.Node) -> frozenset:
        self._scan(n.graph)
        return self.levels[n]

    def _vmap(self, n: fx.Node, f: str):
        """A vmap level is an index variable of its own (_LEVEL + level) until its batch dim comes back."""
        x = n.args[0]
        e, r = self.of(x), _rank(x)
        if f == "_add_batch_dim":  # (x, in_dim, level): dim in_dim becomes the level's variable
            d = n.args[1] % r
            return subst(e, {v: Aff(((_LEVEL + n.args[2] if v == d else v - (v > d), 1),)) for v in range(r)})
        level, out_dim = n.args[1], n.args[3] % (r + 1)  # (y, level, batch_size, out_dim)
        return subst(e, {**{v: Aff(((v + (v >= out_dim), 1),)) for v in range(r)},
                         _LEVEL + level: Aff(((out_dim, 1),))})

    def _arange(self, n: fx.Node):
        a = [arg(n, i, k) for i, k in enumerate(("start", "end", "step"))]
        start, step = (0, 1) if a[1] is None else (a[0], a[2] if a[2] is not None else 1)
        ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (start, step))
        return Aff(((0, step),), start) if ints and _dtype(n) in _EXACT else None

    def _factory(self, n: fx.Node, f: str):
        if f in _FACTORIES:
            value = _FACTORIES[f]
        elif f in ("full", "full_like", "new_full"):
            value = arg(n, 1, "fill_value")
        else:
            value = arg(n, 0, "data")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return Const(value) if isinstance(value, bool) and _dtype(n) == torch.bool else None
        return _typed(value, _dtype(n))

    def _tril(self, n: fx.Node, lower: bool):
        x, k = n.args[0], arg(n, 1, "diagonal", 0)
        r = _rank(n)
        e = self._at(x, r)
        if e is None or not isinstance(k, int) or r < 2:
            return None
        d = Aff(((r - 2, -1), (r - 1, 1)), -k)  # col - row - k: tril keeps <= 0, triu keeps >= 0
        keep = atom(d) if lower else atom(d.times(-1))
        return ite(keep, e, _typed(0, _dtype(n)))

    def _cast(self, n: fx.Node):
        src = n.args[0] if n.args else n.kwargs.get("input")
        e, before, after = self._at(src, _rank(n)), _dtype(src), _dtype(n)
        if e is None or before is None or after is None or val(src).shape != val(n).shape:
            return None
        if before == after:
            return e
        if after == torch.bool:
            return ne0(e)
        if before == torch.bool:
            return ite(e, _typed(1, after), _typed(0, after))
        if isinstance(e, Const):
            return _typed(e.value, after)
        return e if isinstance(e, Aff) and after in _EXACT else None

    def _view(self, n: fx.Node, f: str):
        if f in ("getitem", "index"):
            return self._getitem(n)
        x = n.args[0] if n.args else None
        views = ("unsqueeze", "expand", "expand_as", "permute", "transpose", "t", "view", "reshape", "_unsafe_view",
                 "squeeze")
        if f not in views or not isinstance(x, fx.Node) or not isinstance(val(x), torch.Tensor):
            return None  # (an op no rule reads: its inputs are not read either)
        e, r_in, r_out = self.of(x), _rank(x), _rank(n)
        if f == "unsqueeze":
            d = arg(n, 1, "dim") % r_out
            return subst(e, {v: Aff(((v + (v >= d), 1),)) for v in range(r_in)})
        if f in ("expand", "expand_as"):
            return _shift(e, r_in, r_out)
        if f in ("permute", "transpose", "t"):
            perm = _perm(n, f, r_in)
            return None if perm is None else subst(e, {perm[k]: Aff(((k, 1),)) for k in range(r_in)})
        if f in ("view", "reshape", "_unsafe_view", "squeeze"):
            dims_in = [d for d, s in enumerate(val(x).shape) if not size1(s)]
            dims_out = [d for d, s in enumerate(val(n).shape) if not size1(s)]
            same = len(dims_in) == len(dims_out) and all(
                eq(val(x).shape[a], val(n).shape[b]) for a, b in zip(dims_in, dims_out))
            return subst(e, {a: Aff(((b, 1),)) for a, b in zip(dims_in, dims_out)}) if same else None
        return None

    def _getitem(self, n: fx.Node):
        x, idx = n.args[:2]
        if not isinstance(x, fx.Node) or not isinstance(val(x), torch.Tensor):
            return None
        idx = tuple(idx) if isinstance(idx, (tuple, list)) else (idx,)
        if Ellipsis in idx:
            k = idx.index(Ellipsis)
            fill = _rank(x) - sum(i is not None for i in idx if i is not Ellipsis)
            idx = idx[:k] + (slice(None),) * fill + idx[k + 1:]
        e, r_in = self.of(x), _rank(x)
        tensors = [i for i in idx if isinstance(i, fx.Node)]
        if tensors:
            return self._advanced(n, e, idx, r_in)
        mapping, p, q = {}, 0, 0
        for i in idx:
            if i is None:
                q += 1
            elif isinstance(i, slice) and i.step in (None, 1) and (i.start is None or isinstance(i.start, int)):
                if (i.start or 0) < 0:
                    return None
                mapping[p] = Aff(((q, 1),), i.start or 0)
                p, q = p + 1, q + 1
            elif isinstance(i, int) and not isinstance(i, bool) and i >= 0:
                mapping[p] = Aff((), i)
                p += 1
            else:
                return None
        for k in range(p, r_in):
            mapping[k] = Aff(((q + k - p, 1),))
        return subst(e, mapping)

    def _advanced(self, n: fx.Node, e, idx: tuple, r_in: int):
        """``x[i0, i1, ...]`` with integer index tensors first (HF's ``padding_mask[batch_idx, kv_idx]``)."""
        m = sum(1 for i in idx if isinstance(i, fx.Node))
        if any(not isinstance(i, fx.Node) for i in idx[:m]) or any(i != slice(None) for i in idx[m:]):
            return None
        if any(_dtype(i) in (torch.bool, None) or _dtype(i).is_floating_point for i in idx[:m]):
            return None
        r_idx = max(_rank(i) for i in idx[:m])
        subs = [self._at(i, r_idx) for i in idx[:m]]
        if not all(isinstance(s, Aff) and s.const >= 0 and all(c > 0 for _, c in s.terms) for s in subs):
            return None  # a negative index would wrap around: only provably non-negative ones substitute
        mapping = dict(enumerate(subs))
        for k in range(m, r_in):
            mapping[k] = Aff(((r_idx + k - m, 1),))
        return subst(e, mapping)


def _perm(n: fx.Node, f: str, r: int) -> tuple[int, ...] | None:
    if f == "t":
        return tuple(reversed(range(r)))
    if f == "transpose":
        d0, d1 = n.args[1] % r, n.args[2] % r
        p = list(range(r))
        p[d0], p[d1] = d1, d0
        return tuple(p)
    dims = n.args[1:] if len(n.args) > 2 else n.args[1] if len(n.args) == 2 else n.kwargs.get("dims")
    return tuple(d % r for d in dims) if dims is not None else None


def _typed(value: Any, dtype: torch.dtype | None):
    """A scalar as the tensor of ``dtype`` holds it."""
    if dtype is None:
        return None
    if dtype == torch.bool:
        return Const(bool(value))
    if not dtype.is_floating_point:
        return Aff((), int(value))
    return Const(float(torch.tensor(float(value), dtype=dtype)))

