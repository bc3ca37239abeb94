"""The ``tpa`` family on the CPU: attention from factors, one block of formed K/V at a time, or none at all.

* **Blocked** (`_Blocked`, any query length): the keys are taken ``KEY_BLOCK`` at a time; each block's K/V are
  formed from their factors in the compute dtype (float32; float64 for float64 inputs), expanded to the query
  heads, attended by `attnfuse.kernels._partial` (the ring's exact partials: unnormalized output, row max, row
  sum, merged across blocks) and dropped.  Blocks the band leaves empty are neither formed nor read.  The
  backward re-forms each block and contracts its dK/dV into the factors' gradients
  (``da = scale * dK . b`` over the head dim, ``db = scale * sum_h a * dK``), so no formed K/V outlives its block.
* **Decode** (`_decode`, at most `DECODE_ROWS` query rows, K and V both factorized): the scores and the output
  are taken from the factors directly, by reassociation,

      s[h, i, t] = scale_k * sum_r a_k[t, h, r] * (b_k[t, r, :] . q[h, i, :])
      o[h, i, :] = scale_v * sum_t sum_r (p[h, i, t] * a_v[t, h, r]) * b_v[t, r, :]

  so a step over a cache of factors reads ``R * (H + D)`` numbers per token for K and for V, never the ``H * D`` of
  formed K/V.  Split-K: the cache is taken `DECODE_BLOCK` tokens at a time and the partials merged.  Plain torch
  ops under autograd (gradients reach the factors; decode is mostly run without grad).

Semantics are `attnfuse.kernels.tpa.reference`'s; a row that sees no key is NaN, or 0 with ``sdpa_form``, with
eager's NaN pattern in the gradients (as `attnfuse.parallel`'s ring, whose rule this follows).
"""

from __future__ import annotations

import math

import torch

from .. import _partial
from ._factors import Factors, form

__all__ = ["DECODE_BLOCK", "DECODE_ROWS", "KEY_BLOCK", "attention"]

KEY_BLOCK = 1024  # keys formed at a time by the blocked path
DECODE_ROWS = 16  # at most this many query rows take the decode path
DECODE_BLOCK = 8192  # cache tokens per split of the decode path


def _ct(*xs: torch.Tensor) -> torch.Tensor:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _tensors(x) -> tuple[torch.Tensor, ...]:
    return (x.a, x.b) if isinstance(x, Factors) else (x,)


def _key_mask(key_mask: torch.Tensor | None, batch: int, lk: int, ct: torch.dtype) -> torch.Tensor | None:
    """The key mask as (B | 1, 1, 1, Lk): bool as given, a bias in the compute dtype."""
    if key_mask is None:
        return None
    m = key_mask.reshape((1,) * (4 - key_mask.dim()) + tuple(key_mask.shape))
    m = m.expand(m.shape[0], 1, 1, lk).contiguous()
    return m if m.dtype == torch.bool else m.to(ct)


def attention(q, k, v, key_mask=None, *, scale: float, causal: bool, softcap: float, window_left: int,
              window_right: int, kv_groups: int, mask_fill: float | None, sdpa_form: bool) -> torch.Tensor:
    """`attnfuse.kernels.tpa.attention` on CPU tensors (arguments checked by the caller)."""
    sides = (q, k, v)
    tensors = [t for s in sides for t in _tensors(s)]
    ct = _ct(*tensors)
    qdtype = (q.a if isinstance(q, Factors) else q).dtype
    lq = q.length if isinstance(q, Factors) else q.shape[-2]
    lk = k.length if isinstance(k, Factors) else k.shape[-2]
    batch = tensors[0].shape[0]
    cfg = {"scale": float(scale), "softcap": float(softcap), "left": int(window_left),
           "right": _partial.right_edge(causal, int(window_right)), "groups": int(kv_groups),
           "fill": -math.inf if mask_fill is None else float(mask_fill), "sdpa_form": bool(sdpa_form), "ct": ct}
    mask = _key_mask(key_mask, batch, lk, ct)
    if lq <= DECODE_ROWS and isinstance(k, Factors) and isinstance(v, Factors):
        return _decode(form(q, ct), k, v, mask, cfg).to(qdtype)
    layout = tuple((isinstance(s, Factors), s.scale if isinstance(s, Factors) else 1.0) for s in sides)
    return _Blocked.apply(mask, cfg, layout, *tensors).to(qdtype)


def _sides(layout, tensors):
    """The (q, k, v) sides rebuilt from `attention`'s flat tensors."""
    out, i = [], 0
    for factored, scale in layout:
        if factored:
            out.append(Factors(tensors[i], tensors[i + 1], scale))
            i += 2
        else:
            out.append(tensors[i])
            i += 1
    return out


def _rows(x, j0: int, j1: int):
    return x.rows(j0, j1) if isinstance(x, Factors) else x[..., j0:j1, :]


