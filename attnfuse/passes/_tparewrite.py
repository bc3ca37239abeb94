"""Emit ``attnfuse::tpa_attention`` for a site whose plan chose the ``tpa`` family (`attnfuse._tpaop`).

Each factorized side (`_tpa.TpaSide`) is passed as its two factors, read row-major as (B, T, H, R) and
(B, T, R, D) (`_tpa.factor_source`: the factor node itself or the tensor it was viewed from; a reshape for static
sizes); a plain side is passed as the attention read it.  The formed tensors' nodes then have no user and are
erased with the region.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from ._records import AttentionMatch, Operand, operand_shape
from ._tpa import TpaSide, factor_source

__all__ = ["emit", "factor_nodes", "statically_placeable"]


def factor_nodes(op: Operand, side: TpaSide) -> tuple[tuple[fx.Node | None, list], tuple[fx.Node | None, list]]:
    """((a source, a shape), (b source, b shape)): the nodes to read each factor from (None: reshape the factor
    node itself, possible only with static sizes) and the (B, T, H, R) / (B, T, R, D) shapes."""
    b_, _, t, _ = operand_shape(op)
    a_shape, b_shape = [b_, t, side.heads, side.rank], [b_, t, side.rank, side.head_dim]
    return (factor_source(side.a, a_shape), a_shape), (factor_source(side.b, b_shape), b_shape)


def statically_placeable(op: Operand, side: TpaSide) -> bool:
    """Whether both factors can be read in the (B, T, ...) shapes: a source node, or static sizes."""
    return all(src is not None or all(isinstance(s, int) for s in shape) for src, shape in factor_nodes(op, side))


def _factor(graph: fx.Graph, node: fx.Node, src: fx.Node | None, shape: list) -> fx.Node:
    return src if src is not None else graph.call_method("reshape", (node, *[int(s) for s in shape]))


def emit(graph: fx.Graph, m: AttentionMatch, mask: fx.Node | None, fill: float | None) -> fx.Node:
    """The op's node for ``m`` (inserted at the graph's current insertion point), given the op's mask."""
    args, scales = [], []
    for op, side in zip((m.q, m.k, m.v), m.tpa):
        if side is None:
            node = op.node if op.perm is None else graph.call_function(torch.permute, (op.node, list(op.perm)))
            args += [node, None, None]
            scales.append(1.0)
            continue
        (a_src, a_shape), (b_src, b_shape) = factor_nodes(op, side)
        args += [None, _factor(graph, side.a, a_src, a_shape), _factor(graph, side.b, b_src, b_shape)]
        scales.append(side.scale)
    scale = m.scale if m.scale is not None else 1.0 / math.sqrt(int(operand_shape(m.q)[-1]))
    sdpa_form = m.form == "sdpa" and mask is not None
    return graph.call_function(torch.ops.attnfuse.tpa_attention.default, (*args, mask), {
        "q_scale": scales[0], "k_scale": scales[1], "v_scale": scales[2], "scale": float(scale),
        "causal": m.causal, "softcap": m.softcap, "window_left": m.window_left, "window_right": m.window_right,
        "kv_groups": m.kv_groups, "mask_fill": fill, "sdpa_form": sdpa_form})
