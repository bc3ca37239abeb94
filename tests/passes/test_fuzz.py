"""Differential fuzzing (DESIGN.md soundness rules): seeded attention programs and their negatives,
compiled with attnfuse and classified against eager and a float64 copy (see `_fuzz`).

CI runs 300 cases (seeds 0..299, about 3 minutes on 2 cores).  Long mode runs 5,000 with a progress
bar: ``make fuzz-long``, ``ATTNFUSE_FUZZ_LONG=1 pytest -s tests/passes/test_fuzz.py`` or
``python tests/passes/_fuzz.py --long``.  ``ATTNFUSE_FUZZ_CASES`` / ``ATTNFUSE_FUZZ_START`` pick
another range; one failing case replays with ``python tests/passes/_fuzz.py --seed N``.  The summary has a row per
generator family (per variant in long mode): fused / skipped counts, i.e. the matcher's reach on each spelling.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

from _fuzz import FAILURES, fuzz, reproducer, table

LONG = os.environ.get("ATTNFUSE_FUZZ_LONG", "") not in ("", "0")
CASES = int(os.environ.get("ATTNFUSE_FUZZ_CASES", 5000 if LONG else 300))
START = int(os.environ.get("ATTNFUSE_FUZZ_START", 0))
# the inner Inductor costs ~8 s a case on 2 CPU cores: a few in CI, 3% in long mode
INDUCTOR_RATE = float(os.environ.get("ATTNFUSE_FUZZ_INDUCTOR", 0.03 if LONG else 0.01))


def test_fuzz_zero_wrong_crash_or_negative_fused(monkeypatch):
    # dynamo's structured-trace DEBUG records would fill pytest's captured log with thousands of blank lines
    monkeypatch.setattr(logging.getLogger("torch.__trace"), "propagate", False)
    counts, failures, seconds, spellings = fuzz(range(START, START + CASES), inductor_rate=INDUCTOR_RATE,
                                                progress=LONG)
    summary = table(counts, seconds, spellings, variants=LONG)
    print("\n" + summary)
    bad = [f for f in failures if f.cls in FAILURES]
    for f in bad:
        print(reproducer(f))
    # one reproducer per class of failure (its message up to the first number) in the assertion itself
    groups: dict[str, list] = defaultdict(list)
    for f in bad:
        key = f.cls + ": " + f.detail.split(":")[0 if f.cls == "crash" else -1].split(" > ")[0][:60]
        groups[key].append(f)
    first = "\n".join(f"[{len(fs)} x] {key}\n{reproducer(fs[0])}" for key, fs in groups.items())
    assert not bad, f"{summary}\n\none reproducer per failure class (all of them on stdout):\n{first}"
