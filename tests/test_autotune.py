"""Measured selection (`attnfuse.autotune`, ``options={"autotune": ...}``).

The choice logic and the cache run with a FAKE timer (a table of seconds per candidate; it never runs the op), so
the assertions are exact and nothing depends on this machine's speed.  One test measures for real, through the op
on the CPU (attnfuse's own CPU path against SDPA's CPU kernel), and checks only that the times were recorded and
that the faster one was chosen.
"""

from __future__ import annotations

import json
import logging
import math
import os

import pytest
import torch

from attnfuse import autotune
from attnfuse._tunecache import TuneCache, inputs
from attnfuse.config import DEFAULT_AUTOTUNE_CACHE, Config
from attnfuse.costmodel.plan import Plan
from attnfuse.costmodel.tiles import CONFIGS, config_dict, decode, encode
from attnfuse.device import PRESETS
from attnfuse.report import Report, Site

OP_KWARGS = {"scale": None, "causal": True, "softcap": 0.0, "kv_groups": 1, "dropout_p": 0.0, "mask_fill": None,
             "window_left": -1, "window_right": -1, "block_sparse": False, "window_pad": False}
SHAPE = {"batch": 1, "heads": 2, "kv_heads": 2, "q_len": 97, "kv_len": 97, "head_dim": 40, "v_head_dim": 40,
         "elem": 4}
TILES = config_dict(CONFIGS[3], CONFIGS[4])  # the model's (made-up) tile pair


def _row(kernel, est, rejected=None, allowed=True, **extra):
    return {"kernel": kernel, "exact": kernel not in ("topk", "lsh"), "est_time_s": est, "hbm_bytes": 1.0,
            "flops": 1.0, "exp_ops": 1.0, "rejected": rejected, "allowed": allowed, **extra}


def _plan(chosen="flash", table=(), families=("flash", "sdpa", "flex")):
    """A plan as the planner writes it: ``chosen`` won on the estimate; topk (not opted in) and eager not allowed."""
    est = {"flash": 1e-3, "sdpa": 2e-3, "flex": 3e-3}
    rows = [_row(f, est[f], None if f == chosen else f"estimated 2.00x the time of '{chosen}'",
                 **({"backend": "cpu"} if f == "sdpa" else {})) for f in families]
    rows += [_row("topk", None, "approximate kernels need options['approximate'] (opt-in)", allowed=False),
             _row("eager", 9e-3, "attnfuse fuses whenever an allowed kernel applies", allowed=False)]
    rows.sort(key=lambda r: r["kernel"] != chosen)
    config = TILES if chosen == "flash" else {"impl": "sdpa:cpu" if chosen == "sdpa" else "flex"}
    return Plan(chosen, dict(config), rows, [dict(r) for r in table])


def _site(**kw):
    return autotune.Tunable(**{"shape": SHAPE, "dtype": torch.float32, "device": "cpu", "training": False,
                               "op_kwargs": OP_KWARGS, "structure": "causal", **kw})


class FakeTimer:
    """Seconds per trial from ``times`` ({(kernel, impl): s} or a function of the trial); counts its calls."""

    def __init__(self, times):
        self.times, self.calls = times, []

    def __call__(self, trial):
        self.calls.append(trial)
        t = self.times(trial) if callable(self.times) else self.times[(trial.kernel, trial.impl)]
        if isinstance(t, Exception):
            raise t
        return t


SETTINGS = {"cache": False, "reps": 3, "warmup": 0}  # warmup 0: the fake timer is the only caller of a trial


def _by_kernel(plan):
    return {c["kernel"]: c for c in plan.candidates}


# -- the choice ------------------------------------------------------------------------------------------------------

