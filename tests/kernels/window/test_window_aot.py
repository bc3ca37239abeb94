"""The band (sliding window + ALiBi) and block-sparse variants of the flash kernels compile for sm_90/sm_80 and
fit; see `_aot.py`.

`pick` chooses these launches from the same `tiles.kept_configs` as the plain kernels (the block-sparse kernel
reads the caller's mask, so its element size is the plain kernels' ``mask_elem``), and test_flash_aot_fwd/bwd
compile every kept config of those kernels.  The variants add loops (a third band stage, or the map's two
listed loops with their scalar index loads) and ALiBi's per-row slopes, but no tile buffer beyond the mask
tile that `tiles.smem_bytes` already counts; so each (spec, head dim) compiles the variants at the two ends
of the kept configs: the one nearest the shared-memory limit (where an extra pipelined buffer would
overflow, and `smem_bytes` must still bound what Triton allocates) and the smallest one (the other MMA
path: 16-row tiles never use wgmma).  Head dims 64 and 256 are the loosest and the tightest fit.
"""

from __future__ import annotations

import pytest

from attnfuse.costmodel import tiles
from tests.kernels._aot import (
    ELEM,
    TARGETS,
    _kept,
    _name,
    _nearest_limit,
    _Report,
    compile_dkdv,
    compile_dq,
    compile_fwd,
)

# (variant, dtype, mask dtype): a window with a float32 bias and its gradient, block-sparse with a bool mask and
# with an additive float32 mask (the finfo.min floor); every one with ALiBi, softcap, dropout, ragged lengths
VARIANTS = [("window", "bf16", "fp32"), ("sparse", "fp16", "i1"), ("sparse", "bf16", "fp32")]
CASES = [pytest.param(s, v, dt, m, hd, id=f"{s}-{v}-{dt}-{m}-d{hd}")
         for s in TARGETS for v, dt, m in VARIANTS for hd in (64, 256)]


@pytest.mark.parametrize("spec_name,variant,dt,mask,hd", CASES)
def test_band_and_block_sparse_variants_compile_and_fit(spec_name, variant, dt, mask, hd):
    rep = _Report(spec_name, dt, hd)
    mask_elem = 1 if mask == "i1" else 4
    for kind, kernels in (("fwd", (("fwd", compile_fwd),)), ("bwd", (("dkdv", compile_dkdv), ("dq", compile_dq)))):
        kept = _kept(rep, kind, hd, mask_elem)
        if not kept:
            continue
        smallest = min(kept, key=lambda c: tiles.smem_bytes(c, kind, hd, hd, ELEM, mask_elem))
        for cfg in {_nearest_limit(kept, kind, hd, mask_elem), smallest}:
            estimate = tiles.smem_bytes(cfg, kind, hd, hd, ELEM, mask_elem)
            for name, fn in kernels:
                what = f"{name} {_name(cfg)} {variant}, {mask} mask"
                rep.shared(what, rep.compile(what, fn, cfg, rep.cc, dt, hd, mask, variant), estimate)
    rep.check()
