"""Turn a proven mask part back into graph nodes: a key vector (B, 1, 1, Lk), ALiBi slopes (H,).

`Emitter.node(e)` builds ``e`` (an expression over the score axes) as a 4-D tensor
whose dims of the axes ``e`` does not depend on are 1, so a key-padding vector
costs O(B * Lk) to read, never O(Lq * Lk).  A `Read` becomes a view of its node
(integer indices for constant reads, slices to the axis extent, a permute, then
``[None]`` for the missing axes); an index `Aff` becomes an ``arange`` (its extent must be
a static int or a SymInt placeholder of the graph).  New nodes go right after the
latest node they read, with fake example values, so that every later site (and
every layer sharing the mask) can use them.  Anything else: None (not emitted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx

from ._graph import eq, val
from ._maskexpr import HEAD, Aff, And, Atom, Const, Ite, Not, Or, Read, free

_OPS = {"add": operator.add, "mul": operator.mul, "neg": operator.neg, "abs": torch.abs, "eq": torch.eq,
        "ne": torch.ne, "le": torch.le, "lt": torch.lt}


@dataclasses.dataclass
class _Call:
    target: Any
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    method: bool = False


def _tensor(x: Any) -> bool:
    return isinstance(x, (_Call, fx.Node))


class Emitter:
    def __init__(self, gm: fx.GraphModule, extents: tuple, sizes: dict, fake: torch.Tensor) -> None:
        self.gm, self.extents, self.sizes, self.fake = gm, extents, sizes, fake

    def node(self, e, dtype: torch.dtype | None = None) -> fx.Node | None:
        r = self._build(e)
        if not _tensor(r):
            return None
        node = self._insert(r)
        return node if dtype is None or val(node).dtype == dtype else self._insert(_Call("to", (node, dtype),
                                                                                         method=True))

    def call(self, target: Any, *args: Any, method: bool = False) -> fx.Node:
        """A new node ``target(*args)`` (``args[0].target(*args[1:])`` if ``method``) after the nodes it reads."""
        return self._insert(_Call(target, args, method=method))

    def slopes(self, g, coef: float) -> fx.Node | None:
        """fp32 (H,) slopes ``coef * g[h]``."""
        heads = self.extents[HEAD]
        if not isinstance(heads, int):
            return None
        r = self._build(g)
        if isinstance(r, (int, float)) and not isinstance(r, bool):
            r = _Call(torch.full, ((heads,), float(r) * coef), {"dtype": torch.float32, "device": self.fake.device})
            return self._insert(r)
        if not _tensor(r):
            return None
        r = _Call(torch.reshape, (r, (-1,)))
        if HEAD not in free(g):
            r = _Call("expand", (r, heads), method=True)
        r = _Call("to", (r, torch.float32), method=True)
        return self._insert(_Call(operator.mul, (r, coef)) if coef != 1 else r)

    # --- expression -> recipe -------------------------------------------------------------------

    def _build(self, e) -> Any:
        if isinstance(e, Const):
            return e.value
        if isinstance(e, Aff):
            return self._aff(e)
        if isinstance(e, Read):
            return self._read(e)
        if isinstance(e, Atom):
            a = self._aff(e.aff)
            return _Call(torch.le, (a, 0)) if _tensor(a) else None
        if isinstance(e, Not):
            x = self._build(e.x)
            return _Call(torch.logical_not, (x,)) if _tensor(x) else None
        if isinstance(e, (And, Or)):
            parts = [self._build(p) for p in e.parts]
            if not all(_tensor(p) for p in parts):
                return None
            out = parts[0]
            for p in parts[1:]:
                out = _Call(torch.logical_and if isinstance(e, And) else torch.logical_or, (out, p))
            return out
        if isinstance(e, Ite):
            c, a, b = (self._build(x) for x in (e.cond, e.a, e.b))
            return _Call(torch.where, (c, a, b)) if _tensor(c) and a is not None and b is not None else None
        args = [self._build(a) for a in e.args]
        if any(a is None for a in args) or not any(_tensor(a) for a in args):
            return None
        if e.fn == "ne0":
            return _Call(torch.ne, (args[0], 0))
        return _Call(_OPS[e.fn], tuple(args)) if e.fn in _OPS else None

    def _size(self, axis: int, offset: int = 0) -> Any:
        ext = self.extents[axis]
        if isinstance(ext, int):
            return ext + offset
        return self.sizes.get(ext.node.expr) if offset == 0 else None

    def _aff(self, a: Aff) -> Any:
        out: Any = a.const
        for v, c in a.terms:
            n = self._size(v)
            if n is None:
                return None
            idx = _Call(torch.arange, (n,), {"device": self.fake.device})
            idx = _Call(operator.getitem, (idx, tuple(slice(None) if k == v else None for k in range(4))))
            term = idx if c == 1 else _Call(operator.mul, (idx, c))
            out = term if out == 0 else _Call(operator.add, (term, out))
        return out

    def _read(self, r: Read) -> Any:
        shape = val(r.node).shape if isinstance(val(r.node), torch.Tensor) else ()
        index, axes = [], []
        for d, a in enumerate(r.index):
            if not a.terms:
                index.append(a.const)
                continue
            if len(a.terms) != 1 or a.terms[0][1] != 1 or a.const < 0 or a.terms[0][0] in axes:
                return None
            ax = a.terms[0][0]
            if a.const == 0 and eq(shape[d], self.extents[ax]):
                index.append(slice(None))
            else:
                stop = self._size(ax, a.const)
                if stop is None:
                    return None
                index.append(slice(a.const or None, stop))
            axes.append(ax)
        x: Any = r.node
        if any(i != slice(None) for i in index):
            x = _Call(operator.getitem, (x, tuple(index)))
        order = sorted(range(len(axes)), key=lambda k: axes[k])
        if order != list(range(len(axes))):
            x = _Call(torch.permute, (x, order))
        if len(axes) < 4:
            x = _Call(operator.getitem, (x, tuple(slice(None) if k in axes else None for k in range(4))))
        return x

    # --- recipe -> nodes ------------------------------------------------------------------------

    def _insert(self, recipe: _Call) -> fx.Node:
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        refs = list(_refs(recipe))
        last_input = max((n for n in order if n.op == "placeholder"), key=order.__getitem__)
        cursor = max(refs, key=order.__getitem__) if refs else last_input
        fake_mode = self.fake.fake_mode if hasattr(self.fake, "fake_mode") else None
        memo: dict[int, fx.Node] = {}

        def go(x):
            nonlocal cursor
            if not isinstance(x, _Call):
                return x
            if id(x) in memo:
                return memo[id(x)]
            args = tuple(go(a) for a in x.args)
            with self.gm.graph.inserting_after(cursor):
                n = (self.gm.graph.call_method(x.target, args, x.kwargs) if x.method
                     else self.gm.graph.call_function(x.target, args, x.kwargs))
            fake_args = fx.node.map_arg(args, val)
            with fake_mode if fake_mode is not None else contextlib.nullcontext():
                fn = getattr(fake_args[0], x.target) if x.method else x.target
                n.meta["example_value"] = fn(*(fake_args[1:] if x.method else fake_args), **x.kwargs)
            cursor = memo[id(x)] = n
            return n

        return go(recipe)


def _refs(x: Any):
    if isinstance(x, fx.Node):
        yield x
    elif isinstance(x, _Call):
        for a in x.args:
            yield from _refs(a)
    elif isinstance(x, (tuple, list)):
        for a in x:
            yield from _refs(a)
    elif isinstance(x, slice):
        yield from _refs((x.start, x.stop, x.step))

