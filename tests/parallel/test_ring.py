"""Ring context parallelism (`attnfuse.parallel._ring.ring`) against an unsharded float64 reference and eager in
the same dtype (the 2x rule), forward and backward, on 2 and 4 gloo processes, contiguous and zigzag layouts; and
its pieces (`segments`, the static band tests, the partial merge) in one process."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.distributed as dist

import attnfuse.kernels._partial as partial_mod
from attnfuse.kernels._partial import covered, merge, partial_forward, visible
from attnfuse.parallel._ring import ring, segments
from attnfuse.parallel._spec import ContextParallel, positions, shard, unshard

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from _util import assert_2x, band  # noqa: E402
from parallel._dist import run  # noqa: E402

# name, settings: heads, kv heads, D, Dv, causal, window (left, right), softcap, mask kind, sdpa_form
CASES = {
    "plain": dict(h=2, hk=2, d=40, dv=40),
    "causal": dict(h=2, hk=2, d=40, dv=40, causal=True),
    "window5_0": dict(h=2, hk=2, d=24, dv=24, window=(5, 0)),
    "window3_2": dict(h=2, hk=2, d=24, dv=24, window=(3, 2)),
    "pad_bool": dict(h=2, hk=2, d=24, dv=24, causal=True, mask="bool_tail"),
    "pad_float_min": dict(h=2, hk=2, d=24, dv=24, causal=True, mask="float_head"),
    "pad_bool_finite": dict(h=2, hk=2, d=24, dv=24, causal=True, mask="bool_head_finite"),
    "gqa": dict(h=4, hk=2, d=24, dv=40, causal=True),
    "softcap": dict(h=2, hk=2, d=24, dv=24, softcap=2.0, window=(4, -1)),
    "dead_rows": dict(h=2, hk=1, d=24, dv=24, causal=True, mask="bool_head"),
    "dead_rows_float": dict(h=2, hk=2, d=24, dv=24, window=(2, 1), mask="float_head_inf"),
    "dead_rows_sdpa": dict(h=2, hk=1, d=24, dv=24, causal=True, mask="bool_head", sdpa_form=True),
}
FOUR_RANKS = ("causal", "window3_2", "pad_float_min", "gqa", "dead_rows")


def _global_mask(kind: str | None, batch: int, length: int, dtype: torch.dtype):
    """(B, 1, 1, L) over the global keys, and the fill a bool mask takes (None = -inf)."""
    if kind is None:
        return None, None
    keep = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    if kind == "bool_tail":  # one mask for every batch row: (1, 1, 1, L)
        keep[..., length - 3:] = False
        return keep[:1], None
    else:  # the first keys of batch row 1 padded: under causal its first rows see only padded keys
        keep[1, ..., :5] = False
        keep[0, ..., 7] = False
    if kind.startswith("float_head"):
        fill = -math.inf if kind.endswith("inf") else torch.finfo(dtype).min
        return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, fill), None
    return keep, (torch.finfo(dtype).min if kind.endswith("finite") else None)


def _dense(q, k, v, mask, *, scale, groups, causal=False, window=(-1, -1), softcap=0.0, fill=None, sdpa_form=False):
    """Textbook attention over the global sequence in the inputs' dtype (the eager model and, in float64, the
    reference)."""
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = q @ k.transpose(-2, -1) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = torch.where(mask, s, -math.inf if fill is None else fill) if mask.dtype == torch.bool else s + mask
    s = s.masked_fill(~band(q.shape[-2], k.shape[-2], window[0], window[1], causal), -math.inf)
    if sdpa_form:  # SDPA: a row that sees no key is 0, with no gradient
        dead = (s == -math.inf).all(-1, keepdim=True)
        return (torch.softmax(s.masked_fill(dead, 0.0), -1) * ~dead) @ v
    return torch.softmax(s, -1) @ v


def _gather(x: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    parts = [torch.empty_like(x, dtype=torch.float32) for _ in range(cp.ranks)]
    dist.all_gather(parts, x.detach().float().contiguous())
    return unshard(parts, 2, cp)


def _one(cp: ContextParallel, name: str, dtype: torch.dtype, local_len: int, seed: int) -> None:
    c = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    length, batch = local_len * cp.ranks, 2
    shapes = [(batch, c["h"], length, c["d"]), (batch, c["hk"], length, c["d"]), (batch, c["hk"], length, c["dv"])]
    q, k, v = (torch.randn(*s, generator=gen, dtype=torch.float64) * (2.0 if c.get("softcap") else 1.0)
               for s in shapes)
    dout = torch.randn(batch, c["h"], length, c["dv"], generator=gen, dtype=torch.float64)
    mask, fill = _global_mask(c.get("mask"), batch, length, dtype)
    kw = dict(scale=1 / math.sqrt(c["d"]), groups=c["h"] // c["hk"], causal=c.get("causal", False),
              window=c.get("window", (-1, -1)), softcap=c.get("softcap", 0.0), fill=fill,
              sdpa_form=c.get("sdpa_form", False))
    results = {}
    for kind, dt in (("ref", torch.float64), ("eager", dtype)):
        leaves = [x.to(dt).detach().requires_grad_() for x in (q, k, v)]
        m = None if mask is None or mask.dtype == torch.bool else mask.to(dt)
        m = mask if m is None else m
        out = _dense(*leaves, m, **kw)
        out.backward(dout.to(dt))
        results[kind] = [out.detach()] + [x.grad for x in leaves]
    mine = [shard(x, 2, cp).to(dtype).detach().requires_grad_() for x in (q, k, v)]
    local_mask = None if mask is None else shard(mask, 3, cp)
    out = ring(*mine, local_mask, cp=cp, scale=kw["scale"], causal=kw["causal"], softcap=kw["softcap"],
               kv_groups=kw["groups"], mask_fill=fill, window_left=kw["window"][0], window_right=kw["window"][1],
               sdpa_form=kw["sdpa_form"])
    assert out.dtype == dtype and out.shape == (batch, c["h"], local_len, c["dv"])
    out.backward(shard(dout, 2, cp).to(dtype))
    ours = [_gather(x, cp) for x in [out] + [t.grad for t in mine]]
    if name.startswith("dead_rows"):  # the case must exercise what it names
        assert torch.isnan(results["ref"][0]).any() != kw["sdpa_form"]
    for what, o, e, r in zip(("out", "dq", "dk", "dv"), ours, results["eager"], results["ref"]):
        assert_2x(o.to(dtype), e, r, f"{name} {cp.layout} P={cp.ranks} {dtype} {what}")


def _check(rank: int, ranks: int, names, local_lens, compiled: bool = False) -> None:
    failures = []
    for layout, local_len in local_lens:
        cp = ContextParallel(dist.group.WORLD.group_name, ranks, "ring", layout)
        for i, name in enumerate(names):
            for dtype in (torch.float32, torch.bfloat16):
                try:
                    _one(cp, name, dtype, local_len, seed=1000 * ranks + 10 * i + (dtype == torch.bfloat16))
                except AssertionError as err:
                    failures.append(f"{name} {layout} {dtype}: {err}")
    if compiled:
        try:
            _compiled(rank, ranks)
        except AssertionError as err:
            failures.append(f"torch.compile: {err}")
    if failures:  # every rank checks the same gathered tensors
        raise AssertionError("\n".join(failures))




def _compiled(rank: int, ranks: int) -> None:
    for layout in ("zigzag", "contiguous"):  # contiguous + causal: rank 0 skips its last step
        _compiled_layout(rank, ranks, layout)


def _compiled_layout(rank: int, ranks: int, layout: str) -> None:
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = str(gm.code)
            return make_boxed_func(gm.forward)
        return compiler

    cp = ContextParallel(dist.group.WORLD.group_name, ranks, "ring", layout)

    def fn(q, k, v, key_mask):
        return ring(q * 1.5, k, v, key_mask, cp=cp, scale=0.2, causal=True, softcap=3.0, kv_groups=2).sin()

    gen = torch.Generator().manual_seed(7 + rank)
    q, k, v = (torch.randn(2, h, 8, 24, generator=gen) for h in (4, 2, 2))
    key_mask = torch.rand(2, 1, 1, 8, generator=gen) > 0.2
    key_mask[..., 0] = True
    # Inductor's partitioner: it moves a backward collective that needs no gradient into the forward
    backend = aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"),
                           partition_fn=min_cut_rematerialization_partition)
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    results = [_out_and_grads(f, q, k, v, key_mask) for f in (fn, compiled)]
    for what, a, b in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, w=what: f"compiled {layout} {w}: {m}")
    # the collectives are in the traced graphs: the forward sends K, V and the key mask once per step; the
    # backward sends K with V and the key mask once per step, and dk/dv once more.  None of the backward's moved
    # into the forward, where its received chunks would be saved for the backward (memory not falling with P)
    sends = {n: g.count("_c10d_functional.all_to_all_single.default(") for n, g in graphs.items()}
    assert sends == {"fw": 3 * (ranks - 1), "bw": 2 * (ranks - 1) + ranks}, sends


def _out_and_grads(f, q, k, v, key_mask) -> list[torch.Tensor]:
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = f(*leaves, key_mask)
    out.backward(torch.cos(out.detach()))
    return [out.detach()] + [x.grad for x in leaves]


def _graph_sizes(rank: int, ranks: int, local_lens) -> None:
    """Node counts of the traced forward and backward graphs of a compiled ring call for each local length, with a
    score block of one row (so the partials loop over every row): equal for every length, and the partials are
    the custom ops; the compiled result matches eager's under that budget."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    partial_mod.SCORE_BLOCK_BYTES = 1  # one query row per block
    cp = ContextParallel(dist.group.WORLD.group_name, ranks, "ring", "zigzag")
    sizes = {}
    for local_len in local_lens:
        graphs = {}

        def keep(name, graphs=graphs):
            def compiler(gm, example_inputs):
                graphs[name] = gm
                return make_boxed_func(gm.forward)
            return compiler

        def fn(q, k, v, key_mask):
            return ring(q, k, v, key_mask, cp=cp, scale=0.3, causal=True, softcap=2.0, kv_groups=2)

        gen = torch.Generator().manual_seed(5 + rank)
        q, k, v = (torch.randn(1, h, local_len, 16, generator=gen) for h in (4, 2, 2))
        key_mask = torch.rand(1, 1, 1, local_len, generator=gen) > 0.2
        key_mask[..., 0] = True
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw")),
                                 fullgraph=True, dynamic=False)
        results = [_out_and_grads(f, q, k, v, key_mask) for f in (fn, compiled)]
        for what, a, b in zip(("out", "dq", "dk", "dv"), *results):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, w=what: f"L={local_len} {w}: {m}")
        for name, gm in graphs.items():
            code = str(gm.code)
            assert ("attnfuse.ring_partial_backward.default(" if name == "bw" else "attnfuse.ring_partial.default(") \
                in code, f"{name}: the partials are not the custom ops"
        sizes[local_len] = {name: len(gm.graph.nodes) for name, gm in graphs.items()}
    assert len({tuple(sorted(v.items())) for v in sizes.values()}) == 1, f"graph sizes grow with the rows: {sizes}"


