"""The soundness rules (docs/architecture.md, "Soundness"): in-place writes survive the rewrite, ops are
read as PyTorch defines them, consumers get eager's layout, K/V heads line up or the site is skipped,
rows that see no key equal eager's (value, NaN pattern, gradient), and one compile call has one report.

Each case runs eager and attnfuse on copies of fresh random inputs and compares outputs, gradients
and every mutated input against eager (not float64: rows with no visible key saturate differently
in float64, and eager is what the user's model computes there)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import attnfuse

B, H, L, D = 2, 3, 13, 8


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def run(fn, args, *, grad=(), dynamic=False, calls=1):
    """Eager vs attnfuse (inner eager) on copies of ``args``: outputs, mutated inputs and the gradients of
    the positions in ``grad`` must match.  Returns the report of the last call."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="attnfuse", options={"inner": "eager"}, dynamic=dynamic)
    for _ in range(calls):
        mine = [a.clone().requires_grad_(i in grad) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
        theirs = [a.clone().requires_grad_(i in grad) if isinstance(a, torch.Tensor) else a
                  for i, a in enumerate(args)]
        expect, got = fn(*theirs), compiled(*mine)
        torch.testing.assert_close(got, expect, equal_nan=True, rtol=2e-5, atol=2e-6)
        assert got.stride() == expect.stride(), (got.stride(), expect.stride())
        for a, b in zip(mine, theirs):
            if isinstance(a, torch.Tensor) and not a.requires_grad:
                torch.testing.assert_close(a, b, equal_nan=True)
        if grad:
            g = torch.randn_like(expect)
            (expect * g).sum().backward()
            (got * g).sum().backward()
            for i in grad:
                torch.testing.assert_close(mine[i].grad, theirs[i].grad, equal_nan=True, rtol=2e-5, atol=2e-5)
        args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    return attnfuse.last_report()


def status(report) -> str:
    assert len(report.sites) == 1, str(report)
    return report.sites[0].status


def attend(s, v):
    return torch.softmax(s, -1) @ v


# --------------------------------------------------------------------------- 1. in-place writes


def test_inplace_scale_and_cache_write_survive():
    def fn(q, k, v, cache, idx):
        q = q.clone()
        q.mul_(0.5)
        cache.index_copy_(2, idx, k)
        return attend(q @ cache.mT, v)

    report = run(fn, (rnd(B, H, L, D), rnd(B, H, 2, D), rnd(B, H, 17, D), rnd(B, H, 17, D), torch.tensor([3, 11])))
    assert status(report) == "fused"
    assert report.sites[0].scale == 1.0  # the mul_ is not folded into a scale: q is read after it


def test_unrelated_inplace_code_in_the_same_graph():
    def fn(q, k, v, buf, x):
        buf.add_(1.0)
        x[0] = 3.0
        out = attend(q @ k.mT / 3, v)
        x.mul_(2)
        return out + buf.sum()

    report = run(fn, (rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D), rnd(5), rnd(4, 3)))
    assert status(report) == "fused"


def test_keys_built_in_place_like_mla():
    # DeepSeek-V3: keys = new_empty, then the no-rope and rope parts written by slice assignment;
    # q/k head dim 12 differs from v's 8
    def fn(q, k_nope, k_rope, v):
        k = k_nope.new_empty(B, H, L, 12)
        k[..., :8] = k_nope
        k[..., 8:] = k_rope
        return attend(q @ k.transpose(-2, -1) * 12 ** -0.5, v)

    report = run(fn, (rnd(B, H, L, 12), rnd(B, H, L, 8), rnd(B, 1, L, 4).expand(B, H, L, 4), rnd(B, H, L, D)),
                 grad=(0, 3))
    assert status(report) == "fused"


def test_write_between_the_reads_is_a_miss():
    def fn(q, k, v):
        s = q @ k.mT
        v.mul_(2)  # eager's PV reads the doubled v; and k is written after eager read it
        k.add_(1)
        return attend(s, v)

    report = run(fn, (rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D)))
    assert status(report) == "skipped"
    assert "in place" in report.sites[0].reason


def test_written_intermediate_is_a_miss():
    def fn(q, k, v):
        s = q @ k.mT
        s.div_(4)
        return attend(s, v)

    report = run(fn, (rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D)))
    assert status(report) == "skipped"


# --------------------------------------------------------------------------- 2. implicit softmax dim


@pytest.mark.parametrize("rank", [3, 4])
def test_implicit_softmax_dim_is_not_the_key_axis(rank):
    def fn(q, k, v):
        return F.softmax(q @ k.transpose(-2, -1)) @ v  # dim 0 for 3-D, 1 for 4-D: never the key axis

    shape = (B, H, L, D)[4 - rank:]
    with pytest.warns(UserWarning, match="Implicit dimension"):
        report = run(fn, (rnd(*shape), rnd(*shape), rnd(*shape)))
    assert status(report) == "skipped"
    assert "axis" in report.sites[0].reason


