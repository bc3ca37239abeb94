"""MLIR through torch-mlir's FX importer: every fused site as one attention op.

`save(ep, path, output_type)` decomposes ``attnfuse::attention`` into
``aten.scaled_dot_product_attention`` (`attnfuse.export._lower.sdpa_decomposition`: the band,
ALiBi and fills folded into its mask, GQA's K/V repeated to the query heads), keeps that op out of
torch-mlir's decomposition table, and imports:

* ``output_type="torch"``: one ``torch.aten.scaled_dot_product_attention`` per fused site;
* ``output_type="linalg-on-tensors"``: torch-mlir lowers each of them to one ``tm_tensor.attention``.

Sites with softcap or dropout (which SDPA lacks) were left as their original ops by the rewrite.
"""

from __future__ import annotations

import pathlib

import torch

OUTPUT_TYPES = ("torch", "linalg-on-tensors")


def require() -> None:
    """Raise an ImportError naming the extra when torch-mlir is missing."""
    try:
        import torch_mlir.fx  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"MLIR export needs torch-mlir ({exc.name} is missing): pip install 'attnfuse[mlir]'") \
            from None


def to_mlir(ep: torch.export.ExportedProgram, output_type: str = "torch") -> str:
    """The MLIR text of ``ep`` (rewritten by `attnfuse.rewrite`)."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"mlir_output={output_type!r}: allowed values are {', '.join(map(repr, OUTPUT_TYPES))}")
    require()
    from torch_mlir import fx
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    from ._lower import sdpa_decomposition

    ep = _persistent(ep.run_decompositions({torch.ops.attnfuse.attention.default: sdpa_decomposition}))
    table = {op: fn for op, fn in get_decomposition_table().items() if "scaled_dot_product" not in str(op)}
    return str(fx.export_and_import(ep, output_type=output_type, decomposition_table=table))


def _persistent(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``ep`` with its non-persistent buffers (kept in ``ep.constants``) moved into the state dict, where
    torch-mlir's importer looks up every buffer (it fails with "Could not find state mapping" otherwise)."""
    for spec in ep.graph_signature.input_specs:
        if spec.kind == torch.export.graph_signature.InputKind.BUFFER and not spec.persistent:
            ep.state_dict[spec.target] = ep.constants.pop(spec.target)
            spec.persistent = True
    return ep


def save(ep: torch.export.ExportedProgram, path: str | pathlib.Path, output_type: str = "torch") -> pathlib.Path:
    """Write ``ep``'s MLIR text at ``path``."""
    path = pathlib.Path(path)
    path.write_text(to_mlir(ep, output_type))
    return path
