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
which has the same signature and calls the op.

Soundness rules (docs/architecture.md, "Soundness"):

* only the replaced region's nodes are removed, and with them the functional nodes that fed
  nothing but the region; never a node that writes a tensor, draws random numbers or is
  impure (an unused ``cache.index_copy_(...)`` is the program's point, not dead code);
* the op writes its output as (B, Lq, H, D) in memory; where a consumer depends on strides
  (views, ``as_strided``, in-place ops, graph outputs, anything not known to be
  layout-agnostic) the output is first given the layout eager gave it (`_layout`);
* masks keep eager's semantics on rows that see no key (`mask_semantics`).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from .._sizes import hint
from . import _tparewrite
from ._graph import eq, val
from ._layout import eager_layout, stride_sensitive, written_later
from ._records import AttentionMatch, Operand, absorbs, operand_shape
from .effects import mutations, removable


def _op(graph: fx.Graph, fn, *args, **kwargs) -> fx.Node:
    return graph.call_function(fn, args, kwargs)


def _operand(graph: fx.Graph, op: Operand) -> fx.Node:
    return op.node if op.perm is None else _op(graph, torch.permute, op.node, list(op.perm))


def _to_4d(graph: fx.Graph, x: fx.Node, rank: int, split: int = 0) -> fx.Node:
    """``x`` (batch dims, L, D) as (B, H, L, D): rank < 4 gains leading unit dims; rank > 4 merges the batch dims
    before ``split`` into B and the rest into H (``split`` 0: all into H)."""
    if rank == 4:
        return x
    if rank > 4:
        x = _op(graph, torch.flatten, x, split, rank - 3)
        return _op(graph, torch.flatten, x, 0, split - 1) if split else _op(graph, torch.unsqueeze, x, 0)
    for _ in range(4 - rank):
        x = _op(graph, torch.unsqueeze, x, 0)
    return x


def _from_4d(graph: fx.Graph, x: fx.Node, batch_shape: list, split: int = 0) -> fx.Node:
    rank = len(batch_shape) + 2
    if rank == 4:
        return x
    if rank > 4:
        x = _op(graph, torch.unflatten, x, 1, list(batch_shape[split:]))
        if not split:
            return _op(graph, torch.squeeze, x, 0)
        return _op(graph, torch.unflatten, x, 0, list(batch_shape[:split]))
    x = _op(graph, torch.squeeze, x, 0)
    for _ in range(3 - rank):
        x = _op(graph, torch.squeeze, x, 0)
    return x


def _mask_shape(m: AttentionMatch, batch: list) -> list:
    """The combined mask's shape (hints), left-padded to the scores' rank."""
    shapes = [[hint(s) for s in val(t.node).shape] for t in m.masks]
    shape = list(torch.broadcast_shapes(*[torch.Size(s) for s in shapes]))
    return [1] * (len(batch) + 2 - len(shape)) + shape


def _split(m: AttentionMatch, batch: list) -> int:
    """Where a rank > 4 site's batch dims divide into the op's B and H: the split that materializes the fewest
    mask elements (a group of dims the mask broadcasts over entirely, or matches entirely, folds for free)."""
    n = len(batch)
    if not m.masks:
        return n - 1
    shape = _mask_shape(m, batch)

    def cost(split):
        total = 1
        for lo, hi in ((0, split), (split, n)):
            dims = range(lo, hi)
            free = all(shape[i] == 1 for i in dims) or all(shape[i] == hint(batch[i]) for i in dims)
            for i in dims:
                total *= shape[i] if free else hint(batch[i])
        return total

    return min(range(n - 1, 0, -1), key=cost)


def _fold_mask(graph: fx.Graph, mask: fx.Node, m: AttentionMatch, q: fx.Node, batch: list, split: int) -> fx.Node:
    """The combined mask of a rank > 4 site folded like q (`_to_4d`): a group of batch dims the mask neither
    broadcasts over entirely nor matches entirely is expanded to the scores' sizes first."""
    n = len(batch)
    shape = _mask_shape(m, batch)
    rank = len([hint(s) for s in torch.broadcast_shapes(*[val(t.node).shape for t in m.masks])])
    for _ in range(n + 2 - rank):
        mask = _op(graph, torch.unsqueeze, mask, 0)
    sizes: list = [-1] * (n + 2)
    for lo, hi in ((0, split), (split, n)):
        dims = range(lo, hi)
        if not (all(shape[i] == 1 for i in dims) or all(shape[i] == hint(batch[i]) for i in dims)):
            for i in dims:
                sizes[i] = graph.call_method("size", (q, i))
    if any(s != -1 for s in sizes):
        mask = graph.call_method("expand", (mask, *sizes))
    mask = _op(graph, torch.flatten, mask, split, n - 1)
    return _op(graph, torch.flatten, mask, 0, split - 1)


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
    if any(len(s) >= 3 and not eq(s[-3], 1) for s in shapes):
        return max(len(s) for s in shapes)
    return 0


def mask_semantics(m: AttentionMatch) -> str:
    """How the op reproduces the match's mask terms, or why it cannot (a sentence starting "the mask").

    The terms apply to the scores in order: ``add`` is ``s + B``, ``keep`` is ``where(K, s, fill)``.

    * ``"none"``: no term;
    * ``"keep"``: only keep terms, one fill: ``where(K1 & K2 & ..., s, fill)``, the op's bool mask,
      exact on every row (a row with no visible key is uniform for a finite fill, NaN for -inf), and
      in the gradient (a replaced score gets none);
    * ``"add"``: the terms folded over a zero score into one additive tensor ``M`` and ``s + M``.  Exact
      for adds (the same sums; ``finfo.min + finfo.min`` still saturates to -inf).  A keep term folds
      as ``where(K, x, fill)`` with ``s + fill == fill``, which holds for a fill that swallows every
      score (-inf; ``finfo.min`` of fp32/bf16), and then only in value: ``s + fill`` passes a gradient
      to ``s`` on a row with no visible key where eager's ``where`` passes none (0 where eager's is 0,
      NaN for -inf), so a keep term folds only where nothing needs a gradient.
    """
    if not m.masks or m.form == "mha":
        return "none"
    keeps = [t for t in m.masks if t.kind == "keep"]
    if len(keeps) == len(m.masks) and len({t.fill for t in keeps}) == 1:
        return "keep"
    if m.form == "sdpa":
        return "add"
    dtype = val(m.q.node).dtype
    loose = sorted({t.fill for t in keeps if not absorbs(t.fill, dtype)})
    if loose:
        return (f"the mask combines fills ({', '.join(f'{f:g}' for f in loose)} with "
                f"{'other fills' if len(keeps) > 1 else 'an additive mask'}) whose value on a row with no visible "
                "key depends on the scores in eager; attnfuse fuses such a mix only with -inf or finfo.min fills")
    grad = any(getattr(val(n), "requires_grad", False) for n in (m.q.node, m.k.node, m.v.node))
    if grad and keeps:
        return ("the mask mixes where/masked_fill terms with other mask terms; on a row with no visible key "
                "eager's gradient is 0 there, which one fused mask cannot reproduce in training")
    return "add"


def _mask(graph: fx.Graph, m: AttentionMatch) -> tuple[fx.Node | None, float | None]:
    """The op's ``mask`` and ``mask_fill`` for the match's terms (see `mask_semantics`)."""
    kind = mask_semantics(m)
    if kind == "none":
        return None, None
    if kind not in ("keep", "add"):
        raise ValueError(f"attnfuse: {kind}")  # analyze() skips such sites before the rewrite
    dtype = val(m.q.node).dtype
    x = None
    for term in m.masks:
        if term.kind == "add":
            x = term.node if x is None else _op(graph, operator.add, x, term.node)
            continue
        keep = term.node
        if val(keep).dtype != torch.bool:
            keep = _op(graph, torch.ne, keep, 0)
        if term.negate:
            keep = _op(graph, torch.logical_not, keep)
        if kind == "keep":
            x = keep if x is None else _op(graph, torch.logical_and, x, keep)
        elif x is None:
            x = graph.call_method("to", (_op(graph, torch.where, keep, 0.0, term.fill), dtype))
        else:
            x = _op(graph, torch.where, keep, x, term.fill)
    return x, (m.masks[0].fill if kind == "keep" else None)


def mask_dtype(m: AttentionMatch) -> torch.dtype | None:
    """The dtype of the ``mask`` tensor the op gets for ``m`` (`_mask`), None without one: the plan sizes the
    Triton tiles with its element size (its tiles take shared memory)."""
    kind = mask_semantics(m)
    if kind not in ("keep", "add"):
        return None
    if kind == "keep":
        return torch.bool
    dtype = None
    for term in m.masks:  # bias terms add (type promotion); a keep term becomes the q dtype (or joins by where)
        own = val(term.node).dtype if term.kind == "add" else val(m.q.node).dtype
        dtype = own if dtype is None else dtype if term.kind != "add" else torch.promote_types(dtype, own)
    return dtype


def _rewrite_one(graph: fx.Graph, m: AttentionMatch) -> fx.Node | None:
    """Emit the op for ``m`` before its output and send the output's users to it; the op's result node (None
    for an MHA call, whose target is swapped in place)."""
    if m.form == "mha":
        from .. import _mha

        m.anchor.target = _mha.encoder_layer if m.pattern == "transformer_encoder_layer" else _mha.forward
        if m.tiles:
            m.anchor.kwargs = {**m.anchor.kwargs, "tiles": m.tiles}
        return None
    from .. import ops

    if m.tpa:  # the plan chose the tpa family: the op reads the factors (`_tparewrite`)
        with graph.inserting_before(m.output):
            out = _tparewrite.emit(graph, m, *_mask(graph, m))
            if stride_sensitive(m.output):
                out = eager_layout(graph, out, val(m.output), copy=written_later(m.output))
        m.output.replace_all_uses_with(out)
        return out
    qs = operand_shape(m.q)
    rank = len(qs)
    with graph.inserting_before(m.output):
        q, k, v = (_operand(graph, o) for o in (m.q, m.k, m.v))
        if m.kv_expand:  # one K (or V) head broadcast to every head of the other, as matmul broadcasting did
            one, other = (k, v) if m.kv_expand == "k" else (v, k)
            heads = graph.call_method("size", (other, rank - 3))
            one = graph.call_method("expand", (one, *[-1] * (rank - 3), heads, -1, -1))
            k, v = (one, other) if m.kv_expand == "k" else (other, one)
        for node, divide in m.scale_nodes:  # before the batch dims are folded: a tensor scale broadcasts over them
            q = _op(graph, operator.truediv if divide else operator.mul, q, node)
        split = _split(m, qs[:-2]) if rank > 4 else 0
        q_full = q
        q, k, v = (_to_4d(graph, x, rank, split) for x in (q, k, v))
        ks = operand_shape(m.k)
        if rank == 4 and len(ks) == 4 and eq(ks[0], 1) and not eq(qs[0], 1):  # K/V broadcast over batch
            k = graph.call_method("expand", (k, qs[0], -1, -1, -1))
            v = graph.call_method("expand", (v, qs[0], -1, -1, -1))
        mask, fill = _mask(graph, m)
        if mask is not None and rank > 4:
            mask = _fold_mask(graph, mask, m, q_full, qs[:-2], split)
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
        sinks = None
        if m.sinks is not None:  # the (B, H, Lq, 1) column is constant along the queries (`_chain.sink_form`)
            col = _heads_tile_to_group(graph, m.sinks, m.kv_groups) if tile else m.sinks
            sinks = graph.call_method("float", (_op(graph, operator.getitem, col, (slice(None), slice(None), 0, 0)),))
        structure = {}
        if m.window_left >= 0 or m.window_right >= 0 or m.block_sparse:
            structure = {"window_left": m.window_left, "window_right": m.window_right,
                         "block_sparse": m.block_sparse, **({"window_pad": True} if m.window_pad else {})}
        if m.approx:
            structure["approx"] = m.approx
        if m.tiles:
            structure["tiles"] = m.tiles
        if m.impl:
            structure["impl"] = m.impl
        if m.doc is not None:
            structure["doc"] = m.doc
        # SDPA zeroes fully masked rows where a softmax makes them NaN
        sdpa = m.form == "sdpa" and mask is not None
        if m.cp:  # the rows of a context-parallel group: attention over the global sequence (`attnfuse.parallel`)
            from .. import parallel

            scale = m.scale if m.scale is not None else 1.0 / math.sqrt(int(qs[-1]))
            out = _op(graph, parallel.attention, q, k, v, mask, cp=m.cp, strategy=m.cp_strategy, scale=scale,
                      causal=m.causal, softcap=m.softcap, kv_groups=m.kv_groups, mask_fill=fill,
                      window_left=m.window_left, window_right=m.window_right, sdpa_form=sdpa)
        else:
            fn = ops.attention_sdpa if sdpa else torch.ops.attnfuse.attention.default
            out = _op(graph, fn, q, k, v, mask, seed, alibi, *([sinks] if sinks is not None else []), scale=m.scale,
                      causal=m.causal, softcap=m.softcap, kv_groups=m.kv_groups, dropout_p=m.dropout_p,
                      mask_fill=fill, **structure)
        if not sdpa and not m.cp:  # the op returns (out, stats)
            out = _op(graph, operator.getitem, out, 0)
        if tile:
            out = _heads_group_to_tile(graph, out, m.kv_groups)
        batch = [int(b) if not isinstance(b, torch.SymInt) else graph.call_method("size", (q_full, i))
                 for i, b in enumerate(qs[:-2])]  # symbolic sizes are read from q at run time
        out = _from_4d(graph, out, batch, split)
        if m.window_pad:  # the unfold spelling's output has one query per window: (B, H, L, 1, Dv)
            out = _op(graph, torch.unsqueeze, out, -2)
        if m.bucketed:  # back to the query blocks (static shapes: `_local.bucket_window` proves by value)
            out = graph.call_method("reshape", (out, *[int(s) for s in val(m.output).shape]))
        if stride_sensitive(m.output):
            out = eager_layout(graph, out, val(m.output), copy=written_later(m.output))
    m.output.replace_all_uses_with(out)
    return out


def _remove_replaced(graph: fx.Graph, replaced: set) -> None:
    """Erase the replaced regions' nodes that nothing reads any more, then the functional nodes that only
    fed them (mask construction, K/V repeats), walking up.  Nothing else is touched: a node that writes a
    tensor, draws random numbers or is impure stays even when its result is unused, and so does vmap's
    nesting bracket (`effects.removable`).

    A region node is erased even where FX calls it impure (export's aten SDPA and dropout are
    "nondeterministic_seeded"): the op replaced it.
    """
    freed: set = set()
    for node in reversed(list(graph.nodes)):
        if node.users:
            continue
        if node in replaced:
            if any(w not in replaced for w in mutations(node)):
                continue
        elif node not in freed or not removable(node):
            continue
        freed.update(node.all_input_nodes)
        graph.erase_node(node)


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

    emitted, outs = [], []
    for m in matches:
        seen = set(gm.graph.nodes)
        outs.append(_rewrite_one(gm.graph, m))
        new = [n for n in gm.graph.nodes if n not in seen] or [m.anchor]
        emitted.append(new)
    # A later site may read an earlier one's output as an operand (``q = attention(q, k, v)``): its op was
    # emitted after that output's users were redirected, so it still reads the replaced node.  Each op sits
    # just before its own output, and a reader of that output comes after it, so redirecting again is sound.
    for m, out in zip(matches, outs):
        if out is not None and m.output.users:
            m.output.replace_all_uses_with(out)
    _remove_replaced(gm.graph, {n for m in matches if m.form != "mha" for n in (*m.region, m.anchor, m.output)})
    created = gm.meta.pop("attnfuse_analysis_nodes", set())  # the mask analysis' nodes no rewritten site reads
    for node in reversed(list(gm.graph.nodes)):
        if node in created and not node.users and removable(node):
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    gm.meta["attnfuse_emitted"] = [[describe(n) for n in nodes if n.graph is gm.graph] for nodes in emitted]
    return gm
