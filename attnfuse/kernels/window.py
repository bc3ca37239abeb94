"""Sliding-window (local) attention: the flash kernels restricted to a band of keys, O(N * w) work.

Key j is visible from query i iff ``(left < 0 or j >= i - left) and (right < 0 or j <= i + right)``, top-left
aligned (i and j count from 0 whatever the lengths); ``causal`` folds in as right = 0.  A forward (and dQ)
program visits only the key tiles its rows' band touches -- a masked stage on the left edge, whole tiles
unmasked in the middle, a masked stage on the right edge (`flash._band_keys`) -- and a dK/dV program only the
query tiles whose band touches its keys (`flash._band_rows`), so both cost O(q_len * (left + right)) instead
of O(q_len * kv_len); `tiles_visited` counts the tiles for a cost model.  ALiBi, a dense mask or bias,
softcap, dropout and GQA combine with the band as in `flash`; decode-size query sides split a two-sided
band's keys over extra programs (flash-decoding).

Differences from eager, beyond `flash`'s: NaN/Inf in V outside the band reaches the output only where a
visited tile holds it (eager's ``0 * nan`` poisons every row; the plain causal path keeps that, a window does
not).  Rows with no visible key are NaN, and their gradients carry eager's NaN pattern.
"""

from __future__ import annotations

import torch

from . import flash
from .flash import tiles_visited

__all__ = ["attention", "tiles_visited"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window_size: tuple[int, int],
              causal: bool = False,
              alibi: torch.Tensor | None = None, mask: torch.Tensor | None = None, scale: float | None = None,
              softcap: float = 0.0, dropout_p: float = 0.0, seed: int | torch.Tensor | None = None,
              mask_fill: float | None = None, deterministic: bool | None = None,
              config: flash.TileConfig | None = None) -> torch.Tensor:
    """Sliding-window attention on ``(batch, heads, seqlen, head_dim)`` tensors, with autograd.

    ``window_size=(left, right)``: the band's half-widths (-1: unbounded), ``causal`` caps right at 0.
    ``alibi``: (heads,) slopes adding ``slope[h] * (j - i)`` to the scores (a constant: no gradient).
    ``mask``, ``scale``, ``softcap``, ``dropout_p``, ``seed``, ``mask_fill``, ``deterministic``, ``config`` as in
    `flash.attention`.
    """
    left, right = _window_size(window_size)
    return flash.autograd_attention("window", q, k, v, mask, seed, deterministic, config, scale=scale,
                                    causal=causal, softcap=softcap, dropout_p=dropout_p, mask_fill=mask_fill,
                                    alibi=alibi, window_size=(left, right))


def _window_size(window_size) -> tuple[int, int]:
    ok = isinstance(window_size, (tuple, list)) and len(window_size) == 2
    if not ok or not all(isinstance(x, int) and not isinstance(x, bool) and x >= -1 for x in window_size):
        raise ValueError(f"attnfuse.kernels.window.attention: window_size must be (left, right), two ints >= -1 "
                         f"(-1: unbounded); got {window_size!r}")
    return int(window_size[0]), int(window_size[1])
