"""The normal form: rewrites that expose a matmul/softmax, and the canonical reader."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

import attnfuse
from attnfuse.passes.canonicalize import canon, canonicalize, scalar


def _capture(fn, *args) -> fx.GraphModule:
    """Dynamo's graph of ``fn``; ``gm.inputs`` are its example inputs in placeholder order."""
    graphs = []

    def backend(gm, example_inputs):
        gm.inputs = list(example_inputs)
        graphs.append(gm)
        return gm

    torch.compile(fn, backend=backend)(*args)
    (gm,) = graphs
    return gm


def _kinds(gm) -> list[str]:
    return [canon(n).kind for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def test_exp_minus_logsumexp_becomes_softmax_and_fuses():
    def f(q, k, v):
        s = q @ k.transpose(-2, -1) * 0.3
        return torch.exp(s - torch.logsumexp(s, dim=-1, keepdim=True)) @ v

    q, k, v = (torch.randn(2, 3, 11, 8) for _ in range(3))
    gm = canonicalize(_capture(f, q, k, v))
    assert "softmax" in _kinds(gm) and not any(n.target is torch.logsumexp for n in gm.graph.nodes)
    torch.testing.assert_close(gm(*gm.inputs)[0], f(q, k, v))
    out = torch.compile(f, backend="attnfuse", options={"inner": "eager"})(q, k, v)
    torch.testing.assert_close(out, f(q, k, v))
    assert len(attnfuse.last_report().fused) == 1


def test_log_softmax_that_weights_nothing_is_left_alone():
    def f(x):
        return torch.exp(x - torch.logsumexp(x, dim=-1, keepdim=True)).sum(-1)

    gm = canonicalize(_capture(f, torch.randn(4, 5)))
    assert "softmax" not in _kinds(gm)


def test_einsum_becomes_permute_matmul_only_near_a_softmax():
    def f(q, k, v, w):
        s = torch.einsum("bqhd,bkhd->bhqk", q, k)
        unrelated = torch.einsum("bqhd,de->bqhe", q, w)
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v), unrelated

    q, k, v = (torch.randn(2, 7, 3, 8) for _ in range(3))
    w = torch.randn(8, 5)
    gm = canonicalize(_capture(f, q, k, v, w))
    kinds = _kinds(gm)
    assert kinds.count("matmul") == 2 and sum(n.target is torch.einsum for n in gm.graph.nodes) == 1
    for got, want in zip(gm(*gm.inputs), f(q, k, v, w)):
        torch.testing.assert_close(got, want)


def test_baddbmm_becomes_scaled_matmul_plus_input():
    def f(m, a, b, v):
        return torch.bmm(torch.baddbmm(m, a, b, beta=1.0, alpha=0.5).softmax(-1), v)

    m, a, b, v = torch.randn(1, 9, 9), torch.randn(6, 9, 4), torch.randn(6, 4, 9), torch.randn(6, 9, 4)
    gm = canonicalize(_capture(f, m, a, b, v))
    assert "baddbmm" not in {getattr(n.target, "__name__", "") for n in gm.graph.nodes}
    torch.testing.assert_close(gm(*gm.inputs)[0], f(m, a, b, v))


def test_canon_reads_spellings_into_one_vocabulary():
    def f(x, y):
        a = x.transpose(-2, -1)
        b = x.mT
        c = torch.permute(x, (0, 2, 1))
        d = x * 0.5
        e = 2.0 * x
        g = x / torch.full([], 4.0)
        h = torch.nn.functional.softmax(x, dim=-1, dtype=torch.float32)
        i = x.double().softmax(-1).float()
        j = torch.nn.functional.dropout(x, 0.1, training=False)
        return a, b, c, d, e, g, h, i, j, x @ y

    gm = _capture(f, torch.randn(2, 3, 4), torch.randn(2, 4, 3))
    ops = {n.name: canon(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    kinds = [op.kind for op in ops.values()]
    assert kinds.count("permute") == 3 and kinds.count("softmax") == 2 and "matmul" in kinds
    scales = [op.args[1:] for op in ops.values() if op.kind == "scale"]
    assert (0.5, False) in scales and (2.0, False) in scales and (4.0, True) in scales
    assert kinds.count("cast") >= 2 and kinds.count("identity") >= 1  # dropout(training=False) is identity


def test_scalar_reader():
    assert scalar(3) == 3.0 and scalar(True) is None and scalar("x") is None
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["example_value"] = torch.randn(3)
    assert scalar(x) is None
    y = g.call_function(operator.mul, (x, 2))
    assert canon(y).args == (x, 2.0, False)  # read from x's example value
    z = g.call_function(operator.mul, (g.placeholder("w"), 2))
    assert canon(z).kind == "other"  # no example value: nothing to read
