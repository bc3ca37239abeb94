"""`Report` as one self-contained HTML page: `render(report) -> str` (used by `Report.to_html`).

The page has inline CSS, inline SVG and a few lines of inline JS (a fused/skipped filter); it loads
nothing from anywhere.  Every string from the report is escaped.  Per site it shows the facts of the
report, the mask as a query x key grid (like attention-gym's mask plots), the matched subgraph before
and after the rewrite, the cost model's candidates and the dynamic-length table.

The grid draws only what the report knows, one class a cell: ``masked`` (solid grey) where the static
part (causal / window band) hides the key, ``runtime`` (hatched) where the band keeps it but a part decided
by a tensor (key padding, bias, an unproven dense mask, a block-sparse layout the report does not record)
can still hide or weight it, ``kept`` (solid blue) where nothing else decides; a block-sparse layout adds
``partial`` tiles.  So a causal + key-padding mask (HF GPT-2 / LLaMA with an ``attention_mask``) is a solid
upper triangle and a hatched lower one, never a guess.  Grids larger than 64 cells a side are sampled: a cell
stands for a square of positions and counts as kept if any of them is.
"""

from __future__ import annotations

import collections
import html
import math
from typing import Any

from ._sizes import size_text

_MAX_CELLS = 64  # per side of a mask grid
_GRID_PX = 256  # the largest side of a mask grid, in pixels
_TENSOR_KINDS = ("padding", "bias", "dense", "blocksparse", "documents", "prefix")  # parts known only at run time
_TILE_CELL = {".": "masked", "#": "kept", "+": "partial"}  # a block-sparse layout's tiles: empty / full / partial
# the cell classes, in legend order: (a grid's legend, the summary's legend)
_STATES = {"kept": ("kept", "kept"), "masked": ("masked", "masked (by the causal / window band; an empty tile)"),
           "runtime": ("decided at run time", "decided at run time (by a tensor the report holds no values for)"),
           "partial": ("partly masked tile", "partly masked tile")}

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f2933;background:#f7f8fa;margin:0}
main{max-width:1160px;margin:0 auto;padding:20px 24px 48px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:16px;margin:0 0 10px} h3{font-size:13px;margin:14px 0 6px;
color:#52606d;text-transform:uppercase;letter-spacing:.04em}
code,pre,.mono{font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,monospace;font-size:12.5px}
header#summary,section.site{background:#fff;border:1px solid #dde2e8;border-radius:8px;padding:16px 20px;
margin-bottom:16px}
.headline{font-size:18px;margin:6px 0 10px} .headline b{color:#1d6b3a}
.kernels span{display:inline-block;background:#e6f0fb;border-radius:10px;padding:1px 9px;margin-right:6px}
table{border-collapse:collapse;margin:4px 0} th,td{text-align:left;padding:3px 10px 3px 0;vertical-align:top}
table.grid th,table.grid td{border-bottom:1px solid #e8ecf0;padding:4px 12px 4px 6px}
table.grid th{background:#f1f4f7;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.chosen td{background:#e3f4e8;font-weight:600} tr.rejected td{color:#6b7785}
table.facts th{color:#52606d;font-weight:500;white-space:nowrap}
.badge{display:inline-block;border-radius:4px;padding:0 8px;font-size:12px;font-weight:600;
text-transform:uppercase;margin-right:6px;vertical-align:1px}
.badge.fused{background:#d5f0dd;color:#1d6b3a} .badge.skipped{background:#fde2cf;color:#9a3f07}
.badge.approx{background:#fff1c2;color:#7a5b00}
.src{color:#6b7785;font-weight:400;margin-left:8px}
.reason{background:#fff4ec;border-left:4px solid #e8772e;padding:8px 12px;margin:0 0 12px;font-weight:600}
.note{background:#f4f1ff;border-left:4px solid #8b7ad8;padding:6px 10px;margin:6px 0}
.cols{display:flex;gap:28px;flex-wrap:wrap} .cols>div{flex:1;min-width:300px}
pre{background:#f4f6f8;border:1px solid #e1e6eb;border-radius:6px;padding:8px 10px;margin:0;white-space:pre-wrap;
overflow-wrap:anywhere}
ul.proof{margin:4px 0;padding-left:18px} ul.proof li{font-family:ui-monospace,Menlo,monospace;font-size:12px}
svg.mask rect.kept{fill:#2f6fbf} svg.mask rect.masked{fill:#c3cbd5} svg.mask rect.runtime{fill:url(#hatch)}
svg.mask rect.partial{fill:#9dbbe0}
svg.mask text{font-size:11px;fill:#52606d}
.legend span{display:inline-block;width:12px;height:12px;vertical-align:-2px;margin:0 4px 0 12px;
border:1px solid #c5ccd4} .legend .kept{background:#2f6fbf} .legend .masked{background:#c3cbd5}
.legend .partial{background:#9dbbe0}
.legend .runtime{background:repeating-linear-gradient(45deg,#f2b36b 0 2px,#fff3e0 2px 5px)}
.caption{color:#52606d;font-size:12.5px;margin:4px 0}
nav button{border:1px solid #c5ccd4;background:#fff;border-radius:4px;padding:2px 10px;margin-right:4px;
cursor:pointer} nav button.active{background:#2f6fbf;color:#fff;border-color:#2f6fbf}
"""

_JS = """
document.querySelectorAll('nav button').forEach(b => b.onclick = () => {
  document.querySelectorAll('nav button').forEach(x => x.classList.toggle('active', x === b));
  document.querySelectorAll('section.site').forEach(s =>
    s.hidden = b.dataset.show !== 'all' && s.dataset.status !== b.dataset.show);
});
document.body.dataset.js = 'ready';
"""

_HATCH = ('<svg width="0" height="0" style="position:absolute" aria-hidden="true"><defs>'
          '<pattern id="hatch" width="5" height="5" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
          '<rect width="5" height="5" fill="#fff3e0"/><rect width="2" height="5" fill="#f2b36b"/></pattern>'
          '</defs></svg>')


def _e(x: Any) -> str:
    return html.escape(str(x))


def _time(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s * 1e6:.3g} µs" if s < 1e-3 else f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _bytes(b: float | None) -> str:
    return "–" if b is None else size_text(b)


def _config(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items())


def _table(head: list[str] | None, rows: list[tuple[str, list[str]]], cls: str = "grid") -> str:
    """``rows``: (tr class, already escaped cells); a cell starting with ``#`` is a right-aligned number."""
    out = [f'<table class="{cls}">' + ("<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" if head else "")]
    for tr, cells in rows:
        tds = "".join(f'<td class="num">{c[1:]}</td>' if c.startswith("#") else f"<td>{c}</td>" for c in cells)
        out.append(f'<tr class="{tr}">{tds}</tr>')
    return "".join(out) + "</table>"


def _band(site) -> tuple[float, float]:
    """The visible range of ``kv - q`` the report proves: (-left, right), unbounded sides infinite."""
    kinds = site.mask.get("kind", "none").split("+")
    if "prefix" in kinds:  # prefix keys are visible outside the band: the band alone hides nothing for sure
        return -math.inf, math.inf
    left, right = site.mask.get("window", [-1, -1]) if "window" in kinds else (-1, -1)
    if "causal" in kinds:
        right = 0 if right < 0 else min(right, 0)
    return (-left if left >= 0 else -math.inf), (right if right >= 0 else math.inf)


def mask_cells(site) -> tuple[int, list[list[str]]] | None:
    """(step, rows of cell classes) for ``site``'s mask, or None if its lengths are unknown.

    A class is "masked" (the band hides every position of the cell), "runtime" (the band keeps one, and a
    tensor part of the mask decides it at run time), "kept", or for a recorded block-sparse layout (one
    cell a tile) "kept" / "partial" / "masked".
    """
    q, k = (site.shapes.get(t, [])[-2] if len(site.shapes.get(t, [])) >= 2 else None for t in "qk")
    if not (isinstance(q, int) and isinstance(k, int) and q > 0 and k > 0):
        return None
    layout = site.mask.get("blocks", {}).get("layout")
    if layout:  # a constant block-sparse mask: one cell per tile, as the kernel sees it
        return site.mask["blocks"].get("tile", [64])[0], [[_TILE_CELL[c] for c in row] for row in layout]
    lo, hi = _band(site)
    tensor = any(p in _TENSOR_KINDS for p in site.mask.get("kind", "none").split("+"))
    step = math.ceil(max(q, k) / _MAX_CELLS)
    rows = []
    for i0 in range(0, q, step):
        i1, row = min(i0 + step, q) - 1, []
        for j0 in range(0, k, step):
            j1 = min(j0 + step, k) - 1  # kv - q over the cell spans [j0 - i1, j1 - i0]
            visible = j0 - i1 <= hi and j1 - i0 >= lo
            row.append("masked" if not visible else "runtime" if tensor else "kept")
        rows.append(row)
    return step, rows


def _mask_svg(site) -> str:
    got = mask_cells(site)
    if got is None:
        return '<p class="caption">sequence lengths unknown: no picture</p>'
    step, rows = got
    n = max(len(rows), len(rows[0]))
    px = max(3, min(28, _GRID_PX // n))
    gap = 1 if px >= 6 else 0
    w, h, pad = len(rows[0]) * px, len(rows) * px, 20
    out = [f'<svg class="mask" xmlns="http://www.w3.org/2000/svg" width="{w + pad + 2}" height="{h + pad + 2}" '
           f'data-rows="{len(rows)}" data-cols="{len(rows[0])}" data-step="{step}">',
           f'<text x="{pad}" y="12">keys →</text>',
           f'<text x="4" y="{pad}" transform="rotate(90 4 {pad})">queries →</text>']
    for r, row in enumerate(rows):
        out += [f'<rect class="{c}" x="{pad + j * px}" y="{pad + r * px}" width="{px - gap}" height="{px - gap}"/>'
                for j, c in enumerate(row)]
    q, k = site.shapes["q"][-2], site.shapes["k"][-2]
    cell = f"; one cell = {step}×{step} positions, kept if any is" if step > 1 else ""
    return "".join(out) + f'</svg>{_legend({c for row in rows for c in row})}' \
        f'<p class="caption">{q} queries × {k} keys{_e(cell)}</p>'


def _legend(states, long: bool = False) -> str:
    """The swatches of the cell classes in ``states``, in `_STATES` order."""
    return '<p class="legend">' + "".join(f'<span class="{c}"></span>{_e(text[long])}' for c, text in _STATES.items()
                                          if c in states) + "</p>"


def _mask_caption(mask: dict) -> str:
    """What the hatching means for this mask, and the parts the picture cannot show."""
    kinds, lines = mask.get("kind", "none").split("+"), []
    band = [k for k in ("causal", "window") if k in kinds]
    if band and any(k in _TENSOR_KINDS for k in kinds) and not mask.get("blocks", {}).get("layout"):
        lines.append(f"the {' / '.join(band)} part is exact: what it masks is solid, and the run-time part "
                     "decides what it keeps (hatched)")
    if "padding" in kinds:
        lines.append("key padding: which keys are hidden is known only at run time (hatched)")
    if "bias" in kinds:
        lines.append("additive bias tensor: the weights are known only at run time (hatched)")
    if "dense" in kinds:
        lines.append("dense mask tensor: not proven to be a band, known only at run time (hatched)")
    if "documents" in kinds:
        lines.append("packed documents: a key is visible only from its own document's queries; the segment ids "
                     "are read at run time (hatched)")
    if "prefix" in kinds:
        lines.append("prefix-LM: prefix keys are visible from every query of their document, also outside the "
                     "band; which keys are prefix is read at run time (hatched)")
    if "blocksparse" in kinds:
        b, d = mask.get("blocks", {}), mask.get("density")
        tiles = ", ".join(f"{b[t]} {t}" for t in ("empty", "full", "partial") if t in b)
        shown = ("one cell per tile: blue = full, light blue = partial, grey = empty (skipped)" if b.get("layout")
                 else "its tile layout is not in the report (hatched)")
        lines.append(f"block-sparse constant mask; {shown}. {b.get('tile', [64])[0]}×{b.get('tile', [64])[-1]} "
                     f"tiles: {tiles}" + (f"; density {d:.1%}" if isinstance(d, (int, float)) else ""))
    if "alibi" in kinds:
        lines.append(f"ALiBi: per-head slopes ({mask.get('alibi_heads', '?')} heads) add a bias linear in the "
                     "key-query distance; it weights, never hides, keys")
    return "".join(f'<p class="caption">{_e(x)}</p>' for x in lines)


def _mask_params(mask: dict) -> str:
    rows = []
    for key, v in mask.items():
        if key in ("kind", "proof", "kept_dense", "blocks", "density", "alibi_heads"):
            continue
        if key == "window":
            v = f"left {v[0]}, right {v[1]}  (key j visible from query i iff i - left ≤ j ≤ i + right; -1 = unbounded)"
        elif key == "tensors":
            v = "; ".join(f"{t.get('kind')} {t.get('dtype')} {list(t.get('shape', []))}" for t in v)
        elif isinstance(v, float):
            v = f"{v:.4g}"
        rows.append(("", [_e(key), f'<span class="mono">{_e(v)}</span>']))
    body = _table(None, rows, "facts") if rows else ""
    dense = f'<p class="note">kept dense: {_e(mask["kept_dense"])}</p>' if mask.get("kept_dense") else ""
    proof = "".join(f"<li>{_e(p)}</li>" for p in mask.get("proof", []))
    return body + dense + (f'<div>proof:</div><ul class="proof">{proof}</ul>' if proof else "")


def _site(s) -> str:
    scale = f"{s.scale:.6g}" if isinstance(s.scale, float) else s.scale
    facts = [("kernel", f"{s.kernel}  {_config(s.config)}".rstrip() if s.kernel else "–"), ("pattern", s.pattern),
             *((f"shape {t}", "×".join(map(str, s.shapes[t]))) for t in ("q", "k", "v") if t in s.shapes),
             ("dtype", s.dtype), ("scale", scale), ("kv_groups", s.kv_groups)]
    if s.error is not None:
        facts.append(("calibrated rel. error", f"{s.error:.3g}"))
        row = next((c for c in s.candidates if c.get("kernel") == s.kernel and c.get("params")), {})
        if row:
            facts.append(("knobs (cost model)", _config(row["params"])))
        for i, t in enumerate(row.get("tried") or []):
            facts.append((f"calibrated level {i}", f"{_config(t['params'])}: error {t['error']:.3g}"))
    approx = '<span class="badge approx">approximate</span>' if s.error is not None else ""
    out = [f'<section class="site" id="site-{s.id}" data-status="{_e(s.status)}">',
           f'<h2><span class="badge {_e(s.status)}">{_e(s.status)}</span>{approx}#{s.id} '
           f'<code class="module">{_e(s.module or "–")}</code><span class="src">{_e(s.source or "")}</span></h2>']
    if s.status != "fused":
        out.append(f'<p class="reason">Not fused: {_e(s.reason or "no reason recorded")}</p>')
    facts_html = _table(None, [("", [_e(k), f'<span class="mono">{_e("–" if v in ("", None) else v)}</span>'])
                               for k, v in facts], "facts")
    out.append(f'<div class="cols"><div><h3>site</h3>{facts_html}</div><div class="maskbox">'
               f'<h3>mask: <span class="mono">{_e(s.mask.get("kind", "none"))}</span></h3>{_mask_svg(s)}'
               f'{_mask_caption(s.mask)}{_mask_params(s.mask)}</div></div>')
    if s.subgraph:
        before = ("matched subgraph (before)" if s.status == "fused" else "matched subgraph (left as it is)"
                  if s.pattern else "nodes the matcher looked at (left as they are)")
        cols = "".join(f'<div><h3>{label}</h3><pre class="{key}">{_e(chr(10).join(s.subgraph[key]))}</pre></div>'
                       for key, label in (("before", before), ("after", "after the rewrite")) if key in s.subgraph)
        out.append(f'<div class="cols subgraph">{cols}</div>')
    if s.candidates:
        rows, measured = [], any(c.get("measured_s") is not None for c in s.candidates)
        for c in s.candidates:
            chosen = s.status == "fused" and c.get("kernel") == s.kernel and not c.get("rejected")
            cells = [_e(c.get("kernel")) + (" ✓ chosen" if chosen else ""), "yes" if c.get("exact") else "no",
                     "#" + _time(c.get("est_time_s")), "#" + _bytes(c.get("hbm_bytes"))]
            rows.append(("chosen" if chosen else "rejected" if c.get("rejected") else "",
                         cells + (["#" + _time(c.get("measured_s"))] if measured else [])
                         + [_e(c.get("rejected") or "")]))
        head = ["kernel", "exact?", "est. time", "HBM bytes", *(["measured"] if measured else []), "rejected because"]
        title = "cost model" + (f" (measured: {_e((s.autotune or {}).get('measured', ''))}, cache "
                                f"{_e((s.autotune or {}).get('cache', ''))})" if measured else "")
        out.append(f"<h3>{title}</h3>" + _table(head, rows, "grid candidates"))
    if s.table:
        rows = [("", [_e(f"{r['kv_len'][0]} … {'∞' if r['kv_len'][1] is None else r['kv_len'][1]}"),
                      _e(r.get("kernel")), f'<span class="mono">{_e(_config(r.get("config") or {}))}</span>',
                      "#" + _e(r.get("planned_at", "–")), "#" + _time(r.get("est_time_s"))]) for r in s.table]
        out.append("<h3>dynamic key length: plan per range</h3>" + _table(
            ["kv_len", "kernel", "config", "planned at", "est. time"], rows, "grid dynamic"))
    return "".join(out) + "</section>"


def render(report) -> str:
    """The whole page for ``report`` (a `Report`)."""
    fused, total = len(report.fused), len(report.sites)
    kernels = collections.Counter(s.kernel for s in report.fused)
    chips = "".join(f'<span data-kernel="{_e(k)}">{_e(k)} ×{n}</span>' for k, n in kernels.most_common())
    notes = "".join(f"<li>{_e(n)}</li>" for n in report.notes)
    overview = _table(["#", "module", "source", "status", "kernel", "mask", "reason"], [
        (s.status, [f'<a href="#site-{s.id}">{s.id}</a>', f"<code>{_e(s.module)}</code>", _e(s.source),
                    _e(s.status), _e(s.kernel or "–"), _e(s.mask.get("kind", "none")), _e(s.reason or "")])
        for s in report.sites], "grid overview")
    legend = _legend(_STATES, long=True).replace('class="legend">', 'class="legend">mask cells:', 1)
    summary = (f'<header id="summary" data-fused="{fused}" data-total="{total}"><h1>attnfuse audit report</h1>'
               f'<p class="headline"><b>{fused}</b> of <b>{total}</b> attention sites fused</p>'
               f'<table class="facts"><tr><th>device</th><td class="mono">{_e(report.device or "–")}</td></tr>'
               f'<tr><th>graphs</th><td>{report.graphs}</td></tr>'
               f'<tr><th>kernels</th><td class="kernels">{chips or "none"}</td></tr></table>'
               + (f'<h3>notes</h3><ul class="notes">{notes}</ul>' if notes else "")
               + f"<h3>sites</h3>{overview}{legend}"
               '<nav>show: <button class="active" data-show="all">all</button><button data-show="fused">fused'
               '</button><button data-show="skipped">skipped</button></nav></header>')
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width"><title>attnfuse audit: {fused} of {total} fused'
            f'</title><style>{_CSS}</style></head><body>{_HATCH}<main>{summary}'
            + "".join(_site(s) for s in report.sites)
            + f"</main><script>{_JS}</script></body></html>\n")
