"""The canonical reading of an op: `canon(node)` maps Torch-IR (dynamo) and ATen spellings to one `COp`.

The vocabulary: ``matmul, permute, scale, add, masked_fill, where, softmax, cast, identity, dropout, tanh,
unsqueeze, getitem, expand, reshape, repeat_interleave, repeat, sdpa, mha`` (kind "other" for anything
else).  Scalars are read exactly (`scalar`): Python numbers, 0-d constant tensors (``torch.full([], c)``,
``torch.tensor(c)``), or kept as runtime nodes (SymFloat, 0-d buffers).  Reading changes nothing;
`attnfuse.passes.canonicalize` rewrites the spellings this cannot read in place.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import torch
import torch.fx as fx

from ._graph import arg, name, val


@dataclasses.dataclass(frozen=True)
class COp:
    kind: str
    args: tuple[Any, ...]


def ndim(node: Any) -> int:
    v = val(node)
    return v.dim() if isinstance(v, torch.Tensor) else 0


def _constant_tensor(node: fx.Node) -> float | None:
    """Value of a 0-d tensor built in-graph from a literal, else None."""
    n = name(node)
    if n in ("full", "tensor", "scalar_tensor"):
        value = arg(node, 1, "fill_value") if n == "full" else arg(node, 0, "data")
        if n == "full" and tuple(arg(node, 0, "size", (1,))) != ():
            return None
        if isinstance(value, numbers.Number) and not isinstance(value, bool):
            return _as_stored(float(value), node)
    if n in ("lift_fresh_copy", "detach", "clone", "to", "_to_copy") and isinstance(node.args[0], fx.Node):
        inner = _constant_tensor(node.args[0])
        return None if inner is None else _as_stored(inner, node)
    return None


def _as_stored(value: float, node: fx.Node) -> float:
    # the value the tensor holds: torch.tensor(0.3) is float32(0.3), which is what eager multiplies by
    v = val(node)
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return float(torch.tensor(value, dtype=v.dtype))
    return value


def scalar(x: Any) -> float | fx.Node | None:
    """A scalar operand: its float value when known, the node when only known at run time, else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, numbers.Number):
        return float(x)
    if not isinstance(x, fx.Node):
        return None
    v = val(x)
    if isinstance(v, (torch.SymInt, torch.SymFloat, numbers.Number)) and not isinstance(v, bool):
        return x
    if isinstance(v, torch.Tensor) and v.dim() == 0:
        const = _constant_tensor(x)
        return x if const is None else const
    return None


def _perm_transpose(ndim: int, d0: int, d1: int) -> tuple[int, ...]:
    perm = list(range(ndim))
    d0, d1 = d0 % ndim, d1 % ndim
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return tuple(perm)


def _dims(node: fx.Node, start: int) -> tuple[Any, ...]:
    dims = node.args[start:] or (node.kwargs.get("dims") or node.kwargs.get("size") or node.kwargs.get("shape"),)
    if len(dims) == 1 and isinstance(dims[0], (list, tuple, torch.Size)):
        dims = tuple(dims[0])
    return tuple(dims)


def _binary(kind: str, node: fx.Node) -> COp | None:
    a, b = arg(node, 0, "input"), arg(node, 1, "other")
    if kind == "add":
        if arg(node, 2, "alpha", 1) != 1:
            return None
        return COp("add", (a, b))
    sb = scalar(b)
    if sb is not None and isinstance(a, fx.Node) and ndim(a) > 0:
        return COp("scale", (a, sb, kind == "div"))
    sa = scalar(a)
    if kind == "mul" and sa is not None and isinstance(b, fx.Node) and ndim(b) > 0:
        return COp("scale", (b, sa, False))
    for x, t in ((a, b), (b, a)) if kind == "mul" else ((a, b),):
        if _row_scale(x, t, node):  # a per-head temperature: the factor node is kept, as a run-time scale
            return COp("scale", (x, t, kind == "div"))
    return None


def _row_scale(x: Any, t: Any, node: fx.Node) -> bool:
    """Whether ``x * t`` multiplies each (..., i, j) matrix of x by one number: t has size 1 on x's last two
    axes ((H, 1, 1), (1, H, 1, 1), (B, H, 1, 1)) and leaves x's shape and dtype as they are."""
    xv, tv, out = val(x), val(t), val(node)
    if not isinstance(x, fx.Node) or not all(isinstance(v, torch.Tensor) for v in (xv, tv, out)):
        return False
    if not 0 < tv.dim() <= xv.dim() or xv.dim() < 2 or out.dtype != xv.dtype or out.dim() != xv.dim():
        return False
    same = [a.node.expr == b.node.expr if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt)
            else not isinstance(a, torch.SymInt) and not isinstance(b, torch.SymInt) and a == b
            for a, b in zip(out.shape, xv.shape)]
    return all(same) and all(not isinstance(d, torch.SymInt) and d == 1 for d in tv.shape[-2:])


def _softmax(node: fx.Node) -> COp:
    n = name(node)
    x = arg(node, 0, "input", arg(node, 0, "self"))
    dim = arg(node, 1, "dim")
    if dim is None and n == "softmax":  # F.softmax(x): PyTorch's implicit dim (torch.nn.functional._get_softmax_dim)
        dim = 0 if ndim(x) in (0, 1, 3) else 1
    return COp("softmax", (x, dim))


