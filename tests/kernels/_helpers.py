"""The test harness the Triton kernels' tests share (flash, window, block-sparse, top-k, sinks, window_pad).

A float64 textbook (`textbook`: attention with the scores materialized, in the dtype of its inputs) and
`compare`, which holds a kernel's forward and backward (dq, dk, dv and a bias gradient) to the project's 2x rule
against it; reproducible inputs per case (`seed_case`, `qkv`), small tile configs that keep each case to a
handful of Triton programs, the dropout keep mask read off a forward (`recover_keep`) and the ALiBi bias
(`alibi_bias`).  The top-k CPU tests use it too: both paths are held to one semantics.
"""

from __future__ import annotations

import math
import zlib

import torch

from attnfuse.costmodel import tiles
from attnfuse.kernels import flash
from tests._util import assert_2x

T16 = tiles.TileConfig(16, 16, 4, 2)
T16x32 = tiles.TileConfig(16, 32, 4, 2)
T32x16 = tiles.TileConfig(32, 16, 4, 2)
DTYPES = [torch.float32, torch.float16]
_INF = float("-inf")


def seed_case(*key) -> None:
    """Fresh inputs per case, reproducible across runs and xdist workers."""
    torch.manual_seed(zlib.crc32(repr(key).encode()))


def textbook(q, k, v, mask=None, *, scale=None, causal=False, softcap=0.0, mask_fill=None, keep=None,
             dropout_p=0.0, bias=None, visible=None):
    """Attention as written in a textbook, in the dtype of its inputs (materializes the scores).

    ``bias`` (e.g. ALiBi's) is added before the mask, the (Lq, Lk) bool ``visible`` (a band) applied after it."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.to(s.dtype)
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, _INF if mask_fill is None else mask_fill)
        else:
            s = s + mask
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), _INF)
    if visible is not None:
        s = s.masked_fill(~visible, _INF)
    p = torch.softmax(s, dim=-1)
    if keep is not None:
        p = p * keep.to(p.dtype) / (1 - dropout_p)
    return p @ v


def leaf(x: torch.Tensor, dtype: torch.dtype | None = None, grad: bool = True) -> torch.Tensor:
    y = x.detach() if dtype is None else x.detach().to(dtype)
    return y.requires_grad_(grad)


def _single_key_noise(dtype, q, k, v, grad_out, scale=None):
    """Bounds on dQ/dK/dbias when every row sees exactly one key.

    Then softmax's dS = p * (dp - rowsum(p * dp)) is exactly 0 (eager gets 0), but the flash backward's
    ``delta = rowsum(dO * O)`` is a differently rounded dot product than ``dp = dO . v``: dS is rounding
    noise of a few ulps of sum_d |dO_d v_d|, times |k| (dQ) or |q| summed over the rows (dK), or summed over
    the broadcast dims (a bias gradient).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dp_mag = (grad_out.double().abs().sum(-1).max() * v.double().abs().max()).item()
    ds = 8 * torch.finfo(dtype).eps * dp_mag * scale
    rows = q.shape[2] * q.shape[1] // k.shape[1]
    return {"dq": ds * k.double().abs().max().item(), "dk": ds * rows * q.double().abs().max().item(),
            "dmask": ds * q.shape[0] * q.shape[1] * q.shape[2]}


