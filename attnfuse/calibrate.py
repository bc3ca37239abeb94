"""``python -m attnfuse calibrate``: measure the present device and write a `DeviceSpec` JSON file.

What it measures:

* main-memory bandwidth: tensor copies (read + write bytes over time) through a buffer at least four
  times the last-level cache (L3 on a CPU, L2 on a GPU) and at least 128 MiB (1 GiB on CUDA), so that they
  stream from DRAM / HBM, not from a cache (see `_bandwidth`);
* matmul FLOP/s per dtype: square matmuls (fp16/bf16/fp32/fp64 on CUDA, fp32 TF32 off; fp32/bf16/fp64 on
  CPU), large enough to run at the asymptotic rate;
* exponentials per second: on CUDA a Triton kernel that chains ``exp2`` in registers (the special-function
  units, not memory); on the CPU ``torch.exp`` over a cache-resident tensor;
* launch overhead: the time of a tiny op.

Every measurement (`_best`) first warms up (the first calls pay for thread-pool start-up, page faults,
library initialisation and, on CUDA, Triton's compile), then takes the best of several timed samples; a
sample repeats the call until it lasts about a millisecond, so that the clock's resolution and the
synchronisation do not count.  The best, not the mean: other processes only ever slow a sample down.
``quick`` and the full mode measure the same things on the same sizes; quick takes fewer samples over a
shorter time (under a second on a CPU, the full mode about three seconds), so it is noisier, never
different in kind.

On a CPU the compute rates (matmul, exp) are measured on one thread and multiplied by torch's intra-op
thread count: a parallel op waits for its slowest thread, so on a machine whose cores other processes
share, every multi-threaded call is as slow as a descheduled thread makes it (tens of times slower, and
differently from run to run), while one thread's best sample is stable; each call lasts a millisecond or
two, shorter than a time slice.  This ignores that a clock may run slower with all cores busy.  The
structural numbers (SMs, shared memory per block and per SM, L2 size) come from the driver
(`DeviceSpec.detect`); on a CPU, the core count and the L2 size from sysfs.  The L2 bandwidth is not
measured: it is taken as three times the main-memory bandwidth.  The result is usable as
``options={"device": "spec.json"}``.  Progress goes to stderr as a tqdm bar (one step per measurement),
shown only where stderr is a terminal unless ``progress`` says otherwise; stdout stays clean.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import pathlib
import time
from collections.abc import Callable, Iterator

import torch
from tqdm import tqdm

from .device import DeviceSpec

__all__ = ["measure"]


@dataclasses.dataclass(frozen=True)
class _Budget:
    """How long `_best` warms up and samples: at least ``samples`` samples and ``seconds`` of sampling."""

    warmup_s: float
    samples: int
    seconds: float
    sample_s: float = 1e-3  # a sample repeats the call until it lasts this long


_QUICK = _Budget(warmup_s=0.02, samples=5, seconds=0.04)
_FULL = _Budget(warmup_s=0.05, samples=20, seconds=0.3)


def _best(fn: Callable[[], object], budget: _Budget, sync: Callable[[], None]) -> float:
    """The shortest time one call of ``fn`` takes, in seconds (see the module docstring)."""
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < budget.warmup_s:
        t0 = time.perf_counter()
        fn()
        sync()
        per_call = time.perf_counter() - t0  # the last warm-up call's: the first ones are slow
        calls += 1
    inner = max(1, math.ceil(budget.sample_s / max(per_call, 1e-9)))
    best, samples, start = math.inf, 0, time.perf_counter()
    while samples < budget.samples or time.perf_counter() - start < budget.seconds:
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / inner)
        samples += 1
    return best


def _cuda_exp_rate(budget: _Budget) -> float:
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
    t = _best(lambda: _exp_chain[(triton.cdiv(n, 1024),)](x, y, n, ITERS=iters, BLOCK=1024), budget,
              torch.cuda.synchronize)
    return n * iters / t


def _cpu_cache_bytes(index: int, default: int) -> int:
    """The size of cache ``index`` of CPU 0 from sysfs (2: L2, 3: L3), or ``default`` where sysfs lacks it."""
    try:
        text = pathlib.Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size").read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        return int(text.rstrip("KMG")) * scale
    except (OSError, ValueError):
        return default


@contextlib.contextmanager
def _one_cpu_thread() -> Iterator[int]:
    """Run the body on one intra-op thread; yields the thread count it restores afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def _bandwidth(dev: str, last_level_cache: int, budget: _Budget, sync: Callable[[], None]) -> float:
    """Copy bandwidth (bytes read + written per second) of a buffer four times the last-level cache.

    On CUDA one call copies the whole buffer.  On a CPU one call copies the next chunk of it (4 MiB per
    thread, a fraction of a millisecond; the chunks cycle through the buffer, so each is evicted before it
    comes round again): a whole-buffer call would last longer than other processes leave a core alone.
    The result is the larger of one thread's and all threads' rate: under load the all-thread copy
    collapses (every parallel region waits for its slowest thread), one thread's is a lower bound.
    """
    floor = 1 << 30 if dev == "cuda" else 1 << 27
    n = max(floor, 4 * last_level_cache) // 4  # fp32 elements
    src = torch.ones(n, device=dev)  # filled, not empty: the first copy must not pay for page faults
    dst = torch.ones(n, device=dev)
    if dev == "cuda":
        return 2 * n * 4 / _best(lambda: dst.copy_(src), budget, sync)

    def rate(threads: int) -> float:
        chunk = min(n, threads << 20)  # 4 MiB of fp32 per thread
        starts = itertools.cycle(range(0, n - chunk + 1, chunk))

        def copy_next() -> None:
            i = next(starts)
            dst[i:i + chunk].copy_(src[i:i + chunk])

        return 2 * chunk * 4 / _best(copy_next, budget, sync)

    with _one_cpu_thread() as threads:
        one = rate(1)
    return max(one, rate(threads)) if threads > 1 else one


