"""``attnfuse::attention`` off the Triton kernels: CPU tensors (outside ``TRITON_INTERPRET=1``), and float64 or
head dims above 256 on every device.  The registered op (`attnfuse.ops`) dispatches here, and so does each exact
family's ``attention`` on such tensors (`attnfuse.kernels._family.exact_on_cpu`).

`forward` takes the static path `attnfuse.costmodel.cpu.path` names (the report reads the same function):

* ``"sdpa-flash-cpu"``: PyTorch's fused flash-attention CPU kernel where it computes exactly our semantics, i.e.
  no softcap, dropout or sinks, equal q/v head dims, a bool mask or one of q's dtype.  Per call, inputs with NaN
  or Inf (the fused kernel zeroes rows that eager softmax makes NaN) and, under a finite bool-mask fill, a row
  with no visible key go to the blocked reference instead;
* ``"reference"``: the blocked reference (`attnfuse.kernels.reference`);
* ``"tiled"``: structured masks (bands, ALiBi, block-sparse, window_pad) in band tiles (`attnfuse.kernels.tiled`,
  O(N*w) time and memory).

`backward` recomputes softmax per block: ``"tiled"`` with `tiled.backward`, the others with the blocked reference
(PyTorch's CPU flash backward misses the 2x accuracy rule with masks: measured up to ~5x eager's error in fp32).
Neither needs the forward's ``out`` or row statistics, so `forward`'s ``stats`` is empty.

`check` holds the op's argument checks (every device), with its error style ``"attnfuse.attention: ..."``.
"""

from __future__ import annotations

import math

import torch

from ..costmodel import cpu as paths
from . import _launch, reference, tiled, validate
from .reference import sink_error, window_pad_error

__all__ = ["all_finite", "backward", "check", "dead_rows", "forward", "in_output_layout", "no_stats",
           "output_like", "path", "runs_triton", "scale_of", "sdpa_mask"]

_NEG_INF = float("-inf")
_WHO = "attnfuse.attention"


def runs_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the op runs these tensors on the Triton kernels (CUDA, or CPU under the Triton interpreter);
    otherwise it runs `forward`/`backward` here."""
    return q.dtype != torch.float64 and _launch.supported(q, k, v) is None


def scale_of(q: torch.Tensor, scale: float | None) -> float:
    """The softmax scale: ``scale``, or 1/sqrt(head_dim) when None."""
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def no_stats(q: torch.Tensor) -> torch.Tensor:
    """The empty ``stats`` of the paths whose backward recomputes the row statistics."""
    return q.new_empty(0, dtype=torch.float32)


def output_like(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The op's output buffer: shape (B, H, Lq, Dv), laid out in memory as (B, Lq, H, Dv).

    That is the layout the next op of nearly every model wants (``out.transpose(1, 2)``
    then a reshape to (B, Lq, H*Dv) is free), and the one PyTorch's fused CPU kernel writes.
    """
    b, h, lq, dv = q.shape[0], q.shape[1], q.shape[2], v.shape[-1]
    return q.new_empty(b, lq, h, dv).transpose(1, 2)


