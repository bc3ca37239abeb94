"""Context parallelism: one attention site over a sequence sharded across a process group.

``options={"context_parallel": group}`` (`from_option`: a ProcessGroup, a 1-D DeviceMesh or a dict with the
strategy and layout) makes every rank hold its part of the sequence (`positions`, `shard`, `unshard`); each fused
site then runs `attention` -- Ulysses (`ulysses`: all-to-all heads <-> sequence) or the ring (K/V chunks passed
around, partial results merged), as `choose` decides from a simple cost estimate -- over the global sequence with
torch's functional collectives, so autograd and ``torch.compile`` go through it.
"""

from __future__ import annotations

from ._cost import choose, estimate
from ._dispatch import attention, decode, encode
from ._spec import LAYOUTS, STRATEGIES, ContextParallel, check_local_len, from_option, positions, shard, unshard
from ._ulysses import kv_repeat, ulysses

__all__ = ["LAYOUTS", "STRATEGIES", "ContextParallel", "attention", "check_local_len", "choose", "decode", "encode",
           "estimate", "from_option", "kv_repeat", "positions", "ring", "shard", "ulysses", "unshard"]


def __getattr__(name: str):
    if name == "ring":  # the ring's module loads on first use
        from ._ring import ring

        return ring
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
