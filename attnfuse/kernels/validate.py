"""The q/k/v checks every entry point makes (the registered op, each family's ``attention``), with one error
style: ``ValueError("<who>: <what is wrong>; got <what was passed>")``, where ``who`` names the function the
user called (``attnfuse.kernels.flash.attention``, ``attnfuse.attention``, ...)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["dropout_p", "qkv", "unsupported"]


def _shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> str:
    return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {None if v is None else tuple(v.shape)}"


def qkv(who: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, *, kv_groups: int | None = None,
        floating: bool = False) -> None:
    """Raise unless q, k, v are ``(batch, heads, seqlen, head_dim)`` tensors of one attention: 4-D, one batch,
    q/k head dims equal, k/v heads and lengths equal, q heads a multiple of k heads (exactly ``kv_groups`` times
    when given), one dtype (a floating one when ``floating``).  ``v`` None: checks q and k only."""
    tensors = (q, k) if v is None else (q, k, v)
    if any(t.dim() != 4 for t in tensors):
        raise ValueError(f"{who}: q, k, v must be 4-D (batch, heads, seqlen, head_dim); got {_shapes(q, k, v)}")
    groups_ok = q.shape[1] % k.shape[1] == 0 if kv_groups is None else k.shape[1] * kv_groups == q.shape[1]
    if not groups_ok or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or (
            v is not None and tuple(v.shape[:3]) != tuple(k.shape[:3])):
        groups = "a multiple of k heads" if kv_groups is None else f"k heads * kv_groups={kv_groups}"
        raise ValueError(f"{who}: need one batch, q heads {groups}, k/v of one head count and length, and equal "
                         f"q/k head dims; got {_shapes(q, k, v)}")
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1 or (floating and not q.dtype.is_floating_point):
        kind = "floating dtype" if floating else "dtype"
        raise ValueError(f"{who}: q, k, v must share a {kind}; got {', '.join(str(t.dtype) for t in tensors)}")


def dropout_p(who: str, p: float) -> None:
    """Raise unless ``p`` is a dropout probability in [0, 1)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{who}: dropout_p must be in [0, 1); got {p}")


def unsupported(who: str, family: str, instead: str, **values: tuple[Any, Any]) -> None:
    """Raise for the first keyword whose value (``values[name] = (value, off)``) is not its ``off`` setting:
    ``family`` does not take it, ``instead`` says what to use."""
    for name, (value, off) in values.items():
        if (value is not None) if off is None else (value != off):
            raise ValueError(f"{who}: {name} is not supported by {family} (leave it at {off}); got {value!r}; "
                             f"use {instead}")
