"""The Triton kernels of the ``tpa`` family: launch and autograd (kernels: `_triton_fwd`, `_triton_bwd`).

`attention` attends over sides given as factors (``Factors``: ``a`` (B, L, H, R), ``b`` (B, L, R, D), ``scale``)
or plain (B, H, L, D) tensors, in any mix.  Every Q/K/V tile a kernel uses is formed in registers from its
factor tiles (fp32 accumulation, one rounding to the input dtype); no kernel writes a formed Q/K/V tensor.

* forward: one program per (query tile, query head, batch), the online softmax of flash (base 2, fp32) over the
  key tiles the band reaches (masked edges around an unmasked middle; tiles outside the band are never read);
  it saves each row's statistics (max, log2 of the sum) for the backward.
* split-K decode (`num_key_splits`: query sides up to `DECODE_ROWS` rows against long keys, as flash's decode):
  a third grid axis splits each program's keys; every split forms its own K/V tiles from the factors and writes
  an fp32 partial output with its statistics, which flash's `combine_kernel` merges exactly by them (the
  statistics it writes are the unsplit ones, so the backward is unchanged).
* backward: ``delta = rowsum(O * dO)`` (torch), then `dkdv_kernel` (per key tile and K/V head, over its query
  heads) and `dq_kernel` (per query tile and head) recompute the probabilities from the statistics; they write
  dQ/dK/dV per head in fp32 and `_side_grads` contracts those to the factor gradients with torch ops
  (``da = scale * dX . b`` over d, ``db = scale * sum_h a * dX``).
* rows that see no key (`dead_rows`): NaN (0 / 0, eager's softmax) or 0 with ``sdpa_form`` in the forward.  The
  kernels let them contribute nothing; `_dead_nan` then puts eager's NaN pattern (the textbook, masked_fill
  spelling) into the per-head gradients with torch ops, before they are contracted to the factors: NaN in all
  of dV of their K/V head, in their dQ row and in dK at the keys of their band that no bool mask replaced (a
  dead row's score gradient is NaN there: only an additive -inf bias leaves such keys).  With ``sdpa_form``
  (SDPA's safe softmax) such rows have no gradient at all.

Not done here: a split backward (dK/dV already run one program per key tile; dQ one per query tile and head over
its band); eager's ``0 * NaN`` for NaN/Inf in V outside a row's band (tiles outside the band are skipped, as
flash's window path).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from ...costmodel.tiles import UNBOUNDED, TileConfig, band, num_splits, widths
from ...device import triton_unsupported
from .._launch import LOG2E, launch, pow2, precision, spec_for
from ..flash.fwd import combine_kernel
from ._triton_bwd import dkdv_kernel, dq_kernel
from ._triton_fwd import fwd_kernel

__all__ = ["DECODE_ROWS", "MAX_RANK", "attention", "backward", "configs", "dead_rows", "forward", "num_key_splits",
           "runs"]

MAX_RANK = 16  # ranks the kernels take (each rank is one unrolled multiply-add per formed tile)
DECODE_ROWS = 16  # query sides up to this long split their keys over programs (split-K decode)
_FLT_MAX = 3.4028234663852886e38
# flash's MASK_KIND values: none, additive bias, bool with -inf, bool with a finite fill
_NONE, _BIAS, _BOOL, _BOOL_FILL = 0, 1, 2, 3


def _plain(x) -> bool:
    return isinstance(x, torch.Tensor)


def _tensors(x) -> tuple[torch.Tensor, ...]:
    return (x,) if _plain(x) else (x.a, x.b)


def _dims(x) -> tuple[int, int, int]:
    """(heads, length, head dim) of a side."""
    return (x.shape[1], x.shape[2], x.shape[3]) if _plain(x) else (x.a.shape[2], x.a.shape[1], x.b.shape[3])


def runs(q, k, v) -> bool:
    """Whether the Triton kernels take this call: every tensor of every side on one device (CUDA, or the CPU
    under ``TRITON_INTERPRET=1``) in one dtype (float16, bfloat16, float32), head dims up to 256, ranks up to
    `MAX_RANK`, no empty dimension.  Sides may be `Factors` or plain (B, H, L, D) tensors, in any mix."""
    ts = [t for x in (q, k, v) for t in _tensors(x)]
    if any(t.dim() != 4 or t.numel() == 0 for t in ts):
        return False
    if len({t.device for t in ts}) != 1 or len({t.dtype for t in ts}) != 1:
        return False
    if any(not _plain(x) and x.a.shape[3] > MAX_RANK for x in (q, k, v)):
        return False
    dim = max(_dims(q)[2], _dims(v)[2])
    return triton_unsupported(ts[0].device.type, ts[0].dtype, dim) is None


def configs(lq: int, d: int, dv: int, elem: int) -> tuple[TileConfig, TileConfig]:
    """The (forward, backward) tiles launched on a GPU: the forward's query tile shrinks for short query sides
    (decode), both shrink for head dims over 128 or fp32 (their formed tiles live in registers and shared
    memory).  `tests/kernels/tpa/test_tpa_aot.py` compiles these for sm_80/sm_90."""
    big = max(d, dv) > 128 or elem > 2
    block_m = min(64 if big else 128, max(16, triton.next_power_of_2(lq)))
    fwd = TileConfig(block_m, 32 if big else 64, 8 if block_m >= 128 else 4, 2)
    bwd = TileConfig(32 if big else 64, 32 if big else 64, 4, 1)
    return fwd, bwd


def _strides(x) -> tuple:
    """(A, B, 9 strides: a's b/l/h/r, b's b/h/l/r/d, scale, R, factorized) of a side (`_triton_fwd`)."""
    if _plain(x):
        sb, sh, sl, sd = x.stride()
        return x, x, (0, 0, 0, 0, sb, sh, sl, 0, sd), 1.0, 1, False
    a, b = x.a, x.b
    return a, b, (a.stride(0), a.stride(1), a.stride(2), a.stride(3), b.stride(0), 0, b.stride(1), b.stride(2),
                  b.stride(3)), float(x.scale), int(a.shape[3]), True


def _mask_args(key_mask, mask_fill, dummy, bsz, lk):
    """(mask or a dummy pointer, batch and key strides of its (B, 1, 1, Lk) broadcast, MASK_KIND, fill2)."""
    if key_mask is None:
        return dummy, 0, 0, _NONE, 0.0
    m = key_mask.reshape((1,) * (4 - key_mask.dim()) + tuple(key_mask.shape)).expand(bsz, 1, 1, lk)
    sb, sn = m.stride(0), m.stride(3)
    if key_mask.dtype != torch.bool:
        return m, sb, sn, _BIAS, 0.0
    if mask_fill is None or mask_fill == float("-inf"):
        return m, sb, sn, _BOOL, 0.0
    return m, sb, sn, _BOOL_FILL, max(float(mask_fill) * LOG2E, -_FLT_MAX)


class _Launch:
    """Everything both directions pass to the kernels for one call."""

    def __init__(self, q, k, v, key_mask, *, scale, causal, softcap, window_left, window_right, kv_groups,
                 mask_fill, sdpa_form, config):
        self.q, self.k, self.v = q, k, v
        h, self.lq, self.d = _dims(q)
        _, self.lk, self.dv = _dims(v)
        self.h, self.groups = h, int(kv_groups)
        first = _tensors(q)[0]
        self.bsz, self.dtype, self.device = first.shape[0], first.dtype, first.device
        self.wl, self.wr = widths(*band((window_left, window_right), causal))
        self.sides = [_strides(x) for x in (q, k, v)]
        self.mask = _mask_args(key_mask, mask_fill, self.sides[0][1], self.bsz, self.lk)
        self.scale, self.sdpa_form = float(scale), bool(sdpa_form)
        self.softcap = float(softcap)
        self.qk_scale = self.scale * LOG2E
        self.cap_scale = 2.0 * self.scale / self.softcap * LOG2E if self.softcap else 0.0
        self.softcap2 = self.softcap * LOG2E
        self.cfg = config or configs(self.lq, self.d, self.dv, first.element_size())

    def args(self, *outs):
        """Pointers (sides, mask, ``outs``), then every side's strides and the mask's."""
        (qa, qb, qs, *_), (ka, kb, ks, *_), (va, vb, vs, *_) = self.sides
        m, smb, smn, _, _ = self.mask
        return [qa, qb, ka, kb, va, vb, m, *outs, *qs, *ks, *vs, smb, smn]

    def meta(self, cfg: TileConfig, **extra):
        (_, _, _, _, rq, fq), (_, _, _, _, rk, fk), (_, _, _, _, rv, fv) = self.sides
        return dict(GROUPS=self.groups, HEAD_DIM=self.d, HEAD_DIM_V=self.dv, BLOCK_D=pow2(self.d),
                    BLOCK_DV=pow2(self.dv), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, RQ=rq, RK=rk, RV=rv,
                    Q_FACT=fq, K_FACT=fk, V_FACT=fv, MASK_KIND=self.mask[3], HAS_SOFTCAP=bool(self.softcap),
                    EVEN_M=self.lq % cfg.block_m == 0, EVEN_N=self.lk % cfg.block_n == 0,
                    PRECISION=precision(self.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra)

    def split_len(self, block_n: int) -> int:
        return triton.cdiv(self.lk, block_n) * block_n + block_n

    def side_scales(self):
        return tuple(s[3] for s in self.sides)


def num_key_splits(run: _Launch, cfg: TileConfig, splits: int | None) -> tuple[int, int]:
    """(splits, keys per split) of the forward: as flash's decode, enough programs to fill the SMs when a query
    side of at most `DECODE_ROWS` rows cannot (``splits``: that many instead, for any query side), at most one
    split per key tile of the keys a program visits (a two-sided band bounds them)."""
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 1):
        raise ValueError(f"attnfuse tpa: splits={splits!r}; allowed: None (chosen) or an int >= 1")
    keys = run.lk
    if run.wl < UNBOUNDED and run.wr < UNBOUNDED:
        keys = min(keys, cfg.block_m + run.wl + run.wr + cfg.block_n)
    if splits is None:
        first = _tensors(run.q)[0]
        splits = 1 if run.lq > DECODE_ROWS else num_splits(cfg, run.lq, keys, run.bsz * run.h, spec_for(first))
    n = min(splits, max(1, triton.cdiv(keys, cfg.block_n)))
    if n == 1:
        return 1, run.split_len(cfg.block_n)
    return n, triton.cdiv(triton.cdiv(keys, n), cfg.block_n) * cfg.block_n


def forward(q, k, v, key_mask=None, *, config: tuple[TileConfig, TileConfig] | None = None,
            splits: int | None = None, **kw):
    """(out (B, H, Lq, Dv) in q's dtype, stats (B, H, Lq, 2) fp32: each row's score max and log2 of its sum of
    exp2(score - max), base 2; max -inf for a row that sees no key).  Keywords: `attention`'s."""
    run = _Launch(q, k, v, key_mask, config=config, **kw)
    cfg = run.cfg[0]
    n_split, split_len = num_key_splits(run, cfg, splits)
    out = torch.empty(run.bsz, run.h, run.lq, run.dv, dtype=run.dtype, device=run.device)
    stats = torch.empty(run.bsz, run.h, run.lq, 2, dtype=torch.float32, device=run.device)
    if n_split > 1:
        dst = torch.empty(n_split, *out.shape, dtype=torch.float32, device=run.device)
        dst_stats = torch.empty(n_split, *stats.shape, dtype=torch.float32, device=run.device)
        split_strides = (dst.stride(0), dst_stats.stride(0))
    else:
        dst, dst_stats, split_strides = out, stats, (0, 0)
    grid = (triton.cdiv(run.lq, cfg.block_m), run.bsz * run.h, n_split)
    launch(fwd_kernel)[grid](
        *run.args(dst, dst_stats), *dst.stride()[-4:], *split_strides, run.h, run.lq, run.lk, run.wl, run.wr,
        split_len, *run.side_scales(), run.qk_scale, run.cap_scale, run.softcap2, run.mask[4],
        **run.meta(cfg, SDPA_FORM=run.sdpa_form, SPLIT=n_split > 1,
                   EVEN_D=run.d == pow2(run.d) and run.dv == pow2(run.dv)))
    if n_split > 1:
        rows = run.bsz * run.h * run.lq
        launch(combine_kernel)[(rows,)](
            dst, dst_stats, out, stats, *out.stride(), run.h, run.lq, rows, n_split, HEAD_DIM_V=run.dv,
            BLOCK_DV=pow2(run.dv), BLOCK_S=max(2, triton.next_power_of_2(n_split)), num_warps=4)
        if run.sdpa_form:  # the combine leaves 0 / 0 = NaN in a row without keys
            out.masked_fill_(dead_rows(stats)[..., None], 0.0)
    return out, stats


