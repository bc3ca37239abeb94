"""Fit the cost model's ``sdpa`` / ``flex`` time ratios from the committed results: writes
``attnfuse/costmodel/fits.json`` (read by `attnfuse.costmodel.fits`).

    python benchmarks/fit_costs.py [--results benchmarks/results] [--out attnfuse/costmodel/fits.json] [--check]

Reads every results JSON of ``bench_attention.py`` (dense and window rows), ``candidates_cpu.py`` and
``gpu_suite.py`` (not its ``--dry`` runs) in ``--results``; each file's device tag names its preset (``h100``,
``cpu``, ...; a tag that names no preset of `attnfuse.device.PRESETS` is skipped).  For every (preset, family,
variant, mode, causal, head dim) it takes the newest file (by date, then name) that measured it and, at each
sequence length, the geometric mean over that file's configurations of ``time(family) / time(attnfuse)`` -- both
measured in the same file on the same configuration:

* ``sdpa`` rows by backend (bench_attention's ``sdpa`` peer is the flash backend), over attnfuse's dense kernel;
  bench_attention's window rows run SDPA on a dense band mask and are not fitted;
* ``flex`` rows by mask structure: ``dense`` over attnfuse's dense kernel, ``window`` over its band kernel
  (every window width of a length averaged), ``documents`` over its kernel on the dense packed-documents mask;
* modes ``fwd`` and ``fwd_bwd`` (a ``derived`` row, e.g. the CPU's flex fwd_bwd, counts as measured).

A GPU preset without measurements reuses h100's ratios (``from``, with a note).  The output is deterministic
(sorted keys, 4 significant digits), so ``--check`` (and tests/costmodel/test_fits.py) can compare the committed
file with what the committed results give.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import pathlib
import re
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FITS = ROOT / "attnfuse" / "costmodel" / "fits.json"
BENCHMARKS = ("bench_attention", "candidates_cpu", "gpu_suite")
MODES = ("fwd", "fwd_bwd")
PRESETS = ("a100", "cpu", "h100", "h200")  # attnfuse.device.PRESETS (tests check they agree)
ABOUT = ("Time ratios time(family) / time(attnfuse) of PyTorch's SDPA backends and FlexAttention over attnfuse's "
         "own kernels, per device preset: presets[p].ratios[family][variant][mode][causal|full][head_dim] = "
         "[[seq, ratio], ...]; presets[p].from: a preset without measurements reuses that one's. Written by "
         "benchmarks/fit_costs.py from benchmarks/results/ (do not edit by hand); read by attnfuse.costmodel.fits.")
_CONFIG = ("seq", "batch", "heads", "head_dim", "causal", "window", "documents")


def _preset(doc: dict[str, Any]) -> str | None:
    tag = str(doc.get("device_tag") or doc.get("device") or "").lower()
    return tag if tag in PRESETS else "cpu" if tag.startswith("cpu") else None


def _role(bench: str, row: dict[str, Any]) -> tuple[str, str] | None:
    """(family, variant) of a row: family "attnfuse" (the baseline; variant its structure), "sdpa" (variant the
    backend) or "flex" (variant the structure); None for rows the fit does not use."""
    if bench == "bench_attention":
        structure = "window" if row.get("window") is not None else "dense"
        if row["peer"] == "attnfuse":
            return "attnfuse", structure
        if row["peer"] == "sdpa":
            return ("sdpa", "flash") if structure == "dense" else None  # window rows: SDPA on a dense band mask
        return ("flex", structure) if row["peer"] == "flex" else None
    family, variant = row.get("family"), row.get("variant")
    return (family, variant) if family in ("attnfuse", "sdpa", "flex") and variant else None


def _config(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in _CONFIG)


def points(bench: str, rows: list[dict[str, Any]]) -> dict[tuple, dict[int, list[float]]]:
    """{(family, variant, mode, causal, head_dim): {seq: [ratio per configuration]}} of one results file."""
    ok = [(r, _role(bench, r)) for r in rows if r.get("ms") and not r.get("error") and r.get("mode") in MODES]
    base = {(_config(r), role[1], r["mode"]): r["ms"] for r, role in ok if role and role[0] == "attnfuse"}
    out: dict[tuple, dict[int, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for r, role in ok:
        if not role or role[0] == "attnfuse":
            continue
        family, variant = role
        structure = "dense" if family == "sdpa" else variant
        b = base.get((_config(r), structure, r["mode"]))
        if b:
            key = (family, variant, r["mode"], "causal" if r["causal"] else "full", str(r["head_dim"]))
            out[key][int(r["seq"])].append(r["ms"] / b)
    return out


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def build(results: pathlib.Path = RESULTS) -> dict[str, Any]:
    """The fits document of every results file in ``results`` (see the module docstring)."""
    docs = []
    for path in sorted(pathlib.Path(results).glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        usable = isinstance(doc, dict) and doc.get("benchmark") in BENCHMARKS and not doc.get("dry")
        if usable and _preset(doc) and doc.get("rows"):
            docs.append((str(doc.get("date", "")), path.name, doc))
    chosen: dict[tuple, tuple[str, dict[int, list[float]]]] = {}
    for _, name, doc in sorted(docs, key=lambda d: (d[0], d[1])):  # newer files replace older ones' keys
        for key, by_seq in points(doc["benchmark"], doc["rows"]).items():
            chosen[(_preset(doc), *key)] = (name, by_seq)
    presets: dict[str, Any] = {}
    for (preset, family, variant, mode, causal, dim), (name, by_seq) in sorted(chosen.items()):
        entry = presets.setdefault(preset, {"ratios": {}, "sources": []})
        if name not in entry["sources"]:
            entry["sources"].append(name)
        pts = [[seq, _sig(math.exp(sum(map(math.log, rs)) / len(rs)))] for seq, rs in sorted(by_seq.items())]
        entry["ratios"].setdefault(family, {}).setdefault(variant, {}).setdefault(mode, {}).setdefault(
            causal, {})[dim] = pts
    for entry in presets.values():
        entry["sources"].sort()
    for preset in PRESETS:
        if preset not in presets and preset != "cpu" and "h100" in presets:
            presets[preset] = {"from": "h100", "note": f"no {preset} measurement in benchmarks/results: h100's ratios"}
    return {"about": ABOUT, "presets": dict(sorted(presets.items()))}


def dumps(doc: dict[str, Any]) -> str:
    """The file's text: sorted keys, one line per ``[seq, ratio]`` point list."""
    text = json.dumps(doc, indent=1, sort_keys=True)
    return re.sub(r"\[\s+(-?[\d.e+-]+),\s+(-?[\d.e+-]+)\s+\]", r"[\1, \2]", text) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(RESULTS), help="folder of results JSONs")
    p.add_argument("--out", default=str(FITS), help="fits JSON to write")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if --out differs from the fit")
    args = p.parse_args(argv)
    text = dumps(build(pathlib.Path(args.results)))
    out = pathlib.Path(args.out)
    if args.check:
        same = out.exists() and out.read_text() == text
        print(f"{out}: {'up to date' if same else 'differs from the committed results; run fit_costs.py'}")
        return 0 if same else 1
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