def test_the_fastest_measured_candidate_wins():
    timer = FakeTimer({("flash", ""): 3e-3, ("sdpa", "sdpa:cpu"): 1e-3, ("flex", "flex"): 2e-3})
    tuned = autotune.tune(_plan("flash"), _site(), SETTINGS, timer=timer)
    assert isinstance(tuned, Plan) and tuned.kernel == "sdpa" and tuned.config == {"impl": "sdpa:cpu"}
    assert [c["kernel"] for c in tuned.candidates][:1] == ["sdpa"]
    rows = _by_kernel(tuned)
    assert rows["sdpa"]["rejected"] is None and rows["sdpa"]["measured_s"] == 1e-3
    assert rows["flash"]["rejected"] == "measured 3.00x the time of 'sdpa:cpu'"
    assert rows["flex"]["rejected"] == "measured 2.00x the time of 'sdpa:cpu'"
    assert autotune.impl_of(tuned.candidates[0]) == "sdpa:cpu"
    for kernel in ("topk", "eager"):  # never measured; their reasons stay
        assert rows[kernel]["measured_s"] is None and rows[kernel]["rejected"].startswith(("approximate", "attnfuse"))
    assert all(c["measured"] == "forward" for c in tuned.candidates)
    assert len(timer.calls) == 3 * 3 and {t.training for t in timer.calls} == {False}
    assert tuned.autotune["chosen"] == "sdpa:cpu" and tuned.autotune["model"] == "flash"
    assert tuned.autotune["cache"] == "off" and tuned.autotune["timed"] == 3


def test_the_median_of_the_reps_is_the_time():
    times = iter([5e-3, 1e-3, 2e-3, 9e-3, 9e-3, 9e-3])  # flash: median 2 ms (the mean would be 2.67)
    tuned = autotune.tune(_plan("flash", families=("flash", "sdpa")), _site(), SETTINGS,
                          timer=FakeTimer(lambda trial: next(times)))
    assert _by_kernel(tuned)["flash"]["measured_s"] == 2e-3 and tuned.kernel == "flash"


def test_slow_candidates_stop_early_past_the_budget():
    timer = FakeTimer(lambda trial: 0.75 * autotune.BUDGET_S)
    tuned = autotune.tune(_plan("flash", families=("flash",)), _site(), {**SETTINGS, "reps": 10}, timer=timer)
    assert len(timer.calls) == 2 and tuned.candidates[0]["measured_s"] == 0.75 * autotune.BUDGET_S


@pytest.mark.parametrize("model", ["flash", "sdpa"])
def test_ties_keep_the_models_choice(model):
    tuned = autotune.tune(_plan(model), _site(), SETTINGS, timer=FakeTimer(lambda trial: 1e-3))
    assert tuned.kernel == model and tuned.candidates[0]["kernel"] == model
    assert tuned.candidates[0]["rejected"] is None
    assert all(c["rejected"] == f"measured 1.00x the time of '{'sdpa:cpu' if model == 'sdpa' else model}'"
               for c in tuned.candidates[1:] if c["measured_s"] is not None)


def test_training_sites_time_forward_and_backward():
    timer = FakeTimer(lambda trial: 1e-3 if trial.kernel == "flex" else 2e-3)
    tuned = autotune.tune(_plan("flash"), _site(training=True), SETTINGS, timer=timer)
    assert {t.training for t in timer.calls} == {True} and tuned.kernel == "flex" and tuned.config == {"impl": "flex"}
    assert {c["measured"] for c in tuned.candidates} == {"forward+backward"}
    assert tuned.autotune["measured"] == "forward+backward"


def test_a_failing_candidate_is_reported_not_fatal():
    timer = FakeTimer({("flash", ""): 3e-3, ("sdpa", "sdpa:cpu"): RuntimeError("no kernel for this\nsecond line"),
                       ("flex", "flex"): float("nan")})
    tuned = autotune.tune(_plan("sdpa"), _site(), SETTINGS, timer=timer)
    rows = _by_kernel(tuned)
    assert tuned.kernel == "flash" and rows["flash"]["rejected"] is None
    assert rows["sdpa"]["measured_s"] is None and rows["sdpa"]["measure_error"] == (
        "at 97 keys: RuntimeError: no kernel for this")
    assert rows["sdpa"]["rejected"] == "failed when measured at 97 keys: RuntimeError: no kernel for this"
    assert rows["flex"]["measured_s"] is None and "the timer returned nan" in rows["flex"]["rejected"]
    assert rows["sdpa"]["variants"][0]["error"] == "RuntimeError: no kernel for this"


