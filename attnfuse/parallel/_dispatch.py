"""What a graph rewritten for context parallelism calls at each fused site: `attention`.

The rewriter emits ``call_function(attention, (q, k, v, key_mask), {"cp": encode(spec), "strategy": ...})``:
every argument but the tensors is a constant an FX graph can hold (``cp`` is `encode`'s JSON string of the
`ContextParallel`; the strategy was decided at compile time by `attnfuse.parallel.choose`).  `attention` is plain
tensor code over functional collectives, so dynamo and AOTAutograd trace through it.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import torch

from ._spec import LAYOUTS, STRATEGIES, ContextParallel
from ._ulysses import ulysses

__all__ = ["attention", "decode", "encode"]


def encode(cp: ContextParallel) -> str:
    """``cp`` as a JSON string (its fields), the constant a rewritten graph holds."""
    return json.dumps(dataclasses.asdict(cp), sort_keys=True)


@functools.lru_cache(maxsize=64)
def _decode(s: str) -> ContextParallel:
    data = json.loads(s)
    cp = ContextParallel(str(data["group_name"]), int(data["ranks"]), str(data["strategy"]), str(data["layout"]))
    if cp.strategy not in STRATEGIES or cp.layout not in LAYOUTS or cp.ranks < 1:
        raise ValueError(f"attnfuse context_parallel: {s!r} is not an encoded ContextParallel (strategy one of "
                         f"{STRATEGIES}, layout one of {LAYOUTS}, ranks >= 1)")
    return cp


@torch.compiler.assume_constant_result
def decode(s: str) -> ContextParallel:
    """The `ContextParallel` `encode` wrote (cached; dynamo evaluates it once while tracing, as a constant)."""
    return _decode(s)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None, *, cp: str,
              strategy: str, scale: float, causal: bool = False, softcap: float = 0.0, kv_groups: int = 1,
              mask_fill: float | None = None, window_left: int = -1, window_right: int = -1,
              sdpa_form: bool = False) -> torch.Tensor:
    """One context-parallel attention site: `attnfuse.parallel.ulysses` or the ring (`strategy` "ulysses" |
    "ring"), with ``cp`` the `encode`d group; arguments and result as `attnfuse.parallel.ulysses`."""
    spec = decode(cp)
    if strategy == "ulysses":
        fn = ulysses
    elif strategy == "ring":
        from ._ring import ring as fn
    else:
        raise ValueError(f"attnfuse context_parallel strategy: got {strategy!r}; allowed: 'ulysses' | 'ring'")
    return fn(q, k, v, key_mask, cp=spec, scale=scale, causal=causal, softcap=softcap, kv_groups=kv_groups,
              mask_fill=mask_fill, window_left=window_left, window_right=window_right, sdpa_form=sdpa_form)
