"""The ``flex`` candidate family: PyTorch's FlexAttention running a mask attnfuse proved, with no mask_mod to write.

FlexAttention (Dong, Feng, Guessous, Liang, He, "Flex Attention: A Programming Model for Generating Optimized
Attention Kernels", arXiv:2412.05496, 2024; ``torch.nn.attention.flex_attention``) computes
``softmax(score_mod(q k^T * scale)) @ v`` over the blocks a `BlockMask` lists, applying ``mask_mod`` (-inf)
inside partial blocks, in one kernel that Inductor generates (Triton on CUDA, a C++ template on the CPU).
Here the op's arguments become the ``score_mod``/``mask_mod`` closures (`_mods`) and the BlockMask
(`_blockmask`), built from structure only:
the band per shape (cached), packed documents per call by per-block segment-id intervals (O(N) + O(N^2 /
128^2)), a key-padding vector per call, a ``block_sparse`` constant by tile occupancy (cached per tensor).

Contract: exactly `attnfuse.kernels.reference.forward` for the same arguments (scale default 1/sqrt(head_dim),
softcap, bool mask = keep with ``mask_fill`` (None: -inf), float mask = additive, top-left causal, GQA with
head h reading K/V head h // kv_groups), plus ``window_left``/``window_right`` (key j visible from query i iff
``i - left <= j <= i + right``, -1 unbounded, others -inf), ``alibi`` (fp32 (H,) slopes adding ``slope[h] * (j -
i)`` after softcap) and ``doc``: int64 (B, 2, L), only with q_len == kv_len == L; row 0 a segment id per
position, row 1 non-zero at prefix keys.  With it, key j is visible from query i iff ``doc[b, 0, i] == doc[b,
0, j]`` and (in band, causal included, or ``doc[b, 1, j] != 0``): packed documents, prefix-LM and their
combinations; segment ids need not be sorted or contiguous.  A row with no visible key is NaN, as eager.

What runs where, per call:

* inputs with NaN/Inf (q, k, v, ALiBi slopes; an additive mask's NaN or +inf: one reduction each, read on the
  host) take the exact blocked path (`_blocked`: blocks of <= 128 query rows, eager's order of operations),
  because FlexAttention skips blocks and masks by -inf where eager multiplies ``0 * nan``;
* otherwise compiled FlexAttention (`_runtime`: one ``torch.compile`` caller per configuration, created
  lazily).  Rows with no visible key (FlexAttention gives 0) are set to NaN: on CUDA from ``lse == -inf``; on
  the CPU, whose FlexAttention returns no lse, from an extra all-ones value column (its output is 0 exactly on
  such rows), added only where such rows can occur (a bool mask with fill -inf, an additive mask holding -inf,
  a band that misses rows);
* backward: on CUDA, FlexAttention's own, recomputing the forward under autograd (``torch.enable_grad``
  here; inside an op's implementation, below autograd, the caller must also re-enable the autograd dispatch
  keys), with eager's masked_fill gradients patched in for rows with no visible key (dQ 0, NaN in all of dV of
  the row's K/V head).  The blocked backward (eager's numerics) instead: on the CPU (FlexAttention has no CPU
  backward), after a blocked forward, for a non-finite ``grad_out``, with ``mask_grad`` and for an additive
  mask with rows that see no key (eager's additive spelling puts NaN in dQ and dK there).

``stats`` (`stats_like`: fp32 (B, H, Lq)): the lse on CUDA, 0 or -inf (rows with no visible key) on the CPU,
all NaN after the blocked forward.  ``out`` is laid out in memory as (B, Lq, H, Dv), as every attnfuse kernel's.

Limitations: float16/bfloat16/float32, head dims 16..256, on CPU (Inductor's C++ flex template, x86 with AVX2)
and CUDA; no dropout, attention sinks or ``window_pad``; ``doc`` needs q_len == kv_len.  The CUDA path is
FlexAttention's numerics (its backward uses ``delta = rowsum(dO * O)``) and has not been run against eager
in this repository yet (the tests here are the CPU's: FlexAttention forward, blocked backward).  A compile
failure logs a warning and runs that configuration on the blocked path from then on.
"""

from __future__ import annotations

import math

import torch

from .. import validate
from ..cpu import all_finite, in_output_layout, scale_of
from . import _blocked, _blockmask, _mods, _runtime

