"""Tensor Product Attention operands: a q, k or v that is a per-token product of two factor tensors.

A T6-style model (arXiv 2501.06425) forms each side as ``x[n, t, h, :] = scale * sum_r a[n, t, h, r] * b[n, t, r, :]``
and attends over the formed tensors.  `side` proves, from the graph, that an attention operand is such a product,
in the spellings real code uses:

* ``torch.bmm(a.view(N, H, R), b.view(N, R, D))`` then ``.view(B, T, H, D)`` (the reference code: N = B * T),
* ``torch.matmul`` / ``@`` on (B, T, H, R) and (B, T, R, D) (any equal batch dims),
* ``torch.einsum("...hr,...rd->...hd")`` with the same batch letters on both inputs (its output in any order),

each with scalar multiplies / divides anywhere on the way (``.div_(R)``, ``/ R``), ``contiguous``, reshapes that
split or merge only the batch dims (the last two, heads and head dim, stay), and a final transpose to the
attention's (B, H, T, D).  The batch dims of ``a``, ``b`` and the product are the same (no broadcasting), so
``a`` read row-major as (B, T, H, R) and ``b`` as (B, T, R, D) are the factors of the operand's (B, T) positions.
Every node from the product to the operand must have that one use (the formed tensor is read nowhere else), so
the rewritten site leaves them dead.  RoPE applied to a factor is upstream of it: part of the factor.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx

from ._canon import RESHAPES, canon
from ._graph import eq, name, val
from ._operands import compose
from ._records import Operand

__all__ = ["TpaSide", "factor_source", "side"]

_MAX_RANK = 16


@dataclasses.dataclass(frozen=True)
class TpaSide:
    """One side's factors: ``a`` (row-major (B, T, H, R)), ``b`` (row-major (B, T, R, D)), the constant
    ``scale``, and the nodes from the product to the operand (dead once the site reads the factors)."""

    a: fx.Node
    b: fx.Node
    scale: float
    heads: int
    rank: int
    head_dim: int
    chain: frozenset

    def describe(self) -> str:
        return f"rank {self.rank} factors ({self.heads} heads x {self.rank}) @ ({self.rank} x {self.head_dim})"


def _einsum_product(node: fx.Node) -> tuple[fx.Node, fx.Node, tuple[int, ...]] | None:
    """(a, b, permutation of the canonical (batch..., h, d) output) of a per-token product einsum."""
    eq_, *ops = node.args
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):  # einsum(eq, [a, b]) (and torch.export's aten.einsum)
        ops = list(ops[0])
    if not isinstance(eq_, str) or len(ops) != 2 or "..." in eq_ or "->" not in eq_:
        return None
    ins, out = eq_.replace(" ", "").split("->")
    parts = ins.split(",")
    if len(parts) != 2:
        return None
    sa, sb = parts
    if len(sa) < 3 or len(sa) != len(sb) or len(set(sa)) != len(sa) or len(set(sb)) != len(sb):
        return None
    batch, h, r = sa[:-2], sa[-2], sa[-1]
    if sb[:-2] != batch or sb[-2] != r or sb[-1] in sa or len(out) != len(sa) or set(out) != set(batch + h + sb[-1]):
        return None
    canonical = batch + h + sb[-1]
    return ops[0], ops[1], tuple(canonical.index(c) for c in out)


def _product(node: fx.Node) -> tuple[fx.Node, fx.Node, tuple[int, ...]] | None:
    """(a, b, output permutation) if ``node`` is a batched matrix product of two tensors."""
    n = name(node)
    if n == "einsum":
        return _einsum_product(node)
    if n in ("matmul", "bmm") and len(node.args) == 2 or (node.target is operator.matmul and len(node.args) == 2):
        a, b = node.args
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            return a, b, tuple(range(getattr(val(node), "ndim", 0)))
    return None


def _scalar(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def side(op: Operand) -> TpaSide | None:
    """``op``'s factors, or None (module docstring)."""
    node, perm = op.node, op.perm
    out = val(node)
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        return None
    perm = perm or (0, 1, 2, 3)
    scale, chain, reshaped = 1.0, [], False
    x = node
    for _ in range(32):
        if not isinstance(x, fx.Node) or x.op not in ("call_function", "call_method"):
            return None
        if len(x.users) != 1:
            return None  # the formed tensor is read elsewhere too
        chain.append(x)
        found = _product(x)
        if found is not None:
            break
        c = canon(x)
        if c.kind == "permute" and not reshaped:
            perm = compose(perm, c.args[1])
        elif c.kind == "identity":
            pass
        elif c.kind == "scale" and _scalar(c.args[1]) is not None:
            f = _scalar(c.args[1])
            if f == 0:
                return None
            scale = scale / f if c.args[2] else scale * f
        elif name(x) in RESHAPES and name(x) in ("view", "reshape", "_unsafe_view"):
            src, dst = val(x.args[0]), val(x)
            if src is None or src.ndim < 3 or not (eq(src.shape[-1], dst.shape[-1]) and eq(src.shape[-2],
                                                                                          dst.shape[-2])):
                return None
            reshaped = True
        else:
            return None
        x = c.args[0] if c.kind in ("permute", "identity", "scale") else x.args[0]
    else:
        return None
    a, b, out_perm = found
    prod, va, vb = val(x), val(a), val(b)
    if not all(isinstance(t, torch.Tensor) for t in (prod, va, vb)) or not (va.ndim == vb.ndim == prod.ndim >= 3):
        return None
    if out_perm != tuple(range(prod.ndim)):
        if reshaped or prod.ndim != 4:
            return None
        perm = compose(perm, out_perm)
        prod_shape = [prod.shape[i] for i in sorted(range(4), key=lambda i: out_perm[i])]
    else:
        prod_shape = list(prod.shape)
    if not all(eq(p, q) and eq(q, s) for p, q, s in zip(va.shape[:-2], vb.shape[:-2], prod_shape[:-2])):
        return None  # broadcasting over the batch: not a per-token product
    heads, rank, head_dim = va.shape[-2], va.shape[-1], vb.shape[-1]
    if not all(isinstance(n, int) for n in (heads, rank, head_dim)) or not 1 <= rank <= _MAX_RANK:
        return None
    if not eq(vb.shape[-2], rank) or va.dtype != vb.dtype or va.dtype != out.dtype:
        return None
    # the formed tensor before the final permute: (B, T, H, D), read by the attention as (B, H, T, D)
    read = [out.shape[p] for p in (op.perm or range(4))]  # the operand as the attention reads it: (B, H, T, D)
    if perm != (0, 2, 1, 3) or not (eq(read[1], heads) and eq(read[3], head_dim)):
        return None
    if not reshaped and prod.ndim != 4:
        return None
    return TpaSide(a, b, scale, heads, rank, head_dim, frozenset(chain))


def factor_source(node: fx.Node, shape: list) -> fx.Node | None:
    """A node holding ``node``'s values row-major with exactly ``shape`` (the factor as (B, T, H, R) or (B, T, R, D)):
    ``node`` itself, or an ancestor through reshapes (``a.view(B * T, H, R)`` of a (B, T, H, R) ``a``); None when
    neither has that shape (static sizes: the rewriter may still reshape ``node``)."""
    x = node
    for _ in range(8):
        v = val(x)
        if not isinstance(v, torch.Tensor):
            return None
        if v.ndim == len(shape) and all(eq(a, b) for a, b in zip(v.shape, shape)):
            return x
        if name(x) not in ("view", "reshape", "_unsafe_view", "contiguous") or not isinstance(x.args[0], fx.Node):
            return None
        x = x.args[0]
    return None