def in_output_layout(out: torch.Tensor) -> torch.Tensor:
    """``out`` in `output_like`'s memory layout (itself when it is in it already, else a copy)."""
    if out.transpose(1, 2).is_contiguous():
        return out
    b, h, lq, dv = out.shape
    return out.new_empty(b, lq, h, dv).transpose(1, 2).copy_(out)


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
          alibi: torch.Tensor | None = None, sinks: torch.Tensor | None = None, *, kv_groups: int = 1,
          causal: bool = False, window_left: int = -1, window_right: int = -1, block_sparse: bool = False,
          window_pad: bool = False, approx: str = "") -> None:
    """Raise ValueError (``"attnfuse.attention: ..."``, saying how to fix it) for arguments the op does not take."""
    validate.qkv(_WHO, q, k, v, kv_groups=kv_groups)
    if window_left < -1 or window_right < -1:
        raise ValueError(f"{_WHO}: window_left/window_right must be -1 (unbounded) or >= 0; "
                         f"got {window_left}, {window_right}")
    if window_pad:
        why = window_pad_error(window_left, window_right, causal, q.shape[-2], k.shape[-2],
                               alibi=alibi is not None, block_sparse=block_sparse)
        if why:
            raise ValueError(f"{_WHO}: {why}")
    if alibi is not None and (alibi.dim() != 1 or alibi.shape[0] != q.shape[1]):
        raise ValueError(f"{_WHO}: alibi must hold one slope per query head, shape ({q.shape[1]},); "
                         f"got {tuple(alibi.shape)}")
    if block_sparse and mask is None:
        raise ValueError(f"{_WHO}: block_sparse=True needs the constant mask whose tiles it skips")
    if sinks is None:
        return
    why = sink_error(sinks, q.shape[0], q.shape[1], q.dtype)
    if why:
        raise ValueError(f"{_WHO}: {why}")
    if window_pad or approx:
        what = "window_pad=True" if window_pad else "an approximate kernel table (approx)"
        raise ValueError(f"{_WHO}: sinks do not combine with {what}; allowed with sinks: "
                         f"window_pad=False and approx=''")


def path(q: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, alibi: torch.Tensor | None = None,
         sinks: torch.Tensor | None = None, *, softcap: float = 0.0, dropout_p: float = 0.0, window_left: int = -1,
         window_right: int = -1, block_sparse: bool = False, window_pad: bool = False, **_: object) -> str:
    """`attnfuse.costmodel.cpu.path` of these tensors and keywords (an exact site; the op's other keywords,
    which choose no path, are accepted and ignored)."""
    return paths.path(q.dtype, mask_dtype=None if mask is None else mask.dtype, softcap=softcap,
                      dropout_p=dropout_p, same_head_dims=q.shape[-1] == v.shape[-1], alibi=alibi is not None,
                      window_left=window_left, window_right=window_right, block_sparse=block_sparse,
                      window_pad=window_pad, sinks=sinks is not None)


def dead_rows(mask: torch.Tensor | None, causal: bool, lq: int, lk: int) -> torch.Tensor | None:
    """Bool (..., q_len, 1) of rows where every key is masked, or None."""
    if mask is None:
        return None
    keep = mask if mask.dtype == torch.bool else ~torch.isneginf(mask)
    if mask.dtype != torch.bool and bool(keep.all()):
        return None
    if causal:
        keep = keep & torch.ones(lq, lk, dtype=torch.bool, device=mask.device).tril()
    alive = keep.any(-1, keepdim=True)
    return None if bool(alive.all()) else ~alive


