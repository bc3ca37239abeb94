"""The tile cost model: the flash kernels' launch configurations and what each costs on a device.

A leaf of the cost model (it imports `attnfuse.device` only): the kernel launchers and the planner
(`attnfuse.costmodel.plan`) both read it, so the tile a plan names is the tile a launcher can run.

* `CONFIGS` are data (every tile/warps/stages combination), filtered per device and head dim by `keep`
  (shared memory from `smem_bytes`, a register budget);
* `estimate` is one launch's roofline -- FLOPs, IO-aware HBM/L2 traffic, exponentials, wave quantization over
  the SMs at the occupancy shared memory allows, launch overhead -- corrected by per-tile fits measured on an
  H100 (`_TILE_FIT`);
* `pick` is the kept config with the lowest estimate;
* `roofline` is the same overlap formula for the untiled candidates (eager, the approximate families' extra
  work).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

from ..device import DeviceSpec

UNBOUNDED = 2**30  # a band side with no bound, as the kernels take it
_DTYPE_NAMES = {2: "float16", 4: "float32", 8: "float64"}


class NoTileFits(ValueError):
    """No config of `CONFIGS` fits the device's shared memory for these head dims (the planner rejects the
    candidate with this message; a standalone launch raises it)."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dtype_name(elem: int) -> str:
    """The `DeviceSpec.matmul_flops` key for an element size (2 bytes: float16's rate, as bfloat16's)."""
    return _DTYPE_NAMES.get(elem, "float16")


@dataclasses.dataclass(frozen=True)
class Estimate:
    """One candidate's cost: FLOPs, HBM bytes, exponentials, and the estimated time in seconds."""

    flops: float
    hbm_bytes: float
    exp_ops: float
    time_s: float

    def scaled(self, fraction: float, fixed_bytes: float = 0.0, fixed_s: float = 0.0) -> Estimate:
        """The work times ``fraction``; ``fixed_bytes`` (inputs read once) and ``fixed_s`` (launches) stay."""
        f = min(1.0, max(0.0, fraction))
        return Estimate(self.flops * f, fixed_bytes + (self.hbm_bytes - fixed_bytes) * f, self.exp_ops * f,
                        fixed_s + (self.time_s - fixed_s) * f)

    def __add__(self, other: Estimate) -> Estimate:
        return Estimate(self.flops + other.flops, self.hbm_bytes + other.hbm_bytes, self.exp_ops + other.exp_ops,
                        self.time_s + other.time_s)


def overlap(*terms: float) -> float:
    """Time of work limited by several units (matmul, exponentials, memory) that overlap imperfectly: the
    largest term plus a tenth of the others (which also breaks ties toward less padding)."""
    ordered = sorted(terms)
    return ordered[-1] + 0.1 * sum(ordered[:-1])


def roofline(flops: float, nbytes: float, exps: float, launches: int, spec: DeviceSpec, dtype: str) -> Estimate:
    """An untiled candidate's `Estimate`: `overlap` of its matmul, memory and exponential time, plus launches."""
    time_s = overlap(flops / spec.flops(dtype), nbytes / spec.hbm_bytes_per_s, exps / spec.exp_per_s)
    return Estimate(flops, nbytes, exps, time_s + launches * spec.launch_s)


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One launch configuration; ``block_m`` counts packed (row, head-in-group) pairs."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Candidates are data: every (tile, warps, stages) combination, filtered per device and head dim by `keep`; 32x32
# is the one backward tile that fits head dim 256 in an A100's shared memory.
CONFIGS = [TileConfig(m, n, 8 if m == 128 else 4, s) for m in (128, 64, 16) for n in (128, 64, 32) for s in (2, 3)
           if not (m == 16 and n == 32)] + [TileConfig(32, 32, 4, 2)]
# fp32 accumulator + score tile values per thread a config may hold (of 255).  The backward's budget is the
# measured one: its best H100 tile at d128, 64x64 with 4 warps, holds 192 (bwd-sweep-h100-2026-11-23.json)
_REGS_PER_THREAD = {"fwd": 160, "bwd": 192}


def pow2(n: int) -> int:
    """A head dim's block size: the next power of two, at least 16 (the smallest ``tl.dot`` operand)."""
    return max(16, 1 << max(0, int(n) - 1).bit_length())


