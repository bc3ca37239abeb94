"""Side effects and aliasing in an FX graph: what a rewrite may read late and what it may remove.

Dynamo's Torch-IR graphs keep in-place ops (``x.mul_(s)``, ``cache.index_copy_(...)``,
``x[i] = y``): their results are often unused, yet they are the point of the program.  Two
questions about them decide whether a rewrite is sound:

* `mutations(node)`: the tensors a node writes (in-place methods and functions, ``setitem``,
  ``out=``, ``inplace=True``, mutable ATen schemas);
* `Effects.written_between(node, start, stop)`: whether a tensor sharing storage with ``node``
  (`root`: the base of a chain of views) is written by a node positioned in ``[start, stop)``;
  the fused op reads its inputs where the region ends, eager read them where the region
  began, so a write in between would be seen by one and not the other.

`removable(node)` says whether a dead node may be erased: never one that writes a tensor, draws
random numbers or is impure for FX.

`capture(gm, wanted, example_inputs)` runs the graph on its example inputs up to the nodes a pass needs
(calibration, verification) without side effects the user can see: every input or attribute an in-place
op writes through is cloned first, and the random-number state is restored.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from .._sizes import hint
from ._graph import name

# ops whose result shares storage with their first argument
VIEWS = frozenset((
    "view", "reshape", "_unsafe_view", "transpose", "swapaxes", "swapdims", "permute", "t", "T", "mT", "mH", "H",
    "getitem", "select", "narrow", "unsqueeze", "squeeze", "expand", "expand_as", "view_as", "flatten", "unflatten",
    "unfold", "as_strided", "diagonal", "movedim", "moveaxis", "split", "chunk", "unbind", "tensor_split",
    "detach", "alias", "contiguous", "real", "imag", "view_as_real", "view_as_complex", "getattr", "to", "type_as",
    "float", "half", "bfloat16", "double", "type",
))
_INPLACE_OPERATORS = frozenset((operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                                operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                                operator.ilshift, operator.irshift, operator.imatmul))
_VMAP_NESTING = ("_vmap_increment_nesting", "_vmap_decrement_nesting")
_RANDOM = ("rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "bernoulli",
           "multinomial", "normal", "poisson", "dropout", "native_dropout", "alpha_dropout", "feature_alpha_dropout")


def _tensor_nodes(x: Any) -> list[fx.Node]:
    if isinstance(x, fx.Node):
        return [x]
    if isinstance(x, (list, tuple)):
        return [n for a in x for n in _tensor_nodes(a)]
    return []


def mutations(node: fx.Node) -> list[fx.Node]:
    """The nodes whose tensors ``node`` writes in place (empty for a functional op)."""
    if node.op not in ("call_function", "call_method"):
        return []
    written: list[fx.Node] = []
    target = node.target
    n = name(node)
    first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        for i, a in enumerate(schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                value = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
                written += _tensor_nodes(value)
        return written
    if target in _INPLACE_OPERATORS or target is operator.setitem:
        written += _tensor_nodes(first)
    elif n.endswith("_") and not n.startswith("_") and not n.endswith("__"):
        written += _tensor_nodes(first)  # x.add_(...), torch.relu_(x), torch.nn.init.normal_(w)
    elif node.kwargs.get("inplace") is True:
        written += _tensor_nodes(first)  # F.relu(x, inplace=True), F.dropout(x, inplace=True)
    written += _tensor_nodes(node.kwargs.get("out"))
    return written


def root(node: fx.Node) -> fx.Node:
    """The node at the base of ``node``'s chain of views (a conservative storage identity)."""
    seen = 0
    while node.op in ("call_function", "call_method") and name(node) in VIEWS and seen < 256:
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node):
            break
        node, seen = src, seen + 1
    return node


def removable(node: fx.Node) -> bool:
    """Whether erasing ``node`` (once nothing reads it) cannot change what the program does."""
    return not node.users and _pure(node)


