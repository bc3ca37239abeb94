"""Block-sparse attention for constant masks: a tile map that lets the flash kernels skip what the mask removes.

A constant mask (a registered buffer, a static pattern) decides tile by tile what a kernel program does: an
empty tile (every entry masked) is skipped, a full tile (every entry kept; for an additive mask, every entry
exactly 0.0) is computed with no mask read and no masking, and a partial tile reads the mask.  The map
(`TileMap`, built and cached by `tile_map`; layout in `attnfuse.kernels.tilemap`) is built on the mask's device
with torch ops (no host sync, so it also traces) and cached per mask tensor (identity and ``_version``: an
in-place update rebuilds it) and launch shape.  A band (``window``, causal folded in as right = 0) is
intersected into the classification, and the kernels apply it inside partial tiles.

Semantics: masked entries (False, or <= finfo(dtype).min) are -inf whatever ``mask_fill`` says, so a row with
every entry masked is NaN, as eager with -inf fills (the op layer handles finite fills); the mask gets no
gradient; the forward is never split over keys.
"""

from __future__ import annotations

import torch

from ..costmodel import tiles
from . import flash
from .tilemap import TileMap, listing, tile_map

__all__ = ["TileMap", "attention", "listing", "tile_map"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, causal: bool = False,
              window_size: tuple[int, int] = (-1, -1), alibi: torch.Tensor | None = None, scale: float | None = None,
              softcap: float = 0.0, dropout_p: float = 0.0, seed: int | torch.Tensor | None = None,
              deterministic: bool | None = None, config: tiles.TileConfig | None = None) -> torch.Tensor:
    """Attention under a constant ``mask`` on ``(batch, heads, seqlen, head_dim)`` tensors, with autograd, skipping
    the mask's empty tiles and reading it only in partial ones.

    ``mask``: bool (True keeps) or additive (entries <= finfo(dtype).min, -inf included, are masked), any shape
    broadcastable to (batch, heads, q_len, kv_len); a constant (no gradient).  ``causal``/``window_size``: a
    band on top (as `attnfuse.kernels.window`), ``alibi``: (heads,) slopes; the rest as `flash.attention`.
    Runs where `flash.attention` does: the Triton kernels on CUDA tensors (and CPU ones under
    ``TRITON_INTERPRET=1``), the op's tile-skipping CPU implementation (`attnfuse.kernels.tiled`) on other CPU
    tensors, with the same -inf meaning of the masked entries.
    """
    if mask.requires_grad:
        raise ValueError("attnfuse.kernels.blocksparse.attention: the mask is a constant and gets no gradient; "
                         "pass mask.detach() (or flash.attention for a learned bias)")
    return flash.autograd_attention("blocksparse", q, k, v, mask, seed, deterministic, config, scale=scale,
                                    causal=causal, softcap=softcap, dropout_p=dropout_p, alibi=alibi,
                                    window_size=tuple(window_size), block_sparse=True)
