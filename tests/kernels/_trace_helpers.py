"""Tracing the kernels' launches without a GPU, shared by test_flash_trace.py and test_band_maps.py: fake CUDA
tensors (`fake_cuda`), a stand-in for Triton's CUDA driver (`Hopper`) and the Triton kernels a traced graph
launches (`launched_kernels`, which also checks each launch's scalars and written tensors).
"""

from __future__ import annotations

import math

import torch


class Hopper:
    """Stands in for Triton's CUDA driver: Inductor's mutation analysis only asks it for the target."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


def launched_kernels(gm: torch.fx.GraphModule) -> list[str]:
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    names = []
    for node in gm.graph.nodes:
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            names.append(kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__)
            scalars = [v for v in node.kwargs["kwargs"].values() if isinstance(v, float)]
            assert all(math.isfinite(v) for v in scalars), "a traced launch must not carry inf/nan scalars"
            # the mutation analysis ran (no "assume every input is mutated"): only outputs are written
            written = set(node.kwargs["tensors_to_clone"])
            assert not written & {"Q", "K", "V", "M", "Seed", "DO"}, written
    return names


def fake_cuda(*shapes, grad=False):
    return [torch.randn(s, device="cuda", dtype=torch.float16, requires_grad=grad) for s in shapes]
