"""The ``tpa`` family's Triton kernels (`attnfuse.kernels.tpa._triton`), run by Triton's interpreter.

Forward and backward (the gradients of every factor and plain side) against the float64 textbook over the formed
tensors (`attnfuse.kernels.tpa.reference`) with the 2x rule, eager being the same textbook in the test dtype;
float16 and float32, head dim 32, odd lengths, 16x16 and 16x32 tiles so that each case is a handful of programs
whose bands and ragged tails cross tile edges.  Cases: causal, window, key padding (bool with -inf and finfo.min
fills), an additive key bias, softcap, GQA, q plain and factorized, K only or K/V factorized, ranks 1, 2, 5 and 16,
q_len != kv_len, decode (one query row), rows that see no key (NaN rows, or 0 with ``sdpa_form``, and eager's
NaN pattern in every gradient), and a poisoned key range the band's skipped tiles must never read.
"""

from __future__ import annotations

import pytest
import torch

from attnfuse.costmodel.tiles import TileConfig
from attnfuse.device import PRESETS
from attnfuse.kernels import tpa
from attnfuse.kernels.tpa import Factors
from attnfuse.kernels.tpa import _triton as tpa_triton
from tests._util import assert_2x
from tests.kernels._helpers import seed_case

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

T16 = TileConfig(16, 16, 4, 2)
T16x32 = TileConfig(16, 32, 4, 2)
D = 32
DTYPES = [torch.float32, torch.float16]


def _side(b: int, length: int, heads: int, rank: int, dtype=torch.float32):
    """Factors of rank ``rank`` (scale 1 / rank, as T6), or a plain (B, H, L, D) tensor for rank 0."""
    if rank == 0:
        return torch.randn(b, heads, length, D, dtype=dtype)
    return Factors(torch.randn(b, length, heads, rank, dtype=dtype), torch.randn(b, length, rank, D, dtype=dtype),
                   1.0 / rank)


def _leaves(side, dtype):
    if isinstance(side, Factors):
        return Factors(side.a.detach().to(dtype).requires_grad_(), side.b.detach().to(dtype).requires_grad_(),
                       side.scale)
    return side.detach().to(dtype).requires_grad_()


def _tensors(side):
    return [side.a, side.b] if isinstance(side, Factors) else [side]


def _run(fn, sides, mask, grad, kw):
    out = fn(*sides, mask, **kw)
    leaves = [t for s in sides for t in _tensors(s)]
    return out.detach(), list(torch.autograd.grad(out, leaves, grad))


def _key_mask(kind: str, bsz: int, lk: int, dtype):
    """(key mask, mask_fill) of a kind: none, bool (-inf fill), finfo (finfo.min fill), bias, dead (the last batch
    row sees no key: bool, -inf fill), dead_bias (the same with an additive -inf bias), prefix_bias (-inf bias on
    the last batch row's first 10 keys: under causal its first 10 rows see no key)."""
    if kind == "none":
        return None, None
    keep = torch.rand(bsz, 1, 1, lk) > 0.3
    keep[..., 0] = True
    if kind == "dead":
        keep[-1] = False
        return keep, None
    if kind in ("dead_bias", "prefix_bias"):
        keep[-1, ..., :10 if kind == "prefix_bias" else lk] = False
        keep[-1, ..., 10:11] = kind == "prefix_bias"  # row 10 on sees a key
    if kind in ("bias", "dead_bias", "prefix_bias"):  # some keys at -inf, the rest a finite bias
        return (0.5 * torch.randn(bsz, 1, 1, lk)).masked_fill(~keep, float("-inf")).to(dtype), None
    return keep, (torch.finfo(dtype).min if kind == "finfo" else None)


