"""The cost model (`attnfuse.costmodel`, `attnfuse.device`, the flash launcher's `estimate`): monotone estimates,
IO-awareness in the SRAM size, the cheapest allowed candidate wins, dynamic-length tables, specs as JSON."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import subprocess
import sys

import pytest

from attnfuse import Config, families
from attnfuse.costmodel import plan as planner
from attnfuse.costmodel import tiles
from attnfuse.device import PRESETS, DeviceSpec

ALL = ("flash", "window", "blocksparse", "topk", "lsh")
CALIBRATED = {"rejected": {}, "errors": {"topk": 0.01, "lsh": 0.01}, "params": {"topk": {}, "lsh": {}}}


def _shape(seq: int, causal: bool = True, heads: int = 8, kv_heads: int = 8, d: int = 64, q_len=None) -> dict:
    return {"batch": 1, "heads": heads, "kv_heads": kv_heads, "q_len": seq if q_len is None else q_len,
            "kv_len": seq, "head_dim": d, "v_head_dim": d, "elem": 2, "causal": causal}


SEQS = (64, 200, 512, 1000, 2048, 4096, 8192, 16384, 32768, 65536)


@pytest.mark.parametrize("spec_name", ["h100", "a100", "cpu"])
@pytest.mark.parametrize("family", ["flash", "window", "blocksparse", "topk", "lsh", "eager"])
def test_estimates_are_monotone_in_sequence_length(spec_name, family):
    spec = PRESETS[spec_name]
    structure = {"window": (256, 0), "causal": True, "block_sparse": True, "density": 0.3}
    prev = None
    for seq in SEQS:
        _, est = planner.estimate_family(family, _shape(seq), spec, structure=structure, causal=True)
        assert est.time_s > 0 and est.flops > 0 and est.hbm_bytes > 0
        if prev is not None:
            for field in ("time_s", "flops", "hbm_bytes", "exp_ops"):
                assert getattr(est, field) >= getattr(prev, field), (family, seq, field)
        prev = est


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
@pytest.mark.parametrize("cfg", tiles.CONFIGS[::3])
def test_tile_estimate_is_monotone_for_every_config(kind, cfg):
    spec = PRESETS["h100"]
    times = [tiles.estimate(cfg, kind, seq, seq, 16, 128, 128, 2, spec) for seq in SEQS]
    assert all(b.time_s >= a.time_s and b.hbm_bytes >= a.hbm_bytes for a, b in zip(times, times[1:]))
    assert all(e.exp_ops == pytest.approx(e.flops / (4 * 128) / {"fwd": 1, "bwd": 3.5 / 2}[kind]) for e in times)


def _with_smem(spec: DeviceSpec, kib: int) -> DeviceSpec:
    return dataclasses.replace(spec, name=f"{spec.name}-{kib}k", smem_per_block=kib * 1024, smem_per_sm=kib * 1024)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("seq", [1024, 4096, 16384, 65536])
def test_larger_sram_never_raises_the_chosen_tiles_hbm_bytes(d, seq):
    """FlashAttention's IO analysis: more SRAM allows larger query tiles, hence fewer K/V re-reads."""
    prev = None
    for kib in (48, 64, 100, 164, 228):
        spec = _with_smem(PRESETS["h100"], kib)
        cfg = tiles.pick("fwd", seq, seq, 16, d, d, 2, spec)
        assert tiles.smem_bytes(cfg, "fwd", d, d, 2) <= spec.smem_per_block
        hbm = tiles.estimate(cfg, "fwd", seq, seq, 16, d, d, 2, spec).hbm_bytes
        if prev is not None:
            assert hbm <= prev, (kib, cfg)
        prev = hbm


def test_hbm_bytes_follow_the_io_bound():
    """K/V re-reads shrink as the query tile grows: Theta(N^2 d / BLOCK_M) beyond the inputs read once."""
    spec = dataclasses.replace(PRESETS["h100"], l2_bytes=1)  # no L2 reuse: every re-read from HBM
    n, d = 16384, 128
    once = 16 * 2 * n * 2 * d * 2
    small = tiles.estimate(tiles.TileConfig(64, 64, 4, 2), "fwd", n, n, 16, d, d, 2, spec).hbm_bytes - once
    large = tiles.estimate(tiles.TileConfig(128, 64, 8, 2), "fwd", n, n, 16, d, d, 2, spec).hbm_bytes - once
    assert small == pytest.approx(2 * large, rel=0.01)


