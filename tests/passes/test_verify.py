"""options={"verify": ...}: each rewritten site is run against its original region on the example inputs; a site
that disagrees (forward, or gradients in a training graph) is reverted with both errors in the report."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.fx as fx
from torch import nn

import attnfuse
from attnfuse.config import Config
from attnfuse.passes import rewrite as rewrite_pass
from attnfuse.passes import verify as verify_pass


def attn(q, k, v, bias):
    s = (q @ k.transpose(-1, -2)) * 0.125 + bias
    return torch.softmax(s, dim=-1) @ v


def padded(q, k, v, pad):
    s = (q @ k.transpose(-1, -2)) * 0.125
    s = s.masked_fill(~pad[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _inputs(b=2, h=4, n=33, d=40, grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).requires_grad_(grad) for _ in range(3))
    return q, k, v, torch.randn(1, 1, n, n, generator=gen)


def _compile(fn, verify=True, **options):
    torch._dynamo.reset()
    return torch.compile(fn, backend="attnfuse", options={"inner": "eager", "verify": verify, **options})


def _site() -> attnfuse.Site:
    report = attnfuse.last_report()
    assert report is not None and len(report.sites) == 1, str(report)
    return report.sites[0]


def _wrong_scale(monkeypatch):
    """A rewrite whose op gets 1.5x the match's scale: wrong by construction."""
    original = rewrite_pass.rewrite

    def broken(gm, matches):
        return original(gm, [dataclasses.replace(m, scale=(m.scale or 0.125) * 1.5) for m in matches])

    monkeypatch.setattr(rewrite_pass, "rewrite", broken)


class _TwiceBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


def _twice_backward(x):
    return _TwiceBackward.apply(x)


def _wrong_backward(monkeypatch):
    """A rewrite whose output is right but whose gradient is doubled."""
    original = rewrite_pass.rewrite

    def broken(gm, matches):
        out = original(gm, matches)
        graph = gm.graph
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target is torch.ops.attnfuse.attention.default:
                user = next(iter(node.users))
                with graph.inserting_after(user):
                    new = graph.call_function(_twice_backward, (user,))
                user.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        gm.recompile()
        return out

    monkeypatch.setattr(rewrite_pass, "rewrite", broken)


def test_correct_site_stays_fused_with_both_errors():
    args = _inputs()
    out = _compile(attn)(*args)
    site = _site()
    assert site.status == "fused" and site.kernel, site
    record = site.verify
    assert record["passed"] is True and record["sampled"] is None
    assert 0 <= record["fused_error"] <= 2 * record["eager_error"] + record["floor"]
    assert record["eager_error"] > 0 and "grads" not in record  # no input requires grad: forward only
    torch.testing.assert_close(out, attn(*args))
    assert any(n.startswith("verify: 1 site(s) checked") for n in attnfuse.last_report().notes)
    again = attnfuse.Report.from_json(attnfuse.last_report().to_json())
    assert again.sites[0].verify == record
    assert "fused" in str(again)


def test_off_by_default_for_torch_compile():
    _compile(attn, verify=False)(*_inputs())
    assert _site().status == "fused" and _site().verify is None
    torch._dynamo.reset()
    torch.compile(attn, backend="attnfuse", options={"inner": "eager"})(*_inputs())
    assert _site().verify is None


def test_wrong_rewrite_is_reverted_and_runs_as_eager(monkeypatch):
    _wrong_scale(monkeypatch)
    args = _inputs()
    out = _compile(attn)(*args)
    site = _site()
    assert site.status == "skipped" and site.kernel is None
    assert site.reason.startswith("verify: fused output error") and "exceeds 2x eager's" in site.reason, site.reason
    assert site.verify["passed"] is False
    assert site.verify["fused_error"] > 100 * site.verify["eager_error"]
    torch.testing.assert_close(out, attn(*args), rtol=0, atol=0)
    # the same fault without verification reaches the user: the test can fail
    wrong = _compile(attn, verify=False)(*args)
    assert _site().status == "fused" and (wrong - attn(*args)).abs().max() > 1e-2


def test_wrong_rewrite_raises_under_strict(monkeypatch):
    _wrong_scale(monkeypatch)
    with pytest.raises(RuntimeError, match="verify: fused output error"):
        _compile(attn, strict=True)(*_inputs())


def test_training_graph_verifies_gradients():
    args = _inputs(grad=True)
    bias = torch.randn(1, 4, 33, 33, requires_grad=True)
    out = _compile(attn)(*args[:3], bias)
    site = _site()
    assert site.status == "fused", site.reason
    assert set(site.verify["grads"]) == {"q", "k", "v", "bias0"}, site.verify
    for fused_err, eager_err in site.verify["grads"].values():
        assert fused_err <= 2 * eager_err + 1e-5
    out.sum().backward()
    assert bias.grad is not None and args[0].grad is not None


