"""The ``attnfuse`` logger: INFO per graph and per skipped site, DEBUG plans, one WARNING per pass failure,
``TORCH_LOGS`` / ``set_logs`` switch it on, nothing is printed otherwise."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import attnfuse
from attnfuse import _logs
from attnfuse.passes import rewrite

SOFTMAX_LINE = 0  # set below: the line of Probs' softmax, the skipped site's source


class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) * 0.5).softmax(-1) @ v


class Probs(torch.nn.Module):
    def forward(self, q, k, v):
        p = (q @ k.transpose(-2, -1) * 0.5).softmax(-1)  # skipped: p is also returned
        return p @ v, p.mean()


class Two(torch.nn.Module):
    """One fusable site (``fused``) and one that must stay as it is (``probs``)."""

    def __init__(self):
        super().__init__()
        self.fused, self.probs = Attn(), Probs()

    def forward(self, q, k, v):
        o, m = self.probs(q, k, v)
        return self.fused(q, k, v) + o + m


with open(__file__) as _f:
    SOFTMAX_LINE = next(i for i, line in enumerate(_f, 1) if "# skipped: p is also returned" in line)


def _inputs():
    return tuple(torch.randn(2, 3, 11, 8, dtype=torch.float64) for _ in range(3))


def _records(caplog, level):
    return [r for r in caplog.records if r.name.startswith("attnfuse") and r.levelno == level]


def test_graph_skipped_site_and_plan_records(caplog):
    caplog.set_level(logging.DEBUG, logger="attnfuse")
    q, k, v = _inputs()
    model = Two()
    out = torch.compile(model, backend="attnfuse", options={"inner": "eager"})(q, k, v)
    torch.testing.assert_close(out, model(q, k, v), rtol=1e-12, atol=1e-12)
    report = attnfuse.last_report()
    assert [(s.module, s.status) for s in report.sites] == [("fused", "fused"), ("probs", "skipped")]

    info = [r.getMessage() for r in _records(caplog, logging.INFO)]
    graph, skipped = info  # exactly one summary line and one line per skipped site
    assert re.fullmatch(r"attnfuse: graph \d+: 1 of 2 attention sites fused \(flash×1\)", graph)
    index = graph.split()[2].rstrip(":")
    site = report.sites[1]
    assert skipped == (f"attnfuse: graph {index}: skipped site 1 in probs at test_logging.py:{SOFTMAX_LINE}: "
                       f"{site.reason}")
    assert site.reason.startswith("the attention probabilities are also used by")

    (plan,) = [r.getMessage() for r in _records(caplog, logging.DEBUG)]
    config = " ".join(f"{k}={v}" for k, v in report.sites[0].config.items())
    assert plan.startswith(f"attnfuse: graph {index}: plan for site 0 (fused at test_logging.py:"
                           f"{Attn.forward.__code__.co_firstlineno + 1}): flash config {config}; ")
    assert "shapes q/k/v 2x3x11x8 2x3x11x8 2x3x11x8 float64, mask none" in plan
    for c in report.sites[0].candidates:
        assert f"{c['kernel']} ({'exact' if c['exact'] else 'approximate'}" in plan
        if c["rejected"]:
            assert f"rejected: {c['rejected']}" in plan
    assert not _records(caplog, logging.WARNING)


def test_audit_graph_line(caplog):
    caplog.set_level(logging.INFO, logger="attnfuse")
    attnfuse.audit(Two(), *_inputs(), options={"verify": False})
    (graph, _) = [r.getMessage() for r in _records(caplog, logging.INFO)]
    assert re.fullmatch(r"attnfuse: graph \d+: 1 of 2 attention sites fusable \(audit: nothing compiled\) "
                        r"\(flash×1\)", graph)
    assert not _records(caplog, logging.DEBUG)  # INFO asked: no plans


def _boom(*args, **kwargs):
    raise RuntimeError("injected pass bug\nsecond line")


def test_a_failing_pass_warns_once(caplog, monkeypatch):
    caplog.set_level(logging.DEBUG, logger="attnfuse")
    monkeypatch.setattr(_logs, "_FAILURES", set())
    monkeypatch.setattr(rewrite, "rewrite", _boom)
    q, k, v = _inputs()
    model = Two()
    for _ in range(2):  # compiled twice (a fresh dynamo cache), and each compiled model called twice
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="attnfuse", options={"inner": "eager"})
        for _ in range(2):
            torch.testing.assert_close(compiled(q, k, v), model(q, k, v), rtol=1e-12, atol=1e-12)
        assert not attnfuse.last_report().fused
    (warning,) = [r.getMessage() for r in _records(caplog, logging.WARNING)]
    line = _boom.__code__.co_firstlineno + 1
    assert re.fullmatch(rf"attnfuse: graph \d+: a pass raised RuntimeError: injected pass bug \(at transform "
                        rf"backend.py:\d+ -> _boom test_logging.py:{line}\); the graph runs unchanged, none of its "
                        r"attention sites is fused\. .*"
                        r"options=\{'strict': True\} raises it instead", warning)
    debug = [r.getMessage() for r in _records(caplog, logging.DEBUG)]
    assert sum("a pass raised RuntimeError: injected pass bug again" in m for m in debug) == 1
    assert sum(m.endswith("the pass failure's traceback") for m in debug) == 2
    graphs = [r.getMessage() for r in _records(caplog, logging.INFO) if "attention sites fused" in r.getMessage()]
    assert len(graphs) == 2 and all(g.endswith("0 of 2 attention sites fused; a pass failed, the graph runs "
                                               "unchanged") for g in graphs)
    # the report keeps its own wording
    assert any(n.startswith("a pass raised RuntimeError: injected pass bug") for n in attnfuse.last_report().notes)


SCRIPT = textwrap.dedent('''
    import logging, os, sys
    import torch

    def attn(q, k, v):
        return (q @ k.transpose(-2, -1) * 0.5).softmax(-1) @ v

    def probs(q, k, v):
        p = (q @ k.transpose(-2, -1) * 0.5).softmax(-1)
        return p @ v + p.mean()

    x = [torch.randn(1, 2, 5, 4) for _ in range(3)]
    torch.compile(lambda q, k, v: attn(q, k, v) + probs(q, k, v), backend="attnfuse",
                  options={"inner": "eager"})(*x)
    from attnfuse.passes import rewrite

    def boom(*args, **kwargs):
        raise RuntimeError("injected pass bug")

    rewrite.rewrite, real = boom, rewrite.rewrite
    torch.compile(lambda q, k, v: attn(q, k, v) * 2, backend="attnfuse", options={"inner": "eager"})(*x)
    rewrite.rewrite = real
    if "TORCH_LOGS" not in os.environ:
        print("--- set_logs", file=sys.stderr, flush=True)
        torch._logging.set_logs(modules={"attnfuse": logging.INFO})
        torch.compile(lambda q, k, v: attn(q, k, v) * 3, backend="attnfuse", options={"inner": "eager"})(*x)
''')


def _line(text: str, marker: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if marker in line)


@pytest.mark.parametrize("torch_logs", [None, "attnfuse", "+attnfuse"])
def test_torch_logs_switches_the_logger_on(tmp_path, torch_logs):
    script = tmp_path / "logged.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "ATTNFUSE_VERIFY")}
    if torch_logs:
        env["TORCH_LOGS"] = torch_logs
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    before, _, after = proc.stderr.partition("--- set_logs\n")
    # torch's format: "I1205 13:29:57.615000 5221 path:line] [0/0] message" (I info, W warning, V debug)
    records = [(m.group(1), m.group(2)) for m in re.finditer(
        r"^([IWV])\d{4} [^\]]*\] (?:\[[^\]]*\] )?(attnfuse: .*)$", proc.stderr, re.MULTILINE)]
    if torch_logs is None:  # nothing, not even the warning, until the program asks
        assert "attnfuse" not in before
        assert records == [("I", "attnfuse: graph 2: 1 of 1 attention sites fused (flash×1)")], after
        return
    plans = [msg for level, msg in records if level == "V"]
    records = [(level, msg) for level, msg in records if level != "V"]
    if torch_logs == "+attnfuse":
        assert plans[0].startswith(f"attnfuse: graph 0: plan for site 0 (<top-level module> at logged.py:"
                                   f"{_line(SCRIPT, '@ v')}): flash config path=")
        assert "attnfuse: graph 1: the pass failure's traceback" in plans
        assert "Traceback (most recent call last)" in proc.stderr
    else:
        assert plans == [] and "Traceback" not in proc.stderr
    skipped = (f"attnfuse: graph 0: skipped site 1 in <top-level module> at logged.py:{_line(SCRIPT, 'p = (q @')}: "
               "the attention probabilities are also used by")
    assert records[0] == ("I", "attnfuse: graph 0: 1 of 2 attention sites fused (flash×1)")
    assert records[1][0] == "I" and records[1][1].startswith(skipped)
    assert records[2][0] == "W" and records[2][1].startswith(
        "attnfuse: graph 1: a pass raised RuntimeError: injected pass bug (at transform backend.py:"
        ) and records[2][1].split(" -> ")[1].startswith(f"boom logged.py:{_line(SCRIPT, 'raise')}); the graph runs")
    assert records[3:] == [
        ("I", "attnfuse: graph 1: 0 of 1 attention sites fused; a pass failed, the graph runs unchanged"),
        ("I", f"attnfuse: graph 1: skipped site 0 in <top-level module> at logged.py:{_line(SCRIPT, '@ v')}: a pass "
              "failed on this graph; it runs unchanged")]


def test_verify_that_cannot_run_warns(caplog, monkeypatch):
    """verify=True on a graph it cannot replay: the site stays fused, unverified, with a WARNING (not silent)."""
    from attnfuse.passes import verify

    caplog.set_level(logging.INFO, logger="attnfuse")
    monkeypatch.setattr(verify, "capture", _boom)
    q, k, v = _inputs()
    torch._dynamo.reset()
    compiled = torch.compile(Attn(), backend="attnfuse", options={"inner": "eager", "verify": True})
    torch.testing.assert_close(compiled(q, k, v), Attn()(q, k, v), rtol=1e-12, atol=1e-12)
    (warning,) = [r for r in _records(caplog, logging.WARNING)]
    assert warning.name == "attnfuse.passes.verify"
    assert warning.getMessage() == ("attnfuse: verify could not run the graph on the example inputs (RuntimeError: "
                                    "injected pass bug\nsecond line); its 1 fused site(s) are unverified")
    assert len(attnfuse.last_report().fused) == 1
