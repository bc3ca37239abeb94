"""LSH attention (`attnfuse.kernels.lsh`) on its Triton path, run by Triton's interpreter (or compiled on a GPU):
the index's kernels (`_triton.bucket_keys`, `_triton.count_votes`) and the attention (flash's block-sparse mode).

Held to test_lsh_cpu.py's references: `lsh.select` equals the brute-force float64 selection (and the CPU
path's), every bucket holds exactly its keys' blocks, the votes are the brute-force counts (spilled buckets
included), and forward and q/k/v gradients equal the float64 textbook restricted to the selected blocks (2x
rule; fp16 and fp32 -- the interpreter's bf16 dot is wrong).  Sizes keep each launch to about 16 programs.
"""

from __future__ import annotations

import pytest
import torch

from attnfuse.kernels import lsh
from attnfuse.kernels.lsh import _index, _triton
from tests.kernels._helpers import DTYPES, qkv, seed_case
from tests.kernels.lsh._lsh_helpers import (
    assert_same_selection,
    check_exact,
    check_masked,
    clustered,
    unambiguous,
)

# name: ((B, H, Hkv, Lq, Lk, D, causal), settings, clustered keys)
SELECT = {
    "causal_gqa2_probe1": ((1, 4, 2, 150, 150, 24, True),
                           dict(tables=3, bits=-1, probes=1, cap=32, block=32, sink=0, local=20, seed=3), False),
    "cross_spill_probe2": ((1, 2, 1, 110, 300, 16, False),
                           dict(tables=4, bits=5, probes=2, cap=64, block=32, sink=10, local=0, seed=7), True),
    "block64_bits0": ((1, 2, 1, 200, 200, 16, True),
                      dict(tables=2, bits=0, probes=0, cap=64, block=64, sink=0, local=0, seed=0), False),
}


def test_triton_path_is_used():
    q, k, v = qkv(torch.float32, 1, 4, 2, 97, 97, 16, 16)
    assert _triton.runs_on(q)
    out, stats = lsh.forward(q, k, v, causal=True, tables=2, bits=3, cap=32, block=32, sink=0, local=0)
    assert stats.shape == (1, 4, 97, 2) and stats.dtype == torch.float32  # the flash kernels' row statistics
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("name", list(SELECT))
def test_select_equals_brute_force_and_cpu_path(name, monkeypatch):
    (b, h, hkv, lq, lk, d, causal), params, crowded = SELECT[name]
    make = (lambda: clustered(torch.float32, b, h, hkv, lq, lk, d, d, repeats=200, directions=2)[:2]) if crowded \
        else (lambda: qkv(torch.float32, b, h, hkv, lq, lk, d, d)[:2])
    (q, k), ref = unambiguous(make, ("triton-select", name), causal=causal, **params)
    assert (ref.chosen & ~ref.kept).any()
    if crowded:
        assert ref.skipped > 0  # the spill rule is exercised
    got = lsh.select(q, k, causal=causal, **params)
    assert_same_selection(got, ref, name)
    monkeypatch.setattr(_triton, "runs_on", lambda x: False)  # the torch ops of the CPU path, same device
    assert_same_selection(lsh.select(q, k, causal=causal, **params), ref, name + " torch")


