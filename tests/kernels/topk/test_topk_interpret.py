"""Top-k block-sparse attention (`attnfuse.kernels.topk`) on its Triton path: the flash kernels' block-sparse mode
fed a tile map built from `select`, run by Triton's interpreter (or compiled on a GPU).

The same checks as test_topk_cpu.py, so both paths are held to one semantics: with ``topk >= Lk`` exact
attention, otherwise the float64 textbook masked with `select`'s blocks (forward and dq/dk/dv, 2x rule), and
planted keys found.  Sizes keep each launch to about 10 programs (the tile is `topk._tilemap.tile_config`'s:
64-row packed query tiles and 32-key tiles for block 32 on the interpreter's preset).
"""

from __future__ import annotations

import pytest
import torch

from attnfuse.costmodel import tiles
from attnfuse.kernels import topk
from attnfuse.kernels.topk import _select, _tilemap
from tests.kernels._helpers import DTYPES, qkv, seed_case
from tests.kernels.topk._topk_helpers import check_covering, check_masked, check_planted

# name: (B, H, Hkv, Lq, Lk, D, Dv, causal)
SHAPES = {
    "causal_gqa2": (1, 4, 2, 150, 150, 40, 24, True),
    "cross_gqa2": (1, 4, 2, 150, 181, 16, 16, False),
}


def test_triton_path_is_used():
    q, k, v = qkv(torch.float32, 1, 4, 2, 97, 97, 16, 16)
    out, stats = topk.forward(q, k, v, causal=True, topk=32, block=32)
    assert stats.shape == (1, 4, 97, 2) and stats.dtype == torch.float32  # the flash kernels' row statistics
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_topk_at_least_lk_is_exact(name, dtype):
    chosen = check_covering(dtype, SHAPES[name], name, seed=("triton", name, dtype))
    assert chosen[..., -1, :].all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_sparse_equals_masked_reference(name, dtype):
    b, h, hkv, lq, lk, d, dv, causal = SHAPES[name]
    chosen = check_masked(dtype, b, h, hkv, lq, lk, d, dv, causal=causal, what="triton" + name, topk=40,
                          block=32, sink=20, local=33)
    assert not chosen.all()


def test_block64_mqa3():
    """Block 64 with three query heads per K/V head: packed tiles of 64 rows hold 21.3 positions, and a query
    block's 192 packed rows are exactly three tiles."""
    check_masked(torch.float32, 1, 3, 1, 233, 233, 16, 16, causal=True, what="mqa3", topk=64, block=64, sink=0,
                 local=10)


@pytest.mark.parametrize("causal", [False, True])
def test_planted_keys_are_found(causal):
    check_planted(torch.float32, causal=causal, lq=263, heads=2, kv_heads=1, d=16, block=32)


# --------------------------------------------------------------------------------------------- selection kernels


@pytest.mark.parametrize("causal,groups,block,lq,lk", [(True, 1, 64, 201, 201), (True, 3, 32, 97, 97),
                                                       (False, 2, 32, 150, 181), (False, 1, 96, 130, 300)])
def test_score_kernel_matches_torch(causal, groups, block, lq, lk):
    """`_score_kernel`'s ranking scores == the torch path's Quest scores on open candidates, -inf elsewhere."""
    seed_case("scores", causal, groups, block)
    q, k, _ = qkv(torch.float32, 2, 2 * groups, 2, lq, lk, 40, 40)
    sink, local = 40, 50
    got = _select._scores_triton(q, k, causal=causal, block=block, sink=sink, local=local)
    want = _select._scores_torch(q.double(), k.double(), causal=causal, block=block)
    kept = topk.select(q, k, causal=causal, topk=0, block=block, sink=sink, local=local)[0, 0]
    nkb = -(-lk // block)
    cand = torch.ones_like(kept) if not causal else torch.ones_like(kept).tril()
    open_ = (cand & ~kept).expand_as(got)
    assert got.shape == want.shape == (2, 2, -(-lq // block), nkb)
    assert torch.isneginf(got[~open_]).all() and torch.isfinite(got[open_]).all()
    # compiled on a GPU the fp32 dots run in tf32 (ranking needs no more); the interpreter computes them in fp32
    tol = dict(rtol=3e-3, atol=3e-3) if got.is_cuda else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[open_].double(), want[open_], **tol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cfg,groups", [(tiles.TileConfig(64, 32, 4, 2), 2), (tiles.TileConfig(16, 64, 4, 2), 1),
                                        (tiles.TileConfig(64, 64, 4, 2), 3)])
def test_listing_kernel_matches_torch(causal, cfg, groups, monkeypatch):
    """`_listing_kernel`'s rows and cols listings == the torch path's (counts and listed tiles, in order)."""
    seed_case("listing", causal, cfg, groups)
    lq = 301
    lk = lq if causal else 250
    q, k, _ = qkv(torch.float32, 2, 2 * groups, 2, lq, lk, 16, 16)
    chosen = topk.select(q, k, causal=causal, topk=64, block=64, sink=10, local=20)
    got = topk.tile_map(chosen, cfg, q_len=lq, kv_len=lk, kv_groups=groups, block=64, causal=causal)
    monkeypatch.setattr(_tilemap, "_triton_ok", lambda x: False)
    want = topk.tile_map(chosen, cfg, q_len=lq, kv_len=lk, kv_groups=groups, block=64, causal=causal)
    for side in ("rows", "cols"):
        g, w = getattr(got, side), getattr(want, side)
        assert g.shape == w.shape and torch.equal(g[..., :2], w[..., :2])
        n = w[..., :2].sum(-1)
        assert n.max() > 0
        listed = torch.arange(w.shape[-1] - 2) < n[..., None]
        assert torch.equal(g[..., 2:][listed], w[..., 2:][listed]), side
    fwd = topk.tile_map(chosen, cfg, q_len=lq, kv_len=lk, kv_groups=groups, block=64, causal=causal, cols=False)
    assert torch.equal(fwd.rows[..., :2], want.rows[..., :2]) and fwd.cols.numel() == 0
