"""Mask analysis: prove what each mask of a match is, from the graph that builds it.

Entry point: `analyze(gm, match, example_inputs) -> (AttentionMatch, MaskInfo)`.

Each mask term is read symbolically (`_maskread`) as an expression over the score
axes (b, h, q, kv) and split into parts, each classified only when proven:

* keep conditions (bool terms, and additive ``where(P, x, fill)`` whose fill swallows
  any score: -inf or <= finfo(dtype).min) are split into conjuncts.  Atoms
  ``kv - q <= r`` / ``q - kv <= l`` are a band (causal when r = 0), folded into
  ``causal`` / ``window_left`` / ``window_right`` only when q_len == kv_len is proven;
  conjuncts that never depend on q are one key-padding vector, emitted as a new
  (B, 1, 1, Lk) (or (B, H, 1, Lk)) term that the kernels read through broadcast
  strides; conjuncts reading constant buffers by (q, kv) (nanoGPT's ``bias[:, :, :T, :T]``)
  are evaluated on the whole buffer (`_maskvalue.buffer_band`): a band there holds for
  every length;
* additive parts: the constant 0 is dropped; ``g[h] * (a*kv + b*q + c)`` is ALiBi with
  slopes ``a * g`` (the rest is constant along kv, and softmax ignores it); parts that
  never depend on q are an additive key vector (padding if filled with <= -1e4, else a
  bias); anything else is a bias kept as a tensor.

A term with an unproven part stays exactly as it was ("dense", or "bias" when
additive).  Its proven band atoms are still folded when its fill is -inf (they only
repeat what the term masks, and let the kernels skip tiles), not with a finite fill:
a row the term masks entirely is uniform in eager but would be NaN with the band.
Such a constant term of static size is also read by value (`_maskvalue.whole`): a
band, or a block-sparse mask with an empty 64x64 tile.  Band entries are -inf in the
kernels; ``params["fill"]`` is the fill eager used outside the band (finite for HF
masks: a row that padding leaves without a visible key is then uniform over all keys).

Packed documents (``seg[b, q] == seg[b, kv]``) and prefix-LM (``band | P[b, kv]``) stay dense here;
`_maskdoc` proves them beside, as ``MaskInfo.flex`` (a `FlexMask` the `flex` family runs from a
(B, 2, L) vector node instead of the L x L term).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from .._sizes import hint
from . import _maskdoc, _maskvalue
from ._graph import arg, eq, val
from ._maskdoc import KINDS, FlexMask, band_bound, conjuncts, is_zero, keyed, negative, summands
from ._maskemit import Emitter
from ._maskexpr import HEAD, KEY, QUERY, Aff, Atom, Const, Ite, Op, and_, free, ne0, not_, reads, show
from ._maskread import Builder, size1
from ._records import AttentionMatch, MaskTerm, operand_shape


@dataclasses.dataclass(frozen=True)
class MaskInfo:
    """What a match's masks were proven to be (see the module docstring)."""

    kinds: tuple[str, ...]  # in KINDS order; () = no mask
    causal: bool = False
    window_left: int = -1  # key j visible from query i iff j >= i - left (-1: unbounded)
    window_right: int = -1  # ... and j <= i + right (-1: unbounded; causal caps it at 0)
    alibi: fx.Node | None = None  # fp32 (H,) slopes: s[b, h, i, j] += alibi[h] * (j - i)
    block_sparse: bool = False  # the single remaining term is a constant with empty 64x64 tiles
    proof: tuple[str, ...] = ()
    params: dict = dataclasses.field(default_factory=dict)
    flex: FlexMask | None = None  # the same masks for the `flex` family (documents, prefix: `_maskdoc`)

    def report(self) -> dict:
        flex = {"flex": {"kind": "+".join(self.flex.kinds), "proof": list(self.flex.proof)}} if self.flex else {}
        return {"kind": "+".join(self.kinds) or "none", **self.params, "proof": list(self.proof), **flex}


