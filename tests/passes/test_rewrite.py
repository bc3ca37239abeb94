"""The rewrite replaces every fused region, also where one site's output is the next one's operand."""

from __future__ import annotations

import torch
from _harness import check


def _attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v


def _chained_q(q, k, v):
    for _ in range(3):  # each output is the next query, with no residual between them
        q = _attention(q, k, v)
    return q


def _chained_kv(q, k, v):
    k = _attention(k, q, v)  # the first output is the second site's key and the third site's value
    v = _attention(v, k, q)
    return _attention(q, k, v)


def test_chained_sites_each_run_as_one_op():
    for fn in (_chained_q, _chained_kv):
        q, k, v = (torch.randn(2, 3, 37, 40) for _ in range(3))
        res = check(fn, (q, k, v))
        assert len(res.report.fused) == 3 and not res.report.skipped, str(res.report)
        assert len(res.calls) == 3, f"{fn.__name__}: the report says 3 fused, the graph ran {len(res.calls)} ops"


def test_an_unfused_site_between_fused_ones_stays_eager():
    def fn(q, k, v):  # the middle softmax's mask is computed from its own scores: skipped, the others fused
        q = _attention(q, k, v)
        s = q @ k.transpose(-2, -1)
        q = torch.softmax(s.masked_fill(s < 0, -1e4), dim=-1) @ v
        return _attention(q, k, v)

    q, k, v = (torch.randn(2, 3, 29, 24) for _ in range(3))
    res = check(fn, (q, k, v))
    assert sorted(s.status for s in res.report.sites) == ["fused", "fused", "skipped"], str(res.report)
    assert "depends on the scores" in res.report.skipped[0].reason
    assert len(res.calls) == 2