def _blocks(lq: int, lk: int, cfg):
    """(key block start, stop) of the blocks some query row sees."""
    rows = (0, lq, 0)
    for j0 in range(0, lk, KEY_BLOCK):
        j1 = min(lk, j0 + KEY_BLOCK)
        if _partial.visible(rows, (0, j1 - j0, j0), cfg["left"], cfg["right"]):
            yield j0, j1


class _Blocked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mask, cfg, layout, *tensors):
        q, k, v = _sides(layout, tensors)
        ct, groups = cfg["ct"], cfg["groups"]
        qq = form(q, ct)
        lq, lk = qq.shape[-2], (k.length if isinstance(k, Factors) else k.shape[-2])
        parts = None
        for j0, j1 in _blocks(lq, lk, cfg):
            kb = _partial.expand_kv(form(_rows(k, j0, j1), ct), groups)
            vb = _partial.expand_kv(form(_rows(v, j0, j1), ct), groups)
            mk = None if mask is None else mask[..., j0:j1]
            part = _partial.partial_forward(qq, kb, vb, mk, (0, lq, 0), (0, j1 - j0, j0), left=cfg["left"],
                                            right=cfg["right"], scale=cfg["scale"], softcap=cfg["softcap"],
                                            mask_fill=cfg["fill"])
            parts = _partial.merge(parts, part)
            del kb, vb
        if parts is None:
            dv = v.head_dim if isinstance(v, Factors) else v.shape[-1]
            parts = _partial.empty(qq, (0, lq, 0), dv)
        acc, m, rsum = parts
        out = acc / rsum[..., None]  # 0 / 0 = NaN where a row sees no key (eager's softmax)
        if cfg["sdpa_form"]:
            out = torch.where((rsum == 0)[..., None], 0.0, out)
        ctx.save_for_backward(mask, out, m, rsum, *tensors)
        ctx.cfg, ctx.layout = cfg, layout
        return out

    @staticmethod
    def backward(ctx, grad):
        mask, out, m, rsum, *tensors = ctx.saved_tensors
        cfg, layout = ctx.cfg, ctx.layout
        q, k, v = _sides(layout, tensors)
        grads = _backward(q, k, v, mask, out, m, rsum, grad.to(out.dtype), cfg)
        flat = [g for side, gs in zip((q, k, v), grads) for g in gs]
        return (None, None, None, *(g.to(t.dtype) for g, t in zip(flat, tensors)))


def _into_side(side, dx: torch.Tensor, j0: int, j1: int, acc: list[torch.Tensor]) -> None:
    """Add ``dx`` (B, H, j1 - j0, D), the gradient of positions [j0, j1) of the formed side, to its tensors'
    gradients ``acc`` (a side's factors: through the product; a plain side: as is)."""
    if not isinstance(side, Factors):
        acc[0][..., j0:j1, :] += dx
        return
    a, b = side.a[:, j0:j1].to(dx.dtype), side.b[:, j0:j1].to(dx.dtype)
    acc[0][:, j0:j1] += side.scale * torch.einsum("bhtd,btrd->bthr", dx, b)
    acc[1][:, j0:j1] += side.scale * torch.einsum("bhtd,bthr->btrd", dx, a)


def _zeros(side, ct):
    return [torch.zeros(t.shape, dtype=ct, device=t.device) for t in _tensors(side)]


def _backward(q, k, v, mask, out, m, rsum, do, cfg):
    ct, groups = cfg["ct"], cfg["groups"]
    qq = form(q, ct)
    lq, lk = qq.shape[-2], (k.length if isinstance(k, Factors) else k.shape[-2])
    # rowsum(dO * out), summed in float64 (a float32 sum costs up to ~3x eager's dq error)
    delta = (do.double() * out.double()).sum(-1).to(ct)
    dq = torch.zeros_like(qq)
    gk, gv = _zeros(k, ct), _zeros(v, ct)
    hk = qq.shape[1] // groups
    for j0, j1 in _blocks(lq, lk, cfg):
        kb = _partial.expand_kv(form(_rows(k, j0, j1), ct), groups)
        vb = _partial.expand_kv(form(_rows(v, j0, j1), ct), groups)
        mk = None if mask is None else mask[..., j0:j1]
        dq_b, dk_b, dv_b = _partial.partial_backward(
            qq, kb, vb, mk, do, m, rsum, delta, (0, lq, 0), (0, j1 - j0, j0), left=cfg["left"],
            right=cfg["right"], scale=cfg["scale"], softcap=cfg["softcap"], mask_fill=cfg["fill"],
            dead_nan=not cfg["sdpa_form"])
        dq += dq_b
        if groups > 1:
            dk_b, dv_b = (x.unflatten(1, (hk, groups)).sum(2) for x in (dk_b, dv_b))
        _into_side(k, dk_b, j0, j1, gk)
        _into_side(v, dv_b, j0, j1, gv)
        del kb, vb, dk_b, dv_b
    if not cfg["sdpa_form"]:  # eager: a NaN row of p reaches every key's dv of its K/V head
        nan_bh = torch.where((rsum == 0).any(-1), float("nan"), 0.0).unflatten(1, (hk, groups)).sum(2)  # (B, Hk)
        if isinstance(v, Factors):
            gv[0] += nan_bh[:, None, :, None]
            gv[1] += nan_bh.sum(1)[:, None, None, None]
        else:
            gv[0] += nan_bh[..., None, None]
    gq = _zeros(q, ct)
    _into_side(q, dq, 0, lq, gq)
    return gq, gk, gv


