"""Recognize attention regions in a canonicalized graph.

Entry point: `match(gm) -> (list[AttentionMatch], list[Miss])`.

One shape is recognized (DESIGN.md, "Match by normal form"), anchored at each
softmax and read through `canonicalize.canon`:

    scores = (q·c_q) @ (k·c_k)ᵀ        any transpose/permute spelling; scales anywhere before the mask
    scores = cap·tanh(scores/cap)      optional softcap
    scores = scores + bias | masked_fill(m, -big) | where(m, scores, -big)   any number of masks
    p      = softmax(scores, -1)       casts around it are free
    p      = dropout(p)                optional
    out    = p @ v

K/V repeated along heads (expand+reshape, repeat_interleave, repeat, or broadcast)
are un-repeated into ``kv_groups``.  ``F.scaled_dot_product_attention`` and
``F.multi_head_attention_forward`` nodes are sites too.  A region is fused
only when none of its intermediates has a user outside it.  Every failed
check returns a `Miss` with a one-sentence reason.

The records (`AttentionMatch`, `Operand`, `MaskTerm`, `Miss`) live in `_records` and are re-exported
here; the walks along the scores chain are `_chain`'s, the reading of q/k/v `_operands`', the ``unfold``
spelling of local attention `_unfold`'s.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .._sizes import hint
from . import _tpa
from ._canon import canon
from ._chain import op_name, sink_form, walk_down, walk_up
from ._graph import ancestors, arg, eq, is_state, name, val
from ._operands import compose, heads_miss, is_default_scale, peel, perm_or_none, unrepeat
from ._records import AttentionMatch, MaskTerm, Miss, Operand, operand_shape
from ._softmax_forms import SPELLING_MISSES
from ._unfold import unfold_window
from .canonicalize import LOGSUMEXP
from .effects import Effects, dead

__all__ = ["match", "AttentionMatch", "MaskTerm", "Miss", "Operand"]


class _Graph:
    """One graph's in-place writes and its `effects.dead` memo, shared by the checks of every site."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.effects = Effects(gm.graph)
        self.dead: dict = {}  # `effects.dead`'s memo

    def learned_only(self, node: fx.Node) -> bool:
        """True if ``node`` depends on no model input (only parameters, buffers, constants), counting what is
        written into it in place (a static KV cache made by ``zeros`` and filled by ``index_copy_``)."""
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
            stack.extend(self.effects.written(n))
        leaves = [n for n in seen if n.op in ("placeholder", "get_attr")]
        return all(n.op == "get_attr" or is_state(n) for n in leaves
                   if isinstance(val(n), torch.Tensor))


def _other_users(region: set, nodes, memo: dict) -> fx.Node | None:
    """A live user of ``nodes`` outside ``region`` (dead users, `effects.dead`, do not count), else None."""
    for n in nodes:
        for u in n.users:
            if u not in region and not dead(u, memo):
                return u
    return None


def _dead_users(region: set, memo: dict) -> set:
    """The dead users of ``region``'s nodes, transitively: they go with the region when it is replaced."""
    out, stack = set(), [u for n in region for u in n.users if u not in region]
    while stack:
        u = stack.pop()
        if u not in out and u not in region and dead(u, memo):
            out.add(u)
            stack.extend(u.users)
    return out


def _written_miss(sm: fx.Node, g: _Graph, region: set, output: fx.Node, reads: list) -> Miss | None:
    """A `Miss` if an in-place write makes the fused op (which reads its inputs where the region ends)
    see other values than eager (which read them on the way into the region), else None.

    * a region intermediate written by a node outside the region (``s.masked_fill_(m, -inf)``);
    * an input (q/k/v, a mask, a run-time scale) whose storage is written between eager's first
      read of it and the end of the region.
    """
    for n in region - {output}:  # the output is the op's: later writes to it are the user's business
        for w in g.effects.written(n):
            if w not in region:
                return Miss(sm, "{} ({}) writes an intermediate of the attention region in place", w.name, op_name(w))
    written = [n for n in reads if isinstance(n, fx.Node) and g.effects.written(n)]
    upstream = ancestors(output) | region if written else set()
    position = g.effects.position
    for node in written:
        readers = [u for u in node.users if u in upstream]
        start = min(readers, key=position.__getitem__, default=output)
        w = g.effects.written_between(node, start, output)
        if w is not None:
            return Miss(sm, "{} ({}) writes {} in place inside the attention region, after eager read it",
                        w.name, op_name(w), node.name)
    return None


