"""Measured selection (``options={"autotune": True}``): time the allowed exact candidates of a site, keep the fastest.

`tune(plan, site, settings)` takes the cost model's `Plan` of one site and what the backend knows of it (`Tunable`)
and times, on fresh seeded random inputs of the site's shape (or of each exact row of a dynamic table: its
``planned_at`` key length, the query length scaled as the table does): attnfuse's own kernels (``impl=""``; where
Triton runs, up to `TILE_VARIANTS` tile configs that fit, the model's first, as the op's ``tiles``), ``sdpa`` (each
backend its row names, ``impl="sdpa:<backend>"``) and ``flex`` (``impl="flex"``, with its own keywords, mask and
packed-document tensor where the site has them) -- never the approximate families nor the unfused ``eager``.  Each
runs ``warmup`` times, then ``reps`` timed calls (forward, or forward+backward through ``torch.autograd.grad`` for a
training site; both loops stop early past `BUDGET_S`); its time is the median.  A candidate that raises is not
measured, with the exception's one-line reason (``measure_error``): it loses, compilation goes on.

The choice: one family+impl for the whole site (the op's ``stats`` depend on it), with the least total time over
the measured rows (ties: the model's choice); own-kernel tiles per row.  A table with approximate rows keeps
attnfuse's own kernels (``impl`` does not combine with ``approx``).  Every candidate row gets ``measured_s`` (None:
not measured; a dynamic table's rows summed) and ``measured`` ("forward" | "forward+backward"); a measured family
gets ``variants`` (every timing), the losers ``rejected = "measured {ratio}x the time of '{best}'"``.  The result is
a `TunedPlan`: a `Plan` plus the report's ``autotune`` record (`attnfuse.report.Site.autotune`).  Measurements
persist in an on-disk cache (`attnfuse._tunecache`): a hit skips the timing; a torch/triton upgrade re-measures.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import ops  # noqa: F401 - registers torch.ops.attnfuse
from ._tunecache import TuneCache, cache_key, default_timer, environment, inputs, measure, measuring
from .costmodel import tiles as tilemodel
from .costmodel.plan import APPROXIMATE, Plan
from .device import PRESETS, DeviceSpec, cuda_spec, triton_unsupported

__all__ = ["BUDGET_S", "MEASURED", "OWN", "TILE_VARIANTS", "Trial", "Tunable", "TunedPlan", "impl_of", "tune"]

log = logging.getLogger("attnfuse.autotune")

OWN = ("flash", "window", "blocksparse")  # attnfuse's own kernels: impl ""
MEASURED = (*OWN, "sdpa", "flex")  # the families tune times
TILE_VARIANTS = 4  # own-kernel tile configs timed per length, the model's included
BUDGET_S = 2.0  # seconds one candidate may spend at one length before its warmup / reps stop early
_MODES = {False: "forward", True: "forward+backward"}


@dataclasses.dataclass(frozen=True)
class Tunable:
    """What the backend knows of one site.  ``shape``: batch, heads, kv_heads, q_len, kv_len, head_dim, v_head_dim,
    elem; ``training``: time forward+backward; ``op_kwargs``: the op keywords every candidate shares (scale,
    causal, softcap, kv_groups, dropout_p, mask_fill, window_left, window_right, block_sparse, window_pad);
    ``mask``: (shape, dtype) of the mask tensor the op gets (synthetic: all but ~10% of keys, never a row with
    none); ``flex_kwargs``: None when flex runs the site like the others, else the keywords where it differs (with
    ``flex_mask`` its mask and ``flex_doc`` whether it gets a packed-document tensor); ``structure``: the mask
    structure (cache key); ``spec``: the device's tile limits (None: the device's own); ``seed``: the inputs'."""

    shape: Mapping[str, Any]
    dtype: torch.dtype
    device: str
    training: bool
    op_kwargs: Mapping[str, Any]
    mask: tuple[tuple[int, ...], torch.dtype] | None = None
    alibi: bool = False
    sinks: bool = False
    flex_kwargs: Mapping[str, Any] | None = None
    flex_doc: bool = False
    flex_mask: tuple[tuple[int, ...], torch.dtype] | None = None
    structure: str = ""
    spec: DeviceSpec | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TunedPlan(Plan):
    """A `Plan` chosen by measurement; ``autotune`` is the report's record (`attnfuse.report.Site.autotune`)."""

    autotune: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Trial:
    """One timed configuration; calling it runs the op once (forward, or forward+backward).  A timer gets it, so
    a test's fake timer can tell the candidates apart by these fields."""

    kernel: str
    impl: str
    tiles: str
    q_len: int
    kv_len: int
    training: bool
    run: Callable[[], None] = dataclasses.field(repr=False, compare=False)

    def __call__(self) -> None:
        self.run()


