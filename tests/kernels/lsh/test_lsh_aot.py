"""LSH attention's Triton kernels (`attnfuse.kernels.lsh`) compile for sm_90/sm_80 and fit their shared memory.

Every launch uses `lsh._triton._config(chunk, head_dim, head_dim_v)`: tiles of at most 64 rows (32 past head dim 128)
whatever the bucket size, since a chunk is visited tile by tile.  So each (target, dtype, head dim) compiles the
forward, dQ and dK/dV kernels at the default bucket size (64), and fp16 also at a small one (16: 16-row tiles,
the other MMA path; shared memory depends on the element size, not the type), causal (the masks add no
buffers), with GQA on (a loop in the dK/dV kernel).  See `_aot.py` for the signatures (16-byte aligned pointers,
unit last-dim strides, other ints multiples of 16).
"""

from __future__ import annotations

import pytest

from attnfuse.kernels.lsh import _triton
from tests.kernels._aot import DTYPES, TARGETS, _compile, _Report

CASES = [pytest.param(s, dt, hd, id=f"{s}-{dt}-d{hd}") for s in TARGETS for dt in DTYPES for hd in (64, 128)]
_INDEX = dict(QIdx="*i32", KIdx="*i32", QCh="*i32", KCh="*i32", QStart="*i32", KStart="*i32")


def _consts(chunk: int, hd: int) -> tuple[dict, int, int]:
    block_m, block_n, warps, stages = _triton._config(chunk, hd, hd)
    consts = dict(GROUPS=2, HEAD_DIM=hd, HEAD_DIM_V=hd, BLOCK_D=hd, BLOCK_DV=hd, BLOCK_M=block_m, BLOCK_N=block_n,
                  IS_CAUSAL=True, PRECISION="tf32")
    return consts, warps, stages


@pytest.mark.parametrize("spec_name,dt,hd", CASES)
def test_lsh_kernels_compile_and_fit(spec_name, dt, hd):
    rep = _Report(spec_name, dt, hd)
    qkv = dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}")
    grads = dict(DO=f"*{dt}", Stats="*fp32", Delta="*fp32")
    kernels = (("fwd", _triton._fwd_kernel, dict(qkv, **_INDEX, Out="*fp32", Lse="*fp32")),
               ("dq", _triton._bwd_dq_kernel, dict(qkv, **grads, **_INDEX, DQ="*fp32")),
               ("dkdv", _triton._bwd_dkdv_kernel, dict(qkv, **grads, **_INDEX, DK="*fp32", DV="*fp32")))
    compiled = 0
    chunks = (64, 16) if dt == "fp16" else (64,)  # shared memory depends on the element size, not the type
    for chunk in chunks:
        consts, warps, stages = _consts(chunk, hd)
        for name, kernel, ptrs in kernels:
            what = f"{name} chunk {chunk} ({consts['BLOCK_M']}x{consts['BLOCK_N']} w{warps} s{stages})"
            out = rep.compile(what, _compile, kernel, rep.cc, ptrs, consts, warps, stages)
            rep.shared(what, out)
            compiled += out is not None
    rep.check()
    assert compiled == 3 * len(chunks)
