"""A site's region cut out of its graph as a GraphModule of its own, for `verify` to run.

`region_of(m)` is every node between the site's sources (q, k, v, masks, run-time scales, ALiBi slopes) and
its output; `copy_region` builds the GraphModule whose placeholders are those sources (in float64 when
asked, every floating dtype the region names widened) and the match re-pointed at the copy's nodes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from ._graph import ancestors
from ._records import AttentionMatch


def _nodes(obj: Any) -> list[fx.Node]:
    """Every fx.Node held by a match field (Operands, MaskTerms, tuples, ...)."""
    if isinstance(obj, fx.Node):
        return [obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [n for f in dataclasses.fields(obj) for n in _nodes(getattr(obj, f.name))]
    if isinstance(obj, (tuple, list, frozenset, set)):
        return [n for x in obj for n in _nodes(x)]
    return []


def _remap(obj: Any, env: dict[fx.Node, fx.Node]) -> Any:
    if isinstance(obj, fx.Node):
        return env[obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _remap(getattr(obj, f.name), env)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (tuple, list, frozenset, set)):
        return type(obj)(_remap(x, env) for x in obj)
    return obj


@dataclasses.dataclass
class Region:
    """A site's region: the copies' placeholders (``sources``) and the nodes between them and the output."""

    match: AttentionMatch
    sources: list[fx.Node]  # the placeholders of the copies, in order
    inner: list[fx.Node]  # graph order


def region_of(m: AttentionMatch) -> Region:
    """The nodes between the site's sources and its output (the sources' other inputs become placeholders)."""
    whole = set(m.region) | {m.anchor, m.output}
    fields = [n for f in dataclasses.fields(m) if f.name not in ("anchor", "output", "region")
              for n in _nodes(getattr(m, f.name))]
    anc = ancestors(m.output)
    seeds = set(dict.fromkeys(fields)) - whole
    inner: set[fx.Node] = set()
    for n in m.output.graph.nodes:
        if n is m.output:
            break
        if n in anc and n not in seeds and n.op not in ("placeholder", "get_attr") and (
                n in whole or any(i in seeds or i in inner for i in n.all_input_nodes)):
            inner.add(n)
    inner.add(m.output)
    inner |= whole
    order = [n for n in m.output.graph.nodes if n in inner]
    outside = [i for n in order for i in n.all_input_nodes if i not in inner]
    sources = list(dict.fromkeys([n for n in fields if n not in inner] + outside))
    return Region(m, sources, order)


_LOW = (torch.float32, torch.float16, torch.bfloat16)
_CASTS = {"float": "double", "half": "double", "bfloat16": "double"}


def _wide(a: Any) -> Any:
    if isinstance(a, torch.dtype):
        return torch.float64 if a in _LOW else a
    if isinstance(a, (tuple, list)):
        return type(a)(_wide(x) for x in a)
    if isinstance(a, dict):
        return {k: _wide(x) for k, x in a.items()}
    return a


def copy_region(gm: fx.GraphModule, r: Region, values: list[Any],
          float64: bool = False) -> tuple[fx.GraphModule, AttentionMatch]:
    """A GraphModule of the region whose placeholders are its sources; ``float64`` widens every floating
    dtype the region names (``.float()``, ``.to(torch.float32)``, ``softmax(dtype=...)``) to float64."""
    graph, env = fx.Graph(), {}
    for i, (src, v) in enumerate(zip(r.sources, values)):
        env[src] = graph.placeholder(f"source_{i}")
        env[src].meta = {**src.meta, "val": v}
    for n in r.inner:
        env[n] = graph.node_copy(n, lambda x: env[x])
        if float64:
            env[n].args, env[n].kwargs = _wide(env[n].args), _wide(env[n].kwargs)
            if env[n].op == "call_method" and env[n].target in _CASTS:
                env[n].target = _CASTS[env[n].target]
    graph.output(env[r.match.output])
    return fx.GraphModule(gm, graph), _remap(r.match, env)
