"""What each export format can express, and the op's structure spelled as one mask.

`attnfuse::attention` carries structure the standard attention ops do not have (a window band,
ALiBi slopes, a block-sparse hint, a finite fill for a bool mask).  For the formats, `dense_mask`
spells all of it as one bool or additive mask operand with the same values (see
`attnfuse.kernels.reference` for the semantics); the structured kernels then give way to one
standard attention op that reads the mask:

* ONNX: `plain_attention` / `plain_attention_sdpa` replace the op's call sites before the
  re-export, and `attnfuse.export.onnx` translates the plain op into one ``Attention`` node;
* MLIR: `sdpa_decomposition` turns the op into ``aten.scaled_dot_product_attention``.

`unsupported(format, match, site)` is the reason a site stays as its original ops in a format.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .. import ops
from ..families import EXPORT_ORIGINAL
from ..kernels.cpu import no_stats

_STRUCTURE = ("window_left", "window_right", "block_sparse", "mask_fill")


def unsupported(fmt: str, m: Any, site: Any) -> str | None:
    """Why ``fmt`` cannot express this fused site (None when it can)."""
    target = {"onnx": "ONNX Attention", "mlir": "aten.scaled_dot_product_attention"}.get(fmt)
    if target is None:
        return None
    if m.dropout_p > 0:
        return f"{target} has no dropout (export an eval() model); the site is exported as its original ops"
    if getattr(m, "window_pad", False):
        return (f"{target} has no zero-padded keys: the unfold spelling's padded window adds score-0 keys outside "
                f"the sequence to each edge row's softmax, which no mask over the real keys expresses; the site is "
                f"exported as its original ops")
    if getattr(m, "sinks", None) is not None:
        return (f"{target} has no attention sinks: the per-head sink adds one key of its own score and value 0 to "
                f"every row's softmax, which no mask over the real keys expresses; the site is exported as its "
                f"original ops")
    families = {site.kernel, *(row["kernel"] for row in site.table)} & set(EXPORT_ORIGINAL)
    if families:
        sides = "/".join(n for n, side in zip("QKV", getattr(m, "tpa", ()) or ()) if side is not None)
        formed = (f" ({sides or 'the factorized sides'} formed from the factors, then the model's own attention)"
                  if "tpa" in families else "")
        return (f"{target} has no {'/'.join(sorted(families))} attention; the site is exported as its original "
                f"(exact) ops{formed}")
    if fmt == "mlir" and m.softcap:
        return f"{target} has no softcap; the site is exported as its original ops"
    return None


def dense_mask(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, alibi: torch.Tensor | None, *,
               causal: bool, window_left: int = -1, window_right: int = -1, mask_fill: float | None = None,
               fold_causal: bool = False, **_: Any) -> tuple[torch.Tensor | None, bool]:
    """``(mask, causal)`` with the op's band, ALiBi and finite fill folded into the mask.

    The result is None, a bool keep mask or an additive mask in q's dtype, broadcastable to
    (B, H, Lq, Lk).  ``fold_causal`` also folds ``causal`` (for an op that takes a mask or
    ``is_causal``, not both).
    """
    lq, lk = q.shape[-2], k.shape[-2]
    left, right = window_left, window_right
    if causal and (left >= 0 or right >= 0 or (fold_causal and (mask is not None or alibi is not None))):
        right, causal = (0 if right < 0 else min(right, 0)), False  # causal caps the band's right side
    finfo_min = torch.finfo(q.dtype).min
    if mask is not None and mask.dtype == torch.bool and mask_fill is not None and mask_fill != -math.inf:
        mask = torch.where(mask, torch.zeros((), dtype=q.dtype), torch.full((), max(mask_fill, finfo_min),
                                                                          dtype=q.dtype))
    if alibi is not None:
        rel = torch.arange(lk, device=q.device)[None, :] - torch.arange(lq, device=q.device)[:, None]
        bias = (alibi.view(-1, 1, 1) * rel).to(q.dtype)  # (H, Lq, Lk): s[h, i, j] += slope[h] * (j - i)
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros((), dtype=q.dtype).masked_fill(~mask, -math.inf)
        mask = bias if mask is None else mask + bias
    if left >= 0 or right >= 0:
        rel = torch.arange(lk, device=q.device)[None, :] - torch.arange(lq, device=q.device)[:, None]
        band = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if left >= 0:
            band = band & (rel >= -left)
        if right >= 0:
            band = band & (rel <= right)
        if mask is None or mask.dtype == torch.bool:
            mask = band if mask is None else mask & band
        else:
            mask = mask.masked_fill(~band, -math.inf)
    return mask, causal


def _no_window_pad(window_pad: bool) -> None:
    if window_pad:  # `unsupported` keeps such sites as their original ops: reaching here is a bug
        raise ValueError("attnfuse export: an op with window_pad=True (padded keys no mask expresses) reached the "
                         "lowering; such sites must be kept as their original ops")


def _plain(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in kwargs.items() if key not in _STRUCTURE}


def _onnx_mask(q, k, mask, alibi, kwargs):
    _no_window_pad(kwargs.get("window_pad", False))
    mask, causal = dense_mask(q, k, mask, alibi, **kwargs)
    if mask is not None and mask.is_floating_point():
        # onnxruntime reads an additive entry equal to the dtype's lowest value as -inf, and gives a row of
        # them 0 where eager's softmax gives the uniform row HF's finfo.min padding relies on; 0.99x that
        # value is as good a "never" for every other row.
        lowest = torch.finfo(mask.dtype).min
        mask = mask.masked_fill(mask == lowest, 0.99 * lowest)
    return mask, {**_plain(kwargs), "causal": causal}


def plain_attention(q, k, v, mask=None, seed=None, alibi=None, **kwargs):
    """`attnfuse::attention` with its structure in the mask: what the ONNX translation reads."""
    mask, kwargs = _onnx_mask(q, k, mask, alibi, kwargs)
    return torch.ops.attnfuse.attention.default(q, k, v, mask, seed, None, **kwargs)


def plain_attention_sdpa(q, k, v, mask=None, seed=None, alibi=None, **kwargs):
    """`attnfuse.ops.attention_sdpa` with its structure in the mask."""
    mask, kwargs = _onnx_mask(q, k, mask, alibi, kwargs)
    return ops.attention_sdpa(q, k, v, mask, seed, None, **kwargs)


PLAIN = {torch.ops.attnfuse.attention.default: plain_attention, ops.attention_sdpa: plain_attention_sdpa}
_PLAIN_DEFAULTS = {"window_left": -1, "window_right": -1, "block_sparse": False, "dropout_p": 0.0, "approx": "",
                   "window_pad": False}  # not ``tiles``: which Triton tile runs changes no value


def for_onnx(gm: torch.fx.GraphModule, example_inputs: list) -> None:
    """Point the rewritten op calls at their plain forms (`PLAIN`); a plain call whose mask is right key
    padding from per-batch lengths (`kv_lengths`) becomes `attention_nonpad` (opset 24's nonpad_kv_seqlen)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in PLAIN:
            continue
        q, k, _, mask, seed, alibi = (*node.args, None, None, None)[:6]
        # not with causal: onnxruntime aligns is_causal to the non-padded length (rows past it differ)
        plain = all(node.kwargs.get(key, default) == default for key, default in _PLAIN_DEFAULTS.items()) \
            and node.kwargs.get("mask_fill") in (None, -math.inf) and not node.kwargs.get("causal", False)
        lengths = kv_lengths(mask, _shape(q)[0], _shape(k)[-2]) if plain and seed is None and alibi is None \
            and mask is not None and _shape(q) and _shape(k) else None
        if lengths is None:
            node.target = PLAIN[node.target]
            continue
        kwargs = {key: node.kwargs[key] for key in ("scale", "causal", "softcap", "kv_groups") if key in node.kwargs}
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.attnfuse.attention_nonpad.default, (*node.args[:3], lengths), kwargs)
        if node.target is ops.attention_sdpa:  # returns the output itself
            node.replace_all_uses_with(new)
        else:  # returns (out, stats): only the output is read after a rewrite
            for user in list(node.users):
                user.replace_all_uses_with(new)
                gm.graph.erase_node(user)
        gm.graph.erase_node(node)
    gm.recompile()