def dead_rows(stats: torch.Tensor) -> torch.Tensor:
    """(B, H, Lq) bool: the rows that saw no key (their output is NaN, or 0 with ``sdpa_form``)."""
    return torch.isneginf(stats[..., 0])


def _side_grads(x, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The gradients of a side's tensors from the fp32 gradient of the (B, H, L, D) tensor it stands for."""
    if _plain(x):
        return (grad.to(x.dtype),)
    b32 = x.b.float()
    da = torch.einsum("bhld,blrd->blhr", grad, b32) * x.scale
    db = torch.einsum("bhld,blhr->blrd", grad, x.a.float()) * x.scale
    return da.to(x.a.dtype), db.to(x.b.dtype)


def backward(grad_out, q, k, v, key_mask, out, stats, *, config=None, **kw):
    """The gradients of every tensor of q, k and v (a, b for factors; the tensor for a plain side), in order,
    with eager's NaN pattern for rows without keys (`_dead_nan`)."""
    run = _Launch(q, k, v, key_mask, config=config, **kw)
    cfg = run.cfg[1]
    delta = (out.float() * grad_out.float()).sum(-1)
    delta = torch.where(dead_rows(stats), 0.0, delta).contiguous()
    hkv = run.h // run.groups
    dq = torch.empty(run.bsz, run.h, run.lq, run.d, dtype=torch.float32, device=run.device)
    dk = torch.empty(run.bsz, hkv, run.lk, run.d, dtype=torch.float32, device=run.device)
    dv = torch.empty(run.bsz, hkv, run.lk, run.dv, dtype=torch.float32, device=run.device)
    scalars = (*run.side_scales(), run.scale, run.qk_scale, run.cap_scale, run.softcap2, run.mask[4])
    meta = run.meta(cfg)
    launch(dkdv_kernel)[(triton.cdiv(run.lk, cfg.block_n), run.bsz * hkv)](
        *run.args(grad_out, stats, delta, dk, dv), *grad_out.stride(), run.h, run.lq, run.lk, run.wl, run.wr,
        *scalars, **meta)
    launch(dq_kernel)[(triton.cdiv(run.lq, cfg.block_m), run.bsz * run.h)](
        *run.args(grad_out, stats, delta, dq), *grad_out.stride(), run.h, run.lq, run.lk, run.wl, run.wr,
        run.split_len(cfg.block_n), *scalars, **meta)
    _dead_nan(run, key_mask, stats, dq, dk, dv)
    return (*_side_grads(q, dq), *_side_grads(k, dk), *_side_grads(v, dv))


def _dead_nan(run: _Launch, key_mask, stats, dq, dk, dv) -> None:
    """Put eager's NaN pattern for the rows that saw no key into the fp32 per-head gradients, in place.

    Eager's softmax row is NaN there (with ``sdpa_form``, SDPA's safe softmax: 0 with no gradient, so nothing
    here): its dV reaches every key of the K/V head, and its score gradient is NaN at every key of the row's band
    ``[i - wl, i + wr]`` that no bool mask replaced (masked_fill passes no gradient; an additive bias does), so NaN
    in the row's dQ and in those keys' dK.  Band intervals and prefix sums: no (Lq, Lk) tensor is formed."""
    if run.sdpa_form:
        return
    dead = dead_rows(stats)  # (B, H, Lq)
    if not bool(dead.any()):
        return
    bsz, hkv, lq, lk, dev = run.bsz, run.h // run.groups, run.lq, run.lk, dead.device
    dv.masked_fill_(dead.view(bsz, hkv, -1).any(-1)[..., None, None], float("nan"))
    i = torch.arange(lq, device=dev)
    lo, stop = (i - run.wl).clamp(0, lk), (i + run.wr + 1).clamp(0, lk)  # the band of row i: keys [lo, stop)
    keep = torch.ones(bsz, lk, dtype=torch.bool, device=dev)
    if key_mask is not None and key_mask.dtype == torch.bool:
        keep = key_mask.reshape((1,) * (4 - key_mask.dim()) + tuple(key_mask.shape)).expand(bsz, 1, 1, lk)[:, 0, 0]
    kept = torch.nn.functional.pad(keep.long().cumsum(-1), (1, 0))  # (B, Lk + 1): kept keys before each position
    open_keys = (kept[:, stop] - kept[:, lo]) > 0  # (B, Lq): the band of row i holds a key no bool mask replaced
    nan_rows = dead & open_keys[:, None, :]
    dq.masked_fill_(nan_rows[..., None], float("nan"))
    # dK: the kept keys inside the band of some NaN row of the K/V head's query heads (a difference array)
    rows = nan_rows.view(bsz, hkv, run.groups, lq).any(2).long()  # (B, Hk, Lq)
    edges = torch.zeros(bsz, hkv, lk + 1, dtype=torch.long, device=dev)
    edges.index_add_(2, lo, rows)
    edges.index_add_(2, stop, -rows)
    covered = edges.cumsum(-1)[..., :lk] > 0
    dk.masked_fill_((covered & keep[:, None, :])[..., None], float("nan"))


class _Side(NamedTuple):
    """A factorized side rebuilt from saved tensors (`Factors`' fields)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


def _layout(x) -> float | None:
    return None if _plain(x) else float(x.scale)


def _sides(layout, tensors):
    """The sides from their layout (None: plain, else the factors' scale) and their tensors in order."""
    it = iter(tensors)
    return [next(it) if s is None else _Side(next(it), next(it), s) for s in layout]


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layout, key_mask, kw, *tensors):
        out, stats = forward(*_sides(layout, tensors), key_mask, **kw)
        ctx.layout, ctx.kw = layout, {n: x for n, x in kw.items() if n != "splits"}
        ctx.save_for_backward(key_mask, out, stats, *tensors)
        return out

    @staticmethod
    def backward(ctx, grad):
        key_mask, out, stats, *tensors = ctx.saved_tensors
        q, k, v = _sides(ctx.layout, tensors)
        return (None, None, None, *backward(grad.contiguous(), q, k, v, key_mask, out, stats, **ctx.kw))


def attention(q, k, v, key_mask=None, *, scale: float, causal: bool = False, softcap: float = 0.0,
              window_left: int = -1, window_right: int = -1, kv_groups: int = 1, mask_fill: float | None = None,
              sdpa_form: bool = False, config: tuple[TileConfig, TileConfig] | None = None,
              splits: int | None = None) -> torch.Tensor:
    """`attnfuse.kernels.tpa.attention` on the Triton kernels (module docstring), differentiable in every tensor
    of every side (not the key mask).  ``config``: the (forward, backward) tiles instead of `configs`';
    ``splits``: the forward's key splits instead of `num_key_splits`' choice."""
    kw = dict(scale=scale, causal=causal, softcap=softcap, window_left=window_left, window_right=window_right,
              kv_groups=kv_groups, mask_fill=mask_fill, sdpa_form=sdpa_form, config=config, splits=splits)
    tensors = [t for x in (q, k, v) for t in _tensors(x)]
    mask = None if key_mask is None else key_mask.detach()
    return _Attention.apply(tuple(_layout(x) for x in (q, k, v)), mask, kw, *tensors)
