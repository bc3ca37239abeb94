"""Replace matched regions with ``torch.ops.attnfuse.attention`` calls.

Entry point: `rewrite(gm, matches) -> GraphModule` (in place).  For each
`AttentionMatch` it emits, right before the region's output node:

* q, k, v as views of their un-permuted, un-scaled, un-repeated sources,
  folded to ``(batch, heads, seqlen, head_dim)`` (rank 2/3 gain leading unit
  dims; rank > 4 flattens the batch dims);
* one mask operand built from the match's mask terms (bools AND-ed, biases
  summed, a mix becomes ``where(keep, bias, fill)``);
* a dropout seed (``torch.randint``) when ``dropout_p > 0``;
* the op call, and the views that give the output the original layout.

``multi_head_attention_forward`` nodes are re-pointed at `attnfuse._mha.forward`,
which has the same signature and calls the op.  Dead nodes are removed.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .canonicalize import val
from .match import AttentionMatch, Operand, _eq, _shape


def _op(graph: fx.Graph, fn, *args, **kwargs) -> fx.Node:
    return graph.call_function(fn, args, kwargs)


def _operand(graph: fx.Graph, op: Operand) -> fx.Node:
    return op.node if op.perm is None else _op(graph, torch.permute, op.node, list(op.perm))


def _to_4d(graph: fx.Graph, x: fx.Node, rank: int) -> fx.Node:
    if rank == 4:
        return x
    if rank > 4:
        return _op(graph, torch.unsqueeze, _op(graph, torch.flatten, x, 0, rank - 3), 0)
    for _ in range(4 - rank):
        x = _op(graph, torch.unsqueeze, x, 0)
    return x


def _from_4d(graph: fx.Graph, x: fx.Node, batch_shape: list) -> fx.Node:
    rank = len(batch_shape) + 2
    if rank == 4:
        return x
    x = _op(graph, torch.squeeze, x, 0)
    if rank > 4:
        return _op(graph, torch.unflatten, x, 0, list(batch_shape))
    for _ in range(3 - rank):
        x = _op(graph, torch.squeeze, x, 0)
    return x


def _heads_tile_to_group(graph: fx.Graph, x: fx.Node, groups: int) -> fx.Node:
    # head h = g*n_kv + kv  ->  head j = kv*groups + g (so head j reads kv head j // groups)
    x = _op(graph, torch.unflatten, x, 1, [groups, -1])
    return _op(graph, torch.flatten, _op(graph, torch.transpose, x, 1, 2), 1, 2)


def _heads_group_to_tile(graph: fx.Graph, x: fx.Node, groups: int) -> fx.Node:
    x = _op(graph, torch.unflatten, x, 1, [-1, groups])
    return _op(graph, torch.flatten, _op(graph, torch.transpose, x, 1, 2), 1, 2)


def _per_head_mask_rank(m: AttentionMatch) -> int:
    """The rank of the combined mask if it varies along the heads axis (dim -3), else 0.

    Read from the terms: the combined mask is built from new nodes without example values.
    """
    shapes = [val(t.node).shape for t in m.masks]
    if any(len(s) >= 3 and not _eq(s[-3], 1) for s in shapes):
        return max(len(s) for s in shapes)
    return 0


def _mask(graph: fx.Graph, m: AttentionMatch) -> tuple[fx.Node | None, float | None]:
    keeps, adds, fill = [], [], None
    for term in m.masks:
        if term.kind == "add":
            adds.append(term.node)
            continue
        node = term.node
        if val(node).dtype != torch.bool:
            node = _op(graph, torch.ne, node, 0)
        keeps.append(_op(graph, torch.logical_not, node) if term.negate else node)
        fill = term.fill if fill is None else min(fill, term.fill)
    keep = None
    for k in keeps:
        keep = k if keep is None else _op(graph, torch.logical_and, keep, k)
    bias = None
    for a in adds:
        bias = a if bias is None else _op(graph, operator.add, bias, a)
    if bias is None:
        return keep, fill
    if keep is None:
        return bias, None
    return _op(graph, torch.where, keep, bias, fill), None


def _rewrite_one(graph: fx.Graph, m: AttentionMatch) -> None:
    if m.form == "mha":
        from .. import _mha

        m.anchor.target = _mha.forward
        return
    from .. import ops

    qs = _shape(m.q)
    rank = len(qs)
    with graph.inserting_before(m.output):
        q, k, v = (_to_4d(graph, _operand(graph, o), rank) for o in (m.q, m.k, m.v))
        for node, divide in m.scale_nodes:
            q = _op(graph, operator.truediv if divide else operator.mul, q, node)
        ks = _shape(m.k)
        if rank == 4 and len(ks) == 4 and _eq(ks[0], 1) and not _eq(qs[0], 1):  # K/V broadcast over batch
            k = graph.call_method("expand", (k, qs[0], -1, -1, -1))
            v = graph.call_method("expand", (v, qs[0], -1, -1, -1))
        mask, fill = _mask(graph, m)
        tile = m.kv_layout == "tile" and m.kv_groups > 1
        if tile:
            q = _heads_tile_to_group(graph, q, m.kv_groups)
            rank_m = _per_head_mask_rank(m)
            if mask is not None and rank_m:
                for _ in range(4 - rank_m):  # (H, Lq, Lk) -> (1, H, Lq, Lk): the heads are dim 1
                    mask = _op(graph, torch.unsqueeze, mask, 0)
                mask = _heads_tile_to_group(graph, mask, m.kv_groups)
        seed = _op(graph, torch.randint, 0, 2**62, (), dtype=torch.int64) if m.dropout_p > 0 else None
        alibi = None
        if m.alibi is not None:
            alibi = graph.call_method("float", (m.alibi,))
            if tile:
                alibi = _op(graph, torch.flatten, _op(graph, torch.transpose, _op(
                    graph, torch.unflatten, alibi, 0, [m.kv_groups, -1]), 0, 1))
        structure = {}
        if m.window_left >= 0 or m.window_right >= 0 or m.block_sparse:
            structure = {"window_left": m.window_left, "window_right": m.window_right,
                         "block_sparse": m.block_sparse}
        if m.approx:
            structure["approx"] = m.approx
        # SDPA zeroes fully masked rows where a softmax makes them NaN
        sdpa = m.form == "sdpa" and mask is not None
        fn = ops.attention_sdpa if sdpa else torch.ops.attnfuse.attention.default
        out = _op(graph, fn, q, k, v, mask, seed, alibi, scale=m.scale,
                  causal=m.causal, softcap=m.softcap, kv_groups=m.kv_groups, dropout_p=m.dropout_p,
                  mask_fill=fill, **structure)
        if not sdpa:  # the op returns (out, stats)
            out = _op(graph, operator.getitem, out, 0)
        if tile:
            out = _heads_group_to_tile(graph, out, m.kv_groups)
        out = _from_4d(graph, out, qs[:-2])
    m.output.replace_all_uses_with(out)


def _impure(node: fx.Node) -> bool:
    """Dead-code removal must keep vmap's nesting brackets (HF builds masks with ``torch.vmap``): they have
    no users, yet dropping them leaves the batch-dim nodes between them unbalanced."""
    return node.is_impure() or getattr(node.target, "__name__", "") in _VMAP_NESTING


_VMAP_NESTING = ("_vmap_increment_nesting", "_vmap_decrement_nesting")


def describe(node: fx.Node) -> str:
    """One line for the report: ``name = target(arg, ..., key=value)``."""
    def show(a):
        if isinstance(a, fx.Node):
            return a.name
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(map(show, a)) + "]"
        if isinstance(a, float):
            return f"{a:.6g}"
        return repr(a) if len(repr(a)) <= 60 else repr(a)[:56] + "...'"

    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    if isinstance(node.target, torch._ops.OpOverload):
        target = str(node.target)
    args = [show(a) for a in node.args] + [f"{k}={show(v)}" for k, v in node.kwargs.items()
                                           if v not in (None, "") and _OP_DEFAULTS.get(k, ()) != v]
    return f"{node.name} = {target}({', '.join(args)})"


# the op's keyword defaults, left out of `describe`'s lines (other keywords are always shown)
_OP_DEFAULTS = {"softcap": 0.0, "kv_groups": 1, "dropout_p": 0.0, "window_left": -1, "window_right": -1,
                "block_sparse": False}


def rewrite(gm: fx.GraphModule, matches: list[AttentionMatch]) -> fx.GraphModule:
    """Rewrite every match in ``gm`` (in place) and drop the dead region nodes.

    ``gm.meta["attnfuse_emitted"]`` gets, per match, the `describe` lines of the nodes it emitted.
    """
    from .. import ops  # noqa: F401 - registers torch.ops.attnfuse

    emitted = []
    for m in matches:
        seen = set(gm.graph.nodes)
        _rewrite_one(gm.graph, m)
        new = [n for n in gm.graph.nodes if n not in seen] or [m.anchor]
        emitted.append(new)
    # a replaced region is dead even where FX calls its ops impure (export's aten SDPA and dropout are
    # "nondeterministic_seeded")
    replaced = {n for m in matches if m.form != "mha" for n in (*m.region, m.anchor, m.output)}
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n not in replaced and _impure(n))
    gm.graph.lint()
    gm.recompile()
    gm.meta["attnfuse_emitted"] = [[describe(n) for n in nodes if n.graph is gm.graph] for nodes in emitted]
    return gm
