"""Where a kernel family's ``attention`` runs, and autograd for the approximate families.

Every ``attnfuse.kernels.<family>.attention`` asks `triton_runs` where its tensors go:

* CUDA tensors: the Triton kernels (fp16/bf16/fp32, head dims up to 256; others raise ValueError);
* CPU tensors under ``TRITON_INTERPRET=1``: the Triton kernels in Triton's interpreter (same limits);
* every other CPU tensor (no interpreter, or a dtype / head dim the Triton kernels do not take): the CPU
  implementation the registered op ``torch.ops.attnfuse.attention`` runs on CPU tensors.  For the exact
  families (`flash`, `window`, `blocksparse`) `exact_on_cpu` runs it (`attnfuse.kernels.cpu`: PyTorch's fused
  CPU kernel or the blocked `reference`; `tiled` for bands, ALiBi and block-sparse masks) under autograd, with
  the op's argument checks; the approximate ones (`topk`, `lsh`) run their own CPU paths, which are what the op
  runs for them.

Each family's keywords mean the same on both sides, with two documented exceptions: dropout draws its keep
mask from a different stream (Philox in the kernels, a seeded torch generator on CPU: same ``dropout_p`` and
the same distribution, not the same mask), and the Triton-only tuning knobs (``config``, ``splits``,
``deterministic``) do not apply on CPU (the CPU backward is always deterministic).

Autograd for the approximate families: any module with ``forward(q, k, v, **kw) -> (out, stats)`` and
``backward(grad, q, k, v, out, stats, **kw) -> (dq, dk, dv)`` (`attnfuse.kernels.topk`, `attnfuse.kernels.lsh`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from . import _launch, cpu


def triton_runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, who: str) -> bool:
    """True: the Triton kernels run these tensors; False: CPU tensors that take the op's CPU implementation.
    Raises ValueError (naming ``who`` and the fix) for non-CPU tensors the Triton kernels cannot take."""
    why = _launch.supported(q, k, v)
    if why is None:
        return True
    if q.device.type == "cpu":
        return False
    raise ValueError(f"{who}: {why}; move the tensors to the CPU to run the CPU implementation")


def exact_on_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 seed: torch.Tensor | None, *, window_size: tuple[int, int] = (-1, -1),
                 alibi: torch.Tensor | None = None, block_sparse: bool = False, splits: int | None = None,
                 **kwargs: Any) -> torch.Tensor:
    """An exact family's ``attention`` on CPU tensors: the CPU implementation of ``torch.ops.attnfuse.attention``
    (`attnfuse.kernels.cpu`, with the op's checks, forward and backward) with the keywords of `flash.forward`
    (``splits`` is ignored), with autograd for q, k, v and an additive mask.

    ``block_sparse``: the kernels read additive entries <= finfo(mask dtype).min as -inf (a row with none
    left is NaN); the op's CPU path adds them, so such entries become -inf here first."""
    del splits  # a Triton launch choice
    if block_sparse and mask is not None and mask.dtype != torch.bool:
        floor = mask <= torch.finfo(mask.dtype).min
        if bool((floor & ~torch.isneginf(mask)).any()):
            mask = mask.masked_fill(floor, float("-inf"))
    left, right = window_size
    kwargs = dict(kwargs, kv_groups=q.shape[1] // k.shape[1], window_left=left, window_right=right,
                  block_sparse=block_sparse)
    cpu.check(q, k, v, mask, alibi, kv_groups=kwargs["kv_groups"], causal=kwargs.get("causal", False),
              window_left=left, window_right=right, block_sparse=block_sparse,
              window_pad=kwargs.get("window_pad", False))
    return _ExactCpu.apply(q, k, v, mask, seed, alibi, kwargs)


class _ExactCpu(torch.autograd.Function):
    """`attnfuse.kernels.cpu.forward` differentiated by `attnfuse.kernels.cpu.backward`, as the op's autograd
    does: gradients for q, k, v and a mask that requires one (seed and ALiBi slopes are constants)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, seed, alibi, kwargs):
        out, _ = cpu.forward(q, k, v, mask, seed, alibi, **kwargs)
        ctx.save_for_backward(q, k, v, mask, seed, alibi)
        ctx.kwargs = kwargs
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, mask, seed, alibi = ctx.saved_tensors
        mask_grad = mask is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dm, _ = cpu.backward(grad, q, k, v, mask, seed, alibi, mask_grad=mask_grad, **ctx.kwargs)
        return dq, dk, dv, (dm if mask_grad else None), None, None, None


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
