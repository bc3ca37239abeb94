"""The flash launcher: `forward` and `backward` turn tensors and keywords into kernel arguments (mask kind and
strides, scalars in log2 units, ALiBi slopes, sinks, block-sparse tile maps), pick the tile once per call
(or run the given ``config``), size the grids and launch the kernels of `fwd`, `bwd` and `bwd_dq`."""

from __future__ import annotations

import math

import torch
import triton

from ...costmodel.tiles import TileConfig, band, num_splits, pick, widths
from .. import tilemap
from .._launch import LOG2E, hint, launch, mask_elem, pow2, precision, spec_for
from ..reference import sink_error, sink_grad, sink_table, sum_to, window_pad_error
from .bwd import bwd_dkdv_kernel, bwd_preprocess
from .bwd_dq import bwd_dq_kernel
from .fwd import combine_kernel, fwd_kernel

__all__ = ["MASK_BIAS", "MASK_BIAS_FLOOR", "MASK_BOOL", "MASK_BOOL_FILL", "MASK_NONE", "backward", "forward"]

_FLT_MAX = 3.4028234663852886e38
# MASK_KIND: no mask, additive bias, bool mask filled with -inf, bool mask with a finite fill, block-sparse
# additive mask (entries <= finfo.min are -inf).  The fill is a constexpr choice rather than a -inf scalar
# argument so that a traced launch never carries an inf.
MASK_NONE, MASK_BIAS, MASK_BOOL, MASK_BOOL_FILL, MASK_BIAS_FLOOR = 0, 1, 2, 3, 4


def _band_mode(window: tuple[int, int], causal: bool, block_sparse: bool) -> tuple[bool, bool, int, int]:
    """(IS_CAUSAL, HAS_WINDOW, left, right): a plain causal band runs the causal path (the one that keeps
    eager's NaN from V right of the diagonal), any other band, or any band under block-sparse, the window path."""
    left, right = band(window, causal)
    is_causal = (left, right) == (-1, 0) and not block_sparse
    return is_causal, (left, right) != (-1, -1) and not is_causal, left, right


def _nonfinite(v: torch.Tensor) -> torch.Tensor:
    """Device flag: does V hold a NaN/Inf (no host sync; the causal forward then visits every tile).

    One reduction and no V-sized temporary: min + max is NaN/Inf iff V holds a NaN, an inf or a -inf.
    """
    lo, hi = torch.aminmax(v)
    total = lo.float() + hi.float()
    return (total - total) != 0  # NaN exactly when total is NaN or +-inf


def _mask_args(mask, mask_fill, q, b, h, lq, lk, block_sparse=False):
    """(mask tensor or q as a dummy pointer, its 4 broadcast strides, MASK_KIND, fill in log2 units).

    Block-sparse masked entries are -inf whatever the fill, like the empty tiles the map skips: a bool mask
    ignores ``mask_fill``; an additive one treats entries <= finfo(dtype).min as -inf (``fill2`` carries
    that threshold)."""
    if mask is None:
        return q, (0, 0, 0, 0), MASK_NONE, 0.0
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(b, h, lq, lk)  # a view: broadcast dims get stride 0, nothing is copied
    if mask.dtype != torch.bool:
        if block_sparse:
            return m, tuple(m.stride()), MASK_BIAS_FLOOR, float(torch.finfo(mask.dtype).min)
        return m, tuple(m.stride()), MASK_BIAS, 0.0
    if block_sparse or mask_fill is None or mask_fill == float("-inf"):
        return m, tuple(m.stride()), MASK_BOOL, 0.0
    # finfo.min * log2(e) must stay finite: a fully masked row is uniform, as in eager
    return m, tuple(m.stride()), MASK_BOOL_FILL, max(float(mask_fill) * LOG2E, -_FLT_MAX)


def _scalars(q, scale, softcap):
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    cap_scale = 2.0 * sm_scale / softcap * LOG2E if softcap else 0.0
    return sm_scale, sm_scale * LOG2E, cap_scale, softcap * LOG2E


def _alibi_arg(alibi, q):
    """The ALiBi slopes as the kernels read them (fp32, contiguous, on q's device), or q as a dummy pointer."""
    if alibi is None:
        return q
    if tuple(alibi.shape) != (q.shape[1],):
        raise ValueError(f"attnfuse flash: alibi holds one slope per query head, shape ({q.shape[1]},); "
                         f"got {tuple(alibi.shape)}")
    return alibi.detach().to(device=q.device, dtype=torch.float32).contiguous()