def _match_softmax(sm: fx.Node, g: _Graph) -> AttentionMatch | Miss:
    x, dim = canon(sm).args
    sv = val(x)
    if not isinstance(sv, torch.Tensor) or not isinstance(dim, int):
        return Miss(sm, "the softmax input has no static rank or axis")
    if sv.dim() < 2 or dim % sv.dim() != sv.dim() - 1:
        return Miss(sm, "softmax over axis {} of a {}-D tensor is not over the key (last) axis", dim, sv.dim())
    region: set = {sm}
    sink = sink_form(sm, x, region)
    if isinstance(sink, Miss):
        return sink
    if sink is not None:
        x = sink[0]
    down = walk_down(sm, region, g.dead, sink[2] if sink else "")
    if not down:
        return down
    pv, dropout_p = down
    region.add(pv)
    up = walk_up(sm, x, region)
    if not up:
        return up
    qk = up["qk"]
    a, b = canon(qk).args
    if g.learned_only(b) or g.learned_only(canon(pv).args[1]):
        return Miss(sm, "the keys/values are learned weights, not computed from the inputs: "
                        "this is a classifier or router, not attention")
    if val(a).dim() < 2 or val(b).dim() < 2 or val(a).dim() != val(b).dim():
        return Miss(sm, "the scores matmul has operands of rank {} and {}", val(a).dim(), val(b).dim())
    qbase, qperm, qc, qrt = peel(a, scales=True, effects=g.effects)
    kbase, kperm, kc, krt = peel(b, scales=True, effects=g.effects)
    swap = list(range(len(kperm)))
    swap[-1], swap[-2] = swap[-2], swap[-1]
    kperm = compose(tuple(swap), kperm)
    vbase, vperm, _, _ = peel(canon(pv).args[1], scales=False, effects=g.effects)
    if sm.meta.get(LOGSUMEXP) and any(t.kind == "add" or t.fill != float("-inf") for t in up["masks"]):
        return Miss(sm, "exp(s - logsumexp(s)) with an additive or finite-fill mask is not softmax on a row whose "
                        "every key is masked (all its 'probabilities' are 1); fused only with -inf masks")
    for term in up["masks"]:
        if term.node is qk or qk in ancestors(term.node):
            return Miss(sm, "the mask depends on the scores, so it cannot be applied inside a fused kernel")
    if sink is not None and (sink[1] is qk or qk in ancestors(sink[1])):
        return Miss(sm, "the sink column depends on the scores, so it is not a per-head attention sink")
    other = _other_users(region, region - {pv}, g.dead)
    if other is not None:
        return Miss(sm, "an intermediate of the attention region is also used by {} ({})", other.name, op_name(other))
    region |= _dead_users(region - {pv}, g.dead)
    q, k, v = (Operand(b, perm_or_none(p)) for b, p in ((qbase, qperm), (kbase, kperm), (vbase, vperm)))
    groups, layout = 1, "interleave"
    if val(kbase).dim() == 4 and val(vbase).dim() == 4:
        # K/V are read as base.permute(perm) = (B, H, T, D): their head axis is perm[1]
        rk, rv = unrepeat(kbase, (k.perm or (0, 1))[1]), unrepeat(vbase, (v.perm or (0, 1))[1])
        if rk and rv and rk[1:] == rv[1:]:
            k, v, groups, layout = Operand(rk[0], k.perm), Operand(rv[0], v.perm), rk[1], rk[2]
    qs, ks, vs = operand_shape(q), operand_shape(k), operand_shape(v)
    if not (eq(ks[-1], qs[-1]) and eq(vs[-2], ks[-2])):
        return Miss(sm, "q/k/v shapes {} / {} / {} do not line up as attention", qs, ks, vs)
    expand = heads_miss(sm, qs, ks, vs, groups)
    if not isinstance(expand, str):
        return expand
    kv_heads = vs[-3] if expand == "k" else ks[-3] if len(ks) >= 3 else 1
    if groups == 1 and len(qs) >= 3 and eq(kv_heads, 1) and not eq(qs[-3], 1):
        groups = hint(qs[-3])  # one K/V head for every query head (after folding, the last batch dim)
    reads = [q.node, k.node, v.node, *(t.node for t in up["masks"]), *(f for f, _ in up["runtime"] + qrt + krt),
             *([sink[1]] if sink else [])]
    bad = _written_miss(sm, g, region, pv, reads)
    if bad is not None:
        return bad
    if not (val(q.node).dtype == val(k.node).dtype == val(v.node).dtype):
        return Miss(sm, "q, k, v have different dtypes ({}, {}, {})", val(q.node).dtype, val(k.node).dtype,
                    val(v.node).dtype)
    c, runtime = up["scale"] * qc * kc, up["runtime"] + qrt + krt
    scale: float | None = c
    if runtime and is_default_scale(c, runtime, qs[-1]):
        scale, runtime = None, []
    learned = next((f for f, _ in runtime if getattr(val(f), "requires_grad", False)), None)
    if learned is not None and getattr(val(sm), "requires_grad", False):
        return Miss(sm, "the scale {} needs a gradient: moved onto q, its gradient (sum of q * dq) can miss the 2x "
                        "accuracy rule against eager's (sum of s * ds); fused only without one (inference, frozen)",
                    learned.name)
    parts = ["matmul", *(["scale"] if (c != 1.0 or runtime or scale is None) else []), *reversed(up["parts"]),
             *(["sink"] if sink else []), "softmax", *(["dropout"] if dropout_p else []), "matmul"]
    found = AttentionMatch(
        form="graph", anchor=sm, output=pv, q=q, k=k, v=v, scale=scale, scale_nodes=tuple(runtime),
        softcap=up["softcap"], masks=tuple(reversed(up["masks"])), kv_groups=groups, kv_layout=layout,
        dropout_p=dropout_p, pattern="·".join(parts), region=frozenset(region), kv_expand=expand,
        sinks=sink[1] if sink else None)
    return unfold_window(found) or found


