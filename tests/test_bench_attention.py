"""CPU checks of benchmarks/bench_attention.py: grid (dense and sliding-window), FLOP counts, the window masks,
table, plotting, --from-json, the no-GPU exit."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_attention", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses/pickling look modules up by name
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


# window rows' synthetic times: attnfuse 1 ms, the dense-band SDPA 4 ms, flex 1.2 ms (w=1k) or 2 ms (w=4k)
_WINDOW_MS = {("attnfuse", 1024): 1.0, ("sdpa", 1024): 4.0, ("flex", 1024): 1.2,
              ("attnfuse", 4096): 1.0, ("sdpa", 4096): 4.0, ("flex", 4096): 2.0}


def _fake_rows(bench, windows: str = "") -> list[dict]:
    """Rows as the GPU run writes them: dense rows where attnfuse/sdpa = 1.1 (flex d128 seq 2k fails), and with
    ``windows`` (e.g. "1024,4096") window rows where attnfuse/flex = 1.2 (w=1k) or 2.0 (w=4k)."""
    rows = []
    argv = ["--seqs", "512,1024,2048", "--head-dims", "64,128"] + (["--windows", windows] if windows else [])
    for case in bench.cases(bench.parse_args(argv)):
        for mode in bench.MODES:
            for i, peer in enumerate(bench.PEERS):
                row = {"peer": peer, **case, "label": bench.peer_label(peer, case["window"]), "mode": mode,
                       "flops": bench.flops(case, mode)}
                if peer == "flex" and case["seq"] == 2048 and case["head_dim"] == 128 and case["window"] is None:
                    row["error"] = "OutOfMemoryError: CUDA out of memory"
                else:
                    row["ms"] = 1.0 + 0.1 * i if case["window"] is None else _WINDOW_MS[peer, case["window"]]
                    row["tflops"] = row["flops"] / (row["ms"] * 1e-3) / 1e12
                    row["max_abs_diff"] = 0.0 if peer == "sdpa" else 3.9e-3
                rows.append(row)
    return rows


@pytest.mark.parametrize("argv, plan", [
    (["--seqs", "512,1024", "--reps", "2"], "8 configs x 3 modes x 3 peers (8 dense, 0 sliding-window; "),
    (["--windows", "1024,4096", "--seqs", "8192,16384,32768,65536", "--head-dims", "128", "--no-dense", "--modes",
      "fwd,fwd_bwd"], "8 configs x 2 modes x 3 peers (0 dense, 8 sliding-window; "),
])
def test_cpu_run_exits_cleanly_with_needs_gpu_message(argv, plan):
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    assert lines[0].startswith("bench_attention.py needs a CUDA GPU; ")
    assert plan in lines[0]


def test_bad_arguments_are_rejected(bench):
    for argv in (["--modes", "fwd,sideways"], ["--peers", "xformers"], ["--head-dims", "96"], ["--dtype", "int8"],
                 ["--seqs", "32768"], ["--windows", "1024,0"], ["--no-dense"],
                 ["--windows", "1024", "--seqs", "8192,32768"]):  # dense rows still capped at --tokens
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
        {"seq": 1024, "batch": 16, "heads": 16, "head_dim": 128, "causal": True, "window": None, "dtype": "float16"},
        {"seq": 4096, "batch": 4, "heads": 16, "head_dim": 128, "causal": True, "window": None, "dtype": "float16"},
    ]
    assert args.modes == ["fwd"] and args.peers == ["sdpa", "attnfuse"]


def test_cases_window_only_grid(bench):
    args = bench.parse_args(["--windows", "1024,4096,1024", "--seqs", "8192,16384,32768,65536", "--head-dims", "128",
                             "--no-dense", "--modes", "fwd,fwd_bwd"])
    grid = bench.cases(args)
    assert [(c["window"], c["seq"], c["batch"]) for c in grid] == [
        (1024, 8192, 2), (1024, 16384, 1), (1024, 32768, 1), (1024, 65536, 1),
        (4096, 8192, 2), (4096, 16384, 1), (4096, 32768, 1), (4096, 65536, 1)]
    assert all(c["causal"] and c["heads"] == 16 and c["head_dim"] == 128 for c in grid)
    assert args.windows == [1024, 4096] and args.modes == ["fwd", "fwd_bwd"]


def test_cases_dense_then_window(bench):
    grid = bench.cases(bench.parse_args(["--seqs", "512,2048", "--head-dims", "64,128", "--windows", "256"]))
    assert [(c["head_dim"], c["causal"], c["window"], c["seq"]) for c in grid] == [
        (64, False, None, 512), (64, False, None, 2048), (64, True, None, 512), (64, True, None, 2048),
        (128, False, None, 512), (128, False, None, 2048), (128, True, None, 512), (128, True, None, 2048),
        (64, True, 256, 512), (64, True, 256, 2048), (128, True, 256, 512), (128, True, 256, 2048)]
    # dense and window rows of the same (d, seq) never share a key (ratios/table/plot keep them apart)
    assert len({bench._config_key(c) for c in grid}) == len(grid)


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


def _brute_pairs(seq: int, window: int) -> int:
    return sum(1 for i in range(seq) for j in range(seq) if i - window < j <= i)


@pytest.mark.parametrize("seq", [1, 2, 7, 33, 130])
@pytest.mark.parametrize("window", [1, 3, 7, 32, 129, 300])
def test_window_pairs_match_brute_force(bench, seq, window):
    pairs = bench.window_pairs(seq, window)
    assert pairs == _brute_pairs(seq, window)
    case = {"seq": seq, "batch": 3, "heads": 5, "head_dim": 24, "causal": True, "window": window, "dtype": "bfloat16"}
    for mode, factor in (("fwd", 1.0), ("bwd", 2.5), ("fwd_bwd", 3.5)):
        assert bench.flops(case, mode) == 4 * 3 * 5 * 24 * pairs * factor


def test_window_flops_exact(bench):
    case = {"seq": 65536, "batch": 1, "heads": 16, "head_dim": 128, "causal": True, "window": 4096,
            "dtype": "bfloat16"}
    # 4096 * 4097 / 2 + (65536 - 4096) * 4096 = 260048896 visible pairs
    assert bench.flops(case, "fwd") == 4 * 16 * 128 * 260048896 == 2130320556032
    assert bench.flops(case, "fwd_bwd") == 7456121946112.0
    # a window covering the sequence is exact causal, n(n+1)/2 pairs, not the dense rows' nominal n^2/2
    wide = {**case, "seq": 1000, "window": 4096}
    assert bench.flops(wide, "fwd") == 4 * 16 * 128 * 500500
    assert bench.flops({**wide, "window": None}, "fwd") == 4 * 16 * 128 * 500000


@pytest.mark.parametrize("seq, window", [(1, 1), (9, 1), (37, 5), (37, 36), (37, 37), (20, 50)])
def test_window_masks_agree_with_the_definition(bench, seq, window):
    """The SDPA band mask, the Flex mask_mod and attnfuse's (left, right, causal) all keep i - w < j <= i."""
    i = torch.arange(seq).view(-1, 1)
    j = torch.arange(seq).view(1, -1)
    want = (i - window < j) & (j <= i)
    band = bench.band_mask(seq, window, device="cpu")
    assert band.dtype == torch.bool and torch.equal(band, want)
    assert int(band.sum()) == bench.window_pairs(seq, window)
    assert torch.equal(bench.window_mask_mod(window)(0, 0, i, j), want)
    kw = bench.window_kwargs(window)  # the spec's band rule: j >= i - left and j <= i + right, right = 0 if causal
    left, right = kw["window_size"]
    right = 0 if kw["causal"] and right < 0 else min(right, 0) if kw["causal"] else right
    assert torch.equal((j >= i - left) & (j <= i + right), want)