def test_when_nothing_can_be_measured_the_model_choice_stays():
    tuned = autotune.tune(_plan("flash"), _site(), SETTINGS, timer=FakeTimer(lambda trial: ValueError("nope")))
    assert tuned.kernel == "flash" and tuned.config == TILES and tuned.candidates[0]["rejected"] is None
    assert tuned.candidates[0]["measure_error"] == "at 97 keys: ValueError: nope"
    assert _by_kernel(tuned)["sdpa"]["rejected"].startswith("failed when measured")
    assert "no candidate could be measured" in tuned.autotune["reason"]


def test_an_unfused_plan_is_returned_as_is():
    plan = _plan("flash")
    plan = Plan("eager", {}, [dict(c, allowed=False) for c in plan.candidates])
    timer = FakeTimer(lambda trial: 1.0)
    tuned = autotune.tune(plan, _site(), SETTINGS, timer=timer)
    assert tuned.kernel == "eager" and not timer.calls and tuned.autotune["reason"]


def _table(kernels=("flash", "flash", "flash")):
    bounds = [(0, 256, 128), (256, 1024, 512), (1024, None, 2048)]
    return [{"kv_len": [lo, hi], "kernel": k, "config": TILES if k == "flash" else {}, "planned_at": at,
             "est_time_s": 1e-3} for (lo, hi, at), k in zip(bounds, kernels)]


def test_dynamic_table_rows_are_measured_and_one_family_runs_every_row():
    # sdpa is faster at the two short rows, flash at the long one by more: flash has the least total
    times = {("flash", "", 128): 2.0, ("flash", "", 512): 2.0, ("flash", "", 2048): 5.0,
             ("sdpa", "sdpa:cpu", 128): 1.0, ("sdpa", "sdpa:cpu", 512): 1.0, ("sdpa", "sdpa:cpu", 2048): 9.0}
    timer = FakeTimer(lambda t: times.get((t.kernel, t.impl, t.kv_len), ValueError("not timed")))
    site = _site(shape={**SHAPE, "q_len": 50, "kv_len": 100})
    plan = _plan("sdpa", families=("flash", "sdpa"))
    table = [{**r, "candidates": [dict(c) for c in plan.candidates]} for r in _table()]  # per-row candidates
    tuned = autotune.tune(Plan(plan.kernel, plan.config, plan.candidates, table), site, SETTINGS, timer=timer)
    assert {(t.q_len, t.kv_len) for t in timer.calls} == {(64, 128), (256, 512), (1024, 2048)}  # q scaled as planned
    assert tuned.kernel == "flash" and [r["kernel"] for r in tuned.table] == ["flash"] * 3
    assert [r["measured_s"] for r in tuned.table] == [2.0, 2.0, 5.0]
    rows = _by_kernel(tuned)
    assert rows["flash"]["measured_s"] == 9.0 and rows["sdpa"]["measured_s"] == 11.0  # totals over the rows
    assert rows["sdpa"]["rejected"] == "measured 1.22x the time of 'flash'"
    first = {c["kernel"]: c for c in tuned.table[0]["candidates"]}  # each row's own times, its ratio to flash there
    assert first["flash"]["measured_s"] == 2.0 and first["flash"]["rejected"] is None
    assert first["sdpa"]["measured_s"] == 1.0 and first["sdpa"]["rejected"] == "measured 0.50x the time of 'flash'"
    assert plan.candidates[0]["rejected"] is None and "measured_s" not in plan.candidates[0]  # the input is intact


def test_dynamic_table_with_an_unmeasurable_row_keeps_one_family():
    """A family that fails at one length cannot run the site: the one measured at every row wins."""
    times = {("flash", "", 128): 5.0, ("flash", "", 512): 5.0, ("flash", "", 2048): 5.0,
             ("sdpa", "sdpa:cpu", 128): 1.0, ("sdpa", "sdpa:cpu", 512): 1.0}
    timer = FakeTimer(lambda t: times.get((t.kernel, t.impl, t.kv_len), RuntimeError("too long")))
    tuned = autotune.tune(_plan("flash", _table(), families=("flash", "sdpa")), _site(), SETTINGS, timer=timer)
    assert tuned.kernel == "flash" and {r["kernel"] for r in tuned.table} == {"flash"}
    assert _by_kernel(tuned)["sdpa"]["rejected"] == "failed when measured at 2048 keys: RuntimeError: too long"


