"""Mask recipes: how a graph's mask output is computed from its small inputs, and how another graph gets it back.

A *recipe* is a small `fx.GraphModule` whose placeholders are *leaves* (what it reads of the graph that built the
mask: small tensor inputs, and constants -- ints, shapes -- read from the inputs) and whose output is the mask.

* `recipes(gm)`: the outputs of ``gm`` that are mask-like (bool or floating, rank >= 2, no gradient) and computed
  only from small inputs (each at most an eighth of the mask's elements, or 1-D) by pure, deterministic ops
  (no random, in-place, data-dependent or side-effect node, and no node of the slice written in place later).
* `mask_inputs(gm)`: the placeholders of ``gm`` that reach a matched attention site's mask term and are
  (.., Lq, Lk)-sized (both of the last two dims > 1), with the anchors of the sites that read them.
* `splice(gm, recipes)`: a copy of ``gm`` where each such placeholder's uses read a recipe's output instead;
  the recipe's tensor leaves become new placeholders at the end, its constant leaves are written in.
* `synthesized(...)`: the recipe of a band and/or key-padding mask recognized by value (`_maskrecognize`).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any

import torch
import torch.fx as fx

from .._sizes import hint
from . import canonicalize, masks, match
from ._graph import eq, name, val
from ._records import operand_shape

__all__ = ["Leaf", "Recipe", "mask_inputs", "recipes", "splice", "synthesized"]

_RANDOM = ("dropout", "bernoulli", "multinomial", "normal", "uniform", "poisson", "exponential", "geometric",
           "cauchy", "seed", "random")
_IMPURE = {"item", "tolist", "nonzero", "unique", "masked_select", "numpy", "data_ptr", "print", "empty",
           "empty_like", "new_empty", "empty_strided", "resize", "record_stream", "setitem", "__setitem__"}
_IMPURE_PARTS = ("assert", "set_grad_enabled", "vmap", "batch_dim", "autocast", "copy_", "sync", "wait", "collective",
                 "functional_call")
_OPERATOR_INPLACE = {"iadd", "iand", "iconcat", "ifloordiv", "ilshift", "imod", "imul", "imatmul", "ior", "ipow",
                     "irshift", "isub", "itruediv", "ixor"}
_META = {"size", "sym_size", "dim", "numel", "sym_numel", "stride", "sym_stride"}  # read shapes, not values
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout"}
_VIEWS = {"view", "reshape", "expand", "expand_as", "unsqueeze", "squeeze", "getitem", "contiguous", "to", "float",
          "bool", "type", "type_as", "_to_copy", "clone", "detach", "alias", "slice", "select", "permute",
          "transpose", "narrow", "half", "bfloat16", "flatten", "repeat", "lift_fresh_copy"}


@dataclasses.dataclass(frozen=True)
class Leaf:
    """What a recipe reads: placeholder ``index`` of the graph that built the mask (or its ``attr``), as a
    tensor (``read`` None) or a constant read from it (``read``: a method name / ``getattr`` attribute, with
    ``extra`` arguments)."""

    index: int
    read: str | None = None
    extra: tuple = ()
    attr: str | None = None

    def value(self, args: tuple, owner: Any = None) -> Any:
        x = functools.reduce(getattr, self.attr.split("."), owner) if self.attr else args[self.index]
        if self.read is None:
            return x
        if self.read.startswith("."):
            return getattr(x, self.read[1:])
        return getattr(x, self.read)(*self.extra)


@dataclasses.dataclass(frozen=True)
class Recipe:
    gm: fx.GraphModule  # placeholders: one per leaf, in order; output: the mask
    leaves: tuple[Leaf, ...]

    @property
    def code(self) -> str:
        return self.gm.code


def _target_name(node: fx.Node) -> str:
    return name(node) or str(node.target)


def _mutating(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    n = _target_name(node)
    if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
        return True
    if n in ("setitem", "__setitem__") or "out" in node.kwargs:
        return True
    if getattr(node.target, "__module__", None) in ("_operator", "operator"):
        return n in _OPERATOR_INPLACE  # operator.and_ / or_ are pure
    if n.startswith("__i") and n.endswith("__") and n not in ("__invert__", "__index__"):
        return True  # __iadd__, __iand__, ...
    return n.endswith("_") and not n.endswith("__")


def _pure(node: fx.Node) -> bool:
    if node.op == "call_method":
        n = node.target
    elif node.op == "call_function":
        if isinstance(node.target, torch._ops.HigherOrderOperator):
            return False
        n = _target_name(node)
    else:
        return False
    low = n.lower()
    random = low.startswith("rand") or any(w in low for w in _RANDOM)
    return not (_mutating(node) or random or low in _IMPURE or any(w in low for w in _IMPURE_PARTS))


def _numel(v: Any) -> int | None:
    """Elements of ``v`` by the example values of its sizes (adds no guard); None for an unbacked size."""
    total = 1
    for s in v.shape:
        n = hint(s, -1)
        if n < 0:
            return None
        total *= n
    return total


def _meta_read(node: fx.Node, placeholders: dict) -> tuple | None:
    """(placeholder, read, extra) if ``node`` reads only the shape / dtype / device of a placeholder."""
    if not node.args or node.args[0] not in placeholders or node.kwargs:
        return None
    if node.op == "call_method" and node.target in _META and all(isinstance(a, int) for a in node.args[1:]):
        return node.args[0], node.target, tuple(node.args[1:])
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 and node.args[1] in _META_ATTRS:
        return node.args[0], "." + node.args[1], ()
    if node.op == "call_function" and name(node) in ("sym_size", "size") and len(node.args) == 2 \
            and isinstance(node.args[1], int):
        return node.args[0], "size", (node.args[1],)
    return None


def _slice(gm: fx.GraphModule, out: fx.Node, numel: int) -> Recipe | None:
    """The recipe of ``out``, or None if its backward slice reads a large input or an impure node."""
    placeholders = {p: i for i, p in enumerate(gm.graph.find_nodes(op="placeholder"))}
    leaves: dict[fx.Node, Leaf] = {}
    inner: set[fx.Node] = set()
    stack, seen = [out], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        meta = _meta_read(node, placeholders)
        if meta is not None:
            leaves[node] = Leaf(placeholders[meta[0]], meta[1], meta[2])
            continue
        v = val(node)
        if node.op in ("placeholder", "get_attr"):
            if isinstance(v, torch.Tensor):
                if v.requires_grad or (v.dim() > 1 and (_numel(v) is None or _numel(v) * 8 > numel)):
                    return None
            elif not isinstance(v, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)):
                return None
            leaves[node] = Leaf(placeholders.get(node, -1), attr=node.target if node.op == "get_attr" else None)
            continue
        if not _pure(node) or any(_mutating(u) for u in node.users):
            return None
        inner.add(node)
        stack.extend(node.all_input_nodes)
    if not inner:
        return None
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    order = [n for n in gm.graph.nodes if n in leaves]
    for i, node in enumerate(order):
        env[node] = graph.placeholder(f"leaf{i}")
    for node in gm.graph.nodes:
        if node in inner:
            env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(env[out])
    return Recipe(fx.GraphModule(gm, graph), tuple(leaves[n] for n in order))


def recipes(gm: fx.GraphModule) -> dict[int | None, Recipe]:
    """{output position (None: the graph returns one value): recipe} of ``gm``'s mask-like outputs."""
    out = next(iter(gm.graph.find_nodes(op="output")))
    ret = out.args[0]
    items = list(enumerate(ret)) if isinstance(ret, (tuple, list)) else [(None, ret)]
    found = {}
    for pos, node in items:
        v = val(node) if isinstance(node, fx.Node) else None
        if not isinstance(v, torch.Tensor) or v.dim() < 2 or v.requires_grad:
            continue
        if not (v.dtype == torch.bool or v.dtype.is_floating_point) or node.op == "placeholder":
            continue
        numel = _numel(v)
        recipe = _slice(gm, node, numel) if numel else None
        if recipe is not None:
            found[pos] = recipe
    return found


