"""Recognize attention regions in a canonicalized graph.

Entry point: `match(gm) -> (list[AttentionMatch], list[Miss])`.

One shape is recognized (DESIGN.md, "Match by normal form"), anchored at each
softmax and read through `canonicalize.canon`:

    scores = (q·c_q) @ (k·c_k)ᵀ        any transpose/permute spelling; scales anywhere before the mask
    scores = cap·tanh(scores/cap)      optional softcap
    scores = scores + bias | masked_fill(m, -big) | where(m, scores, -big)   any number of masks
    p      = softmax(scores, -1)       casts around it are free
    p      = dropout(p)                optional
    out    = p @ v

K/V repeated along heads (expand+reshape, repeat_interleave, repeat, or broadcast)
are un-repeated into ``kv_groups``.  ``F.scaled_dot_product_attention`` and
``F.multi_head_attention_forward`` nodes are sites too.  A region is fused
only when none of its intermediates has a user outside it.  Every failed
check returns a `Miss` with a one-sentence reason.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import _local
from ._softmax_forms import SPELLING_MISSES
from .canonicalize import LOGSUMEXP, arg, canon, name, reaches_matmul, scalar, val
from .effects import Effects, dead


class Miss:
    """A failed check: falsy, with a lazily formatted one-sentence reason."""

    def __init__(self, anchor: fx.Node | None, fmt: str, *args: Any) -> None:
        self.anchor, self._fmt, self._args = anchor, fmt, args

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return self._fmt.format(*self._args)

    __repr__ = __str__


@dataclasses.dataclass(frozen=True)
class Operand:
    """A tensor read as ``node.permute(perm)`` (perm None = as is)."""

    node: fx.Node
    perm: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class MaskTerm:
    """``add``: scores + node.  ``keep``: where(node (negated if ``negate``), scores, fill)."""

    kind: str
    node: fx.Node
    negate: bool = False
    fill: float = 0.0


@dataclasses.dataclass(frozen=True)
class AttentionMatch:
    form: str  # "graph" (matmul-softmax-matmul) | "sdpa" | "mha"
    anchor: fx.Node
    output: fx.Node
    q: Operand
    k: Operand
    v: Operand
    scale: float | None  # constant part; None = default 1/sqrt(head_dim)
    scale_nodes: tuple[tuple[fx.Node, bool], ...] = ()  # runtime factors (node, divide) applied to q
    softcap: float = 0.0
    masks: tuple[MaskTerm, ...] = ()
    causal: bool = False
    kv_groups: int = 1
    kv_layout: str = "interleave"  # "interleave": head h reads kv h // g; "tile": kv h % n_kv
    kv_expand: str = ""  # "k" / "v": that one has a single head, broadcast to the other's heads
    dropout_p: float = 0.0
    pattern: str = ""
    region: frozenset = frozenset()
    # structure proven by `attnfuse.passes.masks` (see `attnfuse.ops` for the semantics)
    window_left: int = -1
    window_right: int = -1
    alibi: fx.Node | None = None  # fp32 (heads,) slopes
    block_sparse: bool = False
    # the window's positions outside the sequence are zero keys (`_local`: F.pad + unfold windows)
    window_pad: bool = False
    # q/k/v are the sequences a bucketed local attention gathered from (`_local`); the output is reshaped back
    bucketed: bool = False
    # the plan's per-call kernel table for approximate kernels (`Plan.op_table`; "" = exact)
    approx: str = ""
    # attention sinks: the (B, H, Lq, 1) column concatenated to the scores before the softmax and dropped after
    # it (GPT-OSS, x-transformers), proven constant along the queries (`_sink_form`); the op reads [:, :, 0, 0]
    sinks: fx.Node | None = None


_LARGE_NEGATIVE = -1e4


def _eq(a: Any, b: Any) -> bool:
    return bool(statically_known_true(a == b)) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else a == b


def _hint(x: Any) -> int:
    return int(x.node.hint) if isinstance(x, torch.SymInt) else int(x)


def _compose(outer: tuple[int, ...], inner: tuple[int, ...]) -> tuple[int, ...]:
    # x.permute(inner).permute(outer) == x.permute(composed)
    return tuple(inner[i] for i in outer)


def _peel(node: fx.Node, scales: bool, effects: Effects | None = None) -> tuple[fx.Node, tuple[int, ...], float, list]:
    """Walk up through permutes (and scalar scales): node == base.permute(perm) * c * runtime.

    The walk stops at a tensor written in place (``q = q.clone(); q.mul_(s)``): its value is the one
    after the write, not its source's.
    """
    perm = tuple(range(val(node).dim()))
    c, runtime = 1.0, []
    while True:
        if effects is not None and effects.written(node):
            return node, perm, c, runtime
        op = canon(node)
        if op.kind == "permute":
            perm = _compose(perm, op.args[1])
        elif op.kind == "identity":
            pass
        elif op.kind == "scale" and scales and getattr(val(op.args[1]), "ndim", 0) == 0:  # a tensor stays q's / k's
            f, divide = op.args[1], op.args[2]
            if isinstance(f, float):
                c = c / f if divide else c * f
            else:
                runtime.append((f, divide))
        else:
            return node, perm, c, runtime
        node = op.args[0]


def _unrepeat(node: fx.Node, axis: int = 1) -> tuple[fx.Node, int, str] | None:
    """If ``node`` repeats a 4-D K/V along its head ``axis``, return (un-repeated, groups, layout).

    ``axis`` is 1 for (B, H, T, D) and 2 for (B, T, H, D) K/V (Meta-Llama repeats before transposing).
    """
    op = canon(node)
    if op.kind == "repeat_interleave" and isinstance(op.args[1], int) and op.args[2] in (axis, axis - 4):
        return op.args[0], op.args[1], "interleave"
    if op.kind == "repeat" and len(op.args[1]) == 4 and all(r == 1 for i, r in enumerate(op.args[1]) if i != axis):
        reps = op.args[1][axis]
        return (op.args[0], reps, "tile") if isinstance(reps, int) and reps > 1 else None
    if op.kind != "reshape" or val(node).dim() != 4:
        return None
    # reshape(expand(base.unsqueeze(axis + 1))) that merges the new axis into ``axis``
    expand = op.args[0]
    if canon(expand).kind != "expand" or val(expand).dim() != 5:
        return None
    inner = canon(expand).args[0]
    ev, iv = val(expand), val(inner)
    if iv.dim() != 5 or not _eq(iv.shape[axis + 1], 1):
        return None
    merged = [*ev.shape[:axis], ev.shape[axis] * ev.shape[axis + 1], *ev.shape[axis + 2:]]
    if not all(_eq(a, b) for a, b in zip(val(node).shape, merged)):
        return None
    src = canon(inner)
    base = None
    if src.kind == "unsqueeze" and src.args[1] in (axis + 1, axis - 4):
        base = src.args[0]
    elif src.kind == "getitem" and isinstance(src.args[1], tuple) and len(src.args[1]) > axis + 1:
        index = src.args[1]
        if index[axis + 1] is None and all(i == slice(None) for j, i in enumerate(index) if j != axis + 1):
            base = src.args[0]
    if base is None or val(base).dim() != 4:
        return None
    groups = ev.shape[axis + 1]
    return (base, _hint(groups), "interleave") if isinstance(groups, (int, torch.SymInt)) else None


class _Graph:
    """Ancestor queries over one graph (iterative: real graphs are thousands of nodes deep)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.effects = Effects(gm.graph)
        self.dead: dict = {}  # `effects.dead`'s memo

    @staticmethod
    def ancestors(node: fx.Node) -> set:
        out, stack = set(), list(node.all_input_nodes)
        while stack:
            n = stack.pop()
            if n not in out:
                out.add(n)
                stack.extend(n.all_input_nodes)
        return out

    def learned_only(self, node: fx.Node) -> bool:
        """True if ``node`` depends on no model input (only parameters, buffers, constants), counting what is
        written into it in place (a static KV cache made by ``zeros`` and filled by ``index_copy_``)."""
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
            stack.extend(self.effects.written(n))
        leaves = [n for n in seen if n.op in ("placeholder", "get_attr")]
        return all(n.op == "get_attr" or _is_state(n) for n in leaves
                   if isinstance(val(n), torch.Tensor))


