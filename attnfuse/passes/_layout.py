"""The memory layout of a fused site's output.

The op writes its output as (B, Lq, H, D) in memory.  Where a consumer depends on strides (views,
``as_strided``, in-place ops, graph outputs, anything not known to be layout-agnostic: `stride_sensitive`)
`rewrite` first gives the output the layout eager gave it (`eager_layout`), copying it where a consumer
writes it in place (`written_later`).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .._sizes import hint
from ._graph import name
from .effects import VIEWS, mutations

# consumers that read values only and return a fresh tensor in the default layout
_LAYOUT_FREE = frozenset(("matmul", "bmm", "mm", "linear", "baddbmm", "addmm", "addbmm", "contiguous", "size", "dim",
                          "numel", "layer_norm"))
# consumers whose result may keep the input's layout: their own consumers decide
_LAYOUT_CARRY = frozenset((
    "transpose", "swapaxes", "swapdims", "permute", "t", "movedim", "moveaxis", "unsqueeze", "squeeze", "reshape",
    "flatten", "unflatten", "getitem", "select", "narrow", "expand", "to", "float", "half", "bfloat16", "double",
    "type", "type_as", "clone", "detach", "add", "sub", "mul", "truediv", "div", "neg", "abs", "exp", "tanh", "gelu",
    "relu", "silu", "sigmoid", "dropout", "pow", "rsqrt", "sqrt", "where", "masked_fill", "_to_copy", "einsum",
    "sum", "mean", "amax", "amin", "softmax", "log_softmax",
))
_SHAPE_ATTRS = ("shape", "dtype", "device", "ndim", "is_cuda", "requires_grad")


def stride_sensitive(node: fx.Node, depth: int = 16) -> bool:
    """Whether some consumer of ``node`` (directly, or through ops that carry its layout) depends on its
    strides: a view, ``as_strided``, an in-place op, a graph output, or an op not known to be layout-free."""
    for u in node.users:
        n = name(u)
        if u.op == "output" or mutations(u) or depth == 0:
            return True
        if n == "getattr" and len(u.args) > 1 and u.args[1] in _SHAPE_ATTRS:
            continue
        if n in _LAYOUT_FREE and not any(mutations(w) for w in u.users):
            continue
        if (n in _LAYOUT_CARRY or (n == "getattr" and len(u.args) > 1 and u.args[1] in ("T", "mT"))) \
                and not stride_sensitive(u, depth - 1):
            continue
        return True
    return False


def written_later(node: fx.Node) -> bool:
    """Whether ``node``, or a view of it, is written in place later."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        for u in n.users:
            if n in mutations(u):
                return True
            if name(u) in VIEWS and u not in seen:
                seen.add(u)
                stack.append(u)
    return False


def eager_layout(graph: fx.Graph, out: fx.Node, eager: torch.Tensor, copy: bool) -> fx.Node:
    """``out`` with the memory layout (dim order) eager's output had; free when it already has it, unless
    ``copy``: a consumer writes it in place, and the op's autograd saved its output for the backward."""
    strides = [hint(s) for s in eager.stride()]
    order = sorted(range(eager.dim()), key=lambda d: (-strides[d], d))
    inverse = [order.index(d) for d in range(eager.dim())]
    x = out if order == list(range(eager.dim())) else graph.call_function(torch.permute, (out, order))
    if copy:
        x = graph.call_method("clone", (x,), {"memory_format": torch.contiguous_format})
    else:
        x = graph.call_method("contiguous", (x,))
    return x if order == list(range(eager.dim())) else graph.call_function(torch.permute, (x, inverse))
