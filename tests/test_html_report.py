"""`Report.to_html`: the page's structure (parsed), the mask pictures (counted, and cell by cell), escaping,
skipped sites' subgraphs, site ids in source order, and a real GPT-2 audit (causal + key padding) rendered in
headless Chromium (DOM dump + screenshot)."""

from __future__ import annotations

import collections
import html.parser
import inspect
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import attnfuse
from attnfuse import _html
from attnfuse.report import Report, Site, in_source_order

EVIL = "<script>alert('x')</script>.attn"
FLASH = {"kernel": "flash", "exact": True, "est_time_s": 2.5e-4, "hbm_bytes": 26624.0, "flops": 5e5,
         "exp_ops": 8192.0, "rejected": None}
EAGER = {"kernel": "eager", "exact": True, "est_time_s": 1.2e-3, "hbm_bytes": 3 * 2**20, "flops": 5e5,
         "exp_ops": 8192.0, "rejected": "materializes 3.0 MiB of scores"}


def _shapes(q: int, k: int) -> dict[str, list[int]]:
    return {"q": [1, 2, q, 8], "k": [1, 2, k, 8], "v": [1, 2, k, 8]}


def _site(module: str, mask: dict, L: int = 5, **kw) -> Site:
    kw = {"status": "fused", "kernel": "flash", "config": {"BLOCK_M": 16, "BLOCK_N": 64}, **kw}
    subgraph = {"before": ["mm = matmul(q, kt)", "p = softmax(mm)"],
                "after": ["o = attnfuse.attention.default(q, k, v)"]}
    return Site(0, module, "model.py:57", shapes=_shapes(L, L), dtype="float16", scale=0.125, mask=mask,
                candidates=[{**FLASH, "kernel": kw["kernel"] or "flash"}, EAGER], subgraph=subgraph, **kw)


def _report() -> Report:
    report = Report(device="h100", graphs=1, notes=["a note & more"])
    report.add(_site(EVIL, {"kind": "causal", "proof": ["is_causal=True"]}))
    report.add(_site("h.1.attn", {"kind": "window", "window": [2, 1], "proof": ["kv >= q - 2", "kv <= q + 1"]},
                     L=6, kernel="window"))
    report.add(_site("h.2.attn", {"kind": "none", "proof": []}, status="skipped", kernel=None,
                     reason="the softmax output is also used by <mean>"))
    table = [{"kv_len": [0, 512], "kernel": "flash", "config": {}, "planned_at": 181, "est_time_s": 1e-5},
             {"kv_len": [512, None], "kernel": "topk", "config": {"topk": 32}, "planned_at": 8192, "est_time_s": 2e-3}]
    report.add(_site("h.3.attn", {"kind": "none", "proof": []}, L=100, kernel="topk", error=0.0123,
                     config={"topk": 32}, table=table))
    report.add(_site("h.4.attn", {"kind": "causal+padding", "padding": "key vector (B, 1, 1, Lk)", "proof": []}))
    report.add(_site("h.5.attn", {"kind": "causal", "proof": []}, L=200))
    report.add(_site("h.6.attn", {"kind": "blocksparse", "blocks": {"empty": 4, "full": 10, "partial": 2},
                                  "density": 0.75, "proof": ["by value"]}, L=256, kernel="blocksparse"))
    return report