def test_own_kernel_tiles_are_chosen_per_row(monkeypatch):
    """Where Triton runs, several tile configs are timed per row; each row keeps its fastest, the family is one."""
    monkeypatch.setattr(autotune, "triton_unsupported", lambda *args: None)  # as if on a GPU: the fake never runs
    seen: dict[int, list[str]] = {}  # key length -> the tiles timed there, in order
    want = {128: 1, 512: 2, 2048: 0}  # the fastest: the second tile timed at 128 keys, the third at 512, the model's

    def seconds(trial):
        if trial.kernel == "sdpa":
            return 1.0 if trial.kv_len == 128 else 50.0
        assert trial.tiles, "a Triton candidate carries its tiles"
        order = seen.setdefault(trial.kv_len, [])
        if trial.tiles not in order:
            order.append(trial.tiles)
        return 2.0 if order.index(trial.tiles) == want[trial.kv_len] else 3.0

    site = _site(spec=PRESETS["h100"], shape={**SHAPE, "head_dim": 64, "v_head_dim": 64})
    tuned = autotune.tune(_plan("flash", _table(), families=("flash", "sdpa")), site, {**SETTINGS, "reps": 1},
                          timer=FakeTimer(seconds))
    assert all(3 <= len(v) <= autotune.TILE_VARIANTS for v in seen.values()), seen
    assert all(decode(v[0], kv, "fwd") == CONFIGS[3] and decode(v[0], kv, "bwd") == CONFIGS[4]
               for kv, v in seen.items())  # the model's tile pair first
    assert tuned.kernel == "flash" and [r["kernel"] for r in tuned.table] == ["flash"] * 3
    for row in tuned.table:
        assert encode([(0, None, row["config"])]) == seen[row["planned_at"]][want[row["planned_at"]]]
        assert row["measured_s"] == 2.0
    assert len({json.dumps(r["config"], sort_keys=True) for r in tuned.table}) == 3
    assert tuned.config == tuned.table[0]["config"]  # the site's example length (97) is in the first row
    assert _by_kernel(tuned)["flash"]["measured_s"] == 6.0 and _by_kernel(tuned)["sdpa"]["measured_s"] == 101.0


def test_a_table_with_approximate_rows_measures_only_attnfuses_kernels():
    table = _table(("flash", "flash", "topk"))
    timer = FakeTimer(lambda t: 1.0 if t.kernel == "sdpa" else 2.0)
    tuned = autotune.tune(_plan("flash", table, families=("flash", "sdpa")), _site(), SETTINGS, timer=timer)
    assert {t.kernel for t in timer.calls} == {"flash"} and {t.kv_len for t in timer.calls} == {128, 512}
    assert [r["kernel"] for r in tuned.table] == ["flash", "flash", "topk"] and tuned.kernel == "flash"


# -- the cache -------------------------------------------------------------------------------------------------------

def _times():
    return FakeTimer({("flash", ""): 3e-3, ("sdpa", "sdpa:cpu"): 1e-3, ("flex", "flex"): RuntimeError("no flex")})


def test_a_cache_hit_skips_the_timer(tmp_path):
    settings = {**SETTINGS, "cache": str(tmp_path / "sub" / "tune.json")}
    first = _times()
    tuned = autotune.tune(_plan(), _site(), settings, timer=first)
    assert len(first.calls) == 3 * 2 + 1 and tuned.autotune["cache"] == "miss"  # flex fails at its first rep
    second = _times()
    again = autotune.tune(_plan(), _site(), settings, timer=second)
    assert not second.calls and again.autotune["cache"] == "hit" and again.autotune["cached"] == 3
    assert again.kernel == tuned.kernel == "sdpa"
    assert [(c["kernel"], c["measured_s"], c["rejected"]) for c in again.candidates] == [
        (c["kernel"], c["measured_s"], c["rejected"]) for c in tuned.candidates]
    assert all(v["cached"] for c in again.candidates for v in c.get("variants", []))
    # the shape class: lengths rounded up to a power of two share the entry; another head dim does not
    near = autotune.tune(_plan(), _site(shape={**SHAPE, "q_len": 100, "kv_len": 128}), settings, timer=second)
    assert not second.calls and near.autotune["cache"] == "hit"
    autotune.tune(_plan(), _site(shape={**SHAPE, "head_dim": 48, "v_head_dim": 48}), settings, timer=second)
    assert len(second.calls) == 7


