"""The ``window_pad=True`` tests' reference, shared by the CPU path (test_window_pad_cpu.py) and the Triton
window kernels (test_window_pad_interpret.py): `unfold_attention`, the textbook ``unfold`` spelling of local
attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def unfold_attention(q, k, v, left, right, *, scale=None, softcap=0.0, keep=None, mask_fill=-math.inf):
    """Local attention as the textbook writes it: K/V padded with ``left``/``right`` zero rows, a window of
    W = left + right + 1 of them per query by ``unfold``, softmax over the window.  GQA repeats K/V heads.
    ``keep``: a (B, L) bool key mask, padded with True as K/V are padded with zeros (it masks real keys only)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    w = left + right + 1
    kp, vp = F.pad(k, (0, 0, left, right)), F.pad(v, (0, 0, left, right))  # zero rows before/after the sequence
    kw = kp.unfold(2, w, 1).transpose(-2, -1)  # (B, H, L, W, D): query i sees padded rows i .. i + W - 1
    vw = vp.unfold(2, w, 1).transpose(-2, -1)
    s = (q.unsqueeze(3) @ kw.transpose(-2, -1)) * scale  # (B, H, L, 1, W)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if keep is not None:
        kept = F.pad(keep.to(torch.int8), (left, right), value=1).unfold(-1, w, 1).bool()  # (B, L, W)
        s = s.masked_fill(~kept[:, None, :, None, :], mask_fill)
    return (s.softmax(-1) @ vw).squeeze(3)