class _Page(html.parser.HTMLParser):
    """Per site section: its attributes, the classes of its mask rects, and its text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: dict[str, dict] = {}
        self.attrs: dict[str, dict] = {}  # by element id
        self.current: dict | None = None
        self.in_mask = False
        self.links: list[dict] = []  # the overview table's links
        self.in_overview = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.attrs[a["id"]] = a
        if tag == "table" and "overview" in a.get("class", "").split():
            self.in_overview = True
        elif tag == "a" and self.in_overview:
            self.links.append(a)
        if tag == "section" and "site" in a.get("class", "").split():
            self.current = self.sections[a["id"]] = {"attrs": a, "rects": collections.Counter(), "cells": [],
                                                     "text": []}
        elif tag == "svg" and "mask" in a.get("class", "").split():
            self.in_mask = True
        elif tag == "rect" and self.in_mask and self.current is not None:
            self.current["rects"][a.get("class")] += 1
            self.current["cells"].append((float(a["y"]), float(a["x"]), a.get("class")))

    def handle_endtag(self, tag):
        if tag == "svg":
            self.in_mask = False
        elif tag == "table":
            self.in_overview = False
        elif tag == "section":
            self.current = None

    def handle_data(self, data):
        if self.current is not None:
            self.current["text"].append(data)


def _text(section: dict) -> str:
    return "".join(section["text"])


def _grid(section: dict) -> list[list[str]]:
    """The section's mask cells as rows of classes, placed by their SVG coordinates."""
    ys = sorted({y for y, _, _ in section["cells"]})
    xs = sorted({x for _, x, _ in section["cells"]})
    grid = [[""] * len(xs) for _ in ys]
    for y, x, cls in section["cells"]:
        grid[ys.index(y)][xs.index(x)] = cls
    return grid


def _causal_padding(grid: list[list[str]]) -> None:
    """Causal + key padding: solid "masked" strictly above the diagonal, hatched "runtime" on and below it."""
    for i, row in enumerate(grid):
        assert row == ["runtime"] * (i + 1) + ["masked"] * (len(row) - i - 1), (i, row)


def test_page_structure_and_summary():
    page = _html.render(_report())
    parsed = _Page(page)
    assert len(parsed.sections) == 7
    assert parsed.attrs["summary"]["data-fused"] == "6" and parsed.attrs["summary"]["data-total"] == "7"
    assert "6</b> of <b>7</b> attention sites fused" in page
    assert "flash ×3" in page and "window ×1" in page and "topk ×1" in page and "blocksparse ×1" in page
    assert [s["attrs"]["data-status"] for s in parsed.sections.values()].count("skipped") == 1
    assert "a note &amp; more" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page


def test_site_details_reason_candidates_and_table():
    page = _html.render(_report())
    sections = _Page(page).sections
    skipped = _text(sections["site-2"])
    assert 'class="reason">Not fused: the softmax output is also used by &lt;mean&gt;' in page
    assert "also used by <mean>" in skipped
    first = _text(sections["site-0"])
    assert "model.py:57" in first and "BLOCK_M=16 BLOCK_N=64" in first and "1×2×5×8" in first
    assert "flash ✓ chosen" in first and "window ✓ chosen" in _text(sections["site-1"])
    assert "250 µs" in first and "26 KiB" in first and "3 MiB" in first
    assert "matmul(q, kt)" in first and "attnfuse.attention.default" in first
    assert "flash ✓ chosen" not in skipped  # a skipped site has no chosen kernel
    approx = _text(sections["site-3"])
    assert "approximate" in approx and "0.0123" in approx
    assert "512 … ∞" in approx and "0 … 512" in approx and "2 ms" in approx
    assert "density 75.0%" in _text(sections["site-6"])


