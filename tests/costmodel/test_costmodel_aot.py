"""The tiles the cost model chooses (`planner.plan`) compile for the spec's architecture and fit its shared
memory: the plan of a sweep of shapes on the H100 and A100 presets, compiled ahead of time (sm_90 / sm_80)."""

from __future__ import annotations

import pytest

from attnfuse.costmodel import plan as planner
from attnfuse.costmodel import tiles
from tests.kernels._aot import ELEM, _Report, compile_fwd

SHAPES = [(b, h, seq, d) for b, h in ((1, 8), (4, 32)) for seq in (1, 512, 8192, 131072) for d in (64, 128)]


@pytest.mark.parametrize("spec_name", ["h100", "a100"])
def test_planned_tiles_compile_and_fit(spec_name):
    rep = _Report(spec_name, "bf16", 0)
    spec = rep.spec
    chosen = set()
    for b, h, seq, d in SHAPES:
        shape = {"batch": b, "heads": h, "kv_heads": h // 4, "q_len": seq, "kv_len": max(seq, 64), "head_dim": d,
                 "v_head_dim": d, "elem": ELEM, "causal": seq > 1}
        for structure in ({}, {"window": (1024, 0), "causal": True}):
            p = planner.plan(shape, spec, ("flash", "window"), structure=structure)
            assert p.kernel in ("flash", "window") and p.config, p
            cfg = tiles.TileConfig(p.config["BLOCK_M"], p.config["BLOCK_N"], p.config["num_warps"],
                                   p.config["num_stages"])
            assert tiles.smem_bytes(cfg, "fwd", d, d, ELEM) <= spec.smem_per_block
            chosen.add((cfg, d, "window" if p.kernel == "window" else None))
    for cfg, d, variant in sorted(chosen, key=str):
        what = f"planned fwd {cfg} d={d} {variant or 'dense'}"
        # the window variant compiles with every feature on (a bool mask, softcap, dropout, ALiBi, ragged sizes)
        compiled = rep.compile(what, compile_fwd, cfg, rep.cc, "bf16", d, "i1" if variant else None, variant)
        rep.shared(what, compiled, tiles.smem_bytes(cfg, "fwd", d, d, ELEM, 1 if variant else 0))
    rep.check()
    assert len(chosen) >= 3  # the plan adapts the tile to the shape
