"""Packed documents and prefix-LM: mask structures the `flex` family runs from O(B * L) vectors.

A keep condition (a bool term, or an additive ``where(P, 0, fill)``) is split into conjuncts.  Besides the
band atoms and key conditions `attnfuse.passes.masks` reads (their helpers `conjuncts`, `band_bound`,
`keyed` ... live here), two more are proven:

* documents: ``S[.., b, q] == S[.., b, kv]``, one tensor read at the query's and at the key's position by
  the same index map (``seg[:, None, :, None] == seg[:, None, None, :]``, ``seg.unsqueeze(-1) ==
  seg.unsqueeze(-2)``, HF's ``packed_sequence_mask[batch_idx, q_idx] == ..[batch_idx, kv_idx]``), of an
  integer or bool dtype (exact as int64), not depending on the head;
* prefix: ``band OR P(b, kv)``: a conjunction of band atoms that keep the diagonal, or any condition on
  (b, kv) only (keys every query sees, e.g. ``kv < prefix_len[b]``).  Conjuncts with one ``P`` intersect
  their bands; a band outside the OR would also limit the prefix keys, so then nothing is proven.

Both need q_len == kv_len (one position axis for queries and keys).  The term stays as it is in `MaskInfo`
(dense); `term` proves it for the `flex` family as a `DocTerm` with a new (B, 2, L) int64 node ``doc``
(row 0 ``S(b, j)``, row 1 ``P(b, j)``), and `combine` joins it with the site's other terms into a `FlexMask`:

    keep(b, h, i, j) = (remaining terms keep) AND doc[b, 0, i] == doc[b, 0, j] AND (inband(i, j) OR doc[b, 1, j])

The runtime masks doc/band scores with -inf.  So the term's fill must swallow every score (`absorbs`); a
finite one (finfo.min) gives eager's value only on rows that keep a key, which documents and bands always do
(the diagonal), so with a finite fill nothing else may mask (no key vector, no other term).  With -inf, no
remaining keep term may have a finite fill (a later finite fill overrides eager's -inf on a dead row).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx

from . import _maskvalue
from ._graph import val
from ._maskemit import Emitter
from ._maskexpr import (
    BATCH,
    HEAD,
    KEY,
    QUERY,
    Aff,
    And,
    Atom,
    Const,
    Ite,
    Not,
    Op,
    Or,
    Read,
    and_,
    free,
    ne0,
    not_,
    or_,
    reads,
    show,
    subst,
)
from ._records import MaskTerm, absorbs

LARGE_NEGATIVE = -1e4  # the matcher's bound for a mask fill
# the mask kinds, in report order
KINDS = ("documents", "prefix", "causal", "window", "padding", "bias", "alibi", "blocksparse", "dense")
_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class FlexMask:
    """A site's masks as the `flex` family runs them, without an N x N tensor (module docstring)."""

    terms: tuple[MaskTerm, ...]  # the mask tensors still read (key vectors ...), as MaskInfo's terms
    doc: fx.Node  # int64 (B, 2, L): [:, 0] segment id per position, [:, 1] 1 where the key is a prefix key
    causal: bool
    window_left: int  # -1 unbounded
    window_right: int
    kinds: tuple[str, ...]  # in KINDS order
    proof: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class DocTerm:
    """What one mask term proves for the `flex` family."""

    doc: fx.Node
    keys: MaskTerm | None  # the term's key conditions as a key vector term
    left: int | None  # band bounds (None: unbounded); with a prefix, the band its OR names
    right: int | None
    kinds: frozenset
    fill: float
    proof: tuple[str, ...]


# --- conjuncts and atoms (shared with `attnfuse.passes.masks`) ------------------------------------

def conjuncts(p) -> list:
    return list(p.parts) if isinstance(p, And) else [p]


def summands(e) -> list:
    if isinstance(e, Op) and e.fn == "add":
        return [s for a in e.args for s in summands(a)]
    return [e]


def is_zero(e) -> bool:
    return e == Aff() or (isinstance(e, Const) and not isinstance(e.value, bool) and e.value == 0)


def keyed(e) -> bool:
    """Whether ``e`` is a key vector: it depends on the key index, never on the query's."""
    fv = free(e)
    return KEY in fv and QUERY not in fv


def negative(e, bound: float = LARGE_NEGATIVE) -> bool:
    return isinstance(e, Const) and not isinstance(e.value, bool) and e.value <= bound