def test_implicit_softmax_dim_of_2d_scores_is_the_key_axis():
    def fn(q, k, v):
        return F.softmax(q @ k.T) @ v  # 2-D: dim 1, the key axis

    with pytest.warns(UserWarning, match="Implicit dimension"):
        report = run(fn, (rnd(L, D), rnd(17, D), rnd(17, D)))
    assert status(report) == "fused"


# --------------------------------------------------------------------------- 3. output layout


def _out(q, k, v):
    return attend(q @ k.mT / 3, v)


CONSUMERS = {
    "view": lambda o: o.view(B * H, L, D),
    "as_strided": lambda o: o.as_strided((B, H, L * D), (H * L * D, L * D, 1)),
    "inplace": lambda o: o.mul_(2).view(-1),
    "returned": lambda o: o,
    "through_elementwise": lambda o: (o * 2).view(B, H * L, D),
    "reshape_view": lambda o: o.reshape(B, H, L, D // 2, 2).view(B, H, L * D),
}


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_consumers_get_eager_layout(consumer):
    use = CONSUMERS[consumer]
    report = run(lambda q, k, v: use(_out(q, k, v)), (rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D)))
    assert status(report) == "fused"


def test_free_layout_kept_where_consumers_allow():
    def fn(q, k, v, w):
        o = _out(q, k, v)
        return o.transpose(1, 2).contiguous().view(B, L, H * D) @ w

    report = run(fn, (rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D), rnd(H * D, 5)))
    assert status(report) == "fused"
    assert not any("contiguous(getitem" in line for line in report.sites[0].subgraph["after"])


def test_standard_layout_where_a_view_needs_it():
    report = run(lambda q, k, v: _out(q, k, v).view(B * H, L, D), (rnd(B, H, L, D),) * 3)
    assert any("contiguous" in line for line in report.sites[0].subgraph["after"])


# --------------------------------------------------------------------------- 4. K/V head counts


@pytest.mark.parametrize(("hk", "hv"), [(1, H), (H, 1)], ids=["one_key_head", "one_value_head"])
def test_one_key_or_value_head_broadcast_over_the_other(hk, hv):
    # matmul broadcasting reads the single head for every head of the other: fused with it expanded
    report = run(lambda q, k, v: attend(q @ k.mT / 3, v), (rnd(B, H, L, D), rnd(B, hk, 17, D), rnd(B, hv, 17, D)),
                 grad=(0, 1, 2))
    assert status(report) == "fused"
    assert report.sites[0].kv_groups == 1


def test_five_d_key_broadcast_over_value_heads():
    def fn(q, k, v):  # K (B, 2, 1, ...) broadcasts over V's 3 heads in each of 2 groups
        return attend(q.view(B, 2, 3, L, D) @ k.unsqueeze(2).mT, v.view(B, 2, 3, 17, D)).flatten(1, 2)

    report = run(fn, (rnd(B, 6, L, D), rnd(B, 2, 17, D), rnd(B, 6, 17, D)), grad=(0, 1, 2))
    assert status(report) == "fused"


def test_key_and_value_broadcast_on_different_axes_is_skipped():
    def fn(q, k, v):  # K (B, 1, 3, ...) and V (B, 2, 1, ...): neither one head for all, nor the same heads
        return attend(q @ k.mT, v)

    report = run(fn, (rnd(B, 2, 3, L, D), rnd(B, 1, 3, 17, D), rnd(B, 2, 1, 17, D)))
    assert status(report) == "skipped"
    assert "neither match nor broadcast" in report.sites[0].reason


def test_grouped_five_d_broadcast_is_fused():
    def fn(q, k, v):
        qq = q.view(B, 2, 3, L, D)
        return attend(qq @ k.unsqueeze(2).mT / math.sqrt(D), v.unsqueeze(2)).reshape(B, 6, L, D)

    report = run(fn, (rnd(B, 6, L, D), rnd(B, 2, 17, D), rnd(B, 2, 17, D)), grad=(0, 1, 2))
    assert status(report) == "fused"
    assert report.sites[0].kv_groups == 3


def test_five_d_broadcast_on_a_middle_axis_is_skipped():
    def fn(q, k, v):
        qq = q.view(B, 2, 3, L, D)
        return attend(qq @ k.unsqueeze(1).mT, v.unsqueeze(1)).reshape(B, 6, L, D)

    report = run(fn, (rnd(B, 6, L, D), rnd(B, 3, L, D), rnd(B, 3, L, D)))
    assert status(report) == "skipped"


# --------------------------------------------------------------------------- 5. rows that see no key

MIN = torch.finfo(torch.float32).min


def _pad(rows_dead=True):
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, :5] = False  # left padding: with causal, rows 0-4 of batch 1 see no key
    if not rows_dead:
        keep[1, :5] = True
    return keep


def _causal():
    return torch.ones(L, L, dtype=torch.bool).tril()


def test_min_plus_min_saturates_like_eager():
    def fn(q, k, v, pad):
        s = q @ k.mT
        s = s + torch.where(pad[:, None, None, :], 0.0, MIN)
        s = s + torch.where(_causal(), 0.0, MIN)
        return attend(s, v)

    run(fn, (rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D), _pad()), grad=(0, 1, 2))


