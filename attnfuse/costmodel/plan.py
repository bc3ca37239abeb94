"""The planner: every kernel candidate for one attention site, why each may not run, and the choice.

`plan(shape, spec, kernels, ...)` lists every family of the registry (`attnfuse.families`) -- ``flash`` (exact,
dense), ``window`` and ``blocksparse`` (exact, skipping the tiles a proven mask removes), PyTorch's ``sdpa`` and
``flex`` (exact; chosen only when estimated more than `PYTORCH_MARGIN` faster than attnfuse's best), ``topk`` and
``lsh`` (approximate, opt-in), and the unfused ``eager`` graph -- each with an `Estimate` (FLOPs, HBM bytes,
exponentials, time; `attnfuse.costmodel.estimates`) or the reason it cannot run the site, and chooses the
cheapest one allowed.  The tile-level model under the estimates is `attnfuse.costmodel.tiles`.

The policy: attnfuse fuses whenever an allowed kernel applies, so ``eager`` runs only when none does -- even
where it is estimated faster (a tiny site on a slow launch).  Every row's ``rejected`` reason is true of its own
numbers: a kernel that lost says by how much, and ``eager``'s reason states the rule, its estimate against the
chosen kernel's (faster or not) and the size of the score matrix it would materialize; when nothing is
allowed, ``eager`` is what runs and its row has no reason.

When the site's sequence lengths are dynamic, the plan is a table keyed by key-length ranges (`Plan.table`);
the op consults it on every call (`attnfuse.ops`), so a new length never recompiles.

`DeviceSpec` and its presets live in `attnfuse.device` (re-exported here).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .._sizes import size_text
from ..device import PRESETS, DeviceSpec
from ..families import APPROXIMATE, EXACT, FAMILIES, PYTORCH_KERNELS
from . import estimates, lshknobs
from .estimates import scores_bytes, visible_keys
from .tiles import Estimate, NoTileFits

__all__ = ["APPROXIMATE", "EXACT", "PRESETS", "PYTORCH_MARGIN", "DeviceSpec", "Estimate", "Plan", "estimate_family",
           "plan", "visible_keys"]

# key-length ranges of a dynamic plan's table: [lo, hi), each planned at its geometric middle
_RANGES = (0, 256, 1024, 4096, 16384, 65536)
_LAST_REP = 131072


@dataclasses.dataclass(frozen=True)
class Plan:
    """The chosen ``kernel`` ("eager": not fused), its tile ``config``, every candidate, and for dynamic lengths
    the ``table`` of (key-length range -> kernel) rows the op consults per call."""

    kernel: str
    config: dict[str, Any]
    candidates: list[dict[str, Any]]
    table: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def op_table(self, params: Mapping[str, Any] | None = None) -> str:
        """The op's ``approx`` argument: "" when every length runs the exact kernel the graph was rewritten for,
        else JSON ``{"table": [[lo, hi, "exact" | "topk" | "lsh"], ...], "params": {...}}`` (hi -1: unbounded).
        ``params`` as calibrated: LSH's ``bits`` stays -1 where auto, so each call resolves it at its key length."""
        rows = self.table or [{"kv_len": [0, None], "kernel": self.kernel}]
        kinds = [r["kernel"] if r["kernel"] in APPROXIMATE else "exact" for r in rows]
        if all(k == "exact" for k in kinds):
            return ""
        table = [[r["kv_len"][0], -1 if r["kv_len"][1] is None else r["kv_len"][1], k] for r, k in zip(rows, kinds)]
        return json.dumps({"table": table, "params": dict(params or {})}, sort_keys=True)


def estimate_family(family: str, shape: Mapping[str, Any], spec: DeviceSpec, *,
                    structure: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None,
                    causal: bool = False) -> tuple[dict[str, int], Estimate]:
    """(tile config, Estimate) of ``family`` running ``shape`` on ``spec`` (the registry's estimate,
    `attnfuse.costmodel.estimates`).  ``structure``: the proven ``window`` and ``block_sparse`` ``density``;
    ``params``: the approximate family's settings (its registry defaults fill the rest)."""
    record = FAMILIES.get(family)
    if record is None:
        raise ValueError(f"attnfuse costmodel: unknown kernel family {family!r}; allowed: {', '.join(FAMILIES)}")
    return record.estimate(shape, spec, structure=structure or {}, params={**record.defaults, **(params or {})},
                           causal=causal)