def smem_bytes(cfg: TileConfig, kind: str, head_dim: int, head_dim_v: int, elem: int, mask_elem: int = 0) -> int:
    """Shared memory a config needs: an upper bound, for sm_80 and sm_90 and every feature combination, that
    tests/kernels/flash/test_flash_aot_{fwd,bwd}.py check against what Triton allocates.  ``mask_elem``: the
    mask's element size (0: no mask); its tiles are pipelined like the loads that feed the dots."""
    d, dv = pow2(head_dim), pow2(head_dim_v)
    bm, bn, stages = cfg.block_m, cfg.block_n, max(2, cfg.num_stages)
    mask = (stages - 1) * bm * bn * mask_elem
    if kind == "fwd":  # Q resident, K/V tiles multi-buffered, P staged for the second dot
        return (bm * d + stages * bn * (d + dv) + bm * bn) * elem + mask
    # dK/dV: K/V resident, Q/dO and their row statistics multi-buffered, P^T and dS^T staged for the transposed
    # dots, and a transposed copy of K (mma v2) or an fp32 layout-conversion scratch (wgmma)
    dkdv = ((bn * (d + dv) + stages * bm * (d + dv) + 2 * bm * bn) * elem + 16 * stages * bm
            + max(bn * d * elem, 4 * bm * bn))
    # dQ: Q/dO resident, K/V multi-buffered, dS staged; a bias's gradient adds an fp32 dS conversion scratch
    dq = (bm * (d + dv) + stages * bn * (d + dv) + bm * bn) * elem + (4 * bm * bn if mask_elem >= 2 else 0)
    return max(dkdv, dq) + mask


def keep(cfg: TileConfig, kind: str, head_dim: int, head_dim_v: int, elem: int, spec: DeviceSpec,
         mask_elem: int = 0) -> bool:
    """Whether ``cfg`` fits the device's shared memory and a sane register budget."""
    d, dv = pow2(head_dim), pow2(head_dim_v)
    acc = cfg.block_m * dv if kind == "fwd" else cfg.block_n * (d + dv)
    regs = (acc + 2 * cfg.block_m * cfg.block_n) / (32 * cfg.num_warps)
    return (smem_bytes(cfg, kind, head_dim, head_dim_v, elem, mask_elem) <= spec.smem_per_block
            and regs <= _REGS_PER_THREAD[kind])


