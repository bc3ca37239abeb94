"""Mask facts proven by value: constants evaluated on the example inputs.

A value only proves something for every call when it cannot change between
calls: the node depends on no input values (only buffers, constants and shapes;
buffers are assumed not mutated after compilation, as nanoGPT / HF never do) and
on no parameters (they train).  Two uses:

* `buffer_band`: a condition reading constant buffers by (q, kv) is evaluated on the
  buffers' whole extent; a band there is the band of every top-left T x T slice, so
  the proof holds for every length (nanoGPT's ``bias[:, :, :T, :T]``, dynamic T included).
  It is evaluated one slab of rows at a time (`_maskslab.grid_band`: O(N) memory beside the
  buffers), once per condition and buffer values (`_shared_band`: layers with equal buffers
  share it, buffers with other values never do);
* `whole`: a constant term of static size, compared with a band and else cut into
  64 x 64 tiles (empty / full / partial) for the block-sparse kernel.  The term is
  evaluated once (at most `_MAX_CELLS` cells) and then read in stripes of tile rows.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.fx as fx

from .._sizes import hint
from ._graph import ancestors, is_state, name, val
from ._maskeval import evaluate
from ._maskexpr import KEY, QUERY, And, Ite, Not, Op, Or, Read, reads, show
from ._maskread import written
from ._maskslab import ProofCache, Rows, digest, grid_band, slab_rows

_SHAPE_READS = ("size", "sym_size", "dim", "numel", "getattr", "sym_numel")
_MAX_CELLS = 2**26  # a larger constant is left unproven rather than evaluated
_MAX_BUFFER_CELLS = 2**30  # a band over buffers is evaluated in slabs of rows (32k x 32k at most)
TILE = 64


def _learned(n: fx.Node) -> bool:
    return "_parameters_" in n.name or bool(getattr(val(n), "requires_grad", False))


def constant_value(gm: fx.GraphModule, inputs: dict, node: fx.Node) -> torch.Tensor | None:
    """``node`` evaluated on the example inputs, if it depends on no input values and no parameters."""
    anc = ancestors(node) | {node}
    if anc & written(node.graph):
        return None  # a tensor written in place later than this evaluation would see it
    for n in anc:
        if n.op == "get_attr" and isinstance(getattr(gm, n.target, None), torch.nn.Parameter):
            return None
        if n.op != "placeholder" or not isinstance(val(n), torch.Tensor):
            continue
        if is_state(n) and _learned(n):
            return None
        if not is_state(n) and (n is node or any(u in anc and name(u) not in _SHAPE_READS for u in n.users)):
            return None  # the mask is an input, or is computed from an input's values
    sub, env, args = fx.Graph(), {}, []
    for n in gm.graph.nodes:
        if n not in anc:
            continue
        if n.op == "placeholder":
            x = inputs.get(n)
            if x is None or isinstance(x, torch._subclasses.FakeTensor):
                return None
            args.append(hint(x) if isinstance(x, torch.SymInt) else x)  # no guards on the user's shapes
        env[n] = sub.node_copy(n, lambda x: env[x])
    sub.output(env[node])
    try:
        with torch.no_grad():
            out = fx.GraphModule(gm, sub)(*args)
    except Exception:  # noqa: BLE001 - a constant we cannot evaluate is simply not proven
        return None
    return out if isinstance(out, torch.Tensor) and not isinstance(out, torch._subclasses.FakeTensor) else None


def band_of(keep: torch.Tensor) -> tuple[int, int] | None:
    """(lo, hi) if the 2-D ``keep`` is exactly ``lo <= j - i <= hi`` with the diagonal inside, else None
    (read in slabs of rows: O(rows) memory beside ``keep``)."""
    ni, nj = keep.shape
    if not ni or not nj:
        return None
    rows, step = Rows(ni, nj), slab_rows(nj)
    for i0 in range(0, ni, step):
        rows.add(i0, keep[i0:i0 + step])
    return rows.band()


def bounds(lo: int, hi: int, ni: int, nj: int) -> tuple[int | None, int | None]:
    """(left, right) of a band on an ni x nj domain; None where the bound cuts nothing there."""
    return (None if lo <= -(ni - 1) else -lo), (None if hi >= nj - 1 else hi)


def _slab_band(cond: Any, ni: int, nj: int, values: dict) -> tuple[int, int] | None:
    """`band_of` of ``cond`` on the (ni, nj) grid, evaluated one slab of query rows at a time (`grid_band`): the
    memory is O(SLAB_CELLS + ni), and a buffer read by plain (shifted) indices is read in place."""

    def slab(i0: int, n: int) -> torch.Tensor:
        keep = evaluate(cond, {QUERY: n, KEY: nj}, values, {QUERY: i0})
        if keep.dtype != torch.bool or any(s != 1 for s in keep.shape[:2]):
            raise _NotBand
        return keep[0, 0].expand(n, nj)

    try:
        return grid_band(slab, ni, nj)
    except _NotBand:
        return None


class _NotBand(Exception):
    """A slab that is not a 2-D bool grid."""


def _relabel(e: Any, slots: dict) -> Any:
    """``e`` with each `Read` node replaced by its number in ``slots`` (the same structure, built without
    simplifying): two conditions with equal relabelings compute the same function of the read tensors."""
    if isinstance(e, Read):
        return Read(slots.setdefault(e.node, len(slots)), e.index)
    if isinstance(e, (And, Or)):
        return type(e)(frozenset(_relabel(p, slots) for p in e.parts))
    if isinstance(e, Not):
        return Not(_relabel(e.x, slots))
    if isinstance(e, Ite):
        return Ite(_relabel(e.cond, slots), _relabel(e.a, slots), _relabel(e.b, slots))
    if isinstance(e, Op):
        return Op(e.fn, tuple(_relabel(a, slots) for a in e.args))
    return e


_BANDS = ProofCache()  # (relabeled condition, grid, read tensors' digests) -> band or None


def _shared_band(cond: Any, ni: int, nj: int, values: dict) -> tuple[int, int] | None:
    """`_slab_band`, once per condition and values: layers whose buffers hold equal values (equal `digest`)
    share one evaluation; different values never share one."""
    slots: dict = {}
    shape = _relabel(cond, slots)
    key = (shape, ni, nj, tuple(digest(values[node]) for node in slots))
    return _BANDS.get(key, lambda: _slab_band(cond, ni, nj, values))


def buffer_band(gm: fx.GraphModule, inputs: dict, cond: Any) -> tuple[int | None, int | None, str] | None:
    """(left, right, proof) if ``cond`` (over q, kv) reads only constant buffers and is a band on their extent."""
    extents: dict[int, int] = {}
    values = {}
    for r in reads(cond):
        shape = val(r.node).shape if isinstance(val(r.node), torch.Tensor) else None
        if shape is None or any(isinstance(s, torch.SymInt) for s in shape):
            return None
        value = values.get(r.node)
        if value is None:
            value = values[r.node] = constant_value(gm, inputs, r.node)
        if value is None:
            return None
        for idx, size in zip(r.index, shape):
            if idx.terms and (len(idx.terms) != 1 or idx.terms[0][1] != 1 or idx.const < 0):
                return None  # only plain (shifted) index reads cover a prefix of every length
            if idx.terms:
                v = idx.terms[0][0]
                extents[v] = min(extents.get(v, size), size - idx.const)
    if set(extents) != {QUERY, KEY} or extents[QUERY] * extents[KEY] > _MAX_BUFFER_CELLS:
        return None
    ni, nj = extents[QUERY], extents[KEY]
    if ni < 1 or nj < 1:
        return None
    try:
        band = _shared_band(cond, ni, nj, values)
    except (IndexError, RuntimeError):
        return None
    if band is None:
        return None
    left, right = bounds(*band, ni, nj)
    names = ", ".join(sorted({f"{r.node.name} {tuple(val(r.node).shape)}" for r in reads(cond)}))
    proof = (f"by value: {show(cond, 80)} over the whole constant {names} ({ni}x{nj}) equals "
             f"band(left={-1 if left is None else left}, right={-1 if right is None else right}), "
             f"so every top-left slice of any length <= {min(ni, nj)} does")
    return left, right, proof


def _keep_masked(value: torch.Tensor, kind: str, negate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a piece of a constant term keeps the score, and where it masks it (its fill swallows any score)."""
    if kind == "keep":
        keep = value if value.dtype == torch.bool else value != 0
        keep = ~keep if negate else keep
        return keep, ~keep
    return value == 0, torch.isneginf(value) | (value <= torch.finfo(value.dtype).min)


