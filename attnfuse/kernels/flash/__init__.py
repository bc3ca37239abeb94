"""Exact FlashAttention in Triton: forward, split-K decode forward, backward.

Implements FlashAttention-2 (Dao, 2023): the forward streams key tiles through
an online softmax in the base-2 domain (``exp2`` with ``scale * log2(e)``
folded into the scores) and saves each row's statistics (max and log2 of the
sum, kept apart so that a ``finfo.min`` max cannot round the sum away); the
backward recomputes the probabilities from them after a preprocessing pass
``delta = rowsum(O * dO)``.
Semantics are exactly `attnfuse.kernels.reference` (softcap, bool mask with a
fill value, additive bias, top-left causal, GQA, NaN rows for fully masked
rows), with one difference: dropout draws its keep mask from Philox keyed by
``(seed, batch*heads + head, row*kv_len + col)``, so it is reproducible on
every device and across the split-K path, but not the CPU reference's stream.
The same kernels also run ALiBi (``s += slope[h] * (j - i)`` after softcap),
a sliding-window band (`attnfuse.kernels.window`) and constant block-sparse
masks from a tile map (`attnfuse.kernels.blocksparse`): compile-time modes
that change which tiles a program visits, not how a tile is computed.  A padded
window (``window_pad``: the ``unfold`` spelling's zero keys, see
`attnfuse.kernels.reference`) only changes a row's initial softmax state.

Layout choices:

* GQA is packed: one program owns a block of (query row, head-in-group) pairs
  of one K/V head, so every K/V tile is read once per group; with
  ``kv_groups == 1`` this is the usual one-head-per-program kernel.
* Causal programs run an unmasked loop over the key tiles left of the diagonal
  and a masked loop over the diagonal tiles; tiles right of it are skipped.
  Band programs run a masked stage on each edge of the band around an unmasked
  middle and skip the rest; block-sparse programs walk their map row (full
  tiles unmasked with no mask read, then partial tiles masked).  The backward's
  key-tile programs visit the query tiles the same way, transposed.
* Bounds checks are compiled out when lengths divide the tiles
  (``EVEN_M``/``EVEN_N``/``EVEN_D``).
* The mask is read through its own (possibly zero) strides: a broadcast bias is
  never expanded in memory.
* Decode (few query rows, long K/V) splits the keys over extra programs
  (flash-decoding) and merges the partial results by their row statistics.

Limitations: head dims up to 256; float16/bfloat16/float32 (float32 uses IEEE
fp32 dots, not TF32, to keep the accuracy contract); a causal forward whose V
holds NaN/Inf visits every tile (eager's ``0 * nan`` must reach the output) but
the backward does not replay that NaN pattern, and a band or block map reaches
NaN/Inf in V outside it only in the tiles it visits; under a band or map, a row
with no visible key gets eager's masked_fill gradients (dQ 0, NaN in all of dV
of its K/V head); for a row with exactly one visible key, dQ/dK carry fp32
rounding of ``delta`` where eager is exactly 0; the dropout offsets wrap when
``q_len * kv_len >= 2**32``; block-sparse launches are never split over keys.

Modules: `_jit` (the jit helpers both directions share), `fwd` (forward and split-K combine kernels), `bwd`
(backward preprocess, shared backward tile math, dK/dV kernel), `bwd_dq` (the dQ kernel), `launcher`
(`forward`/`backward`: argument marshalling, tile choice, grids); this module holds the autograd API.
"""

from __future__ import annotations

import torch

from ...costmodel.tiles import TileConfig
from .. import _family, validate
from ._jit import philox_word
from .bwd import bwd_dkdv_kernel, bwd_preprocess
from .bwd_dq import bwd_dq_kernel
from .fwd import combine_kernel, fwd_kernel
from .launcher import MASK_BIAS, MASK_BIAS_FLOOR, MASK_BOOL, MASK_BOOL_FILL, MASK_NONE, backward, forward

__all__ = ["MASK_BIAS", "MASK_BIAS_FLOOR", "MASK_BOOL", "MASK_BOOL_FILL", "MASK_NONE", "TileConfig", "attention",
           "autograd_attention", "backward", "bwd_dkdv_kernel", "bwd_dq_kernel", "bwd_preprocess", "combine_kernel",
           "forward", "fwd_kernel", "philox_word"]


