"""The op's ``impl`` argument: which implementation runs a fused site, when it is not attnfuse's own kernels.

``impl`` is decided once, by the plan (`attnfuse.costmodel.plan`, or measured: `attnfuse.autotune`), and carried
by ``attnfuse::attention`` like its ``tiles``:

* ``""``: attnfuse's own kernels (Triton on CUDA / under the interpreter, the CPU paths of `attnfuse.kernels.cpu`);
* ``"sdpa:<backend>"``: PyTorch's ``scaled_dot_product_attention`` kernel of that backend (``flash``, ``efficient``,
  ``cudnn`` on CUDA; ``cpu``: the fused flash-attention CPU kernel), forward and backward through PyTorch's own
  kernels (`attnfuse.kernels.sdpa`);
* ``"flex"``: FlexAttention, compiled, with the mask the analysis proved as its ``mask_mod`` / ``score_mod`` and
  ``BlockMask`` (`attnfuse.kernels.flex`); the only implementation that takes ``doc`` (packed documents, prefix-LM).

Each implementation keeps eager's semantics itself: per call, inputs it would compute differently (non-finite
values, rows with no visible key where its convention differs) take its exact path instead.  The op stays one
opaque node under ``torch.compile`` when ``impl`` is set (its implementation chooses per call, and FlexAttention is
compiled inside it).
"""

from __future__ import annotations

import contextlib
import importlib
from types import ModuleType
from typing import Any

import torch

__all__ = ["IMPLS", "backward", "check", "family", "forward", "stats_like"]

IMPLS = ("sdpa:flash", "sdpa:efficient", "sdpa:cudnn", "sdpa:cpu", "flex")
_WHO = "attnfuse.attention"


def family(impl: str) -> str:
    """The kernel family (as in the report) of an ``impl`` value: "" -> "", "sdpa:flash" -> "sdpa", "flex"."""
    return impl.split(":", 1)[0]


def check(impl: str, doc: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, *, approx: str,
          window_pad: bool, dropout_p: float, softcap: float = 0.0, alibi: torch.Tensor | None = None,
          window_left: int = -1, window_right: int = -1, block_sparse: bool = False) -> None:
    """Raise ValueError (``"attnfuse.attention: ..."``) for an ``impl`` / ``doc`` the op does not take."""
    if impl and impl not in IMPLS:
        raise ValueError(f"{_WHO}: impl={impl!r} is not an implementation; allowed: '' (attnfuse's kernels), "
                         + ", ".join(repr(i) for i in IMPLS))
    if impl and (approx or window_pad or dropout_p):
        what = "approx" if approx else "window_pad=True" if window_pad else "dropout_p > 0"
        raise ValueError(f"{_WHO}: impl={impl!r} does not combine with {what}; use impl='' (attnfuse's kernels)")
    sdpa_lacks = [name for name, given in (("softcap", softcap != 0), ("alibi", alibi is not None),
                                           ("a window band", window_left >= 0 or window_right >= 0),
                                           ("block_sparse=True", block_sparse)) if given]
    if family(impl) == "sdpa" and sdpa_lacks:
        raise ValueError(f"{_WHO}: impl={impl!r} (PyTorch's SDPA) has no {', '.join(sdpa_lacks)}; use impl='flex' "
                         f"or impl='' (attnfuse's kernels)")
    if doc is None:
        return
    if impl != "flex":
        raise ValueError(f"{_WHO}: doc (packed documents / prefix-LM) runs in FlexAttention only; pass "
                         f"impl='flex', or fold the document mask into mask")
    b, lq, lk = q.shape[0], q.shape[-2], k.shape[-2]
    if doc.dim() != 3 or doc.shape[1] != 2 or doc.shape[0] not in (1, b) or doc.shape[2] != lq or lq != lk \
            or doc.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{_WHO}: doc must be an int64 (batch, 2, seq_len) tensor with q_len == kv_len "
                         f"(row 0: segment ids, row 1: prefix-key flags); got {tuple(doc.shape)} {doc.dtype} with "
                         f"q_len={lq}, kv_len={lk}")


def _module(impl: str) -> ModuleType:
    return importlib.import_module(f"attnfuse.kernels.{family(impl)}")


def _backend(impl: str) -> dict[str, str]:
    return {"backend": impl.split(":", 1)[1]} if impl.startswith("sdpa:") else {}


def stats_like(impl: str, q: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped like the implementation's ``stats`` output (the op's fake)."""
    module = _module(impl)
    return module.stats_like(q, **_backend(impl)) if family(impl) == "sdpa" else module.stats_like(q)


def _flex_kw(kw: dict[str, Any]) -> dict[str, Any]:
    return {name: kw[name] for name in ("scale", "causal", "softcap", "kv_groups", "mask_fill", "window_left",
                                        "window_right", "block_sparse")}


def _sdpa_kw(kw: dict[str, Any]) -> dict[str, Any]:
    return {name: kw[name] for name in ("scale", "causal", "kv_groups", "mask_fill")}


@contextlib.contextmanager
def _functorch_on():
    """functorch's transforms enabled again: a compiled graph runs with them excluded (AOTAutograd's runtime
    wrapper, ``torch._C._DisableFuncTorch``), and FlexAttention's ``BlockMask`` builds its query-side indices
    with ``vmap``."""
    keys = tuple(getattr(torch._C.DispatchKey, name) for name in ("FuncTorchDynamicLayerFrontMode",
                                                                   "FuncTorchDynamicLayerBackMode"))
    saved = [torch._C._dispatch_tls_is_dispatch_key_excluded(key) for key in keys]
    try:
        for key in keys:
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
        yield
    finally:
        for key, was in zip(keys, saved):
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, was)


def forward(impl: str, q, k, v, mask, alibi, doc, kw: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, stats) of ``impl`` on checked arguments; ``kw`` holds the op's keywords."""
    if family(impl) == "flex":
        with _functorch_on():
            return _module(impl).forward(q, k, v, mask, doc, alibi, **_flex_kw(kw))
    return _module(impl).forward(q, k, v, mask, **_backend(impl), **_sdpa_kw(kw))


def backward(impl: str, grad_out, q, k, v, out, stats, mask, alibi, doc, kw: dict[str, Any],
             mask_grad: bool) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv, dmask or None) of ``impl``, from its forward's ``out`` and ``stats``."""
    if family(impl) == "flex":
        with _functorch_on():
            return _module(impl).backward(grad_out, q, k, v, out, stats, mask, doc, alibi, **_flex_kw(kw),
                                          mask_grad=mask_grad)
    return _module(impl).backward(grad_out, q, k, v, out, stats, mask, **_backend(impl), **_sdpa_kw(kw),
                                  mask_grad=mask_grad)