def test_wrong_backward_is_reverted(monkeypatch):
    _wrong_backward(monkeypatch)
    q, k, v, bias = _inputs(grad=True)
    out = _compile(attn)(q, k, v, bias)
    site = _site()
    assert site.status == "skipped" and "verify: fused gradient of" in site.reason, site.reason
    assert site.verify["fused_error"] <= 2 * site.verify["eager_error"] + site.verify["floor"]  # forward is fine
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), g)
    eager = torch.autograd.grad(attn(q, k, v, bias), (q, k, v), g)
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a, b)
    # "forward" checks outputs only: the same fault stays fused
    _compile(attn, verify="forward")(*_inputs(grad=True))
    assert _site().status == "fused" and "grads" not in _site().verify


@pytest.mark.parametrize("value", ["yes", 1, "backward", None, [True]])
def test_bad_values_raise(value):
    with pytest.raises(ValueError, match=r"attnfuse option 'verify'.*False \| True \| 'forward'"):
        Config.from_options({"verify": value})


def test_env_default(monkeypatch):
    monkeypatch.setenv("ATTNFUSE_VERIFY", "forward")
    assert Config.from_options().verify == "forward"
    monkeypatch.setenv("ATTNFUSE_VERIFY", "1")
    assert Config.from_options().verify is True
    assert Config.from_options({"verify": False}).verify is False
    monkeypatch.setenv("ATTNFUSE_VERIFY", "maybe")
    with pytest.raises(ValueError, match="'verify'"):
        Config.from_options()


class _Layer(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads, self.qkv = heads, nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
        return (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, n, d)


def test_audit_verifies_by_default(monkeypatch):
    torch.manual_seed(0)
    model, x = _Layer().eval(), torch.randn(2, 17, 32)
    report = attnfuse.audit(model, x)
    assert report.fused and report.fused[0].verify["passed"] is True, str(report)
    assert attnfuse.audit(model, x, options={"verify": False}).sites[0].verify is None
    _wrong_scale(monkeypatch)
    broken = attnfuse.audit(model, x)
    assert not broken.fused and broken.sites[0].reason.startswith("verify:"), str(broken)


def test_large_site_is_sampled(monkeypatch):
    per = 33 * 33
    monkeypatch.setattr(verify_pass, "SAMPLE_ELEMENTS", 3 * per)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 6, 33, 40, generator=gen) for _ in range(3))
    pad = torch.ones(4, 33, dtype=torch.bool)
    pad[1, 20:] = False
    _compile(padded)(q, k, v, pad)
    site = _site()
    assert site.status == "fused", site.reason
    assert site.verify["sampled"] == {"batch": [1, 4], "heads": [3, 6]}, site.verify
    assert site.verify["passed"] is True


def test_sampled_site_still_catches_a_wrong_rewrite(monkeypatch):
    monkeypatch.setattr(verify_pass, "SAMPLE_ELEMENTS", 33 * 33)
    monkeypatch.setattr(verify_pass, "WHOLE_ELEMENTS", 33 * 33)
    _wrong_scale(monkeypatch)
    q, k, v, bias = _inputs(b=3)
    _compile(attn)(q, k, v, bias)
    site = _site()
    assert site.status == "skipped" and site.verify["sampled"] == {"batch": [1, 3], "heads": [1, 4]}, site.verify


def test_too_large_to_sample_is_reported_unverified(monkeypatch):
    """Rows are never sampled: one batch entry of one head over the bound stays fused, marked unverified."""
    monkeypatch.setattr(verify_pass, "SAMPLE_ELEMENTS", 8)
    monkeypatch.setattr(verify_pass, "WHOLE_ELEMENTS", 8)
    _compile(attn)(*_inputs(b=1, h=1))
    site = _site()
    assert site.status == "fused" and site.verify["passed"] is None
    assert "exceed the verification bound" in site.verify["skipped"]


def test_verification_leaves_user_tensors_alone():
    """The graph prefix runs once more on the example inputs; an in-place write must not happen twice."""

    def step(q, k, v, counter):
        counter.add_(1)
        k = k + counter  # the site's input is computed after the write
        return torch.softmax(q @ k.transpose(-1, -2) * 0.125, -1) @ v

    counter = torch.zeros(())
    q, k, v, _ = _inputs()
    torch._dynamo.reset()
    report = attnfuse.audit(step, q, k, v, counter)  # audit runs the original graph: one write of its own
    assert report.sites[0].verify["passed"] is True, str(report)
    assert counter.item() == 1


def test_no_real_inputs_is_a_note():
    graph = fx.symbolic_trace(lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
    report = attnfuse.Report()
    assert verify_pass.verify(graph, [], None, report, Config(verify=True)) == []
    assert report.notes and "no example inputs" in report.notes[0]
