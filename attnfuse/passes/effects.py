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
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from .canonicalize import name

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
    if node.op not in ("call_function", "call_method") or node.users:
        return False
    if mutations(node) or node.is_impure() or name(node) in _VMAP_NESTING:
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return name(node) not in _RANDOM


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