def _matmul_rate(dev: str, dtype: str, size: int, budget: _Budget, sync: Callable[[], None]) -> float:
    a = torch.randn(size, size, device=dev).to(getattr(torch, dtype))
    b = torch.randn(size, size, device=dev).to(getattr(torch, dtype))
    if dev == "cpu":
        with _one_cpu_thread() as threads:
            return threads * 2.0 * size**3 / _best(lambda: a @ b, budget, sync)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the kernels' fp32 dots are IEEE
    try:
        return 2.0 * size**3 / _best(lambda: a @ b, budget, sync)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _cpu_exp_rate(budget: _Budget) -> float:
    x = torch.rand(1 << 17)  # 512 KiB in, 512 KiB out: resident in one core's L2
    out = torch.empty_like(x)
    with _one_cpu_thread() as threads:
        return threads * x.numel() / _best(lambda: torch.exp(x, out=out), budget, lambda: None)


def _launch_s(dev: str, budget: _Budget, sync: Callable[[], None]) -> float:
    tiny = torch.ones(1, device=dev)
    return _best(lambda: tiny.add_(0.0), budget, sync)


def measure(device: str = "auto", quick: bool = False, *, progress: bool | None = None) -> DeviceSpec:
    """Measure ``device`` ("auto": CUDA if present, else "cpu"; or "cuda" / "cpu") and return its spec.

    ``quick``: fewer samples of the same measurements (noisier, never different in kind).  ``progress``:
    a tqdm bar on stderr; None shows it only where stderr is a terminal.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"attnfuse calibrate: device must be 'auto', 'cuda' or 'cpu'; got {device!r}")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise ValueError("attnfuse calibrate: --device cuda, but torch sees no CUDA device")
    budget = _QUICK if quick else _FULL
    dev = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base = DeviceSpec.detect() if cuda else dataclasses.replace(DeviceSpec.detect(), name="cpu-calibrated")
    l2 = base.l2_bytes if cuda else _cpu_cache_bytes(2, base.l2_bytes)
    last_level = l2 if cuda else _cpu_cache_bytes(3, l2)

    sizes = {"float16": 8192, "bfloat16": 8192, "float32": 8192, "float64": 4096} if cuda else \
        {"float32": 384, "bfloat16": 384, "float64": 384}
    steps: list[tuple[str, Callable[[], float]]] = [
        ("memory bandwidth", lambda: _bandwidth(dev, last_level, budget, sync)),
        *((f"{name} matmul {size}x{size}", lambda name=name, size=size: _matmul_rate(dev, name, size, budget, sync))
          for name, size in sizes.items()),
        ("exp rate", (lambda: _cuda_exp_rate(budget)) if cuda else (lambda: _cpu_exp_rate(budget))),
        ("launch overhead", lambda: _launch_s(dev, budget, sync)),
    ]
    results: dict[str, float] = {}
    with tqdm(steps, desc="attnfuse calibrate", unit="step", disable=None if progress is None else not progress,
              leave=False) as bar:
        for what, step in bar:
            bar.set_postfix_str(what)
            results[what] = step()
    rates = {name: results[f"{name} matmul {size}x{size}"] for name, size in sizes.items()}
    bandwidth = results["memory bandwidth"]
    return dataclasses.replace(base, hbm_bytes_per_s=bandwidth, matmul_flops=tuple(sorted(rates.items())),
                               exp_per_s=results["exp rate"], launch_s=results["launch overhead"], l2_bytes=l2,
                               l2_bytes_per_s=3.0 * bandwidth, sms=base.sms if cuda else max(1, os.cpu_count() or 1))
