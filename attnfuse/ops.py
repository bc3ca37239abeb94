"""``torch.ops.attnfuse.*``: the fused attention op the rewriter emits.

``attnfuse::attention(q, k, v, mask=None, seed=None, alibi=None, sinks=None, *, scale=None, causal=False,
softcap=0.0, kv_groups=1, dropout_p=0.0, mask_fill=None, window_left=-1, window_right=-1,
block_sparse=False, window_pad=False, approx="") -> (out, stats)``

Tensors are ``(batch, heads, seqlen, head_dim)``; K/V have ``heads / kv_groups``
heads.  ``mask`` broadcasts to ``(batch, heads, q_len, kv_len)``: bool means
"True = attend" (masked scores become ``mask_fill``), float is an additive
bias and gets a gradient when it requires one.  ``mask_fill=None`` means -inf.  ``seed`` (int64 tensor) seeds
the dropout mask.  The exact semantics are in `attnfuse.kernels.reference`.
Structured masks, proven by `attnfuse.passes.masks`, skip work instead of reading a tensor:
``window_left``/``window_right`` (-1 = unbounded) keep key ``j`` for query ``i`` iff
``i - left <= j <= i + right`` (out-of-band scores are -inf); ``alibi`` (fp32, one slope per
query head) adds ``slope[h] * (j - i)``; ``block_sparse`` says ``mask`` is a constant whose
empty tiles the kernels skip.  ``window_pad`` (a finite band, ``q_len == kv_len``, no ALiBi or block-sparse):
the textbook ``unfold`` spelling of local attention, whose zero-padded K/V rows are real keys: query ``i``
also sees ``n_pad(i)`` keys of score 0 and value 0 at the band's positions outside ``[0, L)`` (constants:
no gradient; `attnfuse.kernels.reference.phantom_keys`).
``sinks`` (attention sinks: GPT-OSS, x-transformers' ``attn_sink``): one logit per query head, shape ``(H,)``
or broadcastable to ``(B, H)``, float32 or the inputs' dtype; each row gets one more key of that score (not
scaled, capped or masked) and value 0, i.e. ``softmax([s, sink])[..., :-1] @ v``; a row whose every real key is
masked is 0.  It gets a gradient (`attnfuse.kernels.reference`).  Not with ``window_pad`` or ``approx``.
``approx``: "" (exact), or the cost model's per-call table (`attnfuse.costmodel.Plan.op_table`, JSON) of
key-length ranges -> "exact" | "topk" | "lsh" with the approximate families' settings: each call looks its
key length up and runs `attnfuse.kernels.topk` / `attnfuse.kernels.lsh` (forward and backward) where the
table says so (only the causal flag, scale and GQA apply there: the policy admits no other site).
``out`` is ``(B, H, Lq, Dv)``; ``stats`` holds the softmax row statistics the flash
backward needs (fp32 ``(B, H, Lq, 2)``: row max and log2 of the row sum, base 2),
or is empty on the paths whose backward recomputes them.  `attend` returns ``out`` alone.

Device dispatch:

* CUDA (and CPU under ``TRITON_INTERPRET=1``): the Triton FlashAttention kernels
  of `attnfuse.kernels.flash`, forward and backward.  Under ``torch.compile`` the
  op decomposes into its Triton launches (as ``torch.library.triton_op`` does),
  so Inductor sees the kernels; ``torch.export`` keeps the op whole.
* CPU: PyTorch's fused flash-attention CPU kernel where it can express the site
  (no softcap, no dropout, equal q/v head dims, finite inputs) and the blocked
  reference otherwise; the backward is the blocked reference.  Structured masks
  run `attnfuse.kernels.tiled` (band tiles only: O(N*w) time and memory), forward
  and backward.  Under ``torch.compile`` the fused-kernel path is traced into the graph
  (`attnfuse._cpu_graph`: ``torch.cond`` of SDPA and the op, on finite inputs), so a
  compiled call pays no Python dispatch.
* float64 and head dims above 256 take the reference on every device.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from typing import Any

import torch

from .kernels import _launch, flash, reference, tiled
from .kernels.reference import sink_error, window_pad_error

_NEG_INF = float("-inf")
_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def _check(q, k, v, mask, kv_groups):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attnfuse.attention: q, k, v must be 4-D (batch, heads, seqlen, head_dim); "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[1] * kv_groups != q.shape[1] or v.shape[1] != k.shape[1]:
        raise ValueError(f"attnfuse.attention: kv_groups={kv_groups} needs k/v heads * kv_groups == q heads; "
                         f"got q heads {q.shape[1]}, k heads {k.shape[1]}, v heads {v.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attnfuse.attention: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def _dead_rows(mask, causal, lq, lk):
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


def _fast_ok(q, k, v, mask, softcap, dropout_p) -> bool:
    """Whether PyTorch's fused CPU kernel computes exactly our semantics for these inputs.

    It cannot express softcap, seeded dropout or a different V head dim, and it
    zeroes rows that eager softmax makes NaN (NaN/Inf inputs), so those go to the
    blocked reference.
    """
    return (softcap == 0 and dropout_p == 0 and q.shape[-1] == v.shape[-1] and q.dtype in _FAST_DTYPES
            and (mask is None or mask.dtype == torch.bool or mask.dtype == q.dtype)
            and all(_all_finite(x) for x in (q, k, v)))


def _all_finite(x: torch.Tensor) -> bool:
    # One reduction, no temporary: NaN/Inf anywhere make the sum non-finite. An overflowing sum
    # of finite values is a false alarm that only sends the call to the (exact) reference path.
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return math.isfinite(float(x.sum(dtype=acc)))  # a host float: no isfinite kernel per call


def _sdpa_mask(mask, causal, lq, lk):
    """(mask, is_causal) for PyTorch's SDPA, which takes a mask or is_causal but not both."""
    if mask is not None and mask.dim() < 2:
        mask = mask.expand(lq, lk)  # its fused CPU kernel rejects a 1-D (kv_len,) mask
    if mask is None or not causal:
        return mask, causal
    tril = torch.ones(lq, lk, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return mask & tril, False
    return mask.masked_fill(~tril, _NEG_INF), False


def output_like(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The op's output buffer: shape (B, H, Lq, Dv), laid out in memory as (B, Lq, H, Dv).

    That is the layout the next op of nearly every model wants (``out.transpose(1, 2)``
    then a reshape to (B, Lq, H*Dv) is free), and the one PyTorch's fused CPU kernel writes.
    """
    b, h, lq, dv = q.shape[0], q.shape[1], q.shape[2], v.shape[-1]
    return q.new_empty(b, lq, h, dv).transpose(1, 2)


def _in_output_layout(out: torch.Tensor) -> torch.Tensor:
    if out.transpose(1, 2).is_contiguous():
        return out
    b, h, lq, dv = out.shape
    return out.new_empty(b, lq, h, dv).transpose(1, 2).copy_(out)


def _structured(alibi, window_left, window_right, block_sparse) -> bool:
    return alibi is not None or window_left >= 0 or window_right >= 0 or block_sparse


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              seed: torch.Tensor | None = None, alibi: torch.Tensor | None = None,
              sinks: torch.Tensor | None = None, *, scale: float | None = None,
              causal: bool = False, softcap: float = 0.0, kv_groups: int = 1, dropout_p: float = 0.0,
              mask_fill: float | None = None, window_left: int = -1, window_right: int = -1,
              block_sparse: bool = False, window_pad: bool = False, approx: str = ""
              ) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k, v, mask, kv_groups)
    _check_structure(q, k, alibi, window_left, window_right, block_sparse, mask, causal, window_pad)
    _check_sinks(q, sinks, window_pad, approx)
    family = _approx_family(approx, k.shape[-2])
    if family is not None:
        module, params = family
        out, stats = module.forward(q, k, v, scale=_scale(q, scale), causal=causal, **params)
        return _in_output_layout(out), (stats if _use_flash(q, k, v) else _no_stats(q))
    if _use_flash(q, k, v):
        return flash.forward(q, k, v, mask, _seed_on(seed, q), scale=scale, causal=causal, softcap=softcap,
                             dropout_p=dropout_p, mask_fill=mask_fill, alibi=alibi,
                             window_size=(window_left, window_right), block_sparse=block_sparse,
                             window_pad=window_pad, **_sink_kw(sinks))
    if _structured(alibi, window_left, window_right, block_sparse):
        out = tiled.forward(q, k, v, mask, _seed_int(seed), scale=_scale(q, scale), causal=causal, softcap=softcap,
                            kv_groups=kv_groups, dropout_p=dropout_p, mask_fill=_fill(mask_fill), alibi=alibi,
                            window_left=window_left, window_right=window_right, block_sparse=block_sparse,
                            window_pad=window_pad, **_sink_kw(sinks))
        return out, _no_stats(q)
    if sinks is not None:  # PyTorch's fused CPU kernel has no sink: the blocked reference
        out = reference.forward(q, k, v, mask, _seed_int(seed), scale=_scale(q, scale), causal=causal,
                                softcap=softcap, kv_groups=kv_groups, dropout_p=dropout_p, mask_fill=_fill(mask_fill),
                                sinks=sinks)
        return out, _no_stats(q)
    return _cpu_forward(q, k, v, mask, seed, scale, causal, softcap, kv_groups, dropout_p, mask_fill), _no_stats(q)


def _sink_kw(sinks: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {} if sinks is None else {"sinks": sinks}


def _check_sinks(q, sinks, window_pad, approx):
    if sinks is None:
        return
    why = sink_error(sinks, q.shape[0], q.shape[1], q.dtype)
    if why:
        raise ValueError(f"attnfuse.attention: {why}")
    if window_pad or approx:
        what = "window_pad=True" if window_pad else "an approximate kernel table (approx)"
        raise ValueError(f"attnfuse.attention: sinks do not combine with {what}; allowed with sinks: "
                         f"window_pad=False and approx=''")


def _check_structure(q, k, alibi, window_left, window_right, block_sparse, mask, causal, window_pad):
    if window_left < -1 or window_right < -1:
        raise ValueError(f"attnfuse.attention: window_left/window_right must be -1 (unbounded) or >= 0; "
                         f"got {window_left}, {window_right}")
    if window_pad:
        why = window_pad_error(window_left, window_right, causal, q.shape[-2], k.shape[-2],
                               alibi=alibi is not None, block_sparse=block_sparse)
        if why:
            raise ValueError(f"attnfuse.attention: {why}")
    if alibi is not None and (alibi.dim() != 1 or alibi.shape[0] != q.shape[1]):
        raise ValueError(f"attnfuse.attention: alibi must hold one slope per query head, shape ({q.shape[1]},); "
                         f"got {tuple(alibi.shape)}")
    if block_sparse and mask is None:
        raise ValueError("attnfuse.attention: block_sparse=True needs the constant mask whose tiles it skips")


@contextlib.contextmanager
def _autograd_below_the_op():
    """Autograd inside an op's implementation: the dispatcher runs it with the autograd keys excluded (it is
    "below autograd"); the approximate families' CPU backwards differentiate a recomputed forward."""
    keys = tuple(getattr(torch._C.DispatchKey, name) for name in (
        "AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView"))
    saved = [torch._C._dispatch_tls_is_dispatch_key_excluded(key) for key in keys]
    try:
        for key in keys:
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
        with torch.enable_grad():
            yield
    finally:
        for key, was in zip(keys, saved):
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, was)