def whole(gm: fx.GraphModule, inputs: dict, kind: str, negate: bool, node: fx.Node, lq: Any, lk: Any,
          square: bool) -> tuple | None:
    """A constant term of static size by value: ("band", left, right, proof) | ("blocksparse", blocks, proof).

    The term is evaluated once (at most `_MAX_CELLS` cells); it is then read in stripes of whole tiles of
    rows, so what the reading adds is O(stripe + tiles)."""
    v = val(node)
    if not isinstance(lq, int) or not isinstance(lk, int) or any(isinstance(s, torch.SymInt) for s in v.shape):
        return None
    if v.dim() < 2 or tuple(v.shape[-2:]) != (lq, lk) or v.numel() > _MAX_CELLS or not lq or not lk:
        return None
    value = constant_value(gm, inputs, node)
    if value is None:
        return None
    lead, step = tuple(value.shape[:-2]), max(TILE, slab_rows(lk) // TILE * TILE)
    rows, defined, same, dead = Rows(lq, lk), True, True, False
    empty = torch.zeros(*lead, -(-lq // TILE), -(-lk // TILE), dtype=torch.bool)
    full = torch.zeros_like(empty)
    for at in itertools.product(*map(range, lead)):
        for i0 in range(0, lq, step):
            keep, masked = _keep_masked(value[at][i0:i0 + step], kind, negate)
            defined = defined and bool((keep | masked).all())
            if any(at):  # a band needs every leading slice (head) to equal the first
                first = value[(0,) * len(at)][i0:i0 + step]
                same = same and torch.equal(keep, _keep_masked(first, kind, negate)[0])
            else:
                rows.add(i0, keep)
            dead = dead or bool(masked.all(-1).any())
            empty[at][i0 // TILE:(i0 + step) // TILE], full[at][i0 // TILE:(i0 + step) // TILE] = _tile(keep, masked)
    shape = "x".join(map(str, value.shape))
    band = rows.band() if square and defined and same else None
    if band is not None:
        left, right = bounds(*band, lq, lk)
        return "band", left, right, (f"by value: constant {shape} mask equals band(left="
                                     f"{-1 if left is None else left}, right={-1 if right is None else right})")
    if dead:  # a row with no visible key is NaN or uniform in eager depending on the fill; skipped tiles give NaN
        return None
    blocks = tiles(empty, full)
    if not blocks["empty"]:
        return None
    return "blocksparse", blocks, (f"by value: constant {shape} mask has {blocks['empty']} empty, {blocks['full']} "
                                   f"full, {blocks['partial']} partial {TILE}x{TILE} tiles")


def _tile(keep: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (TILE x TILE) tiles of a stripe of rows are all masked, and which all kept (edges padded)."""
    n, lk = keep.shape
    pq, pk = -(-n // TILE) * TILE, -(-lk // TILE) * TILE
    k = torch.ones(pq, pk, dtype=torch.bool)
    mk = torch.ones(pq, pk, dtype=torch.bool)
    k[:n, :lk], mk[:n, :lk] = keep, masked
    shape = (pq // TILE, TILE, pk // TILE, TILE)
    return mk.reshape(shape).all(-1).all(-2), k.reshape(shape).all(-1).all(-2)


def tiles(empty: torch.Tensor, full: torch.Tensor) -> dict[str, Any]:
    """Count the tiles, given which are all masked (``empty``) and all kept (``full``), over (..., tq, tk): empty /
    full / partial (mixed).

    ``layout`` (for the report's picture, up to 64 x 64 tiles) is one string per tile row, a character
    per tile: ``.`` empty, ``#`` full, ``+`` partial; over leading dims (heads), a tile is empty or full
    only if it is in all of them.
    """
    n = empty.numel()
    out = {"empty": int(empty.sum()), "full": int((full & ~empty).sum()),
           "partial": n - int(empty.sum()) - int((full & ~empty).sum()), "tile": [TILE, TILE]}
    tq, tk = empty.shape[-2:]
    if tq <= 64 and tk <= 64:
        all_empty = empty.reshape(-1, tq, tk).all(0)
        all_full = (full & ~empty).reshape(-1, tq, tk).all(0)
        out["layout"] = ["".join("." if e else "#" if f else "+" for e, f in zip(er.tolist(), fr.tolist()))
                         for er, fr in zip(all_empty, all_full)]
    return out
