"""Host + device time per eager `flash.forward` call at a tiny shape (CUDA), and a cProfile of the launch path:
benchmarks/results/host-overhead-h100-2026-11-23.txt."""

import cProfile
import pathlib
import pstats
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # _common, also when loaded by path (tests)
import _common as common  # noqa: E402

from attnfuse.kernels import flash  # noqa: E402

q = torch.randn(1, 16, 512, 128, device="cuda", dtype=torch.bfloat16)
k, v = q.clone(), q.clone()
for causal in (False, True):
    for _ in range(5):
        flash.forward(q, k, v, causal=causal)
    ms = common.per_call_s(lambda: flash.forward(q, k, v, causal=causal), 50) * 1e3
    print("causal", causal, "host+device per call ms", ms)
cProfile.run("for _ in range(50): flash.forward(q, k, v, causal=True)", "/tmp/p")
pstats.Stats("/tmp/p").sort_stats("tottime").print_stats(14)
