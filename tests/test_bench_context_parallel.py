"""benchmarks/bench_context_parallel.py: its smallest configuration end to end (1 rank and 2 gloo ranks, seq 256,
a subprocess; JSON fields and PNG checked), and its summaries (ratios to 1 rank, the 1/P goal) on synthetic numbers.
No wall-clock assertion: the subprocess timeout only stops a hang."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
CPU_ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def cp():
    spec = importlib.util.spec_from_file_location("bench_context_parallel", BENCH / "bench_context_parallel.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_quick_run_writes_json_and_png(tmp_path, cp):
    cp_kernels = cp.BASELINE_KERNELS
    out = tmp_path / "cp.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_context_parallel.py"), "--quick", "--strategies",
                           "ulysses", "--out", str(out)], capture_output=True, text=True, timeout=600, env=CPU_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "bench_context_parallel" and doc["device"] == "cpu" and doc["setup"]["quick"]
    assert doc["setup"]["args"]["backend"] == "gloo" and doc["setup"]["args"]["seqs"] == [256]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    got = {(r["seq"], r["mode"], r["ranks"], r["strategy"]): r for r in doc["results"]}
    assert set(got) == {(256, "fwd", 1, "none"), (256, "fwd", 2, "ulysses")}
    cores = doc["setup"]["args"]["cores"]
    for (_, _, ranks, strategy), r in got.items():
        assert "error" not in r, r.get("traceback") or r
        assert r["median_s"] > 0 and len(r["times_s"]) == 2 and r["first_call_s"] > 0
        assert r["local_len"] == 256 // ranks and r["threads_per_rank"] == r["threads"] == max(1, cores // ranks)
        assert len(r["alloc_peak_mb_ranks"]) == ranks and r["alloc_peak_mb"] == max(r["alloc_peak_mb_ranks"]) > 0
        # fwd under no_grad retains its output at least: (1, 256 / ranks, 128) fp32
        assert len(r["retained_mb_ranks"]) == ranks and r["retained_mb"] >= 256 // ranks * 128 * 4 / 2**20
        assert len(r["rss_peak_mb_ranks"]) == ranks and r["rss_method"] == "VmHWM reset"
        (site,) = r["sites"]
        assert site["status"] == "fused" and r["kernel"] == site["kernel"]
        if ranks == 1:  # planned with attnfuse's own families only, as a context-parallel site
            assert site["kernel"] in cp_kernels
            assert site["context_parallel"] is None
        else:  # the site really spans the group, with the strategy asked for
            assert site["context_parallel"]["strategy"] == strategy and site["context_parallel"]["ranks"] == 2
    (row,) = doc["ratios"]
    assert row["ranks"] == 2 and row["ideal"] == 0.5 and row["alloc_vs_1"] > 0 and row["time_vs_1"] > 0
    assert row["retained_vs_1"] > 0
    assert [g["goal"].split(":")[0] for g in doc["goals"]] == ["fwd 2 ranks ulysses"]
    assert "ulysses" in proc.stdout and "wrote" in proc.stdout


def _cell(seq, mode, ranks, strategy, alloc, t=1.0, retained=None):
    return {"seq": seq, "mode": mode, "ranks": ranks, "strategy": strategy, "median_s": t, "alloc_peak_mb": alloc,
            "rss_peak_mb": alloc + 1, "retained_mb": alloc / 10 if retained is None else retained}


def test_net_alloc_mb_counts_what_stays_allocated(cp):
    import torch

    mb, kept = cp.net_alloc_mb(lambda: torch.ones(3 * 2**18) + torch.ones(5 * 2**18)[: 3 * 2**18])  # 3 MiB kept
    assert mb == pytest.approx(3.0) and kept.numel() == 3 * 2**18
    mb, kept = cp.net_alloc_mb(lambda: float(torch.ones(2**20).sum()))  # nothing kept
    assert mb == pytest.approx(0.0, abs=0.01)


def test_fwd_bwd_goal_judges_retained_memory(cp):
    # peak does not fall (fixed workspaces), retained does: the fwd_bwd goal reads retained_mb
    results = [_cell(4096, "fwd_bwd", 1, "none", 100.0, retained=40.0),
               _cell(4096, "fwd_bwd", 4, "ring", 100.0, retained=11.0),
               _cell(4096, "fwd_bwd", 4, "ulysses", 20.0, retained=13.0)]
    goals = {g["goal"].split(":")[0]: g for g in cp.goals(cp.ratios(results))}
    assert goals["fwd_bwd 4 ranks ring"]["met"] is True and goals["fwd_bwd 4 ranks ring"]["value"] == 0.275
    assert goals["fwd_bwd 4 ranks ring"]["metric"] == "retained_mb"
    assert goals["fwd_bwd 4 ranks ulysses"]["met"] is False and goals["fwd_bwd 4 ranks ulysses"]["value"] == 0.325


def test_ratios_and_goals(cp):
    results = [_cell(4096, "fwd", 1, "none", 100.0), _cell(4096, "fwd", 2, "ulysses", 55.0, 0.8),
               _cell(4096, "fwd", 2, "ring", 80.0), _cell(16384, "fwd", 1, "none", 400.0),
               _cell(16384, "fwd", 2, "ulysses", 210.0), _cell(16384, "fwd", 2, "ring", 260.0),
               {"seq": 16384, "mode": "fwd_bwd", "ranks": 2, "strategy": "ring", "skipped": "too long"},
               {"seq": 4096, "mode": "fwd_bwd", "ranks": 2, "strategy": "ring", "error": "boom"}]
    rat = {(r["seq"], r["ranks"], r["strategy"]): r for r in cp.ratios(results)}
    assert set(rat) == {(4096, 2, "ulysses"), (4096, 2, "ring"), (16384, 2, "ulysses"), (16384, 2, "ring")}
    assert rat[4096, 2, "ulysses"]["alloc_vs_1"] == pytest.approx(0.55)
    assert rat[4096, 2, "ulysses"]["rss_vs_1"] == pytest.approx(56 / 101)
    assert rat[4096, 2, "ulysses"]["time_vs_1"] == pytest.approx(0.8)
    goals = {g["goal"].split(":")[0]: g for g in cp.goals(list(rat.values()))}
    assert set(goals) == {"fwd 2 ranks ring", "fwd 2 ranks ulysses"}
    # judged at the longest seq: ulysses 210/400 = 0.525 <= 1.25/2, ring 260/400 = 0.65 > 0.625
    assert goals["fwd 2 ranks ulysses"]["met"] is True and goals["fwd 2 ranks ulysses"]["seq"] == 16384
    assert goals["fwd 2 ranks ring"]["met"] is False and goals["fwd 2 ranks ring"]["value"] == 0.65
    text = cp.table(results)
    assert "too long" in text and "boom" in text and "0.525" in text


def test_configs_skip_long_backward_without_spawning(cp):
    args = cp.parse_args(["--seqs", "256,1024", "--ranks", "1", "2", "--modes", "fwd_bwd", "--bwd-seqs", "256",
                          "--cores", "2"])
    keys = cp.configs(args)
    assert [(k["seq"], k["ranks"], k["strategy"], k["threads_per_rank"]) for k in keys] == [
        (256, 1, "none", 2), (256, 2, "ulysses", 1), (256, 2, "ring", 1),
        (1024, 1, "none", 2), (1024, 2, "ulysses", 1), (1024, 2, "ring", 1)]
    r = cp._run(keys[-1], args)  # not in --bwd-seqs: recorded as skipped, nothing started
    assert r["skipped"].startswith("fwd_bwd runs only at seq 256 ") and "median_s" not in r
    args = cp.parse_args(["--seqs", "256,1024", "--ranks", "2", "--ring-max-seq", "256"])
    r = cp._run({"seq": 1024, "mode": "fwd", "ranks": 2, "strategy": "ring", "threads_per_rank": 1}, args)
    assert r["skipped"].startswith("ring runs up to seq 256") and "median_s" not in r


@pytest.mark.parametrize("argv", [["--strategies", "zigzag"], ["--modes", "bwd"], ["--ranks", "3"],
                                  ["--seqs", "1001", "--ranks", "2"], ["--backend", "mpi"],
                                  ["--backend", "nccl", "--heads", "64", "--ranks", "1", "64"]])
def test_bad_arguments(cp, argv):
    with pytest.raises(SystemExit):
        cp.parse_args(argv)


def test_from_json_remakes_summary(cp, tmp_path, capsys):
    doc = {"benchmark": "bench_context_parallel", "date": "2026-12-05", "device": "cpu",
           "setup": {"args": {"backend": "gloo", "batch": 1, "heads": 4, "head_dim": 32, "cores": 2}},
           "results": [_cell(4096, "fwd", 1, "none", 100.0), _cell(4096, "fwd", 4, "ring", 30.0)]}
    src = tmp_path / "context-parallel-cpu-2026-12-05.json"
    src.write_text(json.dumps(doc))
    assert cp.main(["--from-json", str(src)]) == 0
    assert src.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = json.loads(src.read_text())
    assert again["ratios"][0]["alloc_vs_1"] == pytest.approx(0.3) and again["goals"][0]["met"] is True
    assert "PASS" in capsys.readouterr().out