def _map_args(tile_map: torch.Tensor | None, q):
    """A block-sparse map (or q as a dummy pointer) and its (batch, head, tile) strides, 0 where broadcast."""
    if tile_map is None:
        return q, (0, 0, 0)
    return tile_map, tuple(0 if n == 1 else st for n, st in zip(tile_map.shape[:2], tile_map.stride()[:2])) + (
        tile_map.stride(2),)


def _tile_maps(block_sparse, mask, b, h, hkv, lq, lk, cfg, left, right, tile_map=None):
    if tile_map is not None:  # precomputed (e.g. top-k's selection): a TileMap, or built for the chosen tile
        return tile_map(cfg) if callable(tile_map) else tile_map
    if not block_sparse:
        return None
    if mask is None:
        raise ValueError("attnfuse flash: block_sparse=True needs the constant mask its tile map is built from")
    return tilemap.tile_map(mask, batch=b, heads=h, kv_heads=hkv, q_len=lq, kv_len=lk, block_m=cfg.block_m,
                            block_n=cfg.block_n, window=(left, right))


def forward(q, k, v, mask=None, seed=None, *, scale=None, causal=False, softcap=0.0, dropout_p=0.0,
            mask_fill=None, config: TileConfig | None = None, splits: int | None = None,
            alibi: torch.Tensor | None = None, window_size: tuple[int, int] = (-1, -1), block_sparse: bool = False,
            tile_map=None, window_pad: bool = False, sinks: torch.Tensor | None = None):
    """(out, stats): out is (B, H, Lq, Dv) laid out as (B, Lq, H, Dv); stats is (B, H, Lq, 2) fp32, each row's
    score max and the log2 of its sum of exp2(score - max), in log2 units (what the backward needs).

    ``alibi``: (H,) slopes, ``s += alibi[h] * (j - i)`` (a constant: no gradient).  ``window``: the band
    (left, right), -1 unbounded; ``causal`` folds in as right = 0.  ``block_sparse``: ``mask`` is a constant
    whose tile map (`tilemap.tile_map`, cached per mask) lists each query tile's non-empty key tiles;
    its masked entries are -inf (see `_mask_args`) and the launch is never split.  ``tile_map``: instead of a
    mask's, a precomputed `tilemap.TileMap` for ``config``'s tile, or a callable ``(TileConfig) -> TileMap``
    (used with mask=None; implies block_sparse; partial tiles get only the band, causal included).
    ``window_pad``: a padded window (`attnfuse.kernels.reference`: the band's positions outside the sequence are
    keys of score 0 and value 0); needs a finite band and ``q_len == kv_len``.  ``sinks``: attention sinks,
    (H,) or broadcastable to (B, H) (`attnfuse.kernels.reference`), one key of that score and value 0 per row.
    """
    block_sparse = block_sparse or tile_map is not None
    _check_window_pad(window_pad, window_size, causal, q, k, alibi, block_sparse)
    sk, s_strides = _sink_args(sinks, q)
    b, h, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    # head dims and the group size are compile-time constants of the kernel: specialize on them (a guard)
    d, dv, groups = int(d), int(dv), int(h // hkv)
    elem = q.element_size()
    rows = lq * groups
    spec = spec_for(q)
    is_causal, has_window, left, right = _band_mode(window_size, causal, block_sparse)
    wl, wr = widths(left, right)
    # the tile and split choice only affects speed: under dynamic shapes it uses the size hints (no guards)
    hrows, hlk, hbh = hint(rows), hint(lk), hint(b * hkv)
    cfg = config or pick("fwd", hrows, hlk, hbh, d, dv, elem, spec, mask_elem(mask), groups, (left, right))
    # the keys one program visits, which splits share: a two-sided band bounds them whatever the shapes
    keys = lk
    if has_window and left >= 0 and right >= 0:
        keys = (cfg.block_m - 1) // groups + 1 + wl + wr + cfg.block_n
    hkeys = min(hlk, hint(keys))
    n_split = 1 if block_sparse else min(splits or num_splits(cfg, hrows, hkeys, hbh, spec),
                                         max(1, triton.cdiv(hkeys, cfg.block_n)))
    # splits past the end of a shorter K/V (or band) get no keys; the combine gives them weight 0
    split_len = triton.cdiv(triton.cdiv(keys, n_split), cfg.block_n) * cfg.block_n
    m, m_strides, mask_kind, fill2 = _mask_args(mask, mask_fill, q, b, h, lq, lk, block_sparse)
    maps = _tile_maps(block_sparse, mask, b, h, hkv, lq, lk, cfg, left, right, tile_map)
    tmap, t_strides = _map_args(maps.rows if maps else None, q)
    _, qk_scale, cap_scale, softcap2 = _scalars(q, scale, softcap)
    out = q.new_empty(b, lq, h, dv).transpose(1, 2)
    stats = torch.empty(b, h, lq, 2, dtype=torch.float32, device=q.device)
    if n_split > 1:
        part = torch.empty(n_split, b, h, lq, dv, dtype=torch.float32, device=q.device)
        part_stats = torch.empty(n_split, b, h, lq, 2, dtype=torch.float32, device=q.device)
        dst, dst_stats, o_strides, ls = part, part_stats, part.stride(), part_stats.stride(0)
    else:
        dst, dst_stats, o_strides, ls = out, stats, (0, *out.stride()), 0
    bd, bdv = pow2(d), pow2(dv)
    grid = (triton.cdiv(rows, cfg.block_m), b * hkv, n_split)
    launch(fwd_kernel)[grid](
        q, k, v, m, q if seed is None else seed, _nonfinite(v) if is_causal else q, _alibi_arg(alibi, q), tmap,
        sk, dst, dst_stats, *q.stride(), *k.stride(), *v.stride(), *m_strides, *t_strides, *s_strides, *o_strides,
        ls,
        h, lq, lk, split_len, wl, wr, int(window_pad), qk_scale, cap_scale, softcap2, fill2, float(dropout_p),
        GROUPS=groups, HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_D=bd, BLOCK_DV=bdv, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, IS_CAUSAL=is_causal, HAS_WINDOW=has_window, BLOCK_SPARSE=block_sparse,
        MASK_KIND=mask_kind, HAS_SOFTCAP=bool(softcap), HAS_ALIBI=alibi is not None, HAS_DROPOUT=dropout_p > 0,
        EVEN_M=rows % cfg.block_m == 0, EVEN_N=lk % cfg.block_n == 0, EVEN_D=(d == bd and dv == bdv),
        PRECISION=precision(q.dtype), HAS_SINKS=sinks is not None, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    if n_split > 1:
        launch(combine_kernel)[(b * h * lq,)](
            part, part_stats, out, stats, *out.stride(), h, lq, b * h * lq, n_split,
            HEAD_DIM_V=dv, BLOCK_DV=bdv, BLOCK_S=max(2, triton.next_power_of_2(n_split)), num_warps=4)
    return out, stats


def _sink_args(sinks, q):
    """(the sinks as an fp32 (1 | B, H) tensor on q's device, or q as a dummy pointer; its (batch, head) strides)."""
    if sinks is None:
        return q, (0, 0)
    why = sink_error(sinks, q.shape[0], q.shape[1], q.dtype)
    if why:
        raise ValueError(f"attnfuse flash: {why}")
    table = sink_table(sinks, q.shape[0], q.shape[1], torch.float32).to(q.device)
    return table, (table.stride(0) if table.shape[0] > 1 else 0, table.stride(1))


def _sink_grad(sinks, stats, delta):
    """d sink = -sum_i P_sink(i) * delta_i, with P_sink = exp2(sink * log2(e) - m - log2(l)) from the saved
    statistics (they include the sink) and delta_i = rowsum(dO * O)."""
    table = sink_table(sinks, stats.shape[0], stats.shape[1], torch.float32).to(stats.device)
    p_sink = torch.exp2(table[:, :, None] * LOG2E - stats[..., 0] - stats[..., 1])
    return sink_grad(-(p_sink * delta).sum(-1), sinks)


def _check_window_pad(window_pad, window_size, causal, q, k, alibi, block_sparse) -> None:
    if window_pad:
        why = window_pad_error(*window_size, causal, q.shape[-2], k.shape[-2], alibi=alibi is not None,
                               block_sparse=block_sparse)
        if why:
            raise ValueError(f"attnfuse flash: {why}")


def _dead_rows_nan(stats, dv):
    """A row with no visible key is NaN in the forward, and eager's dV = P^T dO sums its NaN probabilities into
    every key of its K/V head; the band and block-sparse kernels skip most of those keys' tiles, so the NaN
    is written here.  (Its masked scores get no gradient, as under eager's masked_fill: dQ/dK stay finite.)"""
    b, hkv = dv.shape[:2]
    dead = torch.isneginf(stats.select(-1, 0)).reshape(b, hkv, -1).any(-1)
    dv.masked_fill_(dead.reshape(b, hkv, 1, 1), float("nan"))


def backward(grad_out, q, k, v, out, stats, mask=None, seed=None, *, scale=None, causal=False, softcap=0.0,
             dropout_p=0.0, mask_fill=None, mask_grad=False, deterministic=True,
             config: TileConfig | None = None, alibi: torch.Tensor | None = None,
             window_size: tuple[int, int] = (-1, -1),
             block_sparse: bool = False, tile_map=None, window_pad: bool = False, sinks: torch.Tensor | None = None):
    """(dq, dk, dv, dmask or None[, dsinks]); ``dsinks`` (`_sink_grad`) only when ``sinks`` is given: ``stats``
    include the sink, whose ``dp`` is 0, so the kernels' dS of every real key is unchanged.
    ``deterministic`` computes dQ in its own pass instead of fp32 atomics.
    ``alibi``/``window``/``block_sparse``/``tile_map`` as in `forward` (a block-sparse mask is a constant: no
    ``mask_grad``).  ``window_pad`` changes nothing here: ``stats`` already count the padded keys, whose
    ``dp = dO . 0`` is 0, so ``delta = rowsum(O * dO)`` and every real key's dS are unchanged."""
    block_sparse = block_sparse or tile_map is not None
    _check_window_pad(window_pad, window_size, causal, q, k, alibi, block_sparse)
    if block_sparse and mask_grad:
        raise ValueError("attnfuse flash: a block-sparse mask is a constant and gets no gradient (mask_grad=True)")
    b, h, lq, d = q.shape
    hkv, lk, dv_ = k.shape[1], k.shape[2], v.shape[-1]
    d, dv_, groups = int(d), int(dv_), int(h // hkv)
    elem = q.element_size()
    rows = lq * groups
    spec = spec_for(q)
    is_causal, has_window, left, right = _band_mode(window_size, causal, block_sparse)
    cfg = config or pick("bwd", hint(rows), hint(lk), hint(b * hkv), d, dv_, elem, spec, mask_elem(mask),
                         groups, (left, right))
    m, m_strides, mask_kind, fill2 = _mask_args(mask, mask_fill, q, b, h, lq, lk, block_sparse)
    maps = _tile_maps(block_sparse, mask, b, h, hkv, lq, lk, cfg, left, right, tile_map)
    sm_scale, qk_scale, cap_scale, softcap2 = _scalars(q, scale, softcap)
    bd, bdv = pow2(d), pow2(dv_)
    delta = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
    launch(bwd_preprocess)[(triton.cdiv(lq, 64), b * h)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), h, lq,
        HEAD_DIM_V=dv_, BLOCK_DV=bdv, BLOCK_M=64, num_warps=4)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    separate_dq = deterministic or mask_grad
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if separate_dq else torch.zeros(
        q.shape, dtype=torch.float32, device=q.device)
    common = dict(GROUPS=groups, HEAD_DIM=d, HEAD_DIM_V=dv_, BLOCK_D=bd, BLOCK_DV=bdv, BLOCK_M=cfg.block_m,
                  BLOCK_N=cfg.block_n, IS_CAUSAL=is_causal, HAS_WINDOW=has_window, BLOCK_SPARSE=block_sparse,
                  MASK_KIND=mask_kind, HAS_SOFTCAP=bool(softcap), HAS_ALIBI=alibi is not None,
                  HAS_DROPOUT=dropout_p > 0, EVEN_M=rows % cfg.block_m == 0, EVEN_N=lk % cfg.block_n == 0,
                  PRECISION=precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    sd = q if seed is None else seed
    al = _alibi_arg(alibi, q)
    scalars = (h, lq, lk, *widths(left, right), sm_scale, qk_scale, cap_scale, softcap2, fill2, float(dropout_p))
    cmap, c_strides = _map_args(maps.cols if maps else None, q)
    launch(bwd_dkdv_kernel)[(triton.cdiv(lk, cfg.block_n), b * hkv)](
        q, k, v, m, sd, al, cmap, grad_out, stats, delta, dq, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *m_strides, *c_strides, *grad_out.stride(), *dq.stride(),
        *dk.stride(), *dv.stride(), *scalars, ATOMIC_DQ=not separate_dq, **common)
    dm = None
    if separate_dq:
        dm = torch.zeros(b, h, lq, lk, dtype=torch.float32, device=q.device) if mask_grad else None
        rmap, r_strides = _map_args(maps.rows if maps else None, q)
        launch(bwd_dq_kernel)[(triton.cdiv(rows, cfg.block_m), b * hkv)](
            q, k, v, m, sd, al, rmap, grad_out, stats, delta, dq, q if dm is None else dm,
            *q.stride(), *k.stride(), *v.stride(), *m_strides, *r_strides, *grad_out.stride(), *dq.stride(),
            *scalars, MASK_GRAD=mask_grad, **common)
    else:
        dq = dq.to(q.dtype)
    if has_window or block_sparse:
        _dead_rows_nan(stats, dv)
    if dm is not None:
        dm = sum_to(dm, mask.shape).to(mask.dtype)
    if sinks is not None:
        return dq, dk, dv, dm, _sink_grad(sinks, stats, delta)
    return dq, dk, dv, dm
