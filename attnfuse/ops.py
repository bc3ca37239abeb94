"""``torch.ops.attnfuse.*``: the fused attention op the rewriter emits.

``attnfuse::attention(q, k, v, mask=None, seed=None, alibi=None, sinks=None, doc=None, *, scale=None,
causal=False, softcap=0.0, kv_groups=1, dropout_p=0.0, mask_fill=None, window_left=-1, window_right=-1,
block_sparse=False, window_pad=False, approx="", tiles="", impl="") -> (out, stats)``

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
``approx``: "" (exact), or the cost model's per-call table (`attnfuse.costmodel.plan.Plan.op_table`, JSON) of
key-length ranges -> "exact" | "topk" | "lsh" with the approximate families' settings: each call looks its
key length up and runs `attnfuse.kernels.topk` / `attnfuse.kernels.lsh` (forward and backward) where the
table says so (only the causal flag, scale and GQA apply there: the policy admits no other site).
``tiles``: "" or the plan's Triton tiles (`attnfuse.costmodel.tiles.encode`, JSON): the forward and backward
tile per key-length range, which the launcher runs as given -- the tile is decided once, by the plan, with the
device spec, dtype and mask element size; without it (a standalone call) the launcher picks with the same
function (`attnfuse.costmodel.tiles.launch_configs`).  The CPU paths ignore it.
``impl``: "" (attnfuse's kernels, below), or PyTorch's kernels as the plan chose them (`attnfuse._impls`):
``"sdpa:flash" | "sdpa:efficient" | "sdpa:cudnn" | "sdpa:cpu"`` (SDPA with that backend, `attnfuse.kernels.sdpa`)
or ``"flex"`` (FlexAttention, `attnfuse.kernels.flex`); each keeps these semantics itself (per call, what its
kernel would compute differently runs its exact path), the op then stays one node under ``torch.compile``, and its
``stats`` are that implementation's.  ``doc`` (``impl="flex"`` only, ``q_len == kv_len``): int64 ``(B, 2, L)``,
row 0 a segment id per position, row 1 a prefix-key flag: key ``j`` is visible from query ``i`` only if
``doc[b, 0, i] == doc[b, 0, j]`` (packed documents), and the band (``causal``, window) applies unless
``doc[b, 1, j] != 0`` (prefix-LM: a prefix key is seen by every query of its document).
``out`` is ``(B, H, Lq, Dv)``; ``stats`` holds the softmax row statistics the flash
backward needs (fp32 ``(B, H, Lq, 2)``: row max and log2 of the row sum, base 2),
or is empty on the paths whose backward recomputes them.  `attend` returns ``out`` alone.

Device dispatch:

* CUDA (and CPU under ``TRITON_INTERPRET=1``): the Triton FlashAttention kernels
  of `attnfuse.kernels.flash`, forward and backward.  Under ``torch.compile`` the
  op decomposes into its Triton launches (as ``torch.library.triton_op`` does),
  so Inductor sees the kernels; ``torch.export`` keeps the op whole.
* CPU (`attnfuse.kernels.cpu`, on the path `attnfuse.costmodel.cpu.path` names): PyTorch's fused
  flash-attention CPU kernel where it can express the site (no softcap, no dropout, equal q/v head dims,
  finite inputs) and the blocked reference otherwise; the backward is the blocked reference.  Structured
  masks run `attnfuse.kernels.tiled` (band tiles only: O(N*w) time and memory), forward
  and backward.  Under ``torch.compile`` the fused-kernel path is traced into the graph
  (`attnfuse._cpu_graph`: ``torch.cond`` of SDPA and the op, on finite inputs), so a
  compiled call pays no Python dispatch.
* float64 and head dims above 256 take the reference on every device.
"""

from __future__ import annotations

import contextlib
import functools
import json
from typing import Any

import torch

from . import _cpu_graph, _impls
from ._sizes import hint
from .costmodel import tiles as _tiles
from .kernels import cpu, flash
from .kernels.cpu import output_like

