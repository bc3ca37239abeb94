"""The backend end to end: options, training, no_grad, dynamic shapes, fault containment, report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from nanogpt import GPT, GPTConfig
from torch._dynamo.utils import counters

import attnfuse
from attnfuse.config import Config
from attnfuse.costmodel import plan as planner
from attnfuse.passes import canonicalize, masks, match, rewrite


def _gpt(**kw) -> GPT:
    cfg = dict(block_size=64, vocab_size=61, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def test_backend_registered_by_entry_point():
    code = "import torch; print('attnfuse' in torch._dynamo.list_backends())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("options, key", [
    ({"bogus": 1}, "bogus"),
    ({"inner": "tvm"}, "inner"),
    ({"kernels": ["flash", "magic"]}, "kernels"),
    ({"approximate": {"max_rel_error": 2.0}}, "approximate.max_rel_error"),
    ({"approximate": True}, "approximate"),
    ({"device": "tpu"}, "device"),
    ({"strict": "yes"}, "strict"),
])
def test_bad_options_name_the_key_and_allowed_values(options, key):
    with pytest.raises(ValueError, match=f"'{key}'") as info:
        Config.from_options(options)
    assert "allowed" in str(info.value)
    model = _gpt()
    with pytest.raises(Exception, match=f"'{key}'"):  # dynamo wraps it, the message stays
        torch.compile(model, backend="attnfuse", options=options)(torch.randint(0, 61, (1, 5)))


def test_good_options_round_trip():
    cfg = Config.from_options({"kernels": "flash", "approximate": {"max_rel_error": 0.01}, "device": "h100",
                               "inner": "eager", "strict": True})
    assert cfg.kernels == ("flash",) and cfg.device_spec().name == "h100" and cfg.strict


def test_training_through_inductor_matches_eager_gradients():
    model = _gpt().train()
    idx = torch.randint(0, 61, (2, 23))
    compiled = torch.compile(model, backend="attnfuse")
    loss_c = compiled(idx).logsumexp(-1).mean()
    loss_c.backward()
    grads_c = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(idx).logsumexp(-1).mean().backward()
    assert len(attnfuse.last_report().fused) == 2
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads_c[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_inference_under_no_grad():
    model = _gpt().eval()
    idx = torch.randint(0, 61, (2, 19))
    with torch.no_grad():
        out = torch.compile(model, backend="attnfuse")(idx)
    torch.testing.assert_close(out, model(idx), rtol=1e-5, atol=1e-5)
    assert len(attnfuse.last_report().fused) == 2


@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
def test_dynamic_sequence_length_compiles_at_most_twice(how):
    model = _gpt().eval()
    compiled = torch.compile(model, backend="attnfuse", dynamic=True if how == "dynamic=True" else None)
    counters.clear()
    for length in (9, 17, 30, 41, 55):
        idx = torch.randint(0, 61, (2, length))
        if how == "mark_dynamic":
            torch._dynamo.mark_dynamic(idx, 1)
        with torch.no_grad():
            torch.testing.assert_close(compiled(idx), model(idx), rtol=1e-5, atol=1e-5)
        assert len(attnfuse.last_report().fused) == 2
    assert counters["stats"]["unique_graphs"] <= 2  # the first compile plus at most one recompile


def _boom(*args, **kwargs):
    raise RuntimeError("injected fault")


@pytest.mark.parametrize("target", [
    (canonicalize, "canonicalize"), (match, "match"), (masks, "analyze"), (planner, "plan"),
    (rewrite, "rewrite"),
], ids=lambda t: f"{t[0].__name__.rsplit('.', 1)[-1]}.{t[1]}")
def test_a_failing_pass_leaves_the_model_working(monkeypatch, target):
    model = _gpt().eval()
    idx = torch.randint(0, 61, (2, 13))
    monkeypatch.setattr(*target, _boom)
    with torch.no_grad():
        out = torch.compile(model, backend="attnfuse")(idx)
        torch.testing.assert_close(out, model(idx), rtol=1e-5, atol=1e-5)
    report = attnfuse.last_report()
    assert not report.fused
    assert any("injected fault" in note for note in report.notes)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="injected fault"):
        torch.compile(model, backend="attnfuse", options={"strict": True})(idx)


def test_report_fields_json_round_trip_and_table(tmp_path):
    model = _gpt().eval()
    path = tmp_path / "report.json"
    with torch.no_grad():
        torch.compile(model, backend="attnfuse", options={"report": str(path)})(torch.randint(0, 61, (2, 21)))
    report = attnfuse.last_report()
    assert [s.module for s in report.sites] == ["h.0.attn", "h.1.attn"]
    site = report.sites[0]
    assert site.source.startswith("nanogpt.py:") and site.status == "fused" and site.reason is None
    assert site.kernel == "flash" and site.mask["kind"] == "causal" and site.kv_groups == 1
    assert site.shapes == {"q": [2, 2, 21, 16], "k": [2, 2, 21, 16], "v": [2, 2, 21, 16]}
    assert site.scale == pytest.approx(16 ** -0.5, rel=0, abs=0) and site.dtype == "float32"
    # on the CPU the report names the path that runs, not Triton tiles
    assert site.config == {"path": "sdpa-flash-cpu", "backward": "reference"}
    assert {c["kernel"] for c in site.candidates} >= {"flash", "eager"}
    loaded = attnfuse.Report.load(path)
    assert loaded == report
    assert json.loads(report.to_json())["sites"][1]["module"] == "h.1.attn"
    table = str(report)
    assert "2 of 2 attention sites fused" in table and "h.1.attn" in table and "causal" in table


def test_report_is_a_trace_structured_artifact(monkeypatch):
    seen = []
    monkeypatch.setattr(torch._logging, "trace_structured",
                        lambda kind, metadata_fn=dict, payload_fn=str, **kw: seen.append(
                            (kind, metadata_fn(), payload_fn())))
    with torch.no_grad():
        torch.compile(_gpt().eval(), backend="attnfuse")(torch.randint(0, 61, (1, 7)))
    (kind, meta, payload), = [s for s in seen if s[1].get("name") == "attnfuse_report"]
    assert kind == "artifact" and len(json.loads(payload)["sites"]) == 2


def test_audit_compiles_nothing_and_reports(monkeypatch):
    import torch._inductor.compile_fx as cfx

    monkeypatch.setattr(cfx, "compile_fx", _boom)
    model = _gpt().eval()
    report = attnfuse.audit(model, torch.randint(0, 61, (2, 11)))
    assert [s.status for s in report.sites] == ["fused", "fused"]
    assert report.sites[0].module == "h.0.attn"


def test_unfusable_site_is_left_as_is_with_reason():
    class Probs(torch.nn.Module):
        def forward(self, q, k, v):
            p = (q @ k.transpose(-2, -1) * 0.5).softmax(-1)
            return p @ v, p.mean()

    q, k, v = (torch.randn(2, 3, 9, 8) for _ in range(3))
    out, mean = torch.compile(Probs(), backend="attnfuse")(q, k, v)
    ref, ref_mean = Probs()(q, k, v)
    torch.testing.assert_close(out, ref)
    (site,) = attnfuse.last_report().sites
    assert site.status == "skipped" and "also used" in site.reason


def test_inner_eager_and_kernels_option():
    model = _gpt().eval()
    idx = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        out = torch.compile(model, backend="attnfuse", options={"inner": "eager", "kernels": ["window"]})(idx)
    torch.testing.assert_close(out, model(idx))
    report = attnfuse.last_report()
    # the reason is the allowed kernel's: why `window` cannot run this site
    assert not report.fused and report.sites[0].reason.startswith("needs a proven band")
