"""Quickstart: fuse the attention of a small GPT with attnfuse, check it, and measure it.

    python examples/quickstart.py

1. ``attnfuse.audit`` says which attention sites would be fused, and why not;
2. ``torch.compile(model, backend="attnfuse")`` rewrites each into one fused op
   (``torch.ops.attnfuse.attention``); the output must match eager;
3. forward time and peak memory at a long sequence against eager and stock
   ``torch.compile``, each variant in a fresh process (``benchmarks/bench_models.py``).

Takes a few minutes on 2 CPU cores (most of it is Inductor compiling the model twice).
"""

from __future__ import annotations

import pathlib
import sys

import torch

import attnfuse

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "benchmarks")]
from bench_models import measure_in_subprocess  # noqa: E402
from nanogpt import GPT, GPTConfig  # noqa: E402

SEQ = 2048  # where the seq x seq score matrices start to dominate a CPU forward
VARIANTS = {"eager": "eager (as written)", "inductor": "torch.compile (inductor)",
            "attnfuse": "torch.compile (attnfuse)", "sdpa": "SDPA-written, eager"}


def check() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=SEQ)).eval()  # 4 layers, width 256, 4 heads, fp32
    idx = torch.randint(0, model.config.vocab_size, (1, 256))

    print("== 1. audit: what attnfuse would fuse (no kernels compiled)")
    print(attnfuse.audit(model, idx), end="\n\n")

    print("== 2. compile with attnfuse and compare with eager")
    compiled = torch.compile(model, backend="attnfuse")
    with torch.no_grad():
        expected, got = model(idx), compiled(idx)
    report = attnfuse.last_report()
    print(report)
    assert report is not None and report.fused, "attnfuse fused no attention site"
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), "compiled output differs from eager"
    print(f"max |compiled - eager| = {(got - expected).abs().max().item():.2e}  (allclose: ok)\n")


def measure() -> None:
    print(f"== 3. forward at seq {SEQ}, batch 1, fp32, {torch.get_num_threads()} threads "
          "(each variant in a fresh process)")
    results = {}
    for variant in VARIANTS:
        print(f"   measuring {VARIANTS[variant]} ...", flush=True)
        results[variant] = measure_in_subprocess("nanogpt", SEQ, variant, reps=3, warmup=2, mem_reps=2)
    head = ("variant", "forward (median)", "vs eager", "vs inductor", "forward peak", "RSS peak incl. compile")
    rows = [head]
    eager, ind = results["eager"].get("median_s"), results["inductor"].get("median_s")
    for variant, r in results.items():
        if "error" in r:
            rows.append((VARIANTS[variant], r["error"][:70], "", "", "", ""))
            continue
        t = r["median_s"]
        rows.append((VARIANTS[variant], f"{t:.3f} s", f"{t / eager:.2f}x" if eager else "-",
                     f"{t / ind:.2f}x" if ind else "-", f"{r.get('forward_alloc_peak_mb') or 0:.0f} MB",
                     f"{r['peak_delta_mb']:.0f} MB"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        print("   " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print("   forward peak: tensor bytes live at once during one forward after warm-up; RSS peak incl. compile: "
          "process RSS growth from the first call on")
    busy = max((r.get("others_busy_cores", 0.0) for r in results.values()), default=0.0)
    if busy > 0.5:
        print(f"   note: other processes kept ~{busy:.1f} cores busy while timing; times are noisy")


if __name__ == "__main__":
    check()
    measure()