def _is_state(node: fx.Node) -> bool:
    return bool(re.search(r"_(parameters|buffers)_", node.name)) or node.meta.get("is_state", False)


def _op_name(node: fx.Node) -> str:
    """What a node calls, for a reason sentence (no object addresses: reports stay stable between runs)."""
    return name(node) or node.op


def _other_users(region: set, nodes, memo: dict) -> fx.Node | None:
    """A live user of ``nodes`` outside ``region`` (dead users, `effects.dead`, do not count), else None."""
    for n in nodes:
        for u in n.users:
            if u not in region and not dead(u, memo):
                return u
    return None


def _dead_users(region: set, memo: dict) -> set:
    """The dead users of ``region``'s nodes, transitively: they go with the region when it is replaced."""
    out, stack = set(), [u for n in region for u in n.users if u not in region]
    while stack:
        u = stack.pop()
        if u not in out and u not in region and dead(u, memo):
            out.add(u)
            stack.extend(u.users)
    return out


def _walk_down(sm: fx.Node, region: set, memo: dict, drop: str = "") -> tuple[fx.Node, float] | Miss:
    """Down from the softmax to ``p @ v``; ``drop`` ("first" / "last"): the sink column that a slice must drop."""
    p, dropout_p = sm, 0.0
    while True:
        users = [u for u in p.users if not dead(u, memo)]
        if len(users) != 1:
            others = ", ".join(u.name for u in users)
            return Miss(sm, "the attention probabilities are also used by {} (e.g. output_attentions=True), "
                            "so they must be materialized", others)
        u = users[0]
        op = canon(u)
        if op.kind in ("cast", "identity", "dropout") and op.args[0] is p:
            dropout_p = op.args[1] if op.kind == "dropout" else dropout_p
        elif drop and (op.kind == "getitem" or name(u) in ("narrow", "slice")) and u.args[0] is p:
            if not _drops_column(u, drop):
                return Miss(sm, "the softmax over [scores, sink] is sliced by {} ({}), which does not drop exactly the "
                                "{} (sink) column", u.name, _op_name(u), drop)
            drop = ""
        elif op.kind == "matmul" and op.args[0] is p and drop:
            return Miss(sm, "the sink column concatenated to the scores is kept in the probabilities that reach "
                            "{}: not an attention sink (the sink's value would be read as a key)", u.name)
        elif op.kind == "matmul" and op.args[0] is p:
            return u, dropout_p
        else:
            return Miss(sm, "the softmax output feeds {} ({}), not a probabilities @ values matmul", u.name,
                        _op_name(u))
        region.add(u)
        p = u