@pytest.mark.parametrize("spec_name", ["h100", "a100", "cpu"])
@pytest.mark.parametrize("seq", [256, 4096, 32768, 131072])
def test_the_cheapest_allowed_candidate_wins(spec_name, seq):
    spec = PRESETS[spec_name]
    for structure in ({}, {"window": (1024, 0), "causal": True}):
        p = planner.plan(_shape(seq), spec, ALL, structure=structure, approx=CALIBRATED)
        allowed = [c for c in p.candidates if c["est_time_s"] is not None and (
            c["rejected"] is None or c["rejected"].startswith("estimated"))]
        best = min(allowed, key=lambda c: c["est_time_s"])
        assert p.kernel == best["kernel"] == p.candidates[0]["kernel"]
        assert p.candidates[0]["rejected"] is None
        for c in p.candidates[1:]:
            assert c["rejected"], c


def test_window_and_topk_are_preferred_exactly_where_their_estimate_is_lower():
    spec = PRESETS["h100"]
    chose = {}
    for seq in SEQS:
        window = planner.plan(_shape(seq), spec, ALL, structure={"window": (512, 0), "causal": True})
        est = {c["kernel"]: c["est_time_s"] for c in window.candidates}
        assert (window.kernel == "window") == (est["window"] <= est["flash"])
        topk = planner.plan(_shape(seq), spec, ALL, approx=CALIBRATED)
        est = {c["kernel"]: c["est_time_s"] for c in topk.candidates}
        assert (topk.kernel == "topk") == (est["topk"] < min(est["flash"], est["lsh"]))
        chose[seq] = topk.kernel
    assert chose[64] == "flash" and chose[65536] == "topk"  # top-k pays off only at long contexts


def test_approximate_kernels_need_the_opt_in_and_a_calibration():
    spec = PRESETS["h100"]
    plain = planner.plan(_shape(65536), spec, ALL)
    assert plain.kernel == "flash"
    rows = {c["kernel"]: c for c in plain.candidates}
    assert "opt-in" in rows["topk"]["rejected"] and rows["topk"]["est_time_s"] < rows["flash"]["est_time_s"]
    too_big = {"rejected": {"topk": "calibrated error 0.3 exceeds max_rel_error 0.02", "lsh": "x"},
               "errors": {"topk": 0.3}, "params": {}}
    p = planner.plan(_shape(65536), spec, ALL, approx=too_big)
    rows = {c["kernel"]: c for c in p.candidates}
    assert p.kernel == "flash" and rows["topk"]["error"] == 0.3 and "0.3" in rows["topk"]["rejected"]


