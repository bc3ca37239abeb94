"""Host-side work of the band and block-sparse kernels: the tiles a band visits (`tiles.tiles_visited`, which
the launcher's cost estimate uses) and the block-sparse tile maps (`blocksparse.tile_map`) against brute force,
`pick`'s window-aware choice, and launches that trace (fake CUDA tensors, as under torch.compile).  No kernel
runs here."""

from __future__ import annotations

import itertools
import os
import random

import pytest
import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx

from attnfuse.costmodel import tiles
from attnfuse.device import PRESETS
from attnfuse.kernels import blocksparse, flash
from tests._util import band
from tests.kernels._trace_helpers import Hopper, fake_cuda, launched_kernels


def _pairs(vis: torch.Tensor, block_m: int, block_n: int, groups: int) -> int:
    """(packed query tile, key tile) pairs with a visible score: the tiles a band kernel must visit."""
    packed = vis.repeat_interleave(groups, 0)
    count = 0
    for r in range(0, packed.shape[0], block_m):
        for c in range(0, packed.shape[1], block_n):
            count += bool(packed[r:r + block_m, c:c + block_n].any())
    return count


@pytest.mark.parametrize("seed", range(6))
def test_tiles_visited_is_the_band_tiles(seed):
    """Exactly the tiles holding a visible score, when every row sees a key; O(q_len * width) for narrow bands."""
    rng = random.Random(seed)
    for _ in range(20):
        lq, lk = rng.randint(1, 150), rng.randint(1, 150)
        left, right = rng.choice([-1, 0, 1, 5, 16, 40, 300]), rng.choice([-1, 0, 2, 15, 33, 300])
        bm, bn, groups = rng.choice([16, 32, 64]), rng.choice([16, 32, 64]), rng.choice([1, 2, 3])
        if left >= 0 and lq - 1 - left >= lk:
            lq = lk + left  # the kernels also visit one masked tile for rows that see no key
        got = tiles.tiles_visited(lq, lk, left, right, bm, bn, groups)
        assert got == _pairs(band(lq, lk, left, right), bm, bn, groups), (lq, lk, left, right, bm, bn, groups)
    assert tiles.tiles_visited(100, 90, -1, -1, 32, 16, 2) == triton.cdiv(200, 32) * triton.cdiv(90, 16)
    assert tiles.tiles_visited(16384, 16384, 512, 0, 64, 64, 1) <= 256 * (512 // 64 + 2)


# --------------------------------------------------------------------------------------------- tile maps


def _classify(mask, b, h, hkv, lq, lk, bm, bn, window):
    """Brute force: per (batch, kv head, packed query tile, key tile), 0 empty, 1 full, 2 partial."""
    groups = h // hkv
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(b, h, lq, lk)
    keep = m if mask.dtype == torch.bool else m > torch.finfo(mask.dtype).min
    zero = m if mask.dtype == torch.bool else m == 0
    vis = band(lq, lk, *window)
    keep, zero = keep & vis, zero & vis
    out = torch.zeros(b, hkv, triton.cdiv(lq * groups, bm), triton.cdiv(lk, bn), dtype=torch.int64)
    for bi, kv, t, c in itertools.product(*(range(n) for n in out.shape)):
        rows = range(t * bm, min((t + 1) * bm, lq * groups))
        cells_keep = torch.stack([keep[bi, kv * groups + r % groups, r // groups, c * bn:(c + 1) * bn] for r in rows])
        cells_zero = torch.stack([zero[bi, kv * groups + r % groups, r // groups, c * bn:(c + 1) * bn] for r in rows])
        ragged = (c + 1) * bn > lk
        out[bi, kv, t, c] = 0 if not cells_keep.any() else 1 if cells_zero.all() and not ragged else 2
    return out


def _lists(cls: torch.Tensor) -> list:
    """The map rows a classification implies: [n_full, n_partial, full tiles..., partial tiles...]."""
    return [[*[(x == 1).sum().item(), (x == 2).sum().item()], *(x == 1).nonzero().flatten().tolist(),
             *(x == 2).nonzero().flatten().tolist()] for x in cls.reshape(-1, cls.shape[-1])]


def _listed(tile_map: torch.Tensor, b: int, hkv: int) -> list:
    """The used part of each map row, with broadcast batch/head dims expanded."""
    rows = tile_map.expand(b, hkv, *tile_map.shape[2:]).reshape(-1, tile_map.shape[-1]).tolist()
    return [r[:2 + r[0] + r[1]] for r in rows]


def _random_mask(shape, kind, dtype=torch.float32):
    """Bool or additive masks with a full and an empty 16x16 tile, so that every class occurs."""
    keep = torch.rand(shape) < 0.5
    keep[..., :16, :16] = True
    keep[..., 16:32, 16:32] = False
    if kind == "bool":
        return keep
    bias = torch.where(torch.rand(shape) < 0.7, 0.0, torch.randn(shape)).to(dtype)
    bias[..., :16, :16] = 0
    masked = torch.where(torch.rand(shape) < 0.5, float("-inf"), torch.finfo(dtype).min).to(dtype)
    return torch.where(keep, bias, masked)


# name: (mask shape, kind, B, H, Hkv, block_m, block_n, window)
MAPS = {
    "bool_2d": ((47, 41), "bool", 1, 2, 2, 16, 16, (-1, -1)),
    "bool_2d_band": ((47, 41), "bool", 1, 2, 2, 16, 16, (9, 3)),
    "bool_per_head_gqa2": ((1, 4, 47, 41), "bool", 1, 4, 2, 16, 16, (-1, -1)),
    "bool_per_head_mqa3": ((3, 33, 35), "bool", 2, 3, 1, 16, 32, (-1, 0)),
    "bool_shared_gqa2": ((2, 1, 47, 41), "bool", 2, 4, 2, 32, 16, (-1, -1)),
    "key_padding_gqa2": ((2, 1, 1, 41), "bool", 2, 4, 2, 16, 16, (-1, -1)),
    "additive_fp32": ((47, 41), "float", 1, 2, 2, 16, 16, (-1, -1)),
    "additive_fp16_per_head": ((2, 47, 41), "half", 1, 2, 1, 16, 16, (20, -1)),
}


@pytest.mark.parametrize("name", list(MAPS))
def test_tile_map_matches_brute_force(name):
    shape, kind, b, h, hkv, bm, bn, window = MAPS[name]
    torch.manual_seed(len(name))
    mask = _random_mask(shape, kind, torch.float16 if kind == "half" else torch.float32)
    lq, lk = 33 if shape[-2] == 1 else shape[-2], shape[-1]
    maps = blocksparse.tile_map(mask, batch=b, heads=h, kv_heads=hkv, q_len=lq, kv_len=lk, block_m=bm, block_n=bn,
                                window=window)
    cls = _classify(mask, b, h, hkv, lq, lk, bm, bn, window)
    if name in ("bool_2d", "additive_fp32"):
        assert set(cls.unique().tolist()) == {0, 1, 2}
    assert _listed(maps.rows, b, hkv) == _lists(cls)
    assert _listed(maps.cols, b, hkv) == _lists(cls.transpose(-1, -2))
    assert maps.rows.dtype == torch.int32 and maps.rows.is_contiguous()
    # a batch or head dim the mask broadcasts stays 1 in the map
    assert maps.rows.shape[0] == (1 if len(shape) < 4 or shape[0] == 1 else b)


# --------------------------------------------------------------------------------------------- pick


def test_pick_is_window_aware():
    """A narrow band scales the estimate down by the tiles it visits; an unbounded one is the dense estimate."""
    spec = PRESETS["h100"]
    args = ("fwd", 16384, 16384, 32, 128, 128, 2, spec)
    assert tiles.pick(*args, 0, 1, (-1, -1)) == tiles.pick(*args)
    cfg = tiles.pick(*args, 0, 1, (512, 0))
    assert cfg in tiles.kept_configs("fwd", 128, 128, 2, spec)
    dense = tiles.estimate_s(cfg, *args[:-1], spec)
    windowed = tiles.estimate_s(cfg, *args[:-1], spec, window=(512, 0))
    fraction = tiles.tiles_visited(16384, 16384, 512, 0, cfg.block_m, cfg.block_n) / (
        triton.cdiv(16384, cfg.block_m) * triton.cdiv(16384, cfg.block_n))
    host = tiles.host_s(spec)  # the launch's host floor does not scale with the band
    assert fraction < 0.05 and (windowed**2 - host**2) ** 0.5 < 2 * fraction * (dense**2 - host**2) ** 0.5
    for kind in ("fwd", "bwd"):
        assert tiles.pick(kind, 4096, 4096, 8, 64, 64, 2, spec, 0, 4, (100, 100)) in tiles.kept_configs(
            kind, 64, 64, 2, spec)


# --------------------------------------------------------------------------------------------- tracing


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="interpreted kernels are not traceable")
@pytest.mark.parametrize("structure", [dict(window_size=(16, 0), alibi=True),
                                       dict(block_sparse=True, window_size=(-1, 0))],
                         ids=["window-alibi", "block-sparse-causal"])
def test_launches_trace_with_fake_cuda_tensors(structure, monkeypatch):
    """Under torch.compile the launcher runs on fake tensors: `pick` (the band's tile count), the tile-map build
    and the dead-row fix of dV must be plain-int or traceable torch work, and the launches carry no inf/nan."""
    monkeypatch.setattr(triton.runtime.driver, "_active", Hopper())
    kw = {key: val for key, val in structure.items() if key != "alibi"}

    def run(q, k, v, mask, slopes):
        alibi = slopes if structure.get("alibi") else None
        out, stats = flash.forward(q, k, v, mask, alibi=alibi, **kw)
        return flash.backward(out, q, k, v, out, stats, mask, alibi=alibi, deterministic=True, **kw)

    with FakeTensorMode():
        q, k, v = fake_cuda((2, 4, 97, 64), (2, 2, 97, 64), (2, 2, 97, 64))
        mask = torch.ones(97, 97, dtype=torch.bool, device="cuda")
        gm = make_fx(dispatch_functionalize(run))(q, k, v, mask, torch.rand(4, device="cuda"))
    assert launched_kernels(gm) == ["fwd_kernel", "bwd_preprocess", "bwd_dkdv_kernel", "bwd_dq_kernel"]