def band_bound(a: Aff) -> tuple[str, int] | None:
    """An atom over (q, kv) as ("left", l): kv >= q - l, or ("right", r): kv <= q + r."""
    k, c = a.coef(KEY), a.const
    if not k or a.coef(QUERY) != -k or len(a.terms) != 2:
        return None
    return ("right", -c // k) if k > 0 else ("left", -c // -k)  # k(kv - q) + c <= 0, floor division


def _meet(a: int | None, b: int | None) -> int | None:
    return a if b is None else b if a is None else min(a, b)


# --- one term ---------------------------------------------------------------------------------------

def term(site: Any, t: MaskTerm, e: Any) -> tuple[DocTerm | None, list[str]]:
    """The `DocTerm` of mask term ``t`` (read as ``e`` over the score axes) at ``site`` (`masks._Site`), or None
    and why (proof lines; none when the term has neither a segment equality nor a prefix)."""
    if e is None or site.wide:
        return None, []
    got = _keep(t, e)
    if got is None:
        return None, []
    pred, fill = got
    s = _Split(site, pred)
    if not s.tried:
        return None, []
    why = s.why or ([] if site.square else ["q_len == kv_len is not proven"])
    if not absorbs(fill, site.fake.dtype) or (t.kind == "add" and not absorbs(fill, val(t.node).dtype)):
        why = why or [f"the fill {fill:g} does not swallow every score"]
    doc = None if why else _doc(site, s.seg, s.prefix)
    keys = None if why or doc is None or not s.keys else _keys(site, t, s.keys, fill)
    if not why and (doc is None or (s.keys and keys is None)):
        why = ["a part has no tensor form"]
    if why:
        return None, [f"flex: no documents / prefix mask: {w}" for w in why]
    kinds = frozenset({"documents"} if s.seg is not None else ()) | ({"prefix"} if s.prefix is not None else set()) \
        | ({"padding"} if s.keys else set())
    return DocTerm(doc, keys, s.left, s.right, kinds, fill, tuple(s.proof)), []


def _keep(t: MaskTerm, e: Any) -> tuple[Any, float] | None:
    """(keep condition, fill) of a term: a keep term, or an additive ``where(P, 0, fill)`` (fill <= finfo.min)."""
    mdtype = val(t.node).dtype
    if t.kind == "keep":
        pred = e if mdtype == torch.bool else ne0(e)
        return (not_(pred) if t.negate else pred), t.fill
    parts = [p for p in summands(e) if not is_zero(p)]
    if not mdtype.is_floating_point or len(parts) != 1 or not isinstance(parts[0], Ite):
        return None
    p = parts[0]
    for cond, x, f in ((p.cond, p.a, p.b), (not_(p.cond), p.b, p.a)):
        if is_zero(x) and negative(f, torch.finfo(mdtype).min):
            return cond, f.value
    return None


class _Split:
    """The conjuncts of a keep condition: key conditions, band, segment equality, prefix OR; why not."""

    def __init__(self, site: Any, pred: Any) -> None:
        self.keys, self.proof, self.why = [], [], []
        self.left = self.right = self.seg = self.prefix = None
        self.tried = False  # a segment equality or a prefix OR was seen
        outer, ors = False, []
        for c in conjuncts(pred):
            if keyed(c):
                self.keys.append(c)
                self.proof.append(f"symbolic: {show(c, 80)} depends on (b, h, kv) only -> key padding vector")
                continue
            bound = band_bound(c.aff) if isinstance(c, Atom) else None
            buffer = None if bound or isinstance(c, Or) or not reads(c) or not free(c) <= {QUERY, KEY} else \
                _maskvalue.buffer_band(site.gm, site.inputs, c)
            if bound and bound[1] < 0:
                self.why.append(f"{show(c, 80)} excludes the diagonal")
            elif bound or buffer:
                side, n = bound or ("", 0)
                left, right, proof = (n if side == "left" else None, n if side == "right" else None,
                                      _band_text(side, n)) if bound else buffer
                self.left, self.right, outer = _meet(self.left, left), _meet(self.right, right), True
                self.proof.append(proof)
            elif isinstance(c, Or):
                ors.append(c)
            else:
                self._segment(c)
        for c in ors:
            self._prefix(c)
        if self.prefix is not None and outer:
            self.why.append("a band outside the prefix's OR would also hide prefix keys")

    def _segment(self, c: Any) -> None:
        args = c.x.args if isinstance(c, Not) and isinstance(c.x, Op) and c.x.fn == "ne" else \
            c.args if isinstance(c, Op) and c.fn == "eq" else None
        if args is None:
            self.why.append(f"{show(c, 80)} is not a band, key condition, segment equality or prefix")
            return
        a, b = args
        if {QUERY, KEY} <= free(a) | free(b):
            self.tried = True
        for x, y in ((a, b), (b, a)):
            if isinstance(y, Read) and free(y) <= {BATCH, KEY} and free(x) <= {BATCH, QUERY} and KEY in free(y) \
                    and subst(x, {QUERY: Aff(((KEY, 1),))}) == y:
                if self.seg is not None:
                    self.why.append("two segment equalities")
                elif _integral(y.node):
                    self.seg = y
                    self.proof.append(f"symbolic: {show(c, 80)}: one tensor read at the query's and the key's "
                                      "position -> documents (segment id per position)")
                else:
                    self.why.append(f"{show(c, 80)} compares values of dtype {val(y.node).dtype}")
                return
        self.why.append(f"{show(c, 80)} does not read one tensor at the query's and the key's position alike")

    def _prefix(self, c: Or) -> None:
        band = [p for p in c.parts if QUERY in free(p)]
        keys = frozenset(p for p in c.parts if QUERY not in free(p))
        bounds = [band_bound(a.aff) if isinstance(a, Atom) else None for a in conjuncts(band[0])] if band else []
        if any(all(isinstance(a, Atom) and band_bound(a.aff) for a in conjuncts(p)) for p in band):
            self.tried = True  # a band under an OR
        if len(band) != 1 or not keys or not bounds or not all(bounds):
            self.why.append(f"{show(c, 80)}: an OR other than (band) | (a condition on (b, kv))")
        elif any(n < 0 for _, n in bounds):
            self.why.append(f"{show(c, 80)}: its band excludes the diagonal")
        elif any(HEAD in free(p) for p in keys):
            self.why.append(f"{show(c, 80)}: the prefix keys depend on the head")
        elif self.prefix is not None and keys != self.prefix:
            self.why.append("two ORs with different prefix keys")
        else:
            self.prefix = keys
            for side, n in bounds:
                if side == "left":
                    self.left = _meet(self.left, n)
                else:
                    self.right = _meet(self.right, n)
            self.proof.append(f"symbolic: {show(c, 80)} -> prefix keys (visible past the band)")


def _band_text(side: str, n: int) -> str:
    return f"symbolic: kv {'>=' if side == 'left' else '<='} q {'-' if side == 'left' else '+'} {n} (index comparison)"


def _integral(node: fx.Node) -> bool:
    v = val(node)
    return isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and not v.dtype.is_complex


def _extent(site: Any, axis: int) -> Any:
    ext = site.extents[axis]
    return ext if isinstance(ext, int) else site.sizes.get(ext.node.expr)


def _doc(site: Any, seg: Read | None, prefix: frozenset | None) -> fx.Node | None:
    """The (B, 2, L) int64 node: row 0 ``seg`` at each key position, row 1 ``prefix`` (O(B * L))."""
    b, n = _extent(site, BATCH), _extent(site, KEY)
    if b is None or n is None:
        return None
    em = Emitter(site.gm, site.extents, site.sizes, site.fake)
    rows = []
    for e in (seg, None if prefix is None else ne0(or_(*prefix))):
        if e is None:
            rows.append(None)
            continue
        x = em.node(e, torch.int64)  # (B | 1, 1, 1, L | 1)
        if x is None:
            return None
        x = em.call(operator.getitem, x, (slice(None), 0, 0, slice(None)))
        rows.append(em.call("expand", x, b, n, method=True))
    r0 = rows[0] if rows[0] is not None else em.call(torch.zeros_like, rows[1])
    r1 = rows[1] if rows[1] is not None else em.call(torch.zeros_like, rows[0])
    return em.call(torch.stack, (r0, r1), 1)


def _keys(site: Any, t: MaskTerm, keys: list, fill: float) -> MaskTerm | None:
    """The term's key conditions as a key vector term (as `masks` emits them: keep stays keep, additive additive)."""
    em = Emitter(site.gm, site.extents, site.sizes, site.fake)
    if t.kind == "keep":
        node = em.node(and_(*keys))
        return None if node is None else MaskTerm("keep", node, fill=fill)
    node = em.node(Ite(and_(*keys), Const(0.0), Const(fill)), val(t.node).dtype)
    return None if node is None else MaskTerm("add", node)


# --- the site -------------------------------------------------------------------------------------

def combine(m: Any, results: list, dtype: torch.dtype) -> FlexMask | None:
    """The site's `FlexMask` from its terms' results (`masks._Result`: terms, left, right, kinds, flex, alibi,
    block_sparse, params, proof), or None.  ``m`` is the match, ``dtype`` the scores'."""
    docs = [r for r in results if r.flex is not None]
    if len(docs) != 1 or m.window_pad or m.bucketed or m.sinks is not None:
        return None
    if any(r.alibi is not None or r.block_sparse for r in results):
        return None
    d: DocTerm = docs[0].flex
    others = [r for r in results if r is not docs[0]]
    terms = [t for r in others for t in r.terms]
    fills = [r.params["fill"] for r in others if "fill" in r.params]
    if any(not absorbs(f, dtype) for f in fills):
        return None
    finite = d.fill != _INF or any(f != _INF for f in fills) or any(t.kind == "keep" and t.fill != _INF
                                                                    for t in terms)
    if finite and (terms or d.keys is not None):
        return None  # a row another mask leaves without a key: eager's value depends on every fill
    left, right = d.left, d.right
    outer = m.causal
    for r in others:
        left, right, outer = _meet(left, r.left), _meet(right, r.right), outer or r.left is not None or \
            r.right is not None
    right = 0 if m.causal else right
    if "prefix" in d.kinds and outer:
        return None  # another term's band hides prefix keys too
    causal = right == 0 or m.causal
    wl, wr = -1 if left is None else left, -1 if right is None or causal else right
    kinds = set(d.kinds) | {k for r in others for k in r.kinds} | ({"causal"} if causal else set()) \
        | ({"window"} if wl >= 0 or wr >= 0 else set())
    proof = (["is_causal=True"] if m.causal else []) + list(d.proof) + [p for r in others for p in r.proof]
    return FlexMask(tuple(([d.keys] if d.keys is not None else []) + terms), d.doc, causal, wl, wr,
                    tuple(k for k in KINDS if k in kinds), tuple(proof))
