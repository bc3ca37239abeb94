"""The flash kernels' own Philox (written out so Inductor can copy the kernel source) draws exactly the bits of
Triton's `triton.language.random.philox`, and the dropout keep test the same uniform floats."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from triton.language.random import philox, uint_to_uniform_float

from attnfuse.kernels import flash


@triton.jit
def _both(Seed, Out, Ref, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(Seed)
    c1 = offs * 7 + 3
    ours = flash.philox_word(seed, offs, c1)
    ref, _, _, _ = philox(seed, offs, c1, 0, 0)
    tl.store(Out + offs, uint_to_uniform_float(ours), mask=offs < N)
    tl.store(Ref + offs, uint_to_uniform_float(ref), mask=offs < N)


@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 17, 2**62 - 3])
def test_philox_matches_triton(seed):
    n = 300
    out, ref = torch.empty(n), torch.empty(n)
    _both[(triton.cdiv(n, 128),)](torch.tensor([seed], dtype=torch.int64), out, ref, n, BLOCK=128)
    assert torch.equal(out, ref)
    assert 0.3 < out.mean().item() < 0.7 and out.unique().numel() > n - 3
