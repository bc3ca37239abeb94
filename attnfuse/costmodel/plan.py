"""The cost model: the estimated cost of every kernel candidate for one attention site, and the plan.

`plan(shape, spec, kernels, ...)` lists every family -- ``flash`` (exact, dense), ``window`` and
``blocksparse`` (exact, skipping the tiles a proven mask removes), ``topk`` and ``lsh`` (approximate, opt-in),
and the unfused ``eager`` graph -- each with an `Estimate` (FLOPs, HBM bytes, exponentials, time) or the reason
it cannot run the site, and chooses the cheapest one allowed.  The tile-level model is `attnfuse.costmodel.tiles`
(`tiles.estimate`): its tiles are enumerated from the spec's shared memory (`tiles.keep`)
and its time is a roofline (max of matmul, exponential and memory time, IO-aware K/V re-reads), stretched by
wave quantization over the SMs, plus the launch overhead.  The approximate families add their own selection
work (top-k's indexer, LSH's hashing, sorting and gathers) to the exact work over what they keep.

When the site's sequence lengths are dynamic, the plan is a table keyed by key-length ranges (`Plan.table`);
the op consults it on every call (`attnfuse.ops`), so a new length never recompiles.

`DeviceSpec` and its presets live in `attnfuse.device` (re-exported here).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..device import PRESETS, DeviceSpec
from . import tiles
from .tiles import Estimate

__all__ = ["PRESETS", "DeviceSpec", "Estimate", "Plan", "estimate_family", "plan", "visible_keys"]

EXACT = ("flash", "window", "blocksparse")
APPROXIMATE = ("topk", "lsh")
TOPK_DEFAULTS = {"topk": 2048, "block": 64, "sink": 64, "local": 256}
LSH_DEFAULTS = {"n_hashes": 4, "bucket_size": 64, "seed": 0}
# key-length ranges of a dynamic plan's table: [lo, hi), each planned at its geometric middle
_RANGES = (0, 256, 1024, 4096, 16384, 65536)
_LAST_REP = 131072


@dataclasses.dataclass(frozen=True)
class Plan:
    """The chosen ``kernel`` ("eager": not fused), its tile ``config``, every candidate, and for dynamic lengths
    the ``table`` of (key-length range -> kernel) rows the op consults per call."""

    kernel: str
    config: dict[str, int]
    candidates: list[dict[str, Any]]
    table: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def op_table(self, params: Mapping[str, Any] | None = None) -> str:
        """The op's ``approx`` argument: "" when every length runs the exact kernel the graph was rewritten for,
        else JSON ``{"table": [[lo, hi, "exact" | "topk" | "lsh"], ...], "params": {...}}`` (hi -1: unbounded)."""
        rows = self.table or [{"kv_len": [0, None], "kernel": self.kernel}]
        kinds = [r["kernel"] if r["kernel"] in APPROXIMATE else "exact" for r in rows]
        if all(k == "exact" for k in kinds):
            return ""
        table = [[r["kv_len"][0], -1 if r["kv_len"][1] is None else r["kv_len"][1], k] for r, k in zip(rows, kinds)]
        return json.dumps({"table": table, "params": dict(params or {})}, sort_keys=True)


def visible_keys(q_len: int, kv_len: int, left: int, right: int, causal: bool) -> float:
    """The mean number of keys a query row sees under a band (``-1`` = unbounded side), top-left aligned."""
    if q_len <= 0:
        return 0.0
    if causal:
        right = 0 if right < 0 else min(right, 0)
    i = torch.arange(q_len, dtype=torch.float64)
    lo = torch.zeros_like(i) if left < 0 else (i - left).clamp(min=0)
    hi = torch.full_like(i, kv_len - 1) if right < 0 else (i + right).clamp(max=kv_len - 1)
    return float((hi - lo + 1).clamp(min=0).mean())


def _dims(shape: Mapping[str, Any]) -> tuple[int, int, int, int, int, int, int, int]:
    return (shape["batch"], shape["heads"], shape["kv_heads"], shape["q_len"], shape["kv_len"], shape["head_dim"],
            shape["v_head_dim"], shape["elem"])


def _flash(shape: Mapping[str, Any], spec: DeviceSpec, window: tuple[int, int] = (-1, -1), causal: bool = False):
    """(tile config, Estimate) of the flash launch the launcher would make (its `pick`); a causal launch
    visits the tiles on and below the diagonal."""
    b, h, hk, lq, lk, d, dv, elem = _dims(shape)
    groups = h // hk
    visits = tiles.band(window, causal)
    cfg = tiles.pick("fwd", lq * groups, lk, b * hk, d, dv, elem, spec, 0, groups, visits)
    est = tiles.estimate(cfg, "fwd", lq * groups, lk, b * hk, d, dv, elem, spec, groups=groups, window=visits)
    config = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "num_warps": cfg.num_warps,
              "num_stages": cfg.num_stages}
    return config, est


def _once(shape: Mapping[str, Any]) -> float:
    """Bytes of q, k, v and the output, each moved once."""
    b, h, hk, lq, lk, d, dv, elem = _dims(shape)
    return float(b * (h * lq + hk * lk) * (d + dv) * elem)


def _eager(shape: Mapping[str, Any], spec: DeviceSpec) -> Estimate:
    """The unfused graph: it writes and reads the score matrix several times (matmul out, scale, mask,
    softmax in/out, second matmul in)."""
    b, h, hk, lq, lk, d, dv, elem = _dims(shape)
    scores = b * h * lq * lk
    io = (b * h * lq * (d + dv) + b * hk * lk * (d + dv)) * elem
    return tiles.roofline(2.0 * scores * (d + dv), io + 6 * scores * 4.0, scores, 5, spec, tiles.dtype_name(elem))


def _topk(shape: Mapping[str, Any], spec: DeviceSpec, causal: bool, params: Mapping[str, Any]) -> Estimate:
    """Indexer (per-block channel min/max of K; two matmuls of the queries against them) + selection + exact
    attention over the kept key blocks (the flash kernel's block-sparse mode)."""
    b, h, hk, lq, lk, d, dv, elem = _dims(shape)
    p = {**TOPK_DEFAULTS, **params}
    block = p["block"]
    n_blocks = math.ceil(lk / block)
    visible = max(1.0, visible_keys(lq, lk, -1, -1, causal) / block)
    kept = min(visible, math.ceil(p["topk"] / block) + math.ceil(p["sink"] / block)
               + math.ceil((p["local"] + block) / block))
    _, dense = _flash(shape, spec, causal=causal)  # the kept blocks are a fraction of the visible ones
    attend = dense.scaled(kept / visible, _once(shape), tiles.host_s(spec) + spec.launch_s)
    index = tiles.roofline(4.0 * b * h * lq * n_blocks * d, (b * h * lq * d + 2 * b * hk * n_blocks * d) * elem
                      + b * hk * math.ceil(lq / block) * n_blocks * 4.0, 0.0, 6, spec, tiles.dtype_name(elem))
    return index + attend


def _lsh(shape: Mapping[str, Any], spec: DeviceSpec, causal: bool, params: Mapping[str, Any]) -> Estimate:
    """Hashing (one matmul per round), sorting and gathering every round's copies, chunk attention over two
    chunks per query, and the log-sum-exp merge of the rounds."""
    b, h, hk, lq, lk, d, dv, elem = _dims(shape)
    p = {**LSH_DEFAULTS, **params}
    rounds, chunk = p["n_hashes"], p["bucket_size"]
    buckets = max(2, 2 * round(lk / (2 * chunk)))
    tokens = b * (h * lq + h * lk)  # GQA gathers each query head's keys
    hashing = 2.0 * tokens * (d + 1) * buckets / 2 * rounds
    keys = min(lk, 2 * chunk) * (0.5 if causal else 1.0)
    attend = 2.0 * rounds * b * h * lq * keys * (d + dv)
    sort_bytes = rounds * tokens * (math.log2(max(2, lk)) * 8.0 + 2 * (d + dv) * elem)
    merge_bytes = rounds * b * h * lq * (dv + 1) * 4.0 * 2
    est = tiles.roofline(hashing + attend, sort_bytes + merge_bytes, rounds * b * h * lq * keys, 12 * rounds, spec,
                    tiles.dtype_name(elem))
    return est + Estimate(0.0, 0.0, 0.0, tiles.host_s(spec))  # plus its Triton launch's host time


def estimate_family(family: str, shape: Mapping[str, Any], spec: DeviceSpec, *,
                    structure: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None,
                    causal: bool = False) -> tuple[dict[str, int], Estimate]:
    """(tile config, Estimate) of ``family`` running ``shape`` on ``spec``.  ``structure``: the proven
    ``window`` and ``block_sparse`` ``density``; ``params``: the approximate family's settings."""
    structure = structure or {}
    if family == "flash":
        return _flash(shape, spec, causal=causal)
    if family == "window":
        return _flash(shape, spec, tiles.band(structure["window"], causal))
    if family == "blocksparse":
        config, dense = _flash(shape, spec, causal=causal)
        return config, dense.scaled(structure.get("density", 1.0), _once(shape),
                                    tiles.host_s(spec) + spec.launch_s)
    if family == "topk":
        return {}, _topk(shape, spec, causal, params or {})
    if family == "lsh":
        return {}, _lsh(shape, spec, causal, params or {})
    if family == "eager":
        return {}, _eager(shape, spec)
    raise ValueError(f"attnfuse costmodel: unknown kernel family {family!r}; allowed: "
                     f"{', '.join((*EXACT, *APPROXIMATE, 'eager'))}")


def _candidate(family: str, est: Estimate | None, rejected: str | None, **extra: Any) -> dict[str, Any]:
    row = {"kernel": family, "exact": family not in APPROXIMATE, "est_time_s": est.time_s if est else None,
           "hbm_bytes": est.hbm_bytes if est else None, "flops": est.flops if est else None,
           "exp_ops": est.exp_ops if est else None, "rejected": rejected}
    row.update(extra)
    return row


def _why(family: str, kernels: Sequence[str], band: bool, sparse: bool, approx: Mapping[str, Any] | None,
         padded: bool = False):
    """Why ``family`` may not run the site (None: it may).  ``padded``: a padded window (``window_pad``), whose
    zero keys only the window kernels add."""
    if padded and family != "window":
        return "the padded window's zero keys (the unfold spelling) run in the window kernel only"
    if family == "flash" and (band or sparse):
        return "the proven mask structure runs in the window / block-sparse mode of the same kernel"
    if family == "window" and not band:
        return "needs a proven band (window/causal) and no key padding"
    if family == "blocksparse" and not sparse:
        return "needs a constant mask with empty tiles"
    if family in APPROXIMATE:
        if approx is None:
            return "approximate kernels need options['approximate'] (opt-in)"
        if approx.get("rejected", {}).get(family):
            return approx["rejected"][family]
    if family not in kernels:
        return f"'{family}' is not in options['kernels']"
    return None


def _candidates(shape, spec, kernels, structure, approx):
    """Every family's candidate row for one shape (``rejected`` None: allowed), and the tile configs."""
    structure = structure or {}
    causal = bool(structure.get("causal", shape.get("causal", False)))
    band, sparse = structure.get("window") is not None, bool(structure.get("block_sparse"))
    padded = bool(structure.get("window_pad"))
    if padded and not band:
        raise ValueError("attnfuse costmodel: structure['window_pad'] needs the band it pads, structure['window'] "
                         "= (left, right)")
    rows, configs = [], {}
    for family in (*EXACT, *APPROXIMATE, "eager"):
        extra: dict[str, Any] = {}
        if family == "eager":
            mib = shape["batch"] * shape["heads"] * shape["q_len"] * shape["kv_len"] * 4 / 2**20
            why = f"materializes {mib:.1f} MiB of scores"
        else:
            why = _why(family, kernels, band, sparse, approx, padded)
        if (family == "window" and not band) or (family == "blocksparse" and not sparse):
            rows.append(_candidate(family, None, why))
            continue
        if family == "window":
            extra["visible_keys"] = round(visible_keys(shape["q_len"], shape["kv_len"], *structure["window"],
                                                       causal), 1)
        if family == "blocksparse":
            extra["density"] = structure.get("density", 1.0)
        if family in APPROXIMATE and approx is not None and family in approx.get("errors", {}):
            extra["error"] = approx["errors"][family]
        params = (approx or {}).get("params", {}).get(family, {})
        configs[family], est = estimate_family(family, shape, spec, structure=structure, params=params,
                                               causal=causal)
        rows.append(_candidate(family, est, why, **extra))
    return rows, configs


def _choose(rows: list[dict[str, Any]]) -> str:
    """The allowed candidate with the lowest estimate ("eager" if none); the others get the ratio as reason."""
    allowed = [r for r in rows if r["rejected"] is None]
    if not allowed:
        return "eager"
    best = min(allowed, key=lambda r: r["est_time_s"])
    for r in allowed:
        if r is not best:
            r["rejected"] = f"estimated {r['est_time_s'] / best['est_time_s']:.2f}x the time of '{best['kernel']}'"
    return best["kernel"]


def plan(shape: Mapping[str, Any], device: DeviceSpec, kernels: Sequence[str], *,
         structure: Mapping[str, Any] | None = None, approx: Mapping[str, Any] | None = None,
         dynamic: bool = False) -> Plan:
    """Choose the kernel for one site: the allowed candidate with the lowest estimated time.

    ``shape``: ``batch, heads, kv_heads, q_len, kv_len, head_dim, v_head_dim, elem`` (example sizes when the
    graph is dynamic) and ``causal``.  ``structure``: what the mask analysis proved and the op will be told
    (``window`` (left, right), ``causal``, ``block_sparse`` with ``density``, ``window_pad``: a padded window,
    the window family only, at the band's cost: its zero keys cost nothing).  ``approx``: None when the user
    did not opt in, else the approximation policy's verdict -- ``rejected`` {family: reason}, ``errors``
    {family: measured relative error}, ``params`` {family: settings}; a family without a ``rejected`` entry was
    calibrated within the budget.  ``dynamic``: also plan the table over key-length ranges (`Plan.table`).
    The first candidate is the chosen one, or (not fused) the exact kernel that would have run, with the reason.
    """
    rows, configs = _candidates(shape, device, kernels, structure, approx)
    chosen = _choose(rows)
    table = _table(shape, device, kernels, structure, approx) if dynamic else []
    if chosen == "eager":
        band, sparse = (structure or {}).get("window") is not None, bool((structure or {}).get("block_sparse"))
        first = "window" if band else "blocksparse" if sparse else "flash"
        return Plan("eager", {}, sorted(rows, key=lambda r: r["kernel"] != first), table)
    return Plan(chosen, configs.get(chosen, {}), sorted(rows, key=lambda r: r["kernel"] != chosen), table)


def _table(shape, device, kernels, structure, approx) -> list[dict[str, Any]]:
    ratio = shape["q_len"] / max(1, shape["kv_len"])
    table: list[dict[str, Any]] = []
    for i, lo in enumerate(_RANGES):
        hi = _RANGES[i + 1] if i + 1 < len(_RANGES) else None
        rep = _LAST_REP if hi is None else max(1, int(math.sqrt(max(lo, 64) * hi)))
        sized = {**shape, "kv_len": rep, "q_len": shape["q_len"] if ratio < 1 and shape["q_len"] == 1 else
                 max(1, round(rep * ratio))}
        rows, configs = _candidates(sized, device, kernels, structure, approx)
        kernel = _choose(rows)
        est = next((r["est_time_s"] for r in rows if r["kernel"] == kernel), None)
        if table and table[-1]["kernel"] == kernel:
            table[-1]["kv_len"][1] = hi
            continue
        table.append({"kv_len": [lo, hi], "kernel": kernel, "config": configs.get(kernel, {}),
                      "planned_at": rep, "est_time_s": est})
    return table
