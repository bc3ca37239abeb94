"""The approximation policy: which approximate kernels (top-k, LSH) may run a site, and their measured error.

Entry point: `verdicts(gm, sites, example_inputs, policy) -> list[verdict]`, one per (match, structure) in
``sites``; a verdict is the ``approx`` argument of `attnfuse.costmodel.plan`: ``rejected`` {family: reason},
``errors`` {family: measured relative error}, ``params`` {family: settings}, ``tried`` {family: [{"params",
"error"}, ...]} (LSH: every level calibrated, in order).  ``policy`` is ``Config.approximate`` (None: the user
did not opt in, and every verdict is None).

Settings.  Top-k runs the policy's settings.  LSH's knobs (tables, bits, probes, cap) are the cost model's:
`attnfuse.costmodel.lshknobs.ladder` at the site's example key length and the budget, with the settings the user
gave explicitly (``policy["pinned"]["lsh"]``) fixed on every level; the levels are calibrated cheapest first and
the first within ``max_rel_error`` is the verdict's ``params``/``errors`` entry (``bits`` -1 where auto: the op
resolves it per call).  When none is, LSH is rejected with its best error and the budget; its ``params`` and
``errors`` are then those of the best level.

A family is considered for a site only if the site is plain attention the approximate kernels compute: no mask
other than a causal one (folded into ``causal``), no proven window / ALiBi / block-sparse structure (the exact
kernels already skip that work), no dropout, no softcap, a constant scale, not ``nn.MultiheadAttention``, and
shapes the kernel supports (its ``unsupported``).  It is then accepted only after calibration: the graph runs on
the example inputs up to the site (an `fx.Interpreter` that stops once every site's q/k/v is captured), the
approximate kernel runs on a sample of the K/V heads (``calibration.max_heads``, with their query heads) over
the whole sequence, and its output on a sample of query rows (``calibration.max_rows``, spread over the
sequence, the last row included) is compared with exact attention in float64.  The error is the relative
Frobenius norm ``|approx - exact| / |exact|`` over those rows; above ``max_rel_error`` the family is rejected
with both numbers in the reason.  The graph prefix runs through `effects.capture`, which
clones every input an in-place op writes first, so the user's tensors are not updated twice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from ..costmodel import lshknobs
from ..families import APPROXIMATE, kernel_module
from .effects import capture
from .match import AttentionMatch

log = logging.getLogger(__name__)


def _eligible(m: AttentionMatch) -> str | None:
    if m.form == "mha":
        return "nn.MultiheadAttention sites run exact kernels only"
    if m.masks:
        return "the site has a mask; the approximate kernels apply only a causal one"
    if m.window_left >= 0 or m.window_right >= 0 or m.alibi is not None or m.block_sparse:
        return "the site's proven window / ALiBi / block-sparse structure runs exactly, skipping work already"
    if m.dropout_p > 0:
        return "the site has dropout"
    if m.softcap:
        return "the site has a softcap"
    if m.sinks is not None:
        return "the site has attention sinks (one more key per row), which the approximate kernels do not add"
    if m.scale_nodes:
        return "the site's scale is computed at run time"
    return None


def _op_inputs(m: AttentionMatch, values: Mapping[fx.Node, Any]) -> tuple[torch.Tensor, ...]:
    """q, k, v as the rewriter hands them to the op: (batch, heads, seqlen, head_dim), K/V heads interleaved."""
    out = []
    for o in (m.q, m.k, m.v):
        x = values[o.node]
        x = x if o.perm is None else x.permute(*o.perm)
        if x.dim() > 4:
            x = x.flatten(0, x.dim() - 4)
        while x.dim() < 4:
            x = x.unsqueeze(0)
        out.append(x)
    q, k, v = out
    if k.shape[0] == 1 and q.shape[0] != 1:
        k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
    if m.kv_layout == "tile" and m.kv_groups > 1:
        q = q.unflatten(1, (m.kv_groups, -1)).transpose(1, 2).flatten(1, 2)
    return q, k, v


def _exact_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, scale: float,
                causal: bool) -> torch.Tensor:
    """Exact attention of the query ``rows`` in float64: (B, H, len(rows), Dv)."""
    groups = q.shape[1] // k.shape[1]
    qd = q.index_select(2, rows).double()
    kd, vd = (x.double().repeat_interleave(groups, dim=1) for x in (k, v))
    s = (qd @ kd.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.arange(k.shape[2], device=q.device)[None, :] > rows[:, None], -math.inf)
    return torch.softmax(s, -1) @ vd


def measure(family: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
            params: Mapping[str, int], calibration: Mapping[str, int]) -> float:
    """The relative Frobenius error of ``family`` against exact attention on a sample of heads and rows."""
    gen = torch.Generator().manual_seed(calibration.get("seed", 0))
    hk, groups = k.shape[1], q.shape[1] // k.shape[1]
    if hk > calibration["max_heads"]:
        pick = torch.randperm(hk, generator=gen, device="cpu")[: calibration["max_heads"]].sort().values.to(k.device)
        k, v = k.index_select(1, pick), v.index_select(1, pick)
        q = q.unflatten(1, (hk, groups)).index_select(1, pick).flatten(1, 2)
    lq = q.shape[2]
    n_rows = min(lq, calibration["max_rows"])
    rows = torch.linspace(0, lq - 1, n_rows, dtype=torch.float64).round().long().unique().to(q.device)
    with torch.no_grad():
        approx = kernel_module(family).forward(q, k, v, scale=scale, causal=causal, **params)[0]
        exact = _exact_rows(q, k, v, rows, scale, causal)
    diff = approx.index_select(2, rows).double() - exact
    denom = exact.norm()
    return float(diff.norm() / denom) if denom > 0 else float(diff.norm())


def verdicts(gm: fx.GraphModule, sites: Sequence[tuple[AttentionMatch, Mapping[str, Any]]],
             example_inputs: Sequence[Any] | None, policy: Mapping[str, Any] | None,
             kernels: Sequence[str]) -> list[dict[str, Any] | None]:
    """One `costmodel.plan` ``approx`` verdict per site (None for every site when ``policy`` is None)."""
    if policy is None:
        return [None] * len(sites)
    families = [f for f in policy["families"]]
    out: list[dict[str, Any]] = []
    todo: list[tuple[int, AttentionMatch, str, bool]] = []
    for i, (m, structure) in enumerate(sites):
        verdict = {"rejected": {}, "errors": {}, "params": {f: dict(policy[f]) for f in families}}
        for f in APPROXIMATE:
            if f not in families:
                verdict["rejected"][f] = "not in options['approximate']['families']"
            elif f not in kernels:
                verdict["rejected"][f] = f"'{f}' is not in options['kernels']"
        why = _eligible(m)
        causal = bool(structure.get("causal", m.causal))
        for f in families:
            if f in verdict["rejected"]:
                continue
            if why is None:
                why_f = _shape_reason(f, m, causal)
                if why_f:
                    verdict["rejected"][f] = why_f
                    continue
                todo.append((i, m, f, causal))
            else:
                verdict["rejected"][f] = why
        out.append(verdict)
    if not todo:
        return out
    try:
        values = capture(gm, {o.node for _, m, _, _ in todo for o in (m.q, m.k, m.v)}, example_inputs)
    except Exception as exc:  # the user's graph must never break because calibration could not run
        for i, _, f, _ in todo:
            out[i]["rejected"][f] = f"calibration could not run the graph on the example inputs ({exc})"
        log.warning("attnfuse: calibrating the approximate kernels could not run the graph on the example inputs "
                    "(%s: %s); %d site(s) stay exact", type(exc).__name__, str(exc)[:300], len({i for i, *_ in todo}))
        return out
    for i, m, f, causal in todo:
        q, k, v = _op_inputs(m, values)
        scale = m.scale if m.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        _calibrate(out[i], f, _levels(f, policy, k.shape[2]), policy,
                   lambda params: measure(f, q, k, v, scale=scale, causal=causal, params=params,
                                          calibration=policy["calibration"]))
    return out


def _levels(family: str, policy: Mapping[str, Any], kv_len: int) -> list[dict[str, int]]:
    """The settings to calibrate, cheapest first: LSH's ladder (`lshknobs.ladder`), else the policy's one."""
    if family != "lsh":
        return [dict(policy[family])]
    pinned = policy.get("pinned", {}).get("lsh", {})
    return lshknobs.ladder(kv_len, policy["max_rel_error"], pinned, policy["lsh"]["block"])


def _calibrate(verdict: dict[str, Any], family: str, levels: Sequence[Mapping[str, int]],
               policy: Mapping[str, Any], error_of) -> None:
    """Measure ``levels`` in order into ``verdict`` (``error_of(params) -> error``): the first within the budget
    is the family's ``params``/``errors``; with none, the best is, and the family is rejected with why."""
    budget, tried, best = policy["max_rel_error"], [], None
    for params in levels:
        try:
            err = error_of(params)
        except ValueError as exc:  # settings the kernel refuses for these shapes
            verdict["rejected"][family] = str(exc)
            break
        tried.append({"params": dict(params), "error": err})
        if best is None or err < best["error"]:
            best = tried[-1]
        if err <= budget:
            verdict["rejected"].pop(family, None)
            best = tried[-1]
            break
    if len(levels) > 1 or family == "lsh":
        verdict.setdefault("tried", {})[family] = tried
    if best is None:
        return
    verdict["params"][family], verdict["errors"][family] = dict(best["params"]), best["error"]
    if not best["error"] <= budget:
        what = f" (the best of {len(tried)} LSH settings tried)" if len(tried) > 1 else ""
        verdict["rejected"][family] = (f"calibrated error {best['error']:.3g}{what} exceeds max_rel_error "
                                       f"{budget:g} on the example inputs")


def _shape_reason(family: str, m: AttentionMatch, causal: bool) -> str | None:
    from .._sizes import hint as _hint
    from ._graph import val
    from ._records import operand_shape as _shape

    if not isinstance(val(m.q.node), torch.Tensor):
        return "no example value for q"
    qs, ks = ([1] * (4 - len(_shape(o))) + [_hint(s) for s in _shape(o)] for o in (m.q, m.k))
    return kernel_module(family).unsupported(tuple(qs), tuple(ks), causal=causal)