@dataclasses.dataclass
class _Result:
    """One term's contribution to the site's MaskInfo."""

    terms: list
    left: int | None = None  # band bounds; None = unbounded
    right: int | None = None
    alibi: fx.Node | None = None
    block_sparse: bool = False
    kinds: set = dataclasses.field(default_factory=set)
    proof: list = dataclasses.field(default_factory=list)
    params: dict = dataclasses.field(default_factory=dict)
    flex: _maskdoc.DocTerm | None = None


def analyze(gm: fx.GraphModule, m: AttentionMatch, example_inputs: Sequence[Any] | None):
    """``m`` with ``causal`` set and its masks reduced to what must still be read, and its `MaskInfo`."""
    if m.form == "mha":  # (L, N, E) inputs: `_mha.forward` applies these masks itself
        return m, _mha_info(m)
    site = _Site(gm, m, example_inputs)
    alibi = None
    left, right = (m.window_left, m.window_right) if m.window_pad or m.bucketed else (None, None)
    terms, kinds, proof, params, sparse, results = [], set(), ["is_causal=True"] if m.causal else [], {}, False, []
    if m.window_pad:
        proof.append(f"window ({left}, {right}): F.pad + unfold windows over the sequence; the padded rows are "
                     "keys with score 0 and value 0 (window_pad)")
    if m.sinks is not None:
        proof.append("attention sink: one more key per row, of score sinks[b, h] and value 0 (a row whose every "
                     "real key is masked is 0, as eager's softmax over the sink alone)")
    if m.bucketed:
        proof.append(f"window ({left}, {right}) by value: bucketed blocks gathered by reshape/pad/unfold, and their "
                     "position masks leave each query exactly this band of its sequence")
    for term in m.masks:
        r = _cached(site, term)
        if r.alibi is not None and alibi is not None:
            r = _Result([term], kinds={"bias"}, proof=["a second ALiBi term stays an additive tensor"])
        results.append(r)
        terms += r.terms
        kinds |= r.kinds
        proof += r.proof
        params.update(r.params)
        left = r.left if left is None else left if r.left is None else min(left, r.left)
        right = r.right if right is None else right if r.right is None else min(right, r.right)
        alibi = alibi if r.alibi is None else r.alibi
        sparse = sparse or r.block_sparse
    if sparse and len(terms) != 1:  # the kernels classify the tiles of one constant mask
        sparse, kinds = False, (kinds - {"blocksparse"}) | {"dense"}
        proof.append("dense: block-sparse tiles need the constant mask to be the only mask tensor")
    causal = m.causal or right == 0
    wl, wr = -1 if left is None else left, -1 if right is None or causal else right
    kinds |= ({"causal"} if causal else set()) | ({"window"} if wl >= 0 or wr >= 0 else set())
    if "window" in kinds:
        params["window"] = [wl, 0 if causal else wr]
    if not {"causal", "window"} & kinds:
        params.pop("fill", None)
    if terms:
        params["tensors"] = [_describe(t) for t in terms]
    info = MaskInfo(tuple(k for k in KINDS if k in kinds), causal=causal, window_left=wl, window_right=wr,
                    alibi=alibi, block_sparse=sparse, proof=tuple(proof), params=params,
                    flex=_maskdoc.combine(m, results, site.fake.dtype))
    return dataclasses.replace(m, causal=causal, masks=tuple(terms)), info


def _describe(term: MaskTerm) -> dict:
    """A mask tensor that is still read, for the report."""
    v = val(term.node)
    return {"kind": "additive" if term.kind == "add" else "bool", "shape": [hint(s) for s in v.shape],
            "dtype": str(v.dtype).replace("torch.", ""), **({"fill": term.fill} if term.kind == "keep" else {}),
            "requires_grad": bool(getattr(v, "requires_grad", False))}


