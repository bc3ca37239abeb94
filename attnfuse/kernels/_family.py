"""Autograd for the approximate kernel families: any module with ``forward(q, k, v, **kw) -> (out, stats)`` and
``backward(grad, q, k, v, out, stats, **kw) -> (dq, dk, dv)`` (`attnfuse.kernels.topk`, `attnfuse.kernels.lsh`)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch


class _Family(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module, q, k, v, kwargs):
        out, stats = module.forward(q, k, v, **kwargs)
        ctx.save_for_backward(q, k, v, out, stats)
        ctx.module, ctx.kwargs = module, kwargs
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, stats = ctx.saved_tensors
        return (None, *ctx.module.backward(grad, q, k, v, out, stats, **ctx.kwargs), None)


def attention(module: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              kwargs: dict[str, Any]) -> torch.Tensor:
    """``module.forward``'s output, differentiable through ``module.backward``."""
    return _Family.apply(module, q, k, v, kwargs)
