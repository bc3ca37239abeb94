"""Each kernel family's estimate for one attention site: what the planner compares.

Every family here has one signature, ``f(shape, spec, *, structure, params, causal) -> (tile config, Estimate)``,
and the family registry (`attnfuse.families`) names it; `attnfuse.costmodel.plan.estimate_family` calls it with
the family's default settings filled in.  ``shape``: ``batch, heads, kv_heads, q_len, kv_len, head_dim,
v_head_dim, elem``; ``structure``: the proven ``window`` and ``block_sparse`` ``density``; ``params``: an
approximate family's settings, complete.

* flash, window and blocksparse are the flash launch the launcher would make (`tiles.pick`, `tiles.estimate`):
  a causal launch visits the tiles on and below the diagonal, a window those in its band, and block-sparse
  scales the dense work by the tile density;
* topk adds its indexer (two skinny matmuls against per-block channel min/max) to the flash estimate scaled by
  the kept blocks over the visible ones;
* lsh is its hashing matmul, the bucket index and the votes (`lsh`), plus top-k's attention over the kept key
  blocks with its ``cap`` as top-k's ``topk``;
* eager (the unfused graph) writes and reads the score matrix several times;
* sdpa and flex (PyTorch's kernels) are the launch of attnfuse's own kernel they would replace, times the
  measured ratio of their time over attnfuse's on the device's preset (`attnfuse.costmodel.fits`), in the
  site's mode: ``"fwd_bwd"`` when ``shape["training"]`` (or ``structure["training"]``), else ``"fwd"``.

The roofline formula and the element-size map are `tiles.roofline` and `tiles.dtype_name`; this module imports
only `attnfuse.device`, `attnfuse.costmodel.tiles`, `attnfuse.costmodel.fits` and `attnfuse.costmodel.lshknobs`
(LSH's ``bits=-1`` resolved as the kernel resolves it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..device import DeviceSpec
from . import fits, lshknobs, tiles
from .tiles import Estimate

__all__ = ["blocksparse", "eager", "flash", "flex", "lsh", "scores_bytes", "sdpa", "topk", "visible_keys", "window"]

Result = tuple[dict[str, int], Estimate]


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


def _once(shape: Mapping[str, Any]) -> float:
    """Bytes of q, k, v and the output, each moved once."""
    b, h, hk, lq, lk, d, dv, elem = _dims(shape)
    return float(b * (h * lq + hk * lk) * (d + dv) * elem)


def scores_bytes(shape: Mapping[str, Any]) -> float:
    """Bytes of one float32 score matrix (batch x heads x q_len x kv_len): what the unfused graph materializes."""
    return float(shape["batch"] * shape["heads"] * shape["q_len"] * shape["kv_len"] * 4)


def _launch(shape: Mapping[str, Any], spec: DeviceSpec, window: tuple[int, int], causal: bool) -> Result:
    """(tile config, Estimate) of the flash launch under the band ``window`` with ``causal`` folded in
    (`tiles.band`): the config is the (forward, backward) pair `tiles.launch_configs` decides for the site,
    with its mask's element size (``shape["mask_elem"]``, 0 without a mask tensor), which the op carries."""
    b, h, hk, lq, lk, d, dv, elem = _dims(shape)
    groups = h // hk
    visits = tiles.band(window, causal)
    mask_elem = int(shape.get("mask_elem", 0))
    fwd, bwd = tiles.launch_configs(lq * groups, lk, b * hk, d, dv, elem, spec, mask_elem, groups, visits)
    est = tiles.estimate(fwd, "fwd", lq * groups, lk, b * hk, d, dv, elem, spec, mask_elem=mask_elem, groups=groups,
                         window=visits)
    return tiles.config_dict(fwd, bwd), est


def flash(shape: Mapping[str, Any], spec: DeviceSpec, *, structure: Mapping[str, Any], params: Mapping[str, Any],
          causal: bool) -> Result:
    """The dense flash launch; a causal one visits the tiles on and below the diagonal."""
    return _launch(shape, spec, (-1, -1), causal)


def window(shape: Mapping[str, Any], spec: DeviceSpec, *, structure: Mapping[str, Any], params: Mapping[str, Any],
           causal: bool) -> Result:
    """The flash launch over the tiles of the proven band ``structure["window"]``."""
    return _launch(shape, spec, structure["window"], causal)


