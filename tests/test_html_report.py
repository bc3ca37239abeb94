"""`Report.to_html`: the page's structure (parsed), the mask pictures (counted), escaping, and a real
GPT-2 audit rendered in headless Chromium (DOM dump + screenshot)."""

from __future__ import annotations

import collections
import html.parser
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import attnfuse
from attnfuse import _html
from attnfuse.report import Report, Site

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
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.attrs[a["id"]] = a
        if tag == "section" and "site" in a.get("class", "").split():
            self.current = self.sections[a["id"]] = {"attrs": a, "rects": collections.Counter(), "text": []}
        elif tag == "svg" and "mask" in a.get("class", "").split():
            self.in_mask = True
        elif tag == "rect" and self.in_mask and self.current is not None:
            self.current["rects"][a.get("class")] += 1

    def handle_endtag(self, tag):
        if tag == "svg":
            self.in_mask = False
        elif tag == "section":
            self.current = None

    def handle_data(self, data):
        if self.current is not None:
            self.current["text"].append(data)


def _text(section: dict) -> str:
    return "".join(section["text"])


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
    assert sections["site-0"]["rects"] == {"on": 5 * 6 // 2, "off": 5 * 4 // 2}  # causal: L(L+1)/2 visible
    band = sum(-2 <= j - i <= 1 for i in range(6) for j in range(6))  # window (left 2, right 1)
    assert sections["site-1"]["rects"] == {"on": band, "off": 36 - band}
    assert sections["site-3"]["rects"] == {"on": 50 * 50}  # "none", 100 sampled to 50 cells of 2x2
    assert sections["site-4"]["rects"] == {"runtime": 15, "off": 10}  # padding is known only at run time
    assert sections["site-5"]["rects"] == {"on": 50 * 51 // 2, "off": 50 * 49 // 2}  # 200 -> 50 cells of 4x4
    assert sections["site-6"]["rects"] == {"runtime": 64 * 64}  # layout not recorded: hatched, density in text


def test_block_sparse_layout_from_a_real_audit():
    """The mask analysis records a constant mask's tile layout; the picture draws one cell per 64x64 tile."""
    sys.path.insert(0, str(pathlib.Path(__file__).parent / "passes"))
    from _mask_models import DIM, ConstantMask, block_pattern

    report = attnfuse.audit(ConstantMask(block_pattern(130, 64)), torch.randn(1, 130, DIM))
    (site,) = report.sites
    assert site.kernel == "blocksparse" and site.mask["blocks"]["layout"] == ["###", "##.", "#.#"]
    (section,) = _Page(_html.render(report)).sections.values()
    assert section["rects"] == {"on": 7, "off": 2}
    assert "one cell per tile" in _text(section)


def test_everything_is_escaped(tmp_path):
    path = _report().to_html(tmp_path / "r.html")
    page = path.read_text(encoding="utf-8")
    assert EVIL not in page and html.escape(EVIL) in page
    assert page.count("<script>") == 1  # only the page's own filter


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
        assert section["rects"]["off"] == 13 * 12 // 2  # causal: the upper triangle is masked

    png = tmp_path / "gpt2.png"
    _chromium(tmp_path, f"--screenshot={png}", "--window-size=1200,2000", url)
    from PIL import Image

    with Image.open(png) as img:
        rgb = img.convert("RGB")
        assert rgb.size == (1200, 2000)
        colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, tables, badges, the mask grid
    assert max(n for n, _ in colours) < 0.95 * 1200 * 2000  # not a blank page
