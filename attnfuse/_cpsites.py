"""Which fused sites can span a context-parallel group (``options["context_parallel"]``), and how.

Under context parallelism every tensor entering the compiled region holds the rank's rows of the global sequence
(`attnfuse.parallel` layouts), so a fused site must attend over the *global* sequence.  What attnfuse proved of a
mask carries over: a band (causal, sliding window) is a relation between query and key positions, the same in
local and global coordinates, so a causal mask written against local indices (a ``tril`` buffer sliced to the
local length, ``is_causal=True``) is global causal, as in PyTorch's own context parallel API; a key-padding vector
is one value per key and travels with its keys.  What cannot be put in global coordinates is not split, and the
site stays as it was with the reason: a mask that varies along the queries (a dense L x L tensor), terms the
split op does not carry yet (ALiBi, attention sinks, documents), dropout (its random mask depends on the layout),
approximate kernels, cross-attention and ``nn.MultiheadAttention``.  The plan runs attnfuse's own op there
(`own_kernels`): PyTorch's kernels are not split.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import parallel
from .families import APPROXIMATE, PYTORCH_KERNELS
from .passes import rewrite
from .passes._graph import eq
from .passes._records import operand_shape
from .passes.canonicalize import val
from .passes.match import AttentionMatch

_WHY = "context parallelism does not split this site over the sequence: "


def own_kernels(kernels: tuple[str, ...]) -> tuple[str, ...]:
    """The families a context-parallel site may plan with: attnfuse's own (the op the split runs)."""
    return tuple(k for k in kernels if k not in PYTORCH_KERNELS) or ("flash",)


def _unsupported(m: AttentionMatch, kernel: str, mask_info: dict[str, Any]) -> str | None:
    if mask_info.get("kept_dense"):
        return ("its band stays in the dense L x L mask (a row without a visible key depends on the finite fill "
                "outside the band), which has no global form from one rank's rows; -inf fills or SDPA's bool mask do")
    if m.form == "mha":
        return "nn.MultiheadAttention modules stay on one device's rows"
    if kernel in APPROXIMATE or m.approx:
        return f"the plan chose an approximate kernel ({kernel})"
    reasons = (("dropout", m.dropout_p > 0), ("attention sinks", m.sinks is not None), ("ALiBi", m.alibi is not None),
               ("a block-sparse constant mask", m.block_sparse), ("the unfold window's zero keys", m.window_pad),
               ("packed documents / prefix-LM", m.doc is not None), ("bucketed windows", m.bucketed))
    for what, present in reasons:
        if present:
            return f"{what} not supported across ranks"
    qs, ks = operand_shape(m.q), operand_shape(m.k)
    if len(qs) != 4 or len(ks) != 4:
        return f"q is {len(qs)}-D; sites are split in (batch, heads, seq, head_dim) form"
    if not eq(qs[-2], ks[-2]):
        return "cross-attention (query and key sequences differ)"
    for term in m.masks:
        shape = val(term.node).shape
        if len(shape) >= 2 and not eq(shape[-2], 1):
            return ("its mask varies along the queries (an L x L tensor has no global form from one rank's rows); "
                    "a proven band or key-padding vector does")
        if len(shape) >= 3 and not eq(shape[-3], 1):
            return "its mask varies along the heads"
    if rewrite.mask_semantics(m).startswith("the mask"):
        return rewrite.mask_semantics(m)
    return None


def decide(m: AttentionMatch, kernel: str, shape: dict[str, Any], cp: parallel.ContextParallel,
           mask_info: dict[str, Any]) -> tuple[AttentionMatch, dict[str, Any] | None, str | None]:
    """``(match, report entry, None)`` for a site the group runs (the match carries the encoded spec and the
    strategy `attnfuse.parallel.choose` picked), or ``(match, None, reason)`` for one that stays as it was."""
    why = _unsupported(m, kernel, mask_info)
    if why:
        return m, None, _WHY + why
    strategy, reason = parallel.choose(
        cp, batch=shape["batch"], heads=shape["heads"], kv_heads=shape["kv_heads"], local_len=shape["q_len"],
        head_dim=shape["head_dim"], v_head_dim=shape["v_head_dim"], elem=shape["elem"], causal=m.causal,
        device_type=val(m.q.node).device.type)
    m = dataclasses.replace(m, cp=parallel.encode(cp), cp_strategy=strategy, impl="", tiles="", doc=None)
    return m, {"strategy": strategy, "ranks": cp.ranks, "layout": cp.layout, "reason": reason}, None
