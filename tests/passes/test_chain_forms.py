"""Third-party spellings of the chain itself: views inside it (`_views`), einsum with broadcast K/V, dead users,
more than two batch dims with masks, and hand-written local attention (`_local`).

Every positive case is fused and meets the 2x rule against float64 (outputs and gradients); every negative
twin stays as written, or is fused only as the plain attention it is, never as the structure it imitates.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _harness import check, fused, skipped

B, H, L, D = 2, 3, 11, 5


def rnd(*shape):
    return torch.randn(*shape)


# --------------------------------------------------------------------------- views inside the chain


def bloom(q, k, v, alibi, keep):
    s = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=D ** -0.5)
    s = s.view(B, H, L, L).masked_fill(~keep, torch.finfo(q.dtype).min)
    p = torch.softmax(s, -1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(p.view(B * H, L, L), v).view(B, H, L, D)


def _bloom_args():
    keep = torch.rand(B, 1, L, L) > 0.3
    keep[..., 0] = True
    return [rnd(B * H, L, D), rnd(B * H, L, D), rnd(B * H, L, D), rnd(B * H, 1, L), keep]


def test_heads_folded_into_batch_then_viewed_for_the_mask():
    # inference: a bias next to a keep mask is fused without gradients (test_soundness: in training it is not)
    site = fused(check(bloom, _bloom_args(), grad=[]))
    assert site.shapes["q"] == [B, H, L, D]  # read in the softmax's (B, H, L, L) shape


def test_views_fold_with_dynamic_shapes():
    def fn(xq, xk, xv, alibi):
        b, n, _ = xq.shape
        q, k, v = (t.view(b, n, H, D).transpose(1, 2).reshape(b * H, n, D) for t in (xq, xk, xv))
        s = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=D ** -0.5).view(b, H, n, n)
        return torch.bmm(s.softmax(-1).view(b * H, n, n), v)

    fused(check(fn, [rnd(B, L, H * D), rnd(B, L, H * D), rnd(B, L, H * D), rnd(B * H, 1, L)], dynamic=True, spy=False))


QH, QW = 3, 4


def sam(q, k, v, rel_h, rel_w):
    n = QH * QW
    attn = (q * D ** -0.5) @ k.transpose(-2, -1)
    attn = (attn.view(B, QH, QW, QH, QW) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(B, n, n)
    return attn.softmax(-1) @ v


def test_decomposed_relative_position_bias_in_a_5d_view():
    n = QH * QW
    fused(check(sam, [rnd(B, n, D), rnd(B, n, D), rnd(B, n, D), rnd(B, QH, QW, QH), rnd(B, QH, QW, QW)]), mask="bias")


def test_size_one_axes_moved_by_unsqueeze_and_squeeze():
    def fn(q, k, v):
        s = (q @ k.transpose(-1, -2)).unsqueeze(1)
        return s.softmax(-1).squeeze(1) @ v

    fused(check(fn, [rnd(B * H, L, D), rnd(B * H, L, D), rnd(B * H, L, D)]))


def test_view_that_mixes_the_key_axis_is_not_attention():
    def fn(q, k, v):
        s = (q @ k.transpose(1, 2)).reshape(B * H, 1, L * L)
        return s.softmax(-1).reshape(B * H, L, L) @ v

    skipped(check(fn, [rnd(B * H, L, D), rnd(B * H, L, D), rnd(B * H, L, D)]), "not a probabilities @ values")


def test_scores_transposed_between_views_is_not_attention():
    def fn(q, k, v):
        s = (q @ k.transpose(1, 2)).view(B, H, L, L).transpose(-1, -2)
        return s.softmax(-1).reshape(B * H, L, L) @ v

    skipped(check(fn, [rnd(B * H, L, D), rnd(B * H, L, D), rnd(B * H, L, D)]), "not a probabilities @ values")


# --------------------------------------------------------------------------- einsum with broadcast K/V


def test_multi_query_einsum_without_a_heads_axis():
    def fn(q, k, v):
        s = torch.einsum("b h i d, b j d -> b h i j", q, k) * D ** -0.5
        return torch.einsum("b h i j, b j d -> b h i d", s.softmax(-1), v)

    site = fused(check(fn, [rnd(B, H, L, D), rnd(B, L, D), rnd(B, L, D)]))
    assert site.kv_groups == H


def test_einsum_with_ellipsis():
    def fn(q, k, v):
        s = torch.einsum("...id,...jd->...ij", q, k)
        return torch.einsum("...ij,...jd->...id", s.softmax(-1), v)

    fused(check(fn, [rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D)]))


def test_einsum_that_sums_an_extra_axis_is_not_a_matmul():
    def fn(q, k, v):
        s = torch.einsum("b h i d, b h j d -> b h i j", q, k)
        return torch.einsum("b h i j, b h j d -> b i d", s.softmax(-1), v)  # also sums over the heads

    skipped(check(fn, [rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D)]), "not a probabilities @ values")


# --------------------------------------------------------------------------- dead users


def test_dead_copies_of_scores_and_probabilities_do_not_block_fusion():
    def fn(q, k, v):
        s = q @ k.transpose(-1, -2)
        kept = s.clone()  # noqa: F841 - library code keeps it for an optional return
        p = s.softmax(-1)
        both = torch.cat([p, p])  # noqa: F841
        return p @ v

    fused(check(fn, [rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D)]))


def test_a_live_copy_of_the_scores_keeps_the_site():
    def fn(q, k, v):
        s = q @ k.transpose(-1, -2)
        return s.softmax(-1) @ v, s.clone()

    skipped(check(fn, [rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D)]), "also used by")


# --------------------------------------------------------------------------- more than two batch dims


def test_grouped_gqa_5d_with_a_batch_mask():
    hkv, g = 2, 3
    keep = torch.rand(B, 1, 1, L, L) > 0.3
    keep[..., 0] = True

    def fn(q, k, v, keep):
        s = (q @ k.transpose(-1, -2)) * D ** -0.5
        return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v

    site = fused(check(fn, [rnd(B, hkv, g, L, D), rnd(B, hkv, 1, L, D), rnd(B, hkv, 1, L, D), keep]))
    assert site.kv_groups == g


def test_grouped_gqa_5d_causal_is_proven():
    def fn(q, k, v):
        s = (q @ k.transpose(-1, -2)) * D ** -0.5
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        return s.masked_fill(~causal, float("-inf")).softmax(-1) @ v

    fused(check(fn, [rnd(B, 2, 3, L, D), rnd(B, 2, 1, L, D), rnd(B, 2, 1, L, D)]), mask="causal")


def test_windowed_attention_5d_with_a_per_window_mask():
    nw, w = 4, 6

    def fn(q, k, v, mask):
        attn = (q * D ** -0.5) @ k.transpose(-2, -1) + mask.unsqueeze(1).unsqueeze(0)
        return attn.softmax(-1) @ v

    fused(check(fn, [rnd(B, nw, H, w, D), rnd(B, nw, H, w, D), rnd(B, nw, H, w, D), rnd(nw, w, w)]), mask="bias")


# --------------------------------------------------------------------------- local attention by hand


def unfold_local(q, k, v, left=3, right=2, pad=0.0):
    w = left + right + 1
    kw = F.pad(k, (0, 0, left, right), value=pad).unfold(2, w, 1).transpose(-2, -1)
    vw = F.pad(v, (0, 0, left, right)).unfold(2, w, 1).transpose(-2, -1)
    s = (q.unsqueeze(3) @ kw.transpose(-2, -1)) * D ** -0.5
    return (s.softmax(-1) @ vw).squeeze(3)


@pytest.mark.parametrize("left,right", [(3, 2), (4, 0), (0, 5)])
def test_unfold_windows_run_the_window_kernel_with_the_padded_keys(left, right):
    res = check(lambda q, k, v: unfold_local(q, k, v, left, right), [rnd(B, H, L, D) for _ in range(3)])
    site = fused(res, kernel="window", pattern="unfold")
    assert site.mask["window"] == [left, right]
    assert res.call["window_pad"] is True


def test_unfold_windows_padded_with_another_value_are_not_a_band():
    res = check(lambda q, k, v: unfold_local(q, k, v, 2, 2, pad=1.0), [rnd(B, H, L, D) for _ in range(3)])
    site = fused(res)  # plain attention over each row's five gathered keys, exact
    assert site.kernel != "window" and not res.call.get("window_pad")


local_attention = pytest.importorskip("local_attention")


@pytest.mark.parametrize("causal,forward", [(True, 0), (False, 1)])
def test_bucketed_look_back_with_exact_windows_is_a_band(causal, forward):
    torch.manual_seed(0)
    mod = local_attention.LocalAttention(window_size=4, causal=causal, look_backward=1, look_forward=forward,
                                         exact_windowsize=True)
    site = fused(check(mod, [rnd(B, H, 16, 8) for _ in range(3)]), kernel="window", pattern="bucketed")
    assert site.mask["window"] == [4, 0 if causal else 4]


def test_bucketed_look_back_without_exact_windows_stays_block_local():
    mod = local_attention.LocalAttention(window_size=4, causal=True, look_backward=1, exact_windowsize=False)
    site = fused(check(mod, [rnd(B, H, 16, 8) for _ in range(3)]))  # the blocks' own attention, exact
    assert "bucketed" not in site.pattern and site.kernel != "window"


# --------------------------------------------------------------------------- more library spellings


def test_mask_subtracted_from_the_scores():  # XLNet: scores - 1e30 * mask
    mask = (torch.rand(B, 1, 1, L) > 0.7).float()

    def fn(q, k, v, mask):
        s = (q @ k.transpose(-1, -2)) * D ** -0.5
        return (s - 1e30 * mask).softmax(-1) @ v

    fused(check(fn, [rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D), mask], grad=[0, 1, 2]), mask="bias")


def test_scores_subtracted_from_a_mask_are_not_attention():
    def fn(q, k, v, mask):
        return (mask - (q @ k.transpose(-1, -2))).softmax(-1) @ v

    skipped(check(fn, [rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, 1, 1, L)]), "not part of the")


def test_values_times_transposed_probabilities():  # timm's NCHW layout: v (.., D, L) @ pᵀ
    def fn(q, k, v):
        s = (q.transpose(-2, -1) @ k) * D ** -0.5
        return v @ s.softmax(-1).transpose(-2, -1)

    fused(check(fn, [rnd(B, H, D, L), rnd(B, H, D, L), rnd(B, H, D, L)]))


def test_values_times_untransposed_probabilities_are_not_attention():
    def fn(q, k, v):
        s = (q.transpose(-2, -1) @ k) * D ** -0.5
        return v @ s.softmax(-1)  # sums over the queries

    skipped(check(fn, [rnd(B, H, D, L), rnd(B, H, D, L), rnd(B, H, D, L)]), "not a probabilities @ values")


def test_term_that_reads_the_scores_only_for_their_shape():  # SAM: rel_pos.reshape_as(attn_weights)
    def fn(q, k, v, rel):
        s = (q @ k.transpose(-1, -2)) * D ** -0.5
        return (s + rel.reshape_as(s)).softmax(-1) @ v

    fused(check(fn, [rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D), rnd(B * H, L * L)]), mask="bias")


def test_term_that_reads_the_scores_values_is_not_a_mask():
    def fn(q, k, v):
        s = (q @ k.transpose(-1, -2)) * D ** -0.5
        return (s + s.detach().tanh().reshape_as(s)).softmax(-1) @ v

    skipped(check(fn, [rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D)]), "depends on the scores")


def test_einsum_with_upper_case_letters_and_two_batch_groups():  # torchvision's MaxViT
    def fn(q, k, v):
        s = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k) * D ** -0.5
        return torch.einsum("B G H I J, B G H J D -> B G H I D", s.softmax(-1), v)

    fused(check(fn, [rnd(B, 2, H, L, D) for _ in range(3)]))


def test_zero_added_to_the_scores():  # XLNet: (ac + bd + ef) * scale with ef = 0
    def fn(q, k, v, bd):
        s = ((q @ k.transpose(-1, -2)) + bd + 0) * D ** -0.5
        return s.softmax(-1) @ v

    fused(check(fn, [rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, L)]), mask="bias")


def test_a_nonzero_constant_added_to_the_scores_is_not_a_mask():
    def fn(q, k, v):
        return ((q @ k.transpose(-1, -2)) + 0.5).softmax(-1) @ v

    skipped(check(fn, [rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D)]), "scalar is added")


def test_zero_added_to_a_value_the_user_reads_stays():
    def fn(q, k, v):
        s0 = (q @ k.transpose(-1, -2)) * 0.0 + 0  # -0.0 + 0 is +0.0: the user sees the sign
        return s0.softmax(-1) @ v, s0

    args = [rnd(B, H, L, D), -rnd(B, H, L, D).abs(), rnd(B, H, L, D)]
    torch._dynamo.reset()
    out = torch.compile(fn, backend="attnfuse", options={"inner": "eager"})(*args)[1]
    want = fn(*args)[1]
    assert torch.equal(torch.signbit(out), torch.signbit(want))
