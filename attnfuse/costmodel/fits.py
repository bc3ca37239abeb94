"""Measured time ratios of PyTorch's attention kernels over attnfuse's own, per device preset: what the cost
model knows of the ``sdpa`` and ``flex`` candidate families without measuring (`attnfuse.costmodel.estimates`).

The data is ``fits.json`` beside this module, written by ``python benchmarks/fit_costs.py`` from the results
committed in ``benchmarks/results/`` (a test checks that the committed file is what the script makes of them):

* ``presets[name]["ratios"][family][variant][mode][causal][head_dim]`` is a list of ``[seq, ratio]`` points,
  ``ratio = time(family) / time(attnfuse)`` on the same inputs and device: ``family`` "sdpa" or "flex";
  ``variant`` an SDPA backend ("flash", "cudnn", ...) or the mask structure Flex ran ("dense", "window",
  "documents"; attnfuse's time is its own kernel on the same structure: the band kernel, or the dense mask a
  packed-documents site runs without Flex); ``mode`` "fwd" (inference forward) or "fwd_bwd" (a training step's
  attention); ``causal`` "causal" | "full"; ``head_dim`` the measured head dim;
* ``presets[name]["from"]`` names the preset whose ratios a preset without measurements reuses, with a
  ``note`` saying so.

`ratio` looks a site up: the preset of the device spec (`preset_of`), the nearest measured head dim (in log2),
and the ratio interpolated linearly in (log seq, log ratio) between the measured lengths, clamped outside them.
A missing variant, mode or causal flag falls back to the nearest thing measured, and the returned `Fit` says so;
another mode's ratio never makes the family faster than attnfuse's kernel (at least 1: a forward measured says
nothing of a backward the family may not even run, e.g. SDPA's CPU kernel declines float32 training).
This module imports only `attnfuse.device`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import math
from collections.abc import Mapping
from typing import Any

from ..device import DeviceSpec

__all__ = ["DEFAULT_VARIANT", "FAMILIES", "Fit", "interpolate", "load", "preset_of", "ratio"]

FAMILIES = ("sdpa", "flex")
DEFAULT_VARIANT = {"sdpa": "flash", "flex": "dense"}  # what a missing variant falls back to
_SAME = {("sdpa", "cpu"): "flash"}  # SDPA's CPU kernel is its flash backend (the benchmarks' name for it)
_GPU_PRESETS = ("h200", "h100", "a100")  # matched in a spec's name, in this order (an "h200" is no "h100")


@dataclasses.dataclass(frozen=True)
class Fit:
    """One looked-up ratio: ``ratio`` (time of the family over attnfuse's), the ``preset`` and ``variant`` whose
    points gave it (variant None: nothing measured, ratio 1), and a ``note`` on every fallback taken (None when
    the site's own row was measured)."""

    ratio: float
    preset: str
    variant: str | None
    note: str | None = None


@functools.cache
def load() -> dict[str, Any]:
    """The fits document (``fits.json``), read once."""
    return json.loads(importlib.resources.files(__package__).joinpath("fits.json").read_text())


def preset_of(spec: DeviceSpec) -> str:
    """The preset whose fits a spec uses: the GPU preset its name contains (``NVIDIA H100 80GB HBM3`` -> h100),
    ``cpu`` for CPU specs (``cpu``, ``cpu-calibrated``), else h100 (an unknown GPU)."""
    name = spec.name.lower()
    for key in _GPU_PRESETS:
        if key in name:
            return key
    return "cpu" if "cpu" in name else "h100"


def _entry(presets: Mapping[str, Any], name: str, notes: list[str]) -> tuple[str, Mapping[str, Any]]:
    """The preset that holds ``name``'s ratios (following ``from`` links) and its entry."""
    seen = set()
    while name in presets and "from" in presets[name] and name not in seen:
        seen.add(name)
        notes.append(presets[name].get("note") or f"{name} reuses {presets[name]['from']}'s ratios")
        name = presets[name]["from"]
    return name, presets.get(name, {})


def _pick(table: Mapping[str, Any], key: str, fallbacks: tuple[str, ...], what: str, notes: list[str]):
    for k in (key, *fallbacks):
        if k in table:
            if k != key:
                notes.append(f"no {what} {key!r} measured: {k!r}'s")
            return k, table[k]
    return None, None


def interpolate(points: list[list[float]], seq: float) -> float:
    """The ratio at ``seq`` between sorted ``[seq, ratio]`` points, linear in (log seq, log ratio), clamped."""
    pts = sorted(points)
    if seq <= pts[0][0]:
        return float(pts[0][1])
    if seq >= pts[-1][0]:
        return float(pts[-1][1])
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= seq <= x1:
            t = (math.log(seq) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return float(pts[-1][1])  # unreachable: the points are sorted


def ratio(spec: DeviceSpec, family: str, variant: str | None, mode: str, causal: bool, head_dim: int,
          seq: int, fits: Mapping[str, Any] | None = None) -> Fit:
    """The fitted time ratio of ``family`` ("sdpa" | "flex") over attnfuse's kernel for one site on ``spec``.

    ``variant``: the SDPA backend or Flex's mask structure (None: `DEFAULT_VARIANT`); ``mode``: "fwd" or
    "fwd_bwd"; ``seq``: the site's key length.  ``fits``: a fits document (default: `load`).  Without any
    measurement for the family the ratio is 1 (the estimate is attnfuse's own) and the note says so."""
    if family not in FAMILIES:
        raise ValueError(f"attnfuse costmodel fits: unknown family {family!r}; allowed: {', '.join(FAMILIES)}")
    if mode not in ("fwd", "fwd_bwd"):
        raise ValueError(f"attnfuse costmodel fits: unknown mode {mode!r}; allowed: fwd, fwd_bwd")
    notes: list[str] = []
    preset, entry = _entry((fits or load())["presets"], preset_of(spec), notes)
    default = DEFAULT_VARIANT[family]
    variant = _SAME.get((family, variant), variant or default)
    by_variant = entry.get("ratios", {}).get(family)
    if not by_variant:
        return Fit(1.0, preset, None, f"no {family} measurement for {preset}: attnfuse's own estimate")
    used, by_mode = _pick(by_variant, variant, (default, *sorted(by_variant)), f"{family} variant", notes)
    used_mode, by_causal = _pick(by_mode, mode, ("fwd_bwd", "fwd"), "mode", notes)
    want = "causal" if causal else "full"
    _, by_dim = _pick(by_causal, want, ("full", "causal"), "mask", notes)
    dims = sorted(by_dim, key=lambda d: (abs(math.log2(int(d)) - math.log2(max(1, head_dim))), int(d)))
    value = interpolate(by_dim[dims[0]], seq)
    if used_mode != mode and value < 1.0:
        notes.append(f"{used_mode}'s ratio {value:.3g} not claimed for {mode}: 1")
        value = 1.0
    return Fit(value, preset, used, "; ".join(notes) or None)