def blocksparse(shape: Mapping[str, Any], spec: DeviceSpec, *, structure: Mapping[str, Any],
                params: Mapping[str, Any], causal: bool) -> Result:
    """The dense flash launch's work scaled by the tile ``density`` (inputs read once and launches stay)."""
    config, dense = _launch(shape, spec, (-1, -1), causal)
    return config, dense.scaled(structure.get("density", 1.0), _once(shape), tiles.host_s(spec) + spec.launch_s)


def eager(shape: Mapping[str, Any], spec: DeviceSpec, *, structure: Mapping[str, Any], params: Mapping[str, Any],
          causal: bool) -> Result:
    """The unfused graph: it writes and reads the score matrix several times (matmul out, scale, mask,
    softmax in/out, second matmul in)."""
    b, h, hk, lq, lk, d, dv, elem = _dims(shape)
    scores = b * h * lq * lk
    io = (b * h * lq * (d + dv) + b * hk * lk * (d + dv)) * elem
    return {}, tiles.roofline(2.0 * scores * (d + dv), io + 6 * scores * 4.0, scores, 5, spec,
                              tiles.dtype_name(elem))


def _kept(shape: Mapping[str, Any], spec: DeviceSpec, causal: bool, *, cap: int, block: int, sink: int,
          local: int) -> Estimate:
    """Exact attention over the key blocks a query block keeps -- ``ceil(cap / block)`` selected ones plus its sink
    and local blocks, at most the visible ones -- in the flash kernel's block-sparse mode: the dense launch's work
    scaled by the kept blocks over the visible ones (inputs read once, launches stay)."""
    lq, lk = shape["q_len"], shape["kv_len"]
    visible = max(1.0, visible_keys(lq, lk, -1, -1, causal) / block)
    kept = min(visible, math.ceil(cap / block) + math.ceil(sink / block) + math.ceil((local + block) / block))
    _, dense = _launch(shape, spec, (-1, -1), causal)
    return dense.scaled(kept / visible, _once(shape), tiles.host_s(spec) + spec.launch_s)


def topk(shape: Mapping[str, Any], spec: DeviceSpec, *, structure: Mapping[str, Any], params: Mapping[str, Any],
         causal: bool) -> Result:
    """Indexer (per-block channel min/max of K; two matmuls of the queries against them) + selection + exact
    attention over the kept key blocks (`_kept`, ``cap`` = ``topk``)."""
    b, h, hk, lq, lk, d, dv, elem = _dims(shape)
    block = params["block"]
    n_blocks = math.ceil(lk / block)
    attend = _kept(shape, spec, causal, cap=params["topk"], block=block, sink=params["sink"], local=params["local"])
    index = tiles.roofline(4.0 * b * h * lq * n_blocks * d, (b * h * lq * d + 2 * b * hk * n_blocks * d) * elem
                           + b * hk * math.ceil(lq / block) * n_blocks * 4.0, 0.0, 6, spec, tiles.dtype_name(elem))
    return {}, index + attend


def lsh(shape: Mapping[str, Any], spec: DeviceSpec, *, structure: Mapping[str, Any], params: Mapping[str, Any],
        causal: bool) -> Result:
    """The index, the votes and exact attention over the selected key blocks (`attnfuse.kernels.lsh`; ``bits`` -1
    is resolved at the site's key length, `lshknobs.resolved`):

    * hashing: one float32 matmul of every query row and key against ``tables * bits`` hyperplanes,
      ``2 * (B*H*Lq + B*Hkv*Lk) * D * tables * bits`` FLOPs, reading q and k once;
    * the index: a counting sort of ``B*Hkv*Lk*tables`` (bucket, key) entries (written and read, 16 bytes each);
    * the votes: each query row reads ``tables * (1 + probes)`` buckets of ``max(1, Lk / 2**bits)`` keys (8 bytes
      a vote: the key's block and its counter), then one pass over its (row, key block) counters, and the
      selection reads the (query block, key block) scores;
    * attention over the kept blocks: top-k's (`_kept`) with ``cap`` keys selected."""
    b, h, hk, lq, lk, d, dv, elem = _dims(shape)
    p = lshknobs.resolved(params, lk)
    tables, bits, probes, block = p["tables"], p["bits"], p["probes"], p["block"]
    nqb, nkb = math.ceil(lq / block), math.ceil(lk / block)
    rows = b * h * lq
    hashing = 2.0 * (rows + b * hk * lk) * d * tables * bits
    index = (rows + b * hk * lk) * d * elem + b * hk * lk * tables * 16.0 + rows * tables * (1 + probes) * 8.0
    per_bucket = max(1.0, lk / 2.0 ** bits)
    votes = rows * tables * (1 + probes) * per_bucket * 8.0 + rows * nkb * 8.0 + b * hk * nqb * nkb * 8.0
    select = tiles.roofline(hashing, index + votes, 0.0, 6, spec, "float32")
    attend = _kept(shape, spec, causal, cap=p["cap"], block=block, sink=p["sink"], local=p["local"])
    return {}, select + attend