def test_a_torch_version_change_re_measures_and_drops_stale_entries(tmp_path, monkeypatch):
    path = tmp_path / "tune.json"
    settings = {**SETTINGS, "cache": str(path)}
    autotune.tune(_plan(), _site(), settings, timer=_times())
    data = json.loads(path.read_text())
    other = {"key": {**data["entries"][0]["key"], "device": "some other GPU"}, "value": {"measured_s": 1.0,
                                                                                       "error": None}}
    path.write_text(json.dumps({**data, "entries": [*data["entries"], other]}))
    monkeypatch.setattr(torch, "__version__", "99.0.0")
    timer = _times()
    tuned = autotune.tune(_plan(), _site(), settings, timer=timer)
    assert len(timer.calls) == 7 and tuned.autotune["cache"] == "miss"
    entries = json.loads(path.read_text())["entries"]
    mine = [e for e in entries if e["key"]["device"] != "some other GPU"]
    assert len(mine) == 3 and {e["key"]["torch"] for e in mine} == {"99.0.0"}  # the stale ones are gone
    assert other in entries  # another device's entries stay


def test_a_corrupt_cache_warns_and_re_measures(tmp_path, caplog):
    path = tmp_path / "tune.json"
    path.write_text("{not json")
    timer = _times()
    with caplog.at_level(logging.WARNING, logger="attnfuse"):
        tuned = autotune.tune(_plan(), _site(), {**SETTINGS, "cache": str(path)}, timer=timer)
    assert len(timer.calls) == 7 and tuned.kernel == "sdpa"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("attnfuse")]
    assert len(warnings) == 1 and "unreadable cache" in warnings[0].getMessage()
    assert len(json.loads(path.read_text())["entries"]) == 3  # rewritten whole
    assert not [p for p in tmp_path.iterdir() if p.name != "tune.json"]  # no temporary file left behind


def test_a_disabled_cache_measures_every_time_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    timer = _times()
    for _ in range(2):
        tuned = autotune.tune(_plan(), _site(), SETTINGS, timer=timer)
        assert tuned.autotune["cache"] == "off" and tuned.autotune["path"] is None
    assert len(timer.calls) == 14 and not list(tmp_path.iterdir())


def test_an_in_memory_cache_is_shared_between_sites():
    store, timer = TuneCache(None), _times()
    autotune.tune(_plan(), _site(), SETTINGS, timer=timer, cache=store)
    tuned = autotune.tune(_plan(), _site(), SETTINGS, timer=timer, cache=store)
    assert len(timer.calls) == 7 and tuned.autotune["cache"] == "hit"


# -- inputs ----------------------------------------------------------------------------------------------------------

def test_synthetic_masks_drop_keys_but_never_a_whole_row():
    site = _site(mask=((1, 1, 97, 97), torch.bool), op_kwargs={**OP_KWARGS, "window_left": 2, "window_right": 0},
                 flex_kwargs={"window_left": -1}, flex_doc=True, flex_mask=None)
    for q_len, kv_len in ((97, 97), (64, 200), (200, 64)):
        args, kw = inputs(site, q_len, kv_len, {}, flex=False)
        keep = args[3]
        assert keep.shape == (1, 1, q_len, kv_len) and keep.dtype == torch.bool
        assert 0.8 < keep.float().mean().item() < 0.97
        diagonal = torch.arange(min(q_len, kv_len))
        assert keep[0, 0, diagonal, diagonal].all() and keep[0, 0].any(-1).all() and kw["window_left"] == 2
    args, kw = inputs(site, 97, 97, {}, flex=True)
    doc = args[7]
    assert len(args) == 8 and args[3] is None and kw["window_left"] == -1
    assert doc.shape == (1, 2, 97) and doc.dtype == torch.int64
    assert (doc[0, 0].diff() >= 0).all() and 1 < doc[0, 0].unique().numel() <= 4 and doc[0, 1].sum() > 0
    additive, _ = inputs(_site(mask=((97, 97), torch.float32)), 97, 97, {}, flex=False)
    assert torch.isneginf(additive[3]).any() and torch.isfinite(additive[3]).any(-1).all()


