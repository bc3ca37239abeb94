"""benchmarks/gpu_suite.py --dry: the whole suite end to end on the CPU (tiny shapes), in a subprocess; the JSON
has a row for every section and peer that applies on the CPU, every one timed, numerically checked and without
error (no timing thresholds: a loaded CI machine is several times slower; the subprocess timeout stops a hang).
Plus the suite's pure helpers."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from tests._util import script_module

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"
CPU_ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def suite():
    with script_module(SCRIPT, "gpu_suite") as mod:
        yield mod


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite-dry")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--out", str(out)], capture_output=True, text=True,
                          timeout=900, env=CPU_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = sorted(out.glob("gpu-suite-cpu-*.json"))
    assert len(found) == 1, sorted(p.name for p in out.iterdir())
    assert found[0].with_suffix(".png").stat().st_size > 0
    return json.loads(found[0].read_text()), proc.stdout


def test_dry_run_has_every_section_and_peer_that_runs_on_cpu(dry, suite):
    doc, stdout = dry
    assert doc["benchmark"] == "gpu_suite" and doc["dry"] and doc["device_tag"] == "cpu"
    rows = doc["rows"]
    assert not [r for r in rows if r.get("error")], [r["error"] for r in rows if r.get("error")]
    assert all(r["ms"] > 0 and r["ms_min"] > 0 for r in rows)
    skipped = {(s["section"], s["peer"]) for s in doc["skipped"]}
    for case in suite.cases(doc["setup"], ["dense", "window", "documents"]):
        for peer in suite.PEERS[case["section"]]:
            if peer == "sdpa-cudnn":  # CUDA only: skipped with the reason
                assert ("dense", peer) in skipped
                assert not [r for r in rows if r["peer"] == peer]
                continue
            got = [r for r in rows if r["peer"] == peer and r["label"] == suite.label(case)]
            modes = [r["mode"] for r in got]
            backward = peer != "flex"  # FlexAttention has no backward on the CPU: forward only, said why
            assert modes == (list(suite.MODES) if backward else ["fwd"]), (peer, suite.label(case), modes)
            assert (case["section"], peer) in skipped or backward
            for r in got:  # numerics against SDPA once per configuration
                assert r["max_abs_diff"] < 1e-4, (peer, r["label"], r["max_abs_diff"])
                if backward:
                    assert max(r["grad_max_abs_diff"].values()) < 1e-4, (peer, r["label"], r["grad_max_abs_diff"])
    train = {r["peer"]: r for r in rows if r["section"] == "train"}
    assert set(train) | {p for s, p in skipped if s == "train"} == set(suite.TRAIN_VARIANTS)
    assert {"eager", "inductor", "attnfuse"} <= set(train)
    for variant, r in train.items():
        assert r["loss_abs_diff"] < 1e-4 and r["grad_max_abs_diff"] < 1e-4, variant
        assert r["first_call_s"] > 0 and (r["peak_mb"] is None or r["peak_mb"] > 0)
    kernels = train["attnfuse"]["site_kernels"]  # the model's attention is fused (one site per layer)
    assert len(kernels) == doc["setup"]["train"]["layers"] and not [k for k in kernels if k.startswith("skipped")]
    for s in doc["skipped"]:
        if s["section"] == "train":
            assert "ValueError" in s["reason"]
    assert "wrote" in stdout


def test_documents_and_flop_counts(suite):
    for seq, docs in ((256, 4), (1000, 7)):
        for row in range(3):
            lens = suite.doc_lengths(seq, docs, row)
            assert len(lens) == docs and sum(lens) == seq and min(lens) >= 1
    case = {"section": "documents", "seq": 256, "batch": 2, "heads": 2, "head_dim": 64, "causal": True,
            "window": None, "documents": 4, "dtype": "float32"}
    inp = suite._inputs(case, "cpu")
    assert inp["doc"].shape == (2, 2, 256) and inp["doc"].dtype == torch.int64 and not inp["doc"][:, 1].any()
    assert suite.pairs(case) == inp["keep"].sum().item()
    window = {**case, "section": "window", "documents": None, "window": 64}
    assert suite.pairs(window) == suite._inputs(window, "cpu")["keep"].sum().item() * 2
    dense = {**case, "section": "dense", "documents": None, "causal": False}
    assert suite.flops(dense, "fwd_bwd") == 3.5 * 4 * 2 * 64 * 256 * 256 * 2


def test_no_gpu_exits_cleanly():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sections", "dense"], capture_output=True, text=True,
                          timeout=120, env=CPU_ENV)
    assert proc.returncode == 0 and "needs a CUDA GPU" in proc.stdout