def _pure(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method") or mutations(node) or node.is_impure():
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return name(node) not in _VMAP_NESTING and name(node) not in _RANDOM


def dead(node: fx.Node, memo: dict | None = None) -> bool:
    """Whether nothing the program does depends on ``node``: it and every transitive user are side-effect free
    and reach no output (a ``clone``/``cat``/``view`` of the scores that library code keeps for an optional
    return nobody asked for)."""
    memo = {} if memo is None else memo
    stack = [(node, False)]
    while stack:  # post-order over the users (a DAG)
        n, expanded = stack.pop()
        if n in memo:
            continue
        if not expanded:
            if not _pure(n):
                memo[n] = False
                continue
            stack.append((n, True))
            stack.extend((u, False) for u in n.users if u not in memo)
        else:
            memo[n] = all(memo.get(u, False) for u in n.users)
    return memo[node]


class Effects:
    """The in-place writes of one graph, indexed by the storage root they write."""

    def __init__(self, graph: fx.Graph) -> None:
        self.position = {n: i for i, n in enumerate(graph.nodes)}
        self.writes: dict[fx.Node, list[fx.Node]] = {}
        for n in graph.nodes:
            for w in mutations(n):
                self.writes.setdefault(root(w), []).append(n)

    def written(self, node: fx.Node) -> list[fx.Node]:
        """Every node that writes a tensor sharing ``node``'s storage root."""
        return self.writes.get(root(node), [])

    def written_between(self, node: fx.Node, start: fx.Node, stop: fx.Node) -> fx.Node | None:
        """A node in ``[start, stop)`` (graph order) that writes ``node``'s storage, or None."""
        lo, hi = self.position[start], self.position[stop]
        for w in self.written(node):
            if lo <= self.position[w] < hi:
                return w
        return None


class _Done(Exception):
    pass


class _Capture(fx.Interpreter):
    """Runs the graph until every wanted node has a value; attributes written in place are read as copies."""

    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node], copied_attrs: set[str]) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.wanted, self.values, self.copied_attrs = wanted, {}, copied_attrs

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        return value.clone() if target in self.copied_attrs and isinstance(value, torch.Tensor) else value

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n in self.wanted:
            self.values[n] = result
            if len(self.values) == len(self.wanted):
                raise _Done
        return result


def capture(gm: fx.GraphModule, wanted: set[fx.Node], example_inputs: Sequence[Any] | None) -> dict[fx.Node, Any]:
    """The values of ``wanted`` on the example inputs (the graph runs under ``no_grad`` until it has them all).

    Placeholders and attributes that an in-place op of the graph writes through are cloned first (a KV
    cache's ``index_copy_`` or a counter's ``add_`` must not happen twice to the user's tensors), and the
    RNG state is restored afterwards.  Raises RuntimeError with a reason when it cannot run.
    """
    if example_inputs is None:
        raise RuntimeError("no example inputs")
    written = {root(w) for n in gm.graph.nodes for w in mutations(n)}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = []
    for ph, x in zip(placeholders, example_inputs):
        if isinstance(x, torch._subclasses.FakeTensor):
            raise RuntimeError("the example inputs are fake tensors")
        if isinstance(x, torch.SymInt):
            try:
                x = hint(x)
            except TypeError:
                raise RuntimeError("the example inputs hold a symbolic size without a value") from None
        inputs.append(x.clone() if isinstance(x, torch.Tensor) and ph in written else x)
    interp = _Capture(gm, wanted, {n.target for n in written if n.op == "get_attr"})
    devices = sorted({x.device.index or 0 for x in inputs if isinstance(x, torch.Tensor) and x.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            interp.run(*inputs)
    except _Done:
        pass
    missing = wanted - set(interp.values)
    if missing:
        raise RuntimeError(f"{len(missing)} value(s) the check needs were not computed")
    return interp.values
