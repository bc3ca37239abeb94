"""``attnfuse::attention``'s CPU forward as graph ops, so that Inductor compiles it (no per-call Python).

While AOTAutograd traces a graph (``FunctionalTensorMode``), where the op's CPU implementation would run PyTorch's
fused SDPA kernel (`attnfuse.kernels.cpu`'s ``"sdpa-flash-cpu"`` path), the trace records that path itself instead
of one opaque call: the opaque op costs ~0.1 ms of Python dispatch and checks on every call, which dominates a small
compiled decode step.  What the op decides on every call is split in two:

* static conditions (device, dtypes, head dims; no softcap, dropout, structured mask, sinks or approximate
  table: `attnfuse.costmodel.cpu.path`, as the op decides them; the op's argument checks, `attnfuse.kernels.cpu.check`):
  decided once, on the traced tensors' metadata, which the compiled graph's guards pin;
* data-dependent ones stay per call, in the graph: ``torch.cond(pred, SDPA, the op kept whole)``, where ``pred``
  says the inputs are finite (PyTorch's fused kernel's NaN pattern differs from softmax's on non-finite inputs)
  and, for the op, that every query row sees a key (such a row is NaN, or uniform for a finite fill).

So the graph computes what the opaque op computes, input by input.  Entry points: `forward` (the op, from
`attnfuse.ops`' dispatch under ``FunctionalTensorMode``, below autograd: the op's own backward still
differentiates it) and `attention_sdpa` (`attnfuse.ops.attention_sdpa`, only where nothing needs a gradient).
``torch.export`` keeps the ops whole.  This module does not import `attnfuse.ops` (ops imports it): it calls the
registered op by its ``torch.ops`` name and gets ``attention_sdpa``'s emulation passed in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch._subclasses.functional_tensor import FunctionalTensor

from .kernels import cpu

_NAMES = ("q", "k", "v", "mask", "seed", "alibi", "sinks")
_DEFAULTS = {"scale": None, "causal": False, "softcap": 0.0, "kv_groups": 1, "dropout_p": 0.0, "mask_fill": None,
             "window_left": -1, "window_right": -1, "block_sparse": False, "window_pad": False, "approx": "",
             "tiles": "", "impl": ""}
log = logging.getLogger("attnfuse.cpu_graph")
_STATE = threading.local()  # .whole: tracing the cond's fallback branch, where the op stays one node


def _static_fast(a: dict[str, Any]) -> bool:
    """Whether every call with tensors like these (same device, dtypes, shapes) can take the SDPA path, up to
    the data-dependent conditions the traced graph checks."""
    q, k, v, mask = a["q"], a["k"], a["v"], a["mask"]
    return (q.device.type == "cpu" and not cpu.runs_triton(q, k, v) and not a["approx"] and not a["impl"]
            and cpu.path(q, v, mask, a["alibi"], a["sinks"], **{n: a[n] for n in _DEFAULTS}) == "sdpa-flash-cpu"
            and _plain_sizes(q, k, v, mask))


def _check(a: dict[str, Any]) -> None:
    """The op's argument checks (`attnfuse.kernels.cpu.check`) on ``a``, the op's arguments by name."""
    cpu.check(a["q"], a["k"], a["v"], a["mask"], a["alibi"], a["sinks"], kv_groups=a["kv_groups"], causal=a["causal"],
              window_left=a["window_left"], window_right=a["window_right"], block_sparse=a["block_sparse"],
              window_pad=a["window_pad"], approx=a["approx"])


def _plain_sizes(*xs: torch.Tensor | None) -> bool:
    """Every size of ``xs`` is an int or a bare symbol.  A size that is an expression of symbols (``s0*s1``, a
    folded batch) is declined: Inductor (torch 2.13) fails to generate a cond subgraph whose operand sizes are
    such products ("expected [s0, s1] to have been codegen-ed"); the op then stays one node."""
    for x in xs:
        for size in () if x is None else x.shape:
            if isinstance(size, torch.SymInt) and not size.node.expr.is_Symbol:
                return False
    return True


def _finite(*xs: torch.Tensor) -> torch.Tensor:
    """Bool scalar: no NaN/Inf in any of ``xs`` (one sum each, as `attnfuse.kernels.cpu.all_finite`; an overflowing
    sum of finite values only sends the call to the exact reference).  Inductor fuses each sum into the kernel that
    produces the tensor where it can."""
    acc = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    total = xs[0].sum(dtype=acc)
    for x in xs[1:]:
        total = total + x.sum(dtype=acc)
    return torch.isfinite(total)


def _dead(mask: torch.Tensor, causal: bool, lq, lk) -> torch.Tensor:
    """Bool (..., q_len, 1): rows where every key is masked (`attnfuse.kernels.cpu.dead_rows` without its branches)."""
    keep = mask if mask.dtype == torch.bool else ~torch.isneginf(mask)
    if causal:
        keep = keep & torch.ones(lq, lk, dtype=torch.bool, device=mask.device).tril()
    return ~keep.any(-1, keepdim=True)


def _canonical(out: torch.Tensor) -> torch.Tensor:
    """``out`` laid out as the op's fake promises, (B, Lq, H, Dv) in memory (`attnfuse.kernels.cpu.output_like`), with
    exactly its strides: a size-1 dim's stride is free, and ``torch.cond`` compares its branches' strides."""
    out = cpu.in_output_layout(out)
    b, h, n, dv = out.shape
    return out.as_strided((b, h, n, dv), (n * h * dv, dv, h * dv, 1))


def _sdpa(q, k, v, mask, causal, scale, kv_groups) -> torch.Tensor:
    """PyTorch's SDPA as `attnfuse.kernels.cpu.forward` calls it, in the op's output layout."""
    sdpa_mask, sdpa_causal = cpu.sdpa_mask(mask, causal, q.shape[-2], k.shape[-2])
    return _canonical(torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=sdpa_mask, is_causal=sdpa_causal, scale=scale, enable_gqa=kv_groups > 1))


def _narrowed(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` with each broadcast (stride-0) dim narrowed to size 1: it broadcasts back to the same values."""
    for d in range(mask.dim()):
        if mask.stride(d) == 0 and mask.shape[d] > 1:
            mask = mask.narrow(d, 0, 1)
    return mask


