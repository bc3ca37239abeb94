"""CPU checks of benchmarks/bench_attention.py: grid, FLOP counts, plotting, --from-json, the no-GPU exit."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_attention", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses/pickling look modules up by name
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def _fake_rows(bench) -> list[dict]:
    rows = []
    args = bench.parse_args(["--seqs", "512,1024,2048", "--head-dims", "64,128"])
    for case in bench.cases(args):
        for mode in bench.MODES:
            for i, peer in enumerate(bench.PEERS):
                row = {"peer": peer, **case, "mode": mode, "flops": bench.flops(case, mode)}
                if peer == "flex" and case["seq"] == 2048 and case["head_dim"] == 128:
                    row["error"] = "OutOfMemoryError: CUDA out of memory"
                else:
                    row["ms"] = 1.0 + 0.1 * i
                    row["tflops"] = row["flops"] / (row["ms"] * 1e-3) / 1e12
                    row["max_abs_diff"] = 0.0 if peer == "sdpa" else 3.9e-3
                rows.append(row)
    return rows


def test_cpu_run_exits_cleanly_with_needs_gpu_message():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--seqs", "512,1024", "--reps", "2"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    assert lines[0].startswith("bench_attention.py needs a CUDA GPU; ")
    assert "8 configs x 3 modes x 3 peers" in lines[0]


def test_bad_arguments_are_rejected(bench):
    for argv in (["--modes", "fwd,sideways"], ["--peers", "xformers"], ["--head-dims", "96"], ["--dtype", "int8"],
                 ["--seqs", "32768"]):
        with pytest.raises(SystemExit) as info:
            bench.parse_args(argv)
        assert info.value.code == 2


def test_cases_default_grid(bench):
    grid = bench.cases(bench.parse_args([]))
    assert len(grid) == 6 * 2 * 2
    assert {c["seq"] for c in grid} == {512, 1024, 2048, 4096, 8192, 16384}
    assert {c["head_dim"] for c in grid} == {64, 128}
    assert {c["causal"] for c in grid} == {False, True}
    for c in grid:
        assert c["batch"] * c["seq"] == 16384
        assert c["heads"] * c["head_dim"] == 2048
        assert c["dtype"] == "bfloat16"
    assert [(c["batch"], c["seq"]) for c in grid[:6]] == [(32, 512), (16, 1024), (8, 2048), (4, 4096), (2, 8192),
                                                          (1, 16384)]
    assert grid[0]["heads"] == 32 and grid[-1]["heads"] == 16


def test_cases_requested_grid(bench):
    args = bench.parse_args(["--seqs", "1024,4096", "--head-dims", "128", "--causal", "true", "--dtype", "fp16",
                             "--modes", "fwd", "--peers", "sdpa,attnfuse"])
    assert bench.cases(args) == [
        {"seq": 1024, "batch": 16, "heads": 16, "head_dim": 128, "causal": True, "dtype": "float16"},
        {"seq": 4096, "batch": 4, "heads": 16, "head_dim": 128, "causal": True, "dtype": "float16"},
    ]
    assert args.modes == ["fwd"] and args.peers == ["sdpa", "attnfuse"]


def test_flops_exact(bench):
    case = {"seq": 1024, "batch": 16, "heads": 16, "head_dim": 128, "causal": False, "dtype": "bfloat16"}
    assert bench.flops(case, "fwd") == 4 * 16 * 16 * 1024 * 1024 * 128 == 137438953472
    assert bench.flops(case, "bwd") == 343597383680.0
    assert bench.flops(case, "fwd_bwd") == 481036337152.0
    causal = {**case, "causal": True}
    assert bench.flops(causal, "fwd") == 68719476736.0
    assert bench.flops(causal, "bwd") == 171798691840.0
    assert bench.flops(causal, "fwd_bwd") == 240518168576.0
    # same element count everywhere: every non-causal forward of the default grid is 2**37 * seq / 1024 FLOPs
    for c in bench.cases(bench.parse_args(["--causal", "false"])):
        assert bench.flops(c, "fwd") == 137438953472 * c["seq"] / 1024


def test_device_tag(bench):
    assert bench.device_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert bench.device_tag("NVIDIA H200") == "h200"
    assert bench.device_tag("NVIDIA A100-SXM4-80GB") == "a100"
    assert bench.device_tag("NVIDIA GeForce RTX 4090") == "rtx-4090"


def test_plot_writes_png(bench, tmp_path):
    path = tmp_path / "plot.png"
    bench.plot(_fake_rows(bench), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_ratios_and_table(bench):
    rows = _fake_rows(bench)
    rat = bench.ratios(rows)
    assert len(rat) == 2 * 2 * 3 * 3
    assert all(r["attnfuse_over_sdpa"] == pytest.approx(1.1 / 1.0) for r in rat)
    text = bench.table(rows)
    assert "attnfuse TF/s" in text and "af/sdpa" in text and "1.10" in text
    assert "errors:" in text and "OutOfMemoryError" in text


def test_from_json_replots(bench, tmp_path, capsys):
    doc = {"benchmark": "bench_attention", "date": "2026-11-23", "device": "NVIDIA H100 80GB HBM3",
           "torch": "2.9.0", "triton": "3.5.0", "setup": {"dtype": "bfloat16"}, "rows": _fake_rows(bench)}
    src = tmp_path / "attention-h100-2026-11-23.json"
    src.write_text(json.dumps(doc))
    assert bench.main(["--from-json", str(src)]) == 0
    assert (tmp_path / "attention-h100-2026-11-23.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "attnfuse/sdpa TFLOP/s: geomean 1.10" in out
    assert "wrote" in out
    other = tmp_path / "sub" / "replot.png"
    assert bench.main(["--from-json", str(src), "--out", str(other)]) == 0
    assert other.exists()
