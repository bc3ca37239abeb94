"""The ``tpa`` family's Triton kernels (`attnfuse.kernels.tpa._triton`), run by Triton's interpreter.

Forward and backward (the gradients of every factor and plain side) against the float64 textbook over the formed
tensors (`attnfuse.kernels.tpa.reference`) with the 2x rule, eager being the same textbook in the test dtype;
float16 and float32, head dim 32, odd lengths, 16x16 and 16x32 tiles so that each case is a handful of programs
whose bands and ragged tails cross tile edges.  Cases: causal, window, key padding (bool with -inf and finfo.min
fills), an additive key bias, softcap, GQA, q plain and factorized, K only or K/V factorized, ranks 1, 2, 5 and 16,
q_len != kv_len, decode (one query row), rows that see no key (NaN rows, or 0 with ``sdpa_form``), and a
poisoned key range the band's skipped tiles must never read.
"""

from __future__ import annotations

import pytest
import torch

from attnfuse.costmodel.tiles import TileConfig
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
    """(key mask, mask_fill) of a kind: none, bool (-inf fill), finfo (finfo.min fill), bias, dead (batch row 1
    sees no key)."""
    if kind == "none":
        return None, None
    keep = torch.rand(bsz, 1, 1, lk) > 0.3
    keep[..., 0] = True
    if kind == "dead":
        keep[-1] = False
        return keep, None
    if kind == "bias":  # some keys at -inf, the rest a finite bias
        return (0.5 * torch.randn(bsz, 1, 1, lk)).masked_fill(~keep, float("-inf")).to(dtype), None
    return keep, (torch.finfo(dtype).min if kind == "finfo" else None)


def compare(dtype, q, k, v, mask_kind="none", *, config=(T16, T16), dead_ok=False, **kw):
    """Ours vs eager vs float64 textbook: the output (with eager's NaN pattern) and every gradient (2x rule).
    ``dead_ok``: rows that see no key exist; the gradients are then held to the ``sdpa_form`` textbook (dead rows
    contribute nothing, `attnfuse.kernels.tpa._triton`), and ours must be finite."""
    bsz, lq = (q.a.shape[0], q.a.shape[1]) if isinstance(q, Factors) else (q.shape[0], q.shape[2])
    lk = k.a.shape[1] if isinstance(k, Factors) else k.shape[2]
    heads = q.a.shape[2] if isinstance(q, Factors) else q.shape[1]
    mask, fill = _key_mask(mask_kind, bsz, lk, dtype)
    kw = dict(kw, mask_fill=fill)
    kw.setdefault("scale", D ** -0.5)
    grad = torch.randn(bsz, heads, lq, D)
    grad_kw = dict(kw, sdpa_form=True) if dead_ok else kw
    res = {}
    for name, fn, dt, fkw in (("ref", tpa.reference, torch.float64, kw), ("eager", tpa.reference, dtype, kw),
                              ("gref", tpa.reference, torch.float64, grad_kw),
                              ("geager", tpa.reference, dtype, grad_kw),
                              ("ours", tpa_triton.attention, dtype, dict(kw, config=config))):
        sides = [_leaves(s, dt) for s in (q, k, v)]
        m = None if mask is None or mask.dtype == torch.bool else mask.to(dt)
        res[name] = _run(fn, sides, mask if m is None else m, grad.to(dt), fkw)
    (o_ref, _), (o_eager, _), (o_ours, g_ours) = res["ref"], res["eager"], res["ours"]
    assert o_ours.dtype == dtype
    assert torch.equal(o_ours.isnan(), o_eager.isnan()), "output NaN pattern differs from eager's"
    assert_2x(o_ours, o_eager, o_ref.to(dtype), "out")
    names = [f"{s}.{t}" for s, x in zip("qkv", (q, k, v)) for t in (("a", "b") if isinstance(x, Factors) else ("",))]
    for name, ours, eager, ref in zip(names, g_ours, res["geager"][1], res["gref"][1]):
        assert ours.dtype == dtype and ours.shape == ref.shape, name
        if dead_ok:
            assert torch.isfinite(ours).all(), f"d{name}: a dead row reached the gradients"
        assert_2x(ours, eager, ref.to(dtype), f"d{name}")
    return o_ours


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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sdpa_form", [False, True])
@pytest.mark.parametrize("kind", ["mask", "band"])
def test_rows_without_keys(kind, sdpa_form, dtype):
    """A fully padded batch row (mask), or rows past the band's reach (q_len > kv_len + left: whole programs
    visit no tile): NaN rows as eager (0 with ``sdpa_form``); they add nothing to the gradients."""
    seed_case("tpa-dead", kind, sdpa_form, dtype)
    lq, lk, kw = (37, 45, {}) if kind == "mask" else (45, 17, dict(window_left=2, causal=True))
    q, k, v = _side(2, lq, 2, 2), _side(2, lk, 2, 2), _side(2, lk, 2, 2)
    out = compare(dtype, q, k, v, "dead" if kind == "mask" else "none", dead_ok=True, sdpa_form=sdpa_form, **kw)
    dead = torch.zeros(2, 2, lq, dtype=torch.bool)
    if kind == "mask":
        dead[1] = True
    else:
        dead[:, :, lk + 2:] = True
    if sdpa_form:
        assert not out.isnan().any() and (out[dead] == 0).all()
    else:
        assert torch.equal(out.isnan().all(-1), dead) and not out.isnan().any(-1)[~dead].any()
    _, stats = tpa_triton.forward(q, k, v, None if kind == "band" else _key_mask("dead", 2, lk, dtype)[0],
                                  scale=D ** -0.5, causal=kind == "band", softcap=0.0,
                                  window_left=kw.get("window_left", -1), window_right=-1, kv_groups=1,
                                  mask_fill=None, sdpa_form=sdpa_form, config=(T16, T16))
    if kind == "band":  # the mask above was random: only the band's dead rows are known exactly
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
