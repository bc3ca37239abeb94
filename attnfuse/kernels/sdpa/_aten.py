"""PyTorch's SDPA kernels called directly: ``torch.ops.aten._scaled_dot_product_<backend>_attention`` and its
``_backward``, with the argument plumbing each needs (schemas as in torch 2.11 and 2.13).

* ``flash`` (CUDA, FlashAttention-2): no mask; native GQA; causal is bottom-right aligned when q_len != kv_len,
  so the caller keeps causal calls square; lse (B, H, Lq) fp32.
* ``efficient`` (CUDA, memory-efficient): an additive bias in q's dtype, (B, H, Lq, Lk) as a view whose non-last
  strides are multiples of 16 (PyTorch's own ``preprocess_mask``, but padded before the broadcast, so a key
  vector stays a vector); causal is top-left; no GQA (K/V expanded, gradients summed back); lse (B, H, Lq
  rounded up to 32; Lq on ROCm) fp32; its backward returns the bias gradient at the broadcast shape.
* ``cudnn`` (CUDA): no mask here (see `attnfuse.kernels.sdpa._rules`); K/V expanded; lse (B, H, Lq, 1) fp32.
* ``cpu`` (the fused flash-attention CPU kernel): an additive bias in q's dtype (or float32 for half inputs),
  broadcast dims as they are; native GQA; causal top-left; lse (B, H, Lq) in fp32 (fp64 for fp64 inputs).

Dropout is always 0, so the philox seed/offset a backward takes are unused; they are taken, once per backend
and device, from a tiny forward's outputs (the values autograd would pass).
"""

from __future__ import annotations

import math

import torch

__all__ = ["KernelError", "as_4d", "backward", "bias", "bias_dtype", "forward", "gives_bias_grad", "lse_shape",
           "narrowed", "takes_bias"]

_ATEN = torch.ops.aten


class KernelError(RuntimeError):
    """A PyTorch SDPA kernel refused or failed these inputs (its own error, not attnfuse's plumbing)."""


def _call(name: str, *args, **kwargs):
    """``torch.ops.aten.<name>(*args, **kwargs)``, its errors raised as `KernelError`."""
    try:
        return getattr(_ATEN, name)(*args, **kwargs)
    except (RuntimeError, NotImplementedError) as exc:
        raise KernelError(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
_NATIVE_GQA = ("flash", "cpu")
_RNG: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}


def lse_shape(q: torch.Tensor, backend: str) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of ``backend``'s logsumexp for queries ``q`` (B, H, Lq, D)."""
    b, h, lq = q.shape[:3]
    if backend == "efficient":
        return (b, h, lq if torch.version.hip else math.ceil(lq / 32) * 32), torch.float32
    if backend == "cudnn":
        return (b, h, lq, 1), torch.float32
    return (b, h, lq), torch.float64 if backend == "cpu" and q.dtype == torch.float64 else torch.float32


def as_4d(mask: torch.Tensor) -> torch.Tensor:
    while mask.dim() > 4 and mask.shape[0] == 1:
        mask = mask[0]
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask


def narrowed(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` with each broadcast (stride-0) dim narrowed to size 1 (it broadcasts back to the same values)."""
    for d in range(mask.dim()):
        if mask.stride(d) == 0 and mask.shape[d] > 1:
            mask = mask.narrow(d, 0, 1)
    return mask


def bias_dtype(backend: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the bias `bias` makes of a bool mask for inputs of ``dtype``."""
    return torch.float32 if backend == "cpu" and dtype in (torch.float16, torch.bfloat16) else dtype


def bias(backend: str, mask: torch.Tensor | None, q: torch.Tensor, fill: float = -math.inf) -> torch.Tensor | None:
    """The additive bias ``backend`` reads for ``mask`` (4-D, the mask's own broadcast shape): a bool mask as 0
    where True and ``fill`` elsewhere (a temporary of the mask's size), a float mask itself."""
    if mask is None:
        return None
    mask = as_4d(mask)
    if mask.dtype != torch.bool:
        return mask
    keep = narrowed(mask)
    return torch.zeros(keep.shape, dtype=bias_dtype(backend, q.dtype), device=mask.device).masked_fill_(~keep, fill)


def takes_bias(backend: str, mask: torch.Tensor | None, kv_len: int) -> bool:
    """Whether ``backend`` reads this mask without an N x N copy (efficient: not one broadcast over the keys)."""
    if mask is None:
        return True
    if backend in ("flash", "cudnn"):
        return False
    return backend != "efficient" or mask.shape[-1] == kv_len or kv_len == 1


def gives_bias_grad(backend: str, mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ``backend``'s backward returns the gradient of this float mask at no more than the mask's size."""
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return backend == "efficient" and tuple(as_4d(mask).shape) == full


def _efficient_bias(b: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``b`` broadcast to (B, H, Lq, Lk) as a view with 16-aligned non-last strides, padded (the key dim to a
    multiple of 16) before the broadcast where it is not aligned already."""
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    view = b.expand(full)
    if view.stride(-1) == 1 and all(s % 16 == 0 for s in view.stride()[:-1]):
        return view
    b, lk = narrowed(b), b.shape[-1]
    padded = b.new_zeros(*b.shape[:-1], math.ceil(lk / 16) * 16)
    padded[..., :lk].copy_(b)
    return padded[..., :lk].expand(full)


def _ready(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a unit last stride and the other strides multiples of 8 (what every fused kernel reads)."""
    if x.stride(-1) == 1 and (x.device.type == "cpu" or all(s % 8 == 0 for s in x.stride()[:-1])):
        return x
    return x.contiguous()


def _kv(backend: str, x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 or backend in _NATIVE_GQA else x.repeat_interleave(groups, dim=1)


def _rng(backend: str, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The philox (seed, offset) of a dropout-free forward of ``backend`` on ``q``'s device (a tiny forward with
    q's dtype and head dim, once per backend and device)."""
    key = (backend, str(q.device))
    if key not in _RNG:
        t = q.new_zeros(1, 1, 64, q.shape[-1])
        if backend == "flash":
            res = _call("_scaled_dot_product_flash_attention", t, t, t, 0.0, False, False)
            _RNG[key] = (res[6], res[7])
        elif backend == "efficient":
            _RNG[key] = _call("_scaled_dot_product_efficient_attention", t, t, t, None, True, 0.0, False)[2:4]
        else:
            _RNG[key] = _call("_scaled_dot_product_cudnn_attention", t, t, t, None, True, 0.0, False, False)[6:8]
    return _RNG[key]


def forward(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: torch.Tensor | None, *,
            causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of ``backend``; ``b``: `bias` (None for flash and cuDNN)."""
    groups = q.shape[1] // k.shape[1]
    q, k, v = _ready(q), _ready(_kv(backend, k, groups)), _ready(_kv(backend, v, groups))
    if backend == "cpu":
        return _call("_scaled_dot_product_flash_attention_for_cpu", q, k, v, 0.0, causal, attn_mask=b, scale=scale)
    if backend == "flash":
        res = _call("_scaled_dot_product_flash_attention", q, k, v, 0.0, causal, False, scale=scale)
        return res[0], res[1]
    if backend == "efficient":
        eb = None if b is None else _efficient_bias(b, q, k)
        res = _call("_scaled_dot_product_efficient_attention", q, k, v, eb, True, 0.0, causal, scale=scale)
        return res[0], res[1]
    res = _call("_scaled_dot_product_cudnn_attention", q, k, v, None, True, 0.0, causal, False, scale=scale)
    return res[0], res[1]


def _summed(dx: torch.Tensor, heads: int) -> torch.Tensor:
    return dx if dx.shape[1] == heads else dx.unflatten(1, (heads, dx.shape[1] // heads)).sum(2)


def backward(backend: str, grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, b: torch.Tensor | None, *, causal: bool, scale: float,
             bias_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, dbias or None) of `forward`, from its ``out`` and ``lse``; dk/dv summed back to K/V's heads.
    ``bias_grad`` (efficient only): the gradient of ``b`` at the broadcast (B, H, Lq, Lk) shape."""
    groups, hk = q.shape[1] // k.shape[1], k.shape[1]
    q, k, v = _ready(q), _ready(_kv(backend, k, groups)), _ready(_kv(backend, v, groups))
    out = _ready(out)
    if grad_out.stride() != out.stride():  # the kernels read dO with O's strides
        grad_out = torch.empty_like(out).copy_(grad_out)
    lq, lk = q.shape[2], k.shape[2]
    db = None
    if backend == "cpu":
        dq, dk, dv = _call("_scaled_dot_product_flash_attention_for_cpu_backward",
            grad_out, q, k, v, out, lse, 0.0, causal, attn_mask=b, scale=scale)
    elif backend == "flash":
        seed, offset = _rng(backend, q)
        dq, dk, dv = _call("_scaled_dot_product_flash_attention_backward",
            grad_out, q, k, v, out, lse, None, None, lq, lk, 0.0, causal, seed, offset, scale=scale)
    elif backend == "efficient":
        seed, offset = _rng(backend, q)
        eb = None if b is None else _efficient_bias(b, q, k)
        dq, dk, dv, db = _call("_scaled_dot_product_efficient_attention_backward",
            grad_out, q, k, v, eb, out, lse, seed, offset, 0.0, [True, True, True, bias_grad and eb is not None],
            causal, scale=scale)
    else:
        seed, offset = _rng(backend, q)
        dq, dk, dv = _call("_scaled_dot_product_cudnn_attention_backward",
            grad_out, q, k, v, out, lse, seed, offset, None, None, None, lq, lk, 0.0, causal, scale=scale)
    return dq, _summed(dk, hk), _summed(dv, hk), db if bias_grad else None