__all__ = ["attend", "attention", "attention_backward", "attention_sdpa", "output_like"]


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              seed: torch.Tensor | None = None, alibi: torch.Tensor | None = None,
              sinks: torch.Tensor | None = None, doc: torch.Tensor | None = None, *, scale: float | None = None,
              causal: bool = False, softcap: float = 0.0, kv_groups: int = 1, dropout_p: float = 0.0,
              mask_fill: float | None = None, window_left: int = -1, window_right: int = -1,
              block_sparse: bool = False, window_pad: bool = False, approx: str = "",
              tiles: str = "", impl: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    cpu.check(q, k, v, mask, alibi, sinks, kv_groups=kv_groups, causal=causal, window_left=window_left,
              window_right=window_right, block_sparse=block_sparse, window_pad=window_pad, approx=approx)
    _impls.check(impl, doc, q, k, approx=approx, window_pad=window_pad, dropout_p=dropout_p, softcap=softcap,
                 alibi=alibi, window_left=window_left, window_right=window_right, block_sparse=block_sparse)
    if impl:
        if sinks is not None:
            raise ValueError(f"attnfuse.attention: impl={impl!r} takes no sinks; use impl='' (attnfuse's kernels)")
        return _impls.forward(impl, q, k, v, mask, alibi, doc, {
            "scale": scale, "causal": causal, "softcap": softcap, "kv_groups": kv_groups, "mask_fill": mask_fill,
            "window_left": window_left, "window_right": window_right, "block_sparse": block_sparse})
    family = _approx_family(approx, k.shape[-2])
    if family is not None:
        module, params = family
        out, stats = module.forward(q, k, v, scale=cpu.scale_of(q, scale), causal=causal, **params)
        return cpu.in_output_layout(out), (stats if cpu.runs_triton(q, k, v) else cpu.no_stats(q))
    if cpu.runs_triton(q, k, v):
        return flash.forward(q, k, v, mask, _seed_on(seed, q), scale=scale, causal=causal, softcap=softcap,
                             dropout_p=dropout_p, mask_fill=mask_fill, alibi=alibi,
                             window_size=(window_left, window_right), block_sparse=block_sparse,
                             window_pad=window_pad, config=_tile(tiles, k, "fwd"),
                             **_sink_kw(sinks))
    return cpu.forward(q, k, v, mask, seed, alibi, sinks, scale=scale, causal=causal, softcap=softcap,
                       kv_groups=kv_groups, dropout_p=dropout_p, mask_fill=mask_fill, window_left=window_left,
                       window_right=window_right, block_sparse=block_sparse, window_pad=window_pad)


def _tile(tiles: str, k: torch.Tensor, kind: str) -> _tiles.TileConfig | None:
    """The tile the plan chose for this key length (`attnfuse.costmodel.tiles.decode`; an example value while
    tracing, so no guard), or None: a standalone call, and the launcher picks."""
    return _tiles.decode(tiles, hint(k.shape[-2], 4096), kind)


def _sink_kw(sinks: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {} if sinks is None else {"sinks": sinks}


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
    """The (lo, hi, family) rows of a plan's per-call table (`attnfuse.costmodel.plan.Plan.op_table`)."""
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
            from .families import kernel_module

            return kernel_module(family), dict(_params(approx, family))
    return None


attention = torch.library.custom_op("attnfuse::attention", mutates_args=())(_attention)


@attention.register_fake
def _(q, k, v, mask=None, seed=None, alibi=None, sinks=None, doc=None, *, scale=None, causal=False, softcap=0.0,
      kv_groups=1, dropout_p=0.0, mask_fill=None, window_left=-1, window_right=-1, block_sparse=False,
      window_pad=False, approx="", tiles="", impl=""):
    if impl:
        return output_like(q, v), _impls.stats_like(impl, q)
    if cpu.runs_triton(q, k, v):
        return output_like(q, v), q.new_empty(*q.shape[:3], 2, dtype=torch.float32)
    return output_like(q, v), cpu.no_stats(q)


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
            and not kwargs.get("impl")
            and all(issubclass(t, plain) for t in types)):
        traced = _cpu_graph.forward(mode, args, kwargs)  # CPU: the fused-SDPA path as graph ops where it applies
        if traced is not None:
            return traced
    if (custom_triton_ops_decomposition_disabled() or any(not issubclass(t, plain) for t in types)
            or not args[0].is_cuda or not (args[5].numel() if op is _BWD else cpu.runs_triton(*args[:3]))
            or kwargs.get("approx") or kwargs.get("impl") or _tiles.varies(kwargs.get("tiles", ""))):
        # a per-call kernel or tile table, or PyTorch's kernels: the op stays whole and chooses at run time
        return mode.__torch_dispatch__(op, types, args, kwargs)
    with mode:
        return _IMPLS[op](*args, **kwargs)


def _seed_on(seed, q):
    return None if seed is None else seed.to(device=q.device, dtype=torch.int64).reshape(())


