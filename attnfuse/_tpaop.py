"""``torch.ops.attnfuse.tpa_attention``: the ``tpa`` family as one registered op (`attnfuse.kernels.tpa`).

``attnfuse::tpa_attention(q, q_a, q_b, k, k_a, k_b, v, v_a, v_b, key_mask=None, *, q_scale, k_scale, v_scale,
scale, causal=False, softcap=0.0, window_left=-1, window_right=-1, kv_groups=1, mask_fill=None,
sdpa_form=False) -> out``

Each side is given either plain (``q`` as (B, H, L, D), its ``q_a``/``q_b`` None) or as factors (``q`` None,
``q_a`` (B, L, H, R), ``q_b`` (B, L, R, D), standing for ``q_scale * q_a @ q_b`` per token); likewise k and v.
The other arguments and the semantics are `attnfuse.kernels.tpa.attention`'s.  ``out`` is (B, H, Lq, Dv) in the
query's dtype.

One op, so ``torch.export`` keeps it whole and Inductor treats it as one kernel call.  Its backward,
``attnfuse::tpa_attention_backward``, recomputes the forward under autograd and differentiates it (the family's
own backward: per key block on the CPU, the Triton backward on CUDA), so nothing but the inputs is saved; the
price is one more forward in the backward.  Gradients reach every tensor of every side, not the key mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .kernels import tpa
from .kernels.tpa import Factors

__all__ = ["SIDE_ARGS", "sides", "tpa_attention"]

SIDE_ARGS = ("q", "q_a", "q_b", "k", "k_a", "k_b", "v", "v_a", "v_b")


def sides(tensors: Sequence[torch.Tensor | None], scales: Sequence[float]) -> list[Any]:
    """The (q, k, v) sides of the op's nine side arguments (a plain tensor, or `Factors`)."""
    out = []
    for i, scale in enumerate(scales):
        plain, a, b = tensors[3 * i: 3 * i + 3]
        if (plain is None) == (a is None or b is None) or (a is None) != (b is None):
            name = "qkv"[i]
            raise ValueError(f"attnfuse.tpa_attention: side {name} needs either {name} alone or both {name}_a and "
                             f"{name}_b; got {name}={'set' if plain is not None else None}, {name}_a="
                             f"{'set' if a is not None else None}, {name}_b={'set' if b is not None else None}")
        out.append(plain if plain is not None else Factors(a, b, float(scale)))
    return out


def _kw(scale, causal, softcap, window_left, window_right, kv_groups, mask_fill, sdpa_form) -> dict[str, Any]:
    return {"scale": scale, "causal": causal, "softcap": softcap, "window_left": window_left,
            "window_right": window_right, "kv_groups": kv_groups, "mask_fill": mask_fill, "sdpa_form": sdpa_form}


@torch.library.custom_op("attnfuse::tpa_attention", mutates_args=())
def tpa_attention(q: torch.Tensor | None, q_a: torch.Tensor | None, q_b: torch.Tensor | None,
                  k: torch.Tensor | None, k_a: torch.Tensor | None, k_b: torch.Tensor | None,
                  v: torch.Tensor | None, v_a: torch.Tensor | None, v_b: torch.Tensor | None,
                  key_mask: torch.Tensor | None = None, *, q_scale: float = 1.0, k_scale: float = 1.0,
                  v_scale: float = 1.0, scale: float = 1.0, causal: bool = False, softcap: float = 0.0,
                  window_left: int = -1, window_right: int = -1, kv_groups: int = 1,
                  mask_fill: float | None = None, sdpa_form: bool = False) -> torch.Tensor:
    qs, ks, vs = sides((q, q_a, q_b, k, k_a, k_b, v, v_a, v_b), (q_scale, k_scale, v_scale))
    with torch.no_grad():
        out = tpa.attention(qs, ks, vs, key_mask, **_kw(scale, causal, softcap, window_left, window_right,
                                                       kv_groups, mask_fill, sdpa_form))
    return out.contiguous()


