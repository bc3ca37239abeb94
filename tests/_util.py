"""Shared test helpers: the 2x accuracy rule against a float64 reference, the band of a structured mask and a
textbook attention (`ref_attention`) written independently of attnfuse."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import pathlib
import sys

import torch


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isnan(x), torch.isnan(ref)), "NaN pattern differs from the reference"
    return (x[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0


def assert_2x(ours: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, what: str = "output", *,
              magnitude: float | None = None) -> None:
    """DESIGN.md's rule: |ours - ref| <= 2 * |eager - ref| (max-abs over finite entries).

    ``ref`` is the same computation in float64.  A floor of a few ulps of the
    result's magnitude keeps the rule meaningful when eager happens to be
    (nearly) exact.  ``magnitude`` replaces the result's magnitude for a
    reduction whose terms cancel (the sum of its terms' absolute values):
    there a few ulps of the terms is the rounding any summation order makes.
    """
    assert ours.shape == eager.shape == ref.shape, (ours.shape, eager.shape, ref.shape)
    e_ours, e_eager = _err(ours, ref), _err(eager, ref)
    scale = ref[torch.isfinite(ref)].abs().max().item() if torch.isfinite(ref).any() else 1.0
    scale = scale if magnitude is None else max(scale, magnitude)
    floor = 4 * torch.finfo(eager.dtype).eps * max(scale, 1e-3)
    assert e_ours <= 2 * e_eager + floor, f"{what}: error {e_ours:.3g} > 2 x eager error {e_eager:.3g} (+{floor:.2g})"


def site_count(report) -> tuple[int, int]:
    return len(report.fused), len(report.sites)


def band(lq: int, lk: int, left: int = -1, right: int = -1, causal: bool = False) -> torch.Tensor:
    """Dense (lq, lk) bool: key j visible from query i under the structured-mask band (top-left aligned, -1 =
    unbounded, ``causal`` caps right at 0), built independently of every kernel."""
    if causal:
        right = 0 if right < 0 else min(right, 0)
    i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    keep = torch.ones(lq, lk, dtype=torch.bool)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def ref_attention(q, k, v, mask=None, *, scale=None, causal=False, softcap=0.0, kv_groups=1, mask_fill=None):
    """Textbook attention, written independently of attnfuse (materializes the scores)."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = k.repeat_interleave(kv_groups, 1), v.repeat_interleave(kv_groups, 1)
    s = q @ k.transpose(-2, -1) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = torch.where(mask, s, -math.inf if mask_fill is None else mask_fill) if mask.dtype == torch.bool \
            else s + mask
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    return torch.softmax(s, -1) @ v


@contextlib.contextmanager
def script_module(path: pathlib.Path, name: str):
    """A script (``benchmarks/*.py``) imported as module ``name`` for the duration of the block."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)