def impl_of(row: Mapping[str, Any]) -> str:
    """The op's ``impl`` for a candidate row: "sdpa:<backend>", "flex", or "" (attnfuse's own kernels, and the
    approximate ones, which the op's ``approx`` table runs).  ``eager`` is no op: ValueError."""
    kernel = row["kernel"]
    if kernel == "eager":
        raise ValueError("attnfuse autotune: the 'eager' candidate is the unfused graph; it has no op impl")
    if kernel == "sdpa":
        return f"sdpa:{row.get('backend') or 'cpu'}"
    return "flex" if kernel == "flex" else ""


def _label(kernel: str, impl: str) -> str:
    return impl if impl.startswith("sdpa:") else kernel


def _allowed(row: Mapping[str, Any]) -> bool:
    if "allowed" in row:
        return bool(row["allowed"])
    return row["rejected"] is None or str(row["rejected"]).startswith("estimated ")


def _units(candidates: list[dict[str, Any]], own_only: bool) -> list[tuple[str, str]]:
    """(kernel, impl) of every allowed measured candidate, in the plan's order."""
    units: list[tuple[str, str]] = []
    for row in candidates:
        if row["kernel"] not in MEASURED or not _allowed(row) or (own_only and row["kernel"] not in OWN):
            continue
        if row["kernel"] == "sdpa":
            units += [("sdpa", f"sdpa:{b}") for b in (row.get("backends") or [row.get("backend") or "cpu"])]
        else:
            units.append((row["kernel"], impl_of(row)))
    return list(dict.fromkeys(units))


@dataclasses.dataclass
class _Row:
    """One length tune measures: the site's, or a dynamic table row's (``index``)."""

    index: int | None
    q_len: int
    kv_len: int
    model_config: dict[str, Any]
    candidates: list[dict[str, Any]]


def _rows(plan: Plan, site: Tunable) -> list[_Row]:
    s = site.shape
    if not plan.table:
        return [_Row(None, s["q_len"], s["kv_len"], dict(plan.config), plan.candidates)]
    ratio = s["q_len"] / max(1, s["kv_len"])
    out = []
    for i, r in enumerate(plan.table):
        if r["kernel"] in APPROXIMATE or r["kernel"] == "eager":
            continue
        rep = r["planned_at"]
        q_len = s["q_len"] if ratio < 1 and s["q_len"] == 1 else max(1, round(rep * ratio))
        out.append(_Row(i, q_len, rep, dict(r.get("config") or {}), r.get("candidates") or plan.candidates))
    return out