def test_the_lsh_estimate_is_its_index_plus_top_ks_attention_over_cap_keys():
    """Hashing FLOPs ``2 * (B*H*Lq + B*Hkv*Lk) * D * tables * bits`` (bits -1 resolved at the key length) plus top-k's
    block-sparse attention with ``topk`` = ``cap``; more tables, probes or cap cost more."""
    from attnfuse.kernels import lsh

    spec = PRESETS["h100"]
    for seq, kv_heads in ((3000, 8), (40000, 2)):
        shape, d = _shape(seq, kv_heads=kv_heads), 64
        n_blocks = -(-seq // 64)
        for params in ({}, {"tables": 12, "bits": 9, "probes": 1, "cap": 1000}):
            full = {**lsh.DEFAULTS, **params}
            bits = lsh.auto_bits(full["bits"], seq)
            _, est = planner.estimate_family("lsh", shape, spec, params=params, causal=True)
            _, top = planner.estimate_family("topk", shape, spec, params={"topk": full["cap"]}, causal=True)
            hashing = 2.0 * (8 * seq + kv_heads * seq) * d * full["tables"] * bits
            assert est.flops == pytest.approx(hashing + top.flops - 4.0 * 8 * seq * n_blocks * d, rel=1e-9)
            assert est.exp_ops == pytest.approx(top.exp_ops, rel=1e-9)
    shape = _shape(40000, kv_heads=2)  # long enough that the attention's launch overhead does not dominate
    times = [planner.estimate_family("lsh", shape, spec, params=p, causal=True)[1].time_s
             for p in ({"cap": 256}, {"cap": 256, "tables": 12}, {"cap": 256, "tables": 12, "probes": 1},
                       {"tables": 12, "probes": 1, "cap": 1024})]
    assert times == sorted(times) and len(set(times)) == 4


def test_approximate_rows_carry_their_knobs_and_the_op_table_keeps_auto_bits():
    from attnfuse.kernels import lsh

    spec = PRESETS["h100"]
    level = {**lsh.DEFAULTS, "tables": 12, "probes": 1, "cap": 4096}
    tried = [{"params": dict(lsh.DEFAULTS), "error": 0.2}, {"params": level, "error": 0.03}]
    approx = {"rejected": {}, "errors": {"lsh": 0.03, "topk": 0.01}, "params": {"lsh": level, "topk": {"topk": 512}},
              "tried": {"lsh": tried}}
    for seq in (5000, 70000):
        p = planner.plan(_shape(seq), spec, ("flash", "lsh", "topk"), approx=approx, dynamic=True)
        rows = {c["kernel"]: c for c in p.candidates}
        assert rows["lsh"]["params"] == {**level, "bits": lsh.auto_bits(-1, seq)} and rows["lsh"]["error"] == 0.03
        assert [t["params"]["tables"] for t in rows["lsh"]["tried"]] == [8, 12]
        assert [t["error"] for t in rows["lsh"]["tried"]] == [0.2, 0.03]
        assert all(t["params"]["bits"] == lsh.auto_bits(-1, seq) for t in rows["lsh"]["tried"])
        assert rows["topk"]["params"] == {**families.FAMILIES["topk"].defaults, "topk": 512}
        assert "tried" not in rows["topk"] and "params" not in rows["flash"]
        assert planner.estimate_family("lsh", _shape(seq), spec, params=rows["lsh"]["params"],
                                       causal=True)[1].time_s == rows["lsh"]["est_time_s"]
        if "lsh" in {r["kernel"] for r in p.table}:
            assert json.loads(p.op_table(approx["params"]))["params"]["lsh"]["bits"] == -1
    plain = {c["kernel"]: c for c in planner.plan(_shape(5000), spec, ALL).candidates}
    assert "params" not in plain["lsh"] and "tried" not in plain["lsh"]  # no opt-in: no knobs to report


def test_excluded_kernels_fall_back_and_say_why():
    p = planner.plan(_shape(1024), PRESETS["h100"], ("blocksparse",))  # the kernel the user allowed says why not
    assert p.kernel == "eager" and p.candidates[0]["kernel"] == "blocksparse"
    assert p.candidates[0]["rejected"].startswith("needs a constant mask")
    p = planner.plan(_shape(1024), PRESETS["h100"], ("topk",))  # none exact allowed: the exact kernel that would run
    assert p.kernel == "eager" and p.candidates[0]["kernel"] == "flash"
    assert "not in options['kernels']" in p.candidates[0]["rejected"]


def test_dynamic_lengths_get_a_table_that_the_op_reads():
    spec = PRESETS["h100"]
    p = planner.plan(_shape(2048), spec, ALL, approx={**CALIBRATED, "params": {"topk": {"topk": 1024}}},
                       dynamic=True)
    kinds = [row["kernel"] for row in p.table]
    assert kinds[0] == "flash" and kinds[-1] == "topk" and p.table[-1]["kv_len"][1] is None
    assert all(a["kv_len"][1] == b["kv_len"][0] for a, b in zip(p.table, p.table[1:]))
    table = json.loads(p.op_table({"topk": {"topk": 1024}}))
    assert table["table"][0][2] == "exact" and table["table"][-1] == [p.table[-1]["kv_len"][0], -1, "topk"]
    for row in p.table:  # each row's kernel is what a static plan at its representative length chooses
        static = planner.plan(_shape(row["planned_at"]), spec, ALL,
                                approx={**CALIBRATED, "params": {"topk": {"topk": 1024}}})
        assert static.kernel == row["kernel"]
    assert planner.plan(_shape(2048), spec, ALL, dynamic=True).op_table() == ""  # exact everywhere: no table


_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def _assert_consistent(p: planner.Plan, shape: dict, kernels, structure: dict, approx) -> None:
    """No row's ``rejected`` reason claims what its own numbers (or the plan's inputs) contradict."""
    rows = {c["kernel"]: c for c in p.candidates}
    assert list(rows) != [] and len(rows) == len(p.candidates) == len(families.FAMILIES)
    runs = rows[p.kernel]
    assert runs["rejected"] is None and runs["est_time_s"] is not None, runs  # what runs is not rejected
    assert all(c["rejected"] for c in p.candidates if c is not runs), p.candidates
    if p.kernel == "eager":  # nothing allowed: the exact kernel that would have run comes first, with its reason
        assert p.candidates[0]["kernel"] in planner.EXACT and p.candidates[0]["rejected"]
    for c in p.candidates:
        why, est = c["rejected"], c["est_time_s"]
        if not why:
            continue
        assert not re.search(r"(?<![\d.])0(\.0+)? (B|KiB|MiB|GiB|TiB)\b", why), why  # no "0.0 MiB"
        if c["kernel"] == "eager":
            assert why.startswith("attnfuse fuses whenever an allowed kernel applies"), why
            ratio, kernel = re.search(r"([\d.e+-]+)x the time of '(\w+)'", why).groups()
            assert kernel == p.kernel and float(ratio) == pytest.approx(est / runs["est_time_s"], rel=5e-3)
            assert ("estimated faster" in why) == (est < runs["est_time_s"]), (why, est, runs["est_time_s"])
            value, unit = re.search(r"materializes ([\d.]+) (\w+) of scores", why).groups()
            assert 1 <= float(value) < 1024 or unit == "TiB", why
            scores = shape["batch"] * shape["heads"] * shape["q_len"] * shape["kv_len"] * 4
            assert float(value) * _UNITS[unit] == pytest.approx(scores, rel=5e-3) == c["scores_bytes"]
        elif why.startswith("estimated"):
            ratio, kernel, margin = re.fullmatch(r"estimated (\d+\.\d\d)x the time of '(\w+)'(: PyTorch.*)?",
                                                 why).groups()
            assert kernel == p.kernel and float(ratio) == round(est / runs["est_time_s"], 2)
            # a faster row lost only as a PyTorch kernel within the margin of attnfuse's chosen one
            assert est >= runs["est_time_s"] or (margin and c["kernel"] in ("sdpa", "flex") and est > (
                1 - planner.PYTORCH_MARGIN) * runs["est_time_s"] and p.kernel not in ("sdpa", "flex"))
        elif "is not in options['kernels']" in why:
            assert c["kernel"] not in kernels
        elif "(opt-in)" in why:
            assert approx is None and not c["exact"]
        elif why.startswith("needs a proven band"):
            assert structure.get("window") is None and est is None
        elif why.startswith("needs a constant mask"):
            assert not structure.get("block_sparse") and est is None
        elif "window / block-sparse mode" in why:
            assert c["kernel"] == "flash" and (structure.get("window") is not None or structure.get("block_sparse"))
        elif why.startswith("needs q, k or v formed from per-token factors"):
            assert c["kernel"] == "tpa" and not structure.get("tpa") and est is None
        elif "window kernel only" in why:
            assert structure.get("window_pad") and c["kernel"] != "window"
        elif "a candidate only for a matched site" in why:  # PyTorch's kernels need the site's facts (`limits`)
            assert c["kernel"] in ("sdpa", "flex") and "limits" not in structure
        elif c["kernel"] in ("sdpa", "flex") and structure.get("limits", {}).get(c["kernel"]):
            assert why == structure["limits"][c["kernel"]]  # the site's own reason, as given
        else:
            assert approx is not None and approx["rejected"].get(c["kernel"]) == why, why


STRUCTURES = ({}, {"window": (256, 0), "causal": True}, {"block_sparse": True, "density": 0.25},
              {"window": (64, 64), "causal": False, "window_pad": True})
KERNEL_SETS = (ALL, ("flash",), ("blocksparse",), ("window", "topk"), ("lsh",))
APPROX = (None, CALIBRATED, {"rejected": {"topk": "calibrated error 0.3 exceeds max_rel_error 0.02"},
                              "errors": {"topk": 0.3, "lsh": 0.01}, "params": {}})


@pytest.mark.parametrize("spec_name", ["h100", "a100", "cpu"])
@pytest.mark.parametrize("seq", [16, 64, 200, 1024, 16384])
def test_the_candidate_table_never_contradicts_itself(spec_name, seq):
    """For a sweep of shapes, devices, structures, allowed kernels and policies: the chosen row is not rejected,
    every other row is, and no reason says what the row's estimates (or the plan's inputs) contradict --
    in particular the unfused graph, which runs only when no allowed kernel applies, says when it is estimated
    faster than the kernel that runs, and sizes its scores in a unit that shows them."""
    spec = PRESETS[spec_name]
    shapes = (_shape(seq), _shape(seq, causal=False, heads=8, kv_heads=2, d=128), _shape(seq, q_len=1))
    for shape, structure, kernels, approx in itertools.product(shapes, STRUCTURES, KERNEL_SETS, APPROX):
        p = planner.plan(shape, spec, kernels, structure=structure, approx=approx)
        _assert_consistent(p, shape, kernels, structure, approx)
    assert "estimated faster" in planner.plan(_shape(16), spec, ALL).candidates[-1]["rejected"]


def test_sizes_print_in_a_unit_that_shows_them():
    assert [planner.size_text(n) for n in (0, 512, 8192, 1000 * 2**10, 3.5 * 2**20, 2**50)] == [
        "0 B", "512 B", "8 KiB", "1000 KiB", "3.5 MiB", "1024 TiB"]


def test_spec_json_round_trip(tmp_path):
    for spec in PRESETS.values():
        path = spec.save(tmp_path / f"{spec.name}.json")
        assert DeviceSpec.load(path) == spec
        assert Config.from_options({"device": str(path)}).device_spec() == spec
    assert hash(PRESETS["h100"]) == hash(DeviceSpec.from_dict(PRESETS["h100"].to_dict()))


@pytest.mark.parametrize("change,field", [
    ({"sms": 0}, "sms"), ({"sms": 1.5}, "sms"), ({"hbm_bytes_per_s": -1.0}, "hbm_bytes_per_s"),
    ({"matmul_flops": {"float8": 1e12}}, "matmul_flops['float8']"), ({"matmul_flops": {}}, "matmul_flops"),
    ({"matmul_flops": {"float16": float("nan")}}, "matmul_flops['float16']"), ({"exp_per_s": 0}, "exp_per_s"),
    ({"smem_per_block": 300 * 1024}, "smem_per_block"), ({"name": ""}, "name"),
])
def test_bad_specs_raise_naming_the_field(change, field):
    data = {**PRESETS["h100"].to_dict(), **change}
    with pytest.raises(ValueError, match=f"field '{field}'" if "[" not in field else "matmul_flops"):
        DeviceSpec.from_dict(data)


def test_bad_spec_files_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file.*calibrate"):
        Config.from_options({"device": str(tmp_path / "missing.json")})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DeviceSpec.load(bad)
    bad.write_text(json.dumps({**PRESETS["a100"].to_dict(), "sram": 1}))
    with pytest.raises(ValueError, match="unknown field.*sram"):
        DeviceSpec.load(bad)
    data = PRESETS["a100"].to_dict()
    del data["sms"]
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="missing field.*sms"):
        DeviceSpec.load(bad)


