"""Forward kernels (and the split-K combine) compile for sm_90/sm_80 and fit; see `tests/kernels/_aot.py`."""

from __future__ import annotations

import pytest

from attnfuse.costmodel import tiles
from attnfuse.device import PRESETS
from tests.kernels._aot import (
    ELEM,
    GROUPS,
    _heavy_mask,
    _kept,
    _name,
    _nearest_limit,
    _Report,
    compile_combine,
    compile_fwd,
)


@pytest.mark.parametrize("spec_name,dt,hd", GROUPS)
def test_forward_configs_compile_and_fit(spec_name, dt, hd):
    rep = _Report(spec_name, dt, hd)
    for cfg in _kept(rep, "fwd", hd):
        k = rep.compile(f"fwd {_name(cfg)}", compile_fwd, cfg, rep.cc, dt, hd)
        rep.shared(f"fwd {_name(cfg)}", k, tiles.smem_bytes(cfg, "fwd", hd, hd, ELEM))
        if k is not None and rep.cc == 90 and cfg.block_m >= 64 and "wgmma" not in k.asm["ptx"]:
            rep.problems.append(f"{rep.where} fwd {_name(cfg)}: no wgmma in the PTX")
    mask, mask_elem = _heavy_mask(dt)
    kept = _kept(rep, "fwd", hd, mask_elem)
    if kept:
        cfg = _nearest_limit(kept, "fwd", hd, mask_elem)
        what = f"fwd {_name(cfg)} all features, {mask} mask"
        rep.shared(what, rep.compile(what, compile_fwd, cfg, rep.cc, dt, hd, mask),
                   tiles.smem_bytes(cfg, "fwd", hd, hd, ELEM, mask_elem))
    for block_s in (2, 64):  # split-K merge: next_power_of_2(splits), splits <= 64
        what = f"combine BLOCK_S={block_s}"
        rep.shared(what, rep.compile(what, compile_combine, rep.cc, dt, hd, block_s))
    rep.check()


def test_reachable_configs_are_kept():
    spec = PRESETS["h100"]
    reachable = tiles.reachable_configs("fwd", 128, 128, ELEM, spec)
    assert reachable and reachable <= set(tiles.kept_configs("fwd", 128, 128, ELEM, spec))
