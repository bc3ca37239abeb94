"""The sdpa / flex cost fits: the committed fits.json is what benchmarks/fit_costs.py makes of the committed
results; the lookup (preset, head dim, interpolation, fallbacks with notes); the estimates built on it; the fit
script's ratios on synthetic results files."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import pytest

from attnfuse.costmodel import estimates, fits
from attnfuse.costmodel.tiles import NoTileFits
from attnfuse.device import PRESETS
from tests._util import script_module

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "fit_costs.py"


@pytest.fixture(scope="module")
def fit_costs():
    with script_module(SCRIPT, "fit_costs") as mod:
        yield mod


def test_committed_fits_are_what_the_committed_results_give(fit_costs):
    committed = (ROOT / "attnfuse" / "costmodel" / "fits.json").read_text()
    assert fit_costs.dumps(fit_costs.build(ROOT / "benchmarks" / "results")) == committed, \
        "run python benchmarks/fit_costs.py (the results changed)"
    doc = json.loads(committed)
    assert set(doc["presets"]) == set(PRESETS)
    for name in ("h100", "cpu"):  # measured presets: both families, both modes (where the family trains)
        ratios = doc["presets"][name]["ratios"]
        assert set(ratios) == {"sdpa", "flex"}
        assert set(ratios["flex"]["dense"]) == {"fwd", "fwd_bwd"}
    assert set(doc["presets"]["h100"]["ratios"]["sdpa"]["flash"]) == {"fwd", "fwd_bwd"}
    # SDPA's CPU kernel declines float32 training (its backward misses the 2x rule): no fwd_bwd row to fit
    assert set(doc["presets"]["cpu"]["ratios"]["sdpa"]["flash"]) == {"fwd"}
    assert doc["presets"]["h200"]["from"] == doc["presets"]["a100"]["from"] == "h100"
    assert fit_costs.PRESETS == tuple(sorted(PRESETS))


def test_fits_json_is_package_data():
    text = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+)
    assert '"costmodel/fits.json"' in text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert fits.load()["presets"]  # read through importlib.resources


def _doc(**presets):
    return {"about": "", "presets": presets}


SYNTH = _doc(
    h100={"ratios": {
        "sdpa": {"flash": {"fwd": {"full": {"64": [[1000, 0.5], [4000, 2.0]], "128": [[1000, 3.0]]},
                                   "causal": {"64": [[1000, 0.25]]}},
                           "fwd_bwd": {"full": {"64": [[1000, 0.1]]}}}},
        "flex": {"dense": {"fwd": {"full": {"64": [[1000, 0.8]]}}, "fwd_bwd": {"full": {"64": [[1000, 0.4]]}}},
                 "window": {"fwd": {"causal": {"64": [[1000, 0.6]]}}},
                 "documents": {"fwd": {"causal": {"64": [[1000, 0.3]]}}}}}},
    h200={"from": "h100", "note": "no h200 measurement: h100's ratios"},
    cpu={"ratios": {"sdpa": {"flash": {"fwd": {"full": {"64": [[256, 1.5]]}}}}}},
)


@pytest.mark.parametrize("seq, want", [(500, 0.5), (1000, 0.5), (2000, 1.0), (4000, 2.0), (10**6, 2.0)])
def test_interpolation_is_geometric_in_log_seq_and_clamped(seq, want):
    got = fits.ratio(PRESETS["h100"], "sdpa", None, "fwd", False, 64, seq, fits=SYNTH)
    assert got.ratio == pytest.approx(want) and got.note is None and got.variant == "flash"


@pytest.mark.parametrize("head_dim, want", [(32, 0.5), (64, 0.5), (90, 0.5), (91, 3.0), (128, 3.0), (256, 3.0)])
def test_nearest_measured_head_dim_in_log2(head_dim, want):
    assert fits.ratio(PRESETS["h100"], "sdpa", "flash", "fwd", False, head_dim, 1000, fits=SYNTH).ratio == want


def test_fallbacks_say_what_they_reuse():
    h100, h200 = PRESETS["h100"], PRESETS["h200"]
    cudnn = fits.ratio(h100, "sdpa", "cudnn", "fwd", False, 64, 1000, fits=SYNTH)
    assert (cudnn.ratio, cudnn.variant) == (0.5, "flash") and "'cudnn'" in cudnn.note
    cpu_kernel = fits.ratio(PRESETS["cpu"], "sdpa", "cpu", "fwd", False, 64, 256, fits=SYNTH)
    assert (cpu_kernel.ratio, cpu_kernel.note, cpu_kernel.preset) == (1.5, None, "cpu")  # SDPA's CPU kernel: flash
    inherited = fits.ratio(h200, "sdpa", None, "fwd", True, 64, 1000, fits=SYNTH)
    assert (inherited.ratio, inherited.preset) == (0.25, "h100") and "h200" in inherited.note
    other_mask = fits.ratio(h100, "flex", "window", "fwd", False, 64, 1000, fits=SYNTH)
    assert other_mask.ratio == 0.6 and "mask" in other_mask.note
    no_mode = fits.ratio(PRESETS["cpu"], "sdpa", None, "fwd_bwd", False, 64, 256, fits=SYNTH)
    assert no_mode.ratio == 1.5 and "mode" in no_mode.note
    fwd_only = _doc(cpu={"ratios": {"sdpa": {"flash": {"fwd": {"full": {"64": [[256, 0.5]]}}}}}})
    assert fits.ratio(PRESETS["cpu"], "sdpa", None, "fwd", False, 64, 256, fits=fwd_only).ratio == 0.5
    unclaimed = fits.ratio(PRESETS["cpu"], "sdpa", None, "fwd_bwd", False, 64, 256, fits=fwd_only)
    assert unclaimed.ratio == 1.0 and "not claimed for fwd_bwd" in unclaimed.note  # another mode: never faster
    none = fits.ratio(PRESETS["cpu"], "flex", None, "fwd", False, 64, 256, fits=SYNTH)
    assert none.ratio == 1.0 and "no flex measurement" in none.note
    with pytest.raises(ValueError, match="attnfuse.*family.*allowed: sdpa, flex"):
        fits.ratio(h100, "flash", None, "fwd", False, 64, 1000, fits=SYNTH)
    with pytest.raises(ValueError, match="attnfuse.*mode.*allowed: fwd, fwd_bwd"):
        fits.ratio(h100, "sdpa", None, "bwd", False, 64, 1000, fits=SYNTH)


@pytest.mark.parametrize("name, preset", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                          ("NVIDIA A100-SXM4-80GB", "a100"), ("cpu", "cpu"),
                                          ("cpu-calibrated", "cpu"), ("NVIDIA L40S", "h100")])
def test_preset_of_a_spec(name, preset):
    assert fits.preset_of(dataclasses.replace(PRESETS["h100"], name=name)) == preset


SHAPE = {"batch": 2, "heads": 8, "kv_heads": 8, "q_len": 1000, "kv_len": 1000, "head_dim": 64, "v_head_dim": 64,
         "elem": 2}


@pytest.fixture
def synthetic(monkeypatch):
    monkeypatch.setattr(fits, "load", lambda: SYNTH)


def test_sdpa_estimate_is_the_dense_flash_launch_times_the_ratio(synthetic):
    spec = PRESETS["h100"]
    _, flash = estimates.flash(SHAPE, spec, structure={}, params={}, causal=False)
    config, est = estimates.sdpa(SHAPE, spec, structure={}, params={}, causal=False)
    assert config == {} and est.time_s == pytest.approx(0.5 * flash.time_s) and est.flops == flash.flops
    _, train = estimates.sdpa({**SHAPE, "training": True}, spec, structure={}, params={}, causal=False)
    assert train.time_s == pytest.approx(0.1 * flash.time_s)
    _, banded = estimates.sdpa(SHAPE, spec, structure={"window": (100, 0), "sdpa_backend": "cudnn"}, params={},
                               causal=False)  # SDPA skips no band tile; cuDNN reuses flash's ratio
    assert banded.time_s == pytest.approx(est.time_s)


def test_flex_estimate_replaces_the_launch_of_its_structure(synthetic):
    spec = PRESETS["h100"]
    _, dense = estimates.flash(SHAPE, spec, structure={}, params={}, causal=False)
    _, flex = estimates.flex(SHAPE, spec, structure={}, params={}, causal=False)
    assert flex.time_s == pytest.approx(0.8 * dense.time_s)
    band = {"window": (127, 0), "causal": True}
    _, win = estimates.window(SHAPE, spec, structure=band, params={}, causal=True)
    _, flex_win = estimates.flex(SHAPE, spec, structure=band, params={}, causal=True)
    assert flex_win.time_s == pytest.approx(0.6 * win.time_s) and flex_win.flops == win.flops
    _, causal = estimates.flash(SHAPE, spec, structure={}, params={}, causal=True)
    docs = {"flex_mask": {"kinds": ("documents",)}, "density": 0.25}
    _, flex_docs = estimates.flex(SHAPE, spec, structure=docs, params={}, causal=True)
    assert flex_docs.time_s == pytest.approx(0.3 * causal.time_s)  # measured: the ratio includes the skipping
    _, train_docs = estimates.flex({**SHAPE, "training": True}, spec, structure=docs, params={}, causal=False)
    assert train_docs.time_s == pytest.approx(dense.time_s)  # fwd_bwd falls back to fwd: not claimed faster


def test_flex_on_unmeasured_documents_skips_the_empty_tiles(monkeypatch):
    spec, shape = PRESETS["h100"], {**SHAPE, "q_len": 8192, "kv_len": 8192}  # long enough that the work dominates
    _, dense = estimates.flash(shape, spec, structure={}, params={}, causal=False)
    docs = {"flex_mask": {"kinds": ("documents",)}, "density": 0.25}
    for doc, ratio in ((_doc(h100={"ratios": {"flex": {"dense": {"fwd": {"full": {"64": [[1000, 0.8]]}}}}}}), 0.8),
                       (_doc(h100={"ratios": {}}), 1.0)):  # measured dense only; nothing measured
        monkeypatch.setattr(fits, "load", lambda doc=doc: doc)
        _, est = estimates.flex(shape, spec, structure=docs, params={}, causal=False)
        assert est.flops == pytest.approx(0.25 * dense.flops)
        assert 0.25 * ratio * dense.time_s < est.time_s < 0.75 * ratio * dense.time_s


def test_the_real_fits_give_positive_estimates_everywhere():
    for name, spec in PRESETS.items():
        for training in (False, True):
            for causal in (False, True):
                shape = {**SHAPE, "training": training, "elem": 4 if name == "cpu" else 2}
                for family in (estimates.sdpa, estimates.flex):
                    _, est = family(shape, spec, structure={}, params={}, causal=causal)
                    assert est.time_s > 0 and math.isfinite(est.time_s)


def _results(tmp_path, name, date, rows, **extra):
    doc = {"benchmark": "gpu_suite", "date": date, "device_tag": "h100", "rows": rows, **extra}
    (tmp_path / name).write_text(json.dumps(doc))


def _row(family, variant, ms, seq=1024, mode="fwd", causal=False, window=None, **kw):
    return {"peer": family, "family": family, "variant": variant, "seq": seq, "batch": 1, "heads": 8, "head_dim": 64,
            "causal": causal, "window": window, "mode": mode, "ms": ms, **kw}


def test_fit_script_ratios(fit_costs, tmp_path):
    _results(tmp_path, "gpu-suite-h100-2026-01-01.json", "2026-01-01", [
        _row("attnfuse", "dense", 2.0), _row("sdpa", "flash", 1.0), _row("sdpa", "cudnn", 3.0),
        _row("flex", "dense", 4.0, error="OOM"),  # a failed row is no point
        _row("attnfuse", "dense", 2.0, mode="bwd"), _row("sdpa", "flash", 1.0, mode="bwd"),  # bwd: not fitted
        _row("attnfuse", "window", 1.0, causal=True, window=64), _row("flex", "window", 2.0, causal=True, window=64),
        _row("attnfuse", "window", 1.0, causal=True, window=256), _row("flex", "window", 8.0, causal=True, window=256),
    ])
    _results(tmp_path, "gpu-suite-h100-2026-02-01.json", "2026-02-01",  # newer: replaces sdpa/flash only
             [_row("attnfuse", "dense", 2.0, seq=4096), _row("sdpa", "flash", 4.0, seq=4096)])
    _results(tmp_path, "gpu-suite-h100-2026-03-01.json", "2026-03-01",  # a dry run is never fitted
             [_row("attnfuse", "dense", 1.0), _row("sdpa", "flash", 100.0)], dry=True)
    doc = fit_costs.build(tmp_path)
    h100 = doc["presets"]["h100"]
    assert h100["ratios"]["sdpa"]["flash"] == {"fwd": {"full": {"64": [[4096, 2.0]]}}}
    assert h100["ratios"]["sdpa"]["cudnn"]["fwd"]["full"]["64"] == [[1024, 1.5]]
    assert h100["ratios"]["flex"] == {"window": {"fwd": {"causal": {"64": [[1024, 4.0]]}}}}  # geomean of 2 and 8
    assert h100["sources"] == ["gpu-suite-h100-2026-01-01.json", "gpu-suite-h100-2026-02-01.json"]
    assert doc["presets"]["a100"] == {"from": "h100", "note": "no a100 measurement in benchmarks/results: h100's "
                                                              "ratios"}
    assert "cpu" not in doc["presets"]
    assert fit_costs.dumps(doc) == fit_costs.dumps(fit_costs.build(tmp_path))  # deterministic


def test_head_dims_without_an_attnfuse_tile_still_get_an_estimate():
    shape, spec = {**SHAPE, "head_dim": 512, "v_head_dim": 512}, PRESETS["a100"]
    with pytest.raises(NoTileFits):
        estimates.flash(shape, spec, structure={}, params={}, causal=True)
    for family in (estimates.sdpa, estimates.flex):
        _, est = family(shape, spec, structure={}, params={}, causal=True)
        assert est.time_s > 0 and est.flops == pytest.approx(2 * 2 * 8 * 1000 * 500.5 * 1024)