def test_cpu_detection_and_dtype_rates():
    spec = DeviceSpec.detect()
    assert spec.sms >= 1 and spec.flops("float32") > 0
    assert PRESETS["h100"].flops("bfloat16") == 989e12 and PRESETS["cpu"].flops("float8") == 20e9  # the slowest


def test_calibrate_cli_writes_a_usable_spec(tmp_path):
    out = tmp_path / "spec.json"
    res = subprocess.run([sys.executable, "-m", "attnfuse", "calibrate", "--quick", "--device", "cpu", "-o", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    spec = DeviceSpec.load(out)
    assert spec.hbm_bytes_per_s > 1e6 and spec.flops("float32") > 1e6 and spec.exp_per_s > 1e5
    assert json.loads(res.stdout)["name"] == spec.name
    p = planner.plan(_shape(1024), spec, ALL)
    assert p.kernel == "flash" and p.candidates[0]["est_time_s"] > 0
    bad = subprocess.run([sys.executable, "-m", "attnfuse", "calibrate", "--device", "cuda"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "no CUDA device" in bad.stderr


@pytest.mark.parametrize("fitted,chosen", [(0.97, "flash"), (0.90, "sdpa"), (1.2, "flash")])
def test_pytorch_kernels_must_win_by_the_margin(monkeypatch, fitted, chosen):
    """sdpa / flex estimates are attnfuse's scaled by a measured ratio: within `PYTORCH_MARGIN` of attnfuse's
    best the choice would be measurement noise, so attnfuse's kernel stays and the row says why."""
    from attnfuse.costmodel import fits

    monkeypatch.setattr(fits, "ratio", lambda *a, **k: fits.Fit(fitted, "h100", "flash", None))
    structure = {"limits": {"sdpa": None, "flex": "not this test's"}, "sdpa_backend": "flash"}
    kernels = (*ALL, "sdpa", "flex")
    p = planner.plan(_shape(4096), PRESETS["h100"], kernels, structure=structure)
    assert p.kernel == chosen
    rows = {c["kernel"]: c for c in p.candidates}
    assert rows["sdpa"]["est_time_s"] == pytest.approx(fitted * rows["flash"]["est_time_s"], rel=1e-6)
    if chosen == "flash" and fitted < 1:
        assert "must be estimated more than 5% faster" in rows["sdpa"]["rejected"]
    _assert_consistent(p, _shape(4096), kernels, structure, None)
