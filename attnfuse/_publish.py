"""What a compile hands back besides its graph: the report, merged over one ``torch.compile`` call's graphs
(`call_report`), and published (`publish`: `attnfuse.last_report()`, the ``report`` file option, tlparse)."""

from __future__ import annotations

import sys
import weakref
from typing import Any

import torch

from . import report as report_module
from .config import Config
from .report import Report

__all__ = ["call_report", "publish"]


def publish(report: Report, config: Config) -> None:
    """Make ``report`` `attnfuse.last_report()`, save it where ``config.report`` says, and emit it as the
    ``attnfuse_report`` ``trace_structured`` artifact (tlparse)."""
    report_module.set_last(report)
    if config.report:
        report.save(config.report)
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": "attnfuse_report", "encoding": "json"},
        payload_fn=report.to_json,
    )


# one `torch.compile(...)` call -> its graphs' reports by dynamo frame id (graph breaks compile several)
# (keyed by id: the wrapper defines __eq__ without __hash__; the entry goes with the wrapper)
_CALLS: dict[int, dict[int, Report]] = {}


def _compile_call() -> Any:
    """The ``torch.compile`` call that dynamo is compiling a graph for (its ``_TorchCompileWrapper``), or None
    when the backend is called directly.  One call's graphs share it, whatever breaks the graph."""
    frame = sys._getframe(1)
    for _ in range(12):
        frame = frame.f_back
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch._TorchCompileWrapper):
            return owner
    return None


def call_report(report: Report) -> Report:
    """``report`` (one graph) merged with the other graphs of the same ``torch.compile`` call, as `audit` merges
    them: graphs in the order dynamo first compiled their frames (execution order), sites renumbered; a
    recompiled frame (new shapes or guards) replaces its earlier graph."""
    call = _compile_call()
    compile_id = torch._guards.CompileContext.current_compile_id()
    if call is None or compile_id is None or compile_id.frame_id is None:
        return report
    if id(call) not in _CALLS:
        _CALLS[id(call)] = {}
        weakref.finalize(call, _CALLS.pop, id(call), None)
    graphs = _CALLS[id(call)]
    graphs[compile_id.frame_id] = report
    merged = Report(device=report.device)
    for frame_id in sorted(graphs):
        merged.merge(graphs[frame_id])
    return merged
