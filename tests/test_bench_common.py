"""CPU checks of benchmarks/_common.py (and _measure.py, which it re-exports): the CPU clock of `time_call`, device
tags, result paths, tables, worker processes and the plot."""

from __future__ import annotations

import datetime
import json
import pathlib
import re
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import _common as common  # noqa: E402


def test_time_call_cpu_counts_reps_warmup_and_setup():
    calls = []
    timing = common.time_call(lambda: calls.append("call"), "cpu", reps=4, warmup=2,
                              setup=lambda: calls.append("setup"))
    assert calls == ["setup", "call"] * 6  # 2 warm-up + 4 timed, each after its setup
    assert len(timing.times_s) == 4 and all(t >= 0 for t in timing.times_s)
    assert min(timing.times_s) <= timing.median_s <= max(timing.times_s)
    assert timing.others_busy_cores is not None and timing.others_busy_cores >= 0
    assert len(timing.cpu_times_s) == 4
    bare = common.time_call(lambda: None, "cpu", reps=7, track_load=False)
    assert len(bare.times_s) == len(bare.all_times_s) == 7 and bare.others_busy_cores is None
    assert bare.cpu_times_s == []
    with pytest.raises(ValueError, match="reps"):
        common.time_call(lambda: None, "cpu")


def test_device_tag_and_paths(tmp_path):
    today = datetime.date.today().isoformat()
    assert common.device_tag("cpu") == f"cpu-{today}"
    assert common.device_tag("cpu", "2026-12-05") == "cpu-2026-12-05"
    assert common.gpu_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert common.json_path(tmp_path / "a", "x.json") == tmp_path / "a" / "x.json" and (tmp_path / "a").is_dir()
    assert common.json_path(tmp_path / "b" / "y.json", "x.json") == tmp_path / "b" / "y.json"
    assert common.command("/somewhere/benchmarks/quality.py", ["--quick"]) == "benchmarks/quality.py --quick"
    doc = {"date": today, **common.versions()}
    path = common.write_json(tmp_path / "c" / "d.json", doc)
    assert json.loads(path.read_text()) == doc and path.read_text().endswith("}\n")


def test_table_and_cells():
    text = common.table([("1", "long cell"), ("22", "-")], ("n", "what"))
    assert text.splitlines() == ["n   what", "1   long cell", "22  -"]
    assert common.table([("1", "2")], ("aaa", "b"), align="right").splitlines() == ["aaa  b", "  1  2"]
    assert common.fmt(None) == "-" and common.fmt(2.5, "{:.1f}") == "2.5" and common.fmt(3.4) == "3"
    assert common.seq_label(4096) == "4k" and common.seq_label(1000) == "1000"
    assert common.error_text(ValueError("a\n  b")) == "ValueError: a b" and common.error_text(KeyError()) == "KeyError"


def test_run_worker_result_and_failure():
    ok = common.run_worker([sys.executable, "-c", "import json; print('noise'); print("
                            f"{common.RESULT_MARK!r} + json.dumps({{'x': 1}}))"], {"k": 0}, timeout=60)
    assert ok == {"x": 1}
    bad = common.run_worker([sys.executable, "-c", "raise SystemExit('boom')"], {"k": 0}, timeout=60)
    assert bad["k"] == 0 and re.match(r"worker exited 1: .*boom", bad["error"])


def test_plot_writes_png(tmp_path):
    line = common.Line("a", [(1024, 2.0), (512, 1.0)], "tab:red", "D")
    grid = [[common.Panel([line, common.Line("empty", [])], [512, 1024], title="t", ylabel="y")] * 2]
    for logy, legend in ((True, "axes"), (False, "figure")):
        path = tmp_path / f"{logy}.png"
        common.plot(grid, path, "title", figsize=(6, 3), logy=logy, legend=legend, tick_label=common.seq_label)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _FakeEvent:
    """torch.cuda.Event on the host clock: what `time_call`'s GPU path reads, without a GPU."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.t = None

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: _FakeEvent) -> float:
        return (end.t - self.t) * 1e3


def test_time_call_gpu_path_counts_calls(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    calls = []

    def fn():
        calls.append("call")
        time.sleep(0.002)

    timing = common.time_call(fn, "cuda", reps=5, warmup=2, warmup_ms=0.0, setup=lambda: calls.append("setup"))
    # one untimed call, 3 to estimate the time, >= warmup more, then the timed ones, each after its setup
    assert calls == ["setup", "call"] * (1 + 3 + 2 + 5)
    assert len(timing.times_s) == 5 and all(t >= 0.002 for t in timing.times_s)
    assert timing.others_busy_cores == 0.0 and timing.all_times_s == timing.times_s
    calls.clear()
    by_time = common.time_call(fn, "cuda", warmup_ms=10.0, rep_ms=20.0)  # warm-up and reps sized by time
    assert 1 <= len(by_time.times_s) <= 10 and calls.count("call") >= 1 + 3 + 1 + len(by_time.times_s)