__all__ = ["applies", "attention", "backward", "forward", "stats_like"]

_WHO = "attnfuse.kernels.flex.attention"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NAN = float("nan")


def stats_like(q: torch.Tensor) -> torch.Tensor:
    """The (empty) ``stats`` tensor `forward` returns for ``q``: fp32 (B, H, Lq)."""
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float32)


def _cpu_reason() -> str | None:
    import sys

    avx2 = getattr(torch.cpu, "_is_avx2_supported", None)
    if sys.platform == "darwin" or (avx2 is not None and not avx2()):
        return "FlexAttention's CPU kernel (Inductor's C++ template) needs an x86 CPU with AVX2, not on macOS"
    return None


def applies(*, device_type: str, dtype: torch.dtype, head_dim: int, v_head_dim: int, dropout_p: float = 0.0,
            sinks=False, window_pad: bool = False, q_len=None, kv_len=None, doc=False) -> str | None:
    """None, or one sentence why FlexAttention cannot run such a site.  ``sinks``/``doc``: whether the site has
    them (a bool, or the tensor / None); ``q_len``/``kv_len`` may be None (unknown)."""
    sinks = sinks is not None and sinks is not False
    doc = doc is not None and doc is not False
    why = _runtime.available()
    if why:
        return why
    if device_type not in ("cpu", "cuda"):
        return f"FlexAttention runs on cpu and cuda tensors here; got {device_type}"
    if dtype not in _DTYPES:
        return f"FlexAttention takes float16, bfloat16 or float32; got {dtype}"
    if not (16 <= head_dim <= 256 and 16 <= v_head_dim <= 256):
        return f"FlexAttention takes head dims 16..256; got head_dim={head_dim}, v_head_dim={v_head_dim}"
    if dropout_p:
        return f"FlexAttention has no dropout; got dropout_p={dropout_p}"
    if sinks:
        return "FlexAttention has no attention sinks (a per-head extra key of value 0)"
    if window_pad:
        return "FlexAttention has no window_pad (the unfold spelling's zero-padded keys)"
    if doc and q_len is not None and kv_len is not None and q_len != kv_len:
        return f"packed documents (doc) need q_len == kv_len; got q_len={q_len}, kv_len={kv_len}"
    return _cpu_reason() if device_type == "cpu" else None


def _as4d(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def _inspect(q, k, v, mask, alibi) -> tuple[bool, bool]:
    """(every input finite -- an additive mask may hold -inf --, the additive mask holds -inf)."""
    if not all(all_finite(x) for x in (q, k, v)) or (alibi is not None and not all_finite(alibi)):
        return False, False
    if mask is None or mask.dtype == torch.bool:
        return True, False
    low, high = (float(x) for x in torch.aminmax(mask))  # NaN anywhere makes both NaN
    return not (math.isnan(high) or high == math.inf), low == -math.inf


def _may_hide_rows(mask, mask_fill, neg_inf_bias: bool, q_len: int, kv_len: int, left: int) -> bool:
    """Whether some row may see no key (with doc, q_len == kv_len: every row sees its own key, so only the
    mask and a band can hide one)."""
    if mask is not None and mask.dtype != torch.bool and neg_inf_bias:
        return True
    if mask is not None and mask.dtype == torch.bool and _hides(mask_fill):
        return True
    return left >= 0 and q_len - 1 - left >= kv_len


def _hides(mask_fill: float | None) -> bool:
    return mask_fill is None or mask_fill == -math.inf


def _plan(q_len: int, kv_len: int, mask, doc, alibi, kw: dict, device: torch.device):
    """(the closures, the BlockMask) of a call; ``mask`` 4-D or None."""
    left, causal = kw["window_left"], kw["causal"]
    mods = _mods.build(mask, doc, alibi, softcap=kw["softcap"], mask_fill=kw["mask_fill"], causal=causal,
                       window_left=left, window_right=kw["window_right"])
    cls = _blockmask.classes(q_len, kv_len, mask=mask, mask_hides=_hides(kw["mask_fill"]), doc=doc, left=left,
                             right=_mods.band_right(causal, kw["window_right"]), block_sparse=kw["block_sparse"],
                             device=device)
    return mods, _blockmask.block_mask(cls, q_len, kv_len, mods.mask_mod)


def _flex_forward(q, k, v, mask, doc, alibi, neg_inf_bias: bool, kw: dict):
    """(out, stats) of compiled FlexAttention with NaN rows where no key is visible, or None (it failed)."""
    lq, lk = q.shape[2], k.shape[2]
    mods, bm = _plan(lq, lk, mask, doc, alibi, kw, q.device)
    q, k, v = q.detach(), k.detach(), v.detach()
    cuda = q.device.type != "cpu"
    ones = not cuda and _may_hide_rows(mask, kw["mask_fill"], neg_inf_bias, lq, lk, kw["window_left"])
    if ones:
        v = torch.cat([v, v.new_ones(*v.shape[:3], 1)], dim=-1)
    got = _runtime.run(mods.key, q, k, v, mods.score_mod, bm, scale=kw["scale"], enable_gqa=kw["kv_groups"] > 1,
                       lse=cuda)
    if got is None:
        return None
    out, lse = got
    if cuda:
        stats = lse.float()
        dead = torch.isneginf(stats)
    else:
        stats = torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device)
        dead = None
        if ones:
            dead = out[..., -1] == 0
            out = out[..., :-1]
            stats.masked_fill_(dead, -math.inf)
    out = in_output_layout(out)
    if dead is not None:
        out = out.masked_fill_(dead.unsqueeze(-1), _NAN)
    return out, stats