@functools.lru_cache(maxsize=64)
def _table(approx: str) -> tuple[tuple[int, int, str], ...]:
    """The (lo, hi, family) rows of a plan's per-call table (`attnfuse.costmodel.Plan.op_table`)."""
    data = json.loads(approx)
    return tuple((int(lo), int(hi), str(fam)) for lo, hi, fam in data["table"])


@functools.lru_cache(maxsize=64)
def _params(approx: str, family: str) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(json.loads(approx).get("params", {}).get(family, {}).items()))


def _approx_family(approx: str, kv_len) -> tuple[Any, dict[str, int]] | None:
    """(kernel module, its settings) of the approximate family the table picks for ``kv_len``, or None (exact).
    Called on concrete lengths: the op is never traced through when it has a table (see `_traceable_cuda`)."""
    if not approx:
        return None
    n = int(kv_len)
    for lo, hi, family in _table(approx):
        if n >= lo and (hi < 0 or n < hi):
            if family == "exact":
                return None
            from .kernels import lsh, topk

            return {"topk": topk, "lsh": lsh}[family], dict(_params(approx, family))
    return None


def _fill(mask_fill: float | None) -> float:
    return _NEG_INF if mask_fill is None else mask_fill


def _seed_int(seed: torch.Tensor | None) -> int:
    return 0 if seed is None else int(seed.item())


