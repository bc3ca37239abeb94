"""Sliding-window (local) attention: the flash kernels restricted to a band of keys, O(N * w) work.

Key j is visible from query i iff ``(left < 0 or j >= i - left) and (right < 0 or j <= i + right)``, top-left
aligned (i and j count from 0 whatever the lengths); ``causal`` folds in as right = 0.  A forward (and dQ)
program visits only the key tiles its rows' band touches -- a masked stage on the left edge, whole tiles
unmasked in the middle, a masked stage on the right edge (`flash._jit.band_keys`) -- and a dK/dV program only the
query tiles whose band touches its keys (`flash._jit.band_rows`), so both cost O(q_len * (left + right)) instead
of O(q_len * kv_len); `tiles_visited` counts the tiles for a cost model.  ALiBi, a dense mask or bias,
softcap, dropout and GQA combine with the band as in `flash`; decode-size query sides split a two-sided
band's keys over extra programs (flash-decoding).

Differences from eager, beyond `flash`'s: NaN/Inf in V outside the band reaches the output only where a
visited tile holds it (eager's ``0 * nan`` poisons every row; the plain causal path keeps that, a window does
not).  Rows with no visible key are NaN, and their gradients carry eager's NaN pattern.

``window_pad=True`` is the textbook ``unfold`` spelling of local attention, exactly::

    kp, vp = F.pad(k, (0, 0, left, right)), F.pad(v, (0, 0, left, right))   # zero rows around the sequence
    s = (q.unsqueeze(3) @ kp.unfold(2, W, 1)) * scale                        # W = left + right + 1 keys per row
    out = (s.softmax(-1) @ vp.unfold(2, W, 1).transpose(-2, -1)).squeeze(3)

whose zero rows are keys of score 0 and value 0: query i also sees the band's positions outside [0, L) (see
`attnfuse.kernels.reference`).  The kernels start each such row's online softmax at m = 0, l = n_pad instead of
(-inf, 0); the backward is unchanged.  It needs both widths (or ``causal``) and q_len == kv_len.
"""

from __future__ import annotations

import torch

from ..costmodel.tiles import TileConfig, tiles_visited
from . import flash
from .reference import window_pad_error

__all__ = ["attention", "tiles_visited"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window_size: tuple[int, int],
              causal: bool = False,
              alibi: torch.Tensor | None = None, mask: torch.Tensor | None = None, scale: float | None = None,
              softcap: float = 0.0, dropout_p: float = 0.0, seed: int | torch.Tensor | None = None,
              mask_fill: float | None = None, deterministic: bool | None = None,
              config: TileConfig | None = None, window_pad: bool = False) -> torch.Tensor:
    """Sliding-window attention on ``(batch, heads, seqlen, head_dim)`` tensors, with autograd.

    ``window_size=(left, right)``: the band's half-widths (-1: unbounded), ``causal`` caps right at 0.
    ``alibi``: (heads,) slopes adding ``slope[h] * (j - i)`` to the scores (a constant: no gradient).
    ``mask``, ``scale``, ``softcap``, ``dropout_p``, ``seed``, ``mask_fill``, ``deterministic``, ``config`` as in
    `flash.attention`.  ``window_pad``: the ``unfold`` spelling's zero-padded keys (module docstring): each row
    also sees ``n_pad(i)`` keys of score 0 and value 0; needs a finite band and q_len == kv_len.
    Runs where `flash.attention` does: the Triton kernels on CUDA tensors (and CPU ones under
    ``TRITON_INTERPRET=1``), the op's band-tiled CPU implementation (`attnfuse.kernels.tiled`) on other CPU tensors.
    """
    left, right = _window_size(window_size)
    if not isinstance(window_pad, bool):
        raise ValueError(f"attnfuse.kernels.window.attention: window_pad must be True or False; got {window_pad!r}")
    if window_pad:
        why = window_pad_error(left, right, causal, q.shape[-2], k.shape[-2], alibi=alibi is not None)
        if why:
            raise ValueError(f"attnfuse.kernels.window.attention: {why}")
    return flash.autograd_attention("window", q, k, v, mask, seed, deterministic, config, scale=scale,
                                    causal=causal, softcap=softcap, dropout_p=dropout_p, mask_fill=mask_fill,
                                    alibi=alibi, window_size=(left, right), window_pad=window_pad)


def _window_size(window_size) -> tuple[int, int]:
    ok = isinstance(window_size, (tuple, list)) and len(window_size) == 2
    if not ok or not all(isinstance(x, int) and not isinstance(x, bool) and x >= -1 for x in window_size):
        raise ValueError(f"attnfuse.kernels.window.attention: window_size must be (left, right), two ints >= -1 "
                         f"(-1: unbounded); got {window_size!r}")
    return int(window_size[0]), int(window_size[1])