def _sdpa_unrepeat(node: fx.Node, q: fx.Node, k: fx.Node, v: fx.Node, gqa: int,
                   g: _Graph | None) -> tuple[fx.Node, fx.Node, int, str] | None:
    """(k, v, kv_groups, layout) read before a repeat along the heads axis of an SDPA call on (B, H, L, D)
    tensors (transformers' ``repeat_kv``: expand + reshape; ``repeat_interleave``; ``repeat``), else None.

    With ``enable_gqa`` (query head h reads K/V head h // ``gqa``) only an interleaving repeat composes into
    one group count.  Eager read the bases at the repeat and the op reads them at the call, so a write to
    the bases or the repeat's nodes in between keeps the repeat (``kv_groups`` 1: correct, not minimal).
    """
    if not all(isinstance(val(x), torch.Tensor) and val(x).dim() == 4 for x in (q, k, v)):
        return None
    rk, rv = unrepeat(k, 1), unrepeat(v, 1)
    if not (rk and rv and rk[1:] == rv[1:]) or rk[1] < 2 or (gqa > 1 and rk[2] != "interleave"):
        return None
    groups = rk[1] * gqa
    if not (eq(val(rk[0]).shape[1] * groups, val(q).shape[1]) and eq(val(rv[0]).shape[1], val(rk[0]).shape[1])):
        return None
    effects = g.effects if g is not None else Effects(node.graph)
    for top, base in ((k, rk[0]), (v, rv[0])):
        chain = [top]  # the repeat's nodes, from the call's operand up to the base
        while chain[-1] is not base and len(chain) < 5:
            chain.append(canon(chain[-1]).args[0])
        if chain[-1] is not base or any(effects.written_between(n, chain[-2], node) for n in chain):
            return None
    return rk[0], rv[0], groups, rk[2]


def _match_sdpa(node: fx.Node, g: _Graph | None = None) -> AttentionMatch | Miss:
    q, k, v = (arg(node, i, key) for i, key in enumerate(("query", "key", "value")))
    mask = arg(node, 3, "attn_mask")
    dropout_p, causal = arg(node, 4, "dropout_p", 0.0), arg(node, 5, "is_causal", False)
    scale, gqa = node.kwargs.get("scale"), node.kwargs.get("enable_gqa", False)
    if not all(isinstance(x, fx.Node) for x in (q, k, v)) or not isinstance(dropout_p, (int, float)):
        return Miss(node, "scaled_dot_product_attention with non-tensor inputs or a dynamic dropout_p")
    if scale is not None and not isinstance(scale, (int, float)):
        return Miss(node, "scaled_dot_product_attention with a run-time scale")
    masks = ()
    if isinstance(mask, fx.Node):
        is_bool = val(mask).dtype == torch.bool
        masks = (MaskTerm("keep", mask, fill=float("-inf")) if is_bool else MaskTerm("add", mask),)
    groups = 1
    qs, ks = list(val(q).shape), list(val(k).shape)
    if gqa and len(qs) == 4 and not eq(qs[1], ks[1]):
        groups = hint(qs[1]) // hint(ks[1])
    layout, unrepeated = "interleave", _sdpa_unrepeat(node, q, k, v, groups, g)
    if unrepeated:
        k, v, groups, layout = unrepeated
    return AttentionMatch(
        form="sdpa", anchor=node, output=node, q=Operand(q), k=Operand(k), v=Operand(v),
        scale=None if scale is None else float(scale), masks=masks, causal=bool(causal), kv_groups=groups,
        kv_layout=layout, dropout_p=float(dropout_p), pattern="scaled_dot_product_attention",
        region=frozenset({node}))