# -- options and the report ------------------------------------------------------------------------------------------

def test_autotune_option(tmp_path, monkeypatch):
    monkeypatch.delenv("ATTNFUSE_AUTOTUNE_CACHE", raising=False)
    assert Config.from_options({}).autotune is None and Config.from_options({"autotune": False}).autotune is None
    default = os.path.expanduser(DEFAULT_AUTOTUNE_CACHE)
    assert Config.from_options({"autotune": True}).autotune == {"cache": default, "reps": 10, "warmup": 2}
    monkeypatch.setenv("ATTNFUSE_AUTOTUNE_CACHE", str(tmp_path / "env.json"))
    assert Config.from_options({"autotune": True}).autotune["cache"] == str(tmp_path / "env.json")
    assert Config.from_options({"autotune": {"cache": False, "reps": 3, "warmup": 0}}).autotune == {
        "cache": False, "reps": 3, "warmup": 0}
    assert Config.from_options({"autotune": {"cache": tmp_path / "x.json"}}).autotune["cache"] == str(
        tmp_path / "x.json")


@pytest.mark.parametrize("value, key, allowed", [
    ("yes", "'autotune'", "False, True, or a dict with optional 'cache'"),
    (1, "'autotune'", "'reps' (int >= 1) and 'warmup' (int >= 0)"),
    ({"reps": 0}, "'autotune.reps'", "an int >= 1"),
    ({"reps": True}, "'autotune.reps'", "an int >= 1"),
    ({"warmup": -1}, "'autotune.warmup'", "an int >= 0"),
    ({"cache": 3}, "'autotune.cache'", "a file path"),
    ({"cache": None}, "'autotune.cache'", "or False for no cache"),
    ({"cache": "DIR"}, "'autotune.cache'", "not a directory"),
    ({"budget": 1}, "'autotune.budget'", "one of the keys cache, reps, warmup"),
])
def test_bad_autotune_options(value, key, allowed, tmp_path):
    value = {"cache": str(tmp_path)} if value == {"cache": "DIR"} else value
    with pytest.raises(ValueError, match=r"^attnfuse option " + key.replace(".", r"\.")) as info:
        Config.from_options({"autotune": value})
    assert allowed in str(info.value)


def test_the_report_records_the_measurement(tmp_path):
    site = Site(0, "m", "f.py:1", "fused", kernel="sdpa", autotune={"cache": "hit", "path": "x", "measured": "forward"})
    report = Report(sites=[site])
    assert "sdpa (measured, cached)" in str(report)
    assert Report.from_json(report.to_json()).sites[0].autotune == site.autotune
    old = json.loads(report.to_json())
    del old["sites"][0]["autotune"]  # a report written before the field existed
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert Report.load(tmp_path / "old.json").sites[0].autotune is None


def test_impl_of():
    assert autotune.impl_of({"kernel": "sdpa", "backend": "efficient"}) == "sdpa:efficient"
    assert autotune.impl_of({"kernel": "flex"}) == "flex"
    assert [autotune.impl_of({"kernel": k}) for k in ("flash", "window", "blocksparse", "topk")] == [""] * 4
    with pytest.raises(ValueError, match="eager"):
        autotune.impl_of({"kernel": "eager"})


# -- a real measurement ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [False, True])
def test_real_measurements_on_the_cpu(training):
    shape = {**SHAPE, "q_len": 64, "kv_len": 64, "head_dim": 32, "v_head_dim": 32}
    site = _site(shape=shape, training=training)
    plan = _plan("flash", families=("flash", "sdpa"))
    tuned = autotune.tune(plan, site, {"cache": False, "reps": 2, "warmup": 1})
    rows = _by_kernel(tuned)
    times = {k: rows[k]["measured_s"] for k in ("flash", "sdpa")}
    assert all(isinstance(t, float) and math.isfinite(t) and t > 0 for t in times.values()), rows
    assert tuned.kernel == min(times, key=lambda k: (times[k], k != "flash"))
    assert tuned.autotune["measured"] == ("forward+backward" if training else "forward")
    assert tuned.autotune["timed"] == 2