def _drops_column(node: fx.Node, side: str) -> bool:
    """Whether ``node`` (``x[..., :-1]`` / ``x[..., 1:]``, ``narrow``, ATen ``slice``) drops exactly the ``side``
    ("first" / "last") column of its input's last axis and nothing else."""
    x = node.args[0]
    nd, length = val(x).dim(), val(x).shape[-1]
    if name(node) == "getitem":
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if Ellipsis in index:
            if index.count(Ellipsis) != 1 or index[-1] is Ellipsis:
                return False
            rest, last = [i for i in index[:-1] if i is not Ellipsis], index[-1]
        elif len(index) == nd:
            rest, last = list(index[:-1]), index[-1]
        else:
            return False
        if any(i != slice(None) for i in rest) or not isinstance(last, slice) or last.step not in (None, 1):
            return False
        start, stop = last.start, last.stop
    else:
        dim = arg(node, 1, "dim", 0)
        if not isinstance(dim, int) or dim % nd != nd - 1:
            return False
        start = arg(node, 2, "start", None)
        if name(node) == "narrow":
            size = arg(node, 3, "length")
            stop = start + size if isinstance(start, int) and isinstance(size, (int, torch.SymInt)) else None
        else:
            stop = arg(node, 3, "end", None)
            if arg(node, 4, "step", 1) != 1:
                return False

    def at(bound: Any, default: Any) -> Any:
        bound = default if bound is None else bound
        return length + bound if isinstance(bound, int) and bound < 0 else bound

    lo, hi = at(start, 0), at(stop, length)
    if isinstance(hi, int) and hi > 2**60:  # ATen's slice(..., end=INT64_MAX)
        hi = length
    want = (1, length) if side == "first" else (0, length - 1)
    return _eq(lo, want[0]) and _eq(hi, want[1])


def _max_shift(x: fx.Node) -> tuple[fx.Node, set] | None:
    """``c - c.max(-1, keepdim=True).values`` (or ``amax``; ``sub`` or ``add(c, neg(m))``): (c, the shift's nodes).
    Softmax is shift-invariant along its axis, so the shift can be dropped wherever the max is finite."""
    if name(x) == "sub" and len(x.args) == 2:
        c, m, nodes = x.args[0], x.args[1], {x}
    elif name(x) == "add" and len(x.args) == 2 and isinstance(x.args[1], fx.Node) and name(x.args[1]) == "neg":
        c, m, nodes = x.args[0], x.args[1].args[0], {x, x.args[1]}
    else:
        return None
    while isinstance(m, fx.Node) and name(m) == "detach":
        nodes.add(m)
        m = m.args[0]
    if not isinstance(m, fx.Node) or not isinstance(c, fx.Node):
        return None
    if name(m) == "getitem" and m.args[1] == 0 and isinstance(m.args[0], fx.Node) and name(m.args[0]) == "max":
        nodes.add(m)
        m = m.args[0]
    elif name(m) != "amax":
        return None
    nd = val(c).dim()
    dim, keep = arg(m, 1, "dim"), arg(m, 2, "keepdim", False)
    dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    if m.args[0] is not c or not keep or len(dims) != 1 or not isinstance(dims[0], int) or dims[0] % nd != nd - 1:
        return None
    return c, nodes | {m}