def _big(v: Any, lq: Any, lk: Any) -> bool:
    """An (.., Lq, Lk) mask for a site of ``lq`` queries and ``lk`` keys (a (B, L) key vector is not one: the
    analysis proves what a graph does with it)."""
    if not isinstance(v, torch.Tensor) or v.dim() < 2 or v.requires_grad or eq(lq, 1):
        return False
    return eq(v.shape[-2], lq) and eq(v.shape[-1], lk)


def mask_inputs(gm: fx.GraphModule) -> dict[int, list[fx.Node]]:
    """{placeholder position: anchors of the sites whose mask reads it} (the analysis runs on a copy)."""
    import copy

    work = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    canonicalize.canonicalize(work)
    found, _ = match.match(work)
    placeholders = {p: i for i, p in enumerate(work.graph.find_nodes(op="placeholder"))}
    out: dict[int, list[fx.Node]] = {}
    for m in found:
        if m.form == "mha":
            continue
        lq, lk = operand_shape(m.q)[-2], operand_shape(m.k)[-2]
        if not {"dense", "bias"} & set(masks.analyze(work, m, None)[1].kinds):
            continue  # proven from this graph's own nodes
        stack, seen = [t.node for t in m.masks], set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node in placeholders and _big(val(node), lq, lk):
                out.setdefault(placeholders[node], []).append(m.anchor)
            stack.extend(node.all_input_nodes)
    return out


