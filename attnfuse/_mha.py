"""``F.multi_head_attention_forward`` with the attention core as ``attnfuse::attention``.

Same signature and outputs as PyTorch's function; the attention weights are
returned as None (the matcher only rewrites calls whose weights are unused).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops


def _as_additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # PyTorch's MHA convention: bool True means "do not attend".
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def forward(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
            add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True, key_padding_mask=None,
            need_weights=True, attn_mask=None, use_separate_proj_weight=False, q_proj_weight=None,
            k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
            is_causal=False):
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]
    head_dim = embed_dim // num_heads
    if not use_separate_proj_weight:
        w_q, w_k, w_v = in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
    b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    q = F.linear(query, w_q, b_q).view(tgt_len, bsz, num_heads, head_dim).permute(1, 2, 0, 3)
    k = F.linear(key, w_k, b_k).view(src_len, bsz, num_heads, head_dim).permute(1, 2, 0, 3)
    v = F.linear(value, w_v, b_v).view(src_len, bsz, num_heads, head_dim).permute(1, 2, 0, 3)
    mask = _as_additive(attn_mask, q.dtype)
    if mask is not None and mask.dim() == 3:
        mask = mask.view(bsz, num_heads, tgt_len, src_len)
    kpm = _as_additive(key_padding_mask, q.dtype)
    if kpm is not None:
        kpm = kpm.view(bsz, 1, 1, src_len)
        mask = kpm if mask is None else mask + kpm
    p = dropout_p if training else 0.0
    seed = torch.randint(0, 2**62, (), dtype=torch.int64) if p > 0 else None
    out = ops.attention_sdpa(q, k, v, mask, seed, dropout_p=p)  # fully masked rows are 0, as in eager MHA
    out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias)
    return (out.squeeze(1) if unbatched else out), None