def _query_constant(node: Any, axis: int = -2, depth: int = 16) -> bool:
    """Whether ``node`` is provably constant along ``axis`` (counted from the end): it broadcasts along it
    through expands, casts and unit-dim views (``reshape(1, -1, 1, 1).expand(B, -1, Lq, 1)``)."""
    while depth > 0 and isinstance(node, fx.Node):
        v = val(node)
        if not isinstance(v, torch.Tensor):
            return False
        nd = v.dim()
        if -axis > nd or _eq(v.shape[axis], 1):
            return True
        op = canon(node)
        inner = op.args[0] if op.args else None
        if op.kind in ("cast", "identity", "expand"):  # expand aligns from the right
            pass
        elif op.kind == "unsqueeze" and isinstance(op.args[1], int):
            at = op.args[1] % nd
            axis = axis + 1 if at > nd + axis else axis  # a dim inserted after ours
        elif op.kind in ("reshape", "getitem") and isinstance(inner, fx.Node) and isinstance(val(inner), torch.Tensor):
            if op.kind == "getitem" and not all(i is None or i is Ellipsis or i == slice(None) for i in (
                    op.args[1] if isinstance(op.args[1], tuple) else (op.args[1],))):
                return False
            before, after = [d for d in val(inner).shape if not _eq(d, 1)], [d for d in v.shape if not _eq(d, 1)]
            if len(before) != len(after) or not all(_eq(a, b) for a, b in zip(before, after)):
                return False
            later = sum(1 for d in v.shape[nd + axis + 1:] if not _eq(d, 1))  # non-unit dims after ours
            dims = [i for i, d in enumerate(val(inner).shape) if not _eq(d, 1)]
            axis = dims[len(dims) - 1 - later] - val(inner).dim()
        else:
            return False
        node, depth = inner, depth - 1
    return False


def _sink_form(sm: fx.Node, x: fx.Node, region: set) -> tuple[fx.Node, fx.Node, str] | Miss | None:
    """softmax over ``cat([chain, sink], -1)`` (or ``[sink, chain]``), optionally shifted by the row max:
    (chain, the (B, H, Lq, 1) sink column, its side), the cat and shift joining ``region``; None if not this form."""
    shift = _max_shift(x)
    c, nodes = shift if shift else (x, set())
    if name(c) != "cat":
        return None
    parts = arg(c, 0, "tensors")
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not all(isinstance(t, fx.Node) for t in parts):
        return None
    nd = val(c).dim()
    dim = arg(c, 1, "dim", 0)
    if not isinstance(dim, int) or dim % nd != nd - 1:
        return None
    reach = [reaches_matmul(t) for t in parts]
    if reach == [True, False]:
        chain, col, side = parts[0], parts[1], "last"
    elif reach == [False, True]:
        chain, col, side = parts[1], parts[0], "first"
    else:
        return None
    if not _eq(val(col).shape[-1], 1):
        return Miss(sm, "the softmax runs over the scores concatenated with {} columns of {}: only one sink column "
                        "per row is an attention sink", _hint(val(col).shape[-1]), col.name)
    if nd != 4:
        return Miss(sm, "attention sinks are fused on 4-D (batch, heads, queries, keys) scores; these are {}-D", nd)
    if not _query_constant(col):
        return Miss(sm, "the column {} concatenated to the scores is not provably constant along the queries: a "
                        "per-head attention sink varies at most along batch and heads", col.name)
    region |= nodes | {c}
    return chain, col, side


def _walk_up(sm: fx.Node, x: fx.Node, region: set, g: _Graph) -> dict | Miss:
    st = {"masks": [], "softcap": 0.0, "scale": 1.0, "runtime": [], "parts": []}
    phase = 0  # 0: masks allowed; 1: after the softcap; 2: in the scales before it
    while True:
        op = canon(x)
        region.add(x)
        if op.kind in ("cast", "identity"):
            x = op.args[0]
            continue
        if op.kind == "matmul":
            st["qk"] = x
            return st
        if op.kind == "scale":
            inner, f, divide = op.args
            if phase == 0 and canon(inner).kind == "tanh":
                cap = _softcap(inner, f, divide)
                if not cap:
                    return Miss(sm, "{} * tanh(...) is not a softcap c * tanh(s / c) with the same c", f)
                st["softcap"], phase = cap[0], 1
                region.update(cap[1])
                x = cap[2]
                st["parts"].append("softcap")
                continue
            if isinstance(f, float):
                st["scale"] = st["scale"] / f if divide else st["scale"] * f
            else:
                st["runtime"].append((f, divide))
            phase, x = 2, inner
            continue
        if op.kind in ("masked_fill", "where") and phase == 2 and (st["runtime"] or st["scale"] <= 0):
            return Miss(sm, "a where/masked_fill mask is applied before a scale not known to be positive (run-time, "
                            "tensor or <= 0): -inf * 0 is NaN and -inf * -1 is +inf, so it cannot move before the mask")
        if op.kind in ("add", "masked_fill", "where") and phase:
            return Miss(sm, "a mask is applied before the {}; attnfuse expects scale, softcap, then masks",
                        "softcap" if phase == 1 else "scale")
        if op.kind in ("add", "masked_fill", "where"):
            term = _mask_term(sm, op, g)
            if not term:
                return term
            st["masks"].append(term[0])
            st["parts"].append(term[0].kind == "add" and "bias" or "mask")
            x = term[1]
            continue
        return Miss(sm, "{} ({}) between the scores and the softmax is not part of the attention pattern",
                    x.name, _op_name(x))


