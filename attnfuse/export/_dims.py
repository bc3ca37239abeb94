"""Dynamic shapes for `attnfuse.export`: what to ask torch.export for, and what it gave.

* `resolve(args, dynamic_shapes)`: the ``dynamic_shapes`` argument of ``torch.export.export`` —
  ``"auto"`` becomes ``Dim.AUTO`` for every dimension of every tensor input (torch.export keeps a dim
  dynamic unless the model fixes it, e.g. a head_dim or a size equal to a constant); anything else
  torch.export accepts (a tuple / dict of ``Dim`` per input) passes through.
* `parse(text, args)`: the CLI's ``--dynamic-dims`` (`SYNTAX`) as such a tuple, every mistake a
  ValueError that says what is expected.
* `reexport(ep, gm)`: the dims that re-export the rewritten module with the dynamic dims of ``ep``,
  ranges and sharing kept (one ``Dim`` per symbol), so the rewritten program accepts the sizes the
  original one did; `kept` checks that a re-export left every dynamic dim dynamic.
* `describe(ep, names)`: one line naming each input's dynamic dims and their ranges.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import sympy
import torch
import torch.utils._pytree as pytree
from torch.export import Dim, ExportedProgram
from torch.utils._sympy.numbers import int_oo

SYNTAX = ("INPUT.DIM=NAME[:MIN..MAX] entries separated by commas or spaces, e.g. '0.0=batch,0.1=seq:1..4096' "
          "(INPUT: the position of a tensor in example_args, DIM: its dimension, both from 0; the same NAME is "
          "the same size; MIN or MAX may be left out)")
_ENTRY = re.compile(r"(\d+)\.(\d+)=([A-Za-z_]\w*)(?::(\d*)\.\.(\d*))?")


def _auto(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {i: Dim.AUTO for i in range(value.dim())} or None
    return None


def resolve(args: tuple, dynamic_shapes: Any) -> Any:
    """torch.export's ``dynamic_shapes`` for ``model(*args)``: None (every size static), ``"auto"`` (every
    dim of every tensor input ``Dim.AUTO``), or a spec torch.export takes, as given."""
    if isinstance(dynamic_shapes, str):
        if dynamic_shapes != "auto":
            raise ValueError(f"dynamic_shapes={dynamic_shapes!r}: allowed values are None, 'auto', or what "
                             "torch.export.export takes (a tuple or dict of torch.export.Dim per input)")
        return tuple(_auto(a) if isinstance(a, torch.Tensor) else pytree.tree_map(_auto, a) for a in args)
    return dynamic_shapes


def parse(text: str, args: tuple) -> tuple:
    """``--dynamic-dims TEXT`` as ``dynamic_shapes`` for ``model(*args)``: one ``{dim: Dim}`` per tensor
    input (None where no dim is named); dims not named stay static."""
    entries = [e for e in re.split(r"[,\s]+", text.strip()) if e]
    if not entries:
        raise ValueError(f"--dynamic-dims is empty; expected {SYNTAX}")
    named: dict[tuple[int, int], str] = {}
    bounds: dict[str, tuple[int | None, int | None]] = {}
    sizes: dict[str, tuple[int, str]] = {}
    for entry in entries:
        m = _ENTRY.fullmatch(entry)
        if m is None:
            raise ValueError(f"--dynamic-dims: cannot read {entry!r}; expected {SYNTAX}")
        i, d, name = int(m[1]), int(m[2]), m[3]
        if i >= len(args):
            raise ValueError(f"--dynamic-dims {entry!r}: there is no input {i}; the example args are inputs "
                             f"0..{len(args) - 1}" if args else f"--dynamic-dims {entry!r}: the model has no inputs")
        value = args[i]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"--dynamic-dims {entry!r}: input {i} is a {type(value).__name__}, not a tensor; "
                             "only tensor inputs have dims")
        if d >= value.dim():
            raise ValueError(f"--dynamic-dims {entry!r}: input {i} has {value.dim()} dims (shape "
                             f"{tuple(value.shape)}), so DIM must be 0..{value.dim() - 1}")
        if (i, d) in named:
            raise ValueError(f"--dynamic-dims: dim {i}.{d} is named twice ({named[i, d]}, {name}); name it once")
        lo, hi = (None if not m[4] else int(m[4])), (None if not m[5] else int(m[5]))
        if m[4] is not None:  # bounds given
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"--dynamic-dims {entry!r}: MIN must be at most MAX")
            if name in bounds and bounds[name] != (lo, hi):
                raise ValueError(f"--dynamic-dims: {name} has two ranges ({_range(*bounds[name])}, "
                                 f"{_range(lo, hi)}); give its range once")
            bounds[name] = (lo, hi)
        size = int(value.shape[d])
        if size < 2:
            raise ValueError(f"--dynamic-dims {entry!r}: input {i} dim {d} has example size {size}, which "
                             "torch.export treats as a constant (sizes 0 and 1 specialize); return an example "
                             "of size 2 or more from fn()")
        if name in sizes and sizes[name][0] != size:
            raise ValueError(f"--dynamic-dims: {name} names dims of different example sizes ({sizes[name][1]} is "
                             f"{sizes[name][0]}, {i}.{d} is {size}); the same name means the same size")
        sizes.setdefault(name, (size, f"{i}.{d}"))
        named[i, d] = name
    for name, (lo, hi) in bounds.items():
        size, where = sizes[name]
        if (lo is not None and size < lo) or (hi is not None and size > hi):
            raise ValueError(f"--dynamic-dims: {name}'s range {_range(lo, hi)} excludes the example size of "
                             f"{where} ({size}); widen the range or change the example")
    dims = {name: Dim(name, **{k: v for k, v in zip(("min", "max"), bounds.get(name, (None, None)))
                               if v is not None}) for name in sizes}
    spec: list[dict[int, Any] | None] = [None] * len(args)
    for (i, d), name in sorted(named.items()):
        spec[i] = {**(spec[i] or {}), d: dims[name]}
    return tuple(spec)


def _range(lo: Any, hi: Any) -> str:
    return f"{'' if lo is None else lo}..{'' if hi is None else hi}"


def _symbol(size: Any) -> sympy.Symbol | None:
    expr = size.node.expr if isinstance(size, torch.SymInt) else None
    return expr if isinstance(expr, sympy.Symbol) else None


def _bounds(ep: ExportedProgram, symbol: sympy.Symbol) -> tuple[int, int | None]:
    vr = ep.range_constraints[symbol]
    return int(vr.lower), (None if vr.upper in (int_oo, sympy.oo) else int(vr.upper))


def _tensors(gm: torch.fx.GraphModule) -> list[Any]:
    return [node.meta.get("val") for node in gm.graph.find_nodes(op="placeholder")]


def reexport(ep: ExportedProgram, gm: torch.fx.GraphModule, exact: bool = True) -> Any:
    """``dynamic_shapes`` for re-exporting ``gm`` (``ep.module()``, rewritten) with ``ep``'s example inputs;
    None when every size is static.

    ``exact``: a ``Dim`` of the same range per symbol of ``ep`` (shared where ``ep`` shares it), ``Dim.AUTO``
    for a size that is an expression of symbols.  Otherwise ``Dim.AUTO`` (bounded by the symbol's range where
    torch supports it) for every dynamic size: the fallback for a program whose guards no range states
    (torch.export rejects exact Dims for them, as for nanoGPT's ``T != block_size``)."""
    dims: dict[sympy.Symbol, Any] = {}
    specs, dynamic = [], False
    for value in _tensors(gm):
        if not isinstance(value, torch.Tensor):
            specs.append(None)
            continue
        spec = {}
        for i, size in enumerate(value.shape):
            if not isinstance(size, torch.SymInt):
                continue
            symbol = _symbol(size)
            if symbol is None or symbol not in ep.range_constraints:
                spec[i] = Dim.AUTO
                continue
            if symbol not in dims:
                lo, hi = _bounds(ep, symbol)
                bounds = {"min": lo, **({} if hi is None else {"max": hi})}
                dims[symbol] = Dim(str(symbol), **bounds) if exact else _bounded_auto(**bounds)
            spec[i] = dims[symbol]
        dynamic |= bool(spec)
        specs.append(spec or None)
    if not dynamic:
        return None
    args, kwargs = pytree.tree_unflatten(specs, ep.call_spec.in_spec)
    return (*args, *kwargs.values())


def _bounded_auto(**bounds: int) -> Any:
    try:
        return Dim.AUTO(**bounds)
    except TypeError:  # torch < 2.7: a hint takes no bounds
        return Dim.AUTO


def kept(before: ExportedProgram, after: ExportedProgram) -> bool:
    """Whether every input size dynamic in ``before`` is dynamic in ``after``."""
    def dynamic(ep: ExportedProgram) -> list[bool]:
        user = set(ep.graph_signature.user_inputs)
        return [isinstance(size, torch.SymInt) for node in ep.graph.find_nodes(op="placeholder")
                if node.name in user and isinstance(node.meta.get("val"), torch.Tensor)
                for size in node.meta["val"].shape]

    return all(a or not b for b, a in zip(dynamic(before), dynamic(after), strict=True))


def labels(model: Any, args: tuple, spec: Any) -> dict[tuple[int, int], str]:
    """``{(tensor input, dim): name}``: the ``Dim`` names in ``spec`` (``dynamic_shapes`` for ``model(*args)``,
    a tuple by position or a dict by parameter name), tensor inputs counted in flattening order; best effort,
    {} where the spec's structure is not one of these (torch's symbols are shown instead)."""
    try:
        if isinstance(spec, dict):
            fn = model.forward if isinstance(model, torch.nn.Module) else model
            params = list(inspect.signature(fn).parameters)[: len(args)]
            spec = tuple(spec.get(p) for p in params)
        if not isinstance(spec, (tuple, list)) or len(spec) != len(args):
            return {}
        leaves = [s for a, s in zip(args, spec) for s in _leaf_specs(a, s)]
        found = {}
        for k, leaf in enumerate(leaves):
            items = leaf.items() if isinstance(leaf, dict) else enumerate(leaf) if isinstance(leaf, (tuple, list)) \
                else ()
            found.update({(k, d): dim.__name__ for d, dim in items if isinstance(dim, Dim)})
        return found
    except Exception:  # names are cosmetic
        return {}


def _leaf_specs(value: Any, spec: Any) -> list[Any]:
    """One spec per tensor leaf of ``value`` (None where ``spec`` gives none)."""
    if isinstance(value, torch.Tensor):
        return [spec]
    if isinstance(value, (tuple, list)):
        return [s for i, v in enumerate(value) for s in
                _leaf_specs(v, spec[i] if isinstance(spec, (tuple, list)) and i < len(spec) else None)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _leaf_specs(v, spec.get(k) if isinstance(spec, dict) else None)]
    return [None for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def describe(ep: ExportedProgram, labels: dict[tuple[int, int], str] | None = None) -> str:
    """``"dynamic dims: x (batch, seq, 24); batch 2..64, seq 2.."``, or ``"static shapes"``: each tensor
    input's shape with its dynamic dims by name (`labels`, else torch's symbol) and each name's range."""
    user = set(ep.graph_signature.user_inputs)
    values = [(node.name, node.meta["val"]) for node in ep.graph.find_nodes(op="placeholder")
              if node.name in user and isinstance(node.meta.get("val"), torch.Tensor)]
    named = {}
    for k, (_, value) in enumerate(values):
        for d, size in enumerate(value.shape):
            symbol = _symbol(size)
            if symbol is not None and (k, d) in (labels or {}):
                named.setdefault(symbol, sympy.Symbol(labels[k, d]))
    shapes, ranges = [], {}
    for name, value in values:
        dims = []
        for size in value.shape:
            if not isinstance(size, torch.SymInt):
                dims.append(str(size))
                continue
            expr = size.node.expr
            for symbol in sorted(expr.free_symbols, key=str):
                if symbol in ep.range_constraints:
                    ranges.setdefault(str(named.get(symbol, symbol)), _range(*_bounds(ep, symbol)))
            dims.append(str(expr.xreplace(named)))
        shapes.append(f"{name} ({', '.join(dims)})")
    if not ranges:
        return "static shapes"
    return f"dynamic dims: {', '.join(shapes)}; {', '.join(f'{k} {v}' for k, v in ranges.items())}"