def _candidate(family: str, est: Estimate | None, rejected: str | None, **extra: Any) -> dict[str, Any]:
    row = {"kernel": family, "exact": FAMILIES[family].exact, "est_time_s": est.time_s if est else None,
           "hbm_bytes": est.hbm_bytes if est else None, "flops": est.flops if est else None,
           "exp_ops": est.exp_ops if est else None, "rejected": rejected,
           "allowed": rejected is None and est is not None and family != "eager"}
    row.update(extra)
    return row


def _why(family: str, kernels: Sequence[str], band: bool, sparse: bool, approx: Mapping[str, Any] | None,
         padded: bool = False, limits: Mapping[str, str | None] | None = None,
         tpa: Mapping[str, Any] | None = None):
    """Why ``family`` may not run the site (None: it may).  ``padded``: a padded window (``window_pad``), whose
    zero keys only the window kernels add; ``limits``: {"sdpa" | "flex": why PyTorch's kernel cannot compute the
    site exactly, or None} (the backend's, from the match); ``tpa``: the factorized sides' ``ranks`` and ``why``
    not (None: no side is factorized)."""
    if family in PYTORCH_KERNELS:  # whether they can run a site is the caller's ``limits``
        if limits is None or family not in limits:
            return f"'{family}' is a candidate only for a matched site, whose facts say whether it computes it exactly"
        if limits[family]:
            return limits[family]
        return None if family in kernels else f"'{family}' is not in options['kernels']"
    if family == "tpa":
        if not tpa:
            return "needs q, k or v formed from per-token factors (Tensor Product Attention)"
        if tpa.get("why"):
            return tpa["why"]
        return None if family in kernels else f"'{family}' is not in options['kernels']"
    if padded and family != "window":
        return "the padded window's zero keys (the unfold spelling) run in the window kernel only"
    if family == "flash" and (band or sparse):
        return "the proven mask structure runs in the window / block-sparse mode of the same kernel"
    if family == "window" and not band:
        return "needs a proven band (window/causal) and no key padding"
    if family == "blocksparse" and not sparse:
        return "needs a constant mask with empty tiles"
    if family in APPROXIMATE:
        if approx is None:
            return "approximate kernels need options['approximate'] (opt-in)"
        if approx.get("rejected", {}).get(family):
            return approx["rejected"][family]
    if family not in kernels:
        return f"'{family}' is not in options['kernels']"
    return None


_UNFUSED = "the unfused graph runs only where no allowed kernel applies"  # eager's reason until `_choose`


def _knobs(family: str, params: Mapping[str, Any], kv_len: int) -> dict[str, Any]:
    """An approximate family's complete settings (registry defaults filled in), LSH's ``bits`` resolved at
    ``kv_len`` (`lshknobs.resolved`; the op's table keeps -1, resolved per call)."""
    full = {**FAMILIES[family].defaults, **params}
    return lshknobs.resolved(full, kv_len) if family == "lsh" else full