def _pinned(x: torch.Tensor, broadcasts: bool = False) -> torch.Tensor:
    """``x`` as a cond operand: dense, in its traced stride order, pinned there for Inductor.

    Inductor lowers a cond's operands with the layouts it prefers but compiles the branches for the traced strides
    (and asserts them on every call), so each operand's stride order is pinned with Inductor's own prim (a no-op
    elsewhere).  That needs a dense tensor: a strided slice (q of a fused QKV projection) or a broadcast view is
    copied, except that a mask (``broadcasts``) has its broadcast (stride-0) dims narrowed to size 1 instead:
    the branches broadcast it again, to the same values.
    """
    from torch._inductor import inductor_prims  # noqa: F401 - registers prims.inductor_force_stride_order

    x = _narrowed(x) if broadcasts else x
    if not torch._prims_common.is_non_overlapping_and_dense_or_false(x):
        x = x.contiguous()
    return torch.ops.prims.inductor_force_stride_order(x, x.stride())


def _cond(pred: torch.Tensor, fast, slow, q, k, v, mask) -> torch.Tensor | None:
    """``torch.cond(pred, fast, slow, (q, k, v[, mask]))``'s first output (the HOP itself: no dynamo), or None
    where it cannot be traced; the op then stays one node, which computes the same.  What was traced before a
    failure is dead code (Inductor drops it)."""
    try:
        operands = (*(_pinned(x) for x in (q, k, v)), *(() if mask is None else (_pinned(mask, broadcasts=True),)))
        return torch.ops.higher_order.cond(pred, fast, slow, operands)[0]
    except Exception as exc:  # noqa: BLE001 - any failure: the opaque op is always right
        log.debug("attention stays one opaque op in this graph: torch.cond failed (%s: %s)", type(exc).__name__, exc)
        return None


