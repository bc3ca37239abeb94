"""FX graph helpers every pass shares: what a node computes (`val`, `name`, `arg`), sizes that may be symbolic
(`eq`, `Sizes`), ancestors, model state, and example values for the nodes a pass inserts (`copy_meta`,
`refresh`, `carry`).

The bottom of `attnfuse.passes`: it imports no pass.  A symbolic size's example value is read with
`attnfuse._sizes.hint`.
"""

from __future__ import annotations

import contextlib
import operator
import re
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true


def val(node: Any) -> Any:
    """The example value (FakeTensor / SymInt / number) a node produces."""
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get("val", node.meta.get("example_value"))


def name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    if node.op != "call_function":
        return ""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def arg(node: fx.Node, i: int, key: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)


def eq(a: Any, b: Any) -> bool:
    """``a == b``, for symbolic sizes only when it holds for every value of their symbols (adds no guard)."""
    return bool(statically_known_true(a == b)) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else a == b


def ancestors(node: fx.Node) -> set:
    """Every node ``node`` depends on (iterative: real graphs are thousands of nodes deep)."""
    out, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in out:
            out.add(n)
            stack.extend(n.all_input_nodes)
    return out


def is_state(node: fx.Node) -> bool:
    """Whether a placeholder is model state (a parameter or buffer lifted into the graph), not an input."""
    return bool(re.search(r"_(parameters|buffers)_", node.name)) or node.meta.get("is_state", False)


def carry(old: fx.Node, new: fx.Node) -> None:
    """Give ``new`` the source location of ``old`` (what the report and error messages point at)."""
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in old.meta:
            new.meta[key] = old.meta[key]


def copy_meta(node: fx.Node, a: Any, b: Any, out: fx.Node) -> None:
    """Give new nodes example values by running them on the fake values of their inputs."""
    for new in out.graph.nodes:
        if new.meta or new.op != "call_function" or new is node:
            continue
        args = fx.node.map_arg(new.args, val)
        try:
            new.meta["example_value"] = new.target(*args, **fx.node.map_arg(new.kwargs, val))
        except Exception:  # noqa: BLE001 - meta is best-effort; the matcher skips nodes without it
            pass
        carry(node, new)


def refresh(node: fx.Node) -> None:
    """Recompute ``node``'s example value from its inputs' (the node's inputs changed shape)."""
    args, kwargs = fx.node.map_arg(node.args, val), fx.node.map_arg(node.kwargs, val)
    fakes: list = []
    fx.node.map_aggregate((args, kwargs), lambda a: fakes.append(a) if isinstance(
        a, torch._subclasses.FakeTensor) else None)
    mode = fakes[0].fake_mode if fakes else None  # the inputs' own mode (not the tracing context's)
    with mode if mode is not None else contextlib.nullcontext():  # Python scalars become fake tensors too
        if mode is not None:  # and so do constants (a 0-d fill tensor)
            args, kwargs = fx.node.map_aggregate((args, kwargs), lambda a: mode.from_tensor(a) if isinstance(
                a, torch.Tensor) and not isinstance(a, torch._subclasses.FakeTensor) else a)
        if node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            out = node.target(*args, **kwargs)
    keys = [k for k in ("val", "example_value") if k in node.meta] or ["example_value"]
    for k in keys:
        node.meta[k] = out


class Sizes:
    """Graph values for sizes: constants, or symbols (and products of them) the graph already computes."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self.known: dict = {}
        for n in graph.nodes:
            v = val(n)
            if isinstance(v, torch.SymInt) and n.op == "placeholder":
                self.known.setdefault(v.node.expr, n)

    def __call__(self, x: Any) -> Any:
        if not isinstance(x, torch.SymInt):
            return int(x)
        expr = x.node.expr
        if expr.is_Integer:
            return int(expr)
        if expr in self.known:
            return self.known[expr]
        if expr.is_Mul:
            parts = [int(f) if f.is_Integer else self.known.get(f) for f in expr.args]
            if all(p is not None for p in parts):
                out = parts[0]
                for p in parts[1:]:
                    out = self.graph.call_function(operator.mul, (out, p))
                return out
        raise Decline


class Decline(Exception):
    """A rewrite cannot express a size it needs with the graph's values: it declines (changes nothing)."""
