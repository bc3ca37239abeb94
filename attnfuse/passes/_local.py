"""Bucketed local attention: query blocks against the keys of neighbouring blocks, gathered by
reshape/pad/unfold and masked by position, read as a band over the sequence (`bucket_window`).

The backend calls it on each match after `match.match`: the proof evaluates the position masks
(`_maskvalue.constant_value`), so it sits beside the mask analysis, not in the matcher.  The other
hand-written local attention, one window per query by ``unfold``, is read by the matcher (`_unfold`).
"""

from __future__ import annotations

import dataclasses
import math

import torch.fx as fx

from .._sizes import hint
from . import _maskvalue
from ._graph import name, val
from ._records import Operand, absorbs, operand_shape

_GATHERS = frozenset(("view", "reshape", "_unsafe_view", "pad", "unfold", "movedim", "moveaxis", "flatten", "unflatten",
                      "permute", "transpose", "contiguous", "clone", "unsqueeze", "squeeze"))
_MAX_CELLS = 1 << 22


def _source(node: fx.Node, shape) -> fx.Node | None:
    """The nearest ancestor along the data operand of gather ops with exactly ``shape``, or None."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 24:
        if list(val(node).shape) == list(shape) and seen:
            return node
        if name(node) not in _GATHERS or not node.args:
            return None
        node, seen = node.args[0], seen + 1
    return None


def _positions(gm, seq: fx.Node, out: fx.Node, probe):
    """``out`` evaluated with ``seq`` replaced by ``probe`` (every node between them a gather op), or None."""
    import torch

    chain, stack = [], [out]
    while stack:
        n = stack.pop()
        if n is seq or n in chain:
            continue
        if n.op not in ("call_function", "call_method") or name(n) not in _GATHERS:
            return None
        chain.append(n)
        stack.extend(a for a in n.all_input_nodes)
    env = {seq: probe}

    def value(a):
        v = val(a)
        if a in env:
            return env[a]
        if isinstance(v, torch.SymInt):
            return hint(v)
        raise LookupError(a)

    try:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for n in sorted(chain, key=order.__getitem__):
            args = fx.node.map_arg(n.args, value)
            kwargs = fx.node.map_arg(n.kwargs, value)
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs) if n.op == "call_method" \
                else n.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - an op we cannot replay is simply not proven
        return None
    return env[out]


def _read(positions, op):
    """The position map as the operand is read (``Operand.perm``)."""
    return positions if positions is None or op.perm is None else positions.permute(op.perm)


def bucket_window(gm, m, example_inputs):
    """``m`` read as a band over the sequence when it is bucketed local attention (queries of one block against
    the keys of neighbouring blocks, gathered by reshape/pad/unfold, with position masks that leave exactly a
    band of the sequence visible), else None.  Proven by value on the (static) shapes: every query position
    appears once, and each query row's visible keys are exactly ``[t - left, t + right]`` of its own sequence,
    once each."""
    import torch

    if m.form != "graph" or m.kv_groups != 1 or m.kv_expand or not m.masks or m.q.perm:
        return None
    qs = operand_shape(m.q)
    if any(isinstance(s, torch.SymInt) for o in (m.q, m.k, m.v) for s in operand_shape(o)) or len(qs) < 3:
        return None
    qseq = m.q.node
    while name(qseq) in ("view", "reshape", "_unsafe_view", "unsqueeze") and \
            val(qseq.args[0]).dim() < val(qseq).dim():
        qseq = qseq.args[0]
    shape = list(val(qseq).shape)
    if qseq is m.q.node or len(shape) < 2 or math.prod(shape) > _MAX_CELLS:
        return None
    kseq, vseq = _source(m.k.node, shape), _source(m.v.node, shape[:-1] + [operand_shape(m.v)[-1]])
    if kseq is None or vseq is None:
        return None
    length, rows = shape[-2], math.prod(shape[:-1])
    probe = (torch.arange(rows, dtype=torch.float64) + 1).reshape(*shape[:-1], 1)
    maps = []
    for shift in (0.0, 2.0 ** 30):  # a padded slot keeps its pad value when the positions shift
        maps.append([_read(_positions(gm, node, op.node, probe.expand(*val(node).shape) + shift), op)
                     for node, op in ((qseq, m.q), (kseq, m.k), (vseq, m.v))])
    if any(p is None for ps in maps for p in ps):
        return None
    if any(not bool((p == p[..., :1]).all()) for ps in maps for p in ps):
        return None  # one position per row: the gathers move whole rows
    (qmap, kmap, vmap), (_, kmap2, vmap2) = ([p[..., 0] for p in ps] for ps in maps)
    kpad, vpad = kmap2 == kmap, vmap2 == vmap
    kmap, vmap = kmap.masked_fill(kpad, 0), vmap.masked_fill(vpad, 0)
    if not torch.equal(kmap, vmap):
        return None
    if sorted(qmap.flatten().tolist()) != list(range(1, rows + 1)):
        return None  # not every query position exactly once
    inputs = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs or ()))
    dtype = val(m.q.node).dtype
    keep = torch.ones((), dtype=torch.bool)
    for term in m.masks:
        value = _maskvalue.constant_value(gm, inputs, term.node)
        if value is None:
            return None
        if term.kind == "keep":
            if not absorbs(term.fill, dtype):
                return None
            k = value if value.dtype == torch.bool else value != 0
            keep = keep & (~k if term.negate else k)
        else:
            masked = torch.isneginf(value) | (value <= -1e38)
            if not bool(((value == 0) | masked).all()):
                return None
            keep = keep & ~masked
    scores = [*qs[:-1], operand_shape(m.k)[-2]]
    keep = keep.expand(scores)
    tq = qmap.unsqueeze(-1).expand(scores)
    tk = kmap.unsqueeze(-2).expand(scores)
    real = tk >= 1
    if not bool((real | ~keep).all()):
        return None  # a padded key is visible
    seq_q, seq_k = (tq - 1) // length, (tk - 1) // length
    if not bool(((seq_q == seq_k) | ~keep).all()):
        return None
    offset = (tk - tq)[keep]
    if offset.numel() == 0:
        return None
    left, right = int(-offset.min()), int(offset.max())
    if left < 0 or right < 0:
        return None
    pos = (tq - 1) % length
    want = (torch.clamp(pos + right, max=length - 1) - torch.clamp(pos - left, min=0) + 1)[..., 0]
    if not torch.equal(keep.sum(-1), want.to(torch.int64)):
        return None  # some band key is missing or seen twice
    rows_keys = torch.stack([tq[keep], tk[keep]])
    if torch.unique(rows_keys, dim=1).shape[1] != rows_keys.shape[1]:
        return None
    return dataclasses.replace(m, q=Operand(qseq), k=Operand(kseq), v=Operand(vseq), masks=(), causal=right == 0,
                               window_left=left, window_right=right, bucketed=True,
                               pattern="bucketed·" + m.pattern)
