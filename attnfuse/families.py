"""The kernel family registry: one record per family, read by every place that lists families.

A `Family` says whether the family is exact, which module holds its kernels (an import path: the registry
imports no kernel; `kernel_module` imports one when a module object is needed), its estimate
(`attnfuse.costmodel.estimates`), what the export formats do with a site it runs, and its default settings
(the approximate families' ``options["approximate"]["topk" | "lsh"]``).

``sdpa`` and ``flex`` are PyTorch's kernels as candidates (`attnfuse._impls`: the op's ``impl``): SDPA with an
explicit backend, and FlexAttention with the proven mask compiled into its ``mask_mod`` / ``BlockMask``.  Their
estimates scale attnfuse's own by ratios fit from measurements (`attnfuse.costmodel.fits`).

``tpa`` attends from the factors of a Tensor Product Attention site (`attnfuse.kernels.tpa`): a candidate only
where the matcher proved some side a per-token product (`attnfuse.passes._tpa`); the export formats write the
formed tensors and the standard attention (``"original"``: the site's own ops).

Readers: `attnfuse.config` (the allowed ``kernels``, the approximate settings and their defaults),
`attnfuse.costmodel.plan` (the candidates, `estimate_family`), `attnfuse.ops` (the module an approximate table
row runs), `attnfuse.passes.approximate` (the families a policy calibrates) and `attnfuse.export._lower`
(the sites a format cannot express).  ``eager`` is the unfused graph: a planner candidate with an estimate,
no kernel module, never a value of ``options["kernels"]``.

Export (`Family.export`):

* ``"attention"``: ONNX / MLIR export the site as the format's one standard attention op (ONNX ``Attention``,
  ``aten.scaled_dot_product_attention``), the structure the family skips (band, empty tiles) folded into one
  mask with the same values (`attnfuse.export._lower.dense_mask`);
* ``"original"``: the formats have no such attention; the site is exported as its original (exact) ops, and
  the report says why (`attnfuse.export._lower.unsupported`).

Layering: this module imports `attnfuse.costmodel.estimates` (hence only `tiles`, `fits`, `lshknobs` and
`device`; LSH's defaults are `lshknobs.DEFAULTS`) and sits below the planner, config, ops, the passes and export.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from types import MappingProxyType, ModuleType

from .costmodel import estimates, lshknobs
from .costmodel.tiles import Estimate

__all__ = ["APPROXIMATE", "EXACT", "EXPORT_ORIGINAL", "FAMILIES", "KERNELS", "PYTORCH_KERNELS", "Family",
           "kernel_module"]


@dataclasses.dataclass(frozen=True)
class Family:
    """One kernel family: ``name`` (as in ``options["kernels"]`` and the report), ``exact`` (False: an
    approximation the user opts into), ``module`` (import path of its kernels; None for ``eager``), ``estimate``
    (``f(shape, spec, *, structure, params, causal) -> (tile config, Estimate)``), ``export`` (``"attention"``
    or ``"original"``, see the module docstring) and ``defaults`` (its settings, every key)."""

    name: str
    exact: bool
    module: str | None
    estimate: Callable[..., tuple[dict[str, int], Estimate]]
    export: str
    defaults: Mapping[str, int]

    @property
    def fused(self) -> bool:
        """True for a kernel family (a value of ``options["kernels"]``), False for the unfused ``eager``."""
        return self.module is not None


def _family(name: str, exact: bool, module: str | None, export: str, **defaults: int) -> Family:
    return Family(name, exact, module, getattr(estimates, name), export, MappingProxyType(defaults))


FAMILIES: Mapping[str, Family] = MappingProxyType({f.name: f for f in (
    _family("flash", True, "attnfuse.kernels.flash", "attention"),
    _family("window", True, "attnfuse.kernels.window", "attention"),
    _family("blocksparse", True, "attnfuse.kernels.blocksparse", "attention"),
    _family("sdpa", True, "attnfuse.kernels.sdpa", "attention"),
    _family("flex", True, "attnfuse.kernels.flex", "original"),
    _family("tpa", True, "attnfuse.kernels.tpa", "original"),
    _family("topk", False, "attnfuse.kernels.topk", "original", topk=2048, block=64, sink=64, local=256),
    # `attnfuse.kernels.lsh.DEFAULTS` as the planner layer writes them out (`lshknobs`: it imports no kernel)
    _family("lsh", False, "attnfuse.kernels.lsh", "original", **lshknobs.DEFAULTS),
    _family("eager", True, None, "original"),
)})

KERNELS = tuple(name for name, f in FAMILIES.items() if f.fused)  # the values options["kernels"] allows
EXACT = tuple(name for name in KERNELS if FAMILIES[name].exact)
APPROXIMATE = tuple(name for name in KERNELS if not FAMILIES[name].exact)
EXPORT_ORIGINAL = tuple(name for name in KERNELS if FAMILIES[name].export == "original")
PYTORCH_KERNELS = ("sdpa", "flex")  # PyTorch's kernels as candidates (the op's ``impl``), not attnfuse's own


def kernel_module(name: str) -> ModuleType:
    """The module of family ``name``'s kernels (``attention``, and ``forward`` / ``backward`` for the
    approximate ones), imported now.  KeyError for an unknown name; ValueError for ``eager``."""
    module = FAMILIES[name].module
    if module is None:
        raise ValueError(f"attnfuse: {name!r} is the unfused graph and has no kernel module; kernel families: "
                         f"{', '.join(KERNELS)}")
    return importlib.import_module(module)

