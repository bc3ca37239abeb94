"""Triton kernels of the ``tpa`` family (not built yet: no case is taken, so every call runs `_cpu`)."""

from __future__ import annotations

__all__ = ["attention", "runs"]


def runs(q, k, v) -> bool:
    """Whether the Triton kernels take this call: none yet."""
    return False


def attention(q, k, v, key_mask=None, **kw):
    raise NotImplementedError("attnfuse tpa: the Triton kernels are not built yet; `runs` is False for every call")
