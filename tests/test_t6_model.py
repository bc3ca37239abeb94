"""benchmarks/t6_model.py: the T6-style decoder the TPA benchmark runs.  Its three spellings of the per-token
product compute the same logits; its TPA block is the paper's formula (checked against a float64 oracle written
here); decode over the cache of factors equals the full forward; the cache holds R (H + D) numbers per token for K
and for V (B_k after RoPE); the MHA twin's plain cache H D."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
# odd sizes: vocab 97, 97 tokens, 3 heads of head_dim 40, ranks 3 and 2
SIZES = dict(vocab=97, dim=40, layers=2, heads=3, head_dim=40, q_rank=3, rank=2)


@pytest.fixture(scope="module")
def t6():
    spec = importlib.util.spec_from_file_location("t6_model", BENCH / "t6_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def _model(t6, spelling="bmm", dtype=torch.float32, **kw):
    return t6.T6(**{**SIZES, **kw}, spelling=spelling).to(dtype).eval()


def _tokens(n=97, batch=2, seed=0):
    return torch.randint(SIZES["vocab"], (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spelling", ["bmm", "matmul", "einsum"])
def test_product_is_the_per_token_sum(t6, spelling):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 7, 3, 5, generator=g), torch.randn(2, 7, 5, 40, generator=g)
    want = sum(a[..., r, None].double() * b[:, :, None, r].double() for r in range(5)) / 5
    got = t6.product(a.clone(), b.clone(), spelling)
    assert got.shape == (2, 7, 3, 40)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_spellings_give_equal_logits(t6):
    tokens = _tokens()
    with torch.no_grad():
        logits = {s: _model(t6, s)(tokens) for s in t6.SPELLINGS}
    assert logits["bmm"].shape == (2, 97, 97) and logits["bmm"].abs().max() > 0.1
    for s in ("matmul", "einsum"):
        torch.testing.assert_close(logits[s], logits["bmm"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the comparison can fail: other weights give other logits
        assert not torch.allclose(_model(t6, seed=1)(tokens), logits["bmm"], atol=1e-3)


def _oracle_block(attn, x):
    """The TPA block from the paper's formulas, float64, explicit softmax with a causal mask."""
    b, t, _ = x.shape
    h, d, rq, r = attn.heads, attn.head_dim, attn.q_rank, attn.rank
    w = {n: getattr(attn, n).weight.double() for n in ("a_q", "a_k", "a_v", "b_q", "b_k", "b_v", "o")}
    x = x.double()
    pos = torch.arange(t, dtype=torch.float64)
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None] * inv[None, :]  # (T, D/2)

    def rot(y):  # rotate pairs (i, i + D/2) by the position's angles
        y1, y2 = y[..., : d // 2], y[..., d // 2:]
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
        return torch.cat((y1 * c - y2 * s, y2 * c + y1 * s), -1)

    def formed(na, nb, rank, rope):
        a = (x @ w[na].T).view(b, t, h, rank)
        bb = (x @ w[nb].T).view(b, t, rank, d)
        bb = rot(bb) if rope else bb
        return torch.einsum("bthr,btrd->bhtd", a, bb) / rank

    q, k, v = formed("a_q", "b_q", rq, True), formed("a_k", "b_k", r, True), formed("a_v", "b_v", r, False)
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h * d)
    return out @ w["o"].T


@pytest.mark.parametrize("spelling", ["bmm", "einsum"])
def test_tpa_block_matches_the_paper_formula(t6, spelling):
    attn = _model(t6, spelling).blocks[0].attn
    x = torch.randn(2, 97, SIZES["dim"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, _ = attn(x)
    want = _oracle_block(attn, x)
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["T6", "MHA"])
def test_decode_over_cache_equals_full_forward(t6, kind):
    model = (_model(t6) if kind == "T6" else
             t6.MHA(SIZES["vocab"], SIZES["dim"], SIZES["layers"], SIZES["heads"], SIZES["head_dim"]).eval())
    tokens = _tokens(41)
    with torch.no_grad():
        full = model(tokens)
        cache = t6.Cache()
        first = model.generate_step(tokens[:, :5], cache)  # a prefill of 5 tokens fills the cache
        torch.testing.assert_close(first, full[:, 4], rtol=1e-5, atol=1e-5)
        for i in range(5, 38):  # one token at a time
            torch.testing.assert_close(model.generate_step(tokens[:, i:i + 1], cache), full[:, i], rtol=1e-5,
                                       atol=1e-5)
        # three new tokens at once over the cache (the bottom-right causal mask): the last position's logits
        last = model.generate_step(tokens[:, 38:41], cache)
        torch.testing.assert_close(last, full[:, 40], rtol=1e-5, atol=1e-5)
    assert cache.length == 41
    assert not torch.allclose(full[:, 40], full[:, 39], atol=1e-3)  # positions differ: the checks can fail


def test_cache_holds_factors_after_rope(t6):
    model = _model(t6)
    h, d, r = SIZES["heads"], SIZES["head_dim"], SIZES["rank"]
    tokens = _tokens(23, batch=3)
    with torch.no_grad():
        cache = t6.Cache()
        model.generate_step(tokens[:, :20], cache)
        for i in range(20, 23):
            model.generate_step(tokens[:, i:i + 1], cache)
        assert len(cache.layers) == SIZES["layers"]
        for layer in cache.layers:
            assert [tuple(x.shape) for x in layer] == [(3, 23, h, r), (3, 23, r, d), (3, 23, h, r), (3, 23, r, d)]
        per_token = 2 * r * (h + d)  # R (H + D) for K and as many for V
        assert model.cache_numel_per_token() == per_token and model.cache_seq_dim == 1
        assert cache.numel() == SIZES["layers"] * 3 * 23 * per_token
        assert cache.nbytes() == cache.numel() * 4
        # the first layer's cached factors are its projections of the tokens, B_k after RoPE at absolute positions
        block = model.blocks[0]
        _, _, a_k, b_k, a_v, b_v = block.attn.factors(block.norm1(model.embed(tokens)), 0)
        for got, want in zip(cache.layers[0], (a_k, b_k, a_v, b_v)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        raw_b_k = block.attn.b_k(block.norm1(model.embed(tokens))).view(3, 23, r, d)
        assert not torch.allclose(cache.layers[0][1][:, 1:], raw_b_k[:, 1:], atol=1e-3)


def test_random_cache_and_mha_variant(t6):
    h, d = SIZES["heads"], SIZES["head_dim"]
    mha = t6.MHA(SIZES["vocab"], SIZES["dim"], SIZES["layers"], h, d).eval()
    assert mha.cache_numel_per_token() == 2 * h * d and mha.cache_seq_dim == 2
    for model in (mha, _model(t6, "matmul")):
        cache = model.random_cache(2, 50, torch.Generator().manual_seed(3))
        assert cache.length == 50 and all(x.dtype == torch.float32 and x.shape[model.cache_seq_dim] == 50
                                          for layer in cache.layers for x in layer)
        assert cache.numel() == SIZES["layers"] * 2 * 50 * model.cache_numel_per_token()
        with torch.no_grad():
            logits = model.generate_step(_tokens(1), cache)
        assert logits.shape == (2, SIZES["vocab"]) and torch.isfinite(logits).all() and cache.length == 51
        assert all(x.shape[model.cache_seq_dim] == 51 for layer in cache.layers for x in layer)


def test_bad_spelling_raises(t6):
    with pytest.raises(ValueError, match="spelling 'loop'"):
        _model(t6, "loop")
    with pytest.raises(ValueError, match="choose from bmm, matmul, einsum"):
        t6.product(torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 2), "loop")