@pytest.mark.parametrize("kv_len,groups,bits", [(1100, 3, 3), (70, 7, 6)])
def test_bucket_keys_gives_every_bucket_its_keys(kv_len, groups, bits):
    """Keys in (group, position) order with skewed codes (many keys of one bucket inside one program, empty
    buckets): every bucket's slots hold exactly its keys' blocks, as a multiset."""
    seed_case("bucket", kv_len, groups, bits)
    weights = torch.rand(1 << bits) ** 4
    weights[0] = 0  # an empty bucket in every group
    codes = torch.multinomial(weights, groups * kv_len, replacement=True).view(groups, kv_len)
    gid = (codes + (torch.arange(groups)[:, None] << bits)).reshape(-1)
    counts = torch.bincount(gid, minlength=groups << bits)
    offsets = torch.cat((counts.new_zeros(1), counts.cumsum(0)))
    block = 32
    out = _triton.bucket_keys(gid, offsets, kv_len, block)
    assert out.dtype == torch.int32 and out.shape == (groups * kv_len,)
    slot_bucket = torch.repeat_interleave(torch.arange(groups << bits), counts)
    big = 1 << 20
    got = torch.sort(slot_bucket * big + out.long()).values
    want = torch.sort(gid * big + (torch.arange(groups * kv_len) % kv_len) // block).values
    assert torch.equal(got, want)


@pytest.mark.parametrize("lo,hi,pad", [(0, 150, 10), (32, 96, 0)])
def test_count_votes_equals_brute_force(lo, hi, pad):
    """The votes of query rows [lo, hi) (a chunk as `_index.votes` makes them; ``pad`` padding counter rows stay
    0) == the brute-force counts, spilled buckets (keys crowded in two directions) giving none."""
    b, h, hkv, lq, lk, d = 1, 4, 2, 150, 300, 16
    tables, bits, probes, block = 3, 5, 1, 32
    params = dict(tables=tables, bits=bits, probes=probes, cap=32, block=block, sink=0, local=0, seed=4)
    (q, k), ref = unambiguous(lambda: clustered(torch.float32, b, h, hkv, lq, lk, d, d, repeats=200,
                                                directions=2)[:2], ("votes",), causal=False, **params)
    assert ref.skipped > 0
    g, nkb = h // hkv, -(-lk // block)
    dev = q.device
    # the index, from the reference's codes: bucket (batch, K/V head, table, code) holds keys in position order
    groups = torch.arange(b * hkv * tables, device="cpu") << bits  # the references are CPU tensors
    kgid = (ref.codes.transpose(2, 3) + groups.view(b, hkv, tables, 1)).reshape(-1)
    counts = torch.bincount(kgid, minlength=b * hkv * tables << bits)
    offsets = torch.cat((counts.new_zeros(1), counts.cumsum(0))).to(dev)
    key_blocks = ((torch.argsort(kgid, stable=True) % lk) // block).to(torch.int32).to(dev)
    qgid = (ref.lookups.view(b, hkv, g, lq, tables, 1 + probes) + groups.view(b, hkv, 1, 1, tables, 1)).to(dev)
    acc = torch.zeros(b * hkv, g, hi - lo + pad, nkb, dtype=torch.int32, device=dev)
    _triton.count_votes(qgid[:, :, :, lo:hi], offsets, key_blocks, acc, ref.limit)
    want = ref.votes.view(b * hkv, g, lq, nkb)[:, :, lo:hi]
    assert torch.equal(acc[:, :, :hi - lo].cpu().long(), want) and want.sum() > 0
    assert not acc[:, :, hi - lo:].any()
    # and the module's own index and codes agree with the reference's
    codes = _index.key_codes(k, tables=tables, bits=bits, seed=4)
    assert torch.equal(codes.cpu(), ref.codes)
    assert torch.equal(_index.query_codes(q, tables=tables, bits=bits, probes=probes, seed=4).cpu()[..., 0],
                       ref.lookups[..., 0])
    offs, blocks = _index.key_index(codes, bits=bits, block=block)
    assert torch.equal(offs, offsets)
    slot_bucket = torch.repeat_interleave(torch.arange(counts.numel(), device=dev), counts.to(dev))
    assert torch.equal(torch.sort(slot_bucket * 64 + blocks).values, torch.sort(slot_bucket * 64 + key_blocks).values)


# --------------------------------------------------------------------------------------------- attention

# name: (B, H, Hkv, Lq, Lk, D, Dv, causal)
SHAPES = {
    "causal_gqa2": (1, 4, 2, 150, 150, 40, 24, True),
    "cross_gqa2": (1, 4, 2, 130, 181, 16, 16, False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_equals_attention_over_selected_blocks(name, dtype):
    check_masked(dtype, SHAPES[name], what="triton" + name, tables=4, bits=4, probes=1, cap=32, block=32, sink=0,
                 local=10, seed=1)


def test_one_bucket_covering_cap_is_exact():
    check_exact(torch.float32, SHAPES["causal_gqa2"], what="triton-exact", tables=2, sink=20, local=10)
