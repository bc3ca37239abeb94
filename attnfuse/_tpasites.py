"""The backend's side of the ``tpa`` family: which matched sites it may run, and what the report says.

A site the matcher found factorized (`attnfuse.passes._tpa`, ``AttentionMatch.tpa``) is a ``tpa`` candidate when
the family's op (`attnfuse._tpaop`) computes it exactly: 4-D sides, a key mask of at most (B, 1, 1, Lk) (key
padding, as the flash family's bool / additive forms), a band, softcap and GQA with interleaved heads; no dropout,
ALiBi, sinks, documents, block-sparse constants, run-time scales or tiled heads, and not under context
parallelism.  Otherwise the candidate row says why.  When the plan chooses another kernel the factors are
dropped from the match, so the rewriter emits the usual op over the formed tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .kernels.tpa._cpu import DECODE_ROWS
from .passes import rewrite
from .passes._graph import val
from .passes._records import AttentionMatch, operand_shape
from .passes._tparewrite import statically_placeable

__all__ = ["chosen", "config", "structure"]


def _why(m: AttentionMatch, context_parallel: bool) -> str | None:
    if context_parallel:
        return "context parallelism runs attnfuse's flash / window kernels over the formed tensors"
    if m.form not in ("graph", "sdpa") or any(len(operand_shape(o)) != 4 for o in (m.q, m.k, m.v)):
        return "the tpa op takes 4-D (B, H, T, D) sides"
    features = {"dropout": m.dropout_p > 0, "ALiBi": m.alibi is not None, "attention sinks": m.sinks is not None,
                "packed documents": m.doc is not None, "a padded window": m.window_pad, "bucketed local attention":
                m.bucketed, "a block-sparse constant": m.block_sparse, "a run-time scale": bool(m.scale_nodes),
                "heads repeated tile-wise": m.kv_layout == "tile" and m.kv_groups > 1, "a broadcast K/V head":
                bool(m.kv_expand)}
    found = [name for name, present in features.items() if present]
    if found:
        return f"the tpa op does not take {', '.join(found)}"
    if rewrite.mask_semantics(m) not in ("none", "keep", "add"):
        return "the mask's semantics are not one the op takes"
    for term in m.masks:
        shape = list(getattr(val(term.node), "shape", ()))
        if len(shape) > 4 or any(s != 1 for s in shape[-3:-1]):
            return "the tpa op reads a key mask of at most (B, 1, 1, Lk); this mask varies over queries or heads"
    for op, side in zip((m.q, m.k, m.v), m.tpa):
        if side is not None and not statically_placeable(op, side):
            return "a factor's (B, T) sizes are symbolic and it has no tensor of that shape to read"
    return None


def structure(m: AttentionMatch, context_parallel: bool) -> dict[str, Any] | None:
    """The planner's ``structure["tpa"]``: the (q, k, v) ranks (0: plain) and ``why`` not, or None."""
    if not m.tpa:
        return None
    out: dict[str, Any] = {"ranks": tuple(s.rank if s is not None else 0 for s in m.tpa)}
    why = _why(m, context_parallel)
    if why:
        out["why"] = why
    return out


def chosen(kernel: str, m: AttentionMatch) -> AttentionMatch:
    """``m`` as the rewriter should see it: its factors kept only where the plan chose ``tpa``."""
    return m if kernel == "tpa" or not m.tpa else dataclasses.replace(m, tpa=())


def config(m: AttentionMatch) -> dict[str, Any]:
    """The report's ``config`` of a tpa site: the CPU path and each side's factors."""
    lq = operand_shape(m.q)[-2]
    k, v = m.tpa[1], m.tpa[2]
    decode = isinstance(lq, int) and lq <= DECODE_ROWS and k is not None and v is not None
    factors = {name: {"rank": s.rank, "heads": s.heads, "head_dim": s.head_dim, "scale": s.scale}
               for name, s in zip("qkv", m.tpa) if s is not None}
    return {"path": "decode (reads factors only)" if decode else "blocked (one key block formed at a time)",
            "factors": factors}
