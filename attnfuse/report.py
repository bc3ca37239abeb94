"""The audit report: one `Site` per attention region found, fused or not.

`Report.to_json()` / `Report.load()` round-trip exactly; `str(report)` is a
table.  Site ids follow the user's source (`in_source_order`), graph by graph.
The backend also emits the report as a ``trace_structured`` artifact named
``attnfuse_report`` so it shows in tlparse output.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

_last: Report | None = None


@dataclasses.dataclass
class Site:
    """One attention region and what attnfuse did with it."""

    id: int
    module: str
    source: str
    status: str  # "fused" | "skipped"
    reason: str | None = None
    pattern: str = ""
    shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    dtype: str = ""
    mask: dict[str, Any] = dataclasses.field(default_factory=lambda: {"kind": "none"})
    kv_groups: int = 1
    scale: float | str | None = None
    kernel: str | None = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    candidates: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    error: float | None = None
    table: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # dynamic lengths: range -> kernel
    # "before": one line a node of the region (a skipped site's too: the matched region, or for a near miss the
    # nodes the matcher looked at, `passes._nearmiss`); "after": the fused site's rewrite
    subgraph: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    verify: dict[str, Any] | None = None  # options["verify"]: errors vs float64, grads, sampled, passed (passes/verify)
    # options["autotune"]: how the kernel was measured -- cache ("hit" | "miss" | "off"), path, measured ("forward" |
    # "forward+backward"), reps, warmup, the model's choice and what was timed (`attnfuse.autotune.tune`)
    autotune: dict[str, Any] | None = None
    # options["context_parallel"]: how the fused site spans the group -- strategy ("ulysses" | "ring"), ranks,
    # layout and the cost model's reason (`attnfuse.parallel.choose`)
    context_parallel: dict[str, Any] | None = None


@dataclasses.dataclass
class Report:
    """Everything attnfuse decided for one compiled graph (or one audit)."""

    sites: list[Site] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    device: str = ""
    graphs: int = 0

    @property
    def fused(self) -> list[Site]:
        return [s for s in self.sites if s.status == "fused"]

    @property
    def skipped(self) -> list[Site]:
        return [s for s in self.sites if s.status == "skipped"]

    def add(self, site: Site) -> Site:
        site.id = len(self.sites)
        self.sites.append(site)
        return site

    def merge(self, other: Report) -> None:
        for site in other.sites:
            self.add(dataclasses.replace(site))
        self.notes.extend(other.notes)
        self.device = other.device or self.device
        self.graphs += other.graphs

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, default=str)

    def save(self, path: str | pathlib.Path) -> pathlib.Path:
        path = pathlib.Path(path)
        path.write_text(self.to_json())
        return path

    def to_html(self, path: str | pathlib.Path) -> pathlib.Path:
        """Write the report as one self-contained HTML page (mask pictures, subgraphs, cost tables)."""
        from . import _html

        path = pathlib.Path(path)
        path.write_text(_html.render(self), encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, text: str) -> Report:
        data = json.loads(text)
        sites = [Site(**s) for s in data.pop("sites")]
        return cls(sites=sites, **data)

    @classmethod
    def load(cls, path: str | pathlib.Path) -> Report:
        return cls.from_json(pathlib.Path(path).read_text())

    def __str__(self) -> str:
        head = ("id", "module", "source", "status", "kernel", "mask", "kv", "scale", "shapes q/k/v", "reason")
        rows = [head]
        for s in self.sites:
            shapes = " ".join("x".join(map(str, s.shapes.get(t, []))) for t in ("q", "k", "v"))
            scale = f"{s.scale:.4g}" if isinstance(s.scale, float) else str(s.scale)
            kernel = s.kernel or "-"
            if s.error is not None and s.kernel:
                knobs = knob_text(s)
                kernel += f" (err {s.error:.2g}" + (f"; {knobs})" if knobs else ")")
            if s.table and len({row["kernel"] for row in s.table}) > 1:
                kernel += " [" + ", ".join(f"{row['kv_len'][0]}+:{row['kernel']}" for row in s.table) + "]"
            if s.autotune and s.kernel:
                kernel += " (measured" + (", cached" if s.autotune.get("cache") == "hit" else "") + ")"
            if s.context_parallel and s.kernel:
                kernel += f" ({s.context_parallel['strategy']} x{s.context_parallel['ranks']})"
            rows.append((str(s.id), s.module or "-", s.source or "-", s.status, kernel,
                         s.mask.get("kind", "none"), str(s.kv_groups), scale, shapes, s.reason or ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        summary = f"attnfuse: {len(self.fused)} of {len(self.sites)} attention sites fused"
        if self.device:
            summary += f" (device: {self.device})"
        return "\n".join([summary, *lines, *(f"note: {n}" for n in self.notes)])


# the knobs of an approximate kernel the text report shows (the JSON has every setting, `Site.candidates`)
KNOBS = {"lsh": ("tables", "bits", "probes", "cap"), "topk": ("topk",)}


def knob_text(site: Site) -> str:
    """``"tables=12 bits=7 probes=1 cap=512"``: the chosen approximate kernel's knobs as its candidate row records
    them (LSH's ``bits`` resolved at the site's key length), or "" when the row has none."""
    row = next((c for c in site.candidates if c.get("kernel") == site.kernel and c.get("params")), None)
    if row is None:
        return ""
    return " ".join(f"{k}={row['params'][k]}" for k in KNOBS.get(site.kernel, ()) if k in row["params"])


def _source_key(source: str) -> tuple[str, float]:
    """``"file.py:57"`` -> ("file.py", 57); a source without a line -> (source, inf)."""
    file, _, line = source.rpartition(":")
    return (file, int(line)) if file and line.isdigit() else (source, math.inf)


def in_source_order(sites: list[Site]) -> list[Site]:
    """``sites`` of one graph, given in graph order, sorted into the order of the user's source.

    Files come in the order the graph first reaches them (a ``Site.source`` names a file, not its path, so
    no order between files is better defined), lines ascend within a file, and sites on the same line (the
    layers of a model share one attention line) or with no source keep graph order.  Sites of several
    graphs (graph breaks) are numbered graph by graph (`Report.merge`), so the graph comes first.
    """
    rank: dict[str, int] = {}
    for s in sites:
        rank.setdefault(_source_key(s.source)[0], len(rank))
    return sorted(sites, key=lambda s: (rank[_source_key(s.source)[0]], _source_key(s.source)[1]))


def last_report() -> Report | None:
    """The report of the most recent attnfuse compile in this process."""
    return _last


def set_last(report: Report | None) -> None:
    """Make ``report`` what `last_report` returns (`attnfuse._publish.publish`)."""
    global _last
    _last = report
