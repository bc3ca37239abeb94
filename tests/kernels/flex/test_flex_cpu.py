"""The flex family (`attnfuse.kernels.flex`) on the CPU: compiled FlexAttention forward (Inductor's C++ template),
the exact blocked path, and the BlockMask built from structure.

Every case is held to the 2x rule against eager attention written out (matmul, masked_fill / add, softmax,
matmul, in the inputs' dtype) with float64 as the reference, forward and backward (dq, dk, dv; a bias gradient
where asked), and to eager's NaN pattern exactly.  Odd sizes (L = 97, 200, head dims 40 / 64), GQA, fresh
random inputs.  Compiles cost ~5-10 s per configuration here, so each configuration has one shape.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import flex_attention as fa
from torch.overrides import TorchFunctionMode

from attnfuse.kernels import flex
from attnfuse.kernels.flex import _blockmask, _runtime
from tests._util import assert_2x, band

pytestmark = pytest.mark.skipif(flex.applies(device_type="cpu", dtype=torch.float32, head_dim=64, v_head_dim=64)
                                is not None, reason="no FlexAttention CPU kernel on this machine")
_INF = float("-inf")


def textbook(q, k, v, mask=None, doc=None, alibi=None, *, scale=None, causal=False, softcap=0.0, mask_fill=None,
             window_left=-1, window_right=-1):
    """Eager attention as a model writes it (materializes every score), in the inputs' dtype."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-2, -1)) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    lq, lk = s.shape[-2:]
    if alibi is not None:
        s = s + alibi.to(s.dtype)[:, None, None] * (torch.arange(lk)[None, :] - torch.arange(lq)[:, None]).to(s.dtype)
    if mask is not None:
        s = s.masked_fill(~mask, _INF if mask_fill is None else mask_fill) if mask.dtype == torch.bool else s + mask
    visible = band(lq, lk, window_left, window_right, causal)
    if doc is not None:
        same = doc[:, 0, :, None] == doc[:, 0, None, :]
        visible = (same & (visible | (doc[:, 1, None, :] != 0)))[:, None]
    s = s.masked_fill(~visible, _INF)
    return torch.softmax(s, -1) @ v


def qkv(dtype, b=2, h=4, hk=2, lq=97, lk=97, d=40, dv=None):
    return (torch.randn(b, h, lq, d).to(dtype), torch.randn(b, hk, lk, d).to(dtype),
            torch.randn(b, hk, lk, d if dv is None else dv).to(dtype))


def check(dtype, q, k, v, mask=None, doc=None, alibi=None, *, path="flex", mask_grad=False, **kw):
    """ours (the op's forward/backward) vs eager (dtype) vs float64, forward and backward; returns ours."""
    op_kw = dict(scale=None, causal=False, softcap=0.0, kv_groups=q.shape[1] // k.shape[1], mask_fill=None,
                 window_left=-1, window_right=-1, block_sparse=False)
    op_kw.update(kw)
    failed = _runtime.failed()
    out, stats = flex.forward(q, k, v, mask, doc, alibi, **op_kw)
    assert stats.shape == flex.stats_like(q).shape and stats.dtype == torch.float32
    assert _runtime.failed() == failed, "compiled FlexAttention failed (see the warning)"
    ran_blocked = bool(stats.isnan().all())
    assert ran_blocked == (path == "blocked"), f"expected the {path} path"
    assert out.transpose(1, 2).is_contiguous()  # the (B, Lq, H, Dv) layout of every attnfuse kernel
    grad = torch.randn(out.shape).to(dtype)
    dq, dk, dv, dm = flex.backward(grad, q, k, v, out, stats, mask, doc, alibi, mask_grad=mask_grad, **op_kw)
    float_mask = mask is not None and mask.dtype != torch.bool
    tb_kw = {key: op_kw[key] for key in ("scale", "causal", "softcap", "mask_fill", "window_left", "window_right")}
    res = {}
    for name, dt in (("eager", dtype), ("ref", torch.float64)):
        ins = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
        m = mask.detach().to(dt).requires_grad_(mask_grad) if float_mask else mask
        o = textbook(*ins, m, doc, alibi, **tb_kw)
        o.backward(grad.to(dt))
        res[name] = (o, *(x.grad for x in ins), m.grad if mask_grad else None)
    ours = (out, dq, dk, dv, dm)
    for i, name in enumerate(("out", "dq", "dk", "dv", "dmask")):
        if name == "dmask" and not mask_grad:
            assert dm is None
            continue
        assert ours[i].dtype == res["eager"][i].dtype, name
        assert torch.equal(ours[i].isnan(), res["eager"][i].isnan()), f"{name}: NaN pattern differs from eager's"
        assert_2x(ours[i], res["eager"][i], res["ref"][i], name)
    return out, stats