def _cast_or_identity(node: fx.Node) -> COp:
    x = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    before, after = val(x), val(node)
    if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.shape == after.shape:
        return COp("cast" if before.dtype != after.dtype else "identity", (x,))
    return COp("other", ())


def _dropout(node: fx.Node) -> COp:
    x = arg(node, 0, "input")
    p = arg(node, 1, "p", 0.5)
    training = arg(node, 2, "training", arg(node, 2, "train", True))
    if not training or p == 0:
        return COp("identity", (x,))
    return COp("dropout", (x, float(p)))


def _permute(node: fx.Node) -> COp:
    x = node.args[0]
    n = name(node)
    nd = ndim(x)
    if n in ("transpose", "swapaxes", "swapdims"):
        d0, d1 = arg(node, 1, "dim0"), arg(node, 2, "dim1")
        return COp("permute", (x, _perm_transpose(nd, d0, d1)))
    if n == "getattr":
        if node.args[1] == "mT":
            return COp("permute", (x, _perm_transpose(nd, -2, -1)))
        if node.args[1] == "T":
            return COp("permute", (x, tuple(reversed(range(nd)))))
        return COp("other", ())
    if n == "t":
        return COp("permute", (x, tuple(reversed(range(nd)))))
    return COp("permute", (x, tuple(d % nd for d in _dims(node, 1))))


# row-major reshapes: a softmax's chain may pass through them (`_views` folds them away)
RESHAPES = frozenset(("view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten", "unflatten"))
_CASTS = ("float", "half", "bfloat16", "double", "to", "type", "type_as", "_to_copy", "_to_dtype")
_IDENTITY = ("contiguous", "clone", "alias", "lift_fresh_copy")

# name -> reader; each reads one spelling family into the canonical vocabulary.
_RULES = {
    **dict.fromkeys(("matmul", "bmm", "mm"), lambda n: COp("matmul", (n.args[0], n.args[1]))),
    **dict.fromkeys(("mul", "mul_", "imul"), lambda n: _binary("mul", n)),
    **dict.fromkeys(("truediv", "div", "div_", "itruediv"), lambda n: _binary("div", n)),
    **dict.fromkeys(("add", "add_", "iadd"), lambda n: _binary("add", n)),
    **dict.fromkeys(("masked_fill", "masked_fill_"),
                    lambda n: COp("masked_fill", (n.args[0], arg(n, 1, "mask"), arg(n, 2, "value")))),
    "where": lambda n: COp("where", tuple(n.args[:3])) if len(n.args) >= 3 else COp("other", ()),
    **dict.fromkeys(("softmax", "_softmax"), _softmax),
    **dict.fromkeys(_CASTS + _IDENTITY, _cast_or_identity),
    **dict.fromkeys(("dropout", "dropout_"), _dropout),
    "tanh": lambda n: COp("tanh", (n.args[0],)),
    **dict.fromkeys(("transpose", "swapaxes", "swapdims", "permute", "getattr", "t"), _permute),
    "unsqueeze": lambda n: COp("unsqueeze", (n.args[0], arg(n, 1, "dim"))),
    "getitem": lambda n: COp("getitem", (n.args[0], n.args[1])),
    "expand": lambda n: COp("expand", (n.args[0],)),
    **dict.fromkeys(("reshape", "view", "_unsafe_view"), lambda n: COp("reshape", (n.args[0],))),
    "repeat_interleave": lambda n: COp("repeat_interleave", (n.args[0], arg(n, 1, "repeats"), arg(n, 2, "dim"))),
    "repeat": lambda n: COp("repeat", (n.args[0], _dims(n, 1))),
    "scaled_dot_product_attention": lambda n: COp("sdpa", ()),
    "multi_head_attention_forward": lambda n: COp("mha", ()),
    "_transformer_encoder_layer_fwd": lambda n: COp("mha", ()),  # nn.TransformerEncoderLayer's fast path
}


def canon(node: Any) -> COp:
    """The canonical reading of ``node`` (kind "other" when it is none of ours)."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return COp("other", ())
    rule = _RULES.get(name(node))
    op = rule(node) if rule else None
    return op or COp("other", ())


def reaches_matmul(node: Any, depth: int = 16) -> bool:
    """Whether ``node`` is the scores chain: a matmul reached through chain ops and reshapes (an ``add`` or
    ``where`` through either operand)."""
    while isinstance(node, fx.Node) and depth > 0:
        op = canon(node)
        if op.kind == "matmul":
            return True
        if op.kind == "add":
            return any(reaches_matmul(a, depth - 1) for a in op.args)
        if op.kind == "where":
            return any(reaches_matmul(a, depth - 1) for a in op.args[1:])
        if op.kind in ("cast", "identity", "scale", "masked_fill", "tanh"):
            node = op.args[0]
        elif name(node) in RESHAPES and node.args:
            node = node.args[0]
        else:
            return False
        depth -= 1
    return False


def feeds_left_matmul(node: fx.Node) -> bool:
    """Whether ``node`` weights a matmul: it is the left operand of one (``p @ v``, or an einsum still to be
    rewritten) through single-user casts, dropouts and reshapes."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        op = canon(user)
        if op.kind == "matmul":
            return op.args[0] is node
        if name(user) == "einsum":  # p @ v still spelled as einsum: the matmul rules run after this one
            operands = user.args[1:] if len(user.args) > 2 else tuple(user.args[1])
            return len(operands) == 2 and operands[0] is node
        if op.kind not in ("cast", "identity", "dropout") and name(user) not in RESHAPES:
            return False
        node = user
    return False
