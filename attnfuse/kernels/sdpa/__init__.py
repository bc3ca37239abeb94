"""The ``sdpa`` candidate family: PyTorch's own scaled_dot_product_attention kernels with an explicit backend,
forward and backward through PyTorch's own backward kernels, in attnfuse's semantics
(`attnfuse.kernels.reference`: a bool mask keeps where True and fills ``mask_fill``, a float mask adds, causal
is top-left, a row with no visible key is NaN under a -inf fill and uniform under a finite one).

Backends (`BACKENDS`; `backends_for` a device; `applies` says why one cannot take a site):

* ``flash`` (CUDA; fp16/bf16, head dim a multiple of 8 up to 256, equal q/v head dims; native GQA): no mask
  tensor, only causal;
* ``efficient`` (CUDA; fp16/bf16/fp32, 16-byte aligned head dims, v's may differ): a bool mask (as a -inf bias)
  or a float bias of q's dtype; K/V expanded for GQA; the bias gradient where the mask is (B, H, Lq, Lk);
* ``cudnn`` (CUDA; fp16/bf16, head dim a multiple of 8 up to 128): no mask tensor (known cuDNN mask bugs, see
  `attnfuse.kernels.sdpa._rules`), only causal; K/V expanded;
* ``cpu`` (PyTorch's fused flash-attention CPU kernel; fp32/fp64/fp16/bf16, equal head dims; native GQA): a bool
  mask (as a -inf bias), a float mask of q's dtype (or float32 for half inputs).

``stats`` is the backend's logsumexp (`stats_like`: (B, H, Lq) fp32; efficient pads Lq to a multiple of 32,
cuDNN adds a trailing 1; cpu fp64 for fp64 inputs), so the backward reuses the forward's statistics.

The guard (`attnfuse.kernels.sdpa._guard`), per call with one host read (a device sync on CUDA; it reads q, k,
v and the mask once; `backward` reads ``stats`` and ``grad_out`` once): NaN/Inf inputs, an empty sequence, causal
with q_len != kv_len on flash/cuDNN (bottom-right aligned there) and a finite fill too close to the scores run
`attnfuse.kernels.reference` instead; rows with no visible key run the kernel and are set to NaN (-inf fill), or
run it with the finite fill as an exact additive bias (else the reference).  Those calls mark ``stats`` with NaN,
and `backward` (which also checks ``grad_out``) then runs `attnfuse.kernels.reference.backward` (eager's gradients
there: dQ 0 on a dead row, NaN over dV of its head).  No N x N temporary beyond the caller's mask.

Limitations: dropout, softcap, sinks, ALiBi, bands other than causal, block-sparse, window_pad and packed
documents are not SDPA (`applies`).  Training in fp32/fp64 declines ``cpu`` and ``efficient``: their backward
reads probabilities as ``exp(s - lse)`` off a logsumexp, measured (CPU kernel, fp32, L=97, d=40, peaked scores)
at up to ~9x eager's dV error and ~5x its dQ/dK error, with or without a mask (fp64: ~120 ulps from eager);
fp16/bf16 stay within 2x.  A float mask's gradient comes from the efficient kernel only where the mask is
(B, H, Lq, Lk); otherwise, and on backends without one, the reference backward runs.  Rows that see exactly
one key: dQ/dK are 0 in eager and rounding noise here (as in every flash-style backward, attnfuse's own
included).  Under causal, a dead row's gradients are `attnfuse.kernels.reference.backward`'s (the op's own), which
keep NaN at its causally hidden keys where an eager ``masked_fill`` spelling has 0.  The CUDA paths follow the
schemas of torch 2.11/2.13 and are tested without a GPU only through the ops' meta kernels and schema-bound
emulations (tests/kernels/sdpa); a kernel that raises at run time logs a warning and the call runs the reference.
"""

from __future__ import annotations

import logging
import math

import torch

from .. import reference, validate
from ..cpu import in_output_layout, scale_of
from . import _aten, _guard
from ._rules import BACKENDS, applies, backends_for, check_backend

__all__ = ["BACKENDS", "applies", "attention", "backends_for", "backward", "forward", "stats_like"]

log = logging.getLogger("attnfuse.kernels.sdpa")
_WHO = "attnfuse.kernels.sdpa"
_FAILED: set[tuple[str, str]] = set()


def stats_like(q: torch.Tensor, backend: str) -> torch.Tensor:
    """An empty tensor shaped like `forward`'s ``stats`` for queries ``q`` (the op's fake)."""
    check_backend(f"{_WHO}.stats_like", backend)
    shape, dtype = _aten.lse_shape(q, backend)
    return q.new_empty(shape, dtype=dtype)


def _fill(mask_fill: float | None) -> float:
    return -math.inf if mask_fill is None else float(mask_fill)


