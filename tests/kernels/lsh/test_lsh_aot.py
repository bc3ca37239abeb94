"""LSH attention's index kernels (`attnfuse.kernels.lsh._triton`) compile for sm_90/sm_80 and fit their shared
memory; see `_aot.py`.  The attention itself is flash's block-sparse mode, compiled as top-k launches it
(test_topk_aot.py).

`_bucket_kernel` (a counting sort's scatter by atomic slot counters) and `_vote_kernel` (atomic vote counters)
take only integer pointers and int arguments: each compiles with every int hinted divisible by 16 (the most
specialized launch) and with none, at the block sizes and lookup counts (tables x (1 + probes)) launches use.
"""

from __future__ import annotations

import pytest

from attnfuse.kernels.lsh import _triton
from tests.kernels._aot import TARGETS, _compile, _Report

_BUCKET_PTRS = dict(Gid="*i64", Cursor="*i64", Out="*i32")
_VOTE_PTRS = dict(Gid="*i64", Offsets="*i64", KeyBlocks="*i32", Acc="*i32")


@pytest.mark.parametrize("spec_name", list(TARGETS))
def test_index_kernels_compile_and_fit(spec_name):
    rep = _Report(spec_name, "int", 0)
    compiled = 0
    for div16 in (None, set()):
        hints = "div16" if div16 is None else "no hints"
        for block in (32, 64, 128):
            what = f"bucket block {block} {hints}"
            out = rep.compile(what, _compile, _triton._bucket_kernel, rep.cc, _BUCKET_PTRS,
                              dict(BLOCK=block, SORT_BLOCK=_triton._SORT_BLOCK), 4, 3, unit=set(), floats=set(),
                              div16=div16)
            rep.shared(what, out)
            compiled += out is not None
        for lookups in (1, 8, 24):  # tables x (1 + probes): 1 x 1, 8 x 1 (the defaults), 8 x 3
            what = f"vote lookups {lookups} {hints}"
            out = rep.compile(what, _compile, _triton._vote_kernel, rep.cc, _VOTE_PTRS,
                              dict(LOOKUPS=lookups, ROWS=_triton._VOTE_ROWS), 4, 3, unit=set(), floats=set(),
                              div16=div16)
            rep.shared(what, out)
            compiled += out is not None
    rep.check()
    assert compiled == 12
