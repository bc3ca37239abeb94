"""`attnfuse.calibrate`: quick and full mode measure the same quantities; progress goes to stderr only."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading

from attnfuse.calibrate import _QUICK, _best, measure
from attnfuse.device import DeviceSpec

# Quick takes fewer samples of the same measurements, so on a machine shared with other processes the two
# can differ by their noise (up to 1.5x seen with eight busy processes on two cores), never by a different
# regime (before the fix: 20-85x for the matmul rates, 15x for the bandwidth).
AGREE = 3.0


def _rates(spec: DeviceSpec) -> dict[str, float]:
    return {"hbm_bytes_per_s": spec.hbm_bytes_per_s, "exp_per_s": spec.exp_per_s, "launch_s": spec.launch_s,
            **{f"matmul {dtype}": rate for dtype, rate in spec.matmul_flops}}


def test_quick_and_full_measure_the_same_rates(capsys):
    quick, full = measure("cpu", quick=True), measure("cpu", quick=False)
    assert capsys.readouterr() == ("", "")  # stderr is no terminal here: no progress bar
    assert [d for d, _ in quick.matmul_flops] == [d for d, _ in full.matmul_flops] == ["bfloat16", "float32",
                                                                                       "float64"]
    assert (quick.name, quick.sms, quick.l2_bytes) == (full.name, full.sms, full.l2_bytes) == \
        ("cpu-calibrated", os.cpu_count(), full.l2_bytes)
    q, f = _rates(quick), _rates(full)
    off = {k: (q[k], f[k]) for k in q if not 1 / AGREE <= q[k] / f[k] <= AGREE}
    assert not off, f"quick and full calibration disagree by more than {AGREE}x (quick, full): {off}"
    assert full.matmul_flops and min(r for _, r in full.matmul_flops) > 1e8 and full.hbm_bytes_per_s > 1e8
    assert full.l2_bytes_per_s == 3.0 * full.hbm_bytes_per_s


def test_best_leaves_out_the_warm_up():
    calls = []

    def first_calls_slow() -> None:
        calls.append(None)
        if len(calls) <= 2:
            threading.Event().wait(0.05)  # a first-call cost: thread-pool start-up, a compile

    assert _best(first_calls_slow, _QUICK, lambda: None) < 1e-3
    assert len(calls) > 2 + _QUICK.samples  # each sample repeats the (fast) call


def test_cli_progress_goes_to_stderr_and_stdout_is_the_spec_json():
    """stderr is a terminal (a pty), so the tqdm bar is drawn; stdout (a pipe) holds only the JSON."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 0 columns: tqdm draws nothing
    err = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                return
            if not chunk:
                return
            err.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    res = subprocess.run([sys.executable, "-m", "attnfuse", "calibrate", "--quick", "--device", "cpu"],
                         stdout=subprocess.PIPE, stderr=slave, timeout=300)
    os.close(slave)
    reader.join(timeout=10)
    os.close(master)
    assert res.returncode == 0, err.decode(errors="replace")
    spec = DeviceSpec.from_dict(json.loads(res.stdout))
    assert spec.name == "cpu-calibrated" and spec.flops("float32") > 0
    text = err.decode(errors="replace")
    assert "attnfuse calibrate" in text and "memory bandwidth" in text and "launch overhead" in text, text
