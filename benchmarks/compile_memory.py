"""Compile-time memory: peak RSS growth of the first call of a compiled nanoGPT-style model.

    python benchmarks/compile_memory.py [--seqs 8192,32768] [--layers 4] [--out benchmarks/results/...json]
    python benchmarks/compile_memory.py --worker attnfuse|stock --seq N [--mask-dtype float|bool]   # one cell

Two peers, each (peer, seq) in a FRESH process (this script with ``--worker``):

* ``attnfuse`` -- ``torch.compile(model, backend="attnfuse")`` of the model written as nanoGPT's slow path: every
  layer registers its own ``tril(ones(T, T)).view(1, 1, T, T)`` buffer and masks with
  ``att.masked_fill(self.bias[:, :, :T, :T] == 0, float('-inf'))``;
* ``stock``    -- ``torch.compile(model)`` (Inductor) of the same model written with
  ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``, no buffers.

Model: ``--layers`` blocks (LayerNorm, attention, LayerNorm, MLP), n_embd 64, 2 heads, batch 1, inputs are the
(1, T, 64) embeddings; eval mode, one forward at full length under ``torch.no_grad()``, so the model's own
compute is small and what grows is what compiling costs (plus the first call's attention at length T: PyTorch's
flash CPU kernel on both sides).  Buffers: float32 like nanoGPT at 8k (256 MB a layer); bool at 32k, since four
float 32k x 32k buffers are 16 GB on this 24 GB machine (bool: 1 GB a layer; same mask, same spelling).

Each worker gets an empty Inductor cache (``TORCHINDUCTOR_CACHE_DIR``), so both peers compile from scratch, as a
user's first compile does.  Measured: RSS after the model, inputs and ``torch.compile`` wrapper are built
(``rss_before_mb``), and the peak RSS during the first call: VmHWM is reset by writing 5 to /proc/self/clear_refs
(else a thread samples VmRSS every 2 ms); ``growth_mb`` = peak - before.  Phases (peak growth over
``rss_before_mb`` within each, and wall time): dynamo tracing, attnfuse's ``transform`` and the passes inside it,
Inductor's ``compile_fx``, the run.  The goal is attnfuse's growth <= 1.2x stock's at every length (``ratio``).
Results are written to ``--out`` as JSON (default ``benchmarks/results/compile-memory-cpu-<date>.json``).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import pathlib
import platform
import sys
import tempfile
import threading
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # _common, also when loaded by path (tests)
import _common as common  # noqa: E402

GOAL = 1.2


class Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block: int, sdpa: bool, mask_dtype: torch.dtype) -> None:
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd, self.sdpa = n_head, n_embd, sdpa
        if not sdpa:  # nanoGPT's buffer (ones(...).tril() builds it in place: one N x N at a time)
            self.register_buffer("bias", torch.ones(block, block, dtype=mask_dtype).tril_().view(1, 1, block, block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(self.n_embd, dim=2))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, *args: Any) -> None:
        super().__init__()
        n_embd = args[0]
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = Attention(*args)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Peak:
    """Peak RSS (MB) since the last `reset`: the kernel's VmHWM (reset through clear_refs), else a sampling
    thread."""

    def __init__(self) -> None:
        if common.reset_peak_rss(release=False):
            self.method, self._thread = "VmHWM (clear_refs 5)", None
        else:
            self.method, self._max, self._stop = "VmRSS sampled every 2 ms", 0.0, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._max = max(self._max, common.proc_status_mb("VmRSS"))

    def reset(self) -> None:
        if self._thread is None:
            common.reset_peak_rss(release=False)
        else:
            self._max = common.proc_status_mb("VmRSS")

    def read(self) -> float:
        rss = common.proc_status_mb
        return rss("VmHWM") if self._thread is None else max(self._max, rss("VmRSS"))


class Phases:
    """Peak RSS (MB) and wall time per named phase; `wrap` makes a function a phase (nested phases resume their
    parent when they return)."""

    def __init__(self, peak: Peak) -> None:
        self.peak, self.stack, self.mb, self.seconds = peak, ["dynamo"], {}, {}
        self.t = time.perf_counter()

    def switch(self, name: str) -> None:
        now, cur = time.perf_counter(), self.stack[-1]
        self.mb[cur] = max(self.mb.get(cur, 0.0), self.peak.read())
        self.seconds[cur] = self.seconds.get(cur, 0.0) + now - self.t
        self.peak.reset()
        self.stack[-1], self.t = name, now

    def wrap(self, owner: Any, attr: str, name: str, after: str | None = None) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def phase(*args, **kwargs):
            self.switch(self.stack[-1])  # close the caller's stretch so far
            self.stack.append(name)
            self.t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.switch(name)
                self.stack.pop()
                if after is not None:
                    self.stack[-1] = after

        setattr(owner, attr, phase)


def worker(peer: str, seq: int, layers: int, mask_dtype: str) -> dict[str, Any]:
    torch.manual_seed(0)
    mask_dtype = mask_dtype if mask_dtype != "auto" else "float" if seq <= 8192 else "bool"
    dtype = {"float": torch.float32, "bool": torch.bool}[mask_dtype]
    model = nn.Sequential(*(Block(64, 2, seq, peer == "stock", dtype) for _ in range(layers))).eval()
    x = torch.randn(1, seq, 64)
    compiled = torch.compile(model, backend="attnfuse" if peer == "attnfuse" else "inductor")
    import torch._inductor.compile_fx as inductor

    peak = Peak()
    phases = Phases(peak)
    phases.wrap(inductor, "compile_fx", "inductor.compile_fx", after="run")
    if peer == "attnfuse":
        import attnfuse.backend as backend
        from attnfuse.passes import canonicalize, masks, match, rewrite

        phases.wrap(backend, "transform", "attnfuse.transform", after="attnfuse (other)")
        for mod, fn in ((canonicalize, "canonicalize"), (match, "match"), (masks, "analyze"), (rewrite, "rewrite")):
            phases.wrap(mod, fn, f"attnfuse.{fn}")
    gc.collect()
    before = common.proc_status_mb("VmRSS")
    phases.t = time.perf_counter()
    peak.reset()
    with torch.no_grad():
        out = compiled(x)
    phases.switch("end")
    total = max(phases.mb.values())
    assert torch.isfinite(out).all()
    row: dict[str, Any] = {
        "peer": peer, "seq": seq, "layers": layers, "mask_dtype": mask_dtype if peer == "attnfuse" else None,
        "rss_before_mb": round(before, 1), "peak_mb": round(total, 1),
        "growth_mb": round(total - before, 1), "method": peak.method,
        "phases": {k: {"growth_mb": round(mb - before, 1), "seconds": round(phases.seconds[k], 2)}
                   for k, mb in phases.mb.items()},
    }
    if peer == "attnfuse":
        import attnfuse

        report = attnfuse.last_report()
        row["sites"] = [f"{s.status} {s.kernel} {s.mask.get('kind') if s.mask else None}" for s in report.sites]
    return row


def _cell(peer: str, seq: int, layers: int, mask_dtype: str) -> dict[str, Any]:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", peer, "--seq", str(seq),
           "--layers", str(layers), "--mask-dtype", mask_dtype]
    with tempfile.TemporaryDirectory(prefix="compile-memory-") as cache:  # a cold Inductor cache: a first compile
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TORCHINDUCTOR_CACHE_DIR": cache}
        return common.run_worker(cmd, {"peer": peer, "seq": seq}, env=env, tail=20)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", type=common.csv(int), default=[8192, 32768])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--mask-dtype", default="auto", choices=("auto", "float", "bool"),
                   help="the tril buffers' dtype; auto: float (as nanoGPT) up to 8k, bool above")
    p.add_argument("--out", default=None, help="output .json path or folder (default: benchmarks/results, "
                                               "compile-memory-cpu-<date>.json)")
    p.add_argument("--worker", choices=("attnfuse", "stock"))
    p.add_argument("--seq", type=int)
    a = p.parse_args(argv)
    if a.worker:
        common.emit(worker(a.worker, a.seq, a.layers, a.mask_dtype))
        return
    rows, summary = [], {}
    for seq in a.seqs:
        mask_dtype = a.mask_dtype if a.mask_dtype != "auto" else "float" if seq <= 8192 else "bool"
        cells = {peer: _cell(peer, seq, a.layers, mask_dtype) for peer in ("stock", "attnfuse")}
        rows += cells.values()
        ok = all("error" not in c for c in cells.values())
        ratio = cells["attnfuse"]["growth_mb"] / max(cells["stock"]["growth_mb"], 1.0) if ok else None
        summary[str(seq)] = {"attnfuse_growth_mb": cells["attnfuse"].get("growth_mb"),
                             "stock_growth_mb": cells["stock"].get("growth_mb"), "mask_dtype": mask_dtype,
                             "ratio": None if ratio is None else round(ratio, 3),
                             "goal": f"ratio <= {GOAL}", "pass": ratio is not None and ratio <= GOAL}
        print(f"seq {seq} ({mask_dtype} buffers): attnfuse +{cells['attnfuse'].get('growth_mb')} MB, stock "
              f"+{cells['stock'].get('growth_mb')} MB, ratio {summary[str(seq)]['ratio']} "
              f"{'PASS' if summary[str(seq)]['pass'] else 'FAIL'}", flush=True)
        for c in cells.values():
            print("  ", c["peer"], json.dumps(c.get("phases", c.get("error"))), flush=True)
    today = common.today()
    result = {"benchmark": "compile_memory", **common.versions(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
              "date": today, "command": common.command(__file__, argv), "summary": summary, "cells": rows}
    name = f"compile-memory-{common.device_tag('cpu', today)}.json"
    out = common.write_json(common.json_path(a.out or common.RESULTS, name), result, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