def test_mask_pictures_count_cells():
    sections = _Page(_html.render(_report())).sections
    assert sections["site-0"]["rects"] == {"kept": 5 * 6 // 2, "masked": 5 * 4 // 2}  # causal: L(L+1)/2 visible
    band = sum(-2 <= j - i <= 1 for i in range(6) for j in range(6))  # window (left 2, right 1)
    assert sections["site-1"]["rects"] == {"kept": band, "masked": 36 - band}
    assert _grid(sections["site-1"])[0] == ["kept"] * 2 + ["masked"] * 4
    assert sections["site-3"]["rects"] == {"kept": 50 * 50}  # "none", 100 sampled to 50 cells of 2x2
    assert sections["site-4"]["rects"] == {"runtime": 15, "masked": 10}  # padding is known only at run time
    _causal_padding(_grid(sections["site-4"]))
    assert "the causal part is exact" in _text(sections["site-4"])
    assert sections["site-5"]["rects"] == {"kept": 50 * 51 // 2, "masked": 50 * 49 // 2}  # 200 -> 50 cells of 4x4
    assert sections["site-6"]["rects"] == {"runtime": 64 * 64}  # layout not recorded: hatched, density in text


def test_each_grid_has_a_legend_of_its_own_cells():
    page = _html.render(_report())
    sections = _Page(page).sections
    legend = '<p class="legend"><span class="kept"></span>kept<span class="masked"></span>masked</p>'
    assert legend in page and "decided at run time" not in _text(sections["site-0"])
    assert ('<p class="legend"><span class="masked"></span>masked<span class="runtime"></span>decided at run time'
            '</p>') in page and "decided at run time" in _text(sections["site-4"])
    assert 'class="legend">mask cells:<span class="kept">' in page  # the summary's, with every class


def test_block_sparse_layout_from_a_real_audit():
    """The mask analysis records a constant mask's tile layout; the picture draws one cell per 64x64 tile."""
    sys.path.insert(0, str(pathlib.Path(__file__).parent / "passes"))
    from _mask_models import DIM, ConstantMask, block_pattern

    report = attnfuse.audit(ConstantMask(block_pattern(130, 64)), torch.randn(1, 130, DIM))
    (site,) = report.sites
    assert site.kernel == "blocksparse" and site.mask["blocks"]["layout"] == ["###", "##.", "#.#"]
    (section,) = _Page(_html.render(report)).sections.values()
    assert section["rects"] == {"kept": 7, "masked": 2}
    assert "one cell per tile" in _text(section)


def test_everything_is_escaped(tmp_path):
    path = _report().to_html(tmp_path / "r.html")
    page = path.read_text(encoding="utf-8")
    assert EVIL not in page and html.escape(EVIL) in page
    assert page.count("<script>") == 1  # only the page's own filter


# --- skipped sites' subgraphs, ids in source order --------------------------------------------------------------
# The helpers are defined in this order; `_OutOfOrder` calls them in another, so the graph's order of the sites
# (wrong axis, fused, mask from scores) differs from the file's (mask from scores, fused, wrong axis).


def _mask_from_scores(q, k, v):  # a near miss: the mask reads the scores
    s = q @ k.mT / 3
    return s.masked_fill(s < 0, float("-inf")).softmax(-1) @ v


def _attend(q, k, v):  # fused
    return (q @ k.mT / 3).softmax(-1) @ v


def _wrong_axis(q, k, v):  # a near miss: the softmax runs over the queries
    return (q @ k.mT / 3).softmax(-2) @ v


class _OutOfOrder(nn.Module):
    def forward(self, q, k, v):
        a = _wrong_axis(q, k, v)
        b = _attend(q, k, v)
        return a + b + _mask_from_scores(q, k, v)


def _line(fn, text: str) -> str:
    """``test_html_report.py:<line>`` of the line of ``fn`` that contains ``text``."""
    lines, first = inspect.getsourcelines(fn)
    return f"{pathlib.Path(__file__).name}:{first + next(i for i, x in enumerate(lines) if text in x)}"


def test_skipped_sites_show_their_subgraph_and_ids_follow_the_source(tmp_path):
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    report = attnfuse.audit(_OutOfOrder(), q, k, v, options={"device": "cpu"})
    expected = [_line(fn, ".softmax(") for fn in (_mask_from_scores, _attend, _wrong_axis)]
    assert [(s.id, s.source) for s in report.sites] == list(enumerate(expected)), str(report)
    scores, fused, axis = report.sites
    assert fused.status == "fused" and scores.status == axis.status == "skipped"
    assert "the mask depends on the scores" in scores.reason and "not over the key (last) axis" in axis.reason
    table = str(report).splitlines()
    assert [line.split()[0] for line in table[3:6]] == ["0", "1", "2"] and expected[0] in table[3]

    # a near miss shows what the matcher looked at: the scores matmul, the mask built from it, the softmax, p @ v
    lines = scores.subgraph["before"]
    assert [line.split(" = ")[1].split("(")[0] for line in lines] == ["matmul", "truediv", "lt", "masked_fill",
                                                                       "softmax", "matmul"], lines
    assert lines[2].endswith(f"lt({lines[1].split(' = ')[0]}, 0)")  # the mask reads the scores
    assert any("softmax(" in x and x.endswith(", -2)") for x in axis.subgraph["before"]), axis.subgraph
    assert [x.split(" = ")[1].split("(")[0] for x in axis.subgraph["before"]] == ["matmul", "truediv", "softmax",
                                                                                    "matmul"]
    assert "after" not in scores.subgraph and "after" in fused.subgraph
    assert Report.load(report.save(tmp_path / "r.json")).sites == report.sites  # the JSON keeps them

    page = _html.render(report)
    parsed = _Page(page)
    assert list(parsed.sections) == ["site-0", "site-1", "site-2"]
    assert [a["href"] for a in parsed.links] == ["#site-0", "#site-1", "#site-2"]  # the overview, in id order
    for site in report.sites:
        text = _text(parsed.sections[f"site-{site.id}"])
        assert f"#{site.id} " in text and site.source in text
    skipped = _text(parsed.sections["site-0"])
    assert "nodes the matcher looked at (left as they are)" in skipped and "after the rewrite" not in skipped
    assert all(line in skipped for line in lines)
    assert "matched subgraph (before)" in _text(parsed.sections["site-1"])


def test_in_source_order_files_by_first_site_then_lines_ties_in_graph_order():
    sites = [Site(0, f"m{i}", src, "fused") for i, src in enumerate(
        ["b.py:30", "a.py:5", "b.py:10", "", "b.py:10", "a.py:1", "b.py"])]
    ordered = in_source_order(sites)
    assert [(s.module, s.source) for s in ordered] == [
        ("m2", "b.py:10"), ("m4", "b.py:10"), ("m0", "b.py:30"), ("m6", "b.py"),  # a file without a line: last in it
        ("m5", "a.py:1"), ("m1", "a.py:5"), ("m3", "")]


def _browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("chromium is not installed")
    return found


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    browser = _browser()
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)


def test_gpt2_audit_in_headless_chromium(tmp_path):
    sys.path.insert(0, str(pathlib.Path(__file__).parent / "passes"))  # as tests/passes/test_masks.py imports it
    from _mask_models import gpt2

    _browser()
    ids = torch.randint(3, 128, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 9:] = 0
    report = attnfuse.audit(gpt2(), ids, mask, options={"device": "cpu"})
    assert len(report.sites) == 2
    path = report.to_html(tmp_path / "gpt2.html")
    url = path.resolve().as_uri()

    dom = _chromium(tmp_path, "--dump-dom", url).stdout
    parsed = _Page(dom)
    assert 'data-js="ready"' in dom  # the inline script ran
    assert len(parsed.sections) == 2 and f"{len(report.fused)} of 2 attention sites fused" in dom.replace(
        "<b>", "").replace("</b>", "")
    for site in report.sites:
        section = parsed.sections[f"site-{site.id}"]
        assert section["attrs"]["data-status"] == site.status and site.module in _text(section)
        assert sum(section["rects"].values()) == 13 * 13
        assert site.mask["kind"] == "causal+padding"
        _causal_padding(_grid(section))  # the causal triangle solid, only the padding's part hatched
        assert "decided at run time" in _text(section)

    png = tmp_path / "gpt2.png"
    _chromium(tmp_path, f"--screenshot={png}", "--window-size=1200,2000", url)
    from PIL import Image

    with Image.open(png) as img:
        rgb = img.convert("RGB")
        assert rgb.size == (1200, 2000)
        colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, tables, badges, the mask grid
    assert max(n for n, _ in colours) < 0.95 * 1200 * 2000  # not a blank page
    count = dict((c, n) for n, c in colours)
    assert count.get((0xC3, 0xCB, 0xD5), 0) > 78 * 100  # the masked triangle, solid (cells are ~19 px a side)
    hatch = sum(n for n, c in colours if abs(c[0] - 0xF2) + abs(c[1] - 0xB3) + abs(c[2] - 0x6B) < 60)
    assert hatch > 1000  # the hatched (run-time) cells drew their pattern
