"""LSH attention (`attnfuse.kernels.lsh`) on its plain-CPU path: the selection against a brute-force float64
reference written from the module docstring (`_lsh_helpers.ref_select`), exact attention when one bucket and the
cap cover every key, attention over the selected blocks against the float64 textbook masked with them (forward
and q/k/v gradients, 2x rule), the argument checks and determinism.  test_lsh_interpret.py holds the Triton path
to the same references.
"""

from __future__ import annotations

import pytest
import torch

from attnfuse.kernels import lsh
from attnfuse.kernels.lsh import _index
from tests.kernels._helpers import qkv, seed_case
from tests.kernels.lsh._lsh_helpers import (
    assert_same_selection,
    check_exact,
    check_masked,
    clustered,
    ref_blocks,
    ref_select,
    settings,
    unambiguous,
)

# name: ((B, H, Hkv, Lq, Lk, D, causal), settings)
SELECT = {
    "causal_gqa2_auto_probe1": ((2, 4, 2, 203, 203, 24, True),
                                dict(tables=3, bits=-1, probes=1, cap=64, block=32, sink=20, local=40, seed=3)),
    "cross_mqa3_probe2": ((1, 3, 1, 130, 259, 16, False),
                          dict(tables=4, bits=5, probes=2, cap=70, block=32, sink=0, local=0, seed=11)),
    "cross_q_longer": ((1, 2, 2, 270, 97, 40, False),
                       dict(tables=2, bits=4, probes=0, cap=32, block=32, sink=33, local=10, seed=0)),
    "bits0_ties": ((1, 2, 1, 161, 161, 16, True),
                   dict(tables=1, bits=0, probes=0, cap=64, block=32, sink=0, local=0, seed=0)),
    "block64_probe2": ((1, 2, 1, 450, 450, 16, True),
                       dict(tables=8, bits=-1, probes=2, cap=64, block=64, sink=64, local=64, seed=5)),
    "block96_cross": ((1, 2, 1, 200, 290, 16, False),
                      dict(tables=2, bits=3, probes=3, cap=96, block=96, sink=0, local=20, seed=2)),
}