def _mha_info(m: AttentionMatch) -> MaskInfo:
    kinds, proof = set(), []
    if m.pattern == "transformer_encoder_layer" and m.masks:
        padding = arg(m.anchor, 19, "mask_type") == 1
        return MaskInfo(("padding",) if padding else ("dense",), proof=(
            f"{'key padding ' if padding else ''}mask of _transformer_encoder_layer_fwd, read as bool (nonzero hides "
            "the key) as the native op reads it",))
    for term in m.masks:
        padding = arg(m.anchor, 14, "key_padding_mask") is term.node
        kinds.add("padding" if padding else "dense")
        proof.append(f"{'key_padding_mask' if padding else 'attn_mask'} of multi_head_attention_forward "
                     "(applied as given)")
    return MaskInfo(tuple(k for k in KINDS if k in kinds), proof=tuple(proof))


class _Site:
    """The score axes of one match (extents, q_len == kv_len?) and what new nodes need."""

    def __init__(self, gm: fx.GraphModule, m: AttentionMatch, example_inputs: Sequence[Any] | None) -> None:
        self.gm = gm
        qs, ks = operand_shape(m.q), operand_shape(m.k)
        q4 = [1] * (4 - len(qs)) + qs
        # rank > 4: a term is read over the last four score axes (its own rank is at most 4); only what it says
        # about the (query, key) axes is kept (`_cached`)
        self.extents = (q4[-4], q4[-3], q4[-2], ks[-2])
        self.wide = len(qs) > 4
        self.square = self.extents is not None and eq(qs[-2], ks[-2])
        self.fake = val(m.q.node)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        ok = example_inputs is not None and len(placeholders) == len(example_inputs)
        self.inputs = dict(zip(placeholders, example_inputs)) if ok else {}
        self.sizes = {val(p).node.expr: p for p in placeholders if isinstance(val(p), torch.SymInt)}

    def key(self) -> tuple:
        return self.square, self.fake.dtype, self.wide, tuple(str(e) for e in self.extents or ())


def _cached(site: _Site, term: MaskTerm) -> _Result:
    """`_term`, once per (term node, site shape) of a graph: layers share a mask node, and then its new nodes."""
    cache = site.gm.meta.setdefault("attnfuse_masks", {})
    key = (term.node, term.kind, term.negate, term.fill, site.key())
    if key not in cache:
        res = _term(site, term)
        if site.wide and (res.alibi is not None or any(t is not term for t in res.terms)):
            # new tensors (a key vector, ALiBi slopes) are laid out for 4-D scores: the term stays as written
            res = _Result([term], kinds={"bias" if term.kind == "add" else "dense"},
                          proof=["dense: attention with more than 2 batch dims keeps this term as written"])
        cache[key] = res
    return cache[key]


def _term(site: _Site, term: MaskTerm) -> _Result:
    # rank > 4: no expression reading (its new tensors would be laid out for 4-D scores); by value only
    e = Builder().final(term.node) if site.extents is not None and not site.wide else None
    parts = _Parts(site, term, e) if e is not None else None
    res = parts.emit() if parts is not None and not parts.residual else None
    if res is not None:
        return res
    res = _Result([term], kinds={"bias" if term.kind == "add" and (parts is None or parts.bias) else "dense"})
    if parts is not None:
        res.proof = [f"dense: {why}" for why in parts.residual or ["a part has no tensor form"]]
        if parts.band_proof and parts.fill == float("-inf"):
            # the term stays whole; its band only repeats what the term masks, and lets the kernels skip tiles
            res.left, res.right, res.params = parts.left, parts.right, {"fill": parts.fill}
            res.proof = parts.band_proof + res.proof
        elif parts.band_proof:  # a row the rest of the term masks would be uniform in eager, NaN with the band
            res.proof = [f"{p} (not folded: the term stays, with a finite fill)" for p in parts.band_proof] + res.proof
    else:
        res.proof = ["dense: the mask has more than 4 dims, or is written in place, or is batched by vmap"]
    res.flex, why = _maskdoc.term(site, term, e)
    res.proof += why
    ext = site.extents or (None,) * 4
    got = _maskvalue.whole(site.gm, site.inputs, term.kind, term.negate, term.node, ext[2], ext[3], site.square)
    if got is None:
        return res
    if got[0] == "band":
        return _Result([], left=got[1], right=got[2], proof=[got[3]],
                       params={"fill": term.fill} if term.kind == "keep" else {})
    res.kinds = {"blocksparse"}
    res.block_sparse, res.proof = True, [p for p in res.proof if not p.startswith("dense:")] + [got[2]]
    blocks = got[1]
    total = blocks["empty"] + blocks["full"] + blocks["partial"]
    res.params = {**res.params, "blocks": blocks, "density": (total - blocks["empty"]) / total}
    return res