def test_device_tag(bench):
    assert bench.common.gpu_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert bench.common.gpu_tag("NVIDIA H200") == "h200"
    assert bench.common.gpu_tag("NVIDIA A100-SXM4-80GB") == "a100"
    assert bench.common.gpu_tag("NVIDIA GeForce RTX 4090") == "rtx-4090"


def test_plot_writes_png(bench, tmp_path):
    path = tmp_path / "plot.png"
    bench.plot(_fake_rows(bench), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_plot_panels_with_window_rows(bench, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    seen = {}
    close = plt.close

    def record(fig):
        seen["titles"] = [ax.get_title() for ax in fig.axes]
        seen["legend"] = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
        close(fig)

    monkeypatch.setattr(plt, "close", record)
    path = tmp_path / "plot.png"
    bench.plot(_fake_rows(bench, "1024,4096"), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # 4 dense groups (d x causal) and 4 window groups (d x window), 3 modes each
    assert len(seen["titles"]) == 8 * 3
    assert seen["titles"][:3] == ["d=64, non-causal, fwd", "d=64, non-causal, bwd", "d=64, non-causal, fwd_bwd"]
    assert "d=64, window 1k, fwd" in seen["titles"] and "d=128, window 4k, fwd_bwd" in seen["titles"]
    # peer-major, two legend rows (dense, window): one column per peer
    assert seen["legend"] == ["attnfuse (Triton flash)", "attnfuse (Triton window)", "SDPA flash",
                              "sdpa (dense band mask)", "FlexAttention (compiled)",
                              "FlexAttention (sliding-window BlockMask)"]


def test_ratios_and_table(bench):
    rows = _fake_rows(bench)
    rat = bench.ratios(rows)
    assert len(rat) == 2 * 2 * 3 * 3
    assert all(r["attnfuse_over_sdpa"] == pytest.approx(1.1 / 1.0) for r in rat)
    text = bench.table(rows)
    assert "attnfuse TF/s" in text and "af/sdpa" in text and "1.10" in text
    assert "af/flex" not in text and "window w rows:" not in text
    assert "errors:" in text and "OutOfMemoryError" in text and "flex d128 full seq 2k" in text


def test_ratios_and_table_with_window_rows(bench):
    rows = _fake_rows(bench, "1024,4096")
    rat = bench.ratios(rows)
    dense = [r for r in rat if r["window"] is None]
    window = [r for r in rat if r["window"] is not None]
    assert len(dense) == len(window) == 2 * 2 * 3 * 3
    assert all(r["attnfuse_over_sdpa"] == pytest.approx(1.1) and "attnfuse_over_flex" not in r for r in dense)
    assert all(r["attnfuse_over_flex"] == pytest.approx(1.2 if r["window"] == 1024 else 2.0)
               and "attnfuse_over_sdpa" not in r for r in window)
    lines = bench.table(rows).splitlines()
    head = lines[0].split()
    assert head[:7] == ["d", "causal", "window", "seq", "batch", "heads", "mode"]
    assert "af/sdpa" in lines[0] and "af/flex" in lines[0]
    body = [line.split() for line in lines[1:] if line.split()[0] in ("64", "128")]
    assert len(body) == 2 * (2 + 2) * 3 * 3
    # dense row: window "-", af/sdpa 1.10, af/flex "-"; window row: the reverse.  Columns after the 7 keys:
    # attnfuse/sdpa/flex TF/s, af/sdpa, af/flex, diff attnfuse, diff flex
    d64_full = body[0]
    assert d64_full[:7] == ["64", "no", "-", "512", "32", "32", "fwd"] and d64_full[10:12] == ["1.10", "-"]
    w4k = next(b for b in body if b[2] == "4k" and b[3] == "2k" and b[0] == "128" and b[6] == "fwd_bwd")
    assert w4k[:7] == ["128", "yes", "4k", "2k", "8", "16", "fwd_bwd"] and w4k[10:12] == ["-", "2.00"]
    assert any(line.startswith("window w rows: key j visible from query i iff i - w < j <= i") for line in lines)


def test_table_names_failing_window_rows(bench):
    rows = _fake_rows(bench, "1024")
    for r in rows:
        if r["peer"] == "attnfuse" and r["window"] == 1024 and r["seq"] == 512:
            r.pop("tflops")
            r["error"] = "ModuleNotFoundError: No module named 'attnfuse.kernels.window'"
    text = bench.table(rows)
    assert "attnfuse d64 window 1k seq 512 fwd: ModuleNotFoundError" in text
    assert all(r.get("attnfuse_over_flex") is None for r in bench.ratios(rows) if r["seq"] == 512 and r["window"])


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


def test_from_json_round_trip_with_window_rows(bench, tmp_path, capsys):
    rows = _fake_rows(bench, "1024,4096")
    doc = {"benchmark": "bench_attention", "date": "2026-11-24", "device": "NVIDIA H100 80GB HBM3",
           "torch": "2.11.0", "triton": "3.6.0", "setup": {"dtype": "bfloat16"}, "rows": rows,
           "ratios": bench.ratios(rows)}
    src = tmp_path / "attention-h100-2026-11-24.json"
    src.write_text(json.dumps(doc))
    back = json.loads(src.read_text())
    assert back["ratios"] == bench.ratios(back["rows"])  # window None/int survive JSON as null/int
    assert bench.main(["--from-json", str(src)]) == 0
    assert (tmp_path / "attention-h100-2026-11-24.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "attnfuse/sdpa TFLOP/s: geomean 1.10, min 1.10, max 1.10 over 36 rows" in out
    # half the window rows at 1.2x, half at 2.0x: geomean sqrt(2.4)
    assert "attnfuse/flex TFLOP/s: geomean 1.55, min 1.20, max 2.00 over 36 sliding-window rows; 18 of 36 meet " \
           "the goal (>= 1.5)" in out


def test_from_json_reads_rows_saved_before_windows(bench, tmp_path, capsys):
    rows = _fake_rows(bench)
    for r in rows:
        del r["window"], r["label"]
    src = tmp_path / "old.json"
    src.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "setup": {"dtype": "bfloat16"}, "rows": rows}))
    assert bench.main(["--from-json", str(src), "--out", str(tmp_path / "old.png")]) == 0
    out = capsys.readouterr().out
    assert "attnfuse/sdpa TFLOP/s: geomean 1.10" in out and "attnfuse/flex" not in out
    assert (tmp_path / "old.png").stat().st_size > 10_000