def test_ring_graph_does_not_grow_with_row_blocks():
    """The traced graphs of a compiled ring call (2 ranks, aot_eager) hold one node per partial, not one per block
    of query rows: 4 and 8 row blocks per zigzag half give the same node counts (the unrolled loop would not)."""
    run(_graph_sizes, 2, (8, 16), timeout=120)


def test_ring_two_ranks():
    """Every case, both layouts, float32 and bfloat16; and ``torch.compile(fullgraph=True)`` of a function calling
    `ring` (aot_eager: AOTAutograd traces forward and backward) against eager, in the same processes."""
    run(_check, 2, tuple(CASES), (("contiguous", 10), ("zigzag", 10)), True, timeout=150)


def test_ring_four_ranks():
    run(_check, 4, FOUR_RANKS, (("contiguous", 6), ("zigzag", 6)), timeout=150)


def test_segments_are_the_layout_positions():
    for ranks in (1, 2, 3, 4):
        for layout, local_len in (("contiguous", 5), ("contiguous", 6), ("zigzag", 6), ("zigzag", 10)):
            cp = ContextParallel("unused", ranks, "ring", layout)
            for rank in range(ranks):
                runs = [torch.arange(g, g + b - a) for a, b, g in segments(cp, rank, local_len)]
                assert torch.equal(torch.cat(runs), positions(cp, rank, local_len)), (ranks, layout, rank)


