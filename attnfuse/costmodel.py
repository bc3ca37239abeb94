"""Device description and the cost of each kernel candidate for one site.

This is the first cut of the cost model: a roofline estimate (max of compute
time and HBM time) for the exact fused kernel and for the unfused eager graph
it replaces, plus the flash kernel's tile choice, which `attnfuse.kernels.flash`
makes from the device's shared memory and SM count (its `keep` and `pick`).
Approximate families and their calibration come with the cost-model issue;
until then they are listed as candidates with the reason they were not chosen.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """What the cost model knows about a device."""

    name: str
    sram_per_sm: int  # bytes of shared memory a block may use
    sms: int
    l2_bytes: int
    hbm_bytes_per_s: float
    flops: float  # dense fp16/bf16 matmul FLOP/s (fp32 on CPU)

    @staticmethod
    def detect() -> DeviceSpec:
        """The spec of the current CUDA device, or the generic CPU spec."""
        if torch.cuda.is_available():
            major, _ = torch.cuda.get_device_capability()
            name = torch.cuda.get_device_name().lower()
            if "h200" in name:
                return PRESETS["h200"]
            if major >= 9:
                return PRESETS["h100"]
            return PRESETS["a100"]
        return PRESETS["cpu"]


PRESETS: dict[str, DeviceSpec] = {
    "h100": DeviceSpec("h100", 227 * 1024, 132, 50 * 2**20, 3.35e12, 989e12),
    "h200": DeviceSpec("h200", 227 * 1024, 132, 50 * 2**20, 4.8e12, 989e12),
    "a100": DeviceSpec("a100", 163 * 1024, 108, 40 * 2**20, 2.0e12, 312e12),
    "cpu": DeviceSpec("cpu", 1 * 2**20, 1, 32 * 2**20, 20e9, 100e9),
}

@dataclasses.dataclass(frozen=True)
class Plan:
    kernel: str
    config: dict[str, int]
    candidates: list[dict[str, Any]]


def _estimate(flops: float, nbytes: float, device: DeviceSpec) -> float:
    return max(flops / device.flops, nbytes / device.hbm_bytes_per_s)


def visible_keys(q_len: int, kv_len: int, left: int, right: int, causal: bool) -> float:
    """The mean number of keys a query row sees under a band (``-1`` = unbounded side), top-left aligned."""
    if causal:
        right = 0 if right < 0 else min(right, 0)
    i = torch.arange(q_len, dtype=torch.float64)
    lo = torch.zeros_like(i) if left < 0 else (i - left).clamp(min=0)
    hi = torch.full_like(i, kv_len - 1) if right < 0 else (i + right).clamp(max=kv_len - 1)
    return float((hi - lo + 1).clamp(min=0).mean()) if q_len else 0.0


def plan(shape: dict[str, Any], device: DeviceSpec, kernels: tuple[str, ...], exact_only: bool = True,
         structure: dict[str, Any] | None = None) -> Plan:
    """Pick the kernel for one site.

    ``shape`` has ``batch, heads, kv_heads, q_len, kv_len, head_dim, v_head_dim, elem``
    (sizes as ints, their example values when the graph is dynamic).  ``structure`` is what the
    mask analysis proved and the op will be told: ``window`` ``(left, right)``, ``causal``,
    ``block_sparse`` with ``density`` (the fraction of tiles that are not empty).
    """
    structure = structure or {}
    b, h, hk = shape["batch"], shape["heads"], shape["kv_heads"]
    lq, lk, d, dv, elem = shape["q_len"], shape["kv_len"], shape["head_dim"], shape["v_head_dim"], shape["elem"]
    flops = 2.0 * b * h * lq * lk * (d + dv)
    io = (b * h * lq * (d + dv) + b * hk * lk * (d + dv)) * elem
    scores = b * h * lq * lk * 4.0
    fused = {
        "kernel": "flash",
        "exact": True,
        "est_time_s": _estimate(flops, io, device),
        "hbm_bytes": io,
        "rejected": None,
    }
    # The unfused graph writes and reads the score matrix several times
    # (matmul out, scale, mask, softmax in/out, second matmul in).
    eager_bytes = io + 6 * scores
    eager = {
        "kernel": "eager",
        "exact": True,
        "est_time_s": _estimate(flops, eager_bytes, device),
        "hbm_bytes": eager_bytes,
        "rejected": f"materializes {scores / 2**20:.1f} MiB of scores",
    }
    candidates = [fused, eager]
    chosen = "flash"
    window = structure.get("window")
    if window is not None:
        seen = visible_keys(lq, lk, window[0], window[1], structure.get("causal", False))
        est = _estimate(flops * seen / max(1, lk), io, device)
        candidates.append({"kernel": "window", "exact": True, "est_time_s": est, "hbm_bytes": io,
                           "visible_keys": round(seen, 1), "rejected": None})
        fused["rejected"] = "the window kernel skips the tiles outside the band"
        chosen = "window"
    else:
        candidates.append({"kernel": "window", "exact": True, "est_time_s": None, "hbm_bytes": None,
                           "rejected": "needs a proven band (window/causal) and no key padding"})
    if structure.get("block_sparse"):
        density = structure.get("density", 1.0)
        candidates.append({"kernel": "blocksparse", "exact": True, "est_time_s": _estimate(flops * density, io, device),
                           "hbm_bytes": io, "density": density, "rejected": None})
        fused["rejected"] = "the block-sparse kernel skips the constant mask's empty tiles"
        chosen = "blocksparse"
    else:
        candidates.append({"kernel": "blocksparse", "exact": True, "est_time_s": None, "hbm_bytes": None,
                           "rejected": "needs a constant mask with empty tiles"})
    for family in ("topk", "lsh"):
        why = "approximate kernels need approximate=... (opt-in)" if exact_only else "not calibrated yet"
        candidates.append({"kernel": family, "exact": False, "est_time_s": None, "hbm_bytes": None,
                           "rejected": why})
    if chosen not in kernels:
        reason = f"'{chosen}' is not in options['kernels']"
        fused["rejected"] = fused["rejected"] or reason
        for c in candidates:
            if c["kernel"] == chosen:
                c["rejected"] = reason
        return Plan("eager", {}, candidates)
    return Plan(chosen, flash_config(shape, device), candidates)


def flash_config(shape: dict[str, Any], device: DeviceSpec) -> dict[str, int]:
    """The forward tile config the flash launcher picks for this shape on ``device`` (its `pick`)."""
    from .kernels import flash  # imports Triton; the launcher imports this module

    groups = shape["heads"] // shape["kv_heads"]
    cfg = flash.pick("fwd", shape["q_len"] * groups, shape["kv_len"], shape["batch"] * shape["kv_heads"],
                     shape["head_dim"], shape["v_head_dim"], shape["elem"], device)
    return {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
