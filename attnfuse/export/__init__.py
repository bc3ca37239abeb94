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
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import ExportedProgram

from ..backend import _publish, transform
from ..config import Config
from ..report import Report
from . import _lower

FORMATS = ("pt2", "onnx", "mlir")
_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default}


def _strip_asserts(gm: fx.GraphModule) -> None:
    """Drop export's ``_assert_tensor_metadata`` checks (dtype asserts on intermediates): they read the
    attention probabilities as a second user and would block every match."""
    for node in list(gm.graph.nodes):
        if node.target in _ASSERTS:
            gm.graph.erase_node(node)
    gm.recompile()


def _dynamic_shapes(ep: ExportedProgram, gm: fx.GraphModule) -> Any:
    """``Dim.AUTO`` where the original program's user inputs had symbolic sizes (None when all static)."""
    specs, dynamic = [], False
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            specs.append(None)
            continue
        dims = {i: torch.export.Dim.AUTO for i, s in enumerate(value.shape) if isinstance(s, torch.SymInt)}
        dynamic |= bool(dims)
        specs.append(dims or None)
    if not dynamic:
        return None
    args, kwargs = pytree.tree_unflatten(specs, ep.call_spec.in_spec)
    return (*args, *kwargs.values())


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
    dynamic = _dynamic_shapes(ep, gm)
    report = Report(device=config.device_spec().name, graphs=1)
    leaves = pytree.tree_leaves((args, kwargs))
    new = transform(gm, leaves, config, report, keep=keep)
    if not report.fused:
        return ep, report
    if lower is not None:
        lower(new, leaves)
    return torch.export.export(new, tuple(args), dict(kwargs), dynamic_shapes=dynamic), report


def rewrite(ep: ExportedProgram, options: Any = None) -> ExportedProgram:
    """``ep`` with every fusable attention site replaced by ``torch.ops.attnfuse.attention``.

    The same passes and options as the ``torch.compile`` backend; ``attnfuse.last_report()`` is the
    report.  An ``ep`` with nothing to fuse (or whose passes fail) comes back unchanged.
    """
    config = Config.from_options(options)
    ep, report = _rewrite(ep, config)
    _publish(report, config)
    return ep


def export(model: Any, args: Any, path: str | pathlib.Path, format: str = "pt2", options: Any = None, *,
           mlir_output: str = "torch") -> pathlib.Path:
    """``torch.export`` ``model(*args)``, rewrite it (`rewrite`), and write it to ``path`` as ``format``.

    ``format``: ``"pt2"`` | ``"onnx"`` | ``"mlir"``; ``mlir_output``: ``"torch"`` |
    ``"linalg-on-tensors"``.  ``model`` may be an `ExportedProgram` already.  Export a model in
    ``eval()`` mode for inference (dropout cannot be expressed in ONNX/MLIR attention ops).
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: allowed values are {', '.join(map(repr, FORMATS))}")
    from . import mlir, onnx

    if format == "mlir" and mlir_output not in mlir.OUTPUT_TYPES:
        raise ValueError(f"mlir_output={mlir_output!r}: allowed values are "
                         f"{', '.join(map(repr, mlir.OUTPUT_TYPES))}")
    {"onnx": onnx.require, "mlir": mlir.require}.get(format, lambda: None)()
    config = Config.from_options(options)
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    ep = model if isinstance(model, ExportedProgram) else torch.export.export(model, args)
    keep = None if format == "pt2" else functools.partial(_lower.unsupported, format)
    ep, report = _rewrite(ep, config, keep=keep, lower=_lower.for_onnx if format == "onnx" else None)
    path = pathlib.Path(path)
    if format == "pt2":
        torch.export.save(ep, path)
    elif format == "onnx":
        onnx.save(ep, path)
    else:
        mlir.save(ep, path, mlir_output)
    report.notes.append(f"exported as {format} to {path}")
    _publish(report, config)
    return path