def _outside(lq: int, t0: int, t1: int, cfg, device) -> torch.Tensor | None:
    """(Lq, t1 - t0) True where the band removes key t of query i; None where it removes nothing."""
    left, right = cfg["left"], cfg["right"]
    if left < 0 and right < 0:
        return None
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(t0, t1, device=device)[None, :]
    out = torch.zeros(lq, t1 - t0, dtype=torch.bool, device=device)
    if left >= 0:
        out |= j < i - left
    if right >= 0:
        out |= j > i + right
    return out


def _decode(qq: torch.Tensor, k: Factors, v: Factors, mask, cfg) -> torch.Tensor:
    """Decode-sized queries against factorized K/V without forming them (module docstring), the cache taken in
    splits (scores, then one softmax over all of them, whose backward is the precise one, then the output);
    returns (B, H, Lq, Dv) in the compute dtype."""
    ct, groups = cfg["ct"], cfg["groups"]
    batch, heads, lq, _ = qq.shape
    hk = heads // groups
    qt = qq.reshape(batch, heads * lq, qq.shape[-1]).transpose(-2, -1)  # (B, D, H*Lq): one GEMM for all heads
    splits = [(t0, min(k.length, t0 + DECODE_BLOCK)) for t0 in range(0, k.length, DECODE_BLOCK)]
    seen = [_partial.visible((0, lq, 0), (0, t1 - t0, t0), cfg["left"], cfg["right"]) for t0, t1 in splits]
    scores = []
    for (t0, t1), used in zip(splits, seen):
        if not used:  # the band removes the whole split: its factors are not read
            scores.append(qq.new_full((batch, heads, lq, t1 - t0), float("-inf")))
            continue
        ka, kb = k.a[:, t0:t1].to(ct), k.b[:, t0:t1].to(ct)  # (B, T, Hk, R), (B, T, R, D)
        y = torch.matmul(kb.flatten(1, 2), qt)  # y[b, (t, r), (h, i)] = b_k[t, r] . q[h, i]
        y = y.view(batch, t1 - t0, k.rank, hk, groups, lq)
        st = (y * ka.transpose(2, 3)[..., None, None]).sum(2)  # (B, T, Hk, g, Lq)
        scores.append(st.reshape(batch, t1 - t0, heads, lq).permute(0, 2, 3, 1) * (k.scale * cfg["scale"]))
    s = torch.cat(scores, -1) if len(scores) > 1 else scores[0]
    if cfg["softcap"] > 0:
        s = cfg["softcap"] * torch.tanh(s / cfg["softcap"])
    if mask is not None:
        s = s.masked_fill(~mask, cfg["fill"]) if mask.dtype == torch.bool else s + mask
    outside = _outside(lq, 0, k.length, cfg, s.device)
    if outside is not None:
        s = s.masked_fill(outside, float("-inf"))
    if cfg["sdpa_form"]:  # SDPA's safe softmax: a row that sees no key is 0, with no gradient
        dead = torch.isneginf(s).all(-1, keepdim=True)
        p = torch.where(dead, 0.0, torch.softmax(s.masked_fill(dead, 0.0), -1))
    else:
        p = torch.softmax(s, -1)  # NaN where a row sees no key (eager's softmax)
    out = None
    for (t0, t1), used in zip(splits, seen):
        if not used:
            continue
        va, vb = v.a[:, t0:t1].to(ct), v.b[:, t0:t1].to(ct)
        pt = p[..., t0:t1].permute(0, 3, 1, 2).reshape(batch, t1 - t0, 1, hk, groups, lq)  # (B, T, 1, Hk, g, Lq)
        w = pt * va.transpose(2, 3)[..., None, None]  # w[b, t, r, hk, g, i] = p[h, i, t] * a_v[t, hk, r]
        o = torch.matmul(w.reshape(batch, (t1 - t0) * v.rank, heads * lq).transpose(-2, -1), vb.flatten(1, 2))
        out = o if out is None else out + o  # (B, H*Lq, Dv)
    if out is None:  # no split visible (cannot happen for a top-left band with a key; kept total)
        out = qq.new_zeros(batch, heads * lq, v.head_dim)
    return (out * v.scale).reshape(batch, heads, lq, out.shape[-1])
