"""Which implementation ``attnfuse::attention`` runs off the Triton kernels (CPU tensors, and float64 or head dims
above 256 on every device), as a pure function of a site's static facts.

`path` is the one place this is decided: the op's dispatch (`attnfuse.kernels.cpu`) calls it for its static choice
and the report can call it for what a site runs, so the two cannot disagree.  What is left to each call is data:
the fused-kernel path falls back to the blocked reference for inputs it would compute differently (see
``"sdpa-flash-cpu"``), and an approximate table picks its family by key length (``family``).
"""

from __future__ import annotations

import torch

__all__ = ["FAST_DTYPES", "PATHS", "backward_path", "path"]

# the dtypes PyTorch's fused CPU kernel computes in our semantics
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

PATHS = {
    "sdpa-flash-cpu": "PyTorch's fused flash-attention CPU kernel; per call, inputs with NaN/Inf and rows with no "
                      "visible key under a finite bool-mask fill take the blocked reference instead",
    "reference": "the blocked reference (attnfuse.kernels.reference): softcap, dropout, sinks, a V head dim other "
                 "than Q's, other dtypes or mask dtypes",
    "tiled": "the band-tiled kernel (attnfuse.kernels.tiled): sliding windows, ALiBi, block-sparse masks, window_pad",
    "topk": "top-k block attention's CPU path (attnfuse.kernels.topk), where the approximate table picks it",
    "lsh": "LSH attention's CPU path (attnfuse.kernels.lsh), where the approximate table picks it",
}


def path(dtype: torch.dtype, *, mask_dtype: torch.dtype | None = None, softcap: float = 0.0,
         dropout_p: float = 0.0, same_head_dims: bool = True, alibi: bool = False, window_left: int = -1,
         window_right: int = -1, block_sparse: bool = False, window_pad: bool = False, sinks: bool = False,
         family: str = "exact") -> str:
    """The name (a key of `PATHS`) of what the op runs for these static facts, off the Triton kernels.

    ``dtype``: q/k/v's; ``mask_dtype``: the mask's (None: no mask); ``same_head_dims``: v's head dim equals q's;
    ``alibi``/``sinks``: whether those tensors are given; ``family``: what the approximate table picks at this
    key length ("exact" without a table).  The rest are the op's keywords.  ``kv_groups`` and ``causal`` change
    no path (every path takes them).
    """
    if family != "exact":
        return family
    if alibi or window_left >= 0 or window_right >= 0 or block_sparse or window_pad:
        return "tiled"
    if sinks:  # PyTorch's fused CPU kernel has no sink
        return "reference"
    fast = (softcap == 0 and dropout_p == 0 and same_head_dims and dtype in FAST_DTYPES
            and (mask_dtype is None or mask_dtype == torch.bool or mask_dtype == dtype))
    return "sdpa-flash-cpu" if fast else "reference"


def backward_path(forward: str) -> str:
    """What differentiates a forward `path`: the approximate families and ``"tiled"`` their own backward, the
    others the blocked reference (PyTorch's CPU flash backward misses the 2x accuracy rule with masks)."""
    return forward if forward in ("tiled", "topk", "lsh") else "reference"
