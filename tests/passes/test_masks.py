"""Mask structure analysis (`attnfuse.passes.masks`) on real and hand-written mask graphs.

Every test asserts the exact proven kinds and parameters in the report AND that
``torch.compile(model, backend="attnfuse")`` equals eager (the 2x rule against a float64
copy, or a tight match to eager where HF's float64 copy is not a float64 computation).
Where the structure reaches the op unchanged by the backend's policy, the op's arguments
are checked too (``causal``, ``window_left/right``, ``alibi``, ``block_sparse``, the key vector).
Hugging Face models are built from configs with random weights (nothing is downloaded);
HF's default ``sdpa`` attention and ``attn_implementation="eager"`` are both read.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _harness import OpSpy, check
from _mask_models import (
    ALiBi,
    Attention,
    ConstantMask,
    Stack,
    abs_band_keep,
    alibi_slopes,
    band_keep,
    bert,
    block_pattern,
    gemma2,
    gpt2,
    llama,
    mistral,
    modernbert,
    t5,
)
from _util import assert_2x

import attnfuse
import attnfuse.backend as _backend
from attnfuse.passes import masks

B, T = 2, 13
MIN32 = torch.finfo(torch.float32).min


def ids(length: int = T) -> torch.Tensor:
    return torch.randint(3, 128, (B, length))


def padding(length: int = T, left: bool = False) -> torch.Tensor:
    """The second sequence padded by 4 tokens (right) or 5 (left)."""
    mask = torch.ones(B, length, dtype=torch.long)
    mask[1, :5] = 0 if left else 1
    mask[1, length - 4:] = 1 if left else 0
    return mask


def run(model: torch.nn.Module, *args, reference: str = "float64", dynamic: bool | None = False):
    """Compile ``model`` with attnfuse (fullgraph); assert it equals eager; return (report, op calls).

    ``reference="eager"``: a tight match to eager float32, for HF models whose float64 copy is not
    a float64 computation (LLaMA's softmax upcast turns finfo(float64).min into -inf: NaN rows).
    """
    graphs, transform = [], _backend.transform

    def capture(gm, example_inputs, config, report):
        out = transform(gm, example_inputs, config, report)
        graphs.append((out, list(example_inputs)))
        return out

    compiled = torch.compile(model, backend="attnfuse", fullgraph=True, dynamic=dynamic, options={"inner": "eager"})
    _backend.transform = capture
    try:
        with torch.no_grad():
            ours = compiled(*args)
    finally:
        _backend.transform = transform
    report = attnfuse.last_report()
    with torch.no_grad():
        eager = model(*args)
        if reference == "eager":
            torch.testing.assert_close(ours, eager)
        else:
            assert_2x(ours, eager, copy.deepcopy(model).double()(*args))
        gm, example_inputs = graphs[-1]
        with OpSpy() as spy:  # replay the rewritten graph (a symbolic size replays at its example value)
            gm(*(int(x.node.hint) if isinstance(x, torch.SymInt) else x for x in example_inputs))
    assert report.sites and not report.skipped, str(report)
    return report, spy.calls


def kinds(report) -> list[str]:
    return [s.mask["kind"] for s in report.sites]


def proof(site) -> str:
    return " | ".join(site.mask["proof"])


# --- real Hugging Face models ---------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_gpt2_causal_and_padding(impl):
    report, calls = run(gpt2(impl), ids())
    assert kinds(report) == ["causal"] * 2, str(report)
    assert all(c["causal"] and c["mask"] is None for c in calls)
    report, _ = run(gpt2(impl), ids(), padding())
    assert kinds(report) == ["causal+padding"] * 2, str(report)
    vector = "additive key vector" if impl == "eager" else "key vector"  # HF's where(.., 0, min) vs SDPA's bool
    assert all(s.mask["padding"] == f"{vector} (B, 1, 1, Lk)" for s in report.sites)
    assert "symbolic: kv <= q + 0" in proof(report.sites[0])


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_mistral_sliding_window(impl):
    """HF keeps kv with q - kv < window: left = window - 1, and the causal right bound."""
    report, calls = run(mistral(5, impl), ids())
    assert kinds(report) == ["causal+window"] * 2, str(report)
    assert all(s.mask["window"] == [4, 0] for s in report.sites), str(report)
    assert all(c["causal"] and c["window_left"] == 4 and c["window_right"] == -1 and c["mask"] is None
               for c in calls), calls
    report, calls = run(mistral(5, impl), ids(), padding())
    assert kinds(report) == ["causal+window+padding"] * 2, str(report)
    assert all(s.mask["window"] == [4, 0] for s in report.sites), str(report)
    if impl == "sdpa":  # SDPA zeroes rows the padding leaves without a key: the band kernel runs with the vector
        assert all("kept_dense" not in s.mask and s.kernel == "window" for s in report.sites), str(report)
        assert all(c["window_left"] == 4 and c["causal"] and tuple(c["mask"].shape[-2:]) == (1, T) for c in calls)
    else:  # eager makes such rows uniform over all keys: the band stays in the dense mask
        assert all("kept_dense" in s.mask for s in report.sites), str(report)
        assert all(c["window_left"] == -1 and tuple(c["mask"].shape[-2:]) == (T, T) for c in calls), calls


def test_dynamic_shapes():
    """With symbolic batch and length the same structure is proven (and the key vector sliced to the keys)."""
    report, calls = run(mistral(5), ids(17), dynamic=True)
    assert kinds(report) == ["causal+window"] * 2, str(report)
    assert all(c["window_left"] == 4 and c["causal"] for c in calls)
    report, calls = run(bert(), ids(17), padding(17), dynamic=True)
    assert kinds(report) == ["padding"] * 2, str(report)
    assert all(c["mask"].shape == (B, 1, 1, 17) for c in calls)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_llama_causal_and_left_padding(impl):
    report, calls = run(llama(impl), ids())
    assert kinds(report) == ["causal"] * 2, str(report)
    assert all(c["causal"] and c["mask"] is None and c["kv_groups"] == 2 for c in calls)
    # the padded rows of the second sequence see no key at all: eager makes them uniform
    report, _ = run(llama(impl), ids(), padding(left=True), reference="eager")
    assert kinds(report) == ["causal+padding"] * 2, str(report)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_bert_key_padding_vector(impl):
    report, calls = run(bert(impl), ids(), padding())
    assert kinds(report) == ["padding"] * 2, str(report)
    for c in calls:  # read as a (B, 1, 1, Lk) vector, never an Lq x Lk tensor
        assert c["mask"].shape == (B, 1, 1, T), c["mask"].shape
        if impl == "sdpa":  # a bool keep mask stays bool
            assert c["mask"].dtype == torch.bool and torch.equal(c["mask"].reshape(B, T), padding().bool())
        else:  # HF's additive where(keep, 0, finfo.min) stays additive: eager's gradient in fully masked rows
            assert torch.equal(c["mask"].reshape(B, T), torch.where(padding().bool(), 0.0, MIN32))
        assert not c["causal"] and c["window_left"] == c["window_right"] == -1


def test_t5_position_bias():
    mask, dec = padding(), ids(7)
    report, calls = run(t5(), ids(), mask, dec)
    by_module = {s.module.split(".", 1)[1]: s.mask["kind"] for s in report.sites}
    want = {"encoder.block.{}.layer.0.SelfAttention": "padding+bias",  # relative position bias + padding
            "decoder.block.{}.layer.0.SelfAttention": "causal+bias",
            "decoder.block.{}.layer.1.EncDecAttention": "padding"}  # its position bias is torch.zeros: dropped
    assert by_module == {k.format(i): v for k, v in want.items() for i in (0, 1)}, str(report)
    cross = [c for c in calls if c["q"].shape[2] == 7 and c["k"].shape[2] == T]
    assert len(cross) == 2 and all(c["mask"].shape == (B, 1, 1, T) for c in cross)  # T5's zero bias is dropped
    assert all("constant 0 (dropped)" in proof(s) for s in report.sites if "EncDecAttention" in s.module)


def test_nanogpt_tril_buffer_any_length():
    """``bias[:, :, :T, :T] == 0`` on a tril buffer: causal for every T, proven on the whole buffer."""
    from nanogpt import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=64, vocab_size=128, n_layer=2, n_head=4, n_embd=32)).eval()
    for length, dynamic in ((13, False), (17, True)):  # the second graph has a symbolic T
        report, calls = run(model, ids(length), dynamic=dynamic)
        assert kinds(report) == ["causal"] * 2, str(report)
        assert "by value" in proof(report.sites[0]) and "any length <= 64" in proof(report.sites[0])
        assert all(c["causal"] and c["mask"] is None for c in calls)


def test_modernbert_local_global_bidirectional_band():
    """ModernBERT: local layers keep |q - kv| <= local // 2, global layers see every key."""
    report, calls = run(modernbert(local=6), ids())
    assert kinds(report) == ["window", "none"], str(report)
    assert report.sites[0].mask["window"] == [3, 3]
    local = [c for c in calls if c["window_left"] >= 0]
    assert len(local) == 1 and local[0]["window_right"] == 3 and not local[0]["causal"], calls
    report, _ = run(modernbert(local=6), ids(), padding(), reference="eager")
    assert kinds(report) == ["window+padding", "padding"], str(report)


def test_gemma2_softcap_with_window():
    report, calls = run(gemma2(window=5, softcap=30.0), ids())
    assert kinds(report) == ["causal+window", "causal"], str(report)
    assert [c["window_left"] for c in calls] == [4, -1] and all(c["softcap"] == 30.0 and c["causal"] for c in calls)


# --- hand-written structures ----------------------------------------------------------------------

def _x(length: int = T) -> torch.Tensor:
    return torch.randn(B, length, 32)


def test_local_global_layers_bidirectional_band():
    model = Stack(Attention(mask=abs_band_keep(2)), Attention(), Attention(mask=band_keep(3, 3)), Attention())
    res = check(model, (_x(),))
    assert kinds(res.report) == ["window", "none", "window", "none"], str(res.report)
    assert [s.mask.get("window") for s in res.report.sites] == [[2, 2], None, [3, 3], None]
    assert [(c["window_left"], c["window_right"], c["causal"]) for c in res.calls] == \
        [(2, 2, False), (-1, -1, False), (3, 3, False), (-1, -1, False)]


def test_softcap_with_window():
    res = check(Attention(mask=band_keep(4, 0), softcap=20.0), (_x(),))
    assert kinds(res.report) == ["causal+window"], str(res.report)
    assert res.call["softcap"] == 20.0 and res.call["window_left"] == 4 and res.call["causal"]


@pytest.mark.parametrize("bloom", [False, True], ids=["kv-q", "bloom-kv"])
def test_alibi(bloom):
    res = check(ALiBi(bloom=bloom), (_x(),))
    assert kinds(res.report) == ["causal+alibi"], str(res.report)
    assert res.report.sites[0].mask["alibi_heads"] == 4
    assert "constant along kv, which softmax ignores" in proof(res.report.sites[0])
    assert res.call["mask"] is None and res.call["causal"]
    torch.testing.assert_close(res.call["alibi"], alibi_slopes(4), rtol=0, atol=0)


def test_symmetric_distance_bias_is_not_alibi():
    res = check(ALiBi(symmetric=True), (_x(),))  # slopes * -|kv - q| is not slopes * (kv - q)
    assert kinds(res.report) == ["causal+bias"], str(res.report)
    assert res.call["alibi"] is None and res.call["mask"].shape == (4, T, T)  # the bias, as it was


def test_constant_block_sparse_mask():
    n = 150  # 3 x 3 tiles of 64: the global row and column and the diagonal are kept, 2 tiles are empty
    keep = block_pattern(n)
    keep[64:128, 64:128] = torch.ones(64, 64, dtype=torch.bool).tril()  # and one tile is partial
    res = check(ConstantMask(keep), (_x(n),))
    site = res.report.sites[0]
    assert kinds(res.report) == ["blocksparse"], str(res.report)
    assert site.mask["blocks"] == {"empty": 2, "full": 6, "partial": 1, "tile": [64, 64],
                                   "layout": ["###", "#+.", "#.#"]}, site.mask
    assert res.call["block_sparse"] and res.call["mask"].shape == (n, n)


def test_constant_band_by_value():
    keep = torch.ones(40, 40, dtype=torch.bool).tril(2).triu(-3)  # a constant of static size
    res = check(ConstantMask(keep), (_x(40),))
    assert kinds(res.report) == ["window"] and res.report.sites[0].mask["window"] == [3, 2], str(res.report)
    assert res.call["mask"] is None and (res.call["window_left"], res.call["window_right"]) == (3, 2)


def test_constant_without_empty_tile_stays_dense():
    keep = torch.rand(70, 70, generator=torch.Generator().manual_seed(1)) > 0.3
    keep.fill_diagonal_(True)
    res = check(ConstantMask(keep), (_x(70),))
    assert kinds(res.report) == ["dense"], str(res.report)
    assert not res.call["block_sparse"] and torch.equal(res.call["mask"], keep)


def test_input_dependent_mask_stays_dense():
    """A mask computed from the input's values is not a structure: it reaches the op as it was."""
    def keep(x):  # queries whose features sum above 0 see every key, the others the first two
        return (x.sum(-1)[:, None, :, None] > 0) | (torch.arange(x.shape[1]) <= 1)

    res = check(Attention(mask=keep), (_x(),))
    assert kinds(res.report) == ["dense"], str(res.report)
    assert "dense:" in proof(res.report.sites[0]) and res.call["mask"].shape == (B, 1, T, T)


# --- spellings and negative twins -----------------------------------------------------------------

def _attend(q, k, v, keep=None, bias=None):
    s = q @ k.transpose(-2, -1) * 0.3
    s = s if bias is None else s + bias
    return (s if keep is None else s.masked_fill(~keep, float("-inf"))).softmax(-1) @ v


def _qkv(lq: int = T, lk: int = T):
    return torch.randn(B, 4, lq, 8), torch.randn(B, 4, lk, 8), torch.randn(B, 4, lk, 8)


_SPELLINGS = {
    "ones.tril": (lambda n: torch.ones(n, n, dtype=torch.bool).tril(), "causal", None),
    "triu(1) == 0": (lambda n: torch.ones(n, n).triu(1) == 0, "causal", None),
    "arange >=": (lambda n: torch.arange(n)[:, None] >= torch.arange(n), "causal", None),
    "tril(3) & triu(-2)": (lambda n: torch.ones(n, n, dtype=torch.bool).tril(3) & torch.ones(n, n).bool().triu(-2),
                           "window", [2, 3]),
    "~(kv > q) & ~(q - kv >= 4)": (lambda n: ~(torch.arange(n)[None] > torch.arange(n)[:, None])
                                   & torch.logical_not(torch.arange(n)[:, None] - torch.arange(n)[None] >= 4),
                                   "causal+window", [3, 0]),
    "where(|q-kv| < 3, 0, -inf)": (lambda n: torch.where((torch.arange(n)[:, None] - torch.arange(n)).abs() < 3,
                                                          0.0, float("-inf")), "window", [2, 2]),
}


@pytest.mark.parametrize("spelling", list(_SPELLINGS))
def test_band_spellings(spelling):
    build, kind, window = _SPELLINGS[spelling]

    def fn(q, k, v):
        m = build(q.shape[-2])
        return _attend(q, k, v, bias=m) if m.is_floating_point() else _attend(q, k, v, keep=m)

    res = check(fn, _qkv(), dynamic=None)
    assert kinds(res.report) == [kind] and res.report.sites[0].mask.get("window") == window, str(res.report)
    assert res.call["mask"] is None


def test_band_needs_equal_lengths():
    """The same arange comparison on a 13 x 17 cross attention is not folded into a band."""
    def fn(q, k, v):
        return _attend(q, k, v, keep=torch.arange(k.shape[-2])[None] <= torch.arange(q.shape[-2])[:, None])

    res = check(fn, _qkv(13, 17))
    assert kinds(res.report) == ["dense"] and "q_len == kv_len is not proven" in proof(res.report.sites[0])
    assert res.call["mask"].shape == (13, 17) and not res.call["causal"]


def test_band_without_diagonal_stays_dense():
    def fn(q, k, v):  # kv < q: the first row sees no key (NaN, as eager)
        n = q.shape[-2]
        return _attend(q, k, v, keep=torch.arange(n)[None] < torch.arange(n)[:, None])

    res = check(fn, _qkv(), grad=[])
    assert kinds(res.report) == ["dense"] and "excludes the diagonal" in proof(res.report.sites[0])


def test_analysis_api():
    """`analyze` returns the reduced match and a MaskInfo whose report is JSON-able."""
    import json

    captured = []

    def backend(gm, example_inputs):
        from attnfuse.passes import canonicalize, match

        canonicalize.canonicalize(gm)
        for m in match.match(gm)[0]:
            captured.append(masks.analyze(gm, m, example_inputs))
        return gm

    q, k, v = _qkv()
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[0, 9:] = False
    torch.compile(lambda q, k, v, p: _attend(q, k, v, keep=(torch.arange(T)[None] <= torch.arange(T)[:, None])
                                            & p[:, None, None, :]), backend=backend, fullgraph=True)(q, k, v, pad)
    (m, info), = captured
    assert info.kinds == ("causal", "padding") and info.causal and m.causal
    assert (info.window_left, info.window_right, info.alibi, info.block_sparse) == (-1, -1, None, False)
    (term,) = m.masks
    assert term.kind == "keep" and tuple(term.node.meta["example_value"].shape) == (B, 1, 1, T)
    assert json.loads(json.dumps(info.report()))["kind"] == "causal+padding"


@pytest.mark.parametrize("fill", [float("-inf"), MIN32], ids=["-inf", "finfo.min"])
def test_band_of_an_unproven_term(fill):
    """causal & (a condition on the input): the term stays; its band is folded only with a -inf fill, since
    with a finite fill a row the term masks entirely is uniform in eager but would be NaN with the band."""
    def fn(q, k, v):
        n = q.shape[-2]
        keep = (torch.arange(n)[None] <= torch.arange(n)[:, None]) & (q.sum(-1, keepdim=True) > -1)
        return _attend(q, k, v, bias=torch.where(keep, 0.0, fill))

    res = check(fn, _qkv())
    folded = fill == float("-inf")
    assert kinds(res.report) == ["causal+dense" if folded else "dense"], str(res.report)
    assert res.call["causal"] == folded and res.call["mask"].shape == (B, 4, T, T)
    assert "not folded" not in proof(res.report.sites[0]) if folded else "not folded" in proof(res.report.sites[0])


def test_hf_vmap_mask():
    """HF builds custom masks with torch.vmap; dynamo inlines it into _add_batch_dim / _remove_batch_dim."""
    from transformers.masking_utils import and_masks, causal_mask_function, sdpa_mask, sliding_window_overlay

    def fn(q, k, v, pad):
        keep = sdpa_mask(B, q.shape[2], k.shape[2], mask_function=and_masks(causal_mask_function,
                                                                           sliding_window_overlay(3)),
                         attention_mask=pad, allow_is_causal_skip=False, use_vmap=True)
        return _attend(q, k, v, keep=keep)

    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, 9:] = False
    res = check(fn, (*_qkv(), pad), spy=False)  # (vmap's nesting cannot be replayed under the spy's mode)
    assert kinds(res.report) == ["causal+window+padding"], str(res.report)
    assert res.report.sites[0].mask["window"] == [2, 0]


class _KeyPadded(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x, pad):
        return self.mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]


def test_multihead_attention_key_padding():
    """nn.MultiheadAttention's key_padding_mask is reported; `_mha.forward` applies it as given."""
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 9:] = True
    res = check(_KeyPadded(), (_x(), pad), spy=False)
    assert kinds(res.report) == ["padding"] and "key_padding_mask" in proof(res.report.sites[0])


def test_mask_written_in_place_stays_dense():
    """A tril whose entry is then set in place is not causal: a node written in place is never read."""
    def fn(q, k, v):
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        keep[0, 1] = True  # query 0 also sees key 1
        return _attend(q, k, v, keep=keep)

    res = check(fn, _qkv())
    assert kinds(res.report) == ["dense"] and not res.call["causal"], str(res.report)
    assert bool(res.call["mask"][0, 1])
