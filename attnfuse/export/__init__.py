"""The torch.export path: `rewrite(ep)` and `export(model, args, path, format=...)`.

`rewrite` runs the backend's passes (`attnfuse.backend.transform`: canonicalize, match, masks,
approximation policy, plan, rewrite) on the module of an `ExportedProgram` with its example inputs,
then exports the rewritten module again, so the result is an ordinary `ExportedProgram` whose fused
sites are ``torch.ops.attnfuse.attention`` calls (loading a saved one needs ``import attnfuse``,
which registers the op).  Its report is `attnfuse.last_report()`.

`export` writes one of three formats:

* ``pt2``: ``torch.export.save`` of the rewritten program;
* ``onnx``: one standard ``Attention`` node per fused site (`attnfuse.export.onnx`);
* ``mlir``: torch-mlir's FX importer, one SDPA / ``tm_tensor.attention`` op per fused site
  (`attnfuse.export.mlir`).

A site a format cannot express stays as its original ops, with the reason in the report.

Dynamic shapes: ``export(..., dynamic_shapes=...)`` passes torch.export's ``dynamic_shapes`` (or ``"auto"``:
``Dim.AUTO`` everywhere, `attnfuse.export._dims`) to the trace; the rewrite re-exports with the same
dims and ranges, and every format writes them symbolic, so the file runs at other sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import pathlib
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import ExportedProgram

from .._publish import publish
from ..backend import transform
from ..config import Config
from ..families import PYTORCH_KERNELS
from ..report import Report
from . import _dims, _lower

FORMATS = ("pt2", "onnx", "mlir")
# torch's own deprecation warning, raised inside torch.export / torch.onnx (pytree specs copied by torch itself)
_TORCH_NOISE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default}


def _strip_asserts(gm: fx.GraphModule) -> None:
    """Drop export's ``_assert_tensor_metadata`` checks (dtype asserts on intermediates): they read the
    attention probabilities as a second user and would block every match."""
    for node in list(gm.graph.nodes):
        if node.target in _ASSERTS:
            gm.graph.erase_node(node)
    gm.recompile()


def _rewrite(ep: ExportedProgram, config: Config, keep: Callable | None = None,
             lower: Callable | None = None) -> tuple[ExportedProgram, Report]:
    """`rewrite`, with `analyze`'s ``keep`` and ``lower(gm, example_inputs)``, a pass over the rewritten
    module before it is exported again."""
    if ep.example_inputs is None:
        raise ValueError("this ExportedProgram has no example_inputs (the passes read them); export it again "
                         "with torch.export.export(model, args)")
    args, kwargs = ep.example_inputs
    gm = ep.module()
    _strip_asserts(gm)
    specs = _dims.reexport(ep, gm), _dims.reexport(ep, gm, exact=False)
    report = Report(device=config.device_spec().name, graphs=1)
    leaves = pytree.tree_leaves((args, kwargs))
    # a program runs where it is loaded: it carries attnfuse's own op, not this machine's choice of PyTorch kernel
    own = tuple(k for k in config.kernels if k not in PYTORCH_KERNELS) or ("flash",)
    new = transform(gm, leaves, dataclasses.replace(config, kernels=own), report, keep=keep)
    if not report.fused:
        return ep, report
    if lower is not None:
        lower(new, leaves)
    return _reexport(ep, new, specs, config, report), report


def _reexport(ep: ExportedProgram, new: fx.GraphModule, specs: tuple[Any, Any], config: Config,
              report: Report) -> ExportedProgram:
    """``new`` (the rewritten ``ep.module()``) exported with ``ep``'s dynamic dims: ``specs`` are the exact
    ``Dim``s and the ``Dim.AUTO`` fallback (`_dims.reexport`), tried in turn; if neither keeps every dynamic
    dim dynamic, ``ep`` itself (the rewrite dropped, the report says why) unless ``strict``."""
    args, kwargs = ep.example_inputs
    if specs[0] is None:
        return torch.export.export(new, tuple(args), dict(kwargs))
    failure = None
    for spec in specs:
        try:
            out = torch.export.export(new, tuple(args), dict(kwargs), dynamic_shapes=spec)
        except Exception as exc:  # torch's constraint errors: the rewrite's guards do not fit the exact Dims
            failure = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            continue
        if _dims.kept(ep, out):
            return out
        failure = f"it would fix a dim: {_dims.describe(out)}"
    if config.strict:
        raise RuntimeError(f"attnfuse: the rewritten program does not keep the dynamic dims ({failure})")
    for site in report.fused:
        site.status, site.kernel = "skipped", None
        site.reason = "the rewritten program would not keep the dynamic dims; exported as its original ops"
    report.notes.append(f"re-exporting the rewrite with the dynamic dims failed ({failure}); the program is "
                        "exported unchanged")
    return ep


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide torch's pytree ``LeafSpec`` FutureWarning (torch deprecating its own internal use) around our calls
    into torch.export / torch.onnx; every other warning is shown as usual."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCH_NOISE, category=FutureWarning)
        yield


class _Progress:
    """A tqdm bar over export's steps on ``stream``, only where it is a terminal and only once an export has
    run for a second (a quick export prints nothing); it is erased when done."""

    def __init__(self, steps: int, stream: TextIO | None, delay: float = 1.0) -> None:
        self.bar, self.started = None, False
        if stream is None or not getattr(stream, "isatty", lambda: False)():
            return
        from tqdm import tqdm

        self.bar = tqdm(total=steps, desc="attnfuse export", file=stream, delay=delay, mininterval=0, leave=False,
                        bar_format="{desc} {bar} {n}/{total} [{elapsed}]")

    def step(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(f"attnfuse export: {name}", refresh=not self.started)
            if self.started:
                self.bar.update(1)
            self.started = True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def rewrite(ep: ExportedProgram, options: Any = None) -> ExportedProgram:
    """``ep`` with every fusable attention site replaced by ``torch.ops.attnfuse.attention``.

    The same passes and options as the ``torch.compile`` backend; ``attnfuse.last_report()`` is the
    report.  An ``ep`` with nothing to fuse (or whose passes fail) comes back unchanged.
    """
    config = Config.from_options(options)
    with _quiet():
        ep, report = _rewrite(ep, config)
    publish(report, config)
    return ep


def export(model: Any, args: Any, path: str | pathlib.Path, format: str = "pt2", options: Any = None, *,
           dynamic_shapes: Any = None, mlir_output: str = "torch") -> pathlib.Path:
    """``torch.export`` ``model(*args)``, rewrite it (`rewrite`), and write it to ``path`` as ``format``.

    ``format``: ``"pt2"`` | ``"onnx"`` | ``"mlir"``; ``mlir_output``: ``"torch"`` |
    ``"linalg-on-tensors"``.  ``model`` may be an `ExportedProgram` already (its dims are what it was
    exported with).  Export a model in ``eval()`` mode for inference (dropout cannot be expressed in
    ONNX/MLIR attention ops).

    ``dynamic_shapes``: None (every size fixed to ``args``'), ``"auto"`` (``torch.export.Dim.AUTO`` for every
    dim of every tensor input: dynamic unless the model fixes it, e.g. a head_dim), or what
    ``torch.export.export`` takes (e.g. ``({0: Dim("batch"), 1: Dim("seq", max=4096)},)``).  The rewritten
    program keeps the dynamic dims and their ranges in every format; the report's notes say which dims
    are dynamic.  On a terminal, a long export shows a progress bar on stderr.
    """
    return export_with_progress(model, args, path, format, options, dynamic_shapes=dynamic_shapes,
                                mlir_output=mlir_output, progress=sys.stderr)


def export_with_progress(model: Any, args: Any, path: str | pathlib.Path, format: str, options: Any, *,
                         dynamic_shapes: Any, mlir_output: str, progress: TextIO | None) -> pathlib.Path:
    """`export`, its progress bar on ``progress`` (the CLI passes its terminal while it holds stderr back)."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: allowed values are {', '.join(map(repr, FORMATS))}")
    from . import mlir, onnx

    if format == "mlir" and mlir_output not in mlir.OUTPUT_TYPES:
        raise ValueError(f"mlir_output={mlir_output!r}: allowed values are "
                         f"{', '.join(map(repr, mlir.OUTPUT_TYPES))}")
    {"onnx": onnx.require, "mlir": mlir.require}.get(format, lambda: None)()
    config = Config.from_options(options)
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    if isinstance(model, ExportedProgram) and dynamic_shapes is not None:
        raise ValueError("dynamic_shapes applies when attnfuse.export traces the model; this model is an "
                         "ExportedProgram already: pass dynamic_shapes to torch.export.export instead")
    spec = _dims.resolve(args, dynamic_shapes)
    labels = _dims.labels(model, args, spec) if spec is not None else {}
    path = pathlib.Path(path)
    bar = _Progress(3 if format == "pt2" else 4, progress)
    try:
        with _quiet():
            bar.step("trace")
            ep = model if isinstance(model, ExportedProgram) else torch.export.export(model, args,
                                                                                        dynamic_shapes=spec)
            bar.step("rewrite")
            keep = None if format == "pt2" else functools.partial(_lower.unsupported, format)
            ep, report = _rewrite(ep, config, keep=keep, lower=_lower.for_onnx if format == "onnx" else None)
            if format == "pt2":
                bar.step("save")
                torch.export.save(ep, path)
            elif format == "onnx":
                bar.step("lower")
                program = onnx.convert(ep)
                bar.step("save")
                program.save(str(path))
            else:
                bar.step("lower")
                text = mlir.to_mlir(ep, mlir_output)
                bar.step("save")
                path.write_text(text)
    finally:
        bar.close()
    report.notes.append(f"exported as {format}, {_dims.describe(ep, labels)}")
    publish(report, config)
    return path
