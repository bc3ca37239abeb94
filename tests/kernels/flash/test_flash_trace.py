"""The CUDA path of attnfuse::attention is transparent to AOTAutograd: traced, it becomes the
Triton launches themselves (``triton_kernel_wrapper_functional``), forward and backward, so
Inductor compiles the kernels into its graph.  Traced here with fake CUDA tensors (no GPU needed)."""

from __future__ import annotations

import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx

from attnfuse import ops
from attnfuse.device import PRESETS
from attnfuse.kernels import flash
from tests.kernels._trace_helpers import Hopper, fake_cuda, launched_kernels

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                                reason="interpreted kernels are not traceable")


@pytest.fixture(autouse=True)
def _cuda_target(monkeypatch):
    import triton

    monkeypatch.setattr(triton.runtime.driver, "_active", Hopper())


def _ops(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if "attnfuse" in str(n.target)]


@pytest.mark.parametrize("mask", [None, "bool", "bias"])
def test_forward_traces_to_the_triton_kernel(mask):
    with FakeTensorMode():
        q, k, v = fake_cuda((2, 4, 97, 64), (2, 2, 97, 64), (2, 2, 97, 64))
        m = {"bool": torch.ones(97, 97, dtype=torch.bool, device="cuda"),
             "bias": torch.randn(2, 1, 1, 97, device="cuda", dtype=torch.float16), None: None}[mask]
        gm = make_fx(dispatch_functionalize(lambda q, k, v, m: ops.attend(q, k, v, m, causal=True, kv_groups=2)))(
            q, k, v, m)
    assert launched_kernels(gm) == ["fwd_kernel"]
    assert _ops(gm) == []  # the op itself is gone: Inductor sees the launch


def test_decode_traces_split_and_combine(monkeypatch):
    # one query row: 8 programs for 132 SMs (the launcher looks the spec up in its own module)
    monkeypatch.setattr(flash.launcher, "spec_for", lambda t: PRESETS["h100"])
    with FakeTensorMode():
        q, k, v = fake_cuda((1, 8, 1, 128), (1, 8, 8192, 128), (1, 8, 8192, 128))
        gm = make_fx(dispatch_functionalize(lambda q, k, v: ops.attend(q, k, v)))(q, k, v)
    assert launched_kernels(gm) == ["fwd_kernel", "combine_kernel"]


def test_backward_traces_to_the_triton_kernels():
    # AOTAutograd's joint graph calls attnfuse::attention_backward (see ops._backward); fake CUDA
    # tensors that require grad abort in a CPU build, so the backward op is traced directly.  The op
    # computes dQ in its own pass (no atomics), whatever torch's determinism setting says.
    def grads(do, q, k, v, out, lse, bias):
        return torch.ops.attnfuse.attention_backward(do, q, k, v, out, lse, bias, None, None, scale=None,
                                                     causal=True, softcap=0.0, kv_groups=2, dropout_p=0.0,
                                                     mask_fill=None, window_left=-1, window_right=-1,
                                                     block_sparse=False, mask_grad=False)

    with FakeTensorMode():
        q, k, v, do, out = fake_cuda((2, 4, 97, 64), (2, 2, 97, 64), (2, 2, 97, 64), (2, 4, 97, 64), (2, 4, 97, 64))
        lse = torch.randn(2, 4, 97, device="cuda")
        bias = torch.randn(97, device="cuda", dtype=torch.float16)
        gm = make_fx(dispatch_functionalize(grads))(do, q, k, v, out, lse, bias)
    assert launched_kernels(gm) == ["bwd_preprocess", "bwd_dkdv_kernel", "bwd_dq_kernel"]
    assert _ops(gm) == []


def test_cpu_traces_sdpa_with_the_opaque_op_as_fallback():
    """On CPU no Triton kernel is traced: the fused-SDPA path becomes graph ops (`attnfuse._cpu_graph`), a
    ``cond`` on the inputs' finiteness whose fallback branch is the op kept whole."""
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    gm = make_fx(dispatch_functionalize(lambda q, k, v: ops.attend(q, k, v)))(q, k, v)
    assert launched_kernels(gm) == []
    assert _ops(gm) == []
    assert [n.target for n in gm.graph.nodes if n.target is torch.ops.higher_order.cond] == [
        torch.ops.higher_order.cond]
    assert _ops(gm.false_graph_0) == ["attnfuse.attention.default"]
    assert any("scaled_dot_product" in str(n.target) for n in gm.true_graph_0.graph.nodes)
    torch.testing.assert_close(gm(q, k, v), ops.attend(q, k, v))
