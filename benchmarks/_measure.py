"""How the benchmarks measure: `time_call` (one method per clock) and the CPU probes (contention, RSS, allocator
peaks) and `rel_err`.  Scripts reach these through `_common`, which re-exports them.

Timing, one method per clock:

* GPU: CUDA events.  One untimed call (compiles, autotunes), a warm-up of at least ``warmup`` calls and
  ``warmup_ms``, then every timed call between two events, with no synchronisation between calls; ``setup()``
  runs before each call, outside its events.  Chosen over ``triton.testing.do_bench`` because the scripts count
  repetitions (``--reps``, ``--warmup``), keep every sample (median and min), need a setup outside the timed
  region and time SDPA/Flex peers that need no Triton; ``rep_ms`` sizes the repetitions by time as do_bench
  does, where a script asks so (``costmodel_sweep.py --rep-ms``).  No L2 flush between calls (do_bench clears
  a 256 MB buffer): the inputs timed here are mostly larger than the L2 cache, and a training loop does not
  flush either.
* CPU: ``time.perf_counter`` around each call after ``warmup`` untimed ones.  On a shared machine a call during
  which other processes kept ``QUIET`` cores or more busy (``/proc/stat``) is retried (after a 1 s pause) for up
  to ``retry_s`` seconds and the ``reps`` quietest are kept; ``track_load=False`` times bare calls
  (microsecond host overhead, where reading ``/proc`` between calls would disturb them).
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

QUIET = 0.3  # a CPU call counts as uncontended if other processes kept fewer cores than this busy
MIB = 2**20


@dataclass
class Timing:
    """Samples of one timed call, in seconds (see the module docstring)."""

    times_s: list[float]  # the kept samples, in the order taken
    all_times_s: list[float]  # every sample (CPU: the contended ones too)
    cpu_times_s: list[float] = field(default_factory=list)  # process CPU seconds of the kept samples (CPU clock)
    others_busy_cores: float | None = 0.0  # most cores other processes kept busy in a kept sample (None: untracked)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


def time_call(fn: Callable[[], Any], device: Any = "cpu", *, reps: int | None = None, warmup: int = 0,
              setup: Callable[[], Any] | None = None, warmup_ms: float = 25.0, rep_ms: float | None = None,
              retry_s: float = 0.0, track_load: bool = True) -> Timing:
    """Time ``fn()`` on ``device``'s clock: CUDA events on a GPU, ``perf_counter`` on the CPU (module docstring).

    ``reps`` timed calls (GPU: or as many as fit in ``rep_ms``) after ``warmup`` untimed ones (GPU: and at least
    ``warmup_ms``); ``setup()`` runs before every call, outside the timed region.  CPU only: ``retry_s`` and
    ``track_load``."""
    if str(device).startswith("cuda"):
        return _time_cuda(fn, reps, warmup, setup, warmup_ms, rep_ms)
    if reps is None:
        raise ValueError("time_call on the CPU takes reps")
    return _time_cpu(fn, reps, warmup, setup or (lambda: None), retry_s, track_load)


def _time_cuda(fn, reps, warmup, setup, warmup_ms, rep_ms) -> Timing:
    import torch

    def call():
        if setup is not None:
            setup()
        fn()

    call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        call()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(min(max(warmup, math.ceil(warmup_ms / estimate)), 1000)):
        call()
    if reps is None:
        reps = max(1, int((rep_ms or 100.0) / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        if setup is not None:
            setup()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    return Timing(times, list(times))


def _time_cpu(fn, reps, warmup, setup, retry_s, track_load) -> Timing:
    for _ in range(warmup):
        setup()
        fn()
    runs = []  # (wall s, CPU s, cores other processes kept busy) per timed call
    deadline = time.perf_counter() + retry_s
    while True:
        setup()
        if not track_load:
            t0 = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - t0, None, 0.0))
        else:
            snap, c0, t0 = cpu_snapshot(), time.process_time(), time.perf_counter()
            fn()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            runs.append((wall, cpu, others_cores(snap, cpu_snapshot())))
        more = sum(r[2] < QUIET for r in runs) < reps and (len(runs) < reps or time.perf_counter() < deadline)
        if not more:
            break
        if runs[-1][2] >= QUIET and time.perf_counter() < deadline:
            time.sleep(1.0)  # retrying: give the other process a chance to finish
    used = sorted(runs, key=lambda r: r[2])[:reps]  # on a shared CPU: the quietest calls
    return Timing([r[0] for r in used], [r[0] for r in runs], [r[1] for r in used if r[1] is not None],
                  max(r[2] for r in used) if track_load else None)


def per_call_s(fn: Callable[[], Any], calls: int, *, drain: bool = True) -> float:
    """Wall seconds per call of ``calls`` calls queued back to back: with ``drain``, until the GPU has run them all
    (host + device); without, until the host has queued the last (host overhead).  CPU: plain wall time."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    sync()
    return ((time.perf_counter() if drain else t1) - t0) / calls


def cpu_snapshot() -> tuple[float, float, float]:
    """(machine busy CPU-seconds, this process's CPU-seconds, wall seconds) for measuring contention."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = float("nan")
    t = os.times()
    return busy, t.user + t.system, time.perf_counter()


def others_cores(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """CPU cores other processes kept busy between two `cpu_snapshot` calls."""
    return max(((b[0] - a[0]) - (b[1] - a[1])) / (b[2] - a[2]), 0.0)


def wait_for_idle(max_wait: float, busy_cores: float = 0.5, sample: float = 3.0) -> float:
    """Wait (up to ``max_wait`` s) until other processes keep fewer than ``busy_cores`` cores busy; returns the
    busy cores of the last sample.  Each result's ``others_busy_cores`` says how quiet it was while timing."""
    deadline = time.perf_counter() + max_wait
    while True:
        a = cpu_snapshot()
        time.sleep(sample)
        busy = others_cores(a, cpu_snapshot())
        if busy < busy_cores or time.perf_counter() >= deadline:
            return busy


# ---------------------------------------------------------------- CPU memory probes (this process)

def proc_status_mb(key: str) -> float | None:
    """A field of /proc/self/status (VmRSS, VmHWM) in MB, None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss(release: bool = True) -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS through /proc/self/clear_refs; ``release``
    first returns free heap pages (gc, malloc_trim).  False where the mark cannot be reset."""
    if release:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def exact_malloc() -> bool:
    """Make glibc return every freed block of 64 KiB or more to the OS at once, so that RSS follows the live
    tensor bytes instead of malloc's dynamic thresholds (which make a forward's peak vary by tens of MB from run
    to run).  Only for the memory calls: it costs page faults."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 64 * 1024) and libc.mallopt(m_trim_threshold, 64 * 1024))
    except (OSError, AttributeError):
        return False


def alloc_peak_mb(run: Callable[[], Any]) -> float | None:
    """Peak bytes live in PyTorch's CPU allocator during ``run()`` (the profiler's memory events), counted from
    the call's start; None if the profiler does not report them."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:
        return None
    live = top = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        live += nbytes
        top = max(top, live)
    return top / MIB if events else None


# ---------------------------------------------------------------- accuracy

def rel_err(out, ref, dtype=None) -> float:
    """||out - ref||_F / ||ref||_F in ``dtype`` (default: float64 for float64 inputs, else float32)."""
    import torch

    dt = dtype or (torch.float64 if ref.dtype == torch.float64 else torch.float32)
    return float((out.to(dt) - ref.to(dt)).norm() / ref.to(dt).norm().clamp_min(1e-30))
