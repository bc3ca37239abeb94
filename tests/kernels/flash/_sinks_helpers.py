"""The attention-sinks tests' reference, shared by the CPU paths (test_sinks_cpu.py) and the Triton kernels
(test_sinks_interpret.py): `sink_attention`, GPT-OSS's eager spelling, and `compare`, the op against it in the
input dtype (eager) and float64 under the 2x rule, forward and the gradients of q, k, v and the sinks.
"""

from __future__ import annotations

import math

import torch

from attnfuse import ops
from tests._util import assert_2x, band


def sink_attention(q, k, v, sinks, mask=None, *, scale=None, causal=False, mask_fill=-math.inf, softcap=0.0,
                   window=(-1, -1), alibi=None, shift=False, with_sink_probs=False):
    """GPT-OSS's eager spelling: the sink is one more key column, dropped after the softmax (its probability
    returned too with ``with_sink_probs``)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    lq, lk = s.shape[-2:]
    if alibi is not None:
        i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
        s = s + alibi.to(s.dtype)[:, None, None] * (j - i).to(s.dtype)
    if mask is not None:
        s = s.masked_fill(~mask, mask_fill) if mask.dtype == torch.bool else s + mask.to(s.dtype)
    if causal or window != (-1, -1):
        s = s.masked_fill(~band(lq, lk, *window, causal=causal), -math.inf)
    col = (sinks.reshape(1, -1, 1, 1) if sinks.dim() == 1 else sinks[:, :, None, None]).to(s.dtype)
    combined = torch.cat([s, col.expand(s.shape[0], s.shape[1], lq, 1)], dim=-1)
    if shift:
        combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1)
    return (probs[..., :-1] @ v, probs[..., -1]) if with_sink_probs else probs[..., :-1] @ v


def sink_grad_magnitude(out: torch.Tensor, sink_probs: torch.Tensor, grad: torch.Tensor, sinks: torch.Tensor) -> float:
    """The largest sum of |terms| behind one entry of the sinks' gradient: each query row adds
    ``-P_sink * (dO . O)``, and those terms cancel, so the result can be far below the rounding of its terms."""
    terms = (sink_probs * (grad.double() * out.double()).sum(-1)).abs().sum(-1)  # (B, H)
    return (terms.sum(0) if sinks.dim() == 1 or sinks.shape[0] == 1 else terms).max().item()


def compare(dtype, b, h, hk, lq, lk, d, dv, *, sink_shape=None, mask=None, **kw):
    # drawn in ``dtype``: the float64 reference then computes on exactly the values the others see
    q, k, v = (torch.randn(shape).to(dtype) for shape in ((b, h, lq, d), (b, hk, lk, d), (b, hk, lk, dv)))
    sinks = (torch.randn(sink_shape or (h,)) * 2).to(dtype)
    grad = torch.randn(b, h, lq, dv).to(dtype)
    runs = {}
    for name, dt in (("eager", dtype), ("ref", torch.float64)):
        ins = [x.detach().to(dt).requires_grad_(True) for x in (q, k, v, sinks)]
        ref_kw = {key: val for key, val in kw.items() if key not in ("window_left", "window_right")}
        window = (kw.get("window_left", -1), kw.get("window_right", -1))
        out, sink_probs = sink_attention(*ins, mask, window=window, with_sink_probs=True, **ref_kw)
        out.backward(grad.to(dt))
        runs[name] = (out, *(x.grad for x in ins))
    magnitude = sink_grad_magnitude(runs["ref"][0].detach(), sink_probs.detach(), grad, sinks)
    ins = [x.detach().to(dtype).requires_grad_(True) for x in (q, k, v)]
    s_in = sinks.detach().to(dtype).requires_grad_(True)
    out = ops.attend(*ins, mask, None, kw.pop("alibi", None), s_in, kv_groups=h // hk, **kw)
    out.backward(grad.to(dtype))
    ours = (out, *(x.grad for x in ins), s_in.grad)
    for i, name in enumerate(("out", "dq", "dk", "dv", "dsinks")):
        assert ours[i].dtype == dtype and ours[i].shape == runs["ref"][i].shape, name
        assert_2x(ours[i], runs["eager"][i], runs["ref"][i], name, magnitude=magnitude if name == "dsinks" else None)
    return ours, runs["ref"]
