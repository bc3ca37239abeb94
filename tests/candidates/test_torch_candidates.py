"""PyTorch's kernels as candidate families (issue 17): ``sdpa`` and ``flex`` in the plan and the report, the op's
``impl`` carrying the choice, and packed-document masks run by FlexAttention without an N x N mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import attnfuse
from tests._util import assert_2x


class _Causal(torch.nn.Module):
    """Attention written out: causal via a tril buffer sliced to the length (nanoGPT)."""

    def __init__(self, n: int = 256) -> None:
        super().__init__()
        self.register_buffer("bias", torch.ones(n, n, dtype=torch.bool).tril())

    def forward(self, q, k, v):
        n = q.shape[-2]
        s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        s = s.masked_fill(~self.bias[:n, :n], float("-inf"))
        return torch.softmax(s, -1) @ v


class _Packed(torch.nn.Module):
    """Packed documents (segment ids per position) AND causal, written as HF-style index comparisons."""

    def forward(self, q, k, v, seg):
        n = q.shape[-2]
        i = torch.arange(n, device=q.device)
        keep = (seg[:, None, :, None] == seg[:, None, None, :]) & (i[None, :] <= i[:, None])
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        s = s.masked_fill(~keep, float("-inf"))
        return torch.softmax(s, -1) @ v


def _qkv(b=2, h=3, n=97, d=40, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).requires_grad_(grad) for _ in range(3)]


def _compile(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="attnfuse", options={"inner": "eager", **options})


def _rows(report):
    return {r["kernel"]: r for r in report.sites[0].candidates}


def test_both_families_are_candidates_with_reasons():
    q, k, v = _qkv()
    report = attnfuse.audit(_Causal(), q, k, v)
    rows = _rows(report)
    assert {"sdpa", "flex"} <= set(rows)
    for name in ("sdpa", "flex"):
        assert rows[name]["exact"] is True and rows[name]["est_time_s"] > 0
        assert rows[name]["allowed"] is True, rows[name]["rejected"]
    assert rows["sdpa"]["backend"] == "cpu"


def test_sdpa_runs_when_chosen():
    q, k, v = _qkv()
    out = _compile(_Causal(), kernels=["sdpa"])(q, k, v)
    site = attnfuse.last_report().sites[0]
    assert site.status == "fused" and site.kernel == "sdpa" and site.config == {"impl": "sdpa:cpu"}
    assert_2x(out, _Causal()(q, k, v), _Causal()(*(x.double() for x in (q, k, v))))


def test_sdpa_on_cpu_declines_training_with_the_reason():
    """PyTorch's CPU flash backward misses the 2x rule (attnfuse.kernels.sdpa): a site that needs gradients keeps
    attnfuse's kernels, and with only sdpa allowed it is skipped with that reason."""
    q, k, v = _qkv(grad=True)
    site = attnfuse.audit(_Causal(), q, k, v, options={"kernels": ["sdpa"]}).sites[0]
    assert site.status == "skipped" and "2x" in site.reason, site.reason


def test_flex_runs_when_chosen():
    q, k, v = _qkv()
    out = _compile(_Causal(), kernels=["flex"])(q, k, v)
    site = attnfuse.last_report().sites[0]
    assert site.kernel == "flex" and site.config == {"impl": "flex"}
    assert_2x(out, _Causal()(q, k, v), _Causal()(*(x.double() for x in (q, k, v))))


def test_the_model_keeps_its_own_kernels_by_default_on_cpu():
    """Without autotune the CPU choice is unchanged: the fitted CPU ratios do not favour PyTorch's kernels."""
    q, k, v = _qkv()
    _compile(_Causal())(q, k, v)
    assert attnfuse.last_report().sites[0].kernel == "flash"


def _segments(b, n, seed, sort=True):
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(0, 4, (b, n), generator=g)
    return seg.sort(-1).values if sort else seg


def test_packed_documents_run_in_flex_without_a_dense_mask():
    q, k, v = _qkv(n=200, d=32)
    seg = _segments(2, 200, 1)
    report = attnfuse.audit(_Packed(), q, k, v, seg, options={"kernels": ["flex"]})
    site = report.sites[0]
    assert site.status == "fused" and site.kernel == "flex", site.reason
    assert set(site.mask["kind"].split("+")) == {"documents", "causal"}, site.mask
    after = "\n".join(site.subgraph["after"])
    assert "doc" in after and "eq" not in after, after  # the (L, L) comparison is gone from the rewritten region
    compiled = _compile(_Packed(), kernels=["flex"])
    for sort in (True, False):  # a new call's segments: the block mask is built per call
        seg = _segments(2, 200, 3, sort)
        out = compiled(q, k, v, seg)
        assert_2x(out, _Packed()(q, k, v, seg), _Packed()(q.double(), k.double(), v.double(), seg))


def test_packed_documents_stay_dense_for_other_kernels():
    q, k, v = _qkv(n=200, d=32)
    seg = _segments(2, 200, 1)
    site = attnfuse.audit(_Packed(), q, k, v, seg, options={"kernels": ["flash"]}).sites[0]
    assert site.kernel == "flash" and "documents" not in site.mask["kind"]
    rows = _rows(attnfuse.audit(_Packed(), q, k, v, seg))
    assert rows["flex"]["allowed"] is True