def test_where_then_additive_causal():
    def fn(q, k, v, pad):
        s = torch.where(pad[:, None, None, :], q @ k.mT, MIN)
        s = s + (~_causal()) * MIN
        return attend(s, v)

    args = (rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D), _pad())
    run(fn, args)  # inference: value-exact
    run(fn, args, grad=(0, 1, 2))  # training: exact, or skipped


def test_bias_then_layout_with_finite_fill_and_an_empty_row():
    layout = torch.rand(L, L) > 0.4
    layout[4] = False

    def fn(q, k, v, bias):
        return attend(torch.where(layout, q @ k.mT + bias, -1e4), v)

    report = run(fn, (rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D), rnd(H, L, L)), grad=(0, 1, 2, 3))
    assert status(report) == "skipped"
    assert "row with no visible key" in report.sites[0].reason


def test_bool_input_mask_and_finite_window_second_call_empty_row():
    def fn(q, k, v, keep):
        s = (q @ k.mT).masked_fill(~keep, MIN)
        i = torch.arange(L)
        band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 4)
        return attend(s.masked_fill(~band, -1e4), v)

    keep = torch.ones(B, 1, L, L, dtype=torch.bool)
    first = run(fn, (rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D), keep))
    keep = keep.clone()
    keep[0, 0, 6, 3:7] = False  # row 6 of batch 0: every key of its window masked
    run(fn, (rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D), keep), grad=(0, 1, 2))
    assert len(first.sites) == 1


def _bottom_right(lq, lk):
    i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    return j <= i - (lq - lk)  # bottom-right aligned: rows 0 .. lq - lk - 1 see no key


@pytest.mark.parametrize("fill", [float("-inf"), MIN])
def test_bottom_right_causal_with_more_queries_than_keys_and_bias(fill):
    lq, lk = 11, 7

    def fn(q, k, v, bias):
        return attend(torch.where(_bottom_right(lq, lk), q @ k.mT + bias, fill), v)

    args = (rnd(B, H, lq, D), rnd(B, H, lk, D), rnd(B, H, lk, D), rnd(B, H, lq, lk))
    assert status(run(fn, args)) == "fused"  # inference: the fold is value-exact
    assert status(run(fn, args, grad=(0, 1, 2, 3))) == "skipped"  # eager's gradient there is 0


@pytest.mark.parametrize("fill", [float("-inf"), MIN, -1e4])
def test_bottom_right_causal_alone_gradient_on_rows_without_keys(fill):
    lq, lk = 11, 7

    def fn(q, k, v):
        return attend(torch.where(_bottom_right(lq, lk), q @ k.mT, fill), v)

    report = run(fn, (rnd(B, H, lq, D), rnd(B, H, lk, D), rnd(B, H, lk, D)), grad=(0, 1, 2))
    assert status(report) == "fused"


def test_hf_causal_with_left_padding_stays_exact_in_fp32():
    def fn(q, k, v, pad):
        keep = _causal()[None, None] & pad[:, None, None, :]
        s = q @ k.mT / math.sqrt(D) + torch.where(keep, 0.0, MIN)
        return torch.softmax(s, -1, dtype=torch.float32) @ v

    run(fn, (rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D), _pad()), grad=(0, 1, 2))


# --------------------------------------------------------------------------- 7. one report per compile call


def test_report_covers_every_graph_of_the_call(tmp_path):
    path = tmp_path / "report.json"

    def fn(q, k, v):
        a = attend(q @ k.mT / 3, v)
        torch._dynamo.graph_break()
        b = attend(a @ k.mT / 3, v)
        torch._dynamo.graph_break()
        return attend(b @ k.mT / 2, v) + 1

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="attnfuse", options={"inner": "eager", "report": str(path)})
    q, k, v = rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D)
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))
    report = attnfuse.last_report()
    assert report.graphs == 3 and [s.id for s in report.sites] == [0, 1, 2], str(report)
    assert [s.status for s in report.sites] == ["fused"] * 3
    lines = [int(s.source.rsplit(":", 1)[1]) for s in report.sites]
    assert lines == sorted(lines)
    saved = json.loads(path.read_text())
    assert len(saved["sites"]) == 3 and saved["graphs"] == 3
    compiled(q, k, v)  # a second call compiles nothing and keeps the report whole
    assert len(attnfuse.last_report().sites) == 3


def test_separate_compile_calls_have_separate_reports():
    torch._dynamo.reset()
    one = torch.compile(lambda q, k, v: attend(q @ k.mT, v), backend="attnfuse", options={"inner": "eager"})
    two = torch.compile(lambda q, k, v: attend(q @ k.mT, v) * 2, backend="attnfuse", options={"inner": "eager"})
    x = rnd(B, H, L, D)
    one(x, x, x)
    two(x, x, x)
    assert len(attnfuse.last_report().sites) == 1