def _written_miss(sm: fx.Node, g: _Graph, region: set, output: fx.Node, reads: list) -> Miss | None:
    """A `Miss` if an in-place write makes the fused op (which reads its inputs where the region ends)
    see other values than eager (which read them on the way into the region), else None.

    * a region intermediate written by a node outside the region (``s.masked_fill_(m, -inf)``);
    * an input (q/k/v, a mask, a run-time scale) whose storage is written between eager's first
      read of it and the end of the region.
    """
    for n in region - {output}:  # the output is the op's: later writes to it are the user's business
        for w in g.effects.written(n):
            if w not in region:
                return Miss(sm, "{} ({}) writes an intermediate of the attention region in place", w.name, _op_name(w))
    written = [n for n in reads if isinstance(n, fx.Node) and g.effects.written(n)]
    upstream = _Graph.ancestors(output) | region if written else set()
    position = g.effects.position
    for node in written:
        readers = [u for u in node.users if u in upstream]
        start = min(readers, key=position.__getitem__, default=output)
        w = g.effects.written_between(node, start, output)
        if w is not None:
            return Miss(sm, "{} ({}) writes {} in place inside the attention region, after eager read it",
                        w.name, _op_name(w), node.name)
    return None


def _heads_miss(sm: fx.Node, qs: list, ks: list, vs: list, groups: int) -> Miss | str:
    """A `Miss` unless K/V's batch dims broadcast against Q's the ways the op reads them; else which of K
    and V (``"k"``, ``"v"`` or ``""``) the rewrite expands over the heads to the other's count.

    K and V agree, or differ only on the heads axis where one of them has a single head (it
    broadcasts to every head of the other, as matmul broadcasting did).  Each K/V batch dim equals
    Q's or is 1, and a 1 only on the heads axis (multi-query: every head reads the one K/V head) or,
    for 4-D, on the batch axis (expanded).
    """
    qb, kb, vb = qs[:-2], ks[:-2], vs[:-2]
    if len(vs) != len(qs) or len(ks) != len(qs):
        return Miss(sm, "q/k/v have ranks {} / {} / {}: the values do not line up with the scores", len(qs),
                    len(ks), len(vs))
    expand = ""
    if not all(_eq(a, b) for a, b in zip(kb, vb)):
        same = all(_eq(a, b) for a, b in zip(kb[:-1], vb[:-1]))
        expand = "k" if same and _eq(kb[-1], 1) and groups == 1 else "v" if same and _eq(vb[-1], 1) else ""
        if not expand or groups > 1:
            return Miss(sm, "K has batch/head dims {} and V {}: they neither match nor broadcast over the heads",
                        [_hint(x) for x in kb], [_hint(x) for x in vb])
        kb = vb if expand == "k" else kb
    if groups > 1:  # K/V were un-repeated: head j of q reads K/V head j // groups (or j % heads)
        kb = [*kb[:-1], kb[-1] * groups]
    broadcast = [i for i, (a, b) in enumerate(zip(qb, kb)) if not _eq(a, b)]
    if any(not _eq(kb[i], 1) for i in broadcast):
        return Miss(sm, "q batch/head dims {} and k {} do not line up", [_hint(x) for x in qb], [_hint(x) for x in kb])
    heads = len(qb) - 1
    allowed = {heads} | ({0} if len(qs) == 4 else set())
    if not set(broadcast) <= allowed or (groups > 1 and heads in broadcast):
        return Miss(sm, "K/V broadcast over q's batch dims {}: only the heads axis (or the batch axis of 4-D "
                        "tensors) may broadcast", broadcast)
    return expand


def _fill(x: Any) -> float | None:
    f = scalar(x)
    return f if isinstance(f, float) else None


def _mask_term(sm: fx.Node, op, g: _Graph) -> tuple[MaskTerm, fx.Node] | Miss:
    if op.kind == "add":
        a, b = op.args
        if isinstance(b, (int, float)) or scalar(b) is not None:
            return Miss(sm, "a scalar is added to the scores; attnfuse does not fold constant shifts")
        chain, mask = (a, b) if reaches_matmul(a) else (b, a)
        return MaskTerm("add", mask), chain
    if op.kind == "masked_fill":
        chain, mask, value = op.args
        fill = _fill(value)
        if fill is None or fill > _LARGE_NEGATIVE:
            return Miss(sm, "masked_fill with {} is not a mask (needs -inf, finfo.min or a value <= -1e4)", value)
        return MaskTerm("keep", mask, negate=True, fill=fill), chain
    cond, a, b = op.args
    for chain, other, negate in ((a, b, False), (b, a, True)):
        if reaches_matmul(chain):
            fill = _fill(other)
            if fill is None or fill > _LARGE_NEGATIVE:
                return Miss(sm, "where(..., {}) is not a mask (needs -inf, finfo.min or a value <= -1e4)", other)
            return MaskTerm("keep", cond, negate=negate, fill=fill), chain
    return Miss(sm, "where() between the scores and the softmax does not select the scores")