def _candidates(shape, spec, kernels, structure, approx):
    """Every family's candidate row for one shape (``rejected`` None: allowed), and the tile configs."""
    structure = structure or {}
    causal = bool(structure.get("causal", shape.get("causal", False)))
    band, sparse = structure.get("window") is not None, bool(structure.get("block_sparse"))
    padded = bool(structure.get("window_pad"))
    if padded and not band:
        raise ValueError("attnfuse costmodel: structure['window_pad'] needs the band it pads, structure['window'] "
                         "= (left, right)")
    rows, configs = [], {}
    tpa = structure.get("tpa")
    # a factorized site: every kernel but tpa runs after the graph forms the tensors (`estimates.formation`)
    formed = estimates.formation(shape, spec, tpa["ranks"]) if tpa and not tpa.get("why") else None
    for family in FAMILIES:
        extra: dict[str, Any] = {}
        why = _UNFUSED if family == "eager" else _why(family, kernels, band, sparse, approx, padded,
                                                     structure.get("limits"), structure.get("tpa"))
        if (family == "window" and not band) or (family == "blocksparse" and not sparse) or (
                family == "tpa" and (not structure.get("tpa") or structure["tpa"].get("why"))):
            rows.append(_candidate(family, None, why))
            continue
        if family == "window":
            extra["visible_keys"] = round(visible_keys(shape["q_len"], shape["kv_len"], *structure["window"],
                                                       causal), 1)
        if family == "blocksparse":
            extra["density"] = structure.get("density", 1.0)
        if family == "eager":
            extra["scores_bytes"] = scores_bytes(shape)
        if family in APPROXIMATE and approx is not None and family in approx.get("errors", {}):
            extra["error"] = approx["errors"][family]
        params = (approx or {}).get("params", {}).get(family, {})
        if family in APPROXIMATE and approx is not None:  # the knobs, as they run at this row's key length
            params = extra["params"] = _knobs(family, params, shape["kv_len"])
            if approx.get("tried", {}).get(family):
                extra["tried"] = [{**t, "params": _knobs(family, t["params"], shape["kv_len"])}
                                  for t in approx["tried"][family]]
        try:
            configs[family], est = estimate_family(family, shape, spec, structure=structure, params=params,
                                                   causal=causal)
        except NoTileFits as exc:  # the site's head dims (forward or backward) need more shared memory
            rows.append(_candidate(family, None, why or str(exc).removeprefix("attnfuse flash: "), **extra))
            continue
        if formed is not None and family != "tpa":
            est, extra["forms_factors"] = est + formed, True
        if family == "sdpa":
            configs[family] = {"impl": f"sdpa:{structure.get('sdpa_backend', 'cpu')}"}
            extra["backend"] = structure.get("sdpa_backend", "cpu")
        elif family == "flex":
            configs[family] = {"impl": "flex"}
        rows.append(_candidate(family, est, why, **extra))
    return rows, configs


def _eager_reason(eager: dict[str, Any], best: dict[str, Any]) -> str:
    """Why the unfused graph does not run although ``best`` (the chosen kernel) does: the policy, and what the
    two estimates say -- the unfused graph may well be estimated faster."""
    ratio = eager["est_time_s"] / best["est_time_s"]
    size = size_text(eager["scores_bytes"])
    if ratio < 1:
        return (f"attnfuse fuses whenever an allowed kernel applies, although the unfused graph is estimated faster "
                f"here ({ratio:.3g}x the time of '{best['kernel']}'; it materializes {size} of scores)")
    return (f"attnfuse fuses whenever an allowed kernel applies; the unfused graph is estimated {ratio:.3g}x the "
            f"time of '{best['kernel']}' (it materializes {size} of scores)")


PYTORCH_MARGIN = 0.05  # how much faster sdpa / flex must be estimated than attnfuse's best to be chosen


def _choose(rows: list[dict[str, Any]]) -> str:
    """The allowed candidate with the lowest estimate ("eager" if none), except that PyTorch's kernels must beat
    attnfuse's best by `PYTORCH_MARGIN` (their estimates are attnfuse's scaled by measured ratios, whose run-to-run
    noise is a few percent: within it, the choice would be noise); the other allowed ones get the ratio as
    reason, and ``eager`` gets `_eager_reason` (or none, when it is what runs)."""
    allowed = [r for r in rows if r["rejected"] is None]
    eager = next(r for r in rows if r["kernel"] == "eager")
    if not allowed:
        eager["rejected"] = None
        return "eager"
    best = min(allowed, key=lambda r: r["est_time_s"])
    own = [r for r in allowed if r["kernel"] not in PYTORCH_KERNELS]
    if best["kernel"] in PYTORCH_KERNELS and own:  # it must win by more than its fitted ratio's noise
        best_own = min(own, key=lambda r: r["est_time_s"])
        if best["est_time_s"] > (1 - PYTORCH_MARGIN) * best_own["est_time_s"]:
            best = best_own
    for r in allowed:
        if r is best:
            continue
        ratio = r["est_time_s"] / best["est_time_s"]
        r["rejected"] = f"estimated {ratio:.2f}x the time of '{best['kernel']}'"
        if ratio < 1:
            r["rejected"] += (f": PyTorch's kernels must be estimated more than {PYTORCH_MARGIN:.0%} faster than "
                              "attnfuse's (the noise of the measured ratios they are fit from)")
    eager["rejected"] = _eager_reason(eager, best)
    return best["kernel"]


