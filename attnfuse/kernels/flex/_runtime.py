"""Compiled FlexAttention calls: one ``torch.compile``d caller per configuration key, created lazily.

Dynamo caches compiled code on the code object of the function it compiles, and recompiles it for every new
closure structure and constant (score_mod flags, fills, window sizes) up to ``recompile_limit`` entries, after
which it runs FlexAttention uncompiled (unfused: the scores materialized).  So each configuration key
(`attnfuse.kernels.flex._mods.Mods.key`, device, dtype, head dims, GQA, grad, lse) gets its own copy of the
caller's code object: its own cache, in which only the shapes vary (static on the first call, dynamic from the
second, so a new sequence length does not recompile again).  Only public API of ``torch.nn.attention
.flex_attention`` is used: ``flex_attention`` and ``BlockMask.from_kv_blocks`` (torch >= 2.6), ``AuxRequest``
where it exists (torch >= 2.9; ``return_lse=True`` before).
"""

from __future__ import annotations

import inspect
import logging
import types

import torch

__all__ = ["available", "caller", "failed", "run"]

_CALLERS: dict[tuple, object] = {}
_FAILED: set[tuple] = set()
_FA = None  # the torch.nn.attention.flex_attention module, once a caller exists
_log = logging.getLogger("attnfuse.kernels.flex")


def available() -> str | None:
    """None, or why this torch has no FlexAttention this package can drive."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (FlexAttention needs torch >= 2.6)"
    params = inspect.signature(BlockMask.from_kv_blocks).parameters
    if "seq_lengths" not in params or "full_kv_indices" not in params:
        return (f"torch {torch.__version__}'s BlockMask.from_kv_blocks takes no seq_lengths (FlexAttention with "
                f"ragged lengths needs torch >= 2.6)")
    return None


def _call(q, k, v, score_mod, block_mask, scale, enable_gqa, lse):
    fa = _FA  # torch.nn.attention.flex_attention, imported by `caller`
    if not lse:
        return fa.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                 enable_gqa=enable_gqa), None
    if hasattr(fa, "AuxRequest"):
        out, aux = fa.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                     enable_gqa=enable_gqa, return_aux=fa.AuxRequest(lse=True))
        return out, aux.lse
    return fa.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                             enable_gqa=enable_gqa, return_lse=True)


def caller(key: tuple):
    """The compiled caller of this configuration key (created on first use)."""
    global _FA
    fn = _CALLERS.get(key)
    if fn is None:
        if _FA is None:
            from torch.nn.attention import flex_attention

            _FA = flex_attention
        code = _call.__code__.replace(co_name=f"_flex_call_{len(_CALLERS)}")
        fn = torch.compile(types.FunctionType(code, _call.__globals__, code.co_name), fullgraph=True)
        _CALLERS[key] = fn
    return fn


def run(key: tuple, q, k, v, score_mod, block_mask, *, scale: float, enable_gqa: bool, lse: bool):
    """(out, lse or None) of compiled FlexAttention, or None where it failed (now or before, for this key: the
    caller runs its exact fallback; the first failure is logged as a warning).  ``key`` must name everything the
    closures specialize on."""
    full_key = (key, scale, q.device.type, q.dtype, q.shape[-1], v.shape[-1], enable_gqa, lse,
                torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    if full_key in _FAILED:
        return None
    try:
        return caller(full_key)(q, k, v, score_mod, block_mask, scale, enable_gqa, lse)
    except Exception as exc:  # a compile or launch failure: the exact blocked path computes the same
        _FAILED.add(full_key)
        _log.warning("attnfuse.kernels.flex: compiled FlexAttention failed for %s %s q %s v %s (%s: %s); this "
                     "configuration runs the exact blocked path from now on", q.device.type, q.dtype,
                     tuple(q.shape), tuple(v.shape), type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None


def failed() -> int:
    """How many configurations fell back after a FlexAttention failure (for tests and the report)."""
    return len(_FAILED)