def _out_shape(q, q_a, q_b, v, v_b) -> tuple[tuple[int, ...], torch.dtype]:
    if q is not None:
        batch, heads, lq, dtype = q.shape[0], q.shape[1], q.shape[2], q.dtype
    else:
        batch, lq, heads, dtype = q_a.shape[0], q_a.shape[1], q_a.shape[2], q_a.dtype
    dv = v.shape[-1] if v is not None else v_b.shape[-1]
    return (batch, heads, lq, dv), dtype


@tpa_attention.register_fake
def _(q, q_a, q_b, k, k_a, k_b, v, v_a, v_b, key_mask=None, *, q_scale=1.0, k_scale=1.0, v_scale=1.0, scale=1.0,
      causal=False, softcap=0.0, window_left=-1, window_right=-1, kv_groups=1, mask_fill=None, sdpa_form=False):
    shape, dtype = _out_shape(q, q_a, q_b, v, v_b)
    like = next(t for t in (q, q_a) if t is not None)
    return like.new_empty(shape, dtype=dtype)


@torch.library.custom_op("attnfuse::tpa_attention_backward", mutates_args=())
def tpa_attention_backward(grad: torch.Tensor, q: torch.Tensor | None, q_a: torch.Tensor | None,
                           q_b: torch.Tensor | None, k: torch.Tensor | None, k_a: torch.Tensor | None,
                           k_b: torch.Tensor | None, v: torch.Tensor | None, v_a: torch.Tensor | None,
                           v_b: torch.Tensor | None, key_mask: torch.Tensor | None, q_scale: float, k_scale: float,
                           v_scale: float, scale: float, causal: bool, softcap: float, window_left: int,
                           window_right: int, kv_groups: int, mask_fill: float | None,
                           sdpa_form: bool) -> list[torch.Tensor]:
    """The gradients of the nine side arguments (zeros of shape (0,) for an absent one)."""
    given = (q, q_a, q_b, k, k_a, k_b, v, v_a, v_b)
    leaves = [None if t is None else t.detach().requires_grad_() for t in given]
    qs, ks, vs = sides(leaves, (q_scale, k_scale, v_scale))
    with torch.enable_grad():
        out = tpa.attention(qs, ks, vs, key_mask, **_kw(scale, causal, softcap, window_left, window_right,
                                                       kv_groups, mask_fill, sdpa_form))
        used = [t for t in leaves if t is not None]
        got = iter(torch.autograd.grad(out, used, grad, allow_unused=True))
    result = []
    for t in leaves:
        if t is None:
            result.append(grad.new_empty(0))
            continue
        g = next(got)
        result.append(torch.zeros_like(t) if g is None else g.to(t.dtype))
    return result


@tpa_attention_backward.register_fake
def _(grad, q, q_a, q_b, k, k_a, k_b, v, v_a, v_b, key_mask, q_scale, k_scale, v_scale, scale, causal, softcap,
      window_left, window_right, kv_groups, mask_fill, sdpa_form):
    return [grad.new_empty(0) if t is None else torch.empty_like(t) for t in (q, q_a, q_b, k, k_a, k_b, v, v_a, v_b)]


_KW = ("q_scale", "k_scale", "v_scale", "scale", "causal", "softcap", "window_left", "window_right", "kv_groups",
       "mask_fill", "sdpa_form")


def _setup_context(ctx, inputs, keyword_only_inputs, output) -> None:
    ctx.save_for_backward(*inputs[:10])
    ctx.kw = [keyword_only_inputs[name] for name in _KW]


def _backward(ctx, grad):
    saved = ctx.saved_tensors
    grads = torch.ops.attnfuse.tpa_attention_backward(grad.contiguous(), *saved, *ctx.kw)
    return (*(None if t is None else g for g, t in zip(grads, saved[:9])), None)


tpa_attention.register_autograd(_backward, setup_context=_setup_context)
