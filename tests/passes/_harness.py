"""Shared by the pass tests: compile with attnfuse, check the numbers against eager and a
float64 reference (the 2x rule), and read what the fused op was called with."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from _util import assert_2x
from torch.utils._python_dispatch import TorchDispatchMode

import attnfuse
import attnfuse._crossgraph as _crossgraph
import attnfuse.backend as _backend


class OpSpy(TorchDispatchMode):
    """Records the arguments of every ``attnfuse::attention`` call run under it.

    Dynamo runs frames eagerly while a dispatch mode is active, so `check` replays the
    rewritten graph (captured from the backend) under the spy instead of the compiled function.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.attnfuse.attention.default:
            schema = func._schema.arguments
            call = {a.name: a.default_value if a.has_default_value() else None for a in schema}
            call.update(zip([a.name for a in schema], args))
            call.update(kwargs)
            self.calls.append(call)
        return func(*args, **kwargs)


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [o for o in out if isinstance(o, torch.Tensor)]


def _leaf(x: Any, dtype: torch.dtype | None, grad: bool) -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    y = x.detach().clone()
    if dtype is not None and y.is_floating_point():
        y = y.to(dtype)
    return y.requires_grad_(grad)


def _as_ref(fn: Callable) -> Callable:
    if isinstance(fn, torch.nn.Module):
        return copy.deepcopy(fn).double()
    return fn


class Result:
    def __init__(self, report: attnfuse.Report, calls: list[dict[str, Any]], out: list[torch.Tensor]) -> None:
        self.report, self.calls, self.out = report, calls, out

    @property
    def site(self) -> attnfuse.Site:
        assert len(self.report.sites) == 1, str(self.report)
        return self.report.sites[0]

    @property
    def call(self) -> dict[str, Any]:
        assert len(self.calls) == 1, f"expected one attnfuse.attention call, got {len(self.calls)}"
        return self.calls[0]


def check(fn: Callable, args: Sequence[Any], *, grad: Sequence[int] | None = None, inner: str = "eager",
          dynamic: bool | None = False, spy: bool = True) -> Result:
    """Compile ``fn`` with attnfuse, run it on ``args`` and assert the 2x rule on outputs and gradients.

    ``grad`` lists the argument positions that get gradients (default: every floating tensor
    except 0-d ones); the reference is ``fn`` on float64 copies of the arguments.
    """
    if grad is None:
        grad = [i for i, a in enumerate(args)
                if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() > 0]
    eager_args = [_leaf(a, None, i in grad) for i, a in enumerate(args)]
    ours_args = [_leaf(a, None, i in grad) for i, a in enumerate(args)]
    ref_args = [_leaf(a, torch.float64, i in grad) for i, a in enumerate(args)]
    eager = _outputs(fn(*eager_args))
    ref = _outputs(_as_ref(fn)(*ref_args))
    compiled = torch.compile(fn, backend="attnfuse", options={"inner": inner}, dynamic=dynamic)
    graphs = []
    transform = _backend.transform

    def capture(gm, example_inputs, config, report):
        out = transform(gm, example_inputs, config, report)
        graphs.append((out, list(example_inputs)))
        return out

    # one graph's analysis: a mask passed in is data here (no run-time variant of `attnfuse._crossgraph`, which
    # tests/test_crossgraph.py covers)
    mask_inputs = _crossgraph._maskrecipe.mask_inputs
    _backend.transform, _crossgraph._maskrecipe.mask_inputs = capture, lambda gm: {}
    try:
        ours = _outputs(compiled(*ours_args))
    finally:
        _backend.transform, _crossgraph._maskrecipe.mask_inputs = transform, mask_inputs
    report = attnfuse.last_report()
    assert len(graphs) == 1, f"expected one graph, dynamo captured {len(graphs)}"
    calls: list[dict[str, Any]] = []
    if spy:
        with torch.no_grad(), OpSpy() as s:
            graphs[0][0](*graphs[0][1])
        calls = s.calls
    assert report is not None
    for i, (o, e, r) in enumerate(zip(ours, eager, ref, strict=True)):
        assert o.dtype == e.dtype, (o.dtype, e.dtype)
        assert_2x(o.detach(), e.detach(), r.detach(), what=f"output {i}")
    if grad:
        gens = [torch.randn(o.shape, dtype=o.dtype) for o in eager]
        for outs in (eager, ours, ref):
            sum((o * g.to(o.dtype)).sum() for o, g in zip(outs, gens)).backward()
        for i in grad:
            assert_2x(ours_args[i].grad, eager_args[i].grad, ref_args[i].grad, what=f"grad of argument {i}")
    return Result(report, calls, [o.detach() for o in ours])


def fused(res: Result, *, pattern: str | None = None, **fields: Any) -> attnfuse.Site:
    """Assert exactly one site, fused, and every given Site field equal (``mask`` compares its kind)."""
    site = res.site
    assert site.status == "fused", f"not fused: {site.reason}\n{res.report}"
    for key, want in fields.items():
        got = site.mask.get("kind") if key == "mask" else getattr(site, key)
        assert got == want, f"{key}: {got!r} != {want!r}\n{res.report}"
    if pattern is not None:
        assert pattern in site.pattern, (pattern, site.pattern)
    return site


def skipped(res: Result, reason: str) -> attnfuse.Site:
    """Assert no site fused, at least one reported, and a reason containing ``reason``."""
    assert not res.report.fused, str(res.report)
    assert not res.calls
    reasons = [s.reason or "" for s in res.report.sites]
    assert any(reason in r for r in reasons), f"{reason!r} not in {reasons}"
    return res.report.sites[0]
