"""One decision per tile: the plan chooses the Triton tiles with everything a launch depends on, the op carries
them, and on the CPU the report names the path that runs instead of tiles (the half that launches the kernels is
tests/kernels/flash/test_tiles_once_interpret.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnfuse
from attnfuse.costmodel import plan as planner
from attnfuse.costmodel import tiles
from attnfuse.device import PRESETS

SHAPE = {"batch": 2, "heads": 8, "kv_heads": 2, "q_len": 1000, "kv_len": 1000, "head_dim": 128, "v_head_dim": 128,
         "elem": 2}


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("mask_elem", [0, 1, 4])
@pytest.mark.parametrize("structure", [{}, {"window": (256, 0)}], ids=["dense", "window"])
def test_the_plan_decides_both_tiles_with_the_mask(preset, mask_elem, structure):
    spec = PRESETS[preset]
    p = planner.plan({**SHAPE, "mask_elem": mask_elem, "causal": True}, spec, ("flash", "window"),
                     structure={**structure, "causal": True})
    band = tiles.band(structure.get("window", (-1, -1)), True)
    fwd, bwd = tiles.launch_configs(1000 * 4, 1000, 2 * 2, 128, 128, 2, spec, mask_elem, 4, band)
    assert p.config == tiles.config_dict(fwd, bwd)
    for kind, cfg in (("fwd", fwd), ("bwd", bwd)):  # what the launcher's own pick gives for these tensors
        assert cfg == tiles.pick(kind, 4000, 1000, 4, 128, 128, 2, spec, mask_elem, 4, band)
        assert tiles.keep(cfg, kind, 128, 128, 2, spec, mask_elem)


def test_a_mask_can_change_the_tile():
    """Counting the mask's shared memory is what makes the plan's tile runnable: some spec and head dim
    pick differently with a 4-byte mask than without one."""
    differ = [(name, d) for name, spec in PRESETS.items() if name != "cpu" for d in (64, 128, 256)
              if tiles.launch_configs(4096, 4096, 16, d, d, 2, spec, 0) != tiles.launch_configs(
                  4096, 4096, 16, d, d, 2, spec, 4)]
    assert differ


def test_the_op_argument_names_each_rows_tiles():
    a, b = tiles.launch_configs(64, 64, 1, 64, 64, 2, PRESETS["h100"]), \
        tiles.launch_configs(16384, 16384, 8, 64, 64, 2, PRESETS["h100"])
    assert a != b
    arg = tiles.encode([(0, 256, tiles.config_dict(*a)), (256, None, tiles.config_dict(*b)), (0, 1, {})])
    assert tiles.decode(arg, 0, "fwd") == a[0] and tiles.decode(arg, 255, "bwd") == a[1]
    assert tiles.decode(arg, 256, "fwd") == b[0] and tiles.decode(arg, 10**6, "bwd") == b[1]
    assert tiles.decode("", 100, "fwd") is None and tiles.encode([]) == ""
    # rows naming different tiles keep a traced op whole (each call decodes its row); one tile may be traced
    assert tiles.varies(arg) and not tiles.varies(tiles.encode([(0, None, tiles.config_dict(*a))]))
    assert not tiles.varies("")


def test_a_dynamic_table_carries_every_rows_tiles():
    p = planner.plan({**SHAPE, "causal": False}, PRESETS["h100"], ("flash",), dynamic=True)
    rows = [(r["kv_len"][0], r["kv_len"][1], r["config"]) for r in p.table]
    assert len(rows) > 1 and all(a[2] != b[2] for a, b in zip(rows, rows[1:]))  # rows merge only when they agree
    arg = tiles.encode(rows)
    for lo, hi, config in rows:
        for n in (lo, (hi or 10**6) - 1):
            fwd = tiles.decode(arg, n, "fwd")
            assert (fwd.block_m, fwd.block_n, fwd.num_warps, fwd.num_stages) == tuple(
                config[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))


def test_no_tile_fits_rejects_the_candidate_with_the_reason():
    tiny = dataclasses.replace(PRESETS["a100"], name="tiny", smem_per_block=16 * 2**10, smem_per_sm=16 * 2**10)
    p = planner.plan({**SHAPE, "causal": False}, tiny, ("flash",))
    assert p.kernel == "eager"
    flash = next(r for r in p.candidates if r["kernel"] == "flash")
    assert "no tile config fits head_dim=128" in flash["rejected"] and flash["est_time_s"] is None


class _Sites(torch.nn.Module):
    def forward(self, q, k, v):
        causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        capped = (30.0 * torch.tanh(q @ k.transpose(-1, -2) * 0.125 / 30.0)).softmax(-1) @ v
        i = torch.arange(q.shape[-2])
        band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 8)
        windowed = (q @ k.transpose(-1, -2) * 0.125).masked_fill(~band, float("-inf")).softmax(-1) @ v
        return causal + capped + windowed


@pytest.mark.skipif(attnfuse.device.triton_interprets(), reason="the plain-CPU report")
def test_on_the_cpu_the_report_names_the_path_that_runs():
    q, k, v = (torch.randn(1, 2, 33, 16) for _ in range(3))
    report = attnfuse.audit(_Sites(), q, k, v)
    paths = [s.config for s in report.sites]
    assert [s.status for s in report.sites] == ["fused"] * 3
    assert paths == [{"path": "sdpa-flash-cpu", "backward": "reference"},
                     {"path": "reference", "backward": "reference"},
                     {"path": "tiled", "backward": "tiled"}], paths
    assert not any("BLOCK_M" in s.config for s in report.sites)