def docs(b, length, *, sorted_ids=True, n_seg=4, prefix=0, generator=None):
    seg = torch.randint(0, n_seg, (b, length), generator=generator)
    if sorted_ids:
        seg = seg.sort(-1).values
    pre = torch.zeros(b, length, dtype=torch.long)
    if prefix:  # the first `prefix` positions of each segment are prefix keys
        for row in range(b):
            for s in seg[row].unique():
                where = (seg[row] == s).nonzero().flatten()[:prefix]
                pre[row, where] = 1
    return torch.stack([seg, pre], 1)


CASES = {
    "dense_gqa": dict(),
    "window_gqa": dict(window_left=30, window_right=10, lk=60),  # rows 90.. see no key: NaN
    "softcap_alibi_causal": dict(causal=True, softcap=5.0, alibi=True),
    "docs_sorted_causal": dict(doc="sorted", causal=True),
    "prefix_lm": dict(doc="prefix_only", causal=True),  # compiled as docs_sorted_causal: same structure
    "docs_unsorted": dict(doc="unsorted"),
    "docs_prefix_causal_window": dict(doc="prefix", causal=True, window_left=40),
    "bias_heads": dict(mask="bias"),
    "bool_finite_fill": dict(mask="bool", mask_fill=-3.0, causal=True),
}


def _inputs(case, dtype):
    spec = dict(CASES[case])
    shape = dict(lq=200, lk=200, d=64) if "doc" in spec else {"lk": spec.pop("lk", 97)}
    q, k, v = qkv(dtype, **shape)
    b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    doc = mask = alibi = None
    kind = spec.pop("doc", None)
    if kind in ("sorted", "unsorted", "prefix"):
        doc = docs(b, lq, sorted_ids=kind != "unsorted", prefix=5 if kind == "prefix" else 0)
    elif kind == "prefix_only":
        doc = torch.stack([torch.zeros(b, lq, dtype=torch.long), (torch.arange(lq) < 37).long().expand(b, lq)], 1)
    if spec.pop("alibi", False):
        alibi = torch.rand(h) * 0.5
    kind = spec.pop("mask", None)
    if kind == "bias":
        mask = torch.randn(1, h, lq, lk).to(dtype)
    elif kind == "bool":
        mask = torch.rand(b, 1, lq, lk) > 0.3
        mask[0, :, 5] = False  # a row the fill decides
    return q, k, v, mask, doc, alibi, spec


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp32_matches_eager(case):
    q, k, v, mask, doc, alibi, kw = _inputs(case, torch.float32)
    check(torch.float32, q, k, v, mask, doc, alibi, **kw)


@pytest.mark.parametrize(("case", "dtype"), [("docs_prefix_causal_window", torch.float16),
                                             ("window_gqa", torch.bfloat16)])
def test_low_precision_matches_eager(case, dtype):
    q, k, v, mask, doc, alibi, kw = _inputs(case, dtype)
    check(dtype, q, k, v, mask, doc, alibi, **kw)


def test_bias_gradient():
    q, k, v, mask, doc, alibi, kw = _inputs("bias_heads", torch.float32)
    check(torch.float32, q, k, v, mask, doc, alibi, mask_grad=True, **kw)