@pytest.mark.parametrize("name", list(SELECT))
def test_select_equals_brute_force(name):
    (b, h, hkv, lq, lk, d, causal), params = SELECT[name]
    (q, k), ref = unambiguous(lambda: qkv(torch.float32, b, h, hkv, lq, lk, d, d)[:2], ("select", name),
                              causal=causal, **params)
    assert_same_selection(lsh.select(q, k, causal=causal, **params), ref, name)
    assert (ref.chosen & ~ref.kept).any(), "no block picked by votes"
    if name == "bits0_ties":  # every full block ties: the lowest open ones win
        n = -(-params["cap"] // params["block"])
        for qb in range(ref.chosen.shape[2]):
            opened = [kb for kb in range(qb + 1) if not ref.kept[qb, kb]]
            want = sorted([kb for kb in range(qb + 1) if ref.kept[qb, kb]] + opened[:n])
            assert ref.chosen[0, 0, qb].nonzero().flatten().tolist() == want
    else:  # the cap binds somewhere: some voted open block is left out
        assert (ref.cand & ~ref.kept & (ref.most > 0) & ~ref.chosen).any()


@pytest.mark.parametrize("causal", [False, True])
def test_select_spill_rule(causal):
    """Keys made of two repeated directions crowd a few buckets past `spill`: those buckets vote for nothing."""
    lk = 300
    lq = lk if causal else 170
    params = dict(tables=4, bits=5, probes=1, cap=64, block=32, sink=0, local=32, seed=7)
    (q, k), ref = unambiguous(lambda: clustered(torch.float32, 1, 4, 2, lq, lk, 16, 16, repeats=240,
                                                directions=2)[:2], ("spill", causal), causal=causal, **params)
    assert ref.limit == _index.spill(lk, 5) < 120  # a repeated direction's bucket holds >= 120 keys
    assert ref.skipped > 0
    loose = ref_select(q, k, causal=causal, **params, limit=lk)
    assert loose.skipped == 0 and not torch.equal(loose.votes, ref.votes)
    assert not torch.equal(loose.chosen, ref.chosen)  # the rule changes the selection
    assert_same_selection(lsh.select(q, k, causal=causal, **params), ref, "spill")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_select_other_dtypes(dtype):
    """The codes are those of the inputs' values in every dtype."""
    (b, h, hkv, lq, lk, d, causal), params = SELECT["cross_mqa3_probe2"]
    (q, k), ref = unambiguous(lambda: [x.to(dtype) for x in qkv(torch.float32, b, h, hkv, lq, lk, d, d)[:2]],
                              ("dtype", dtype), causal=causal, **params)
    assert_same_selection(lsh.select(q, k, causal=causal, **params), ref, str(dtype))


def test_select_keys_hashed_centered():
    """Shifting every key by one vector changes nothing (keys are hashed centered): dyadic keys and a power-of-two
    Lk make the module's fp32 centering exact."""
    (b, h, hkv, lq, _, d, causal), params = SELECT["cross_mqa3_probe2"]
    make = lambda: (torch.randn(b, h, lq, d), (torch.randn(b, hkv, 256, d) * 64).round() / 64)  # noqa: E731
    (q, k), ref = unambiguous(make, ("centered",), causal=causal, **params)
    shifted = k + 0.5 * torch.randint(-8, 8, (d,)).float()
    assert_same_selection(lsh.select(q, k, causal=causal, **params), ref, "dyadic")
    assert_same_selection(lsh.select(q, shifted, causal=causal, **params), ref, "shifted")


def test_select_cap_zero_and_huge():
    seed_case("caps")
    q, k, _ = qkv(torch.float32, 1, 2, 1, 150, 150, 16, 16)
    kept, cand = ref_blocks(150, 150, causal=True, block=32, sink=10, local=20)
    none = lsh.select(q, k, causal=True, **settings(cap=0, block=32, sink=10, local=20, bits=3))
    assert torch.equal(none, kept.expand_as(none))
    every = lsh.select(q, k, causal=True, **settings(cap=10**6, block=32, sink=10, local=20, bits=0))
    assert torch.equal(every, cand.expand_as(every))


def test_auto_bits_and_spill():
    for lk, want in ((1, 0), (2, 0), (5, 0), (7, 1), (300, 6), (4096, 10), (10**7, 16)):
        assert _index.auto_bits(-1, lk) == want, lk
    assert _index.auto_bits(4, 10**6) == 4
    assert _index.spill(300, 5) == 80 and _index.spill(300, 7) == 64 and _index.spill(10**5, 0) == 8 * 10**5


# --------------------------------------------------------------------------------------------- attention

# name: (B, H, Hkv, Lq, Lk, D, Dv, causal)
SHAPES = {
    "causal_gqa2": (1, 4, 2, 201, 201, 40, 24, True),
    "causal_mqa3": (2, 3, 1, 97, 97, 16, 16, True),
    "cross_gqa2": (1, 4, 2, 150, 233, 40, 40, False),
    "cross_q_longer": (1, 2, 2, 230, 97, 16, 24, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_one_bucket_covering_cap_is_exact(name, dtype):
    check_exact(dtype, SHAPES[name], what="exact" + name, tables=2)


def test_overlapping_kept_and_voted_blocks_count_once():
    """Sink and local blocks that are also voted for (one bucket: all are), several tables: still exact."""
    check_exact(torch.float32, SHAPES["causal_gqa2"], what="overlap", tables=8, sink=40, local=50)
    check_exact(torch.float32, SHAPES["cross_gqa2"], what="overlap", tables=3, sink=70, local=33, block=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_equals_attention_over_selected_blocks(name, dtype):
    chosen = check_masked(dtype, SHAPES[name], what="masked" + name, tables=4, bits=4, probes=1, cap=32, block=32,
                          sink=0, local=10, seed=1)
    assert chosen.shape[2:] == (-(-SHAPES[name][3] // 32), -(-SHAPES[name][4] // 32))


def test_spilled_inputs_and_scale_fp64():
    shape = (1, 4, 2, 300, 300, 16, 16, True)
    seed_case("spill-attn")
    inputs = clustered(torch.float64, 1, 4, 2, 300, 300, 16, 16, repeats=240, directions=2)
    check_masked(torch.float64, shape, what="spill-attn", inputs=inputs, scale=0.3, tables=4, bits=5, probes=1,
                 cap=64, block=32, sink=0, local=32, seed=7)


def test_default_settings():
    check_masked(torch.float32, (1, 2, 1, 700, 700, 16, 16, True), what="defaults", cap=128)


# --------------------------------------------------------------------------------------------- determinism


def test_deterministic_and_backward_reselects_alike(monkeypatch):
    seed_case("determinism")
    q, k, v = qkv(torch.float32, 1, 4, 2, 201, 201, 16, 16)
    params = dict(tables=4, bits=4, probes=2, cap=64, block=32, sink=0, local=32, seed=9)
    made = []
    real = lsh.select
    monkeypatch.setattr(lsh, "select", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    grads = []
    outs = []
    for _ in range(2):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out = lsh.attention(qq, kk, vv, causal=True, **params)
        out.backward(torch.ones_like(out))
        outs.append(out.detach())
        grads.append((qq.grad, kk.grad, vv.grad))
    assert len(made) == 4 and all(torch.equal(m, made[0]) for m in made)  # forward, backward, twice
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    out2, stats = lsh.forward(q, k, v, causal=True, **params)
    assert torch.equal(out2, outs[0]) and stats.numel() == 0 and out2.transpose(1, 2).is_contiguous()


# --------------------------------------------------------------------------------------------- errors


def test_errors():
    q, k, v = qkv(torch.float32, 1, 2, 1, 64, 96, 16, 16)
    assert lsh.unsupported(q.shape, k.shape, causal=True) == "causal LSH needs q_len == kv_len (got 64 and 96)"
    assert lsh.unsupported(q.shape, k.shape, causal=False) is None
    assert "LSH attention" in lsh.unsupported((1, 3, 8, 16), (1, 2, 8, 16), causal=False)
    bad = [(dict(tables=0), "tables"), (dict(tables=True), "tables"), (dict(bits=-2), "bits"), (dict(bits=17), "bits"),
           (dict(bits=3, probes=4), "probes"), (dict(bits=0, probes=1), "probes"), (dict(probes=-1), "probes"),
           (dict(block=48), "block"), (dict(block=16), "block"), (dict(cap=-1), "cap"), (dict(cap=2.0), "cap"),
           (dict(sink=-1), "sink"), (dict(local=False), "local"), (dict(seed=1.5), "seed"), (dict(seed=-1), "seed"),
           (dict(seed=2**64), "seed"), (dict(mask=torch.ones(64, 96, dtype=torch.bool)), "mask"),
           (dict(softcap=5.0), "softcap"), (dict(dropout_p=0.1), "dropout_p"), (dict(alibi=torch.ones(2)), "alibi")]
    for kw, word in bad:
        with pytest.raises(ValueError, match=rf"attnfuse\.kernels\.lsh\.attention: .*{word}"):
            lsh.attention(q, k, v, **kw)
    for kw, word in bad[:16]:
        with pytest.raises(ValueError, match=rf"attnfuse\.kernels\.lsh\.select: .*{word}"):
            lsh.select(q, k, causal=False, **settings(**kw))
        with pytest.raises(ValueError, match=rf"attnfuse\.kernels\.lsh\.forward: .*{word}"):
            lsh.forward(q, k, v, **kw)
    with pytest.raises(ValueError, match=r"attnfuse\.kernels\.lsh\.attention: causal LSH needs q_len == kv_len"):
        lsh.attention(q, k, v, causal=True)
    q3, k2, v2 = qkv(torch.float32, 1, 3, 2, 64, 64, 16, 16)
    with pytest.raises(ValueError, match=r"attnfuse\.kernels\.lsh\.attention: .*multiple of k heads"):
        lsh.attention(q3, k2, v2)
    with pytest.raises(ValueError, match=r"attnfuse\.kernels\.lsh\.backward: .*probes"):
        lsh.backward(q, q, k, v, q, q.new_empty(0), bits=1, probes=2)
    with pytest.raises(ValueError, match=r"attnfuse\.kernels\.lsh\.attention: .*share a dtype"):
        lsh.attention(q, k.half(), v)


def test_auto_bits_clip_probes():
    """With ``bits=-1`` the probes are clipped to the bits a call resolves (one setting serves every length), so a
    short call selects as with that many probes; explicit bits still reject more probes than bits."""
    for lk in (3, 7, 40):
        q, k, _ = qkv(torch.float32, 1, 2, 1, lk, lk, 16, 16)
        bits = lsh.auto_bits(-1, lk)
        kw = dict(causal=True, tables=3, bits=-1, cap=32, block=32, sink=0, local=0, seed=4)
        assert torch.equal(lsh.select(q, k, probes=bits + 2, **kw), lsh.select(q, k, probes=bits, **kw))
    with pytest.raises(ValueError, match=r"attnfuse\.kernels\.lsh\.select: probes \(2\) must be <= the bits"):
        lsh.select(q, k, causal=True, tables=3, bits=1, probes=2, cap=32, block=32, sink=0, local=0, seed=4)
