"""Tensor Product Attention sites: the matcher proves q/k/v per-token products of factors (`passes._tpa`), the
``tpa`` family runs them from the factors, and the negative twins stay as they were.

Spellings: the T6 reference's ``bmm`` + ``.div_(R)`` + views, a 4-D ``matmul`` and an ``einsum`` (the T6-style
model in benchmarks/t6_model.py), K/V only, and the graph (matmul-softmax-matmul) form.  Twins: the formed K also
returned (read elsewhere), a batch-broadcast product (not per token), a product over the wrong axes.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attnfuse
from attnfuse.costmodel import plan as planner
from attnfuse.device import PRESETS
from tests.kernels._helpers import seed_case

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from t6_model import SPELLINGS, T6  # noqa: E402

B, T, H, R, D = 2, 23, 4, 2, 16


def _compiled(fn, *args, kernels=("tpa",)):
    torch._dynamo.reset()
    out = torch.compile(fn, backend="attnfuse", options={"kernels": list(kernels)})(*args)
    return out, attnfuse.last_report()


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_t6_spellings_run_from_factors(spelling):
    """Every spelling of the T6 block is a tpa site (q, k and v factorized, the ranks in the report), and the
    compiled model's logits and parameter gradients equal eager's."""
    seed_case("tpa-t6", spelling)
    model = T6(vocab=40, dim=48, layers=2, heads=H, head_dim=D, q_rank=3, rank=R, spelling=spelling)
    tokens = torch.randint(0, 40, (B, T))
    want = model(tokens)
    got, report = _compiled(model, tokens)
    assert [s.kernel for s in report.sites] == ["tpa", "tpa"], [(s.kernel, s.reason) for s in report.sites]
    factors = report.sites[0].config["factors"]
    assert {k: v["rank"] for k, v in factors.items()} == {"q": 3, "k": R, "v": R}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_want = torch.autograd.grad(want.sum(), list(model.parameters()))
    g_got = torch.autograd.grad(got.sum(), list(model.parameters()))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _kv_only(x_a, x_b, q):
    k = torch.bmm(x_a.view(B * T, H, R), x_b.view(B * T, R, D)).div_(R).view(B, T, H, D).transpose(1, 2)
    v = (torch.matmul(x_a * 0.5, x_b) / R).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _graph_form(x_a, x_b, q):
    k = torch.einsum("bthr,btrd->bhtd", x_a, x_b) * (1.0 / R)
    v = torch.einsum("bthr,btrd->bthd", x_a, x_b).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / D ** 0.5
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("fn", [_kv_only, _graph_form], ids=["kv_only_sdpa", "einsum_graph_form"])
def test_partial_and_graph_forms(fn):
    seed_case("tpa-forms", fn.__name__)
    x_a, x_b, q = torch.randn(B, T, H, R), torch.randn(B, T, R, D), torch.randn(B, H, T, D)
    got, report = _compiled(fn, x_a, x_b, q)
    assert [s.kernel for s in report.sites] == ["tpa"], [(s.kernel, s.reason) for s in report.sites]
    assert set(report.sites[0].config["factors"]) == {"k", "v"}
    torch.testing.assert_close(got, fn(x_a, x_b, q), rtol=1e-5, atol=1e-5)


def _k_read_elsewhere(x_a, x_b, q):
    k = (torch.matmul(x_a, x_b) / R).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, k), k  # the formed K is an output too


def _batch_broadcast(x_a, x_b, q):
    k = (torch.matmul(x_a, x_b[:1]) / R).transpose(1, 2)  # b broadcast over the batch: not per token
    return F.scaled_dot_product_attention(q, k, k)


@pytest.mark.parametrize("fn", [_k_read_elsewhere, _batch_broadcast], ids=["formed_k_returned", "batch_broadcast"])
def test_negative_twins_are_not_tpa(fn):
    """The formed tensor is read elsewhere, or the product broadcasts over the batch: no tpa candidate (its row
    says why), the site runs another kernel, results equal eager's."""
    seed_case("tpa-twin", fn.__name__)
    x_a, x_b, q = torch.randn(B, T, H, R), torch.randn(B, T, R, D), torch.randn(B, H, T, D)
    got, report = _compiled(fn, x_a, x_b, q, kernels=("flash", "tpa"))
    site = report.sites[0]
    assert site.kernel == "flash"
    row = next(r for r in site.candidates if r["kernel"] == "tpa")
    assert "per-token factors" in row["rejected"]
    want = fn(x_a, x_b, q)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec_name", ["h100", "cpu"])
def test_cost_model_prefers_tpa_for_long_decode(spec_name):
    """The candidate's estimate: a decode step over a 32k factor cache is memory-bound (tpa reads R*(Hk+D) numbers
    per token instead of Hk*D, and the other kernels also pay forming K/V: it wins); on the CPU a 4k prefill runs
    the blocked path, measured ~7x PyTorch's fused kernel (it loses).  Both rows carry their estimates."""
    spec = PRESETS[spec_name]
    structure = {"tpa": {"ranks": (0, 2, 2)}}

    def plan(lq, lk, causal):
        shape = {"batch": 1, "heads": 32, "kv_heads": 32, "q_len": lq, "kv_len": lk, "head_dim": 128,
                 "v_head_dim": 128, "elem": 2, "causal": causal}
        p = planner.plan(shape, spec, ("flash", "tpa"), structure=structure)
        rows = {r["kernel"]: r for r in p.candidates}
        assert rows["tpa"]["est_time_s"] and rows["flash"]["est_time_s"] and rows["flash"]["forms_factors"]
        return p.kernel, rows["tpa"]["hbm_bytes"] / rows["flash"]["hbm_bytes"]

    kernel, ratio = plan(1, 32768, False)
    assert kernel == "tpa" and ratio < 0.5, (kernel, ratio)
    if spec_name == "cpu":
        assert plan(4096, 4096, True)[0] == "flash"


def test_decode_over_a_factor_cache():
    """A decode step of the T6 model over its cache of factors (one new token against 300 cached ones, the cache
    concatenated as the model does): a tpa site on the decode path, reading factors only; logits equal eager's."""
    seed_case("tpa-decode-step")
    model = T6(vocab=40, dim=48, layers=2, heads=H, head_dim=D, q_rank=3, rank=R)
    cache = model.random_cache(B, 300, torch.Generator().manual_seed(5))
    token = torch.randint(0, 40, (B, 1))
    with torch.no_grad():
        want = model.generate_step(token, copy.deepcopy(cache))
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="attnfuse", options={"kernels": ["tpa"]})
        got = model.generate_step(token, copy.deepcopy(cache), fn=compiled)
    report = attnfuse.last_report()
    assert [s.kernel for s in report.sites] == ["tpa", "tpa"], [(s.kernel, s.reason) for s in report.sites]
    assert report.sites[0].config["path"].startswith("decode")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