def plan(shape: Mapping[str, Any], device: DeviceSpec, kernels: Sequence[str], *,
         structure: Mapping[str, Any] | None = None, approx: Mapping[str, Any] | None = None,
         dynamic: bool = False) -> Plan:
    """Choose the kernel for one site: the allowed candidate with the lowest estimated time.

    ``shape``: ``batch, heads, kv_heads, q_len, kv_len, head_dim, v_head_dim, elem`` (example sizes when the
    graph is dynamic) and ``causal``.  ``structure``: what the mask analysis proved and the op will be told
    (``window`` (left, right), ``causal``, ``block_sparse`` with ``density``, ``window_pad``: a padded window,
    the window family only, at the band's cost: its zero keys cost nothing), and for PyTorch's kernels
    ``limits`` {"sdpa" | "flex": why it cannot compute the site exactly, or None; without it they are rejected},
    ``sdpa_backend``, ``training`` (time forward+backward) and ``flex_mask`` (the packed-document alternative's
    kinds and band).  ``shape`` may carry ``training`` too.  ``approx``: None when the user
    did not opt in, else the approximation policy's verdict -- ``rejected`` {family: reason}, ``errors``
    {family: measured relative error}, ``params`` {family: settings}, optionally ``tried`` {family: [{"params",
    "error"}, ...]} (the settings calibration measured, `attnfuse.passes.approximate`); a family without a
    ``rejected`` entry was calibrated within the budget.  With ``approx``, the approximate families' rows carry
    their ``params`` (complete; LSH's ``bits`` resolved at the row's key length) and ``tried`` where given.
    ``dynamic``: also plan the table over key-length ranges (`Plan.table`).
    The first candidate is the chosen one, or (not fused) the exact kernel that would have run, with the reason.
    """
    rows, configs = _candidates(shape, device, kernels, structure, approx)
    chosen = _choose(rows)
    table = _table(shape, device, kernels, structure, approx) if dynamic else []
    if chosen == "eager":  # the reason shown: the kernel that would have run, among those the user allowed
        band, sparse = (structure or {}).get("window") is not None, bool((structure or {}).get("block_sparse"))
        first = "window" if band else "blocksparse" if sparse else "flash"
        if first not in kernels:
            first = next((r["kernel"] for r in rows if r["kernel"] in kernels and r["exact"]), first)
        return Plan("eager", {}, sorted(rows, key=lambda r: r["kernel"] != first), table)
    return Plan(chosen, configs.get(chosen, {}), sorted(rows, key=lambda r: r["kernel"] != chosen), table)


def _table(shape, device, kernels, structure, approx) -> list[dict[str, Any]]:
    ratio = shape["q_len"] / max(1, shape["kv_len"])
    table: list[dict[str, Any]] = []
    for i, lo in enumerate(_RANGES):
        hi = _RANGES[i + 1] if i + 1 < len(_RANGES) else None
        rep = _LAST_REP if hi is None else max(1, int(math.sqrt(max(lo, 64) * hi)))
        sized = {**shape, "kv_len": rep, "q_len": shape["q_len"] if ratio < 1 and shape["q_len"] == 1 else
                 max(1, round(rep * ratio))}
        rows, configs = _candidates(sized, device, kernels, structure, approx)
        kernel = _choose(rows)
        est = next((r["est_time_s"] for r in rows if r["kernel"] == kernel), None)
        config = configs.get(kernel, {})
        if table and table[-1]["kernel"] == kernel and table[-1]["config"] == config:  # the same launch: one row
            table[-1]["kv_len"][1] = hi
            continue
        table.append({"kv_len": [lo, hi], "kernel": kernel, "config": config,
                      "planned_at": rep, "est_time_s": est})
    return table