def all_finite(x: torch.Tensor) -> bool:
    """No NaN/Inf in ``x``.  One reduction, no temporary: NaN/Inf anywhere make the sum non-finite.  An
    overflowing sum of finite values is a false alarm that only sends the call to the (exact) reference path."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return math.isfinite(float(x.sum(dtype=acc)))  # a host float: no isfinite kernel per call


def sdpa_mask(mask: torch.Tensor | None, causal: bool, lq: int, lk: int) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for PyTorch's SDPA, which takes a mask or is_causal but not both."""
    if mask is not None and mask.dim() < 2:
        mask = mask.expand(lq, lk)  # its fused CPU kernel rejects a 1-D (kv_len,) mask
    if mask is None or not causal:
        return mask, causal
    tril = torch.ones(lq, lk, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return mask & tril, False
    return mask.masked_fill(~tril, _NEG_INF), False


def _fill(mask_fill: float | None) -> float:
    return _NEG_INF if mask_fill is None else mask_fill


def _seed_int(seed: torch.Tensor | None) -> int:
    return 0 if seed is None else int(seed.item())


def _sink_kw(sinks: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {} if sinks is None else {"sinks": sinks}


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
            seed: torch.Tensor | None = None, alibi: torch.Tensor | None = None, sinks: torch.Tensor | None = None, *,
            scale: float | None = None, causal: bool = False, softcap: float = 0.0, kv_groups: int = 1,
            dropout_p: float = 0.0, mask_fill: float | None = None, window_left: int = -1, window_right: int = -1,
            block_sparse: bool = False, window_pad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's ``(out, stats)`` on checked arguments (`check`); ``stats`` is empty (`no_stats`)."""
    chosen = path(q, v, mask, alibi, sinks, softcap=softcap, dropout_p=dropout_p, window_left=window_left,
                  window_right=window_right, block_sparse=block_sparse, window_pad=window_pad)
    sc, fill = scale_of(q, scale), _fill(mask_fill)
    if chosen == "tiled":
        out = tiled.forward(q, k, v, mask, _seed_int(seed), scale=sc, causal=causal, softcap=softcap,
                            kv_groups=kv_groups, dropout_p=dropout_p, mask_fill=fill, alibi=alibi,
                            window_left=window_left, window_right=window_right, block_sparse=block_sparse,
                            window_pad=window_pad, **_sink_kw(sinks))
        return out, no_stats(q)
    if chosen == "sdpa-flash-cpu":
        dead = dead_rows(mask, causal, q.shape[-2], k.shape[-2])
        finite_fill = mask is not None and mask.dtype == torch.bool and fill != _NEG_INF
        if all(all_finite(x) for x in (q, k, v)) and not (dead is not None and finite_fill):
            sdpa_m, sdpa_causal = sdpa_mask(mask, causal, q.shape[-2], k.shape[-2])
            out = in_output_layout(torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=sdpa_m, is_causal=sdpa_causal, scale=sc, enable_gqa=kv_groups > 1))
            return (out if dead is None else out.masked_fill_(dead, float("nan"))), no_stats(q)
    out = reference.forward(q, k, v, mask, _seed_int(seed), scale=sc, causal=causal, softcap=softcap,
                            kv_groups=kv_groups, dropout_p=dropout_p, mask_fill=fill, **_sink_kw(sinks))
    return out, no_stats(q)


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             mask: torch.Tensor | None = None, seed: torch.Tensor | None = None, alibi: torch.Tensor | None = None,
             sinks: torch.Tensor | None = None, *, scale: float | None = None, causal: bool = False,
             softcap: float = 0.0, kv_groups: int = 1, dropout_p: float = 0.0, mask_fill: float | None = None,
             window_left: int = -1, window_right: int = -1, block_sparse: bool = False, window_pad: bool = False,
             mask_grad: bool = False) -> list[torch.Tensor]:
    """``[dq, dk, dv, dmask, dsinks]`` of `forward`, contiguous (as the op's fake promises); ``dmask`` is empty
    unless ``mask_grad``, ``dsinks`` without sinks."""
    chosen = paths.backward_path(path(q, v, mask, alibi, sinks, softcap=softcap, dropout_p=dropout_p,
                                      window_left=window_left, window_right=window_right,
                                      block_sparse=block_sparse, window_pad=window_pad))
    extra = dict(alibi=alibi, window_left=window_left, window_right=window_right, block_sparse=block_sparse,
                 window_pad=window_pad) if chosen == "tiled" else {}
    dq, dk, dv, dm, *ds = (tiled if chosen == "tiled" else reference).backward(
        grad_out, q, k, v, mask, _seed_int(seed), scale=scale_of(q, scale), causal=causal, softcap=softcap,
        kv_groups=kv_groups, dropout_p=dropout_p, mask_fill=_fill(mask_fill), mask_grad=mask_grad, **extra,
        **_sink_kw(sinks))
    # the K/V head reduction of GQA makes new tensors anyway
    return [dq.contiguous(), dk.contiguous(), dv.contiguous(), dm.contiguous() if dm is not None else q.new_empty(0),
            ds[0] if ds else q.new_empty(0)]