def _softcap(tanh_node: fx.Node, c: Any, divide: bool):
    # cap · tanh(s / cap) == cap · tanh(s · (1/cap))
    if divide or not isinstance(c, float):
        return None
    inner = canon(canon(tanh_node).args[0])
    if inner.kind != "scale" or not isinstance(inner.args[1], float):
        return None
    d = inner.args[1] if inner.args[2] else 1.0 / inner.args[1]
    if not math.isclose(d, c, rel_tol=1e-6):
        return None
    return c, {tanh_node, canon(tanh_node).args[0]}, inner.args[0]


def _shape(op: Operand) -> list:
    shape = list(val(op.node).shape)
    return shape if op.perm is None else [shape[p] for p in op.perm]


def _identity(perm: tuple[int, ...]) -> tuple[int, ...] | None:
    return None if perm == tuple(range(len(perm))) else perm


def _is_default_scale(c: float, runtime: list, head_dim: Any) -> bool:
    """Whether c * prod(runtime factors) == head_dim ** -0.5 for every value of the shape symbols."""
    import sympy

    total = sympy.Float(c)
    for node, divide in runtime:
        v = val(node)
        if not isinstance(v, (torch.SymInt, torch.SymFloat)):
            return False
        total = total / v.node.expr if divide else total * v.node.expr
    d = head_dim.node.expr if isinstance(head_dim, torch.SymInt) else sympy.Integer(head_dim)
    diff = total - d ** sympy.Rational(-1, 2)
    symbols = sorted(diff.free_symbols, key=str)
    for trial in range(3):
        point = {s: 3 + 17 * trial + 5 * i for i, s in enumerate(symbols)}
        if abs(float(diff.subs(point))) > 1e-9:
            return False
    return True


def _match_softmax(sm: fx.Node, g: _Graph) -> AttentionMatch | Miss:
    x, dim = canon(sm).args
    sv = val(x)
    if not isinstance(sv, torch.Tensor) or not isinstance(dim, int):
        return Miss(sm, "the softmax input has no static rank or axis")
    if sv.dim() < 2 or dim % sv.dim() != sv.dim() - 1:
        return Miss(sm, "softmax over axis {} of a {}-D tensor is not over the key (last) axis", dim, sv.dim())
    region: set = {sm}
    sink = _sink_form(sm, x, region)
    if isinstance(sink, Miss):
        return sink
    if sink is not None:
        x = sink[0]
    down = _walk_down(sm, region, g.dead, sink[2] if sink else "")
    if not down:
        return down
    pv, dropout_p = down
    region.add(pv)
    up = _walk_up(sm, x, region, g)
    if not up:
        return up
    qk = up["qk"]
    a, b = canon(qk).args
    if g.learned_only(b) or g.learned_only(canon(pv).args[1]):
        return Miss(sm, "the keys/values are learned weights, not computed from the inputs: "
                        "this is a classifier or router, not attention")
    if val(a).dim() < 2 or val(b).dim() < 2 or val(a).dim() != val(b).dim():
        return Miss(sm, "the scores matmul has operands of rank {} and {}", val(a).dim(), val(b).dim())
    qbase, qperm, qc, qrt = _peel(a, scales=True, effects=g.effects)
    kbase, kperm, kc, krt = _peel(b, scales=True, effects=g.effects)
    swap = list(range(len(kperm)))
    swap[-1], swap[-2] = swap[-2], swap[-1]
    kperm = _compose(tuple(swap), kperm)
    vbase, vperm, _, _ = _peel(canon(pv).args[1], scales=False, effects=g.effects)
    if sm.meta.get(LOGSUMEXP) and any(t.kind == "add" or t.fill != float("-inf") for t in up["masks"]):
        return Miss(sm, "exp(s - logsumexp(s)) with an additive or finite-fill mask is not softmax on a row whose "
                        "every key is masked (all its 'probabilities' are 1); fused only with -inf masks")
    for term in up["masks"]:
        if term.node is qk or qk in g.ancestors(term.node):
            return Miss(sm, "the mask depends on the scores, so it cannot be applied inside a fused kernel")
    if sink is not None and (sink[1] is qk or qk in g.ancestors(sink[1])):
        return Miss(sm, "the sink column depends on the scores, so it is not a per-head attention sink")
    other = _other_users(region, region - {pv}, g.dead)
    if other is not None:
        return Miss(sm, "an intermediate of the attention region is also used by {} ({})", other.name, _op_name(other))
    region |= _dead_users(region - {pv}, g.dead)
    q, k, v = Operand(qbase, _identity(qperm)), Operand(kbase, _identity(kperm)), Operand(vbase, _identity(vperm))
    groups, layout = 1, "interleave"
    if val(kbase).dim() == 4 and val(vbase).dim() == 4:
        # K/V are read as base.permute(perm) = (B, H, T, D): their head axis is perm[1]
        rk, rv = _unrepeat(kbase, (k.perm or (0, 1))[1]), _unrepeat(vbase, (v.perm or (0, 1))[1])
        if rk and rv and rk[1:] == rv[1:]:
            k, v, groups, layout = Operand(rk[0], k.perm), Operand(rv[0], v.perm), rk[1], rk[2]
    qs, ks, vs = _shape(q), _shape(k), _shape(v)
    if not (_eq(ks[-1], qs[-1]) and _eq(vs[-2], ks[-2])):
        return Miss(sm, "q/k/v shapes {} / {} / {} do not line up as attention", qs, ks, vs)
    expand = _heads_miss(sm, qs, ks, vs, groups)
    if not isinstance(expand, str):
        return expand
    kv_heads = vs[-3] if expand == "k" else ks[-3] if len(ks) >= 3 else 1
    if groups == 1 and len(qs) >= 3 and _eq(kv_heads, 1) and not _eq(qs[-3], 1):
        groups = _hint(qs[-3])  # one K/V head for every query head (after folding, the last batch dim)
    reads = [q.node, k.node, v.node, *(t.node for t in up["masks"]), *(f for f, _ in up["runtime"] + qrt + krt),
             *([sink[1]] if sink else [])]
    bad = _written_miss(sm, g, region, pv, reads)
    if bad is not None:
        return bad
    if not (val(q.node).dtype == val(k.node).dtype == val(v.node).dtype):
        return Miss(sm, "q, k, v have different dtypes ({}, {}, {})", val(q.node).dtype, val(k.node).dtype,
                    val(v.node).dtype)
    c, runtime = up["scale"] * qc * kc, up["runtime"] + qrt + krt
    scale: float | None = c
    if runtime and _is_default_scale(c, runtime, qs[-1]):
        scale, runtime = None, []
    learned = next((f for f, _ in runtime if getattr(val(f), "requires_grad", False)), None)
    if learned is not None and getattr(val(sm), "requires_grad", False):
        return Miss(sm, "the scale {} needs a gradient: moved onto q, its gradient (sum of q * dq) can miss the 2x "
                        "accuracy rule against eager's (sum of s * ds); fused only without one (inference, frozen)",
                    learned.name)
    parts = ["matmul", *(["scale"] if (c != 1.0 or runtime or scale is None) else []), *reversed(up["parts"]),
             *(["sink"] if sink else []), "softmax", *(["dropout"] if dropout_p else []), "matmul"]
    found = AttentionMatch(
        form="graph", anchor=sm, output=pv, q=q, k=k, v=v, scale=scale, scale_nodes=tuple(runtime),
        softcap=up["softcap"], masks=tuple(reversed(up["masks"])), kv_groups=groups, kv_layout=layout,
        dropout_p=dropout_p, pattern="·".join(parts), region=frozenset(region), kv_expand=expand,
        sinks=sink[1] if sink else None)
    return _local.unfold_window(found) or found


