"""What the passes tell the ``attnfuse`` logger about each graph (records under ``attnfuse.backend``).

* INFO, one line per graph the passes ran on (compiled, audited or exported): how many attention sites were
  fused, with which kernels; and one line per skipped site: its module path, source line and reason.
* WARNING when a pass raised and the graph fell back to the original: once per distinct failure (exception
  type, message, the line that raised) in the process, however often the graph is compiled again; a repeat is
  DEBUG.  The traceback follows at DEBUG.
* Site numbers in these lines count within their graph; after a graph break the report (`Report.merge`)
  numbers the sites of all graphs together, so name a site by its module and source line.
* DEBUG, per planned site: the chosen kernel, its tile config, and every candidate with its estimate or the
  reason it was rejected.

Nothing is printed unless asked: the package adds only a `logging.NullHandler` (attnfuse/__init__.py).
``TORCH_LOGS="+attnfuse"`` shows everything (DEBUG) and ``TORCH_LOGS="attnfuse"`` INFO and up: torch's
``TORCH_LOGS`` parser accepts any importable module name, so attnfuse needs no ``register_log`` (which would
make every later ``torch._logging.set_logs`` call give the logger torch's stderr handler and stop it
propagating).  In code: ``torch._logging.set_logs(modules={"attnfuse": logging.DEBUG})`` (``set_logs`` has no
``attnfuse=`` keyword), or plain ``logging`` (``logging.getLogger("attnfuse").setLevel(logging.INFO)`` with
a handler, e.g. ``logging.basicConfig()``).
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import traceback

from .report import Report, Site

log = logging.getLogger("attnfuse.backend")

_GRAPHS = itertools.count()
_FAILURES: set[tuple[str, str, str]] = set()  # failures already warned about (type, message, where)
_PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")


def next_graph() -> int:
    """A process-wide number for the next graph the passes run on (the "graph N" of the records)."""
    return next(_GRAPHS)


def _where(site: Site) -> str:
    return f"{site.module or '<top-level module>'} at {site.source or '<unknown line>'}"


def graph(index: int, report: Report, audit: bool = False, failed: bool = False) -> None:
    """The graph's INFO summary, an INFO line per skipped site, and the DEBUG plans."""
    if log.isEnabledFor(logging.DEBUG):
        for site in report.sites:
            if site.candidates:
                log.debug("attnfuse: graph %d: plan for site %d (%s): %s", index, site.id, _where(site), _plan(site))
    if not log.isEnabledFor(logging.INFO):
        return
    kernels = collections.Counter(site.kernel for site in report.fused)
    detail = " (" + ", ".join(f"{kernel}×{n}" for kernel, n in kernels.most_common()) + ")" if kernels else ""
    tail = "; a pass failed, the graph runs unchanged" if failed else ""
    log.info("attnfuse: graph %d: %d of %d attention sites %s%s%s", index, len(report.fused), len(report.sites),
             "fusable (audit: nothing compiled)" if audit else "fused", detail, tail)
    for site in report.skipped:
        log.info("attnfuse: graph %d: skipped site %d in %s: %s", index, site.id, _where(site), site.reason)


def _plan(site: Site) -> str:
    """``kernel config; candidates: name (exact|approximate) estimate [rejected: why], ...``."""
    shapes = " ".join("x".join(map(str, site.shapes.get(t, []))) for t in ("q", "k", "v"))
    config = " ".join(f"{k}={v}" for k, v in site.config.items()) or "-"
    head = f"{site.kernel} config {config}" if site.kernel else "not fused"
    head += f"; shapes q/k/v {shapes} {site.dtype}, mask {site.mask.get('kind', 'none')}, kv_groups {site.kv_groups}"
    if site.error is not None:
        head += f", measured error {site.error:.3g}"
    parts = []
    for c in site.candidates:
        est = c.get("est_time_s")
        text = f"{c['kernel']} ({'exact' if c.get('exact', True) else 'approximate'}"
        text += f", est {est * 1e3:.3g} ms)" if est is not None else ")"
        if c.get("rejected"):
            text += f" rejected: {c['rejected']}"
        parts.append(text)
    if site.table:
        head += "; by kv_len: " + ", ".join(f"{row['kv_len'][0]}+ {row['kernel']}" for row in site.table)
    return f"{head}; candidates: " + "; ".join(parts)


def _raised_at(exc: BaseException) -> str:
    """``function file:line`` of attnfuse's innermost frame in the traceback, then the frame that raised if that
    is another one (torch's, say): ``rewrite rewrite.py:80 -> meta_tensor _meta.py:12``."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    where = [next((f for f in reversed(frames) if os.path.abspath(f.filename).startswith(_PACKAGE)), frames[-1])]
    if where[0] is not frames[-1]:
        where.append(frames[-1])
    return " -> ".join(f"{f.name} {os.path.basename(f.filename)}:{f.lineno}" for f in where)


def fell_back(index: int, exc: BaseException) -> None:
    """A pass raised on graph ``index`` and the graph runs unchanged: WARNING once per distinct failure."""
    where = _raised_at(exc)
    message = (str(exc).strip().splitlines() or [""])[0][:300]
    key = (type(exc).__name__, str(exc), where)
    summary = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    if key in _FAILURES:
        log.debug("attnfuse: graph %d: a pass raised %s again (at %s); the graph runs unchanged", index, summary,
                  where)
    else:
        _FAILURES.add(key)
        log.warning("attnfuse: graph %d: a pass raised %s (at %s); the graph runs unchanged, none of its attention "
                    "sites is fused. This is an attnfuse bug: please report it with the TORCH_LOGS=\"+attnfuse\" "
                    "output; options={'strict': True} raises it instead", index, summary, where)
    log.debug("attnfuse: graph %d: the pass failure's traceback", index, exc_info=exc)
