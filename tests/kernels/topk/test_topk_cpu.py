"""Top-k block-sparse attention (`attnfuse.kernels.topk`) on its plain-CPU path, `select` and the tile map.

Forward and backward are checked with the 2x rule against a float64 textbook (`tests.kernels._helpers.compare`):
with ``topk >= Lk`` against exact attention, otherwise against the textbook masked with `select`'s block mask
expanded to tokens -- the semantics the Triton path (test_topk_interpret.py) is held to as well.
"""

from __future__ import annotations

import pytest
import torch

from attnfuse.costmodel import tiles
from attnfuse.kernels import topk
from attnfuse.kernels.topk import _cpu, _select
from tests.kernels._helpers import compare, qkv, seed_case
from tests.kernels.topk._topk_helpers import attend, check_covering, check_masked, check_planted, visible

DTYPES = [torch.float32, torch.float16]


# --------------------------------------------------------------------------------------------- the grid

# name: (B, H, Hkv, Lq, Lk, D, Dv, causal)
SHAPES = {
    "causal_gqa2": (1, 4, 2, 201, 201, 40, 24, True),
    "causal_mqa3": (2, 3, 1, 97, 97, 16, 16, True),
    "cross_gqa2": (1, 4, 2, 150, 233, 40, 40, False),
    "cross_q_longer": (1, 2, 2, 230, 97, 16, 24, False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_topk_at_least_lk_is_exact(name, dtype):
    b, h, hkv, lq, lk, d, dv, causal = SHAPES[name]
    chosen = check_covering(dtype, SHAPES[name], name, seed=(name, dtype))
    assert chosen.sum() == (
        b * hkv * sum(min(qb + 1, -(-lk // 32)) for qb in range(-(-lq // 32))) if causal else b * hkv *
        -(-lq // 32) * -(-lk // 32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_sparse_equals_masked_reference(name, dtype):
    b, h, hkv, lq, lk, d, dv, causal = SHAPES[name]
    chosen = check_masked(dtype, b, h, hkv, lq, lk, d, dv, causal=causal, what=name, topk=40, block=32, sink=20,
                          local=33)
    assert not chosen.all()  # really sparse


@pytest.mark.parametrize("name", list(SHAPES))
def test_one_block_chunks(name, monkeypatch):
    """Chunks of one query block: each fills its slots, so the fused path (PyTorch's CPU flash kernel on the
    gathered blocks, slot 0 masked, merged by log-sum-exp) runs wherever the block's count is its chunk's."""
    monkeypatch.setattr(_cpu, "_CHUNK_ELEMS", 1)
    calls = []
    real = _cpu._Plan.fused
    monkeypatch.setattr(_cpu._Plan, "fused", lambda self, *a: calls.append(a[-2]) or real(self, *a))
    b, h, hkv, lq, lk, d, dv, causal = SHAPES[name]
    check_masked(torch.float32, b, h, hkv, lq, lk, d, dv, causal=causal, what="fused" + name, topk=40, block=32,
                 sink=20, local=33)
    fused = d == dv  # else every chunk takes the explicit path
    assert len(calls) == (-(-lq // 32) if fused else 0)
    assert (1 in calls) == (fused and causal)  # causal query block 0 sees only its diagonal block


def test_default_block_and_scale():
    check_masked(torch.float32, 1, 2, 1, 300, 300, 16, 16, causal=True, what="defaults", topk=64, local=64)
    seed_case("scale")
    q, k, v = qkv(torch.float32, 1, 2, 2, 150, 150, 16, 16)
    vis = visible(topk.select(q, k, causal=False, topk=32, block=32, sink=0, local=0), 150, 150, 1, 32)
    compare(torch.float32, q, k, v, torch.randn(1, 2, 150, 16), visible=vis, scale=0.3, what="scale",
             attend=attend(topk=32, block=32, sink=0, local=0))


@pytest.mark.parametrize("causal", [False, True])
def test_planted_keys_are_found(causal):
    check_planted(torch.float32, causal=causal, lq=263, heads=4, kv_heads=2, d=40, block=32)


def test_output_layout_and_stats():
    q, k, v = qkv(torch.float32, 2, 4, 2, 97, 97, 16, 24)
    out, stats = topk.forward(q, k, v, causal=True, topk=32, block=32)
    assert out.shape == (2, 4, 97, 24) and out.transpose(1, 2).is_contiguous() and stats.numel() == 0


# --------------------------------------------------------------------------------------------- select


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("params", [dict(topk=70, block=32, sink=40, local=50), dict(topk=0, block=64, sink=0,
                                                                                       local=0),
                                    dict(topk=10**6, block=32, sink=1, local=1)], ids=["mixed", "none", "all"])
def test_select_properties(causal, params):
    seed_case("select", causal, params["topk"])
    lq = 291
    lk = lq if causal else 357
    q, k, _ = qkv(torch.float32, 2, 6, 3, lq, lk, 16, 16)
    chosen = topk.select(q, k, causal=causal, **params)
    block, sink, local = params["block"], params["sink"], params["local"]
    nqb, nkb = -(-lq // block), -(-lk // block)
    assert chosen.shape == (2, 3, nqb, nkb) and chosen.dtype == torch.bool
    for qb in range(nqb):
        first, last = qb * block, min((qb + 1) * block, lq) - 1
        cand = [kb for kb in range(nkb) if not causal or kb * block <= last]
        hi = last if causal else last + local
        kept = [kb for kb in cand if kb * block < sink or (min((kb + 1) * block, lk) - 1 >= first - local
                                                           and kb * block <= hi)]
        row = chosen[:, :, qb]
        assert row[:, :, kept].all(), qb  # sink and local blocks always kept
        if causal:
            assert not row[:, :, last // block + 1:].any(), qb  # never a future block
        want = min(-(-params["topk"] // block), len(cand) - len(kept)) + len(kept)
        assert (row.sum(-1) == want).all(), (qb, row.sum(-1), want)


def test_select_ties_pick_lower_blocks_and_gqa_share():
    """All-zero queries score every block 0: the lowest open blocks win; the group's heads share one row."""
    q = torch.zeros(1, 4, 256, 16)
    k = torch.randn(1, 2, 256, 16)
    chosen = topk.select(q, k, causal=False, topk=64, block=32, sink=0, local=0)
    assert chosen.shape == (1, 2, 8, 8)
    for qb in range(8):
        assert chosen[0, 0, qb].nonzero().flatten().tolist() == sorted({qb, *[b for b in range(8) if b != qb][:2]})


def test_select_bound_is_upper_bound():
    """The Quest score of a block is at least every q.k in it (max over the group's rows)."""
    seed_case("bound")
    q, k, _ = qkv(torch.float64, 1, 2, 1, 64, 96, 8, 8)
    kmin, kmax = _select._block_bounds(k, 32)
    bound = q.clamp(min=0) @ kmax.transpose(-1, -2) - (-q).clamp(min=0) @ kmin.transpose(-1, -2)
    dots = (q @ k.transpose(-1, -2)).unflatten(-1, (3, 32)).amax(-1)
    assert (bound >= dots - 1e-12).all()


# --------------------------------------------------------------------------------------------- tile maps


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cfg,groups", [(tiles.TileConfig(64, 32, 4, 2), 2), (tiles.TileConfig(16, 64, 4, 2), 1),
                                        (tiles.TileConfig(64, 64, 4, 2), 3), (tiles.TileConfig(128, 64, 8, 2), 2)])
def test_tile_map_matches_selection(causal, cfg, groups):
    """Expanding the Triton tile map to (row, key) pairs gives the selection's token mask (and the causal band):
    every listed tile meets it, full tiles hold only visible pairs, and every visible pair is in a listed tile."""
    seed_case("tilemap", causal, cfg, groups)
    block, lq = 64, 301
    lk = lq if causal else 250
    q, k, _ = qkv(torch.float32, 2, 2 * groups, 2, lq, lk, 16, 16)
    chosen = topk.select(q, k, causal=causal, topk=64, block=block, sink=10, local=20)
    maps = topk.tile_map(chosen, cfg, q_len=lq, kv_len=lk, kv_groups=groups, block=block, causal=causal)
    vis = visible(chosen, lq, lk, groups, block)
    if causal:
        vis = vis & torch.ones(lq, lk, dtype=torch.bool).tril()
    vis = vis.unflatten(1, (2, groups)).transpose(2, 3).flatten(2, 3)  # packed rows r = row * groups + g
    bm, bn = cfg.block_m, cfg.block_n
    for bb in range(2):
        for hk in range(2):
            listed = torch.zeros(lq * groups, lk, dtype=torch.bool)
            for t in range(maps.rows.shape[2]):
                n_full, n_part = maps.rows[bb, hk, t, :2].tolist()
                tiles = maps.rows[bb, hk, t, 2:2 + n_full + n_part].tolist()
                for i, kt in enumerate(tiles):
                    part = vis[bb, hk, t * bm:(t + 1) * bm, kt * bn:(kt + 1) * bn]
                    assert part.any()
                    if i < n_full:
                        assert part.all() and (kt + 1) * bn <= lk
                    listed[t * bm:(t + 1) * bm, kt * bn:(kt + 1) * bn] = True
            assert not (vis[bb, hk] & ~listed).any()
            # the transposed listing holds the same (query tile, key tile) pairs
            pairs = {(t, kt) for t in range(maps.rows.shape[2])
                     for kt in maps.rows[bb, hk, t, 2:2 + int(maps.rows[bb, hk, t, :2].sum())].tolist()}
            cols = {(t, kt) for kt in range(maps.cols.shape[2])
                    for t in maps.cols[bb, hk, kt, 2:2 + int(maps.cols[bb, hk, kt, :2].sum())].tolist()}
            assert pairs == cols


def test_tile_map_rejects_tiles_that_straddle_blocks():
    chosen = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="does not nest"):
        topk.tile_map(chosen, tiles.TileConfig(128, 64, 8, 2), q_len=256, kv_len=256, kv_groups=1, block=64,
                      causal=False)


# --------------------------------------------------------------------------------------------- errors


def test_errors():
    q, k, v = qkv(torch.float32, 1, 2, 1, 64, 96, 16, 16)
    assert topk.unsupported(q.shape, k.shape, causal=True) == "causal top-k needs q_len == kv_len (got 64 and 96)"
    assert topk.unsupported(q.shape, k.shape, causal=False) is None
    assert "divisible" in topk.unsupported((1, 3, 8, 16), (1, 2, 8, 16), causal=False)
    with pytest.raises(ValueError, match="causal top-k needs q_len == kv_len"):
        topk.attention(q, k, v, causal=True)
    for kw, word in ((dict(block=48), "block"), (dict(block=16), "block"), (dict(topk=-1), "topk"),
                     (dict(sink=-2), "sink"), (dict(local=1.5), "local"), (dict(softcap=5.0), "softcap"),
                     (dict(mask=torch.ones(64, 96, dtype=torch.bool)), "mask"), (dict(dropout_p=0.1), "dropout_p"),
                     (dict(alibi=torch.ones(2)), "alibi")):
        with pytest.raises(ValueError, match=word):
            topk.attention(q, k, v, **kw)
    with pytest.raises(ValueError, match="share a dtype"):
        topk.attention(q, k.half(), v)
    with pytest.raises(ValueError, match="4-D"):
        topk.select(q[0], k, causal=False, topk=64)