def splice(gm: fx.GraphModule, chosen: dict[int, tuple[Recipe, tuple]]) -> fx.GraphModule:
    """A copy of ``gm`` whose placeholder ``i`` is read from ``recipe`` applied to ``values`` (``chosen[i] =
    (recipe, values)``, one value per leaf): tensor values become new placeholders after the last one (in
    ``chosen``'s order), other values are written into the copied nodes."""
    import copy

    graph = copy.deepcopy(gm.graph)
    placeholders = list(graph.find_nodes(op="placeholder"))
    last = placeholders[-1]
    count = 0
    for i, (recipe, values) in sorted(chosen.items()):
        env: dict[fx.Node, Any] = {}
        leaf_nodes = list(recipe.gm.graph.find_nodes(op="placeholder"))
        for node, value in zip(leaf_nodes, values):
            if isinstance(value, torch.Tensor):
                with graph.inserting_after(last):
                    last = env[node] = graph.placeholder(f"attnfuse_recipe_{i}_{count}")
                count += 1
            else:
                env[node] = value
        first = next(n for n in graph.nodes if n.op != "placeholder")
        result = None
        for node in recipe.gm.graph.nodes:
            if node.op == "call_function" or node.op == "call_method":
                with graph.inserting_before(first):
                    env[node] = graph.node_copy(node, lambda a: env[a])
            elif node.op == "get_attr":
                raise ValueError("attnfuse: a mask recipe reads no module attribute")
            elif node.op == "output":
                result = env[node.args[0]] if isinstance(node.args[0], fx.Node) else node.args[0]
        placeholders[i].replace_all_uses_with(result)
    return fx.GraphModule(gm, graph)


_ARANGE = torch.arange


def synthesized(shape: tuple, dtype: torch.dtype, device: torch.device, left: int, right: int, keys: bool,
                batch: int, fill: float | None) -> Recipe:
    """The recipe of ``keep[b, h, i, j] = (j - i <= right) & (i - j <= left) & kv[b, j]`` (-1: no bound; ``keys``:
    a (batch, Lk) bool leaf, else none), shaped and typed like the input: bool, or 0 where kept and ``fill``."""
    graph = fx.Graph()
    kv = graph.placeholder("kv") if keys else None
    lq, lk = shape[-2], shape[-1]
    terms = []
    if left >= 0 or right >= 0:
        i = graph.call_method("unsqueeze", (graph.call_function(_ARANGE, (lq,), {"device": device}), 1))
        j = graph.call_method("unsqueeze", (graph.call_function(_ARANGE, (lk,), {"device": device}), 0))
        if right >= 0:
            terms.append(graph.call_function(operator.le, (j, graph.call_function(operator.add, (i, right)))))
        if left >= 0:
            terms.append(graph.call_function(operator.ge, (j, graph.call_function(operator.sub, (i, left)))))
    if kv is not None:
        terms.append(graph.call_method("view", (kv, batch, 1, 1, lk)))
    if not terms:
        terms.append(graph.call_function(torch.ones, ((lq, lk),), {"dtype": torch.bool, "device": device}))
    keep = terms[0]
    for t in terms[1:]:
        keep = graph.call_function(operator.and_, (keep, t))
    if len(shape) < 4:  # right-aligned: the input's leading dim is the heads' (recognition read batch 1)
        keep = graph.call_method("view", (keep, *(1,) * (len(shape) - 2), lq, lk))
    out = graph.call_method("expand", (keep, *shape))
    if dtype != torch.bool:
        zeros = graph.call_function(torch.zeros, (tuple(shape),), {"dtype": dtype, "device": device})
        out = graph.call_method("masked_fill", (zeros, graph.call_function(operator.invert, (out,)), fill))
    graph.output(graph.call_method("contiguous", (out,)))
    return Recipe(fx.GraphModule(torch.nn.Module(), graph), (Leaf(-1),) if keys else ())
