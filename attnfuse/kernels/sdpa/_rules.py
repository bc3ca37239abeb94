"""Which SDPA backend can compute a site exactly: `applies`, from the site's static facts (no tensors).

Each rule returns one sentence saying why not; the planner reports it.  Measured reasons (see the package
docstring): PyTorch's logsumexp-based backward kernels miss the 2x accuracy rule in float32 (and are not shown
to meet it in float64: ~120 ulps from eager), so a site that needs gradients in those dtypes declines the ``cpu``
and ``efficient`` backends; cuDNN is not given masks (pytorch#177842: bool masks ignored on fully masked rows in 2.10;
pytorch#196678: NaN dQ with an ``attn_mask`` at seq_len % 128 == 64 since 2.11).
"""

from __future__ import annotations

import math

import torch

from ..reference import compute_dtype

__all__ = ["BACKENDS", "applies", "backends_for", "check_backend"]

BACKENDS = ("flash", "efficient", "cudnn", "cpu")
_CUDA = ("flash", "cudnn", "efficient")  # the order a standalone call tries them in
_HALF = (torch.float16, torch.bfloat16)
_DTYPES = {"flash": _HALF, "cudnn": _HALF, "efficient": (*_HALF, torch.float32),
           "cpu": (torch.float32, torch.float64, *_HALF)}
_MAX_HEAD_DIM = {"flash": 256, "cudnn": 128}
_NO_MASK = {
    "flash": "the flash backend takes no mask tensor (only is_causal)",
    "cudnn": "the cuDNN backend is not given mask tensors (pytorch#177842: a bool mask is ignored on fully "
             "masked rows in torch 2.10; pytorch#196678: NaN dQ with an attn_mask at seq_len % 128 == 64 since "
             "torch 2.11); only is_causal",
}


def check_backend(who: str, backend: str) -> None:
    """Raise ValueError (naming ``who``, the option and the allowed values) for an unknown backend name."""
    if backend not in BACKENDS:
        raise ValueError(f"{who}: backend must be one of {', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")


def backends_for(device_type: str) -> tuple[str, ...]:
    """The SDPA backends for tensors on ``device_type``, in the order a standalone call tries them."""
    return _CUDA if device_type == "cuda" else ("cpu",) if device_type == "cpu" else ()


def _structure(softcap, dropout_p, sinks, alibi, window_left, window_right, block_sparse, window_pad,
               doc) -> str | None:
    """Why a site's structure is not SDPA's (any backend), or None."""
    if softcap:
        return f"softcap={softcap} (tanh capping of the scores) is not part of SDPA"
    if dropout_p:
        return "dropout: SDPA would draw another keep mask than attnfuse's seeded one"
    if sinks:
        return "attention sinks are not part of SDPA"
    if alibi:
        return "ALiBi would need an N x N bias tensor for SDPA (it takes no slopes)"
    if window_left >= 0 or window_right >= 0:
        return (f"the band window_left={window_left}, window_right={window_right} would need an N x N mask for "
                f"SDPA; only causal runs without one")
    if block_sparse:
        return "a block-sparse mask reads entries at finfo.min as -inf, which SDPA does not"
    if window_pad:
        return "window_pad's zero-padded keys are not part of SDPA"
    if doc:
        return "packed documents (doc) would need an N x N mask for SDPA; FlexAttention runs them"
    return None


def _mask(backend: str, dtype: torch.dtype, mask_dtype: torch.dtype | None, mask_fill: float | None) -> str | None:
    if mask_dtype is None:
        return None
    if backend in _NO_MASK:
        return _NO_MASK[backend]
    takes = {torch.bool, dtype} | ({torch.float32} if backend == "cpu" and dtype in _HALF else set())
    if mask_dtype not in takes:
        return (f"the {backend} backend takes a bool mask or one of the inputs' dtype {dtype}"
                f"{' (or float32)' if torch.float32 in takes and dtype != torch.float32 else ''}; got {mask_dtype}")
    if mask_dtype != torch.bool or mask_fill is None or mask_fill == -math.inf:
        return None
    ct = compute_dtype(dtype)
    if math.isnan(mask_fill) or mask_fill > 0 and math.isinf(mask_fill):
        return f"a bool mask's fill must be -inf or finite; got mask_fill={mask_fill}"
    if abs(mask_fill) > torch.finfo(ct).max:
        return f"mask_fill={mask_fill} is not representable in the scores' dtype {ct}"
    return None


def _shape(backend: str, dtype: torch.dtype, head_dim: int, v_head_dim: int) -> str | None:
    if dtype not in _DTYPES[backend]:
        return f"the {backend} backend takes {', '.join(str(d) for d in _DTYPES[backend])}; got {dtype}"
    if backend != "efficient" and head_dim != v_head_dim:
        return f"the {backend} backend needs equal q and v head dims; got {head_dim} and {v_head_dim}"
    if backend == "cpu":
        return None
    align = 16 // dtype.itemsize if backend == "efficient" else 8
    if head_dim % align or v_head_dim % align:
        return (f"the {backend} backend needs head dims that are multiples of {align} for {dtype}; got "
                f"{head_dim} and {v_head_dim}")
    top = _MAX_HEAD_DIM.get(backend)
    if top is not None and head_dim > top:
        return f"the {backend} backend takes head dims up to {top}; got {head_dim}"
    return None


def applies(backend: str, *, device_type: str, dtype: torch.dtype, head_dim: int, v_head_dim: int,
            softcap: float = 0.0, dropout_p: float = 0.0, sinks: bool = False, alibi: bool = False,
            window_left: int = -1, window_right: int = -1, block_sparse: bool = False, window_pad: bool = False,
            doc: bool = False, mask_dtype: torch.dtype | None = None, mask_fill: float | None = None,
            training: bool = False) -> str | None:
    """None when ``backend`` computes a site with these facts exactly (up to the per-call checks of `forward`,
    which run the reference instead where they find a difference), else one sentence saying why not.

    ``mask_dtype``: the mask's dtype (None: no mask); ``mask_fill``: a bool mask's fill (None: -inf);
    ``training``: the site needs gradients.  Raises ValueError for an unknown ``backend``."""
    check_backend("attnfuse.kernels.sdpa.applies", backend)
    if backend not in backends_for(device_type):
        return f"the {backend} backend runs {'CUDA' if backend != 'cpu' else 'CPU'} tensors; these are {device_type}"
    why = (_structure(softcap, dropout_p, sinks, alibi, window_left, window_right, block_sparse, window_pad, doc)
           or _shape(backend, dtype, head_dim, v_head_dim) or _mask(backend, dtype, mask_dtype, mask_fill))
    if why:
        return why
    if training and backend in ("cpu", "efficient") and dtype in (torch.float32, torch.float64):
        return (f"the {backend} backend's backward reads probabilities as exp(s - lse) off a logsumexp, which misses "
                f"the 2x accuracy rule in float32 (measured up to ~9x eager's dV error on peaked scores) and is "
                f"not shown to meet it in float64 (up to ~120 ulps from eager); got {dtype} with gradients")
    return None
