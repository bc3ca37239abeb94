"""The third-party model corpus (``corpus.py``) through ``backend="attnfuse"``.

Per entry, two tests on one compile (cached per entry):

* ``test_output``: the compiled model's outputs equal eager's. Always required, also for entries attnfuse does
  not fully fuse yet: a site attnfuse declines must run as the original. The 2x rule against a float64 copy
  of the model; where the library computes in float32 inside a float64 copy (HF's
  ``softmax(..., dtype=float32)``), a tight ``assert_close`` to eager float32 (the entry says why).
* ``test_sites``: exactly ``sites`` attention sites fused, every negative skipped with its reason, nothing else
  skipped. Entries with ``known_miss`` are strict xfails: when the matcher learns the class, the XPASS says
  to drop the mark.

Slow entries carry ``@pytest.mark.slow`` (``make test`` runs them). ``python tests/models/corpus.py --misses``
lists every site not fused yet with the report's reason.
"""

from __future__ import annotations

import functools

import corpus
import pytest
import torch
from _util import assert_2x


def _params(entries: list[corpus.Entry], xfail: bool) -> list:
    params = []
    for e in entries:
        marks = [pytest.mark.slow] if e.slow else []
        if xfail and e.known_miss:
            marks.append(pytest.mark.xfail(strict=True, reason=f"known miss: {e.known_miss}"))
        params.append(pytest.param(e, id=e.id, marks=marks))
    return params


@functools.cache
def _result(entry_id: str) -> corpus.Result:
    return corpus.run(next(e for e in corpus.ENTRIES if e.id == entry_id))


@pytest.mark.parametrize("entry", _params(corpus.ENTRIES, xfail=False))
def test_output(entry: corpus.Entry) -> None:
    r = _result(entry.id)
    assert r.report is not None, "attnfuse never ran: no graph reached the backend"
    assert len(r.ours) == len(r.eager) > 0
    if entry.reference == "float64":
        assert r.ref is not None and len(r.ref) == len(r.ours)
        for i, (o, e, ref) in enumerate(zip(r.ours, r.eager, r.ref, strict=True)):
            assert_2x(o, e, ref, f"{entry.id} output {i}")
    else:
        assert entry.tight, "an entry compared to eager float32 says why its float64 copy is not float64"
        for o, e in zip(r.ours, r.eager, strict=True):
            torch.testing.assert_close(o, e)


@pytest.mark.parametrize("entry", _params(corpus.ENTRIES, xfail=True))
def test_sites(entry: corpus.Entry) -> None:
    report = _result(entry.id).report
    problems = corpus.problems(entry, report)
    assert not problems, "\n".join([*problems, str(report)])
    assert len(report.fused) == entry.sites, str(report)


def test_corpus_shape() -> None:
    """>= 40 models from >= 8 libraries; unique ids; every negative and miss says why."""
    ids = [e.id for e in corpus.ENTRIES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)
    assert len({e.library for e in corpus.ENTRIES}) >= 8
    for e in corpus.ENTRIES:
        assert e.sites + sum(n.count for n in e.negatives) > 0, e.id
        assert all(n.why and n.reason_has and n.count > 0 for n in e.negatives), e.id
        assert e.reference in ("float64", "eager"), e.id
