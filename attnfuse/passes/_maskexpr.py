"""Mask expressions: a tensor of a mask-building graph as a function of its element index.

A tensor of rank r is an expression over index variables ``0..r-1``; a mask term
re-indexed onto the score axes ``BATCH, HEAD, QUERY, KEY`` is what
`attnfuse.passes.masks` classifies.  The vocabulary is small and exact:

* `Aff`   integer affine form ``sum(c * x_v) + c0`` (``arange``, shifts, index math)
* `Atom`  the predicate ``aff <= 0`` (every integer comparison normalizes to it)
* `And` / `Or` / `Not`, `Ite` (``where``, ``masked_fill``, ``tril``/``triu``)
* `Const` a bool or float scalar (``torch.zeros(())``, ``finfo.min``)
* `Read`  element ``node[index]`` of a tensor the analysis does not look into
  (a model input, a buffer, a learned bias); the index is affine in the variables
* `Op`    any other elementwise function of sub-expressions (``mul``, ``abs``, ``ne0`` = ``!= 0`` ...)

The constructors simplify only by exact identities (De Morgan, ``not (a <= 0)``
is ``1 - a <= 0`` over the integers, an index is never negative), so a
conclusion drawn from an expression holds for every value of every `Read`.
`_maskeval.evaluate` computes an expression on a concrete grid (for constant buffers).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.fx as fx

BATCH, HEAD, QUERY, KEY = range(4)  # the score axes
AXES = "b", "h", "q", "kv"


@dataclasses.dataclass(frozen=True)
class Aff:
    terms: tuple[tuple[int, int], ...] = ()  # sorted (var, coef), coef != 0
    const: int = 0

    @staticmethod
    def of(terms: dict[int, int], const: int = 0) -> Aff:
        return Aff(tuple(sorted((v, c) for v, c in terms.items() if c)), const)

    def coef(self, v: int) -> int:
        return dict(self.terms).get(v, 0)

    def plus(self, other: Aff, k: int = 1) -> Aff:
        terms = dict(self.terms)
        for v, c in other.terms:
            terms[v] = terms.get(v, 0) + k * c
        return Aff.of(terms, self.const + k * other.const)

    def times(self, k: int) -> Aff:
        return Aff.of({v: c * k for v, c in self.terms}, self.const * k)

    def __str__(self) -> str:
        parts = [("" if c == 1 else "-" if c == -1 else f"{c}*") + AXES[v] if v < 4 else f"x{v}"
                 for v, c in self.terms]
        s = " + ".join(parts).replace("+ -", "- ")
        return f"{s} {'+' if self.const >= 0 else '-'} {abs(self.const)}" if s and self.const else s or str(self.const)


@dataclasses.dataclass(frozen=True, eq=False)
class Const:
    value: bool | float

    # True == 1.0 in Python; a bool constant and a float one must stay apart
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Const) and type(other.value) is type(self.value) and other.value == self.value

    def __hash__(self) -> int:
        return hash((type(self.value), self.value))


@dataclasses.dataclass(frozen=True)
class Atom:
    aff: Aff  # aff <= 0


@dataclasses.dataclass(frozen=True)
class And:
    parts: frozenset


@dataclasses.dataclass(frozen=True)
class Or:
    parts: frozenset


@dataclasses.dataclass(frozen=True)
class Not:
    x: Any


@dataclasses.dataclass(frozen=True)
class Ite:
    cond: Any
    a: Any
    b: Any


@dataclasses.dataclass(frozen=True)
class Read:
    node: fx.Node
    index: tuple[Aff, ...]


@dataclasses.dataclass(frozen=True)
class Op:
    fn: str
    args: tuple


TRUE, FALSE = Const(True), Const(False)


def children(e) -> tuple:
    if isinstance(e, (And, Or)):
        return tuple(e.parts)
    return {Not: lambda: (e.x,), Ite: lambda: (e.cond, e.a, e.b), Op: lambda: e.args}.get(type(e), tuple)()


def free(e) -> set[int]:
    """The index variables ``e`` depends on."""
    if isinstance(e, Aff):
        return {v for v, _ in e.terms}
    if isinstance(e, Atom):
        return free(e.aff)
    if isinstance(e, Read):
        return set().union(*(free(i) for i in e.index))
    return set().union(*(free(c) for c in children(e)))


def reads(e) -> list[Read]:
    if isinstance(e, Read):
        return [e]
    return [r for c in children(e) for r in reads(c)]


def subst(e, mapping: dict[int, Aff]):
    """``e`` with every variable v in ``mapping`` replaced by ``mapping[v]`` (simultaneously)."""
    if isinstance(e, Aff):
        out = Aff((), e.const)
        for v, c in e.terms:
            out = out.plus(mapping.get(v, Aff(((v, 1),))), c)
        return out
    if isinstance(e, Atom):
        return atom(subst(e.aff, mapping))
    if isinstance(e, Read):
        return Read(e.node, tuple(subst(i, mapping) for i in e.index))
    if isinstance(e, And):
        return and_(*(subst(p, mapping) for p in e.parts))
    if isinstance(e, Or):
        return or_(*(subst(p, mapping) for p in e.parts))
    if isinstance(e, Not):
        return not_(subst(e.x, mapping))
    if isinstance(e, Ite):
        return ite(subst(e.cond, mapping), subst(e.a, mapping), subst(e.b, mapping))
    if isinstance(e, Op):
        return Op(e.fn, tuple(subst(a, mapping) for a in e.args))
    return e


# --- constructors that simplify ------------------------------------------------------------------

def atom(a: Aff):
    if not a.terms:
        return Const(a.const <= 0)
    if a.const <= 0 and all(c < 0 for _, c in a.terms):
        return TRUE  # every index is >= 0
    if a.const > 0 and all(c > 0 for _, c in a.terms):
        return FALSE
    return Atom(a)


def _flat(kind, parts):
    out = set()
    for p in parts:
        out |= p.parts if isinstance(p, kind) else {p}
    return out


def and_(*parts):
    ps = _flat(And, parts) - {TRUE}
    if FALSE in ps:
        return FALSE
    return next(iter(ps)) if len(ps) == 1 else And(frozenset(ps)) if ps else TRUE


def or_(*parts):
    ps = _flat(Or, parts) - {FALSE}
    if TRUE in ps:
        return TRUE
    return next(iter(ps)) if len(ps) == 1 else Or(frozenset(ps)) if ps else FALSE


def not_(x):
    if isinstance(x, Const):
        return Const(not x.value)
    if isinstance(x, Atom):  # not (a <= 0)  <=>  -a + 1 <= 0 over the integers
        return atom(x.aff.times(-1).plus(Aff((), 1)))
    if isinstance(x, And):
        return or_(*(not_(p) for p in x.parts))
    if isinstance(x, Or):
        return and_(*(not_(p) for p in x.parts))
    return x.x if isinstance(x, Not) else Not(x)


def ite(c, a, b):
    if isinstance(c, Const):
        return a if c.value else b
    if (a, b) in ((TRUE, FALSE), (FALSE, TRUE)):
        return c if a == TRUE else not_(c)
    return a if a == b else Ite(c, a, b)


def _scalar(x) -> bool:
    return isinstance(x, Const) or (isinstance(x, Aff) and not x.terms)


def ne0(x):
    """``x != 0`` (a numeric tensor read as bool)."""
    if _scalar(x):
        return Const(bool(x.value if isinstance(x, Const) else x.const))
    if isinstance(x, Ite) and _scalar(x.a) and _scalar(x.b):
        return ite(x.cond, ne0(x.a), ne0(x.b))
    return Op("ne0", (x,))


def add(a, b):
    if isinstance(a, Aff) and isinstance(b, Aff):
        return a.plus(b)
    if isinstance(a, Const) and isinstance(b, Const):
        return Const(a.value + b.value)
    if _is_zero(a) or _is_zero(b):
        return b if _is_zero(a) else a
    return Op("add", (a, b))


def neg(a):
    if isinstance(a, Aff):
        return a.times(-1)
    return Const(-a.value) if isinstance(a, Const) else Op("neg", (a,))


def mul(a, b):
    for x, y in ((a, b), (b, a)):
        if isinstance(x, Aff) and isinstance(y, Aff) and not y.terms:
            return x.times(y.const)
    if isinstance(a, Const) and isinstance(b, Const):
        return Const(a.value * b.value)
    return Op("mul", (a, b))


def _is_zero(x) -> bool:
    return (isinstance(x, Const) and x.value == 0 and not isinstance(x.value, bool)) or x == Aff()


def _as_aff(x):
    if isinstance(x, Const) and not isinstance(x.value, bool) and float(x.value).is_integer():
        return Aff((), int(x.value))
    return x


def compare(op: str, a, b):
    """``a op b`` for op in le, lt, ge, gt, eq, ne; integer comparisons become atoms."""
    if op in ("ge", "gt"):
        a, b, op = b, a, "le" if op == "ge" else "lt"
    a, b = _as_aff(a), _as_aff(b)
    for x, y, swap in ((a, b, False), (b, a, True)):  # a where() of constants against a constant: per branch
        if isinstance(x, Ite) and _scalar(x.a) and _scalar(x.b) and _scalar(y):
            return ite(x.cond, *(compare(op, y, z) if swap else compare(op, z, y) for z in (x.a, x.b)))
    if op in ("eq", "ne"):
        if isinstance(a, Aff) and isinstance(b, Aff):
            eq = and_(atom(a.plus(b, -1)), atom(b.plus(a, -1)))
            return eq if op == "eq" else not_(eq)
        return Op(op, (a, b))
    s = Aff((), int(op == "lt"))
    if isinstance(a, Aff) and isinstance(b, Aff):
        return atom(a.plus(b, -1).plus(s))
    if isinstance(a, Op) and a.fn == "abs" and isinstance(a.args[0], Aff) and isinstance(b, Aff):
        x = a.args[0]  # |x| <= b  <=>  x <= b and -x <= b
        return and_(atom(x.plus(b, -1).plus(s)), atom(x.times(-1).plus(b, -1).plus(s)))
    if isinstance(b, Op) and b.fn == "abs" and isinstance(b.args[0], Aff) and isinstance(a, Aff):
        x = b.args[0]  # a <= |x|  <=>  a <= x or a <= -x
        return or_(atom(a.plus(x, -1).plus(s)), atom(a.plus(x).plus(s)))
    return Op(op, (a, b))


def show(e, limit: int = 160) -> str:
    """A readable rendering of ``e`` for the report (axes named b, h, q, kv)."""
    if isinstance(e, Aff):
        s = str(e)
    elif isinstance(e, Atom):
        s = f"{e.aff} <= 0"
    elif isinstance(e, Const):
        s = repr(e.value)
    elif isinstance(e, Read):
        s = f"{e.node.name}[{', '.join(map(str, e.index))}]"
    elif isinstance(e, Not):
        s = f"~({show(e.x, limit)})"
    elif isinstance(e, (And, Or)):
        s = (" & " if isinstance(e, And) else " | ").join(sorted(f"({show(p, limit)})" for p in e.parts))
    elif isinstance(e, Ite):
        s = f"where({show(e.cond, limit)}, {show(e.a, limit)}, {show(e.b, limit)})"
    else:
        s = f"{e.fn}({', '.join(show(a, limit) for a in e.args)})"
    return s if len(s) <= limit else s[:limit - 3] + "..."
