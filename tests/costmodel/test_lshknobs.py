"""The LSH knobs the cost model proposes (`attnfuse.costmodel.lshknobs`): the ladder's rule (base cap from the key
length, three levels cheapest first, covering caps dropped, a tight budget skipping level 0), the user's pinned
settings fixed on every level, base tables growing as the keys shrink, and ``bits`` resolved as the kernel
resolves it."""

from __future__ import annotations

import math

import pytest
import torch

from attnfuse.costmodel import lshknobs
from attnfuse.kernels import lsh


def _knobs(levels):
    return [(p["tables"], p["probes"], p["cap"]) for p in levels]


def _at(kv_len, want):
    """``want`` written for 8 base tables (levels 8, 12, 16), at ``kv_len``'s base tables."""
    t = lshknobs.base_tables(kv_len)
    return [(tables * t // 8, probes, cap) for tables, probes, cap in want]


@pytest.mark.parametrize("kv_len,tables", [(1, 64), (700, 64), (1024, 64), (1025, 32), (2048, 32), (3000, 16),
                                           (4096, 16), (8191, 8), (8192, 8), (10**6, 8)])
def test_base_tables_grow_as_the_keys_shrink(kv_len, tables):
    """8 from 8192 keys on; below, 8 * 8192 / kv_len rounded down to a power of two, at most 64."""
    assert lshknobs.base_tables(kv_len) == tables


@pytest.mark.parametrize("kv_len,block,want", [
    (1000, 64, [(8, 0, 256), (12, 1, 512), (16, 1, 1024)]),  # base: 4 blocks (an eighth is 2 blocks)
    (5000, 64, [(8, 0, 640), (12, 1, 1280), (16, 1, 2560)]),  # base: ceil(5000 / 8 / 64) = 10 blocks
    (5000, 96, [(8, 0, 672), (12, 1, 1344), (16, 1, 2688)]),  # base: 7 blocks of 96
    (16383, 64, [(8, 0, 2048), (12, 1, 4096), (16, 1, 8192)]),  # an eighth, 32 blocks
    (16384, 64, [(8, 0, 2048), (12, 1, 4096), (16, 1, 8192)]),
    (123457, 32, [(8, 0, 2048), (12, 1, 4096), (16, 1, 8192)]),  # the long base cap, whatever the block
    (700, 64, [(8, 0, 256), (12, 1, 512), (16, 1, 1024)]),  # 11 blocks: 16 cover them, the last level stays
    (500, 64, [(8, 0, 256), (12, 1, 512)]),  # 8 blocks: level 1 covers every key, level 2 is dropped
    (257, 64, [(8, 0, 256), (12, 1, 512)]),  # 5 blocks (the 257th key in its own)
    (256, 64, [(8, 0, 256)]),  # level 0 already covers every key
    (37, 32, [(8, 0, 128)]),
])
def test_the_ladder_rule(kv_len, block, want):
    levels = lshknobs.ladder(kv_len, 0.05, {}, block)
    assert _knobs(levels) == _at(kv_len, want)
    for p in levels:  # complete settings, bits auto, the defaults for what the rule does not choose
        assert list(p) == list(lsh.DEFAULTS) and p["bits"] == -1 and p["block"] == block
        assert (p["sink"], p["local"], p["seed"]) == (lsh.DEFAULTS["sink"], lsh.DEFAULTS["local"], 0)
    caps = [math.ceil(p["cap"] / block) for p in levels]
    assert all(c < math.ceil(kv_len / block) for c in caps[:-1])  # only the last level may cover every key


@pytest.mark.parametrize("kv_len,want", [
    (1000, [(12, 1, 512), (16, 1, 1024)]),
    (500, [(12, 1, 512)]),
    (256, [(12, 1, 512)]),  # level 0 covered every key, yet a tight budget wants more tables and a probe
    (50000, [(12, 1, 4096), (16, 1, 8192)]),
])
def test_a_tight_budget_skips_level_0(kv_len, want):
    assert _knobs(lshknobs.ladder(kv_len, 0.0099, {}, 64)) == _at(kv_len, want)
    assert _knobs(lshknobs.ladder(kv_len, 0.01, {}, 64))[0] == _at(kv_len, [(8, 0, lshknobs.base_cap(kv_len, 64))])[0]


def test_pinned_settings_override_every_level_and_identical_levels_are_kept_once():
    pinned = {"cap": 128, "seed": 7, "local": 64}
    levels = lshknobs.ladder(1000, 0.05, pinned, 64)
    assert _knobs(levels) == _at(1000, [(8, 0, 128), (12, 1, 128), (16, 1, 128)])
    assert all(p["seed"] == 7 and p["local"] == 64 and p["sink"] == 64 for p in levels)
    levels = lshknobs.ladder(1000, 0.05, {"tables": 4, "probes": 1}, 64)
    assert _knobs(levels) == [(4, 1, 256), (4, 1, 512), (4, 1, 1024)]
    levels = lshknobs.ladder(1000, 0.05, {"tables": 4, "probes": 1, "cap": 64}, 64)
    assert _knobs(levels) == [(4, 1, 64)]  # three levels became one
    levels = lshknobs.ladder(1000, 0.05, {"bits": 5}, 64)
    assert [p["bits"] for p in levels] == [5, 5, 5]
    full = dict(lsh.DEFAULTS, tables=3, bits=2, probes=2, cap=96, block=32, sink=0, local=32, seed=1)
    assert lshknobs.ladder(9999, 0.001, full, 32) == [full]  # every key pinned: the user's settings only


def test_probes_stay_within_the_bits_a_level_resolves_to():
    """Two keys: auto bits are 0 (one bucket), where a probe has no bit to flip; the kernel runs every level."""
    assert [p["probes"] for p in lshknobs.ladder(2, 0.001, {}, 32)] == [0]
    assert [p["probes"] for p in lshknobs.ladder(2, 0.001, {"probes": 1}, 32)] == [1]  # pinned: as given
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    for p in lshknobs.ladder(2, 0.001, {}, 32) + lshknobs.ladder(2, 0.5, {}, 32):
        want = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
        torch.testing.assert_close(lsh.attention(q, k, v, **p), want)  # one bucket, every key: exact


def test_the_kernel_and_the_registry_run_these_settings():
    """`lshknobs` is the settings' one home: the registry's defaults are these, and the kernel with ``bits=-1``
    selects exactly as with the bits `auto_bits` resolves (so the report's resolved bits are what ran)."""
    from attnfuse import families

    assert dict(families.FAMILIES["lsh"].defaults) == lshknobs.DEFAULTS == lsh.DEFAULTS
    gen = torch.Generator().manual_seed(3)
    for lk in (5, 77, 300):
        q, k = torch.randn(1, 2, lk, 16, generator=gen), torch.randn(1, 1, lk, 16, generator=gen)
        kw = dict(causal=True, tables=4, probes=0, cap=32, block=32, sink=0, local=0, seed=1)
        bits = lshknobs.auto_bits(-1, lk)
        assert max(0, round(math.log2(lk / 4))) == bits
        assert torch.equal(lsh.select(q, k, bits=-1, **kw), lsh.select(q, k, bits=bits, **kw))


@pytest.mark.parametrize("kv_len", [1, 2, 3, 5, 100, 1000, 4097, 65536, 10**6])
def test_resolved_bits_are_the_kernels(kv_len):
    params = {**lsh.DEFAULTS, "tables": 12}
    got = lshknobs.resolved(params, kv_len)
    assert got == {**params, "bits": lsh.auto_bits(-1, kv_len)} and params["bits"] == -1  # a copy
    assert 0 <= got["bits"] <= 16
    if 64 <= kv_len <= 2 ** 18:  # about four keys per bucket, until 16 bits (the most) leave more
        assert 2.8 <= kv_len / 2 ** got["bits"] <= 5.7
    elif kv_len > 2 ** 18:
        assert got["bits"] == 16
    assert lshknobs.resolved({**params, "bits": 3}, kv_len)["bits"] == 3
