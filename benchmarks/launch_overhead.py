"""Host + device time per eager `flash.forward` call at a tiny shape (CUDA), and a cProfile of the launch path:
benchmarks/results/host-overhead-h100-2026-11-23.txt."""

import cProfile
import pstats
import time

import torch

from attnfuse.kernels import flash

q = torch.randn(1, 16, 512, 128, device="cuda", dtype=torch.bfloat16)
k, v = q.clone(), q.clone()
for causal in (False, True):
    for _ in range(5):
        flash.forward(q, k, v, causal=causal)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(50):
        flash.forward(q, k, v, causal=causal)
    torch.cuda.synchronize()
    print("causal", causal, "host+device per call ms", (time.perf_counter() - t) / 50 * 1e3)
cProfile.run("for _ in range(50): flash.forward(q, k, v, causal=True)", "/tmp/p")
pstats.Stats("/tmp/p").sort_stats("tottime").print_stats(14)
