"""Evaluate a mask expression (`_maskexpr`) on a concrete grid of the score axes: `evaluate`.

Used where a mask is constant (buffers, static shapes; `_maskvalue`): the grid may be evaluated in slabs of
rows (``starts``), and a `Read` by plain shifted indices is a view of its tensor (`_window`), so a slab costs
only what its operations write.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ._maskexpr import Aff, And, Atom, Const, Ite, Not, Op, Or, Read

_EVAL = {"add": operator.add, "mul": operator.mul, "neg": operator.neg, "abs": torch.abs,
         "ne0": lambda x: x != 0, "eq": operator.eq, "ne": operator.ne, "le": operator.le, "lt": operator.lt}


def evaluate(e, extents: dict[int, int], values: dict[fx.Node, torch.Tensor],
             starts: dict[int, int] | None = None) -> torch.Tensor:
    """The value of ``e`` on the grid ``starts[v] <= v < starts[v] + extents[v]`` of the score axes (a 4-D
    broadcastable tensor; ``starts`` default 0, so a caller can evaluate a large grid in slabs).

    ``values`` holds the concrete tensor of every `Read` node; an index outside it raises.  A read by plain
    (shifted) indices is a view of its tensor (`_window`), so a slab costs only what its operations write.
    """
    out = _Grid(extents, values, starts or {}).go(e)
    return out.view([1] * (4 - out.dim()) + list(out.shape))


class _Grid:
    """`evaluate`'s walk (a class, not a self-referencing closure, so that its tensors are freed on return
    rather than by the cycle collector: slab after slab, that garbage would add up)."""

    def __init__(self, extents: dict[int, int], values: dict, starts: dict[int, int]) -> None:
        self.extents, self.values, self.starts, self.axes = extents, values, starts, {}

    def axis(self, v: int) -> torch.Tensor:
        if v not in self.axes:
            start, n = self.starts.get(v, 0), self.extents[v]
            self.axes[v] = torch.arange(start, start + n).view([-1 if k == v else 1 for k in range(4)])
        return self.axes[v]

    def go(self, x):
        go = self.go
        if isinstance(x, Aff):
            out = torch.tensor(x.const)
            for v, c in x.terms:
                out = out + c * self.axis(v)
            return out
        if isinstance(x, Const):
            return torch.tensor(x.value)
        if isinstance(x, Atom):
            return go(x.aff) <= 0
        if isinstance(x, (And, Or)):
            parts = [go(p) for p in x.parts]
            out = parts[0]
            for p in parts[1:]:
                out = out & p if isinstance(x, And) else out | p
            return out
        if isinstance(x, Not):
            if isinstance(x.x, Op) and x.x.fn in ("eq", "ne"):  # one pass: not (a == b) is a != b, NaN included
                return self.compare("ne" if x.x.fn == "eq" else "eq", *(go(a) for a in x.x.args))
            return ~go(x.x)
        if isinstance(x, Ite):
            return torch.where(go(x.cond), go(x.a), go(x.b))
        if isinstance(x, Read):
            window = _window(self.values[x.node], x.index, self.extents, self.starts)
            if window is not None:
                return window
            index = torch.broadcast_tensors(*(go(i) for i in x.index)) if x.index else ()
            return self.values[x.node][tuple(index)]
        if x.fn in ("eq", "ne"):
            return self.compare(x.fn, *(go(a) for a in x.args))
        return _EVAL[x.fn](*(go(a) for a in x.args))

    @staticmethod
    def compare(fn: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a == b`` / ``a != b``; a bool tensor against an integer scalar (``bias == 0`` on a bool buffer) without
        promoting the tensor to int64: True and False are 1 and 0 there, so the answer is the tensor, its
        negation, or a constant."""
        for t, c in ((a, b), (b, a)):
            if t.dtype == torch.bool and t.dim() and not c.dim() and not c.is_floating_point() and not c.is_complex():
                v = int(c)
                if v in (0, 1):
                    return t if (v == 1) == (fn == "eq") else ~t
                return torch.full(t.shape, fn == "ne", dtype=torch.bool, device=t.device)
        return _EVAL[fn](a, b)


def _window(t: torch.Tensor, index: tuple[Aff, ...], extents: dict[int, int], starts: dict[int, int]):
    """``t[index]`` on the grid as a view of ``t`` (no copy), where every index is a constant or ``v + c`` of a
    distinct grid variable and lies inside ``t``: the same values and shape as the gather `evaluate` would
    do.  None otherwise (the gather then decides, wrapping negative indices as PyTorch does)."""
    if len(index) != t.dim():
        return None
    out, axes = t, []
    for d in reversed(range(len(index))):  # from the last dim, so the earlier dims keep their numbers
        i = index[d]
        if not i.terms:
            if not 0 <= i.const < t.shape[d]:
                return None
            out = out.select(d, i.const)
            continue
        v, c = i.terms[0]
        start = starts.get(v, 0) + i.const
        if len(i.terms) != 1 or c != 1 or v not in extents or not 0 <= v < 4 or v in axes or start < 0 \
                or start + extents[v] > t.shape[d]:
            return None
        out, axes = out.narrow(d, start, extents[v]), [v, *axes]
    if not axes:
        return out
    out = out.permute(sorted(range(len(axes)), key=axes.__getitem__))  # the dims in score-axis order
    for v in range(4):
        out = out if v in axes else out.unsqueeze(v)
    return out