class _Flash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, seed, kwargs, deterministic, config):
        out, stats = forward(q, k, v, mask, seed, config=config, **kwargs)
        ctx.save_for_backward(q, k, v, out, stats, mask, seed)
        ctx.kwargs, ctx.deterministic, ctx.config = kwargs, deterministic, config
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, stats, mask, seed = ctx.saved_tensors
        mask_grad = mask is not None and ctx.needs_input_grad[3]
        kwargs = {key: val for key, val in ctx.kwargs.items() if key != "splits"}
        dq, dk, dv, dm = backward(grad, q, k, v, out, stats, mask, seed, mask_grad=mask_grad,
                                  deterministic=ctx.deterministic, config=ctx.config, **kwargs)
        return dq, dk, dv, dm, None, None, None, None


def autograd_attention(family: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       seed: int | torch.Tensor | None, deterministic: bool | None, config: TileConfig | None,
                       **kwargs) -> torch.Tensor:
    """Validate, settle the dropout seed and run `forward`/`backward` under autograd with ``kwargs``: the body of
    every exact kernel family's ``attention`` (``family`` names it in error messages).  CPU tensors outside the
    Triton interpreter (or in a dtype / head dim the kernels do not take) run the op's CPU implementation
    instead, with the same keywords (`attnfuse.kernels._family`)."""
    who = f"attnfuse.kernels.{family}.attention"
    validate.qkv(who, q, k, v)
    dropout_p = kwargs.get("dropout_p", 0.0)
    validate.dropout_p(who, dropout_p)
    alibi = kwargs.get("alibi")
    if alibi is not None and alibi.requires_grad:
        raise ValueError(f"{who}: ALiBi slopes are constants and get no gradient; pass alibi.detach()")
    if dropout_p == 0:
        seed = None  # unused; an int seed would also reach save_for_backward, which takes tensors only
    elif not isinstance(seed, torch.Tensor):
        seed = torch.tensor(int(torch.randint(0, 2**62, ())) if seed is None else seed, dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device=q.device, dtype=torch.int64).reshape(())
    if not _family.triton_runs(q, k, v, who):
        return _family.exact_on_cpu(q, k, v, mask, seed, **kwargs)
    return _Flash.apply(q, k, v, mask, seed, kwargs, deterministic is not False, config)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
              scale: float | None = None, causal: bool = False, softcap: float = 0.0, dropout_p: float = 0.0,
              seed: int | torch.Tensor | None = None, mask_fill: float | None = None,
              deterministic: bool | None = None, config: TileConfig | None = None,
              splits: int | None = None) -> torch.Tensor:
    """FlashAttention on ``(batch, heads, seqlen, head_dim)`` tensors, with autograd.

    K/V may have fewer heads (GQA/MQA: ``kv_groups = heads // kv_heads``).  ``mask`` broadcasts to
    ``(batch, heads, q_len, kv_len)``: bool keeps True (others become ``mask_fill``, default -inf),
    float is added to the scores (and gets a gradient if it requires one).  ``seed`` seeds dropout
    (default: drawn from torch's generator).  ``deterministic`` (default True) computes dQ in its own pass,
    bitwise reproducible and, on an H100, 5-9x faster than ``False``, which adds dQ with fp32 atomics inside
    the dK/dV pass (benchmarks/results/bwd-sweep-h100-2026-11-23.json).  ``config``/``splits``
    override the tile choice and the number of key splits.  Sliding windows and ALiBi:
    `attnfuse.kernels.window`; constant block-sparse masks: `attnfuse.kernels.blocksparse`.

    Where it runs (`attnfuse.kernels._family`): CUDA tensors run the Triton kernels; CPU tensors run the op's
    CPU implementation (``torch.ops.attnfuse.attention``: PyTorch's fused CPU kernel or the blocked reference),
    float64 and head dims above 256 included; CPU tensors under ``TRITON_INTERPRET=1`` run the Triton kernels in
    the interpreter.  The keywords mean the same everywhere, except that CPU dropout draws another keep mask
    (same ``dropout_p``) and ``deterministic``/``config``/``splits`` only tune the Triton launch.
    """
    return autograd_attention("flash", q, k, v, mask, seed, deterministic, config, scale=scale, causal=causal,
                              softcap=softcap, dropout_p=dropout_p, mask_fill=mask_fill, splits=splits)