def _match_mha(node: fx.Node) -> AttentionMatch | Miss:
    # bias_k/bias_v, add_zero_attn, static_k/static_v: `_mha.forward` applies them as PyTorch does
    if name(node) == "_transformer_encoder_layer_fwd":
        return _match_encoder_layer(node)
    for user in node.users:
        if canon(user).kind != "getitem" or user.args[1] != 0:
            return Miss(node, "the attention weights of multi_head_attention_forward are used (need_weights)")
    q, k, v = (Operand(arg(node, i, key)) for i, key in enumerate(("query", "key", "value")))
    # Recorded for the report; `_mha.forward` applies them itself (bool True = do not attend).
    masks = tuple(MaskTerm("keep", m, negate=True, fill=float("-inf")) if val(m).dtype == torch.bool
                  else MaskTerm("add", m)
                  for m in (arg(node, 16, "attn_mask"), arg(node, 14, "key_padding_mask"))
                  if isinstance(m, fx.Node))
    return AttentionMatch(form="mha", anchor=node, output=node, q=q, k=k, v=v, scale=None, masks=masks,
                          pattern="multi_head_attention_forward", region=frozenset({node}))


def _match_encoder_layer(node: fx.Node) -> AttentionMatch | Miss:
    """``nn.TransformerEncoderLayer``'s inference fast path: the whole layer, re-pointed at `_mha.encoder_layer`.

    The native op reads its mask as bool (any nonzero entry hides the key).  A query row with no visible key
    is NaN on the CPU (checked against the op in tests/test_mha_variants.py); elsewhere that value is not
    verified, so a masked layer off the CPU stays native."""
    src, mask, mask_type = arg(node, 0, "src"), arg(node, 18, "mask"), arg(node, 19, "mask_type")
    if not isinstance(src, fx.Node) or val(src).dim() != 3 or val(src).is_nested:
        return Miss(node, "_transformer_encoder_layer_fwd on a nested or non-(B, L, E) input")
    masks = ()
    if isinstance(mask, fx.Node):
        if mask_type not in (0, 1, 2):
            return Miss(node, "_transformer_encoder_layer_fwd with mask_type {}", mask_type)
        if val(src).device.type != "cpu":
            return Miss(node, "a masked _transformer_encoder_layer_fwd on {}: the native value of a query row with no "
                        "visible key is verified on the CPU only", val(src).device.type)
        masks = (MaskTerm("keep", mask, negate=True, fill=float("-inf")),)  # for the report: nonzero hides a key
    return AttentionMatch(form="mha", anchor=node, output=node, q=Operand(src), k=Operand(src), v=Operand(src),
                          scale=None, masks=masks, pattern="transformer_encoder_layer", region=frozenset({node}))


def _subclass_miss(m: AttentionMatch) -> Miss | None:
    """A site whose operands or result are tensor subclasses (a DTensor, say): the op would reach the subclass's
    dispatch, which knows no ``attnfuse::`` op (DTensor: no sharding rule), so the site stays as it is."""
    nodes = (m.q.node, m.k.node, m.v.node, m.output, *(t.node for t in m.masks))
    sub = next((n for n in nodes if is_traceable_wrapper_subclass(val(n))), None)
    if sub is None:
        return None
    return Miss(m.anchor, "{} is a {} (a tensor subclass); attnfuse's ops take plain tensors, so the site runs as "
                "the subclass computes it (tensor parallelism: give attention the local heads, use_local_output=True)",
                sub.name, type(val(sub)).__name__)


def match(gm: fx.GraphModule) -> tuple[list[AttentionMatch], list[Miss]]:
    """Every attention region of ``gm``, and a reasoned `Miss` for every near miss."""
    g = _Graph(gm)
    found: list[AttentionMatch] = []
    misses: list[Miss] = []
    readers = {"softmax": lambda n: _match_softmax(n, g), "sdpa": lambda n: _match_sdpa(n, g), "mha": _match_mha}
    for node in list(gm.graph.nodes):
        reader = readers.get(canon(node).kind)
        if reader is None:
            continue
        result = reader(node)
        subclass = _subclass_miss(result) if result else None  # a Miss is falsy: test against None
        result = result if subclass is None else subclass
        if result and result.form in ("graph", "sdpa"):
            sides = tuple(_tpa.side(o) for o in (result.q, result.k, result.v))
            if any(sides):
                result = dataclasses.replace(result, tpa=sides)
        (found if result else misses).append(result)
    # softmax spellings `canonicalize` left alone, with why (`_softmax_forms`)
    misses += [Miss(n, "{}", why) for n, why in gm.meta.get(SPELLING_MISSES, ()) if not getattr(n, "_erased", 0)]
    return found, misses