def sdpa_decomposition(q, k, v, mask=None, seed=None, alibi=None, sinks=None, *, scale=None, causal=False,
                       softcap=0.0, kv_groups=1, dropout_p=0.0, mask_fill=None, window_left=-1, window_right=-1,
                       block_sparse=False, window_pad=False, approx="", tiles=""):
    """`attnfuse::attention` as ``aten.scaled_dot_product_attention`` (sites without softcap/dropout/sinks)."""
    _no_window_pad(window_pad)
    if sinks is not None:  # `unsupported` keeps such sites as their original ops: reaching here is a bug
        raise ValueError("attnfuse export: an op with sinks reached the SDPA lowering; such sites must be kept as "
                         "their original ops")
    mask, causal = dense_mask(q, k, mask, alibi, causal=causal, window_left=window_left,
                              window_right=window_right, mask_fill=mask_fill, fold_causal=True)
    if mask is None and not causal:
        # torch-mlir expands a mask-less, non-causal SDPA into matmul/softmax; an all-True key mask (one
        # row, broadcast) keeps it one op, which lowers to tm_tensor.attention
        mask = torch.ones(1, 1, 1, k.shape[-2], dtype=torch.bool, device=q.device)
    if kv_groups > 1:  # one K/V head per query head: the form every SDPA lowering takes
        k, v = k.repeat_interleave(kv_groups, 1), v.repeat_interleave(kv_groups, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    return out, no_stats(q)


# --- key padding as per-batch lengths (ONNX opset 24's nonpad_kv_seqlen) -----------------------------------

@torch.library.custom_op("attnfuse::attention_nonpad", mutates_args=())
def attention_nonpad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor, *,
                     scale: float | None = None, causal: bool = False, softcap: float = 0.0,
                     kv_groups: int = 1) -> torch.Tensor:
    """`attnfuse::attention` whose mask is "key ``j`` of batch ``b`` is valid iff ``j < kv_lengths[b]``"
    (right padding).  Only the ONNX export emits it: it becomes ``Attention``'s ``nonpad_kv_seqlen``."""
    keep = torch.arange(k.shape[-2], device=k.device) < kv_lengths.view(-1, 1, 1, 1)
    return torch.ops.attnfuse.attention.default(q, k, v, keep, None, None, scale=scale, causal=causal,
                                                softcap=softcap, kv_groups=kv_groups)[0]


