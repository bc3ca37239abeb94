"""Attention sinks in the Triton flash kernels (`attnfuse.kernels.flash`), run by Triton's interpreter.

Through the op (which dispatches to the kernels under the interpreter) against the eager GPT-OSS spelling
(`_sinks_helpers.sink_attention`) and float64, forward and the gradients of q, k, v and the sinks (2x rule),
float32 and float16; small odd sizes so that each launch is a handful of programs.  Also the split-K forward
(the sink folded into split 0 only) and the saved statistics, which must include the sink.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnfuse  # noqa: F401 - registers torch.ops.attnfuse
from attnfuse.kernels import _launch, flash
from tests.kernels._helpers import T16, seed_case
from tests.kernels.flash._sinks_helpers import compare, sink_attention

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on empty splits: 0/0, log2(0)

DTYPES = [torch.float32, torch.float16]

# name: (B, H, Hkv, Lq, Lk, D, Dv, kwargs)
CASES = {
    "plain_gqa": (1, 4, 2, 29, 37, 40, 40, {}),
    "causal_scale": (1, 2, 2, 33, 33, 24, 16, dict(causal=True, scale=0.4)),
    "window": (1, 2, 1, 41, 41, 16, 16, dict(window_left=7, window_right=3)),
    "per_batch_sinks_softcap": (2, 2, 2, 23, 19, 16, 16, dict(sink_shape=(2, 2), softcap=4.0)),
}


def _flash_ran(q) -> None:
    assert _launch.supported(q, q, q) is None, "the op did not take the Triton path"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_op_with_sinks_matches_eager(name, dtype):
    seed_case("sinks", name, dtype)
    b, h, hk, lq, lk, d, dv, kw = CASES[name]
    _flash_ran(torch.randn(b, h, lq, d, dtype=dtype))
    compare(dtype, b, h, hk, lq, lk, d, dv, **kw)


@pytest.mark.parametrize("fill", [-math.inf, -1e4], ids=["-inf", "-1e4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows(fill, dtype):
    """Rows with every real key masked: 0 with a -inf fill (eager's softmax over the sink alone), and eager's
    value with a finite fill; finite gradients, the sink's included."""
    seed_case("sinks dead", fill, dtype)
    keep = torch.rand(2, 1, 21, 21) > 0.4
    keep[0, :, 5] = False
    keep[1] = False
    kw = {} if fill == -math.inf else dict(mask_fill=fill)
    (out, *grads), _ = compare(dtype, 2, 2, 2, 21, 21, 16, 16, mask=keep, **kw)
    assert all(torch.isfinite(g).all() for g in grads)
    if fill == -math.inf:
        assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("splits", [2, 3])
def test_split_k_adds_the_sink_once(splits):
    seed_case("sinks split", splits)
    q, k, v = torch.randn(1, 2, 19, 16), torch.randn(1, 2, 45, 16), torch.randn(1, 2, 45, 16)
    sinks = torch.randn(2)
    one, stats1 = flash.forward(q, k, v, config=T16, splits=1, sinks=sinks)
    many, stats = flash.forward(q, k, v, config=T16, splits=splits, sinks=sinks)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats[..., 0] + stats[..., 1], stats1[..., 0] + stats1[..., 1], rtol=1e-5, atol=1e-5)
    ref = sink_attention(q.double(), k.double(), v.double(), sinks.double())
    torch.testing.assert_close(one.double(), ref, rtol=1e-4, atol=1e-5)
    # the statistics include the sink: log2-sum-exp2 over [scores, sink] in log2 units
    s = (q.double() @ k.double().transpose(-2, -1)) / 4.0
    lse = torch.logsumexp(torch.cat([s, sinks.double()[None, :, None, None].expand(1, 2, 19, 1)], -1), -1)
    torch.testing.assert_close((stats1[..., 0] + stats1[..., 1]).double(), lse / math.log(2), rtol=1e-5, atol=1e-5)