def compare(dtype, q, k, v, mask_kind="none", *, config=(T16, T16), splits=None, **kw):
    """Ours vs eager vs float64 textbook: the output and every gradient, each with eager's NaN pattern and the 2x
    rule on the finite entries; returns (our output, our gradients, eager's gradients).  ``config``/``splits``:
    ours only."""
    bsz, lq = (q.a.shape[0], q.a.shape[1]) if isinstance(q, Factors) else (q.shape[0], q.shape[2])
    lk = k.a.shape[1] if isinstance(k, Factors) else k.shape[2]
    heads = q.a.shape[2] if isinstance(q, Factors) else q.shape[1]
    mask, fill = _key_mask(mask_kind, bsz, lk, dtype)
    kw = dict(kw, mask_fill=fill)
    kw.setdefault("scale", D ** -0.5)
    grad = torch.randn(bsz, heads, lq, D)
    res = {}
    for name, fn, dt, fkw in (("ref", tpa.reference, torch.float64, kw), ("eager", tpa.reference, dtype, kw),
                              ("ours", tpa_triton.attention, dtype, dict(kw, config=config, splits=splits))):
        sides = [_leaves(s, dt) for s in (q, k, v)]
        m = None if mask is None or mask.dtype == torch.bool else mask.to(dt)
        res[name] = _run(fn, sides, mask if m is None else m, grad.to(dt), fkw)
    (o_ref, g_ref), (o_eager, g_eager), (o_ours, g_ours) = res["ref"], res["eager"], res["ours"]
    assert o_ours.dtype == dtype
    assert torch.equal(o_ours.isnan(), o_eager.isnan()), "output NaN pattern differs from eager's"
    assert_2x(o_ours, o_eager, o_ref.to(dtype), "out")
    names = [f"{s}.{t}" for s, x in zip("qkv", (q, k, v)) for t in (("a", "b") if isinstance(x, Factors) else ("",))]
    for name, ours, eager, ref in zip(names, g_ours, g_eager, g_ref):
        assert ours.dtype == dtype and ours.shape == ref.shape, name
        assert torch.equal(ours.isnan(), eager.isnan()), f"d{name}: NaN pattern differs from eager's"
        assert_2x(ours, eager, ref.to(dtype), f"d{name}")
    return o_ours, g_ours, g_eager


