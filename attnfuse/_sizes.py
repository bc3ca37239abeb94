"""Sizes: the one place that reads a `torch.SymInt`'s example value, and how a byte count is written."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["hint", "size_text"]


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


def size_text(nbytes: float) -> str:
    """``nbytes`` in the largest binary unit that keeps it at least 1: ``512 B``, ``12 KiB``, ``3.5 GiB``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while nbytes >= 1024 and i < len(units) - 1:
        nbytes, i = nbytes / 1024, i + 1
    return f"{nbytes:.3g} {units[i]}" if nbytes < 1000 else f"{nbytes:.0f} {units[i]}"
