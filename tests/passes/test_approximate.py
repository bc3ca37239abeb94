"""The approximation policy through the backend: opt-in only, calibrated on the example inputs, within the
budget, reported; and the op's per-call table for dynamic lengths (no recompile)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import attnfuse
from attnfuse.costmodel import lshknobs
from attnfuse.kernels import lsh, topk

TOPK = {"topk": 32, "block": 32, "sink": 32, "local": 32}
# every LSH setting given: calibration measures these only (the cost model's ladder, `lshknobs`, is fully pinned)
LSH = {"tables": 4, "bits": 3, "probes": 0, "cap": 64, "block": 32, "sink": 32, "local": 32, "seed": 0}


class Causal(nn.Module):
    """A causal self-attention layer written the way user code does (SDPA with is_causal)."""

    def __init__(self, dim: int = 32, heads: int = 2, mask: bool = False):
        super().__init__()
        self.heads, self.mask = heads, mask
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.attend = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward(self, x, pad=None):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if pad is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=pad[:, None, None, :])
        else:
            out = self.attend(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def _model(seed: int = 0, **kw) -> Causal:
    torch.manual_seed(seed)
    return Causal(**kw).eval()


def _compile(model, options, dynamic=False):
    torch._dynamo.reset()
    return torch.compile(model, backend="attnfuse", options={"inner": "eager", **options}, dynamic=dynamic)


def _x(n: int, seed: int = 1) -> torch.Tensor:
    """Tokens drawn from 8 clusters: attention has structure for the approximate kernels to find."""
    gen = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    return centers[torch.randint(0, 8, (2, n), generator=gen)] + 0.3 * torch.randn(2, n, 32, generator=gen)


def _swapped(model: Causal, fn) -> Causal:
    """The same model with its attention replaced by ``fn`` (the expected result of the rewrite)."""
    other = _model()
    other.load_state_dict(model.state_dict())
    other.attend = fn
    return other


def test_exact_unless_the_user_opts_in():
    model, x = _model(), _x(256)
    with torch.no_grad():
        out = _compile(model, {})(x)
    site = attnfuse.last_report().sites[0]
    assert site.kernel == "flash" and site.error is None
    rows = {c["kernel"]: c for c in site.candidates}
    assert "opt-in" in rows["topk"]["rejected"] and "opt-in" in rows["lsh"]["rejected"]
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,params", [("topk", TOPK), ("lsh", LSH)])
def test_a_calibrated_family_runs_and_reports_its_error(family, params):
    model, x = _model(), _x(256)
    options = {"kernels": [family], "approximate": {"max_rel_error": 0.5, "families": [family], family: params}}
    with torch.no_grad():
        out = _compile(model, options)(x)
        site = attnfuse.last_report().sites[0]
        assert site.status == "fused" and site.kernel == family and site.config == params
        assert 0 < site.error <= 0.5
        mod = {"topk": topk, "lsh": lsh}[family]
        want = _swapped(model, lambda q, k, v: mod.attention(q, k, v, causal=True, **params))(x)
        exact = model(x)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert (out - exact).abs().max() > 1e-3  # a real approximation at this size: 4 of 8 key blocks at most
    rows = {c["kernel"]: c for c in site.candidates}
    assert rows[family]["error"] == site.error and rows[family]["rejected"] is None


def test_a_tight_budget_rejects_and_the_report_says_why():
    model, x = _model(), _x(256)
    options = {"approximate": {"max_rel_error": 1e-4, "topk": TOPK, "lsh": LSH}}
    with torch.no_grad():
        out = _compile(model, options)(x)
    site = attnfuse.last_report().sites[0]
    assert site.kernel == "flash"
    rows = {c["kernel"]: c for c in site.candidates}
    for family in ("topk", "lsh"):
        assert rows[family]["error"] > 1e-4
        assert "exceeds max_rel_error 0.0001" in rows[family]["rejected"]
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


def test_the_cost_models_lsh_knobs_are_calibrated_in_order_and_reported(tmp_path):
    """No LSH settings given: the ladder at the example's 1000 keys (`lshknobs.ladder`) is measured cheapest first,
    the first level within the budget runs, and the report records its knobs (bits resolved) and every try."""
    model, x, budget = _model(), _x(1000), 0.01
    options = {"approximate": {"max_rel_error": budget, "families": ["lsh"]}, "kernels": ["lsh"]}
    with torch.no_grad():
        out = _compile(model, options)(x)
        report = attnfuse.last_report()
        site = report.sites[0]
        row = {c["kernel"]: c for c in site.candidates}["lsh"]
        ladder = lshknobs.ladder(1000, budget, {}, 64)
        tried = row["tried"]
        assert len(ladder) == 3 and 2 <= len(tried) <= 3  # level 0 (cap 256 of 1000 keys) misses the budget here
        assert [t["params"] for t in tried] == [{**p, "bits": lsh.auto_bits(-1, 1000)} for p in ladder[:len(tried)]]
        assert all(t["error"] > budget for t in tried[:-1]) and 0 < tried[-1]["error"] <= budget
        chosen = ladder[len(tried) - 1]
        assert site.kernel == "lsh" and site.config == chosen and site.error == tried[-1]["error"] == row["error"]
        assert row["params"] == {**chosen, "bits": 8} and row["rejected"] is None  # round(log2(1000 / 4)) bits
        want = _swapped(model, lambda q, k, v: lsh.attention(q, k, v, causal=True, **chosen))(x)
        exact = model(x)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert (out - exact).abs().max() > 1e-4  # an approximation, within the budget
    knobs = f"tables={chosen['tables']} bits=8 probes={chosen['probes']} cap={chosen['cap']}"
    assert f"lsh (err {site.error:.2g}; {knobs})" in str(report)
    again = {c["kernel"]: c for c in attnfuse.Report.from_json(report.to_json()).sites[0].candidates}["lsh"]
    assert again["tried"] == tried and again["params"] == row["params"]
    page = report.to_html(tmp_path / "r.html").read_text()
    assert f"tables={chosen['tables']} bits=8 probes={chosen['probes']} cap={chosen['cap']}" in page
    assert "calibrated level 0" in page and f"error {tried[0]['error']:.3g}" in page


def test_an_lsh_budget_no_level_meets_stays_exact_and_says_why():
    model, x, budget = _model(), _x(3000), 0.005
    options = {"approximate": {"max_rel_error": budget, "families": ["lsh"]}, "kernels": ["flash", "lsh"]}
    with torch.no_grad():
        out = _compile(model, options)(x)
    site = attnfuse.last_report().sites[0]
    row = {c["kernel"]: c for c in site.candidates}["lsh"]
    ladder = lshknobs.ladder(3000, budget, {}, 64)  # tight: level 0 skipped
    assert site.kernel == "flash" and site.error is None and [p["tables"] for p in ladder] == [24, 32]  # 16 base
    assert [t["params"]["cap"] for t in row["tried"]] == [p["cap"] for p in ladder]  # every level measured
    best = min(t["error"] for t in row["tried"])
    assert best > budget and row["error"] == best
    assert row["rejected"] == (f"calibrated error {best:.3g} (the best of 2 LSH settings tried) exceeds "
                               f"max_rel_error {budget:g} on the example inputs")
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


def test_calibration_does_not_repeat_the_graphs_in_place_writes():
    # calibration runs the graph up to the site on the example inputs: a counter written in place before it
    # must still be incremented once per call (effects.capture copies what in-place ops write)
    model, x = _model(), _x(256)

    def fn(x, counter):
        counter.add_(1.0)
        return model(x)

    options = {"approximate": {"max_rel_error": 1e-4, "topk": TOPK, "lsh": LSH}}
    counter = torch.zeros(3)
    with torch.no_grad():
        out = _compile(fn, options)(x, counter)
    assert [c["kernel"] for c in attnfuse.last_report().sites[0].candidates if "error" in c]  # calibrated
    torch.testing.assert_close(counter, torch.ones(3))
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


def test_top_k_covering_every_key_is_exact_and_accepted_under_a_tiny_budget():
    model, x = _model(), _x(100)
    options = {"kernels": ["topk"], "approximate": {"max_rel_error": 1e-5, "families": ["topk"],
                                                    "topk": {"topk": 128, "block": 32}}}
    with torch.no_grad():
        out = _compile(model, options)(x)
    site = attnfuse.last_report().sites[0]
    assert site.kernel == "topk" and site.error < 1e-6
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


def test_masked_sites_are_not_approximated():
    model, x = _model(mask=True), _x(96)
    pad = torch.ones(2, 96, dtype=torch.bool)
    pad[1, 80:] = False
    options = {"kernels": ["topk", "flash"], "approximate": {"max_rel_error": 0.5, "topk": TOPK}}
    with torch.no_grad():
        out = _compile(model, options)(x, pad)
    site = attnfuse.last_report().sites[0]
    assert site.kernel == "flash"
    assert "mask" in {c["kernel"]: c for c in site.candidates}["topk"]["rejected"]
    torch.testing.assert_close(out, model(x, pad), rtol=1e-5, atol=1e-5)


def test_dynamic_lengths_consult_the_table_per_call_without_recompiling():
    """H100 estimates make top-k pay off only at long keys: the table sends short calls to the exact kernel."""
    model = _model()
    options = {"device": "h100", "kernels": ["flash", "topk"],
               "approximate": {"max_rel_error": 0.9, "families": ["topk"], "topk": TOPK}}
    compiled = _compile(model, options, dynamic=True)
    counters.clear()
    with torch.no_grad():
        compiled(_x(300))
        site = attnfuse.last_report().sites[0]
        table = site.table
        assert [row["kernel"] for row in table][0] == "flash" and table[-1]["kernel"] == "topk"
        cut = table[-1]["kv_len"][0]
        short, long = 80, cut + 37
        want_long = _swapped(model, lambda q, k, v: topk.attention(q, k, v, causal=True, **TOPK))(_x(long))
        torch.testing.assert_close(compiled(_x(short)), model(_x(short)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(_x(long)), want_long, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] <= 2  # the first (static) compile and one dynamic graph


def test_the_op_reads_its_table():
    q, k, v = (torch.randn(1, 2, 150, 16) for _ in range(3))
    table = json.dumps({"table": [[0, 100, "exact"], [100, -1, "topk"]], "params": {"topk": TOPK}})
    out = torch.ops.attnfuse.attention(q, k, v, causal=True, approx=table)[0]
    torch.testing.assert_close(out, topk.attention(q, k, v, causal=True, **TOPK))
    short = torch.ops.attnfuse.attention(q[:, :, :90], k[:, :, :90], v[:, :, :90], causal=True, approx=table)[0]
    torch.testing.assert_close(short, F.scaled_dot_product_attention(q[:, :, :90], k[:, :, :90], v[:, :, :90],
                                                                     is_causal=True))


def test_the_op_backward_runs_the_table_family():
    q, k, v = (torch.randn(1, 2, 120, 16, requires_grad=True) for _ in range(3))
    table = json.dumps({"table": [[0, -1, "lsh"]], "params": {"lsh": LSH}})
    grads = torch.autograd.grad(torch.ops.attnfuse.attention(q, k, v, causal=True, approx=table)[0].sum(), (q, k, v))
    want = torch.autograd.grad(lsh.attention(q, k, v, causal=True, **LSH).sum(), (q, k, v))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_bad_approximate_options_raise():
    for bad, key in [({"max_rel_error": 0.1, "families": ["magic"]}, "approximate.families"),
                     ({"max_rel_error": 0.1, "topk": {"k": 5}}, "approximate.topk.k"),
                     ({"max_rel_error": 0.1, "lsh": {"tables": 0}}, "approximate.lsh.tables"),
                     ({"max_rel_error": 0.1, "lsh": {"n_hashes": 4}}, "approximate.lsh.n_hashes"),
                     ({"max_rel_error": 0.1, "calibration": {"max_rows": "all"}}, "approximate.calibration.max_rows")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            attnfuse.Config.from_options({"approximate": bad})