@pytest.mark.parametrize("additive", [False, True])
def test_key_padding_rows_without_keys_are_nan(additive):
    """Left padding under causal: the first rows of batch 0 and every row of batch 1 see no key (NaN), with
    eager's gradients (masked_fill: dQ 0, NaN in dV; additive: NaN in dQ and dK too)."""
    q, k, v = qkv(torch.float32)
    keep = torch.ones(2, 1, 1, 97, dtype=torch.bool)
    keep[0, ..., :20] = False
    keep[1] = False
    mask = keep if not additive else torch.zeros(keep.shape).masked_fill(~keep, _INF)
    out, stats = check(torch.float32, q, k, v, mask, causal=True)
    assert out[0, :, :20].isnan().all() and not out[0, :, 20:].isnan().any() and out[1].isnan().all()
    assert torch.isneginf(stats[0, :, :20]).all()


def test_block_sparse_constant():
    """A constant bool mask with empty 128 x 128 tiles: they are skipped (cached classes), the rest exact."""
    q, k, v = qkv(torch.float32, lq=200, lk=200, d=64)
    mask = torch.rand(1, 1, 200, 200) > 0.5
    mask[..., :128, 128:] = False  # an empty tile
    mask[..., 128:, :128] = True  # a full tile
    check(torch.float32, q, k, v, mask, block_sparse=True)
    kw = dict(mask=mask, mask_hides=True, doc=None, left=-1, right=-1, block_sparse=True, device=q.device)
    cls = _blockmask.classes(200, 200, **kw)
    assert cls[0, 0].tolist() == [[_blockmask.PARTIAL, _blockmask.EMPTY], [_blockmask.PARTIAL, _blockmask.PARTIAL]]
    assert _blockmask.classes(300, 300, **{**kw, "mask": torch.ones(1, 1, 300, 300, dtype=torch.bool)})[
        0, 0, 0, 0] == _blockmask.FULL
    assert torch.equal(cls, _blockmask.classes(200, 200, **kw))  # cached
    mask[..., 0, 150] = True  # an in-place update re-classifies
    assert _blockmask.classes(200, 200, **kw)[0, 0, 0, 1] == _blockmask.PARTIAL


@pytest.mark.parametrize("bad", ["nan_k_beyond_diagonal", "inf_v", "inf_bias"])
def test_non_finite_inputs_take_the_blocked_path(bad):
    """FlexAttention skips blocks and masks by -inf; eager propagates NaN/Inf (0 * inf, NaN scores): the blocked
    path reproduces eager's NaN pattern, forward and backward."""
    q, k, v = qkv(torch.float32)
    mask = None
    if bad == "nan_k_beyond_diagonal":
        k[0, 1, 60, 3] = float("nan")
    elif bad == "inf_v":
        v[1, 0, 30, 7] = float("inf")
    else:
        mask = torch.zeros(1, 1, 97, 97)
        mask[..., 20, 10] = float("inf")  # a visible key: its row is NaN
    out, _ = check(torch.float32, q, k, v, mask, path="blocked", causal=True, window_left=50)
    assert out.isnan().any()


def test_standalone_attention_autograd():
    q, k, v = qkv(torch.float32, lq=200, lk=200, d=64)
    doc = docs(2, 200, prefix=5)
    keep = torch.rand(2, 200) > 0.1
    ins = [x.clone().requires_grad_() for x in (q, k, v)]
    out = flex.attention(*ins, causal=True, window_size=(40, -1), segments=doc[:, 0], prefix=doc[:, 1].bool(),
                         key_padding=keep)
    out.backward(torch.ones_like(out))
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    ref = textbook(*ref_in, keep[:, None, None, :], doc, causal=True, window_left=40)
    ref.backward(torch.ones_like(ref))
    for ours, theirs in zip((out, *(x.grad for x in ins)), (ref, *(x.grad for x in ref_in))):
        assert torch.equal(ours.isnan(), theirs.isnan())
        torch.testing.assert_close(ours.double(), theirs, atol=2e-5, rtol=1e-4, equal_nan=True)


def test_standalone_attention_rejects_bad_arguments():
    q, k, v = qkv(torch.float32)
    with pytest.raises(ValueError, match="attnfuse.kernels.flex.attention: segments"):
        flex.attention(q, k, v, segments=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="window_size"):
        flex.attention(q, k, v, window_size=(-2, 0))
    with pytest.raises(ValueError, match="float64"):
        flex.attention(q.double(), k.double(), v.double())


