"""Per call: whether an SDPA kernel computes these inputs exactly as `attnfuse.kernels.reference` does, decided
with one host read (`plan`), and whether its backward may run (`backward_exact`).

What differs from the reference, and what runs instead (the package docstring has the list):

* NaN/Inf in q, k, v, or NaN/+Inf in a float mask: the fused kernels skip masked tiles, where eager multiplies
  0 * NaN; the reference runs.
* Rows with no visible key: under a -inf fill the kernels give 0 (or NaN) where eager gives NaN: the kernel runs
  and those rows are set to NaN.  Under a finite fill eager is uniform over the fill: the kernel runs with the
  fill as an additive bias where ``s + fill == fill`` exactly for every score (|s| bounded by
  ``|scale| * max|q_i| * max|k_j|``), else the reference.  Their gradients take the reference backward.
* A finite fill elsewhere: masked keys add ``exp(fill - max)`` to each row's sum; the kernel (masked keys at
  -inf) is exact where ``fill + bound < -120`` (that term is 0 in float32 and below 1e-52 in float64).
* Causal with q_len != kv_len on flash / cuDNN (bottom-right aligned there), empty sequences, a mask the
  efficient kernel would need copied to N x N (one broadcast over the keys): the reference.

No N x N temporary beyond the caller's mask: the dead-row test of a key-vector mask under causal is a prefix
count over the keys.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..reference import compute_dtype
from . import _aten

__all__ = ["Plan", "backward_exact", "dead_rows", "plan"]

_INF = math.inf
_MARGIN = 120.0  # exp(-120) is 0 in float32 and below 1e-52 in float64


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `attnfuse.kernels.sdpa.forward` runs for one call."""

    kernel: bool  # the backend's kernel (False: the reference)
    fill: float = -_INF  # a bool mask's value in the kernel's additive bias
    dead: torch.Tensor | None = None  # rows to set to NaN after the kernel (bool, (..., Lq, 1))
    exact_backward: bool = True  # the kernel's backward computes these inputs' gradients exactly
    why: str = ""  # why the reference runs


def _reference(why: str) -> Plan:
    return Plan(kernel=False, exact_backward=False, why=why)


def dead_rows(mask: torch.Tensor, causal: bool, lq: int, lk: int) -> torch.Tensor:
    """Bool (..., Lq or 1, 1): the rows of ``mask`` (bool: True = keep; float: -inf = masked) with no visible key,
    causal (top-left) applied; temporaries no larger than the mask (a key vector stays a vector)."""
    mask = _aten.narrowed(_aten.as_4d(mask))
    keep = mask if mask.dtype == torch.bool else ~torch.isneginf(mask)
    if not causal:
        return ~keep.any(-1, keepdim=True)
    if keep.shape[-2] == 1:  # a key vector: row i sees keys 0..i, so it is dead iff none of them is kept
        counts = keep.cumsum(-1)
        rows = torch.arange(lq, device=keep.device).clamp_(max=lk - 1)
        return (counts.index_select(-1, rows) == 0).transpose(-1, -2)
    tril = torch.ones(lq, lk, dtype=torch.bool, device=keep.device).tril()
    return ~(keep & tril).any(-1, keepdim=True)


def _ulp(x: float, dtype: torch.dtype) -> float:
    if dtype == torch.float64:
        return math.ulp(x)
    return 2.0 ** (math.frexp(abs(x))[1] - 24)


def _score_bound(q: torch.Tensor, k: torch.Tensor, scale: float, acc: torch.dtype) -> torch.Tensor:
    """``|scale| * max_i |q_i| * max_j |k_j|`` (Euclidean norms over the head dim) >= every |score|."""
    qn = torch.linalg.vector_norm(q, dim=-1, dtype=acc).amax()
    kn = torch.linalg.vector_norm(k, dim=-1, dtype=acc).amax()
    return qn * kn * abs(scale)


def plan(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
         causal: bool, fill: float, scale: float) -> Plan:
    """What runs these inputs (see the module docstring); one host read at most."""
    lq, lk = q.shape[2], k.shape[2]
    if lq == 0 or lk == 0 or q.shape[0] == 0:
        return _reference("an empty sequence")
    if causal and lq != lk and backend in ("flash", "cudnn"):
        return _reference(f"causal with q_len {lq} != kv_len {lk} (the {backend} kernel aligns it bottom-right)")
    if not _aten.takes_bias(backend, mask, lk):
        return _reference(f"a mask of shape {tuple(mask.shape)} (the {backend} kernel would need it as N x N)")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    parts = [q.sum(dtype=acc) + k.sum(dtype=acc) + v.sum(dtype=acc)]
    float_mask = mask is not None and mask.dtype != torch.bool
    finite_fill = mask is not None and mask.dtype == torch.bool and fill != -_INF
    dead = None
    if float_mask:
        parts.append(mask.amax().to(acc))
    if mask is not None:
        dead = dead_rows(mask, causal, lq, lk)
        parts.append(dead.any().to(acc))
    if finite_fill:
        parts.append(_score_bound(q, k, scale, acc))
    vals = torch.stack(parts).tolist()  # the one host read
    if not math.isfinite(vals[0]):
        return _reference("NaN/Inf in q, k or v")
    if float_mask and (math.isnan(vals[1]) or vals[1] == _INF):
        return _reference("NaN/+Inf in the mask")
    any_dead = mask is not None and vals[1 + float_mask] > 0
    if finite_fill:
        bound = vals[-1]
        if not fill + bound < -_MARGIN:
            return _reference(f"mask_fill={fill} is within {_MARGIN} of the scores (|s| <= {bound:.3g})")
        if not any_dead:
            return Plan(kernel=True)
        biased = float(torch.tensor(fill, dtype=_aten.bias_dtype(backend, q.dtype)))  # as the bias holds it
        if math.isfinite(biased) and biased + bound < -_MARGIN and bound < _ulp(biased, compute_dtype(q.dtype)) / 4:
            return Plan(kernel=True, fill=biased, exact_backward=False)
        return _reference(f"rows with no visible key under mask_fill={fill} (scores up to {bound:.3g} would show "
                          f"through an additive fill)")
    if any_dead:
        return Plan(kernel=True, dead=dead, exact_backward=False)
    return Plan(kernel=True)


def backward_exact(stats: torch.Tensor, grad_out: torch.Tensor, lq: int) -> bool:
    """Whether the kernel's backward runs: the forward left finite statistics in ``stats`` (it marks its
    reference runs and dead rows with NaN) and ``grad_out`` is finite.  One host read."""
    acc = torch.float64 if torch.float64 in (stats.dtype, grad_out.dtype) else torch.float32
    total = stats.flatten(2)[..., :lq].sum(dtype=acc) + grad_out.detach().sum(dtype=acc)
    return math.isfinite(float(total))
