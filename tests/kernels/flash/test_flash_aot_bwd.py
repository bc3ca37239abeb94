"""Backward kernels compile for sm_90/sm_80 and fit; see `tests/kernels/_aot.py`."""

from __future__ import annotations

import pytest

from attnfuse.costmodel import tiles
from tests.kernels._aot import (
    ELEM,
    GROUPS,
    _heavy_mask,
    _kept,
    _name,
    _nearest_limit,
    _Report,
    compile_dkdv,
    compile_dq,
    compile_preprocess,
)


@pytest.mark.parametrize("spec_name,dt,hd", GROUPS)
def test_backward_configs_compile_and_fit(spec_name, dt, hd):
    rep = _Report(spec_name, dt, hd)
    rep.shared("preprocess", rep.compile("preprocess", compile_preprocess, rep.cc, dt, hd))
    for cfg in _kept(rep, "bwd", hd):
        estimate = tiles.smem_bytes(cfg, "bwd", hd, hd, ELEM)
        rep.shared(f"dkdv {_name(cfg)}", rep.compile(f"dkdv {_name(cfg)}", compile_dkdv, cfg, rep.cc, dt, hd), estimate)
        rep.shared(f"dq {_name(cfg)}", rep.compile(f"dq {_name(cfg)}", compile_dq, cfg, rep.cc, dt, hd), estimate)
    mask, mask_elem = _heavy_mask(dt)
    kept = _kept(rep, "bwd", hd, mask_elem)
    if kept:
        cfg = _nearest_limit(kept, "bwd", hd, mask_elem)
        estimate = tiles.smem_bytes(cfg, "bwd", hd, hd, ELEM, mask_elem)
        for name, fn in (("dkdv", compile_dkdv), ("dq", compile_dq)):
            what = f"{name} {_name(cfg)} all features, {mask} mask"
            rep.shared(what, rep.compile(what, fn, cfg, rep.cc, dt, hd, mask), estimate)
    rep.check()