def _keywords(q, scale, causal, softcap, kv_groups, mask_fill, window_left, window_right) -> dict:
    return dict(scale=scale_of(q, scale), causal=causal, softcap=softcap, kv_groups=kv_groups, mask_fill=mask_fill,
                window_left=window_left, window_right=window_right)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
            doc: torch.Tensor | None = None, alibi: torch.Tensor | None = None, *, scale: float | None,
            causal: bool, softcap: float, kv_groups: int, mask_fill: float | None, window_left: int,
            window_right: int, block_sparse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, Lq, Dv) laid out as (B, Lq, H, Dv), stats (`stats_like`)) of the contract above."""
    kw = _keywords(q, scale, causal, softcap, kv_groups, mask_fill, window_left, window_right)
    doc = None if doc is None else doc.long()
    finite, neg_inf_bias = _inspect(q, k, v, mask, alibi)
    if finite:
        got = _flex_forward(q, k, v, _as4d(mask), doc, alibi, neg_inf_bias, dict(kw, block_sparse=block_sparse))
        if got is not None:
            return got
    out = _blocked.forward(q, k, v, mask, doc, alibi, **kw)
    return out, stats_like(q).fill_(_NAN)


def _flex_backward(grad_out, q, k, v, stats, mask, doc, alibi, kw: dict):
    """(dq, dk, dv) through FlexAttention's autograd, or None where it failed."""
    mods, bm = _plan(q.shape[2], k.shape[2], _as4d(mask), doc, alibi, kw, q.device)
    dead = torch.isneginf(stats)
    with torch.enable_grad():
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        got = _runtime.run(mods.key, qg, kg, vg, mods.score_mod, bm, scale=kw["scale"],
                           enable_gqa=kw["kv_groups"] > 1, lse=False)
        if got is None:
            return None
        # a row with no visible key gets eager's masked_fill gradients: nothing from its grad_out but NaN in dV
        dq, dk, dv = torch.autograd.grad(got[0], (qg, kg, vg), grad_out.masked_fill(dead.unsqueeze(-1), 0.0))
    dq = dq.masked_fill(dead.unsqueeze(-1), 0.0)
    groups = dead.unflatten(1, (k.shape[1], kw["kv_groups"])).any(3).any(2)  # (B, Hkv)
    dv = dv.masked_fill(groups[:, :, None, None], _NAN)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             stats: torch.Tensor, mask: torch.Tensor | None = None, doc: torch.Tensor | None = None,
             alibi: torch.Tensor | None = None, *, scale: float | None, causal: bool, softcap: float,
             kv_groups: int, mask_fill: float | None, window_left: int, window_right: int, block_sparse: bool,
             mask_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, dmask or None) of `forward` (``dmask``: the additive mask's gradient, with ``mask_grad``).

    On CUDA the FlexAttention recompute runs under ``torch.enable_grad()``; called from an op's implementation
    (below autograd), wrap this call so that the autograd dispatch keys are active too."""
    kw = _keywords(q, scale, causal, softcap, kv_groups, mask_fill, window_left, window_right)
    doc = None if doc is None else doc.long()
    del out  # both backwards recompute the forward
    flex = (q.device.type == "cuda" and stats.numel() > 0 and not mask_grad and not bool(torch.isnan(stats).any())
            and all_finite(grad_out))
    if flex and mask is not None and mask.dtype != torch.bool and bool(torch.isneginf(stats).any()):
        flex = False  # eager's additive spelling: NaN in dQ and dK at a row that sees no key
    if flex:
        got = _flex_backward(grad_out, q, k, v, stats, mask, doc, alibi, dict(kw, block_sparse=block_sparse))
        if got is not None:
            return (*got, None)
    return _blocked.backward(grad_out, q, k, v, mask, doc, alibi, mask_grad=mask_grad, **kw)


def _check(q, k, v, window_size, segments, prefix, key_padding, softcap) -> None:
    validate.qkv(_WHO, q, k, v, floating=True)
    left, right = window_size
    if left < -1 or right < -1:
        raise ValueError(f"{_WHO}: window_size must be (left, right) with -1 (unbounded) or >= 0; got {window_size}")
    if softcap < 0:
        raise ValueError(f"{_WHO}: softcap must be 0 (off) or > 0; got {softcap}")
    b, lq, lk = q.shape[0], q.shape[2], k.shape[2]
    for name, t in (("segments", segments), ("prefix", prefix)):
        if t is None:
            continue
        if tuple(t.shape) != (b, lq) or lq != lk or t.is_floating_point() or t.device != q.device:
            raise ValueError(f"{_WHO}: {name} must be an integer or bool (batch, seqlen) tensor on q's device with "
                             f"q_len == kv_len; got {tuple(t.shape)} {t.dtype} on {t.device} for q_len={lq}, "
                             f"kv_len={lk}")
    if key_padding is not None and (tuple(key_padding.shape) != (b, lk) or key_padding.dtype != torch.bool):
        raise ValueError(f"{_WHO}: key_padding must be a bool (batch, kv_len) tensor, True = attend; got "
                         f"{tuple(key_padding.shape)} {key_padding.dtype}")
    why = applies(device_type=q.device.type, dtype=q.dtype, head_dim=q.shape[-1], v_head_dim=v.shape[-1],
                  q_len=lq, kv_len=lk, doc=segments is not None or prefix is not None)
    if why:
        raise ValueError(f"{_WHO}: {why}")


class _Flex(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, doc, kw):
        out, stats = forward(q, k, v, mask, doc, **kw)
        ctx.save_for_backward(q, k, v, out, stats, mask, doc)
        ctx.kw = kw
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, stats, mask, doc = ctx.saved_tensors
        dq, dk, dv, _ = backward(grad, q, k, v, out, stats, mask, doc, mask_grad=False, **ctx.kw)
        return dq, dk, dv, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, causal: bool = False,
              window_size: tuple[int, int] = (-1, -1), segments: torch.Tensor | None = None,
              prefix: torch.Tensor | None = None, key_padding: torch.Tensor | None = None,
              softcap: float = 0.0) -> torch.Tensor:
    """FlexAttention on ``(batch, heads, seqlen, head_dim)`` tensors (K/V may have fewer heads: GQA), with autograd.

    ``segments`` (batch, seqlen) ids of packed documents (a query sees keys of its own segment only),
    ``prefix`` (batch, seqlen) bool/int, non-zero at prefix keys (visible to their whole segment whatever the
    causal flag or window), ``key_padding`` (batch, kv_len) bool, True = attend; the rest as every family's
    ``attention``.  Rows with no visible key are NaN, as eager."""
    _check(q, k, v, window_size, segments, prefix, key_padding, softcap)
    doc = None
    if segments is not None or prefix is not None:
        seg = segments if segments is not None else torch.zeros(q.shape[0], q.shape[2], dtype=torch.int64,
                                                                 device=q.device)
        pre = prefix if prefix is not None else torch.zeros_like(seg)
        doc = torch.stack([seg.long(), pre.long()], dim=1)
    mask = None if key_padding is None else key_padding[:, None, None, :]
    kw = dict(scale=scale, causal=causal, softcap=float(softcap), kv_groups=q.shape[1] // k.shape[1],
              mask_fill=None, window_left=window_size[0], window_right=window_size[1], block_sparse=False)
    return _Flex.apply(q, k, v, mask, doc, kw)