def test_applies():
    ok = dict(device_type="cpu", dtype=torch.float16, head_dim=64, v_head_dim=40, dropout_p=0.0, sinks=False,
              window_pad=False, q_len=10, kv_len=10, doc=True)
    assert flex.applies(**ok) is None
    for change, word in ((dict(dropout_p=0.1), "dropout"), (dict(sinks=True), "sinks"),
                         (dict(window_pad=True), "window_pad"), (dict(head_dim=8), "head dims"),
                         (dict(kv_len=11), "q_len == kv_len"), (dict(dtype=torch.float64), "float64"),
                         (dict(device_type="mps"), "mps")):
        why = flex.applies(**{**ok, **change})
        assert why is not None and word in why


# ---- the BlockMask: built from structure, never from Lq x Lk ----


class _LargestResult(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _exact(doc, causal, q_len):
    """The classes create_block_mask finds by evaluating every (q, kv) pair (the test's dense oracle)."""
    def mask_mod(b, h, qi, ki):
        keep = doc[b, 0, qi] == doc[b, 0, ki]
        return keep & (qi >= ki) if causal else keep

    bm = fa.create_block_mask(mask_mod, doc.shape[0], 1, q_len, q_len, device="cpu", BLOCK_SIZE=_blockmask.BLOCK)
    return bm


@pytest.mark.parametrize("causal", [False, True])
def test_doc_block_mask_is_exact_for_sorted_segments(causal):
    lengths = [[3, 130, 200, 1, 250, 416], [700, 100, 200]]  # 1000 positions: short, long, ragged segments
    seg = torch.stack([torch.repeat_interleave(torch.arange(len(x)), torch.tensor(x)) for x in lengths])
    doc = torch.stack([seg, torch.zeros_like(seg)], 1)
    cls = _blockmask.classes(1000, 1000, mask=None, mask_hides=True, doc=doc, left=-1, right=0 if causal else -1,
                             block_sparse=False, device=seg.device)
    ours = _blockmask.block_mask(cls, 1000, 1000, None)
    exact = _exact(doc, causal, 1000)
    assert torch.equal(ours.kv_num_blocks, exact.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, exact.full_kv_num_blocks)
    assert torch.equal(ours.to_dense(), exact.to_dense())
    total = cls.shape[-1] * cls.shape[-2]
    assert (ours.kv_num_blocks + ours.full_kv_num_blocks).sum(-1).lt(total).all()  # empty blocks are skipped


def test_doc_block_mask_is_conservative_for_unsorted_segments():
    doc = docs(2, 1000, sorted_ids=False, n_seg=3)
    doc[1, 0, :300] = 7  # a run: some pairs are provably empty / full
    cls = _blockmask.classes(1000, 1000, mask=None, mask_hides=True, doc=doc, left=-1, right=0, block_sparse=False,
                             device=doc.device)
    exact = _exact(doc, True, 1000)
    live = exact.to_dense().bool()[:, 0]
    full = fa.BlockMask.from_kv_blocks(exact.full_kv_num_blocks, exact.full_kv_indices).to_dense().bool()[:, 0]
    ours_live, ours_full = (cls != _blockmask.EMPTY)[:, 0], (cls == _blockmask.FULL)[:, 0]
    assert (ours_live >= live).all()  # never wrongly empty
    assert (ours_full <= full).all()  # never wrongly full
    assert not ours_live.all() and ours_full.any()  # yet it skips blocks and finds full ones


def test_doc_block_mask_never_builds_lq_by_lk():
    n = 4096
    doc = docs(2, n, prefix=3)
    with _LargestResult() as spy:
        cls = _blockmask.classes(n, n, mask=torch.ones(2, 1, 1, n, dtype=torch.bool), mask_hides=True, doc=doc,
                                 left=100, right=0, block_sparse=False, device=doc.device)
        _blockmask.block_mask(cls, n, n, None)
    assert 0 < spy.largest <= 4 * n, spy.largest  # O(B * N) and O(B * (N / 128)^2), never N^2 = 16.8M
