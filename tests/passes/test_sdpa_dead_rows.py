"""SDPA with an additive mask whose rows can see no key: with a finite fill (HF's finfo.min) eager's row is uniform
over every key, so a band folded out of the mask (-inf in the kernels) would change those rows; with a bool mask
SDPA's row is 0, which the op reproduces from the key vector.  Left padding under causal makes such rows.

Their gradient: PyTorch's CPU flash backward recomputes such a row's probabilities as 1, not 1/L (its stored
log-sum-exp, finfo.min + log L, rounds to finfo.min), where attnfuse's op differentiates its forward; padded
training never sends a gradient into those rows (their labels are ignored), so the output gradient is 0 there."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnfuse
from tests._util import assert_2x


class Padded(torch.nn.Module):
    def __init__(self, additive: bool):
        super().__init__()
        self.additive = additive
        self.qkv = torch.nn.Linear(40, 120)

    def forward(self, x, am):
        b, n, _ = x.shape
        i = torch.arange(n)
        keep = (i[None, :] <= i[:, None])[None, None] & am[:, None, None, :].bool()
        mask = keep
        if self.additive:
            mask = torch.zeros(keep.shape, dtype=x.dtype).masked_fill(~keep, torch.finfo(x.dtype).min)
        q, k, v = self.qkv(x).view(b, n, 3, 4, 10).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, 40)


@pytest.mark.parametrize("additive", [True, False], ids=["finfo.min", "bool"])
def test_rows_without_a_visible_key(additive):
    model = Padded(additive)
    x = torch.randn(2, 13, 40)
    am = torch.ones(2, 13, dtype=torch.long)
    am[1, :5] = 0  # rows 0..4 of batch 1 see only padded keys under causal
    grad = torch.randn(2, 13, 40) * am[:, :, None]
    runs = {}
    for name, dt in (("eager", torch.float32), ("ref", torch.float64)):
        m = Padded(additive).to(dt)
        m.load_state_dict(model.state_dict())
        xi = x.detach().to(dt).requires_grad_(True)
        out = m(xi, am)
        out.backward(grad.to(dt))
        runs[name] = (out.detach(), xi.grad)
    xi = x.clone().requires_grad_(True)
    out = torch.compile(model, backend="attnfuse")(xi, am)
    out.backward(grad)
    report = attnfuse.last_report()
    assert [s.status for s in report.sites] == ["fused"], str(report)
    assert ("kept_dense" in report.sites[0].mask) == additive, report.sites[0].mask
    assert_2x(out.detach(), runs["eager"][0], runs["ref"][0], "out")
    assert_2x(xi.grad, runs["eager"][1], runs["ref"][1], "dx")