@attention_nonpad.register_fake
def _(q, k, v, kv_lengths, *, scale=None, causal=False, softcap=0.0, kv_groups=1):
    return ops.output_like(q, v)


_NOT = {torch.ops.aten.logical_not.default, torch.ops.aten.bitwise_not.default, torch.logical_not,
        torch.bitwise_not}
_UNIT_DIMS = {torch.ops.aten.unsqueeze.default, torch.ops.aten.view.default, torch.ops.aten.reshape.default,
              torch.unsqueeze, torch.reshape}
_LT = {torch.ops.aten.lt.Tensor: False, torch.lt: False, torch.ops.aten.gt.Tensor: True, torch.gt: True}


def _shape(node: Any) -> tuple | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _peel_unit_dims(node: Any) -> Any:
    """Through ops that only add or drop unit dims (the other sizes keep their order)."""
    while isinstance(node, torch.fx.Node) and node.target in _UNIT_DIMS:
        inner, outer = _shape(node.args[0]), _shape(node)
        if inner is None or outer is None or [s for s in inner if s != 1] != [s for s in outer if s != 1]:
            break
        node = node.args[0]
    return node


def kv_lengths(mask: Any, batch: Any, kv_len: Any) -> torch.fx.Node | None:
    """The (B,) lengths node if ``mask`` is provably ``arange(Lk)[None, :] < lengths[:, None]`` (right
    padding; under an even number of negations, through unit-dim views), else None."""
    if _shape(mask) is None or len(_shape(mask)) != 4 or _shape(mask)[1:3] != (1, 1):
        return None
    node, flips = mask, 0
    while True:
        peeled = _peel_unit_dims(node)
        if isinstance(peeled, torch.fx.Node) and peeled.target in _NOT:
            node, flips = peeled.args[0], flips + 1
            continue
        node = peeled
        break
    if flips % 2 or not isinstance(node, torch.fx.Node) or node.target not in _LT or _shape(node) != (batch, kv_len):
        return None
    row, col = node.args[::-1] if _LT[node.target] else node.args
    ar = _peel_unit_dims(row)
    arange = isinstance(ar, torch.fx.Node) and ar.target is torch.ops.aten.arange.default and ar.args == (kv_len,) \
        and not {key: value for key, value in ar.kwargs.items() if key in ("start", "step")}
    lengths = _peel_unit_dims(col)
    if not arange or _shape(row) not in ((kv_len,), (1, kv_len)) or _shape(col) != (batch, 1) \
            or _shape(lengths) != (batch,) or lengths.meta["val"].is_floating_point():
        return None
    return lengths