def _kernel_failed(backend: str, what: str, exc: Exception) -> None:
    key = (backend, f"{what}: {type(exc).__name__}")
    level = logging.DEBUG if key in _FAILED else logging.WARNING
    _FAILED.add(key)
    log.log(level, "sdpa (%s): the %s kernel raised (%s); this call runs attnfuse's reference", backend, what, exc)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *, backend: str,
            scale: float | None = None, causal: bool = False, kv_groups: int = 1,
            mask_fill: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, stats)``: ``out`` (B, H, Lq, Dv) in the op's output layout (`attnfuse.kernels.cpu.output_like`),
    ``stats`` the backend's logsumexp (`stats_like`), NaN where `backward` must run the reference."""
    check_backend(f"{_WHO}.forward", backend)
    if mask is not None and backend in ("flash", "cudnn"):
        raise ValueError(f"{_WHO}.forward: the {backend} backend takes no mask; pass mask=None (causal only) or "
                         f"backend='efficient'")
    sc, fill = scale_of(q, scale), _fill(mask_fill)
    run = _guard.plan(backend, q, k, v, mask, causal=causal, fill=fill, scale=sc)
    if run.kernel:
        bias = _aten.bias(backend, mask, q, run.fill)
        try:
            out, lse = _aten.forward(backend, q, k, v, bias, causal=causal, scale=sc)
        except _aten.KernelError as exc:
            _kernel_failed(backend, "forward", exc)
            run = _guard.Plan(kernel=False, exact_backward=False, why="the kernel raised")
    if not run.kernel:
        log.debug("sdpa (%s): %s: the reference runs this call", backend, run.why)
        out = reference.forward(q, k, v, mask, scale=sc, causal=causal, kv_groups=kv_groups, mask_fill=fill)
        return out, stats_like(q, backend).fill_(math.nan)
    out = in_output_layout(out)
    if run.dead is not None:
        out = out.masked_fill_(run.dead, math.nan)
    stats = lse.contiguous()
    if not run.exact_backward:  # the kernel's own statistics: marked in place
        stats.flatten(2)[..., : q.shape[2]].fill_(math.nan)
    return out, stats


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             stats: torch.Tensor, mask: torch.Tensor | None = None, *, backend: str, scale: float | None = None,
             causal: bool = False, kv_groups: int = 1, mask_fill: float | None = None,
             mask_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dq, dk, dv, dmask or None)`` of `forward` (contiguous), from its ``out`` and ``stats``; ``dmask`` (the
    float mask's shape and dtype) only with ``mask_grad``."""
    check_backend(f"{_WHO}.backward", backend)
    sc, fill = scale_of(q, scale), _fill(mask_fill)
    lq, mask_grad = q.shape[2], mask_grad and mask is not None and mask.is_floating_point()
    kernel = _guard.backward_exact(stats, grad_out, lq) and (
        not mask_grad or _aten.gives_bias_grad(backend, mask, q, k))
    if kernel:
        bias = _aten.bias(backend, mask, q)
        try:
            dq, dk, dv, dm = _aten.backward(backend, grad_out, q, k, v, out, stats, bias, causal=causal, scale=sc,
                                            bias_grad=mask_grad)
        except _aten.KernelError as exc:
            _kernel_failed(backend, "backward", exc)
            kernel = False
        if kernel and mask_grad:  # the gradient of the (B, H, Lq, Lk) bias view, back to the mask's shape
            dm = reference.sum_to(dm, mask.shape).reshape(mask.shape).to(mask.dtype)
    if not kernel:
        dq, dk, dv, dm = reference.backward(grad_out, q, k, v, mask, scale=sc, causal=causal, kv_groups=kv_groups,
                                            mask_fill=fill, mask_grad=mask_grad)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dm.contiguous() if mask_grad else None


class _Sdpa(torch.autograd.Function):
    """`forward` differentiated by `backward` (q, k, v and a float mask that requires a gradient)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, kwargs):
        out, stats = forward(q, k, v, mask, **kwargs)
        ctx.save_for_backward(q, k, v, mask, out, stats)
        ctx.kwargs = kwargs
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, mask, out, stats = ctx.saved_tensors
        mask_grad = mask is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dm = backward(grad, q, k, v, out, stats, mask, mask_grad=mask_grad, **ctx.kwargs)
        return dq, dk, dv, dm, None


def _facts(q: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, mask_fill: float | None,
           training: bool) -> dict:
    return dict(device_type=q.device.type, dtype=q.dtype, head_dim=q.shape[-1], v_head_dim=v.shape[-1],
                mask_dtype=None if mask is None else mask.dtype, mask_fill=mask_fill, training=training)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str | None = None,
              scale: float | None = None, causal: bool = False, mask: torch.Tensor | None = None,
              mask_fill: float | None = None) -> torch.Tensor:
    """Attention through PyTorch's SDPA kernel ``backend`` (None: the first of `backends_for` q's device that
    `applies`), with autograd; the semantics of `attnfuse.kernels.reference`.  Raises ValueError where the
    backend cannot compute it exactly (with `applies`' reason)."""
    who = f"{_WHO}.attention"
    validate.qkv(who, q, k, v, floating=True)
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if mask is not None:
        try:
            ok = torch.broadcast_shapes(mask.shape, full) == full
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{who}: mask must broadcast to (batch, heads, q_len, kv_len) = {full}; got "
                             f"{tuple(mask.shape)}")
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, mask))
    facts = _facts(q, v, mask, mask_fill, grads)
    if backend is None:
        square = not causal or q.shape[2] == k.shape[2]  # flash / cuDNN align a non-square causal bottom-right
        reasons = {b: applies(b, **facts) if square or b not in ("flash", "cudnn") else "causal with q_len != kv_len"
                   for b in backends_for(q.device.type)}
        backend = next((b for b, why in reasons.items() if why is None), None)
        if backend is None:
            detail = "; ".join(f"{b}: {why}" for b, why in reasons.items()) or f"no backend runs {q.device.type}"
            raise ValueError(f"{who}: no SDPA backend computes this exactly ({detail})")
    else:
        check_backend(who, backend)
        why = applies(backend, **facts)
        if why:
            raise ValueError(f"{who}: backend={backend!r} cannot compute this exactly: {why}")
    kwargs = dict(backend=backend, scale=scale, causal=causal, kv_groups=q.shape[1] // k.shape[1],
                  mask_fill=mask_fill)
    return _Sdpa.apply(q, k, v, mask, kwargs)
