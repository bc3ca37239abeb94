"""Mask facts proven by value: constants evaluated on the example inputs.

A value only proves something for every call when it cannot change between
calls: the node depends on no input values (only buffers, constants and shapes;
buffers are assumed not mutated after compilation, as nanoGPT / HF never do) and
on no parameters (they train).  Two uses:

* `buffer_band`: a condition reading constant buffers by (q, kv) is evaluated on the
  buffers' whole extent; a band there is the band of every top-left T x T slice, so
  the proof holds for every length (nanoGPT's ``bias[:, :, :T, :T]``, dynamic T included);
* `whole`: a constant term of static size, compared with a band and else cut into
  64 x 64 tiles (empty / full / partial) for the block-sparse kernel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ._maskexpr import KEY, QUERY, evaluate, reads, show
from ._maskread import written
from .canonicalize import name, val
from .match import _Graph, _hint, _is_state

_SHAPE_READS = ("size", "sym_size", "dim", "numel", "getattr", "sym_numel")
_MAX_CELLS = 2**26  # a larger constant is left unproven rather than evaluated
_MAX_BUFFER_CELLS = 2**30  # a band over buffers is evaluated in slabs of _MAX_CELLS (32k x 32k at most)
TILE = 64


def _learned(n: fx.Node) -> bool:
    return "_parameters_" in n.name or bool(getattr(val(n), "requires_grad", False))


def constant_value(gm: fx.GraphModule, inputs: dict, node: fx.Node) -> torch.Tensor | None:
    """``node`` evaluated on the example inputs, if it depends on no input values and no parameters."""
    anc = _Graph.ancestors(node) | {node}
    if anc & written(node.graph):
        return None  # a tensor written in place later than this evaluation would see it
    for n in anc:
        if n.op == "get_attr" and isinstance(getattr(gm, n.target, None), torch.nn.Parameter):
            return None
        if n.op != "placeholder" or not isinstance(val(n), torch.Tensor):
            continue
        if _is_state(n) and _learned(n):
            return None
        if not _is_state(n) and (n is node or any(u in anc and name(u) not in _SHAPE_READS for u in n.users)):
            return None  # the mask is an input, or is computed from an input's values
    sub, env, args = fx.Graph(), {}, []
    for n in gm.graph.nodes:
        if n not in anc:
            continue
        if n.op == "placeholder":
            x = inputs.get(n)
            if x is None or isinstance(x, torch._subclasses.FakeTensor):
                return None
            args.append(_hint(x) if isinstance(x, torch.SymInt) else x)  # no guards on the user's shapes
        env[n] = sub.node_copy(n, lambda x: env[x])
    sub.output(env[node])
    try:
        with torch.no_grad():
            out = fx.GraphModule(gm, sub)(*args)
    except Exception:  # noqa: BLE001 - a constant we cannot evaluate is simply not proven
        return None
    return out if isinstance(out, torch.Tensor) and not isinstance(out, torch._subclasses.FakeTensor) else None


def band_of(keep: torch.Tensor) -> tuple[int, int] | None:
    """(lo, hi) if the 2-D ``keep`` is exactly ``lo <= j - i <= hi`` with the diagonal inside, else None."""
    ni, nj = keep.shape
    d = torch.arange(nj)[None, :] - torch.arange(ni)[:, None]
    if not bool(keep.any()):
        return None
    lo, hi = int(d[keep].min()), int(d[keep].max())
    if lo > 0 or hi < 0 or not torch.equal(keep, (d >= lo) & (d <= hi)):
        return None
    return lo, hi


def bounds(lo: int, hi: int, ni: int, nj: int) -> tuple[int | None, int | None]:
    """(left, right) of a band on an ni x nj domain; None where the bound cuts nothing there."""
    return (None if lo <= -(ni - 1) else -lo), (None if hi >= nj - 1 else hi)


def _slab_band(cond: Any, ni: int, nj: int, values: dict) -> tuple[int, int] | None:
    """`band_of` of ``cond`` on the (ni, nj) grid, evaluated in slabs of query rows (memory O(_MAX_CELLS)):
    a first pass finds the extreme diagonals that keep, a second checks that exactly that band keeps."""
    rows = max(1, _MAX_CELLS // max(1, nj))
    lo, hi = None, None
    for check in (False, True):
        for i0 in range(0, ni, rows):
            n = min(rows, ni - i0)
            keep = evaluate(cond, {QUERY: n, KEY: nj}, values, {QUERY: i0})
            if keep.dtype != torch.bool:
                return None
            keep = keep.expand(*keep.shape[:2], n, nj).reshape(-1, n, nj)
            if keep.shape[0] != 1:
                return None
            d = torch.arange(nj)[None, :] - torch.arange(i0, i0 + n)[:, None]
            if check:
                if not torch.equal(keep[0], (d >= lo) & (d <= hi)):
                    return None
            elif bool(keep.any()):
                lo = min(lo, int(d[keep[0]].min())) if lo is not None else int(d[keep[0]].min())
                hi = max(hi, int(d[keep[0]].max())) if hi is not None else int(d[keep[0]].max())
        if lo is None or lo > 0 or hi < 0:
            return None
    return lo, hi


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
    try:
        band = _slab_band(cond, ni, nj, values)
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


def whole(gm: fx.GraphModule, inputs: dict, kind: str, negate: bool, node: fx.Node, lq: Any, lk: Any,
          square: bool) -> tuple | None:
    """A constant term of static size by value: ("band", left, right, proof) | ("blocksparse", blocks, proof)."""
    v = val(node)
    if not isinstance(lq, int) or not isinstance(lk, int) or any(isinstance(s, torch.SymInt) for s in v.shape):
        return None
    if v.dim() < 2 or tuple(v.shape[-2:]) != (lq, lk) or v.numel() > _MAX_CELLS:
        return None
    value = constant_value(gm, inputs, node)
    if value is None:
        return None
    if kind == "keep":
        keep = value if value.dtype == torch.bool else value != 0
        keep = ~keep if negate else keep
        masked = ~keep
    else:
        keep = value == 0
        masked = torch.isneginf(value) | (value <= torch.finfo(value.dtype).min)
    shape = "x".join(map(str, value.shape))
    flat = keep.reshape(-1, lq, lk)
    if square and bool((keep | masked).all()) and all(torch.equal(f, flat[0]) for f in flat[1:]):
        band = band_of(flat[0])
        if band is not None:
            left, right = bounds(*band, lq, lk)
            return "band", left, right, (f"by value: constant {shape} mask equals band(left="
                                         f"{-1 if left is None else left}, right={-1 if right is None else right})")
    if bool(masked.all(-1).any()):
        # a row with no visible key is NaN or uniform in eager depending on the fill; skipped tiles give NaN
        return None
    blocks = tiles(keep, masked)
    if not blocks["empty"]:
        return None
    return "blocksparse", blocks, (f"by value: constant {shape} mask has {blocks['empty']} empty, {blocks['full']} "
                                   f"full, {blocks['partial']} partial {TILE}x{TILE} tiles")


def tiles(keep: torch.Tensor, masked: torch.Tensor) -> dict[str, Any]:
    """Count the (TILE x TILE) tiles of the last two dims: all masked / all kept / mixed (edges padded).

    ``layout`` (for the report's picture, up to 64 x 64 tiles) is one string per tile row, a character
    per tile: ``.`` empty, ``#`` full, ``+`` partial; over leading dims (heads), a tile is empty or full
    only if it is in all of them.
    """
    *lead, lq, lk = keep.shape
    pq, pk = -(-lq // TILE) * TILE, -(-lk // TILE) * TILE
    k = torch.ones(*lead, pq, pk, dtype=torch.bool)
    mk = torch.ones(*lead, pq, pk, dtype=torch.bool)
    k[..., :lq, :lk], mk[..., :lq, :lk] = keep, masked
    shape = (*lead, pq // TILE, TILE, pk // TILE, TILE)
    empty = mk.reshape(shape).all(-1).all(-2)
    full = k.reshape(shape).all(-1).all(-2)
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

