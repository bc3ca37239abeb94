"""Per-site verification: each rewrite is checked against the region it replaces, on the example inputs.

Entry point: `verify(gm, chosen, example_inputs, report, config) -> chosen'` (the sites that passed, or that
could not be checked).  ``gm`` is the canonicalized, matched, *unrewritten* graph; ``chosen`` is `analyze`'s
list of (AttentionMatch, Site).

Contract:

* The graph runs once on the example inputs (an `fx.Interpreter` under ``no_grad`` that stops once every
  site's inputs are computed; the RNG state is restored afterwards, and every placeholder / attribute an
  in-place op of the graph writes through is cloned first, so the user's tensors are not touched).
* Per site, the region -- every node between the site's sources (q, k, v, masks, runtime scales, ALiBi
  slopes) and its output -- is copied into a small GraphModule whose placeholders are those sources.  The
  original copy runs in the example dtype ("eager") and in float64 ("ref"); a second copy is rewritten by
  `attnfuse.passes.rewrite.rewrite` itself ("fused"), so the check covers the rewriter, the op and its kernel.
* The rule is DESIGN.md's: max |fused - ref| <= 2 * max |eager - ref| + 4 eps(dtype) * max |ref| (over the
  entries where ref and eager are finite), and fused's NaN / +-Inf pattern equals eager's.  An approximate
  site (top-k, LSH) is held to the user's ``max_rel_error`` (relative Frobenius error) instead.
* Training graphs (q, k or v requires grad in the example values) with ``verify=True`` also compare the
  gradients of q, k, v and of every additive bias that requires grad, through one random upstream gradient
  (seeded), with the same rule.  ``verify="forward"`` checks outputs only.
* Bounded cost: a site whose scores (batch x heads x Lq x Lk) exceed ``SAMPLE_ELEMENTS`` runs on a spread
  sample of its batch entries and then heads (q/k/v sliced through their permutations, every other input
  -- masks, biases, scale tensors -- as it broadcasts against the scores, size-1 axes kept; K/V grouped
  over heads keep all their heads and only the batch is sampled).  Query rows are never sampled: a causal
  or window band is aligned by the sequence lengths, so a row slice would change what the kernel computes.
  If the sample cannot be taken (an input of unknown role, sizes baked into the region) the site runs
  whole up to ``WHOLE_ELEMENTS``; beyond that it is not verified (``Site.verify["skipped"]`` says why).
* A site that disagrees, or whose fused copy raises where the original does not, is reverted: ``skipped``
  with a ``verify: ...`` reason holding both errors; it runs as the original graph computes it.  With
  ``strict=True`` it raises instead.  A site that cannot be checked (dropout draws different random
  numbers; no real example inputs) stays fused with the reason in ``Site.verify["skipped"]``.

``Site.verify`` records ``fused_error``, ``eager_error``, ``floor``, ``grads`` {name: [fused, eager]},
``sampled`` ({"batch": [kept, of], "heads": [kept, of]} or None) and ``passed``.

Limits: only the example inputs are seen.  Another length (a dynamic graph), other mask contents (a
padding mask with an empty row that the example does not have), values that overflow, or a kernel path
(tile table entry) the example size does not select are not checked.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from ._graph import val
from ._records import AttentionMatch
from ._sitecopy import Region, copy_region, region_of
from .effects import capture

log = logging.getLogger(__name__)

SAMPLE_ELEMENTS = 1 << 20  # score elements a sampled site evaluates
WHOLE_ELEMENTS = 1 << 24  # the most a site is evaluated whole when no sample can be taken


# --- sampling --------------------------------------------------------------------------------------------


def _spread(n: int, keep: int) -> torch.Tensor:
    return torch.linspace(0, n - 1, keep, dtype=torch.float64).round().long().unique()


def _sample(r: Region, values: list[Any]) -> tuple[list[Any], dict] | None:
    """The inputs sliced to at most ``SAMPLE_ELEMENTS`` score elements (as far as batch and heads allow) and
    what was kept; None if no consistent slice exists."""
    m = r.match
    if m.form == "mha":
        return None
    by_node = dict(zip(r.sources, values))
    ops = [(o, by_node[o.node]) for o in (m.q, m.k, m.v)]
    if not all(isinstance(x, torch.Tensor) for _, x in ops):
        return None
    shapes = [[x.shape[p] for p in (o.perm or range(x.dim()))] for o, x in ops]
    rank, lead = len(shapes[0]), shapes[0][:-2]
    per = shapes[0][-2] * shapes[1][-2]
    axes = [0] if rank >= 3 else []
    if rank == 4 and all(s[1] == lead[1] for s in shapes):
        axes.append(1)
    keep = list(lead)
    for ax in axes:
        others = math.prod(keep) // keep[ax]
        keep[ax] = max(1, min(keep[ax], SAMPLE_ELEMENTS // (per * others)))
    pick = {ax: _spread(lead[ax], keep[ax]) for ax in axes if keep[ax] < lead[ax]}
    if not pick:
        return None
    roles: dict[fx.Node, list[tuple[int, int]]] = {}  # node -> [(node axis, region axis)]
    for o, x in ops:
        roles[o.node] = [((o.perm or range(x.dim()))[ax], ax) for ax in pick]
    if m.alibi is not None:
        roles[m.alibi] = [(0, 1)] if 1 in pick else []
    out = []
    for src, x in zip(r.sources, values):
        if not isinstance(x, torch.Tensor) or x.numel() == 1:
            out.append(x)
            continue
        if src not in roles:  # masks, biases, scale tensors: broadcast against the scores (right-aligned)
            if x.dim() > rank:
                return None
            roles[src] = [(ax - (rank - x.dim()), ax) for ax in pick if ax - (rank - x.dim()) >= 0]
        for axis, ax in roles[src]:
            if x.shape[axis] == lead[ax]:
                x = x.index_select(axis, pick[ax].to(x.device))
            elif x.shape[axis] != 1:
                return None
        out.append(x)
    kept = {"batch" if ax == 0 else "heads": [keep[ax], lead[ax]] for ax in pick}
    return out, kept


# --- comparison ------------------------------------------------------------------------------------------


def _outputs(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    return [o for o in x if isinstance(o, torch.Tensor)] if isinstance(x, (tuple, list)) else []


def _pattern(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(x), 2, torch.where(torch.isinf(x), torch.sign(x), 0)) if \
        x.is_floating_point() else torch.zeros((), dtype=torch.int8)


def _errors(fused: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float] | str:
    """(fused error, eager error, floor), or why the results differ in kind."""
    if fused.shape != eager.shape:
        return f"output shape {tuple(fused.shape)} differs from the original's {tuple(eager.shape)}"
    if fused.dtype != eager.dtype:
        return f"output dtype {fused.dtype} differs from the original's {eager.dtype}"
    if not torch.equal(_pattern(fused), _pattern(eager)):
        return "its NaN/Inf pattern differs from the original's"
    if not eager.is_floating_point():
        return (0.0, 0.0, 0.0) if torch.equal(fused, eager) else "its integer output differs"
    ref = ref.double()
    ok = torch.isfinite(ref) & torch.isfinite(eager)
    if not ok.any():
        return 0.0, 0.0, 0.0
    f, e, r = fused.double()[ok], eager.double()[ok], ref[ok]
    floor = 4 * torch.finfo(eager.dtype).eps * max(r.abs().max().item(), 1e-3)
    return (f - r).abs().max().item(), (e - r).abs().max().item(), floor


def _rel(fused: torch.Tensor, ref: torch.Tensor) -> float:
    d, n = (fused.double() - ref.double()).norm().item(), ref.double().norm().item()
    return d / n if n > 0 else d


def _to64(x: Any) -> Any:
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _grad_leaves(r: Region) -> list[int]:
    """Indices of the sources whose gradients are compared: q, k, v and additive biases that require grad."""
    m = r.match
    wanted = [o.node for o in (m.q, m.k, m.v)] + [t.node for t in m.masks if t.kind == "add"]
    return [i for i, s in enumerate(r.sources) if s in wanted and isinstance(val(s), torch.Tensor)
            and val(s).is_floating_point() and val(s).requires_grad]


def _role(m: AttentionMatch, node: fx.Node) -> str:
    """What a source is to the site: "q", "k", "v" (joined when one tensor is several), "bias<i>"."""
    roles = [name for name, o in (("q", m.q), ("k", m.k), ("v", m.v)) if o.node is node]
    roles += [f"bias{i}" for i, t in enumerate(m.masks) if t.kind == "add" and t.node is node]
    return "/".join(roles) or node.name


def _run(fn: fx.GraphModule, inputs: list[Any], leaves: list[int], upstream: int):
    """The outputs and (if ``leaves``) the gradients of ``inputs[leaves]`` through a seeded upstream."""
    if not leaves:
        with torch.no_grad():
            return [o.detach() for o in _outputs(fn.forward(*inputs))], []
    inputs = [x.detach().requires_grad_(True) if i in leaves else x for i, x in enumerate(inputs)]
    with torch.enable_grad():
        outs = [o for o in _outputs(fn.forward(*inputs)) if o.is_floating_point()]
        gen = torch.Generator().manual_seed(upstream)
        ups = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
        grads = torch.autograd.grad([o for o in outs if o.requires_grad],
                                    [inputs[i] for i in leaves],
                                    [u for o, u in zip(outs, ups) if o.requires_grad], allow_unused=True)
    grads = [torch.zeros_like(inputs[i]) if g is None else g for i, g in zip(leaves, grads)]
    return [o.detach() for o in outs], grads


def _check(gm: fx.GraphModule, r: Region, inputs: list[Any], backward: bool, budget: float | None) -> dict:
    """Run the three copies on ``inputs``; the Site.verify record (``why`` set when the site disagrees)."""
    original, _ = copy_region(gm, r, inputs)
    wide = [_to64(x) for x in inputs]
    ref_fn, _ = copy_region(gm, r, wide, float64=True)
    leaves = _grad_leaves(r) if backward and budget is None else []
    eager, eager_g = _run(original, inputs, leaves, 0)
    ref, ref_g = _run(ref_fn, wide, leaves, 0)
    fused_fn, m = copy_region(gm, r, inputs)
    from . import rewrite

    rewrite.rewrite(fused_fn, [m])
    try:
        fused, fused_g = _run(fused_fn, inputs, leaves, 0)
    except Exception as exc:
        return {"why": f"the fused site raised {type(exc).__name__} where the original runs ({exc})"[:300]}
    record: dict[str, Any] = {}
    if len(fused) != len(eager):
        return {"why": "the fused site returns a different number of outputs"}
    pairs = [("output", f, e, rr) for f, e, rr in zip(fused, eager, ref)]
    pairs += [(_role(r.match, r.sources[i]), f, e, rr) for i, f, e, rr in zip(leaves, fused_g, eager_g, ref_g)]
    for what, f, e, rr in pairs:
        if budget is not None and what == "output":
            if f.shape != e.shape:
                return {"why": f"output shape {tuple(f.shape)} differs from the original's {tuple(e.shape)}"}
            err = _rel(f, rr)
            record.update(fused_error=err, eager_error=_rel(e, rr), floor=0.0)
            if not err <= budget:
                record["why"] = (f"fused output relative error {err:.3g} exceeds max_rel_error {budget:g} "
                                 "on the example inputs")
                return record
            continue
        got = _errors(f, e, rr)
        if isinstance(got, str):
            record["why"] = f"the fused {what if what == 'output' else 'gradient of ' + what}: {got}"
            return record
        fe, ee, floor = got
        if what == "output":
            record.update(fused_error=fe, eager_error=ee, floor=floor)
        else:
            record.setdefault("grads", {})[what] = [fe, ee]
        if not fe <= 2 * ee + floor:
            label = "output" if what == "output" else f"gradient of {what}"
            record["why"] = (f"fused {label} error {fe:.2g} exceeds 2x eager's {ee:.2g} (+{floor:.2g}) "
                             "against float64 on the example inputs")
            return record
    return record


def _verify_site(gm: fx.GraphModule, r: Region, values: list[Any], backward: bool,
                 budget: float | None) -> dict:
    m = r.match
    if m.dropout_p > 0:
        return {"skipped": "the site has dropout: the fused kernel draws different random numbers"}
    total = _elements(r, values)
    sample = _sample(r, values) if total > SAMPLE_ELEMENTS else None
    if sample is not None:
        try:
            record = _check(gm, r, sample[0], backward, budget)
        except Exception:  # sizes baked into the region: try the whole site
            record = {"why": "shape"}
        record["sampled"] = sample[1]
        if "why" not in record or not (record["why"] == "shape" or "raised" in record["why"]
                                       or "shape" in record["why"]) or total > WHOLE_ELEMENTS:
            return record
    elif total > WHOLE_ELEMENTS:
        return {"skipped": f"the site's {total} score elements exceed the verification bound and no "
                           "batch/head sample of its inputs could be taken"}
    return {**_check(gm, r, values, backward, budget), "sampled": None}


def _elements(r: Region, values: list[Any]) -> int:
    """batch x heads x Lq x Lk of the site on these inputs."""
    m, by_node = r.match, dict(zip(r.sources, values))
    q, k = by_node.get(m.q.node), by_node.get(m.k.node)
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        return 0
    if m.form == "mha":  # (L, B, E) or (L, E)
        heads = m.anchor.args[4] if len(m.anchor.args) > 4 and isinstance(m.anchor.args[4], int) else 1
        if m.pattern == "transformer_encoder_layer":  # (B, L, E), heads in argument 2
            return q.shape[0] * q.shape[1] ** 2 * m.anchor.args[2]
        return q.shape[0] * k.shape[0] * (q.shape[1] if q.dim() == 3 else 1) * heads
    qs = [q.shape[p] for p in (m.q.perm or range(q.dim()))]
    ks = [k.shape[p] for p in (m.k.perm or range(k.dim()))]
    return math.prod(qs[:-1]) * ks[-2]


def _devices(inputs: list[Any]) -> list[int]:
    return sorted({x.device.index or 0 for x in inputs if isinstance(x, torch.Tensor) and x.is_cuda})


def verify(gm: fx.GraphModule, chosen: list[tuple[AttentionMatch, Any]], example_inputs: Sequence[Any] | None,
           report: Any, config: Any) -> list[tuple[AttentionMatch, Any]]:
    """Check every chosen site (see the module docstring); returns the sites that stay fused."""
    start = time.perf_counter()
    regions = [region_of(m) for m, _ in chosen]
    try:
        captured = capture(gm, {s for r in regions for s in r.sources}, example_inputs)
    except Exception as exc:  # noqa: BLE001 - the user's graph must never break because a check could not run
        report.notes.append(f"verify: not run ({exc}); the fused sites are unverified")
        log.warning("attnfuse: verify could not run the graph on the example inputs (%s: %s); its %d fused "
                    "site(s) are unverified", type(exc).__name__, str(exc)[:300], len(chosen))
        return chosen
    devices = _devices(list(example_inputs))
    policy = getattr(config, "approximate", None)
    kept, reverted = [], 0
    for (m, site), r in zip(chosen, regions):
        values = [captured[s] for s in r.sources]
        backward = config.verify is True and any(
            isinstance(val(o.node), torch.Tensor) and val(o.node).requires_grad for o in (m.q, m.k, m.v))
        budget = policy["max_rel_error"] if m.approx and policy else None
        try:
            if m.cp:  # attention over the group's whole sequence; the original region sees this rank's rows
                record = {"skipped": "a context-parallel site computes over every rank's rows (not comparable to "
                                     "the region on one rank's rows)"}
            else:
                with torch.random.fork_rng(devices=devices):
                    record = _verify_site(gm, r, values, backward, budget)
        except Exception as exc:
            record = {"skipped": f"verification failed to run ({type(exc).__name__}: {exc})"[:300]}
            log.warning("attnfuse: verify could not check the site in %s at %s: %s; it stays fused, unverified",
                        site.module or "<top-level module>", site.source or "<unknown line>", record["skipped"])
        why = record.pop("why", None)
        record["passed"] = None if "skipped" in record else why is None
        if backward and "skipped" not in record:
            record.setdefault("grads", {})
        site.verify = record
        if why is None:
            kept.append((m, site))
            continue
        reason = f"verify: {why}; the site runs unchanged"
        if config.strict:
            raise RuntimeError(f"attnfuse {reason} (strict=True)")
        site.status, site.reason, site.kernel = "skipped", reason, None
        reverted += 1
    report.notes.append(f"verify: {len(chosen)} site(s) checked on the example inputs in "
                        f"{time.perf_counter() - start:.3g} s; {reverted} reverted")
    return kept


__all__ = ["verify", "SAMPLE_ELEMENTS", "WHOLE_ELEMENTS"]