def compare(dtype, q, k, v, grad_out, *, mask=None, mask_grad=False, what="", keep=None, one_key=False,
             attend=None, bias=None, visible=None, **kw):
    """Run ours (``attend``, default flash.attention, with kw) vs eager (dtype) vs reference (float64), forward
    and backward.

    ``q``/``k``/``v``/``mask`` are already in ``dtype`` (any strides); ``keep`` is the dropout keep mask
    the textbook functions apply, ``bias``/``visible`` the extra terms of `textbook` (``bias`` in float64:
    each run rounds it to its dtype).  ``one_key``: every query row sees exactly one key, so dQ, dK (and a
    bias gradient) are 0 and are held to `_single_key_noise` instead of the 2x rule.  Returns our output.
    """
    textbook_kw = {key: kw[key] for key in ("scale", "causal", "softcap", "mask_fill", "dropout_p") if key in kw}
    float_mask = mask is not None and mask.dtype != torch.bool
    grad_mask = mask_grad and float_mask

    ours_in = [leaf(x) for x in (q, k, v)]
    ours_mask = leaf(mask, grad=grad_mask) if float_mask else mask
    out = (attend or flash.attention)(*ours_in, mask=ours_mask, **kw)
    out.backward(grad_out)

    results = {}
    for name, dt in (("eager", dtype), ("ref", torch.float64)):
        ins = [leaf(x, dt) for x in (q, k, v)]
        m = leaf(mask, dt, grad=grad_mask) if float_mask else mask
        o = textbook(*ins, m, keep=keep, bias=None if bias is None else bias.to(dt), visible=visible,
                     **textbook_kw)
        o.backward(grad_out.to(dt))
        results[name] = (o, *(x.grad for x in ins), m.grad if grad_mask else None)

    ours = (out, *(x.grad for x in ours_in), ours_mask.grad if grad_mask else None)
    assert out.dtype == dtype and out.shape == results["ref"][0].shape
    noise = _single_key_noise(dtype, q, k, v, grad_out, kw.get("scale")) if one_key else {}
    for i, name in enumerate(("out", "dq", "dk", "dv", "dmask")):
        if name == "dmask" and not grad_mask:
            continue
        assert ours[i] is not None, name
        assert ours[i].dtype == dtype and ours[i].shape == results["ref"][i].shape, name
        if name in noise:
            assert torch.equal(results["ref"][i], torch.zeros_like(results["ref"][i])), name
            err = ours[i].double().abs().max().item()
            assert err <= noise[name], f"{what} {name}: {err:.3g} > single-key noise bound {noise[name]:.3g}"
        else:
            assert_2x(ours[i], results["eager"][i], results["ref"][i], f"{what} {name}")
    return out


def qkv(dtype, b, h, hk, lq, lk, d, dv):
    q = torch.randn(b, h, lq, d).to(dtype)
    k = torch.randn(b, hk, lk, d).to(dtype)
    v = torch.randn(b, hk, lk, dv).to(dtype)
    return q, k, v


def visible_keys(lq, lk, causal):
    return torch.ones(lq, lk, dtype=torch.bool).tril() if causal else torch.ones(lq, lk, dtype=torch.bool)


def recover_keep(q, k, *, causal, p, seed, config):
    """The dropout keep mask of (q, k, seed), read off the forward: with V = identity, out = P * keep / (1 - p).

    Also checks that kept entries carry exactly the rescaled probability and dropped ones are 0.
    """
    b, h, lq, _ = q.shape
    hk, lk = k.shape[1], k.shape[2]
    eye = torch.eye(lk, dtype=q.dtype).expand(b, hk, lk, lk)
    dropped = flash.attention(q, k, eye, causal=causal, dropout_p=p, seed=seed, config=config).double()
    probs = textbook(q.double(), k.double(), eye.double(), causal=causal)
    vis = visible_keys(lq, lk, causal).expand_as(probs)
    assert (probs[vis] > 1e-12).all()
    keep = dropped != 0
    assert not keep[~vis].any()
    torch.testing.assert_close(dropped[keep], probs[keep] / (1 - p), rtol=1e-5, atol=1e-7)
    return keep | ~vis  # the keys a causal row never sees are 0 either way


def alibi_bias(slopes: torch.Tensor, lq: int, lk: int) -> torch.Tensor:
    """(H, Lq, Lk) float64: slope[h] * (j - i)."""
    dist = (torch.arange(lk)[None, :] - torch.arange(lq)[:, None]).double()
    return slopes.double()[:, None, None] * dist
