"""Local attention written by hand with ``unfold``: read it as a band over the sequence.

The textbook spelling pads K and V with zero rows on the sequence axis and takes one window per query::

    kw = F.pad(k, (0, 0, wl, wr)).unfold(2, wl + wr + 1, 1)        # (B, H, L, D, W): rows i .. i + W - 1
    s = q.unsqueeze(3) @ kw.transpose(-2, -1) * scale               # (B, H, L, 1, W)
    out = s.softmax(-1) @ F.pad(v, ...).unfold(2, W, 1).transpose(-2, -1)   # (B, H, L, 1, Dv)

The matcher reads that as attention with three batch axes and one query per row.  It is exactly the band
``[i - wl, i + wr]`` of the un-padded sequence, plus, for the rows near the edges, the padded rows: real keys
whose score is 0 (``q · 0``, after any scale or softcap) and whose value is 0.  The op reproduces them
with ``window_pad=True`` (their count per row enters the softmax's denominator), so the site runs the window
kernel on the original (B, H, L, D) tensors, O(L·W), and the output gets its size-1 query axis back.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from ._canon import canon, scalar
from ._graph import arg, name, val
from ._operands import peel
from ._records import Operand, operand_shape


def _unfold(node: fx.Node) -> tuple[fx.Node, int, int, int] | None:
    """(the un-padded tensor, left pad, right pad, window) when ``node`` is ``F.pad(x, (0, 0, l, r)).unfold(2,
    l + r + 1, 1)`` of a 4-D ``x`` padded with zeros, else None."""
    if name(node) != "unfold" or len(node.args) < 4:
        return None
    padded, dim, size, step = node.args[:4]
    if not isinstance(padded, fx.Node) or name(padded) != "pad" or step != 1 or not isinstance(size, int):
        return None
    x, pads = arg(padded, 0, "input"), arg(padded, 1, "pad")
    mode, value = arg(padded, 2, "mode", "constant"), arg(padded, 3, "value", None)
    if not isinstance(x, fx.Node) or val(x).dim() != 4 or dim not in (2, -2) or mode != "constant":
        return None
    if value is not None and scalar(value) != 0.0:
        return None  # padded with another value: those keys have other scores than 0
    pads = tuple(pads) if isinstance(pads, (list, tuple)) else ()
    if len(pads) != 4 or pads[:2] != (0, 0) or not all(isinstance(p, int) and p >= 0 for p in pads[2:]):
        return None
    left, right = pads[2], pads[3]
    return (x, left, right, size) if size == left + right + 1 else None


def unfold_window(m):
    """``m`` read as a band over the sequence (see the module docstring), or None when it is not the unfold
    spelling (then ``m`` stands as it is)."""
    qs = operand_shape(m.q)
    if m.form != "graph" or len(qs) != 5 or qs[-2] != 1 or m.masks or m.kv_groups != 1 or m.kv_expand:
        return None
    uq = canon(m.q.node)
    if m.q.perm is not None or uq.kind != "unsqueeze" or uq.args[1] not in (3, -2):
        return None
    kv = []
    for op in (m.k, m.v):
        if op.perm != (0, 1, 2, 4, 3):
            return None
        found = _unfold(op.node)
        if found is None:
            return None
        kv.append(found)
    (k, kl, kr, kw), (v, vl, vr, vw) = kv
    if (kl, kr) != (vl, vr) or val(k).shape[:3] != val(v).shape[:3]:
        return None
    qbase, qperm, _, _ = peel(uq.args[0], scales=False)
    q = Operand(qbase, None if qperm == tuple(range(4)) else qperm)
    if list(operand_shape(q)[:3]) != list(val(k).shape[:3]):
        return None  # K/V heads or lengths differ from q's: not one query per window
    return dataclasses.replace(m, q=q, k=Operand(k), v=Operand(v), window_left=kl, window_right=kr,
                               window_pad=True, pattern=m.pattern.replace("matmul", "unfold·matmul", 1))
