"""What every Triton launcher shares: where Triton can run, how a launch enters a traced graph, and the
small conversions from tensors to kernel arguments.  Kernel modules import these by name."""

from __future__ import annotations

import torch
import triton

from .. import _sizes as sizes
from ..costmodel.tiles import pow2
from ..device import spec_for, triton_unsupported
from ..device import triton_interprets as interpreting

__all__ = ["LOG2E", "hint", "interpreting", "launch", "mask_elem", "pow2", "precision", "spec_for", "supported",
           "tracing"]

LOG2E = 1.4426950408889634  # the kernels run softmax in base 2: exp(x) = exp2(x * LOG2E)


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when these tensors can run the Triton kernel here, else why not (`attnfuse.device.triton_unsupported`)."""
    return triton_unsupported(q.device.type, q.dtype, max(q.shape[-1], v.shape[-1]))


def hint(n) -> int:
    """A launch size that may be symbolic as an int (`attnfuse._sizes.hint`); an unbacked one plans as 4096."""
    return sizes.hint(n, default=4096)


def tracing() -> bool:
    """Whether anything traces (torch.compile, fake tensors, export)."""
    return torch.compiler.is_compiling() or torch.utils._python_dispatch._get_current_dispatch_mode() is not None


def launch(kernel):
    """The kernel to launch: wrapped by ``wrap_triton`` while anything traces, so the launch lands in the graph;
    the plain JIT function in eager mode, where the wrapper's higher-order-op path cost ~0.5 ms of host time per
    launch (benchmarks/results/host-overhead-h100-*.txt).  Interpreted kernels always launch directly."""
    if isinstance(kernel, triton.runtime.jit.JITFunction) and tracing():
        return torch.library.wrap_triton(kernel)
    return kernel


def mask_elem(mask) -> int:
    """The mask's element size for `pick` (its tiles take shared memory), 0 without one."""
    return 0 if mask is None else mask.element_size()


def precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: IEEE for float32 (the accuracy contract: no TF32), else the default."""
    return "ieee" if dtype == torch.float32 else "tf32"