def test_sdpa_declines_what_it_cannot_compute():
    class Softcap(torch.nn.Module):
        def forward(self, q, k, v):
            s = q @ k.transpose(-1, -2) / 8
            return torch.softmax(30 * torch.tanh(s / 30), -1) @ v

    q, k, v = _qkv()
    rows = _rows(attnfuse.audit(Softcap(), q, k, v))
    assert rows["sdpa"]["allowed"] is False and "softcap" in rows["sdpa"]["rejected"]
    assert rows["flex"]["allowed"] is True  # a score_mod


def test_sdpa_form_site_with_padding_keeps_sdpas_dead_rows():
    """An SDPA call whose key padding leaves a row with no key: SDPA's own convention (0) is what eager gave."""
    q, k, v = _qkv(n=33)
    keep = torch.ones(2, 1, 1, 33, dtype=torch.bool)
    keep[1, ..., :] = False
    keep[0, ..., 5:] = False

    def f(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    out = _compile(f, kernels=["sdpa"])(q, k, v, keep)
    assert attnfuse.last_report().sites[0].kernel == "sdpa"
    eager = f(q, k, v, keep)
    assert torch.equal(torch.isnan(out), torch.isnan(eager))
    assert_2x(out, eager, f(q.double(), k.double(), v.double(), keep))


def test_autotune_through_the_backend_records_measurements(tmp_path):
    """options["autotune"]: the compile times the allowed exact candidates on the CPU, records ``measured_s`` and
    the cache; the second compile reads the cache (no timing) and chooses the same."""
    q, k, v = _qkv(n=64, d=32)
    options = {"autotune": {"cache": str(tmp_path / "tune.json"), "reps": 2, "warmup": 0}}
    out = _compile(_Causal(), **options)(q, k, v)
    site = attnfuse.last_report().sites[0]
    assert site.status == "fused" and site.autotune["cache"] == "miss" and site.autotune["measured"] == "forward"
    rows = _rows(attnfuse.last_report())
    measured = {name: r["measured_s"] for name, r in rows.items() if r.get("measured_s") is not None}
    assert {"flash", "sdpa", "flex"} <= set(measured) and all(t > 0 for t in measured.values()), measured
    assert site.kernel == min(measured, key=measured.get)  # a strict minimum on a noisy machine: no ties here
    assert_2x(out, _Causal()(q, k, v), _Causal()(*(x.double() for x in (q, k, v))))
    assert (tmp_path / "tune.json").exists()
    _compile(_Causal(), **options)(q, k, v)
    again = attnfuse.last_report().sites[0]
    assert again.autotune["cache"] == "hit" and again.kernel == site.kernel


def test_flex_trains_on_the_cpu_with_its_blocked_backward():
    q, k, v = _qkv(n=97, d=40, grad=True)
    seg = _segments(2, 97, 5, sort=False)
    out = _compile(_Packed(), kernels=["flex"])(q, k, v, seg)
    site = attnfuse.last_report().sites[0]
    assert site.kernel == "flex" and "documents" in site.mask["kind"]
    eager = _Packed()(q, k, v, seg)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = _Packed()(qd, kd, vd, seg)
    assert_2x(out, eager, ref)
    for ours, e, r, name in zip(torch.autograd.grad(out.sum(), (q, k, v)),
                                torch.autograd.grad(eager.sum(), (q, k, v)),
                                torch.autograd.grad(ref.sum(), (qd, kd, vd)), "qkv"):
        assert_2x(ours, e, r, f"d{name}")


def test_dynamic_lengths_keep_one_implementation_per_site():
    torch._dynamo.reset()
    compiled = torch.compile(_Causal(), backend="attnfuse", dynamic=True, options={"inner": "eager",
                                                                                 "kernels": ["sdpa", "flex"]})
    for n in (40, 77, 130):
        q, k, v = _qkv(n=n, d=32, seed=n)
        out = compiled(q, k, v)
        assert_2x(out, _Causal()(q, k, v), _Causal()(*(x.double() for x in (q, k, v))))
    site = attnfuse.last_report().sites[0]
    assert site.kernel in ("sdpa", "flex") and site.table
    assert {row["kernel"] for row in site.table} == {site.kernel}


def test_unused_document_ids_leave_no_nodes_behind():
    """The analysis emits the (B, 2, L) document ids for every such site; where flex is not chosen the rewrite
    erases them, so the rewritten graph computes nothing the original did not (beyond the fused op)."""
    from attnfuse.backend import transform
    from attnfuse.config import Config
    from attnfuse.report import Report

    graphs = []

    def capture(kernels):
        def backend(gm, example_inputs):
            out = transform(gm, example_inputs, Config.from_options({"kernels": kernels}), Report())
            graphs.append(out)
            return out
        return backend

    q, k, v = _qkv(n=64, d=32)
    seg = _segments(2, 64, 2)
    for kernels in (["flash"], ["flex"]):
        torch._dynamo.reset()
        torch.compile(_Packed(), backend=capture(kernels))(q, k, v, seg)
    flash_graph, flex_graph = graphs
    targets = {n.target for n in flash_graph.graph.nodes}
    assert torch.stack not in targets and torch.ops.attnfuse.attention.default in targets
    doc = [n for n in flex_graph.graph.nodes if n.target is torch.ops.attnfuse.attention.default][0].kwargs["doc"]
    assert doc.target is torch.stack
