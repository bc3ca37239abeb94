"""attnfuse: find attention subgraphs in PyTorch models and fuse them.

    compiled = torch.compile(model, backend="attnfuse")
    report = attnfuse.audit(model, *example_inputs)
    attnfuse.export(model, example_inputs, "model.onnx", format="onnx")   # or "pt2", "mlir"
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from . import ops  # noqa: F401 - registers torch.ops.attnfuse.*
from .config import Config
from .device import DeviceSpec
from .export import export, rewrite
from .report import Report, Site, last_report

# A library adds no handler that prints: the application (or TORCH_LOGS="+attnfuse") decides (README, "Logging").
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["Config", "DeviceSpec", "Report", "Site", "audit", "export", "last_report", "rewrite"]


def audit(model: Any, *args: Any, options: Any = None, **kwargs: Any) -> Report:
    """Trace ``model(*args, **kwargs)`` once and report what attnfuse would fuse, and why not.

    Runs the canonicalize / match / mask / plan passes on every graph dynamo
    captures; compiles no kernel (the captured graphs run eagerly).  Each fused site is verified against
    its original region on the example inputs unless ``options={"verify": False}``.
    """
    from .backend import transform

    config = Config.from_options(options, defaults={"verify": True})
    combined = Report(device=config.device_spec().name)

    def _audit_backend(gm, example_inputs):
        report = Report(device=combined.device, graphs=1)
        transform(gm, example_inputs, config, report, rewrite_graph=False)
        combined.merge(report)
        return gm.forward

    compiled = torch.compile(model, backend=_audit_backend, dynamic=False)
    compiled(*args, **kwargs)
    return combined
