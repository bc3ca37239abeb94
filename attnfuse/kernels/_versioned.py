"""`VersionCache`: values derived from a tensor's contents (a constant mask's tile classes), cached per tensor.

Keyed by the tensor's identity (tensors compare elementwise, so not by value) and invalidated by its in-place
``_version``: an in-place write to the mask makes the next call rebuild.  Fake / functional tensors under tracing
and inference tensors (no version counter) are never cached: they build afresh (into the graph, when traced).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["VersionCache"]


class VersionCache:
    """``get(tensor, key, build)``: ``build()``'s value for (``tensor``, ``key``), built once per version."""

    def __init__(self) -> None:
        self._store: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> (its _version, {key: value})

    def get(self, tensor: torch.Tensor, key: Hashable, build: Callable[[], Any]) -> Any:
        cacheable = type(tensor) in (torch.Tensor, torch.nn.Parameter) and not tensor.is_inference()
        entry = self._store.get(tensor) if cacheable else None
        if entry is not None and entry[0] == tensor._version and key in entry[1]:
            return entry[1][key]
        built = build()
        if cacheable:
            if entry is None or entry[0] != tensor._version:
                entry = (tensor._version, {})
                self._store[tensor] = entry
            entry[1][key] = built
        return built