def test_static_band_tests_match_the_dense_band():
    length = 24
    for left, right, causal in ((-1, -1, False), (-1, -1, True), (5, 0, False), (3, 2, False), (0, -1, False),
                                (2, 6, True)):
        keep = band(length, length, left, right, causal)
        edge = (0 if right < 0 else min(right, 0)) if causal else right
        for r0, r1, k0, k1 in ((0, 6, 6, 12), (6, 12, 0, 6), (3, 9, 3, 9), (18, 24, 0, 6), (0, 6, 18, 24),
                               (10, 12, 4, 8), (4, 8, 6, 7)):
            block = keep[r0:r1, k0:k1]
            rows, keys = (0, r1 - r0, r0), (2, 2 + k1 - k0, k0)
            assert visible(rows, keys, left, edge) == bool(block.any()), (left, right, causal, r0, k0)
            assert covered(rows, keys, left, edge) == bool(block.all()), (left, right, causal, r0, k0)


def test_merged_partials_keep_finite_fills_uniform():
    """Partials over disjoint keys merge to the softmax over all of them, in one process; rows whose scores are all
    ``finfo.min`` (a finite fill) stay uniform over every key, which a merge of ``m + log(l)`` would lose."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 7, 16, generator=gen) for _ in range(3))
    mask = torch.rand(2, 1, 1, 7, generator=gen) > 0.3
    mask[1] = False  # batch row 1: every key masked with a finite fill
    fill = torch.finfo(torch.float32).min
    kw = dict(left=-1, right=-1, scale=0.25, softcap=0.0, mask_fill=fill)
    rows = (0, 7, 0)
    merged = None
    for keys in ((0, 3, 0), (3, 5, 3), (5, 7, 5)):
        merged = merge(merged, partial_forward(q, k, v, mask, rows, keys, **kw))
    acc, _, rsum = merged
    want = torch.softmax(torch.where(mask, q @ k.transpose(-2, -1) * 0.25, fill), -1) @ v
    torch.testing.assert_close(acc / rsum[..., None], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(want[1], v[1].mean(-2, keepdim=True).expand_as(want[1]), rtol=1e-5, atol=1e-5)


def test_bad_key_masks_raise():
    cp = ContextParallel("unused", 2, "ring", "zigzag")
    q = torch.randn(2, 2, 6, 8)
    bias = torch.zeros(2, 1, 1, 6, requires_grad=True)
    with pytest.raises(ValueError, match="attnfuse.*key_mask.*grad"):
        ring(q, q, q, bias, cp=cp, scale=0.3)
    with pytest.raises(ValueError, match="attnfuse.*key_mask.*broadcast"):
        ring(q, q, q, torch.ones(2, 1, 6, 6, dtype=torch.bool), cp=cp, scale=0.3)
    with pytest.raises(ValueError, match="attnfuse.*zigzag.*even"):
        ring(q[..., :5, :], q[..., :5, :], q[..., :5, :], cp=cp, scale=0.3)


def test_ring_on_one_rank():
    """A group of one: no collective at all, the plain attention (a 1-D key mask broadcasts over the batch)."""
    from torch.distributed import HashStore

    if dist.is_initialized():
        pytest.skip("this process already has a default process group")
    dist.init_process_group("gloo", store=HashStore(), rank=0, world_size=1)
    try:
        cp = ContextParallel(dist.group.WORLD.group_name, 1, "ring", "zigzag")
        gen = torch.Generator().manual_seed(11)
        q, k, v = (torch.randn(2, h, 12, 40, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
        key_mask = torch.arange(12) < 9
        results = []
        for dt in (torch.float64, torch.float32):
            leaves = [x.to(dt).detach().requires_grad_() for x in (q, k, v)]
            out = ring(*leaves, key_mask, cp=cp, scale=0.2, window_left=4, kv_groups=2)
            out.backward(torch.cos(out.detach()))
            results.append([out.detach()] + [x.grad for x in leaves])
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        want = _dense(*leaves, key_mask, scale=0.2, groups=2, window=(4, -1))
        want.backward(torch.cos(want.detach()))
        for got, exact in zip(results[0], [want.detach()] + [x.grad for x in leaves]):
            torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-10)
        for got, exact in zip(results[1], results[0]):
            torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()