def _spec(site: Tunable) -> DeviceSpec:
    if site.spec is not None:
        return site.spec
    dev = torch.device(site.device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return cuda_spec(dev.index if dev.index is not None else torch.cuda.current_device())
    return PRESETS["cpu"]


def _triton_runs(site: Tunable) -> bool:
    head = max(site.shape["head_dim"], site.shape["v_head_dim"])
    return triton_unsupported(torch.device(site.device).type, site.dtype, head) is None


def _tile_variants(site: Tunable, row: _Row) -> list[dict[str, int]]:
    """Own-kernel tile configs to time at ``row``: the model's pair first, then the best fitting ones by the tile
    model (forward tiles; backward ones too for a training site); the model's pair alone where Triton does not run."""
    s, spec = site.shape, _spec(site)
    groups = s["heads"] // max(1, s["kv_heads"])
    rows, bh, d, dv, elem = row.q_len * groups, s["batch"] * s["kv_heads"], s["head_dim"], s["v_head_dim"], s["elem"]
    mask_elem = site.mask[1].itemsize if site.mask else 0
    kw = site.op_kwargs
    visits = tilemodel.band((kw.get("window_left", -1), kw.get("window_right", -1)), bool(kw.get("causal")))
    first = row.model_config if "BLOCK_M" in row.model_config else tilemodel.config_dict(*tilemodel.launch_configs(
        rows, row.kv_len, bh, d, dv, elem, spec, mask_elem, groups, visits))
    if not _triton_runs(site):
        return [dict(first)]

    def ranked(kind: str) -> list[tilemodel.TileConfig]:
        return sorted(tilemodel.kept_configs(kind, d, dv, elem, spec, mask_elem), key=lambda c: tilemodel.estimate_s(
            c, kind, rows, row.kv_len, bh, d, dv, elem, spec, mask_elem=mask_elem, groups=groups, window=visits))

    model_bwd = tilemodel.TileConfig(*(first[f"bwd_{k}"] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")))
    fwd = ranked("fwd")
    bwd = ranked("bwd") if site.training else []
    pairs = [tilemodel.config_dict(f, bwd[min(i, len(bwd) - 1)] if bwd else model_bwd) for i, f in enumerate(fwd)]
    out = [dict(first)]
    for cfg in pairs:
        if cfg not in out and len(out) < TILE_VARIANTS:
            out.append(cfg)
    return out


def _variants(site: Tunable, row: _Row, kernel: str, impl: str) -> list[tuple[dict[str, Any], str]]:
    """(config, the op's ``tiles``) of each configuration of (kernel, impl) timed at ``row``."""
    if kernel not in OWN:
        return [({"impl": impl}, "")]
    configs = _tile_variants(site, row)
    if not _triton_runs(site):
        return [(configs[0], "")]
    return [(cfg, tilemodel.encode([(0, None, cfg)])) for cfg in configs]


def _trial(site: Tunable, row: _Row, kernel: str, impl: str, tiles: str, pool: dict[str, Any]) -> Trial:
    def run() -> None:
        args, kw = inputs(site, row.q_len, row.kv_len, pool, kernel == "flex")
        kw.update({"impl": impl} if impl else {}, **({"tiles": tiles} if tiles else {}))
        out, _ = torch.ops.attnfuse.attention(*args, **kw)
        if site.training:
            torch.autograd.grad(out, args[:3], pool["grad"])

    return Trial(kernel, impl, tiles, row.q_len, row.kv_len, site.training, run)


def tune(plan: Plan, site: Tunable, config_autotune: Mapping[str, Any], *, timer: Callable | None = None,
         cache: TuneCache | None = None) -> TunedPlan:
    """``plan`` re-chosen by measurement (see the module docstring).  ``config_autotune``: `attnfuse.Config`'s
    ``autotune`` (``cache`` path or False, ``reps``, ``warmup``); ``timer(trial) -> seconds`` of one call of a
    `Trial` (default: CUDA events on CUDA, ``time.perf_counter`` elsewhere); ``cache``: a `TuneCache` to use
    instead of the configured file.  Never raises for a candidate that fails: it is reported, not chosen."""
    settings = {"reps": int(config_autotune.get("reps", 10)), "warmup": int(config_autotune.get("warmup", 2))}
    path = config_autotune.get("cache") or None
    store = cache if cache is not None else (TuneCache(path) if path else None)
    mode = _MODES[bool(site.training)]
    record: dict[str, Any] = {"cache": "off" if store is None else "miss", "path": None if store is None else
                              store.path, "measured": mode, **settings, "model": _label(*_model_unit(plan))}
    own_only = any(r["kernel"] in APPROXIMATE for r in plan.table)  # `impl` does not combine with `approx`
    rows = _rows(plan, site) if plan.kernel != "eager" and plan.kernel not in APPROXIMATE else []
    units = _units(plan.candidates, own_only) if rows else []
    if not units:
        record.update(cache="off", reason="no allowed exact candidate to measure", chosen=record["model"], timed=0,
                      cached=0)
        return _rebuild(plan, site, rows, units, {}, record)
    env, timer = environment(site.device), timer or default_timer(site.device)
    timings: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    timed = cached = 0
    with measuring(site):
        for i, row in enumerate(rows):
            pool: dict[str, Any] = {}  # this length's inputs, shared by its candidates
            allowed = {r["kernel"]: _allowed(r) for r in row.candidates}
            for kernel, impl in units:
                if not allowed.get(kernel, True):
                    continue
                try:
                    variants = _variants(site, row, kernel, impl)
                except ValueError as exc:  # no tile fits this spec (NoTileFits)
                    timings[(i, kernel, impl)] = [{"impl": impl, "config": {}, "q_len": row.q_len, "kv_len": row.kv_len,
                                                   "measured_s": None, "error": str(exc), "cached": False}]
                    continue
                for config, tiles in variants:
                    key = cache_key(env, site, row.q_len, row.kv_len, kernel, impl, tiles)
                    value = store.get(key) if store is not None else None
                    hit = value is not None
                    if value is None:
                        value = measure(_trial(site, row, kernel, impl, tiles, pool), site, settings, timer, pool,
                                        BUDGET_S)
                        if store is not None and value.pop("keep"):
                            store.put(key, value)
                    cached, timed = cached + hit, timed + (not hit)
                    log.debug("attnfuse autotune: %s %s at q=%d kv=%d: %s", _label(kernel, impl), tiles, row.q_len,
                              row.kv_len, value)
                    timings.setdefault((i, kernel, impl), []).append(
                        {"impl": impl, "config": config, "q_len": row.q_len, "kv_len": row.kv_len,
                         "measured_s": value.get("measured_s"), "error": value.get("error"), "cached": hit})
            pool.clear()
    if store is not None:
        store.flush()
        record["cache"] = "hit" if timed == 0 else "miss"
    record.update(timed=timed, cached=cached)
    tuned = _rebuild(plan, site, rows, units, timings, record)
    log.info("attnfuse autotune: '%s' chosen by measurement (model: '%s'; %d timed, %d from the cache)",
             record["chosen"], record["model"], timed, cached)
    return tuned


def _model_unit(plan: Plan) -> tuple[str, str]:
    return plan.kernel, ("" if plan.kernel in OWN else str(plan.config.get("impl") or ""))


def _best_at(timings: Mapping[tuple[int, str, str], list[dict[str, Any]]]) -> dict[tuple[int, tuple], dict]:
    """(row, unit) -> the fastest measured variant there."""
    out = {}
    for (i, kernel, impl), recs in timings.items():
        ok = [r for r in recs if r["measured_s"] is not None]
        if ok:
            out[(i, (kernel, impl))] = min(ok, key=lambda r: r["measured_s"])
    return out


def _choose(plan: Plan, units: list[tuple[str, str]], best_at: Mapping) -> tuple[tuple[str, str] | None, dict]:
    """The unit (kernel, impl) with the least total time over the rows where anything was measured, among those
    measured on every such row (ties: the model's, then the plan's order), and every such unit's total."""
    measured_rows = sorted({i for i, _ in best_at})
    totals = {u: sum(best_at[(i, u)]["measured_s"] for i in measured_rows) for u in units
              if measured_rows and all((i, u) in best_at for i in measured_rows)}
    if not totals:
        return None, {}
    model = _model_unit(plan)
    return min(totals, key=lambda u: (totals[u], u != model, units.index(u))), totals


def _annotate(rows: list[dict[str, Any]], times: Mapping[tuple[str, str], float], units: list[tuple[str, str]],
              chosen: tuple[str, str], mode: str, errors: Mapping[str, dict[str, Any]]) -> None:
    """Set ``measured_s`` / ``measured`` on every candidate row; a measured family that is not ``chosen`` (the unit
    that runs) gets its ratio as ``rejected``, one that failed its ``measure_error``."""
    ref = times.get(chosen)
    for c in rows:
        c["measured_s"], c["measured"] = None, mode
        if not any(u[0] == c["kernel"] for u in units) or not _allowed(c):
            continue
        mine = {u: t for u, t in times.items() if u[0] == c["kernel"]}
        unit = chosen if chosen in mine else min(mine, key=lambda u: mine[u]) if mine else None
        if unit is not None:
            c["measured_s"] = mine[unit]
            if c["kernel"] == "sdpa":
                c["backend"] = unit[1].split(":", 1)[1]
        elif c["kernel"] in errors:
            c["measure_error"] = f"at {errors[c['kernel']]['kv_len']} keys: {errors[c['kernel']]['error']}"
        if c["kernel"] == chosen[0]:
            c["rejected"] = None
        elif unit is not None and ref:
            c["rejected"] = f"measured {mine[unit] / ref:.2f}x the time of '{_label(*chosen)}'"
        elif unit is None:
            c["rejected"] = (f"failed when measured {c['measure_error']}" if "measure_error" in c
                             else "not measured at every length of the table")


def _rebuild(plan: Plan, site: Tunable, rows: list[_Row], units: list[tuple[str, str]],
             timings: Mapping[tuple[int, str, str], list[dict[str, Any]]], record: dict[str, Any]) -> TunedPlan:
    """The `TunedPlan`: the chosen unit's kernel and config, candidates annotated (the chosen first), each exact
    table row running the chosen unit with its fastest tile there."""
    best_at = _best_at(timings)
    best, totals = _choose(plan, units, best_at)
    errors: dict[str, dict[str, Any]] = {}
    for (_, kernel, _), recs in timings.items():
        for r in recs:
            if r["error"] and kernel not in errors:
                errors[kernel] = r
    candidates = [dict(c) for c in plan.candidates]
    _annotate(candidates, totals, units, best or _model_unit(plan), record["measured"], errors)
    for c in candidates:
        if c["kernel"] in MEASURED and any(k == c["kernel"] for _, k, _ in timings):
            c["variants"] = [r for (_, k, _), recs in timings.items() if k == c["kernel"] for r in recs]
    table = [dict(r) for r in plan.table]
    if best is None:
        if units:
            record.setdefault("reason", "no candidate could be measured at every length; the model's choice stays")
        record.setdefault("chosen", record["model"])
        return TunedPlan(plan.kernel, dict(plan.config), candidates, table, autotune=record)
    record["chosen"] = _label(*best)
    configs = []
    for i, row in enumerate(rows):
        rec = best_at.get((i, best))
        model_kernel = plan.table[row.index]["kernel"] if row.index is not None else plan.kernel
        if rec is not None:
            config = rec["config"]
        elif best[0] in OWN and model_kernel == best[0]:
            config = row.model_config
        else:
            config = _variants(site, row, *best)[0][0]
        configs.append(dict(config))
        if row.index is None:
            continue
        entry = table[row.index]
        entry.update(kernel=best[0], config=dict(config), measured_s=None if rec is None else rec["measured_s"])
        if "candidates" in entry:
            here = {u: best_at[(i, u)]["measured_s"] for u in units if (i, u) in best_at}
            entry["candidates"] = [dict(c) for c in entry["candidates"]]
            _annotate(entry["candidates"], here, units, best, record["measured"], {})
    config = configs[_site_row(plan, site, rows)] if configs else dict(plan.config)
    candidates.sort(key=lambda c: c["kernel"] != best[0])
    return TunedPlan(best[0], config, candidates, table, autotune=record)


def _site_row(plan: Plan, site: Tunable, rows: list[_Row]) -> int:
    """The measured row whose key-length range holds the site's example length (the first one if none does)."""
    kv = site.shape["kv_len"]
    for i, row in enumerate(rows):
        if row.index is None:
            return i
        lo, hi = plan.table[row.index]["kv_len"]
        if kv >= lo and (hi is None or kv < hi):
            return i
    return 0
