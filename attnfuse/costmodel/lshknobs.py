"""The knobs of LSH attention (`attnfuse.kernels.lsh`) for one site: `ladder`, the settings calibration tries,
cheapest first, chosen from the key length and the error budget; and `resolved`, settings with ``bits`` resolved
at a key length (what the report records).

The ladder rule, for ``kv_len`` keys, the budget ``max_rel_error``, the user's ``pinned`` settings and key
blocks of ``block`` keys:

* ``bits`` is -1 (auto: about four keys per bucket, `auto_bits`), so an op whose key
  length varies resolves it per call;
* the base cap (keys a query block attends beyond its sink and local blocks) is 2048 from `LONG` (16384) keys
  on, below that an eighth of the keys in whole blocks, at least 4 blocks:
  ``max(4 * block, ceil(kv_len / 8 / block) * block)``;
* the base tables are 8 from `SHORT` (8192) keys on and grow as the keys shrink, ``8 * 8192 / kv_len`` up to
  64 (a power of two): hashing costs rows x tables, attention rows x cap, so a short sequence affords many
  tables per kept key -- and needs them, since its small cap leaves little room for blocks found by chance;
* the levels (tables, probes, cap) are (T, 0, base), (1.5 T, 1, 2 * base), (2 T, 1, 4 * base) for base tables T:
  more tables and a probe find more of the keys a query needs, a larger cap keeps more of what they find, and
  each costs more;
* a tight budget (``max_rel_error`` < `TIGHT`) skips level 0;
* of the remaining levels, those after the first whose cap (rounded up to whole blocks) covers every key are
  dropped: a larger cap could select nothing more;
* the pinned settings (the keys the user wrote in ``options["approximate"]["lsh"]``) override every level, and
  levels that become identical are kept once, at their first place;
* a level's ``probes`` (unless pinned) is at most the bits it resolves to at ``kv_len`` (each probe flips one
  bit; the kernel refuses more).

`attnfuse.passes.approximate` measures the levels in order at the site's example key length and keeps the first
within the budget.

Also the LSH settings' one home: `DEFAULTS`, `MAX_BITS` and `auto_bits` are what the kernel
(`attnfuse.kernels.lsh`) and the registry (`attnfuse.families`) use -- here, because the planner may import no
kernel (tests/test_layering.py).  Imports nothing of attnfuse.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["DEFAULTS", "LEVELS", "LONG", "MAX_BITS", "SHORT", "TIGHT", "auto_bits", "base_cap", "base_tables", "ladder",
           "resolved"]

DEFAULTS = dict(tables=8, bits=-1, probes=0, cap=2048, block=64, sink=64, local=256, seed=0)
MAX_BITS = 16  # bits per table
_KEYS_PER_BUCKET = 4  # ``bits=-1``: about this many keys per bucket
LONG = 16384  # from this many keys on, the base cap is `LONG_CAP` keys
LONG_CAP = 2048
TIGHT = 0.01  # a budget below this skips level 0
LEVELS = ((2, 0, 1), (3, 1, 2), (4, 1, 4))  # (tables in half base tables, probes, cap in base caps), cheapest first
SHORT = 8192  # below this many keys, more base tables
MAX_BASE_TABLES = 64


def auto_bits(bits: int, kv_len: int) -> int:
    """``bits``, or for -1 the bits that leave about four keys per bucket at ``kv_len`` keys, clipped to [0, 16]
    (what the kernel resolves)."""
    if bits >= 0:
        return bits
    return max(0, min(MAX_BITS, round(math.log2(max(1, kv_len) / _KEYS_PER_BUCKET))))


def base_tables(kv_len: int) -> int:
    """Level 0's tables: 8 from `SHORT` keys on, else ``8 * SHORT / kv_len`` rounded down to a power of two, at
    most `MAX_BASE_TABLES`."""
    if kv_len >= SHORT:
        return 8
    return min(MAX_BASE_TABLES, 1 << int(math.log2(8 * SHORT / max(1, kv_len))))


def base_cap(kv_len: int, block: int) -> int:
    """Level 0's cap: `LONG_CAP` from `LONG` keys on, else an eighth of the keys in whole blocks (at least 4)."""
    if kv_len >= LONG:
        return LONG_CAP
    return max(4 * block, math.ceil(kv_len / 8 / block) * block)


def ladder(kv_len: int, max_rel_error: float, pinned: Mapping[str, int], block: int) -> list[dict[str, int]]:
    """The LSH settings to calibrate at ``kv_len`` keys, cheapest first, each complete (every key of
    `DEFAULTS`); the rule is the module docstring's."""
    base = base_cap(kv_len, block)
    half = base_tables(kv_len) // 2
    levels = [(tables * half, probes, scale * base) for tables, probes, scale in LEVELS]
    if max_rel_error < TIGHT:
        levels = levels[1:]
    n_blocks = math.ceil(kv_len / block)
    first = next((i for i, (_, _, cap) in enumerate(levels) if math.ceil(cap / block) >= n_blocks), None)
    if first is not None:
        levels = levels[:first + 1]
    out: list[dict[str, int]] = []
    for tables, probes, cap in levels:
        level = {**DEFAULTS, "tables": tables, "bits": -1, "probes": probes, "cap": cap, "block": block,
                 **pinned}
        if "probes" not in pinned:
            level["probes"] = min(level["probes"], auto_bits(level["bits"], kv_len))
        if level not in out:
            out.append(level)
    return out


def resolved(params: Mapping[str, Any], kv_len: int) -> dict[str, Any]:
    """``params`` (LSH settings) with ``bits`` resolved at ``kv_len`` keys as the kernel resolves it (`auto_bits`:
    -1 becomes the bits that leave about four keys per bucket; other values stay), a new dict."""
    return {**params, "bits": auto_bits(int(params["bits"]), kv_len)}