def _fit(shape: Mapping[str, Any], spec: DeviceSpec, structure: Mapping[str, Any], family: str,
         variant: str | None, causal: bool) -> fits.Fit:
    """The fitted ratio (`fits.ratio`) of ``family`` in the site's mode, at its head dim and key length."""
    mode = "fwd_bwd" if shape.get("training") or structure.get("training") else "fwd"
    return fits.ratio(spec, family, variant, mode, causal, shape["head_dim"], shape["kv_len"])


def _times(est: Estimate, ratio: float) -> Estimate:
    return Estimate(est.flops, est.hbm_bytes, est.exp_ops, est.time_s * ratio)


def _replaced(shape: Mapping[str, Any], spec: DeviceSpec, band: tuple[int, int], causal: bool) -> Estimate:
    """The launch of attnfuse's kernel under ``band``; where no tile of it fits these head dims (PyTorch's kernel
    may still run them), the untiled roofline of the same work, inputs moved once."""
    try:
        return _launch(shape, spec, band, causal)[1]
    except tiles.NoTileFits:
        b, h, hk, lq, lk, d, dv, elem = _dims(shape)
        scores = b * h * lq * visible_keys(lq, lk, *band, causal)
        return tiles.roofline(2.0 * scores * (d + dv), _once(shape), scores, 1, spec, tiles.dtype_name(elem))


def sdpa(shape: Mapping[str, Any], spec: DeviceSpec, *, structure: Mapping[str, Any], params: Mapping[str, Any],
         causal: bool) -> Result:
    """PyTorch's SDPA with the backend ``structure["sdpa_backend"]`` (default flash; "cpu", its CPU kernel, is
    the flash backend's fit; a backend the preset's measurements lack reuses flash's): the dense flash launch
    (SDPA skips no band or empty tile, only a causal mask's upper triangle) times the fitted ratio."""
    base = _replaced(shape, spec, (-1, -1), causal)
    return {}, _times(base, _fit(shape, spec, structure, "sdpa", structure.get("sdpa_backend"), causal).ratio)


def flex(shape: Mapping[str, Any], spec: DeviceSpec, *, structure: Mapping[str, Any], params: Mapping[str, Any],
         causal: bool) -> Result:
    """FlexAttention over the proven mask's BlockMask: the launch of attnfuse's kernel it replaces times Flex's
    fitted ratio for that structure -- a proven band (``structure["window"]``): the window launch, the
    ``window`` ratio; a block-sparse mask: the block-sparse estimate, the dense ratio; packed documents
    (``"documents"`` in ``structure["flex_mask"]["kinds"]``, which attnfuse's kernels run as a dense mask, within
    the band if one was proven): that launch and the ``documents`` ratio, or where none was measured the dense
    ratio with the work scaled by the BlockMask's ``structure["density"]`` (default 1); otherwise the dense
    launch and ratio."""
    documents = "documents" in (structure.get("flex_mask") or {}).get("kinds", ())
    band = structure.get("window")
    if structure.get("block_sparse") and not documents:
        base = _replaced(shape, spec, (-1, -1), causal).scaled(structure.get("density", 1.0), _once(shape),
                                                                tiles.host_s(spec) + spec.launch_s)
        return {}, _times(base, _fit(shape, spec, structure, "flex", "dense", causal).ratio)
    base = _replaced(shape, spec, (-1, -1) if band is None else band, causal)
    variant = "documents" if documents else "dense" if band is None else "window"
    fit = _fit(shape, spec, structure, "flex", variant, causal)
    if documents and fit.variant != "documents":
        base = base.scaled(structure.get("density", 1.0), _once(shape), tiles.host_s(spec) + spec.launch_s)
    return {}, _times(base, fit.ratio)