def _alibi(p) -> tuple[Any, float] | None:
    """(g, a) if ``p == g[h] * (a*kv + b*q + c)`` (g a function of the head only)."""
    if isinstance(p, Op) and p.fn == "neg":
        r = _alibi(p.args[0])
        return None if r is None else (r[0], -r[1])
    if not (isinstance(p, Op) and p.fn == "mul"):
        return None
    for g, x in (p.args, p.args[::-1]):
        if isinstance(x, Aff) and x.coef(KEY) and free(x) <= {QUERY, KEY} and free(g) <= {HEAD}:
            return (g, x.coef(KEY)) if not isinstance(g, Aff) else None
        if isinstance(x, Const) and not isinstance(x.value, bool):
            r = _alibi(g)
            if r is not None:
                return r[0], r[1] * x.value
    return None


def _key_shaped(node: fx.Node) -> bool:
    """A tensor that is already (.., 1, 1, Lk)-shaped: read per key, never per query."""
    shape = [1] * 4 + list(val(node).shape)
    return size1(shape[-3]) and size1(shape[-2])


class _Parts:
    """The parts of one mask term (module docstring), and a reason for each unproven one."""

    def __init__(self, site: _Site, term: MaskTerm, e: Any) -> None:
        self.site, self.term = site, term
        self.left = self.right = self.fill = None
        self.keys, self.adds, self.alibi, self.bias = [], [], [], []  # adds: additive key masks
        self.band_proof, self.proof, self.residual = [], [], []
        self.key_only = True  # every part is a key vector
        dtype = val(term.node).dtype
        if term.kind == "keep":
            pred = e if dtype == torch.bool else ne0(e)
            self._keep(not_(pred) if term.negate else pred, term.fill)
        elif not dtype.is_floating_point:
            self.residual.append(f"an additive mask of dtype {dtype}")
        else:
            for p in summands(e):
                self._add(p, torch.finfo(dtype).min)

    def _add(self, p, floor: float) -> None:
        if is_zero(p):
            self.proof.append("symbolic: an additive part is the constant 0 (dropped)")
            return
        fills = [f.value for f in (p.a, p.b) if negative(f)] if isinstance(p, Ite) else []
        if isinstance(p, Ite) and not keyed(p):
            for cond, x, f in ((p.cond, p.a, p.b), (not_(p.cond), p.b, p.a)):
                if negative(f, floor):
                    self._keep(cond, f.value)  # s + fill == fill: the fill swallows the score
                    if not is_zero(x):
                        self._add(x, floor)  # x only matters where cond keeps
                    return
        slope = None if fills else _alibi(p)
        if slope is None and keyed(p):  # exact as an additive (B, 1, 1, Lk) vector, whatever the fill
            (self.adds if fills else self.bias).append(p)
            self.proof.append(f"symbolic: additive {show(p, 80)} depends on (b, h, kv) only -> "
                              f"{'key padding' if fills else 'key bias'} vector")
            return
        self.key_only = False
        if fills:
            self.residual.append(f"an additive mask filled with {fills[0]:g} > finfo.min: s + fill is not "
                                 "the fill, so its structure is not separable")
        elif slope is not None:
            self.alibi.append(slope)
            self.proof.append(f"symbolic: additive {show(p, 80)} = slopes[h] * {slope[1]:g} * kv + (terms constant "
                              "along kv, which softmax ignores) -> alibi")
        else:
            self.bias.append(p)
            self.proof.append(f"bias: additive {show(p, 80)} stays a tensor")

    def _keep(self, pred, fill: float) -> None:
        if self.fill is not None and fill != self.fill:
            self.residual.append(f"keep conditions with different fills ({self.fill}, {fill})")
        self.fill = fill
        for c in conjuncts(pred):
            if keyed(c):
                self.keys.append(c)
                self.proof.append(f"symbolic: {show(c, 80)} depends on (b, h, kv) only -> key padding vector")
                continue
            self.key_only = False
            bound = band_bound(c.aff) if isinstance(c, Atom) else None
            buffer = None if bound or not reads(c) or not free(c) <= {QUERY, KEY} else \
                _maskvalue.buffer_band(self.site.gm, self.site.inputs, c)
            if (bound or buffer) and not self.site.square:
                self.residual.append(f"{show(c, 80)} is a band, but q_len == kv_len is not proven")
            elif bound and bound[1] < 0:
                self.residual.append(f"{show(c, 80)} excludes the diagonal")
            elif bound:
                side, n = bound
                self._band(n if side == "left" else None, n if side == "right" else None,
                           f"symbolic: kv {'>=' if side == 'left' else '<='} q {'-' if side == 'left' else '+'} {n} "
                           "(index comparison)")
            elif buffer:
                self._band(*buffer)
            else:
                self.residual.append(f"{show(c, 80)} is not a band, key vector or constant-buffer band")

    def _band(self, left: int | None, right: int | None, proof: str) -> None:
        if left is not None:
            self.left = left if self.left is None else min(self.left, left)
        if right is not None:
            self.right = right if self.right is None else min(self.right, right)
        self.band_proof.append(proof)

    def emit(self) -> _Result | None:
        """The proven parts as a `_Result` with new mask nodes, or None if some part has no tensor form.

        Key parts of a keep term become a bool (B, 1, 1, Lk) keep vector; those of an additive
        term stay additive (``where(keep, 0, fill)``): ``s + fill`` still has eager's gradient in a row
        whose every key is masked, where a replaced score has none.
        """
        if len(self.alibi) > 1:
            return None
        res = _Result([], left=self.left, right=self.right, proof=self.band_proof + self.proof)
        res.kinds = ({"padding"} if self.keys or self.adds else set()) | ({"bias"} if self.bias else set())
        if self.keys or self.adds:
            res.params["padding"] = f"{'key' if self.term.kind == 'keep' else 'additive key'} vector (B, 1, 1, Lk)"
        if self.band_proof and self.fill is not None:
            res.params["fill"] = self.fill
        em = Emitter(self.site.gm, self.site.extents, self.site.sizes, self.site.fake)
        if (self.key_only and _key_shaped(self.term.node)) or (self.bias and not (
                self.keys or self.adds or self.alibi or self.band_proof)):
            res.terms.append(self.term)  # already a key vector, or a plain bias: it stays as it is
        elif self.term.kind == "keep" and self.keys:
            node = em.node(and_(*self.keys))
            if node is None:
                return None
            res.terms.append(MaskTerm("keep", node, fill=self.fill))
        elif self.keys or self.adds or self.bias:
            parts = ([Ite(and_(*self.keys), Const(0.0), Const(self.fill))] if self.keys else []) + self.adds + self.bias
            total = parts[0]
            for p in parts[1:]:
                total = Op("add", (total, p))
            node = em.node(total, val(self.term.node).dtype)
            if node is None:
                return None
            res.terms.append(MaskTerm("add", node))
        if self.alibi:
            res.alibi = em.slopes(*self.alibi[0])
            if res.alibi is None:
                return None
            res.kinds.add("alibi")
            res.params["alibi_heads"] = self.site.extents[HEAD]
        return res
