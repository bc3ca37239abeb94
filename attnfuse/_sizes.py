"""Sizes that may be symbolic: one place that reads a `torch.SymInt`'s example value."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["hint"]


def hint(n: Any, default: int | None = None) -> int:
    """``n`` as an int: a symbolic size's example value (reading it adds no guard).  A size without one (an
    unbacked symbol) gives ``default``, or raises TypeError when there is none."""
    if isinstance(n, torch.SymInt):
        if n.node.has_hint():
            return int(n.node.hint)
        if default is None:
            raise TypeError(f"attnfuse: the size {n} has no example value")
        return default
    return int(n)