def tpa(shape: Mapping[str, Any], spec: DeviceSpec, *, structure: Mapping[str, Any], params: Mapping[str, Any],
        causal: bool) -> Result:
    """The flash launch (over the proven band) reading factorized sides as factors (``structure["tpa"]["ranks"]``:
    (q, k, v) rank, 0 for a plain side): each K/V tile the launch streams costs ``R * (Hk + D)`` numbers per token
    instead of ``Hk * D``, and forming it costs ``2 * R * D`` FLOPs per (token, head) per visit, on the elementwise
    units (weighted by the matmul units' rate over float32's).  The launch's time is scaled by the ratio of the
    two rooflines (tpa's traffic and FLOPs against flash's): it wins where attention is memory-bound (decode, long
    caches) and loses where it is compute-bound."""
    config, base = _launch(shape, spec, structure.get("window") or (-1, -1), causal)
    b, h, hk, lq, lk, d, dv, elem = _dims(shape)
    rq, rk, rv = structure["tpa"]["ranks"]
    formed_kv = float(b * hk * lk * (d + dv) * elem)
    factor_kv = float(b * lk * elem * ((rk * (hk + d)) if rk else hk * d) + b * lk * elem * ((rv * (hk + dv)) if rv
                                                                                           else hk * dv))
    visits = max(1.0, (base.hbm_bytes - (_once(shape) - formed_kv)) / formed_kv)  # K/V reads per launch
    formed_q, factor_q = float(b * h * lq * d * elem), float(b * lq * rq * (h + d) * elem) if rq else 0.0
    hbm = base.hbm_bytes + visits * (factor_kv - formed_kv) + (factor_q - formed_q if rq else 0.0)
    name = tiles.dtype_name(elem)
    # tiles are formed by elementwise FMAs, not on the matmul units: weight their FLOPs by the rate difference
    fma = spec.flops(name) / spec.flops("float32")
    flops = base.flops + fma * (visits * b * hk * lk * 2.0 * (rk * d + rv * dv) + b * h * lq * 2.0 * rq * d)
    ratio = tiles.roofline(flops, hbm, base.exp_ops, 0, spec, name).time_s / max(
        1e-30, tiles.roofline(base.flops, base.hbm_bytes, base.exp_ops, 0, spec, name).time_s)
    time_s = base.time_s * ratio
    if spec.name == "cpu" and lq > CPU_DECODE_ROWS:
        time_s *= CPU_BLOCKED_RATIO
    return config, Estimate(flops, hbm, base.exp_ops, time_s)


# The CPU path (`attnfuse.kernels.tpa._cpu`): up to this many query rows read only the factors (decode); longer
# query sides run the blocked path, PyTorch ops over formed key blocks.  Forcing it on a T6-style model's prefill
# made the whole model 3.1x (1k tokens) and 4.2x (4k) slower than the model as written over SDPA's fused CPU
# kernel (`benchmarks/bench_tpa.py --arms as_written,attnfuse_tpa --phases prefill --prefill-seqs 1024,4096`,
# `benchmarks/results/tpa-cpu-blocked-2026-12-06.json`); the attention alone is slower still, so the ratio below
# is a lower bound, and the planner leaves CPU prefill to the other kernels.
CPU_DECODE_ROWS = 16
CPU_BLOCKED_RATIO = 4.0


def formation(shape: Mapping[str, Any], spec: DeviceSpec, ranks: tuple[int, int, int]) -> Estimate:
    """Forming the factorized sides (``ranks``: (q, k, v), 0 = plain) in memory, as the graph does when any kernel
    but ``tpa`` runs the site: read the factors, write the formed tensors (their read is the kernel's)."""
    b, h, hk, lq, lk, d, dv, elem = _dims(shape)
    sides = [(r, n, width, length) for r, n, width, length in zip(ranks, (h, hk, hk), (d, d, dv), (lq, lk, lk)) if r]
    flops = sum(2.0 * b * length * n * width * r for r, n, width, length in sides)
    nbytes = sum(float(b * length * (r * (n + width) + n * width) * elem) for r, n, width, length in sides)
    return tiles.roofline(flops, nbytes, 0.0, len(sides), spec, tiles.dtype_name(elem))