attention = torch.library.custom_op("attnfuse::attention", mutates_args=())(_attention)


def _cpu_forward(q, k, v, mask, seed, scale, causal, softcap, kv_groups, dropout_p, mask_fill):
    mask_fill = _NEG_INF if mask_fill is None else mask_fill
    sc = _scale(q, scale)
    dead = _dead_rows(mask, causal, q.shape[-2], k.shape[-2])
    finite_fill = mask is not None and mask.dtype == torch.bool and mask_fill != _NEG_INF
    if _fast_ok(q, k, v, mask, softcap, dropout_p) and not (dead is not None and finite_fill):
        sdpa_mask, sdpa_causal = _sdpa_mask(mask, causal, q.shape[-2], k.shape[-2])
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=sdpa_mask, is_causal=sdpa_causal, scale=sc, enable_gqa=kv_groups > 1)
        out = _in_output_layout(out)
        return out if dead is None else out.masked_fill_(dead, float("nan"))
    return reference.forward(q, k, v, mask, 0 if seed is None else int(seed.item()), scale=sc, causal=causal,
                             softcap=softcap, kv_groups=kv_groups, dropout_p=dropout_p, mask_fill=mask_fill)


@attention.register_fake
def _(q, k, v, mask=None, seed=None, alibi=None, sinks=None, *, scale=None, causal=False, softcap=0.0, kv_groups=1,
      dropout_p=0.0, mask_fill=None, window_left=-1, window_right=-1, block_sparse=False, window_pad=False,
      approx=""):
    if _use_flash(q, k, v):
        return output_like(q, v), q.new_empty(*q.shape[:3], 2, dtype=torch.float32)
    return output_like(q, v), _no_stats(q)