def _whole(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` traced with every attnfuse op in it kept whole (the cond's fallback branch)."""
    _STATE.whole = True
    try:
        return fn(*args, **kwargs)
    finally:
        _STATE.whole = False


def forward(mode: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The op's (out, stats) traced as graph ops under ``mode``, or None where the op stays one node.

    ``cond(finite inputs and every row sees a key, SDPA, the op)``: with a row that sees no key the op's value
    is NaN (-inf fill) or uniform (finite fill), which the op itself computes."""
    if getattr(_STATE, "whole", False):
        return None
    a = {**dict(zip(_NAMES, (*args, *[None] * (len(_NAMES) - len(args))))), **_DEFAULTS, **kwargs}
    if not _static_fast(a):
        return None
    q, k, v, mask, causal, kv_groups = a["q"], a["k"], a["v"], a["mask"], a["causal"], a["kv_groups"]
    _check(a)  # what the opaque op raises, raised once at compile time
    scale = cpu.scale_of(q, a["scale"])

    def fast(q, k, v, *rest):
        return (_sdpa(q, k, v, rest[0] if rest else None, causal, scale, kv_groups),)

    def whole(q, k, v, *rest):  # no seed: without dropout it is unused
        return _whole(torch.ops.attnfuse.attention.default, q, k, v, rest[0] if rest else None,
                      **{n: a[n] for n in _DEFAULTS})[:1]

    with mode:
        ok = _finite(q, k, v)
        if mask is not None:
            ok = ok & ~_dead(mask, causal, q.shape[-2], k.shape[-2]).any()
        out = _cond(ok, fast, whole, q, k, v, mask)
        return None if out is None else (out, cpu.no_stats(q))  # stats outside the cond: unused, they cost nothing


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                   kwargs: dict[str, Any], emulation: Callable[..., torch.Tensor]) -> torch.Tensor | None:
    """`attnfuse.ops.attention_sdpa` (SDPA's convention: a row that sees no key is 0) traced for Inductor, or None.

    While AOTAutograd traces a CPU graph in which nothing needs a gradient: ``cond(finite inputs, SDPA, the
    emulation)``.  PyTorch's SDPA *is* that convention, so the mask goes to it as is, with no pass over it to
    find the dead rows.  Not with ``causal`` (the emulation finds dead rows from the mask alone), a finite fill,
    or a gradient (the op's backward, not PyTorch's CPU flash backward, must differentiate it).
    ``emulation``: `attnfuse.ops.attention_sdpa` itself, traced whole in the cond's fallback branch.
    """
    mode = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FUNCTIONAL)
    if mode is None or getattr(_STATE, "whole", False) or not isinstance(q, FunctionalTensor) or _exporting():
        return None
    a = {"q": q, "k": k, "v": v, "mask": mask, "seed": None, "alibi": None, "sinks": None, **_DEFAULTS, **kwargs}
    if (not _static_fast(a) or a["causal"] or a["mask_fill"] not in (None, float("-inf"))
            or (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, mask)))):
        return None
    _check(a)
    scale = cpu.scale_of(q, a["scale"])

    def fast(q, k, v, bias):
        bias = cpu.sdpa_mask(bias, False, q.shape[-2], k.shape[-2])[0]  # a 1-D mask as (q_len, kv_len): a view
        return (_canonical(torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, scale=scale, enable_gqa=a["kv_groups"] > 1)),)

    def emulated(q, k, v, bias):  # a bool mask is exactly where its bias is 0
        m = bias == 0 if mask.dtype == torch.bool else bias
        return (_canonical(_whole(emulation, q, k, v, m, **kwargs)),)

    # SDPA's own reading of a bool mask (0 where True, -inf elsewhere, in q's dtype), made outside the cond so
    # that Inductor fuses it into the kernel that makes the mask, and the only mask operand; over the mask's
    # broadcast dims once (same values)
    bias = _narrowed(mask)
    if bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(~bias, float("-inf"))
    return _cond(_finite(q, k, v), fast, emulated, q, k, v, bias)


def _exporting() -> bool:
    """Whether ``torch.export`` is tracing: it keeps attnfuse's ops whole (as the op's dispatch in `attnfuse.ops`)."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:
        return False
    return custom_triton_ops_decomposition_disabled()