def _sdpa_unrepeat(node: fx.Node, q: fx.Node, k: fx.Node, v: fx.Node, gqa: int,
                   g: _Graph | None) -> tuple[fx.Node, fx.Node, int, str] | None:
    """(k, v, kv_groups, layout) read before a repeat along the heads axis of an SDPA call on (B, H, L, D)
    tensors (transformers' ``repeat_kv``: expand + reshape; ``repeat_interleave``; ``repeat``), else None.

    With ``enable_gqa`` (query head h reads K/V head h // ``gqa``) only an interleaving repeat composes into
    one group count.  Eager read the bases at the repeat and the op reads them at the call, so a write to
    the bases or the repeat's nodes in between keeps the repeat (``kv_groups`` 1: correct, not minimal).
    """
    if not all(isinstance(val(x), torch.Tensor) and val(x).dim() == 4 for x in (q, k, v)):
        return None
    rk, rv = _unrepeat(k, 1), _unrepeat(v, 1)
    if not (rk and rv and rk[1:] == rv[1:]) or rk[1] < 2 or (gqa > 1 and rk[2] != "interleave"):
        return None
    groups = rk[1] * gqa
    if not (_eq(val(rk[0]).shape[1] * groups, val(q).shape[1]) and _eq(val(rv[0]).shape[1], val(rk[0]).shape[1])):
        return None
    effects = g.effects if g is not None else Effects(node.graph)
    for top, base in ((k, rk[0]), (v, rv[0])):
        chain = [top]  # the repeat's nodes, from the call's operand up to the base
        while chain[-1] is not base and len(chain) < 5:
            chain.append(canon(chain[-1]).args[0])
        if chain[-1] is not base or any(effects.written_between(n, chain[-2], node) for n in chain):
            return None
    return rk[0], rv[0], groups, rk[2]