def estimate(cfg: TileConfig, kind: str, rows: int, kv_len: int, bh_kv: int, head_dim: int, head_dim_v: int,
             elem: int, spec: DeviceSpec, splits: int = 1, mask_elem: int = 0, groups: int = 1,
             window: tuple[int, int] = (-1, -1)) -> Estimate:
    """The cost model of one flash launch (``kind`` "fwd") or of the backward ("bwd": the dK/dV launch then the
    dQ launch): FLOPs, HBM bytes, exponentials and a roofline time, stretched by wave quantization over the
    SMs at the occupancy shared memory allows, plus the launch overhead.

    IO-aware traffic (FlashAttention's analysis): every input once from HBM, plus the streamed operand (K/V per
    query tile in the forward and dQ passes, Q/dO per key tile in the dK/dV pass) once per tile of the other
    side, so the re-reads are ~N^2 d / BLOCK and the largest tile that fits the SRAM (BLOCK ~ M / d) gives
    Theta(N^2 d^2 / M).  Re-reads come from L2 when the streamed operand of the heads in flight fits in it.
    A sliding ``window`` (left, right) scales the tile FLOPs, exponentials, re-reads and streamed working set
    by the fraction of tiles the band visits (`tiles_visited`: it depends on the tile shape, so it can change
    the pick); the grid, and so the wave quantization, is the dense one.  A block-sparse launch is estimated
    dense here (an upper bound: its map depends on the tile shape); the cost model scales it by the density.
    """
    d, dv = pow2(head_dim), pow2(head_dim_v)
    m_tiles, n_tiles = cdiv(rows, cfg.block_m), cdiv(kv_len, cfg.block_n)
    visited = 1.0
    if window != (-1, -1):
        pairs = tiles_visited(rows // groups, kv_len, *window, cfg.block_m, cfg.block_n, groups)
        visited = pairs / (m_tiles * n_tiles)
    smem = smem_bytes(cfg, kind, head_dim, head_dim_v, elem, mask_elem)
    parts = ("dkdv", "dq") if kind == "bwd" else (kind,)
    ests = [_launch_estimate(cfg, part, rows, kv_len, bh_kv, d, dv, elem, spec, splits if kind == "fwd" else 1,
                             visited, m_tiles, n_tiles, smem) for part in parts]
    fit = _TILE_FIT.get((cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages), 1.0) if kind == "fwd" else 1.0
    host = host_s(spec)
    time_s = sum(math.hypot(e.time_s / fit, host) for e in ests)
    return Estimate(*(sum(getattr(e, f) for e in ests) for f in ("flops", "hbm_bytes", "exp_ops")), time_s)


def host_s(spec: DeviceSpec) -> float:
    """The host floor of one eager launch on ``spec`` (0 for a one-core CPU spec: the interpreter)."""
    return _HOST_S if spec.sms > 1 else 0.0


def estimate_s(cfg: TileConfig, kind: str, rows: int, kv_len: int, bh_kv: int, head_dim: int, head_dim_v: int,
               elem: int, spec: DeviceSpec, splits: int = 1, mask_elem: int = 0, groups: int = 1,
               window: tuple[int, int] = (-1, -1)) -> float:
    """`estimate`'s time in seconds."""
    return estimate(cfg, kind, rows, kv_len, bh_kv, head_dim, head_dim_v, elem, spec, splits, mask_elem, groups,
                    window).time_s


_PRODUCTS = {"fwd": 1.0, "dkdv": 2.0, "dq": 1.5}  # tile matmuls per pass, in units of the forward's two
# Measured correction per forward tile config (block_m, block_n, warps, stages): the analytic model's time over
# the measured one, geometric mean over the shapes of an H100 sweep (bf16/fp16, d64/d128, seq 512..32k) where the
# kernel runs over 1.5 ms (benchmarks/results/costmodel-h100-2026-11-23.json).  The 128-row tiles with 8 warps
# reach ~60% of what the roofline credits them; 64-row tiles match it.  Unlisted configs (and backward passes)
# keep the analytic model.
_TILE_FIT = {
    (16, 64, 4, 2): 0.97, (16, 64, 4, 3): 1.01, (16, 128, 4, 2): 1.09, (16, 128, 4, 3): 0.92,
    (32, 32, 4, 2): 0.54, (64, 32, 4, 2): 1.05, (64, 32, 4, 3): 1.19, (64, 64, 4, 2): 0.94, (64, 64, 4, 3): 1.01,
    (64, 128, 4, 2): 0.81, (64, 128, 4, 3): 0.89, (128, 32, 8, 2): 0.58, (128, 32, 8, 3): 0.80,
    (128, 64, 8, 2): 0.61, (128, 64, 8, 3): 0.73, (128, 128, 8, 2): 0.50, (128, 128, 8, 3): 0.59,
}
# Host time of one eager flash launch (argument binding in Triton's launcher, allocations, the causal V check):
# the floor of the second H100 sweep, after eager launches stopped going through wrap_triton
# (costmodel-h100-2026-11-23-v2.json; 0.2-0.45 ms per call at tiny shapes, host-overhead-h100-2026-11-23.txt).
# Device and host time overlap: the estimate is their root-sum-square (the form that fit the sweeps best).
_HOST_S = 2.5e-4
_EXPS = {"fwd": 1.0, "dkdv": 1.0, "dq": 1.0}  # exponentials per score per pass (the backward recomputes P)


def _launch_estimate(cfg: TileConfig, kind: str, rows: int, kv_len: int, bh_kv: int, d: int, dv: int, elem: int,
            spec: DeviceSpec, splits: int, visited: float, m_tiles: int, n_tiles: int, smem: int) -> Estimate:
    """`estimate` for one launch: ``kind`` "fwd" and "dq" stream K/V past query tiles, "dkdv" Q/dO past key
    tiles."""
    scores = bh_kv * m_tiles * cfg.block_m * n_tiles * cfg.block_n * visited
    flops = 2.0 * scores * (d + dv) * _PRODUCTS[kind]
    exps = scores * _EXPS[kind]
    tiles, other = (n_tiles, rows) if kind == "dkdv" else (m_tiles, kv_len)
    once = bh_kv * (rows + kv_len) * (d + dv) * elem
    rereads = bh_kv * max(0, tiles - 1) * other * (d + dv) * elem * visited
    # small tiles under-use the tensor cores
    eff = min(1.0, cfg.block_m / 128) ** 0.5 * min(1.0, cfg.block_n / 64) ** 0.5
    programs = tiles * splits * bh_kv
    per_sm = max(1, min(spec.smem_per_sm // smem, 16 // cfg.num_warps))
    slots = spec.sms * per_sm
    heads_in_flight = min(bh_kv, max(1, slots // max(1, tiles)))
    in_l2 = heads_in_flight * other * visited * (d + dv) * elem <= spec.l2_bytes
    memory = once / spec.hbm_bytes_per_s + rereads / (spec.l2_bytes_per_s if in_l2 else spec.hbm_bytes_per_s)
    waves = math.ceil(programs / slots) * slots / programs
    time_s = overlap(flops / (spec.flops(dtype_name(elem)) * eff), exps / spec.exp_per_s, memory) * waves
    time_s += spec.launch_s
    return Estimate(flops, once + (0.0 if in_l2 else rereads), exps, time_s)


def kept_configs(kind: str, head_dim: int, head_dim_v: int, elem: int, spec: DeviceSpec,
                 mask_elem: int = 0) -> list[TileConfig]:
    """The `CONFIGS` that `keep` accepts: every config `pick` can return for these sizes on ``spec``."""
    return [c for c in CONFIGS if keep(c, kind, head_dim, head_dim_v, elem, spec, mask_elem)]


@functools.lru_cache(maxsize=4096)  # every launch asks: keep the Python cost model off the hot path
def pick(kind: str, rows: int, kv_len: int, bh_kv: int, head_dim: int, head_dim_v: int, elem: int,
         spec: DeviceSpec, mask_elem: int = 0, groups: int = 1, window: tuple[int, int] = (-1, -1)) -> TileConfig:
    """The kept config with the lowest `estimate_s` (ties: earlier in `CONFIGS`); ``mask_elem`` is the mask's
    element size (0: no mask); ``groups`` (rows = q_len * groups) and ``window`` matter for sliding windows."""
    kept = kept_configs(kind, head_dim, head_dim_v, elem, spec, mask_elem)
    if not kept:
        raise NoTileFits(f"attnfuse flash: no tile config fits head_dim={head_dim} in {spec.name}'s "
                         f"{spec.smem_per_block} bytes of shared memory per block")
    return min(kept, key=lambda c: estimate_s(c, kind, rows, kv_len, bh_kv, head_dim, head_dim_v, elem, spec,
                                              mask_elem=mask_elem, groups=groups, window=window))


_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


def launch_configs(rows: int, kv_len: int, bh_kv: int, head_dim: int, head_dim_v: int, elem: int, spec: DeviceSpec,
                   mask_elem: int = 0, groups: int = 1, window: tuple[int, int] = (-1, -1)
                   ) -> tuple[TileConfig, TileConfig]:
    """The (forward, backward) tiles of one site: `pick` with everything the launch depends on -- packed rows
    (q_len * groups), keys, batch * kv heads, head dims, element size, the device, the mask's element size (its
    tiles take shared memory) and the band the launch visits (`band`).  The plan records them and the op carries
    them (`encode`), so the launcher runs exactly these."""
    return (pick("fwd", rows, kv_len, bh_kv, head_dim, head_dim_v, elem, spec, mask_elem, groups, window),
            pick("bwd", rows, kv_len, bh_kv, head_dim, head_dim_v, elem, spec, mask_elem, groups, window))


def config_dict(fwd: TileConfig, bwd: TileConfig) -> dict[str, int]:
    """The report's ``config`` for a (forward, backward) pair: ``BLOCK_M``... and ``bwd_BLOCK_M``..."""
    values = (fwd.block_m, fwd.block_n, fwd.num_warps, fwd.num_stages, bwd.block_m, bwd.block_n, bwd.num_warps,
              bwd.num_stages)
    return dict(zip((*_KEYS, *(f"bwd_{k}" for k in _KEYS)), values))


def encode(rows: list[tuple[int, int | None, dict[str, int]]]) -> str:
    """The op's ``tiles`` argument: JSON ``[[lo, hi, [fwd m, n, warps, stages], [bwd ...]], ...]`` over key-length
    ranges [lo, hi) (hi -1: unbounded), from (lo, hi, `config_dict`) rows; "" when there is none."""
    out = [[lo, -1 if hi is None else hi, [c[k] for k in _KEYS], [c[f"bwd_{k}"] for k in _KEYS]]
           for lo, hi, c in rows if c and "BLOCK_M" in c]
    return json.dumps(out) if out else ""


@functools.lru_cache(maxsize=256)
def _decoded(tiles: str) -> tuple[tuple[int, int, TileConfig, TileConfig], ...]:
    return tuple((int(lo), int(hi), TileConfig(*fwd), TileConfig(*bwd)) for lo, hi, fwd, bwd in json.loads(tiles))


def varies(tiles: str) -> bool:
    """Whether the op's ``tiles`` argument names different tiles for different key lengths (a dynamic table):
    a traced graph then keeps the op whole, so each call runs its own row's tile (`attnfuse.ops`)."""
    return bool(tiles) and len({(fwd, bwd) for _, _, fwd, bwd in _decoded(tiles)}) > 1


def decode(tiles: str, kv_len: int, kind: str) -> TileConfig | None:
    """The ``kind`` ("fwd" | "bwd") tile the op's ``tiles`` argument names for ``kv_len``, or None (no argument,
    or a length outside its rows: the launcher then picks, as a standalone call does)."""
    if not tiles:
        return None
    for lo, hi, fwd, bwd in _decoded(tiles):
        if kv_len >= lo and (hi < 0 or kv_len < hi):
            return fwd if kind == "fwd" else bwd
    return None


# Shapes `reachable_configs` tries: packed query rows (decode included), key lengths, batch * kv heads.
_GRID_ROWS = (1, 2, 4, 8, 16, 32, 48, 64, 100, 128, 256, 384, 512, 1000, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
_GRID_KV = (1, 16, 100, 128, 256, 512, 1000, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
_GRID_BH = (1, 2, 4, 8, 12, 16, 32, 40, 64, 96, 128, 132, 256, 512, 1024)


def reachable_configs(kind: str, head_dim: int, head_dim_v: int, elem: int, spec: DeviceSpec,
                      mask_elem: int = 0) -> set[TileConfig]:
    """The configs `pick` returns over a grid of realistic shapes (rows 1..64k, keys 1..128k, batch * kv heads
    1..1024): what a device usually runs.  Other shapes can pick any of `kept_configs` (a superset)."""
    return {pick(kind, r, n, bh, head_dim, head_dim_v, elem, spec, mask_elem)
            for r in _GRID_ROWS for n in _GRID_KV for bh in _GRID_BH}


def band(window: tuple[int, int], causal: bool) -> tuple[int, int]:
    """The (left, right) band with ``causal`` folded in (right = 0) and every negative width as -1 (unbounded)."""
    left, right = (w if w >= 0 else -1 for w in window)
    return left, 0 if causal else right


def widths(left: int, right: int) -> tuple[int, int]:
    """The band as the kernels take it: half-widths >= 0, `UNBOUNDED` for -1."""
    return tuple(UNBOUNDED if w < 0 else min(w, UNBOUNDED) for w in (left, right))


def tiles_visited(lq: int, lk: int, left: int, right: int, block_m: int, block_n: int, groups: int = 1) -> int:
    """Key tiles the forward and dQ programs of one (batch, kv head) visit under the band ``(left, right)``
    (-1: unbounded), summed over their packed query tiles: each program's tiles from its first row's band start
    to its last row's band end, so the work is O(q_len * (left + right + tiles)).  The dK/dV programs visit
    the same (query tile, key tile) pairs up to the ragged edges.  Both unbounded: every tile."""
    if left < 0 and right < 0:
        return cdiv(lq * groups, block_m) * cdiv(lk, block_n)
    wl, wr = widths(left, right)
    total = 0
    for start in range(0, lq * groups, block_m):  # plain ints: `pick` also runs while torch.compile traces
        first = max(start // groups - wl, 0) // block_n
        end = min(min((start + block_m - 1) // groups, lq - 1) + wr + 1, lk)
        total += max(0, cdiv(end, block_n) - first)
    return total


def num_splits(cfg: TileConfig, rows: int, kv_len: int, bh_kv: int, spec: DeviceSpec) -> int:
    """Key splits for the forward (flash-decoding): enough programs to fill the SMs when the query side
    alone cannot, each split keeping at least two key tiles."""
    programs = cdiv(rows, cfg.block_m) * bh_kv
    if programs >= spec.sms:
        return 1
    return max(1, min(cdiv(spec.sms, programs), kv_len // (2 * cfg.block_n), 64))
