"""The dynamo backend ``"attnfuse"``: options -> Config; passes; inner compile.

``torch.compile(model, backend="attnfuse", options={...})`` calls
`attnfuse_backend`.  The passes run on a copy of dynamo's Torch-IR graph
(see docs/architecture.md for why this level); if any of them raises, the
original graph is compiled unchanged and the report says why (unless
``strict=True``).  The result goes to Inductor (``inner="inductor"``), whose
AOTAutograd traces the custom op's registered autograd for training, or runs
as is (``inner="eager"``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from . import _cpsites, _logs, _publish, _sources, _torchkernels, _tpaop, _tpasites, autotune, ops  # noqa: F401 - ops, _tpaop register torch.ops.attnfuse
from ._sizes import hint as _hint
from .config import Config
from .costmodel import plan as planner
from .costmodel.cpu import backward_path
from .costmodel.cpu import path as cpu_path
from .costmodel.tiles import encode as tiles_arg
from .device import triton_unsupported
from .families import EXACT
from .passes import _local, _nearmiss, approximate, canonicalize, masks, match, rewrite, verify
from .passes._graph import eq as _eq
from .passes._records import operand_shape as _shape
from .passes.canonicalize import val
from .report import Report, Site, in_source_order


def _fused_site(m: match.AttentionMatch, mask_info: dict, plan: planner.Plan) -> Site:
    qs, ks, vs = (_shape(o) for o in (m.q, m.k, m.v))
    dtype = val(m.q.node).dtype
    return Site(
        id=0, module=_sources.module_path(m.anchor), source=_sources.source(m.anchor),
        status="fused" if plan.kernel != "eager" else "skipped",
        reason=None if plan.kernel != "eager" else plan.candidates[0]["rejected"],
        pattern=m.pattern, shapes={"q": [_hint(s) for s in qs], "k": [_hint(s) for s in ks],
                                   "v": [_hint(s) for s in vs]},
        dtype=str(dtype).replace("torch.", ""), mask=mask_info, kv_groups=m.kv_groups,
        scale=m.scale if not m.scale_nodes else "runtime", kernel=plan.kernel if plan.kernel != "eager" else None,
        config=plan.config, candidates=plan.candidates,
    )


def _plan_shape(m: match.AttentionMatch) -> dict[str, Any]:
    qs, ks, vs = ([_hint(s) for s in _shape(o)] for o in (m.q, m.k, m.v))
    while len(qs) < 4:
        qs, ks, vs = [1, *qs], [1, *ks], [1, *vs]
    batch = 1
    for s in qs[:-3]:
        batch *= s
    return {"batch": batch, "heads": qs[-3], "kv_heads": max(ks[-3], vs[-3]), "q_len": qs[-2], "kv_len": ks[-2],
            "head_dim": qs[-1], "v_head_dim": vs[-1], "elem": val(m.q.node).element_size()}


def _mha_shape(m: match.AttentionMatch) -> dict[str, Any]:
    num_heads = m.anchor.args[4] if len(m.anchor.args) > 4 else 1
    qv, kv = val(m.q.node), val(m.k.node)
    if m.pattern == "transformer_encoder_layer":  # (B, L, E) self-attention; num_heads is argument 2
        num_heads, qv, kv = m.anchor.args[2], qv.transpose(0, 1), kv.transpose(0, 1)
    batch = _hint(qv.shape[1]) if qv.dim() == 3 else 1
    e = _hint(qv.shape[-1])
    return {"batch": batch, "heads": num_heads, "kv_heads": num_heads, "q_len": _hint(qv.shape[0]),
            "kv_len": _hint(kv.shape[0]), "head_dim": e // num_heads, "v_head_dim": e // num_heads,
            "elem": qv.element_size()}


def _unsupported(m: match.AttentionMatch) -> str | None:
    semantics = rewrite.mask_semantics(m)
    return semantics if semantics.startswith("the mask") else None


_DEAD_ROWS = ("another mask term can leave a query row with no visible key, where eager's value depends on every "
              "fill (a finite fill outside the band, or a later finite fill over it); the band stays in the dense "
              "mask so those rows stay exact")


def _sdpa_key_vector(m: match.AttentionMatch) -> bool:
    """An SDPA site whose only mask is a bool key vector: `ops.attention_sdpa` finds the rows a band leaves
    without a key from the vector itself and zeroes them, as SDPA does for a bool mask.  Not an additive one:
    with a finite fill (HF's finfo.min) such a row is uniform over every key in eager, band or not."""
    if m.form != "sdpa" or len(m.masks) != 1 or (m.masks[0].kind, m.masks[0].fill) != ("keep", float("-inf")):
        return False
    shape = val(m.masks[0].node).shape
    return len(shape) >= 2 and _eq(shape[-2], 1)


def _with_structure(before: match.AttentionMatch, m: match.AttentionMatch,
                    info: masks.MaskInfo) -> tuple[match.AttentionMatch, dict[str, Any], dict[str, Any]]:
    """The match the rewriter emits, the report's mask entry and the cost model's ``structure``.

    A band (window or a folded causal mask) skips tiles: its out-of-band scores are -inf in the kernels.
    That is exact on every row the band alone decides.  With another mask term a row can see no key
    at all, and eager's value there depends on the fills: out of the band it had the band's own fill
    (uniform over all keys for a finite one), and a later finite fill overrides an earlier -inf.  So a
    band folded from a finite fill, or any band next to a remaining finite-fill term, keeps the dense
    mask (the analysis is still reported).  SDPA gives such a row 0, which `ops.attention_sdpa`
    reproduces from a key vector.
    """
    mask_report = info.report()
    band = info.window_left >= 0 or info.window_right >= 0
    finite = info.params.get("fill", float("-inf")) != float("-inf") or any(
        t.kind == "keep" and t.fill != float("-inf") for t in m.masks)
    if (band or (info.causal and not before.causal)) and m.masks and finite and not _sdpa_key_vector(m):
        mask_report["kept_dense"] = _DEAD_ROWS
        return before, mask_report, {}
    m = dataclasses.replace(m, window_left=info.window_left, window_right=info.window_right, alibi=info.alibi,
                            block_sparse=info.block_sparse)
    structure: dict[str, Any] = {}
    if band:
        structure.update(window=(info.window_left, info.window_right), causal=m.causal)
    if m.window_pad:  # the unfold spelling's zero keys: only the window kernels have them
        structure["window_pad"] = True
    if info.block_sparse:
        structure.update(block_sparse=True, density=info.params.get("density", 1.0))
    return m, mask_report, structure


def _before(gm: fx.GraphModule, m: match.AttentionMatch) -> list[str]:
    region = set(m.region) | {m.anchor, m.output}
    return [rewrite.describe(n) for n in gm.graph.nodes if n in region]


def analyze(gm: fx.GraphModule, example_inputs: Sequence[Any] | None, config: Config,
            report: Report, keep: Any = None, canonical: frozenset[str] | None = None
            ) -> list[tuple[match.AttentionMatch, Site]]:
    """Canonicalize + match + mask analysis + approximation policy + plan on ``gm`` (in place); fills
    ``report``.  Returns the sites to fuse with their report entries.

    ``keep(match, site)``, if given, is asked about every site the plan fuses; a reason (a sentence, not
    None) leaves that site as it is, skipped with the reason (the export formats use this for what they
    cannot express).  ``canonical`` limits the spelling rewrites (`canonicalize.canonicalize`'s ``only``).
    """
    spec = config.device_spec()
    canonicalize.canonicalize(gm, canonical)
    found, misses = match.match(gm)
    found = [_local.bucket_window(gm, m, example_inputs) or m for m in found]
    before = set(gm.graph.nodes)
    analyzed = [(found_m, masks.analyze(gm, found_m, example_inputs)) for found_m in found]
    # what the mask analysis emitted (key vectors, document ids): the rewrite erases what no site reads
    gm.meta["attnfuse_analysis_nodes"] = set(gm.graph.nodes) - before
    sites = [(*_with_structure(found_m, *result), getattr(result[1], "flex", None)) for found_m, result in analyzed]
    sites = [(m, info, structure, _torchkernels.flex_mask_for(m, fm)) for m, info, structure, fm in sites]
    verdicts = approximate.verdicts(gm, [(m, {**structure, "causal": m.causal}) for m, _, structure, _ in sites],
                                    example_inputs, config.approximate, config.kernels)
    chosen, entries = [], []  # entries: (anchor, site) of every site, numbered in source order at the end
    for (m, mask_info, structure, flex_mask), verdict in zip(sites, verdicts):
        shape = _mha_shape(m) if m.form == "mha" else _plan_shape(m)
        shape["mask_elem"] = _mask_elem(m)
        plan = _plan(m, shape, spec, config, structure, verdict, flex_mask, mask_info)
        if plan.kernel != "eager":
            m = dataclasses.replace(m, approx=plan.op_table(verdict["params"] if verdict else None))
        m, mask_info = _torchkernels.chosen(plan.kernel, plan.config, m, mask_info, flex_mask)
        m = _tpasites.chosen(plan.kernel, m)
        plan, m = _what_runs(plan, m, shape)
        cp_entry, cp_why = None, None
        if config.context_parallel is not None and plan.kernel != "eager":
            m, cp_entry, cp_why = _cpsites.decide(m, plan.kernel, shape, config.context_parallel,
                                                   mask_info)
        site = _fused_site(m, mask_info, plan)
        site.autotune = getattr(plan, "autotune", None)
        site.context_parallel = cp_entry
        entries.append((m.anchor, site))
        if plan.kernel in planner.APPROXIMATE:
            site.config = dict(verdict["params"][plan.kernel])
        site.error = (verdict or {}).get("errors", {}).get(plan.kernel)
        site.table = plan.table
        site.subgraph = {"before": _before(gm, m)}
        why = _unsupported(m) or cp_why or (keep(m, site) if keep is not None and site.status == "fused" else None)
        if why:
            site.status, site.reason, site.kernel = "skipped", why, None
        if site.status == "fused":
            chosen.append((m, site))
    for miss in misses:  # the nodes the matcher looked at stand for the region it could not match
        near = _nearmiss.region(miss.anchor)
        entries.append((miss.anchor, Site(
            id=0, module=_sources.module_path(miss.anchor), source=_sources.source(miss.anchor), status="skipped",
            reason=str(miss), subgraph={"before": [rewrite.describe(n) for n in gm.graph.nodes if n in near]})))
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    entries.sort(key=lambda e: position.get(e[0], len(position)))
    for site in in_source_order([site for _, site in entries]):
        report.add(site)
    return chosen


def _plan(m: match.AttentionMatch, shape: dict[str, Any], spec: Any, config: Config, structure: dict[str, Any],
          verdict: Any, flex_mask: Any, mask_info: dict[str, Any]) -> planner.Plan:
    """The site's plan, PyTorch's kernels among the candidates where they compute it exactly; measured
    (`attnfuse.autotune`) with ``options["autotune"]``.  A site's implementation is one for every key length
    (the op's ``impl``), so a dynamic table whose rows would mix PyTorch's kernels with others is planned again
    without them."""
    kernels = config.kernels if config.context_parallel is None else _cpsites.own_kernels(config.kernels)
    lim, backend = _torchkernels.limits(m, flex_mask, shape)
    train = _torchkernels.training(m)
    full = _torchkernels.plan_structure(structure, lim, backend, flex_mask, train)
    tpa = _tpasites.structure(m, config.context_parallel is not None)
    if tpa is not None:
        full["tpa"] = tpa
    sized = {**shape, "causal": m.causal, "training": train}
    plan = planner.plan(sized, spec, kernels, structure=full, approx=verdict, dynamic=_dynamic(m))
    kinds = {r["kernel"] for r in plan.table} | {plan.kernel}
    if kinds & {"sdpa", "flex"} and len(kinds) > 1:
        why = "a dynamic table runs attnfuse's kernels when its rows would differ (one implementation per site)"
        full["limits"] = {name: lim[name] or why for name in lim}
        plan = planner.plan(sized, spec, kernels, structure=full, approx=verdict, dynamic=_dynamic(m))
    if config.autotune and plan.kernel != "eager":
        site = _torchkernels.tunable(m, shape, flex_mask, mask_info.get("kind", "none"), spec)
        plan = autotune.tune(plan, site, config.autotune)
    return plan


def _mask_elem(m: match.AttentionMatch) -> int:
    """The element size of the mask tensor the op will get (0: none); its tiles take shared memory."""
    if m.form == "mha":  # `_mha`: an additive mask in q's dtype, or the encoder layer's bool keep mask
        a, encoder = m.anchor, m.pattern == "transformer_encoder_layer"
        slots = ((18, "mask"),) if encoder else ((14, "key_padding_mask"), (16, "attn_mask"))
        given = any((a.args[i] if len(a.args) > i else a.kwargs.get(key)) is not None for i, key in slots)
        return 0 if not given else 1 if encoder else val(m.q.node).element_size()
    dtype = rewrite.mask_dtype(m)
    return 0 if dtype is None else dtype.itemsize


def _what_runs(plan: planner.Plan, m: match.AttentionMatch, shape: dict[str, Any]
               ) -> tuple[planner.Plan, match.AttentionMatch]:
    """The plan as it will run: where Triton runs the site, the op carries the plan's tiles (decided once, with
    the spec, dtype and mask element size; `attnfuse.costmodel.tiles.encode`), so the report's ``config`` is
    what launches; elsewhere the ``config`` (and each table row's) names the CPU path that runs
    (`attnfuse.costmodel.cpu.path`), not Triton tiles."""
    if plan.kernel == "eager" or m.impl:  # PyTorch's kernels: the config names the op's ``impl``
        return plan, m
    if plan.kernel == "tpa":
        return dataclasses.replace(plan, config=_tpasites.config(m)), m
    q = val(m.q.node)
    if triton_unsupported(q.device.type, q.dtype, max(shape["head_dim"], shape["v_head_dim"])) is None:
        rows = [(r["kv_len"][0], r["kv_len"][1], r.get("config") or {}) for r in plan.table if r["kernel"] in EXACT]
        rows = rows or ([(0, None, plan.config)] if plan.kernel in EXACT else [])
        return plan, dataclasses.replace(m, tiles=tiles_arg(rows))
    if m.form == "mha":
        encoder = m.pattern == "transformer_encoder_layer"
        mask_dtype = None if not shape["mask_elem"] else torch.bool if encoder else q.dtype
    else:
        mask_dtype = rewrite.mask_dtype(m)
    forward = cpu_path(q.dtype, mask_dtype=mask_dtype, softcap=m.softcap, dropout_p=m.dropout_p,
                       same_head_dims=shape["head_dim"] == shape["v_head_dim"], alibi=m.alibi is not None,
                       window_left=m.window_left, window_right=m.window_right, block_sparse=m.block_sparse,
                       window_pad=m.window_pad, sinks=m.sinks is not None)
    config = {"path": forward, "backward": backward_path(forward)}
    table = [{**r, "config": dict(config)} if r["kernel"] in EXACT else r for r in plan.table]
    return dataclasses.replace(plan, config=config if plan.kernel in EXACT else plan.config, table=table), m


def _dynamic(m: match.AttentionMatch) -> bool:
    """Whether the site's sequence lengths are symbolic (a dynamic-shape graph)."""
    return any(isinstance(_shape(o)[-2], torch.SymInt) for o in (m.q, m.k) if len(_shape(o)) >= 2)


def _analyze_exactly(gm: fx.GraphModule, example_inputs: Sequence[Any] | None, config: Config, report: Report,
                     keep: Any) -> tuple[fx.GraphModule, list[tuple[match.AttentionMatch, Site]]]:
    """`analyze` (and `verify.verify` when asked) on a copy of ``gm`` whose only spelling rewrites
    (`canonicalize`) are those of fused regions.

    A rewrite outside every fused region would change what a site attnfuse leaves alone computes, so the
    analysis runs again on a fresh copy with just the used rewrites (rarely more than twice; the last try
    rewrites nothing).  ``report`` gets the sites of the analysis that is kept.
    """
    canonical, first = None, None
    for attempt in range(3):
        work = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        work.meta = {k: v for k, v in getattr(gm, "meta", {}).items() if not k.startswith("attnfuse_")}
        scratch = Report(device=report.device)
        chosen = analyze(work, example_inputs, config, scratch, keep, canonical)
        if chosen and config.verify:
            chosen = verify.verify(work, chosen, example_inputs, scratch, config)
        first = first or scratch
        names, all_used = canonicalize.used(work, [set(m.region) | {m.anchor, m.output} for m, _ in chosen])
        if all_used:
            break
        canonical = names if attempt == 0 else frozenset()
    for site in in_source_order(_with_lost_sites(first, scratch)):
        report.add(site)
    report.notes.extend(scratch.notes)
    return work, chosen


def _with_lost_sites(first: Report, last: Report) -> list[Site]:
    """``last``'s sites in ``first``'s order; where ``first`` skipped a site, its entry (it read the spelling
    a dropped rewrite made recognizable, so its reason is the user's answer), unless ``last`` fused it."""
    pending: dict[tuple[str, str], list[Site]] = {}
    for site in last.sites:
        pending.setdefault((site.module, site.source), []).append(site)
    out = []
    for site in first.sites:
        same = pending.get((site.module, site.source))
        again = same.pop(0) if same else None
        if again is not None and (again.status == "fused" or site.status == "fused"):
            out.append(again)
        elif site.status == "skipped":
            out.append(site)
    return out + [s for rest in pending.values() for s in rest]


def transform(gm: fx.GraphModule, example_inputs: Sequence[Any] | None, config: Config,
              report: Report, rewrite_graph: bool = True, keep: Any = None) -> fx.GraphModule:
    """The rewritten copy of ``gm``, or ``gm`` itself if any pass fails (unless strict).

    With ``rewrite_graph=False`` (audit) the report is filled (the rewrite still runs on the copy, for the
    report's "after" subgraphs) and ``gm`` is returned.  ``keep`` is `analyze`'s.  What was decided goes to
    the ``attnfuse`` logger (`_logs`).
    """
    index = _logs.next_graph()
    try:
        work, chosen = _analyze_exactly(gm, example_inputs, config, report, keep)
        if chosen:
            rewrite.rewrite(work, [m for m, _ in chosen])
            for (_, site), lines in zip(chosen, work.meta.pop("attnfuse_emitted")):
                site.subgraph["after"] = lines
    except Exception as exc:
        if config.strict:
            raise
        for site in report.sites:
            site.status, site.kernel = "skipped", None
            site.reason = site.reason or "a pass failed on this graph; it runs unchanged"
        report.notes.append(f"a pass raised {type(exc).__name__}: {exc}; the graph runs unchanged")
        _logs.fell_back(index, exc)
        _logs.graph(index, report, audit=not rewrite_graph, failed=True)
        return gm
    _logs.graph(index, report, audit=not rewrite_graph)
    return work if rewrite_graph else gm


_HIDDEN_EXP = "attnfuse_hidden_exp"


@functools.cache
def _exp_spelling_passes() -> tuple[Any, Any]:
    """The pair of Inductor joint-graph custom passes that keeps its SDPA patterns off one graph.

    Every one of Inductor's attention patterns (``fx_passes/fuse_attention.py``, ``_sfdp_*``) contains
    the ``aten.exp.default`` of a decomposed softmax, and none of its other joint-graph patterns does
    (tests/test_inductor_patterns.py checks both on the installed torch).  The pre pass respells each
    floating ``aten.exp`` as ``prims.exp`` (same value, same meta), so no ``_sfdp_*`` pattern can match;
    the post pass, which runs right after the pattern passes, restores exactly the nodes it respelled,
    so post-grad passes and lowering see the graph as it was.  Built lazily: Inductor is imported only
    when it compiles.
    """
    from torch._inductor.custom_graph_pass import CustomGraphPass

    aten_exp, prims_exp = torch.ops.aten.exp.default, torch.ops.prims.exp.default

    class _ExpSpelling(CustomGraphPass):
        def __init__(self, hide: bool) -> None:
            self.hide = hide

        def __call__(self, graph: fx.Graph) -> None:
            for node in list(graph.find_nodes(op="call_function", target=aten_exp if self.hide else prims_exp)):
                if self.hide:
                    value = node.meta.get("val")
                    if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
                        node.target, node.meta[_HIDDEN_EXP] = prims_exp, True
                elif node.meta.pop(_HIDDEN_EXP, False):
                    node.target = aten_exp

        def uuid(self) -> str:
            return f"attnfuse.exp_spelling.{'hide' if self.hide else 'restore'}.v1"

    return _ExpSpelling(True), _ExpSpelling(False)


def inductor_patches() -> dict[str, Any]:
    """``config_patches`` for the inner `compile_fx`: Inductor's SDPA patterns off for this graph only.

    A site attnfuse declined must run as eager computes it, and Inductor's ``_sfdp_*`` patterns are not
    sound (they ignore the softmax axis: a softmax over the query axis becomes key-axis SDPA).  Sites
    attnfuse fused are already ``attnfuse::`` ops, so nothing is lost for them.  Only the joint custom
    passes are set (appended to any the user configured); `compile_fx` applies the patch to the lazily
    compiled backward too.  No global torch config is changed.
    """
    from torch._inductor import config as inductor_config
    from torch._inductor.custom_graph_pass import get_custom_graph_passes

    hide, restore = _exp_spelling_passes()
    return {
        "joint_custom_pre_pass": [*get_custom_graph_passes(inductor_config.joint_custom_pre_pass), hide],
        "joint_custom_post_pass": [restore, *get_custom_graph_passes(inductor_config.joint_custom_post_pass)],
    }


def attnfuse_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Any = None):
    """The ``torch.compile`` backend (registered as "attnfuse" through an entry point); masks built in another
    graph keep their structure through `_crossgraph.compile_graph`."""
    from . import _crossgraph

    config = Config.from_options(options)
    return _crossgraph.compile_graph(gm, example_inputs, config, _compile_one)


def _compile_one(gm: fx.GraphModule, example_inputs: Sequence[Any], config: Config, extra_report_fn: Any = None):
    """One graph: transform, publish the report (``extra_report_fn(report)`` first, if given), inner compile."""
    report = Report(device=config.device_spec().name, graphs=1)
    new_gm = transform(gm, example_inputs, config, report)
    if extra_report_fn is not None:
        extra_report_fn(report)
    _publish.publish(_publish.call_report(report), config)
    if config.inner == "eager":
        return new_gm
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(new_gm, example_inputs, config_patches=inductor_patches())
