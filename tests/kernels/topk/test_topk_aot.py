"""The flash kernels as top-k attention launches them compile for sm_90/sm_80 and fit; see `_aot.py`.

A top-k launch is the block-sparse variant with no mask (MASK_KIND none), the causal band applied in partial
tiles (HAS_WINDOW), GQA packing and ragged lengths, on the tile `topk.pick_config` chooses (key tiles dividing
the selection block).  Each (spec, head dim, kv_groups) compiles the forward, dK/dV and dQ kernels on the tiles
picked for a 32k causal launch with block 64.
"""

from __future__ import annotations

import pytest

from attnfuse.costmodel import tiles
from attnfuse.kernels import flash, topk
from attnfuse.kernels.topk import _select, _tilemap
from tests.kernels._aot import TARGETS, _compile, _name, _Report

CASES = [pytest.param(s, hd, g, id=f"{s}-d{hd}-g{g}") for s in TARGETS for hd, g in ((64, 4), (128, 1))]


def _meta(cfg, hd, groups):
    return dict(GROUPS=groups, HEAD_DIM=hd, HEAD_DIM_V=hd, BLOCK_D=hd, BLOCK_DV=hd, BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n, IS_CAUSAL=False, HAS_WINDOW=True, BLOCK_SPARSE=True, MASK_KIND=flash.MASK_NONE,
                HAS_SOFTCAP=False, HAS_ALIBI=False, HAS_DROPOUT=False, EVEN_M=False, EVEN_N=False, PRECISION="tf32")


@pytest.mark.parametrize("spec_name,hd,groups", CASES)
def test_topk_launches_compile_and_fit(spec_name, hd, groups):
    rep = _Report(spec_name, "fp16", hd)
    base = dict(Q="*fp16", K="*fp16", V="*fp16", M="*fp16", Seed="*fp16", Alibi="*fp16", TileMap="*i32")
    kernels = {"fwd": [("fwd", flash.fwd_kernel, dict(VBad="*fp16", Sinks="*fp16", Out="*fp16", Stats="*fp32"),
                        dict(EVEN_D=True, HAS_SINKS=False))],
               "bwd": [("dkdv", flash.bwd_dkdv_kernel, dict(DO="*fp16", Stats="*fp32", Delta="*fp32", DQ="*fp32",
                                                            DK="*fp16", DV="*fp16"), dict(ATOMIC_DQ=False)),
                       ("dq", flash.bwd_dq_kernel, dict(DO="*fp16", Stats="*fp32", Delta="*fp32", DQ="*fp16",
                                                        DM="*fp16"), dict(MASK_GRAD=False))]}
    for kind, launches in kernels.items():
        cfg = topk.pick_config(kind, q_len=32768, kv_len=32768, batch=1, heads=4 * groups, kv_heads=4, head_dim=hd,
                               head_dim_v=hd, elem=2, block=64, spec=rep.spec)
        assert 64 % cfg.block_n == 0 and (64 * groups) % cfg.block_m == 0
        for name, kernel, ptrs, extra in launches:
            what = f"topk {name} {_name(cfg)}"
            compiled = rep.compile(what, _compile, kernel, rep.cc, {**base, **ptrs}, {**_meta(cfg, hd, groups),
                                                                                       **extra},
                                   cfg.num_warps, cfg.num_stages)
            rep.shared(what, compiled, tiles.smem_bytes(cfg, kind, hd, hd, 2))
    rep.check()


@pytest.mark.parametrize("spec_name", list(TARGETS))
@pytest.mark.parametrize("dt,hd,groups,block", [("bf16", 128, 1, 64), ("fp16", 64, 4, 64), ("bf16", 256, 1, 128)])
def test_selection_kernels_compile(spec_name, dt, hd, groups, block):
    """The indexer (`_score_kernel`) and the tile-listing kernel (`_listing_kernel`) compile for the target."""
    rep = _Report(spec_name, dt, hd)
    rows = min(64, (groups * block) & -(groups * block))
    for causal in (False, True):
        compiled = rep.compile(f"score causal={causal}", _compile, _select._score_kernel, rep.cc,
                    dict(Q=f"*{dt}", KMax=f"*{dt}", KMin=f"*{dt}", Scores="*fp32"),
                    dict(GROUPS=groups, HEAD_DIM=hd, BLOCK_D=hd, BLOCK=block, ROWS=rows, BLOCK_KB=_select._SCORE_KB,
                         CAUSAL=causal, PRECISION="tf32"), 4, 2)
        rep.shared(f"score causal={causal}", compiled)
        for by_key in (False, True):
            rep.compile(f"listing causal={causal} by_key={by_key}", _compile, _tilemap._listing_kernel, rep.cc,
                        dict(Chosen="*u8", Out="*i32"),
                        dict(GROUPS=groups, BLOCK=block, BLOCK_M=64, BLOCK_N=64, CAUSAL=causal, BY_KEY=by_key,
                             BLOCK_T=_tilemap._LIST_T), 4, 3)
    rep.check()
