"""``python -m attnfuse calibrate``: measure the present device and write a `DeviceSpec` JSON file.

What it measures (each the best of a few timed repetitions after a warm-up):

* main-memory bandwidth: a large tensor copy (read + write bytes over time);
* matmul FLOP/s per dtype: square matmuls (fp16/bf16/fp32/fp64 on CUDA, fp32 TF32 off; fp32/bf16/fp64 on CPU);
* exponentials per second: on CUDA a Triton kernel that chains ``exp2`` in registers (the special-function
  units, not memory); on the CPU ``torch.exp`` over a cache-resident tensor;
* launch overhead: the time of a tiny op.

The structural numbers (SMs, shared memory per block and per SM, L2 size) come from the driver
(`DeviceSpec.detect`); on a CPU, the core count and the L2 size from sysfs.  The result is usable as
``options={"device": "spec.json"}``.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from collections.abc import Callable

import torch

from .device import DeviceSpec


def _best(fn: Callable[[], object], reps: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _cuda_exp_rate(reps: int) -> float:
    import triton
    import triton.language as tl

    @triton.jit
    def _exp_chain(X, Y, N, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        acc = tl.load(X + offs, mask=offs < N, other=0.0)
        for _ in range(ITERS):
            acc = tl.exp2(acc * 0.5 - 1.0)  # stays in (0, 1): no overflow, no denormals
        tl.store(Y + offs, acc, mask=offs < N)

    n, iters = 1 << 24, 256
    x = torch.rand(n, device="cuda")
    y = torch.empty_like(x)
    t = _best(lambda: _exp_chain[(triton.cdiv(n, 1024),)](x, y, n, ITERS=iters, BLOCK=1024), reps,
              torch.cuda.synchronize)
    return n * iters / t


def _cpu_l2_bytes(default: int) -> int:
    try:
        text = pathlib.Path("/sys/devices/system/cpu/cpu0/cache/index2/size").read_text().strip()
        return int(text[:-1]) * 1024 if text.endswith("K") else int(text)
    except (OSError, ValueError):
        return default


def measure(device: str = "auto", quick: bool = False) -> DeviceSpec:
    """Measure ``device`` ("auto": CUDA if present, else "cpu"; or "cuda" / "cpu") and return its spec."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"attnfuse calibrate: device must be 'auto', 'cuda' or 'cpu'; got {device!r}")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise ValueError("attnfuse calibrate: --device cuda, but torch sees no CUDA device")
    reps = 2 if quick else 5
    dev = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base = DeviceSpec.detect() if cuda else dataclasses.replace(DeviceSpec.detect(), name="cpu-calibrated")

    n = (1 << 28 if cuda else 1 << 25) >> (4 if quick else 0)  # fp32 elements: 1 GiB / 128 MiB
    src = torch.rand(n, device=dev)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / _best(lambda: dst.copy_(src), reps, sync)

    rates = {}
    sizes = {"float16": 8192, "bfloat16": 8192, "float32": 8192, "float64": 4096} if cuda else \
        {"float32": 1024, "bfloat16": 512, "float64": 512}
    for name, size in sizes.items():
        size = size // 4 if quick else size
        a = torch.randn(size, size, device=dev).to(getattr(torch, name))
        b = torch.randn(size, size, device=dev).to(getattr(torch, name))
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # the kernels' fp32 dots are IEEE
        try:
            rates[name] = 2.0 * size**3 / _best(lambda a=a, b=b: a @ b, reps, sync)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32

    if cuda:
        exp_rate = _cuda_exp_rate(reps)
    else:
        x = torch.rand(1 << 18)
        out = torch.empty_like(x)
        exp_rate = x.numel() / _best(lambda: torch.exp(x, out=out), reps * 4, sync)
    tiny = torch.ones(1, device=dev)
    launch = _best(lambda: [tiny.add_(0.0) for _ in range(100)], reps, sync) / 100
    l2 = base.l2_bytes if cuda else _cpu_l2_bytes(base.l2_bytes)
    return dataclasses.replace(base, hbm_bytes_per_s=bandwidth, matmul_flops=tuple(sorted(rates.items())),
                               exp_per_s=exp_rate, launch_s=launch, l2_bytes=l2, l2_bytes_per_s=3.0 * bandwidth,
                               sms=base.sms if cuda else max(1, os.cpu_count() or 1))
