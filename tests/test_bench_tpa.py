"""benchmarks/bench_tpa.py: its --quick run end to end (a subprocess on the CPU, six fresh worker processes; JSON
fields, every arm's numbers, the attnfuse arm's report, the PNG), and its summaries (ratios to the model as written,
the two goals) on synthetic numbers.  No wall-clock assertion: the subprocess timeout only stops a hang."""

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
ARMS = ("as_written", "attnfuse", "mha_cache")


@pytest.fixture(scope="module")
def tpa():
    spec = importlib.util.spec_from_file_location("bench_tpa", BENCH / "bench_tpa.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_quick_run_writes_json_and_png(tmp_path):
    out = tmp_path / "tpa.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_tpa.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=CPU_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "bench_tpa" and doc["device"] == "cpu" and doc["setup"]["quick"]
    a = doc["setup"]["args"]
    assert a["device"] == "cpu" and a["prefill_seqs"] == [128] and a["decode_ctxs"] == [256] and a["threads"] == 1
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    got = {(r["arm"], r["phase"], r["length"]): r for r in doc["results"]}
    assert set(got) == {(arm, phase, n) for arm in ARMS for phase, n in (("prefill", 128), ("decode", 256))}
    tpa_numbers = 2 * a["rank"] * (a["heads"] + a["head_dim"])
    for (arm, phase, _), r in got.items():
        assert "error" not in r, r
        assert r["median_s"] > 0 and r["first_call_s"] > 0 and r["alloc_peak_mb"] > 0 and r["threads"] == 1
        assert len(r["times_s"]) == (a["reps"] if phase == "prefill" else a["steps"])
        per_token = 2 * a["heads"] * a["head_dim"] if arm == "mha_cache" else tpa_numbers
        assert r["cache_numel_per_token_layer"] == per_token
        if phase == "decode":  # the random cache, and the steps that grew it
            assert r["cache_mb"] == pytest.approx(a["layers"] * a["batch"] * 256 * per_token * 4 / 2**20)
            assert r["context_end"] == 256 + 1 + a["decode_warmup"] + a["steps"] + 2  # + the two memory calls
        if arm == "attnfuse":  # what attnfuse did, and that it computed what eager computes
            assert r["rel_err_vs_eager"] < 1e-5
            assert len(r["sites"]) == a["layers"] and all(s["status"] in ("fused", "skipped") for s in r["sites"])
            assert r["kernels"] == sorted({s["kernel"] for s in r["sites"] if s["kernel"]})
            assert r["tpa_kernel"] == ("tpa" in r["kernels"])
        else:
            assert "sites" not in r and "rel_err_vs_eager" not in r
    rat = {(r["arm"], r["phase"]): r for r in doc["ratios"]}
    assert set(rat) == {(arm, phase) for arm in ARMS[1:] for phase in ("prefill", "decode")}
    assert all(r["speedup_vs_as_written"] > 0 and r["memory_vs_as_written"] > 0 for r in rat.values())
    assert [g["met"] for g in doc["goals"]] == [None, None]  # the goals are at 4k-32k
    assert "goal cpu: attnfuse decode per token at 32k >= 3x faster than as_written: not measured" in proc.stdout
    assert "wrote" in proc.stdout


def _cell(arm, phase, length, s, mb=10.0):
    return {"arm": arm, "phase": phase, "length": length, "median_s": s, "alloc_peak_mb": mb}


def test_ratios_and_goals(tpa):
    results = [_cell("as_written", "decode", 32768, 0.9, 100.0), _cell("attnfuse", "decode", 32768, 0.25, 20.0),
               _cell("mha_cache", "decode", 32768, 0.3), _cell("as_written", "prefill", 4096, 1.0),
               _cell("attnfuse", "prefill", 4096, 0.8), _cell("as_written", "prefill", 16384, 10.0),
               _cell("attnfuse", "prefill", 16384, 9.0),
               {"arm": "mha_cache", "phase": "prefill", "length": 4096, "error": "worker exited 1"}]
    rat = {(r["arm"], r["phase"], r["length"]): r for r in tpa.ratios(results)}
    assert set(rat) == {("attnfuse", "decode", 32768), ("mha_cache", "decode", 32768),
                        ("attnfuse", "prefill", 4096), ("attnfuse", "prefill", 16384)}
    assert rat["attnfuse", "decode", 32768]["speedup_vs_as_written"] == pytest.approx(3.6)
    assert rat["attnfuse", "decode", 32768]["memory_vs_as_written"] == pytest.approx(0.2)
    decode, prefill = tpa.goals(list(rat.values()), "cpu")
    assert decode["met"] is True and decode["value"] == 3.6 and "at 32k >= 3x" in decode["goal"]
    assert prefill["met"] is True and prefill["value"] == 1.11 and prefill["lengths"] == [4096, 16384]
    slow = [{**r, "median_s": 0.35} if (r["arm"], r["phase"]) == ("attnfuse", "decode") else
            {**r, "median_s": 10.5} if (r["arm"], r["length"]) == ("attnfuse", 16384) else r for r in results]
    decode, prefill = tpa.goals(tpa.ratios(slow), "cpu")
    assert decode["met"] is False and decode["value"] == pytest.approx(2.57)
    assert prefill["met"] is False and prefill["value"] == pytest.approx(0.95)  # the slower of the two lengths
    text = tpa.table(results)
    assert "worker exited 1" in text and "3.60" in text


def test_from_json_remakes_summary(tpa, tmp_path, capsys):
    doc = {"benchmark": "bench_tpa", "date": "2026-12-06", "device": "cpu",
           "setup": {"args": {"device": "cpu", "layers": 2, "dim": 512, "heads": 8, "head_dim": 64, "q_rank": 6,
                              "rank": 2, "dtype": "float32"}},
           "results": [_cell("as_written", "decode", 32768, 0.9), _cell("attnfuse", "decode", 32768, 0.2)]}
    src = tmp_path / "tpa-cpu-2026-12-06.json"
    src.write_text(json.dumps(doc))
    assert tpa.main(["--from-json", str(src)]) == 0
    assert src.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = json.loads(src.read_text())
    assert again["goals"][0]["met"] is True and again["goals"][1]["met"] is None
    assert "PASS (4.5x)" in capsys.readouterr().out


def test_configs_order(tpa):
    args = tpa.parse_args(["--device", "cpu", "--arms", "attnfuse,as_written", "--prefill-seqs", "64",
                           "--decode-ctxs", "128,256"])
    assert tpa.configs(args) == [("as_written", "prefill", 64), ("attnfuse", "prefill", 64),
                                 ("as_written", "decode", 128), ("attnfuse", "decode", 128),
                                 ("as_written", "decode", 256), ("attnfuse", "decode", 256)]
    assert args.dtype == "float32" and args.inner == "inductor" and args.heads == 8 and args.rank == 2


@pytest.mark.parametrize("argv", [["--arms", "flash"], ["--phases", "train"], ["--spelling", "loop"],
                                  ["--inner", "aot"], ["--dtype", "int8"], ["--head-dim", "63"]])
def test_bad_arguments(tpa, argv):
    with pytest.raises(SystemExit):
        tpa.parse_args(["--device", "cpu", *argv])
