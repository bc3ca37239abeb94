"""The ``context_parallel`` option: which process group shares the sequence, how, and where each rank's rows sit.

`from_option` validates ``options["context_parallel"]``: a ``ProcessGroup``, a 1-D ``DeviceMesh``, or a dict
``{"group": <either>, "strategy": "auto" | "ulysses" | "ring", "layout": "contiguous" | "zigzag"}``.  The result,
`ContextParallel`, names the group by its c10d name (what torch's functional collectives take, and a plain string
an FX graph can hold as a constant), so it hashes and pickles.

Layouts (`positions`): every tensor entering the compiled region holds the rank's part of the global sequence
along its sequence dim, ``local_len = L / P`` rows.  ``"contiguous"``: rank ``r`` holds ``[r * Lc, (r + 1) * Lc)``.
``"zigzag"`` (load balance for causal masks): the sequence is cut into ``2P`` equal chunks and rank ``r`` holds
chunk ``r`` followed by chunk ``2P - 1 - r``, so every rank has the same share of a causal mask's work; ``Lc``
must be even.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

STRATEGIES = ("auto", "ulysses", "ring")
LAYOUTS = ("contiguous", "zigzag")
_ALLOWED = ("a torch.distributed ProcessGroup, a 1-D DeviceMesh, or a dict {'group': <either>, 'strategy': "
            + " | ".join(repr(s) for s in STRATEGIES) + ", 'layout': " + " | ".join(repr(s) for s in LAYOUTS)
            + "}; None or False for none")


def _bad(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"attnfuse option {key!r}: got {value!r}; allowed: {allowed}")


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """A validated ``context_parallel`` option: the group's c10d name and size, the strategy ("auto": the cost
    model chooses per site) and the layout of each rank's rows."""

    group_name: str
    ranks: int
    strategy: str = "auto"
    layout: str = "contiguous"

    def rank(self) -> int:
        """This process's rank in the group."""
        import torch.distributed as dist

        return dist.get_rank(self.group())

    def group(self) -> Any:
        """The ProcessGroup."""
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(self.group_name)


def _group(value: Any) -> tuple[str, int]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(value, DeviceMesh):
        if value.ndim != 1:
            raise _bad("context_parallel", value, "a 1-D DeviceMesh (this one has "
                       f"{value.ndim} dims; pass mesh[dim_name] for one of them), or " + _ALLOWED)
        value = value.get_group()
    if isinstance(value, dist.ProcessGroup):
        return value.group_name, value.size()
    raise _bad("context_parallel", value, _ALLOWED)


def from_option(value: Any) -> ContextParallel | None:
    """The validated option (None for None / False); a `ValueError` naming attnfuse, the option and what it
    accepts otherwise."""
    if value is None or value is False:
        return None
    if isinstance(value, Mapping):
        for key in value:
            if key not in ("group", "strategy", "layout"):
                raise _bad(f"context_parallel.{key}", value[key], "one of the keys group, strategy, layout")
        if "group" not in value:
            raise _bad("context_parallel", dict(value), "a dict with a 'group' key: " + _ALLOWED)
        strategy, layout = value.get("strategy", "auto"), value.get("layout", "contiguous")
        if strategy not in STRATEGIES:
            raise _bad("context_parallel.strategy", strategy, " | ".join(repr(s) for s in STRATEGIES))
        if layout not in LAYOUTS:
            raise _bad("context_parallel.layout", layout, " | ".join(repr(s) for s in LAYOUTS))
        name, ranks = _group(value["group"])
        return ContextParallel(name, ranks, strategy, layout)
    name, ranks = _group(value)
    return ContextParallel(name, ranks)


def check_local_len(cp: ContextParallel, local_len: int) -> None:
    """A `ValueError` where the rank's length cannot be the layout's share of a global sequence."""
    if cp.layout == "zigzag" and local_len % 2:
        raise ValueError(f"attnfuse context_parallel: the zigzag layout needs an even number of rows per rank "
                         f"(each rank holds two of the 2 x {cp.ranks} chunks); got {local_len}")


def positions(cp: ContextParallel, rank: int, local_len: int, device: Any = None) -> torch.Tensor:
    """The global positions (int64, ``(local_len,)``) of rank ``rank``'s rows in ``cp``'s layout."""
    check_local_len(cp, local_len)
    if cp.layout == "contiguous":
        return torch.arange(rank * local_len, (rank + 1) * local_len, device=device)
    half = local_len // 2
    first = torch.arange(rank * half, (rank + 1) * half, device=device)
    second_start = (2 * cp.ranks - 1 - rank) * half
    return torch.cat([first, torch.arange(second_start, second_start + half, device=device)])


def shard(x: torch.Tensor, dim: int, cp: ContextParallel, rank: int | None = None) -> torch.Tensor:
    """Rank ``rank``'s (default: this process's) rows of the global tensor ``x`` along ``dim``, in ``cp``'s layout:
    what each rank passes for a tensor that has the sequence along ``dim``."""
    rank = cp.rank() if rank is None else rank
    length = x.shape[dim]
    if length % (cp.ranks * (2 if cp.layout == "zigzag" else 1)):
        raise ValueError(f"attnfuse context_parallel: a sequence of {length} rows does not split over {cp.ranks} "
                         f"ranks in the {cp.layout} layout (it must be a multiple of "
                         f"{cp.ranks * (2 if cp.layout == 'zigzag' else 1)})")
    return x.index_select(dim, positions(cp, rank, length // cp.ranks, x.device))


def unshard(chunks: list[torch.Tensor], dim: int, cp: ContextParallel) -> torch.Tensor:
    """The global tensor from every rank's rows (``chunks[r]`` from rank ``r``), in position order."""
    local_len = chunks[0].shape[dim]
    order = torch.cat([positions(cp, r, local_len) for r in range(cp.ranks)])
    whole = torch.cat(chunks, dim)
    return whole.index_select(dim, torch.argsort(order).to(whole.device))