# name: (B, H, Hkv, Lq, Lk, rank q (0: plain), rank k, rank v (0: plain), mask kind, kwargs, (fwd, bwd) tiles)
CASES = {
    "causal": (2, 2, 2, 37, 37, 0, 2, 2, "none", dict(causal=True), (T16, T16)),
    "window": (1, 2, 2, 45, 45, 6, 1, 1, "none", dict(window_left=7, window_right=3), (T16, T16)),
    "causal_window_16x32": (1, 2, 2, 45, 45, 2, 2, 2, "none", dict(causal=True, window_left=19), (T16x32, T16x32)),
    "pad_bool": (2, 2, 2, 37, 45, 0, 2, 2, "bool", {}, (T16, T16x32)),
    "pad_finfo": (2, 2, 2, 37, 45, 2, 2, 2, "finfo", dict(causal=True), (T16, T16)),
    "bias": (2, 2, 2, 37, 45, 0, 1, 1, "bias", {}, (T16x32, T16)),
    "softcap": (1, 2, 2, 37, 37, 2, 2, 2, "none", dict(causal=True, softcap=2.0, scale=0.5), (T16, T16)),
    "gqa2": (1, 4, 2, 37, 45, 5, 2, 2, "bool", dict(causal=True, kv_groups=2), (T16, T16)),
    "rank5": (1, 2, 2, 37, 37, 5, 5, 5, "none", {}, (T16, T16)),
    "rank16_q": (1, 2, 1, 37, 37, 16, 1, 1, "none", dict(kv_groups=2, causal=True), (T16, T16)),
    "k_only": (1, 2, 2, 37, 45, 0, 2, 0, "none", dict(window_left=4, window_right=9), (T16, T16)),
    "lq17_lk45": (1, 2, 2, 17, 45, 1, 2, 2, "none", dict(window_right=20), (T16, T16)),
    "lq45_lk17_causal": (1, 2, 2, 45, 17, 0, 1, 1, "none", dict(causal=True), (T16, T16)),
    "decode": (2, 4, 2, 1, 45, 2, 2, 2, "bool", dict(kv_groups=2), (T16, T16x32)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward(name, dtype):
    b, h, hk, lq, lk, rq, rk, rv, mask_kind, kw, cfg = CASES[name]
    seed_case("tpa", name, dtype)
    compare(dtype, _side(b, lq, h, rq), _side(b, lk, hk, rk), _side(b, lk, hk, rv), mask_kind, config=cfg, **kw)


# kind: (Lq, Lk, H, Hkv, key mask kind, kwargs, dead (B, Lq) rows, NaN expected in dQ/dK)
DEAD = {
    "mask": (37, 45, 2, 2, "dead", {}, lambda i: (torch.arange(2)[:, None] == 1) & (i >= 0), False),
    "bias": (37, 45, 4, 2, "dead_bias", dict(causal=True, kv_groups=2),
             lambda i: (torch.arange(2)[:, None] == 1) & (i >= 0), True),
    "prefix_bias": (37, 45, 2, 1, "prefix_bias", dict(causal=True, kv_groups=2),
                    lambda i: (torch.arange(2)[:, None] == 1) & (i < 10), True),
    "band": (45, 17, 2, 2, "none", dict(window_left=2, causal=True), lambda i: (i >= 17 + 2).expand(2, -1), False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sdpa_form", [False, True])
@pytest.mark.parametrize("kind", list(DEAD))
def test_rows_without_keys(kind, sdpa_form, dtype):
    """Rows that see no key: a fully padded batch row (bool mask with -inf fill; an additive -inf bias, under
    causal so that the last keys stay in no dead row's band), a -inf bias on the first keys (under causal only the
    first rows die), rows past the band's reach (q_len > kv_len + left: whole programs visit no tile).  NaN rows as
    eager (0 with ``sdpa_form``); every gradient has eager's NaN pattern (`compare`): without ``sdpa_form`` NaN in
    all of dV of the dead rows' K/V heads, and NaN in dQ/dK only where a -inf bias removed a key; with
    ``sdpa_form`` (SDPA's safe softmax) no gradient at all from those rows."""
    lq, lk, h, hk, mask_kind, kw, dead_fn, bias_nan = DEAD[kind]
    seed_case("tpa-dead", kind, sdpa_form, dtype)
    q, k, v = _side(2, lq, h, 2), _side(2, lk, hk, 2), _side(2, lk, hk, 1)
    out, grads, eager = compare(dtype, q, k, v, mask_kind, sdpa_form=sdpa_form, **kw)
    dead = dead_fn(torch.arange(lq))[:, None, :].expand(2, h, lq)
    if sdpa_form:
        assert not out.isnan().any() and (out[dead] == 0).all()
    else:
        assert torch.equal(out.isnan().all(-1), dead) and not out.isnan().any(-1)[~dead].any()
    # the checks above can fail: eager's gradients have NaN exactly where this case says
    nan_qk = bias_nan and not sdpa_form
    assert eager[0].isnan().any() == nan_qk and eager[2].isnan().any() == nan_qk  # dq (q.a), dk (k.a)
    assert eager[4].isnan().any() == (not sdpa_form)  # dv (v.a)
    for b in range(2):  # without sdpa_form, all of dV of the dead rows' K/V heads: every key, every rank
        assert grads[4][b].isnan().all() if dead[b].any() and not sdpa_form else not grads[4][b].isnan().any()
    if nan_qk and kind != "prefix_bias":  # causal: the keys past the last row are in no dead row's band
        assert not grads[2][1, lq:].isnan().any() and grads[2][1, :lq].isnan().all()
    if kind in ("band", "prefix_bias"):  # `dead_rows`: the random part of the mask does not matter here
        mask = None if mask_kind == "none" else _key_mask(mask_kind, 2, lk, dtype)[0]
        _, stats = tpa_triton.forward(q, k, v, mask, scale=D ** -0.5, causal=True, softcap=0.0,
                                      window_left=kw.get("window_left", -1), window_right=-1, kv_groups=h // hk,
                                      mask_fill=None, sdpa_form=sdpa_form, config=(T16, T16))
        assert torch.equal(tpa_triton.dead_rows(stats), dead)


def _poisoned(side: Factors, keys: slice) -> Factors:
    a, b = side.a.clone(), side.b.clone()
    a[:, keys] = float("nan")
    b[:, keys] = float("nan")
    return Factors(a, b, side.scale)


@pytest.mark.parametrize("left,right", [(5, 5), (20, 0)])
def test_tiles_outside_the_band_are_never_read(left, right):
    """NaN in the K and V factors of keys 66..73 (inside the 16-key tile 64..79) reaches no output row, dQ or
    dK/dV factor row whose programs' bands stay clear of that tile: the kernels skip it instead of masking it.
    Those parts are bitwise the unpoisoned run."""
    seed_case("tpa-poison", left, right)
    lq = lk = 97
    q, k, v = _side(1, lq, 2, 3), _side(1, lk, 2, 2), _side(1, lk, 2, 2)
    g = torch.randn(1, 2, lq, D)
    runs = []
    for kk, vv in ((k, v), (_poisoned(k, slice(66, 74)), _poisoned(v, slice(66, 74)))):
        sides = [_leaves(s, torch.float32) for s in (q, kk, vv)]
        runs.append(_run(tpa_triton.attention, sides, None, g, dict(scale=D ** -0.5, window_left=left,
                                                                      window_right=right, config=(T16, T16))))
    (out, grads), (out_p, grads_p) = runs
    clean_rows = (64 - right - 1) // 16 * 16  # query tiles whose bands end before key 64
    clean_keys = (48 - left - 1) // 16 * 16  # key tiles whose query tiles all end before the poisoned rows
    assert clean_rows >= 32 and clean_keys >= 16
    assert torch.isfinite(out_p[:, :, :clean_rows]).all()
    assert torch.equal(out[:, :, :clean_rows], out_p[:, :, :clean_rows])
    assert out_p[:, :, 64:80].isnan().any()  # the poison is live where the band reaches it
    for i, (a, b) in enumerate(zip(grads, grads_p)):
        stop = clean_rows if i < 2 else clean_keys  # q's factors by query row, k/v's by key
        assert torch.isfinite(b[:, :stop]).all(), i
        assert torch.equal(a[:, :stop], b[:, :stop]), i


def test_runs():
    """Which calls the kernels take (interpreter on: CPU tensors run them)."""
    q, k, v = _side(1, 8, 2, 2), _side(1, 8, 2, 1), _side(1, 8, 2, 0)
    assert tpa_triton.runs(q, k, v)
    assert tpa_triton.runs(q.a.new_zeros(1, 2, 8, D), k, v)
    assert not tpa_triton.runs(q, Factors(k.a.double(), k.b.double(), 1.0), v)  # float64
    assert not tpa_triton.runs(q, Factors(k.a.half(), k.b, 1.0), v)  # mixed dtypes
    assert not tpa_triton.runs(_side(1, 8, 2, 17), k, v)  # rank over MAX_RANK
    assert not tpa_triton.runs(q, _side(1, 0, 2, 1), _side(1, 0, 2, 1))  # empty


def test_dispatch_uses_the_kernels():
    """`tpa.attention` on CPU tensors under the interpreter runs these kernels (bitwise the direct call)."""
    seed_case("tpa-dispatch")
    q, k, v = _side(1, 21, 2, 2), _side(1, 21, 2, 2), _side(1, 21, 2, 2)
    kw = dict(scale=0.3, causal=True)
    direct = tpa_triton.attention(q, k, v, None, **kw)
    assert torch.equal(tpa.attention(q, k, v, None, **kw), direct)


# name: (Lq, rank q (0: plain), H, Hkv, splits, mask kind, kwargs)
SPLIT_CASES = {
    "lq1_s2": (1, 2, 4, 2, 2, "bool", dict(kv_groups=2)),
    "lq1_s4_bias_softcap": (1, 0, 2, 2, 4, "bias", dict(softcap=3.0, scale=0.4)),
    "lq3_s3_window": (3, 2, 2, 1, 3, "finfo", dict(kv_groups=2, window_left=2, window_right=70)),
    "lq3_s4_dead": (3, 0, 2, 2, 4, "dead_bias", {}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_split_k_decode(name, dtype, monkeypatch):
    """Split-K decode: 1 or 3 query rows against 97 keys (16-key tiles: 7 tiles, ragged) in 2-4 key splits, each
    split forming its K/V tiles from the factors, merged by flash's combine; forward and backward (the backward
    runs the unsplit kernels on the merged statistics), eager's NaN pattern, 2x rule.  The split launch must
    happen (a spy on the combine); its statistics are the unsplit launch's."""
    lq, rq, h, hk, splits, mask_kind, kw = SPLIT_CASES[name]
    seed_case("tpa-split", name, dtype)
    q, k, v = _side(2, lq, h, rq), _side(2, 97, hk, 2), _side(2, 97, hk, 3)
    combines = []
    real = tpa_triton.combine_kernel

    class Spy:
        def __getitem__(self, grid):
            combines.append(grid)
            return real[grid]

    monkeypatch.setattr(tpa_triton, "combine_kernel", Spy())
    monkeypatch.setattr(tpa_triton, "launch", lambda kernel: kernel)
    for sdpa_form in (False, True) if mask_kind == "dead_bias" else (False,):
        out, _, _ = compare(dtype, q, k, v, mask_kind, config=(T16, T16), splits=splits, sdpa_form=sdpa_form, **kw)
        assert len(combines) == 1, combines
        combines.clear()
        if mask_kind == "dead_bias":
            assert out[1].isnan().all() != sdpa_form and not out[0].isnan().any()
    mask, fill = _key_mask("bool", 2, 97, dtype)
    args = dict(scale=0.3, causal=False, softcap=0.0, window_left=-1, window_right=-1, kv_groups=h // hk,
                mask_fill=fill, sdpa_form=False, config=(T16, T16))
    sides = [_leaves(s, dtype) for s in (q, k, v)]
    (o1, s1), (o2, s2) = (tpa_triton.forward(*sides, mask, splits=n, **args) for n in (1, splits))
    torch.testing.assert_close(o2, o1, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(s2, s1, rtol=1e-5, atol=1e-5)


def test_split_choice(monkeypatch):
    """`num_key_splits`: decode-sized query sides split long keys (never more splits than key tiles, each split
    a whole number of tiles that together cover every key; on an H100 flash's rule: two programs want 66 splits,
    97 keys allow 3 of two tiles each), long query sides do not; a bad ``splits`` raises."""
    q, k, v = _side(1, 1, 2, 2), _side(1, 97, 2, 2), _side(1, 97, 2, 2)
    kw = dict(scale=1.0, causal=False, softcap=0.0, window_left=-1, window_right=-1, kv_groups=1, mask_fill=None,
              sdpa_form=False)
    run = tpa_triton._Launch(q, k, v, None, config=(T16, T16), **kw)
    for want in (2, 3, 4, 7):
        n, length = tpa_triton.num_key_splits(run, T16, want)
        assert n == want and length % 16 == 0 and n * length >= 97 and (n - 1) * length < 97
    assert tpa_triton.num_key_splits(run, T16, 50)[0] == 7
    monkeypatch.setattr(tpa_triton, "spec_for", lambda t: PRESETS["h100"])
    assert tpa_triton.num_key_splits(run, T16, None) == (3, 48)
    long_q = tpa_triton._Launch(_side(1, 64, 2, 2), k, v, None, config=(T16, T16), **kw)
    assert tpa_triton.num_key_splits(long_q, T16, None)[0] == 1
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="attnfuse tpa.*splits"):
            tpa_triton.num_key_splits(run, T16, bad)