def _match_sdpa(node: fx.Node, g: _Graph | None = None) -> AttentionMatch | Miss:
    q, k, v = (arg(node, i, key) for i, key in enumerate(("query", "key", "value")))
    mask = arg(node, 3, "attn_mask")
    dropout_p, causal = arg(node, 4, "dropout_p", 0.0), arg(node, 5, "is_causal", False)
    scale, gqa = node.kwargs.get("scale"), node.kwargs.get("enable_gqa", False)
    if not all(isinstance(x, fx.Node) for x in (q, k, v)) or not isinstance(dropout_p, (int, float)):
        return Miss(node, "scaled_dot_product_attention with non-tensor inputs or a dynamic dropout_p")
    if scale is not None and not isinstance(scale, (int, float)):
        return Miss(node, "scaled_dot_product_attention with a run-time scale")
    masks = ()
    if isinstance(mask, fx.Node):
        is_bool = val(mask).dtype == torch.bool
        masks = (MaskTerm("keep", mask, fill=float("-inf")) if is_bool else MaskTerm("add", mask),)
    groups = 1
    qs, ks = list(val(q).shape), list(val(k).shape)
    if gqa and len(qs) == 4 and not _eq(qs[1], ks[1]):
        groups = _hint(qs[1]) // _hint(ks[1])
    layout, unrepeated = "interleave", _sdpa_unrepeat(node, q, k, v, groups, g)
    if unrepeated:
        k, v, groups, layout = unrepeated
    return AttentionMatch(
        form="sdpa", anchor=node, output=node, q=Operand(q), k=Operand(k), v=Operand(v),
        scale=None if scale is None else float(scale), masks=masks, causal=bool(causal), kv_groups=groups,
        kv_layout=layout, dropout_p=float(dropout_p), pattern="scaled_dot_product_attention",
        region=frozenset({node}))


def _match_mha(node: fx.Node) -> AttentionMatch | Miss:
    # bias_k/bias_v, add_zero_attn, static_k/static_v: `_mha.forward` applies them as PyTorch does
    if name(node) == "_transformer_encoder_layer_fwd":
        return _match_encoder_layer(node)
    for user in node.users:
        if canon(user).kind != "getitem" or user.args[1] != 0:
            return Miss(node, "the attention weights of multi_head_attention_forward are used (need_weights)")
    q, k, v = (Operand(arg(node, i, key)) for i, key in enumerate(("query", "key", "value")))
    # Recorded for the report; `_mha.forward` applies them itself (bool True = do not attend).
    masks = tuple(MaskTerm("keep", m, negate=True, fill=float("-inf")) if val(m).dtype == torch.bool
                  else MaskTerm("add", m)
                  for m in (arg(node, 16, "attn_mask"), arg(node, 14, "key_padding_mask"))
                  if isinstance(m, fx.Node))
    return AttentionMatch(form="mha", anchor=node, output=node, q=q, k=k, v=v, scale=None, masks=masks,
                          pattern="multi_head_attention_forward", region=frozenset({node}))


def _match_encoder_layer(node: fx.Node) -> AttentionMatch | Miss:
    """``nn.TransformerEncoderLayer``'s inference fast path: the whole layer, re-pointed at `_mha.encoder_layer`.

    The native op reads its mask as bool (any nonzero entry hides the key).  A query row with no visible key
    is NaN on the CPU (checked against the op in tests/test_mha_variants.py); elsewhere that value is not
    verified, so a masked layer off the CPU stays native."""
    src, mask, mask_type = arg(node, 0, "src"), arg(node, 18, "mask"), arg(node, 19, "mask_type")
    if not isinstance(src, fx.Node) or val(src).dim() != 3 or val(src).is_nested:
        return Miss(node, "_transformer_encoder_layer_fwd on a nested or non-(B, L, E) input")
    masks = ()
    if isinstance(mask, fx.Node):
        if mask_type not in (0, 1, 2):
            return Miss(node, "_transformer_encoder_layer_fwd with mask_type {}", mask_type)
        if val(src).device.type != "cpu":
            return Miss(node, "a masked _transformer_encoder_layer_fwd on {}: the native value of a query row with no "
                        "visible key is verified on the CPU only", val(src).device.type)
        masks = (MaskTerm("keep", mask, negate=True, fill=float("-inf")),)  # for the report: nonzero hides a key
    return AttentionMatch(form="mha", anchor=node, output=node, q=Operand(src), k=Operand(src), v=Operand(src),
                          scale=None, masks=masks, pattern="transformer_encoder_layer", region=frozenset({node}))


def match(gm: fx.GraphModule) -> tuple[list[AttentionMatch], list[Miss]]:
    """Every attention region of ``gm``, and a reasoned `Miss` for every near miss."""
    g = _Graph(gm)
    found: list[AttentionMatch] = []
    misses: list[Miss] = []
    readers = {"softmax": lambda n: _match_softmax(n, g), "sdpa": lambda n: _match_sdpa(n, g), "mha": _match_mha}
    for node in list(gm.graph.nodes):
        reader = readers.get(canon(node).kind)
        if reader is None:
            continue
        result = reader(node)
        (found if result else misses).append(result)
    # softmax spellings `canonicalize` left alone, with why (`_softmax_forms`)
    misses += [Miss(n, "{}", why) for n, why in gm.meta.get(SPELLING_MISSES, ()) if not getattr(n, "_erased", 0)]
    return found, misses