def _attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, stats: torch.Tensor, mask: torch.Tensor | None, seed: torch.Tensor | None,
                       alibi: torch.Tensor | None, sinks: torch.Tensor | None = None, doc: torch.Tensor | None = None,
                       *, scale: float | None, causal: bool, softcap: float,
                       kv_groups: int, dropout_p: float, mask_fill: float | None, window_left: int, window_right: int,
                       block_sparse: bool, mask_grad: bool, window_pad: bool = False,
                       approx: str = "", tiles: str = "", impl: str = "") -> list[torch.Tensor]:
    if impl:  # flex recomputes its forward under autograd on CUDA
        with _autograd_below_the_op():
            dq, dk, dv, dm = _impls.backward(impl, grad_out, q, k, v, out, stats, mask, alibi, doc, {
                "scale": scale, "causal": causal, "softcap": softcap, "kv_groups": kv_groups, "mask_fill": mask_fill,
                "window_left": window_left, "window_right": window_right, "block_sparse": block_sparse}, mask_grad)
        return [dq.contiguous(), dk.contiguous(), dv.contiguous(), dm if dm is not None else q.new_empty(0),
                q.new_empty(0)]
    family = _approx_family(approx, k.shape[-2])
    if family is not None:
        module, params = family
        with _autograd_below_the_op():  # the CPU paths recompute their forward under autograd
            dq, dk, dv = module.backward(grad_out, q, k, v, out, stats, scale=cpu.scale_of(q, scale), causal=causal,
                                         **params)
        return [dq.contiguous(), dk.contiguous(), dv.contiguous(), q.new_empty(0), q.new_empty(0)]
    if stats.numel():  # the forward ran the flash kernel
        # dQ in its own pass, not fp32 atomics: on an H100 the atomic variant was 5-9x slower
        # (benchmarks/results/bwd-sweep-h100-2026-11-23.json), and this one is also reproducible
        dq, dk, dv, dm, *ds = flash.backward(
            grad_out, q, k, v, out, stats, mask, _seed_on(seed, q), scale=scale, causal=causal, softcap=softcap,
            dropout_p=dropout_p, mask_fill=mask_fill, mask_grad=mask_grad, deterministic=True, alibi=alibi,
            window_size=(window_left, window_right), block_sparse=block_sparse, window_pad=window_pad,
            config=_tile(tiles, k, "bwd"), **_sink_kw(sinks))
        return [dq, dk, dv, dm if dm is not None else q.new_empty(0), ds[0] if ds else q.new_empty(0)]
    # the blocked reference or the tiled kernel (`attnfuse.kernels.cpu`): softmax recomputed per block
    return cpu.backward(grad_out, q, k, v, mask, seed, alibi, sinks, scale=scale, causal=causal, softcap=softcap,
                        kv_groups=kv_groups, dropout_p=dropout_p, mask_fill=mask_fill, window_left=window_left,
                        window_right=window_right, block_sparse=block_sparse, window_pad=window_pad,
                        mask_grad=mask_grad)


attention_backward = torch.library.custom_op("attnfuse::attention_backward", mutates_args=())(_attention_backward)


@attention_backward.register_fake
def _(grad_out, q, k, v, out, stats, mask, seed, alibi, sinks=None, doc=None, *, scale, causal, softcap, kv_groups,
      dropout_p, mask_fill, window_left, window_right, block_sparse, mask_grad, window_pad=False, approx="", tiles="",
      impl=""):
    dm = mask.new_empty(mask.shape) if mask_grad else q.new_empty(0)
    ds = sinks.new_empty(sinks.shape) if sinks is not None else q.new_empty(0)
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dm, ds]


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    q, k, v, mask, seed, alibi, sinks, doc = inputs
    ctx.save_for_backward(q, k, v, mask, seed, alibi, sinks, doc, *output)
    ctx.kwargs = keyword_only_inputs


def _backward(ctx, grad, _grad_stats):
    q, k, v, mask, seed, alibi, sinks, doc, out, stats = ctx.saved_tensors
    mask_grad = mask is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dm, ds = attention_backward(grad, q, k, v, out, stats, mask, seed, alibi, sinks, doc,
                                            mask_grad=mask_grad, **ctx.kwargs)
    return dq, dk, dv, (dm if mask_grad else None), None, None, (ds if sinks is not None else None), None


attention.register_autograd(_backward, setup_context=_setup_context)
_BWD = torch.ops.attnfuse.attention_backward.default
_IMPLS = {torch.ops.attnfuse.attention.default: _attention, _BWD: _attention_backward}
for _op in (attention, attention_backward):
    _op.register_torch_dispatch(torch._subclasses.functional_tensor.FunctionalTensorMode, _traceable_cuda)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           seed: torch.Tensor | None = None, alibi: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
           doc: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """``attnfuse::attention``'s output without the row statistics."""
    return attention(q, k, v, mask, seed, alibi, sinks, doc, **kwargs)[0]


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
        traced = _cpu_graph.attention_sdpa(q, k, v, mask, kwargs, attention_sdpa)
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