def _traceable_cuda(mode, op, types, args, kwargs):
    """Under ``FunctionalTensorMode`` (AOTAutograd), run the CUDA implementation itself so that its
    Triton launches are traced (``wrap_triton``) and Inductor sees the kernels; on the CPU, trace the
    fused-SDPA path as graph ops where it applies (`attnfuse._cpu_graph`: no per-call Python); elsewhere
    (``torch.export``, the CPU's other paths) the op stays one opaque node.  This is what
    ``torch.library.triton_op`` does, for the CUDA path."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:  # older torch: export has no such switch
        custom_triton_ops_decomposition_disabled = lambda: False

    plain = (torch.Tensor, torch._subclasses.FakeTensor, torch._subclasses.functional_tensor.FunctionalTensor)
    if (op is not _BWD and not args[0].is_cuda and not custom_triton_ops_decomposition_disabled()
            and all(issubclass(t, plain) for t in types)):
        from . import _cpu_graph  # CPU: the fused-SDPA path as graph ops where it applies (no per-call Python)

        traced = _cpu_graph.forward(mode, args, kwargs)
        if traced is not None:
            return traced
    if (custom_triton_ops_decomposition_disabled() or any(not issubclass(t, plain) for t in types)
            or not args[0].is_cuda or not (args[5].numel() if op is _BWD else _use_flash(*args[:3]))
            or kwargs.get("approx")):  # a per-call kernel table: the op stays whole and chooses at run time
        return mode.__torch_dispatch__(op, types, args, kwargs)
    with mode:
        return _IMPLS[op](*args, **kwargs)


def _use_flash(q, k, v) -> bool:
    """Whether the Triton kernels run these tensors (CUDA, or CPU under the Triton interpreter)."""
    return q.dtype != torch.float64 and _launch.supported(q, k, v) is None


def _no_stats(q):
    return q.new_empty(0, dtype=torch.float32)


def _seed_on(seed, q):
    return None if seed is None else seed.to(device=q.device, dtype=torch.int64).reshape(())


def _attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, stats: torch.Tensor, mask: torch.Tensor | None, seed: torch.Tensor | None,
                       alibi: torch.Tensor | None, sinks: torch.Tensor | None = None, *, scale: float | None,
                       causal: bool, softcap: float,
                       kv_groups: int, dropout_p: float, mask_fill: float | None, window_left: int, window_right: int,
                       block_sparse: bool, mask_grad: bool, window_pad: bool = False,
                       approx: str = "") -> list[torch.Tensor]:
    family = _approx_family(approx, k.shape[-2])
    if family is not None:
        module, params = family
        with _autograd_below_the_op():  # the CPU paths recompute their forward under autograd
            dq, dk, dv = module.backward(grad_out, q, k, v, out, stats, scale=_scale(q, scale), causal=causal,
                                         **params)
        return [dq.contiguous(), dk.contiguous(), dv.contiguous(), q.new_empty(0), q.new_empty(0)]
    if stats.numel():  # the forward ran the flash kernel
        # dQ in its own pass, not fp32 atomics: on an H100 the atomic variant was 5-9x slower
        # (benchmarks/results/bwd-sweep-h100-2026-11-23.json), and this one is also reproducible
        dq, dk, dv, dm, *ds = flash.backward(
            grad_out, q, k, v, out, stats, mask, _seed_on(seed, q), scale=scale, causal=causal, softcap=softcap,
            dropout_p=dropout_p, mask_fill=mask_fill, mask_grad=mask_grad, deterministic=True, alibi=alibi,
            window_size=(window_left, window_right), block_sparse=block_sparse, window_pad=window_pad,
            **_sink_kw(sinks))
        return [dq, dk, dv, dm if dm is not None else q.new_empty(0), ds[0] if ds else q.new_empty(0)]
    # PyTorch's CPU flash backward misses the 2x accuracy rule with masks (measured up to
    # ~5x eager's error in fp32), so the backward always recomputes softmax per block (the blocked
    # reference, or the tiled kernel for structured masks) and does not need ``out`` (flash-style
    # kernels use it for rowsum(dO * O)).
    structured = _structured(alibi, window_left, window_right, block_sparse)
    extra = dict(alibi=alibi, window_left=window_left, window_right=window_right,
                 block_sparse=block_sparse, window_pad=window_pad) if structured else {}
    dq, dk, dv, dm, *ds = (tiled if structured else reference).backward(
        grad_out, q, k, v, mask, _seed_int(seed), scale=_scale(q, scale), causal=causal, softcap=softcap,
        kv_groups=kv_groups, dropout_p=dropout_p, mask_fill=_fill(mask_fill), mask_grad=mask_grad, **extra,
        **_sink_kw(sinks))
    # contiguous, as the fake impl promises (the K/V head reduction of GQA makes new tensors anyway)
    return [dq.contiguous(), dk.contiguous(), dv.contiguous(), dm.contiguous() if dm is not None else q.new_empty(0),
            ds[0] if ds else q.new_empty(0)]


attention_backward = torch.library.custom_op("attnfuse::attention_backward", mutates_args=())(_attention_backward)


@attention_backward.register_fake
def _(grad_out, q, k, v, out, stats, mask, seed, alibi, sinks=None, *, scale, causal, softcap, kv_groups, dropout_p,
      mask_fill, window_left, window_right, block_sparse, mask_grad, window_pad=False, approx=""):
    dm = mask.new_empty(mask.shape) if mask_grad else q.new_empty(0)
    ds = sinks.new_empty(sinks.shape) if sinks is not None else q.new_empty(0)
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dm, ds]


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    q, k, v, mask, seed, alibi, sinks = inputs
    ctx.save_for_backward(q, k, v, mask, seed, alibi, sinks, *output)
    ctx.kwargs = keyword_only_inputs


def _backward(ctx, grad, _grad_stats):
    q, k, v, mask, seed, alibi, sinks, out, stats = ctx.saved_tensors
    mask_grad = mask is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dm, ds = attention_backward(grad, q, k, v, out, stats, mask, seed, alibi, sinks, mask_grad=mask_grad,
                                            **ctx.kwargs)
    return dq, dk, dv, (dm if mask_grad else None), None, None, (ds if sinks is not None else None)


attention.register_autograd(_backward, setup_context=_setup_context)
_BWD = torch.ops.attnfuse.attention_backward.default
_IMPLS = {torch.ops.attnfuse.attention.default: _attention, _BWD: _attention_backward}
for _op in (attention, attention_backward):
    _op.register_torch_dispatch(torch._subclasses.functional_tensor.FunctionalTensorMode, _traceable_cuda)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           seed: torch.Tensor | None = None, alibi: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
           **kwargs) -> torch.Tensor:
    """``attnfuse::attention``'s output without the row statistics."""
    return attention(q, k, v, mask, seed, alibi, sinks, **kwargs)[0]


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                   seed: torch.Tensor | None = None, alibi: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """`attention` with ``F.scaled_dot_product_attention``'s convention for fully masked rows.

    Eager SDPA (and ``nn.MultiheadAttention`` without weights) returns 0 for a query row whose
    keys are all masked, with no gradient, where eager softmax gives NaN.  Such rows attend to
    every key inside the op and are zeroed after it; no data-dependent branch, so it traces.
    """
    if kwargs.get("window_pad", False) and mask is not None:
        raise ValueError("attnfuse.attention_sdpa: window_pad=True (the unfold spelling's padded keys) has no SDPA "
                         "form to zero dead rows of; call attnfuse.attention with window_pad=True instead")
    if mask is None:
        return attend(q, k, v, mask, seed, alibi, **kwargs)
    if alibi is None:  # compiling for CPU: PyTorch's SDPA itself where it applies (`attnfuse._cpu_graph`)
        from . import _cpu_graph

        traced = _cpu_graph.attention_sdpa(q, k, v, mask, kwargs)
        if traced is not None:
            return traced
    keep = mask if mask.dtype == torch.bool else ~torch.isneginf(mask)
    left, right = kwargs.get("window_left", -1), kwargs.get("window_right", -1)
    if kwargs.get("causal", False):
        right = 0 if right < 0 else min(right, 0)
    band = left >= 0 or right >= 0
    if band and mask.dim() >= 2 and mask.shape[-2] == 1 and q.shape[-2] == k.shape[-2]:
        # key padding under a band: the dead rows come from a prefix sum over the key vector, O(B * L).  The
        # kernel gets a finite fill, so a dead row still sees its own key there (finite scores, no NaN in the
        # backward), and is zeroed after it; rows with a live key are unchanged (exp of the fill is 0).
        dead = _band_dead_rows(keep, q.shape[-2], k.shape[-2], left, right)
        if mask.dtype == torch.bool:
            finite, kwargs = mask, {**kwargs, "mask_fill": _FINITE_FILL}
        else:
            finite = mask.masked_fill(torch.isneginf(mask), torch.finfo(mask.dtype).min)
        return attend(q, k, v, finite, seed, alibi, **kwargs).masked_fill(dead, 0.0)
    if band:  # a general mask under a band: the dense test (the rewriter does not emit this)
        i = torch.arange(q.shape[-2], device=mask.device)[:, None]
        j = torch.arange(k.shape[-2], device=mask.device)[None, :]
        keep = keep & ((j >= i - left) | (left < 0)) & ((j <= i + right) | (right < 0))
    dead = ~keep.any(-1, keepdim=True)
    safe = mask | dead if mask.dtype == torch.bool else mask.masked_fill(dead, 0.0)
    return attend(q, k, v, safe, seed, alibi, **kwargs).masked_fill(dead, 0.0)


_FINITE_FILL = torch.finfo(torch.float32).min


def _band_dead_rows(keep: torch.Tensor, lq: int, lk: int, left: int, right: int) -> torch.Tensor:
    """(..., Lq, 1) bool: rows whose band ``[i - left, i + right]`` (-1: unbounded) holds no key that the
    (..., 1, Lk) ``keep`` vector keeps, from a prefix sum over the keys (no (Lq, Lk) tensor)."""
    counts = torch.nn.functional.pad(keep.to(torch.int32).cumsum(-1), (1, 0))
    i = torch.arange(lq, device=keep.device)
    lo = (i - left).clamp(0, lk) if left >= 0 else torch.zeros_like(i)
    hi = (i + right + 1).clamp(0, lk) if right >= 0 else torch.full_like(i, lk)
    seen = counts.index_select(-1, hi) - counts.index_select(-1, lo)
    return (seen <= 0).transpose(-1, -2)

