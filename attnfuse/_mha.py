"""``F.multi_head_attention_forward`` and ``torch._transformer_encoder_layer_fwd`` with the attention core as
``attnfuse::attention``.

`forward` has the signature and outputs of PyTorch's function (plus ``tiles``, the plan's Triton tiles for the
op); the attention weights are returned as None
(the matcher only rewrites calls whose weights are unused).  ``bias_k``/``bias_v`` append one learned key/value
row, ``add_zero_attn`` one zero row, and the masks get a visible column for each, as PyTorch does;
``static_k``/``static_v`` replace the projected K/V.

`encoder_layer` is the inference fast path of ``nn.TransformerEncoderLayer`` (eval, no grad): the whole layer,
with the native op's semantics, which differ from the module's slow path:

* the mask is read as bool, whatever its dtype: a nonzero entry (``-inf``, but also any finite bias) hides
  the key; ``mask_type`` 0 is a ``(L, L)`` mask, 1 a ``(B, L)`` key padding mask, 2 one of the scores' shape;
* a query row with no visible key gives NaN on the CPU (``_masked_softmax``), which the op's bool mask
  with its -inf fill reproduces (the matcher fuses masked layers on the CPU only, see `passes/match.py`);
* ``use_gelu`` is the exact GELU (also for ``nn.GELU(approximate="tanh")``, which the module passes as gelu).
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


def _visible_column(mask: torch.Tensor | None) -> torch.Tensor | None:
    # one more key that every query sees: 0 in an additive mask (PyTorch pads with 0 after `_canonical_mask`)
    return None if mask is None else F.pad(mask, (0, 1))


def _heads(x: torch.Tensor, bsz: int, num_heads: int, head_dim: int) -> torch.Tensor:
    """(L, B, E) -> (B, H, L, D)."""
    return x.view(x.shape[0], bsz, num_heads, head_dim).permute(1, 2, 0, 3)


def _static(x: torch.Tensor, bsz: int, num_heads: int) -> torch.Tensor:
    """``static_k``/``static_v``: (B * H, S, D) -> (B, H, S, D)."""
    return x.view(bsz, num_heads, x.shape[1], x.shape[2])


def forward(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
            add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True, key_padding_mask=None,
            need_weights=True, attn_mask=None, use_separate_proj_weight=False, q_proj_weight=None,
            k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
            is_causal=False, *, tiles=""):
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    head_dim = embed_dim // num_heads
    if (bias_k is None) != (bias_v is None):
        raise AssertionError(f"bias_{'v' if bias_k is not None else 'k'} is None but its pair is set")
    if bias_k is not None and (static_k is not None or static_v is not None):
        raise AssertionError("bias cannot be added to static key or value.")
    if not use_separate_proj_weight:
        w_q, w_k, w_v = in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
    b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    q = _heads(F.linear(query, w_q, b_q), bsz, num_heads, head_dim)
    k, v = F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    # as PyTorch: with no key padding and no weights, is_causal replaces attn_mask by SDPA's top-left causal band
    # (which then hides the bias_k / zero rows from every query but the last ones), else attn_mask is applied
    causal = bool(is_causal) and key_padding_mask is None and not need_weights
    mask = None if causal else _as_additive(attn_mask, q.dtype)
    kpm = _as_additive(key_padding_mask, q.dtype)
    if bias_k is not None:  # one learned key/value row per batch entry, visible from every query
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        mask, kpm = _visible_column(mask), _visible_column(kpm)
    k = _heads(k, bsz, num_heads, head_dim) if static_k is None else _static(static_k, bsz, num_heads)
    v = _heads(v, bsz, num_heads, head_dim) if static_v is None else _static(static_v, bsz, num_heads)
    if add_zero_attn:  # a zero key (score 0) with a zero value, visible from every query
        zero = torch.zeros((bsz, num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zero], dim=2), torch.cat([v, zero.to(v.dtype)], dim=2)
        mask, kpm = _visible_column(mask), _visible_column(kpm)
    src_len = k.shape[2]
    if mask is not None and mask.dim() == 3:
        mask = mask.view(bsz, num_heads, tgt_len, src_len)
    if kpm is not None:
        kpm = kpm.view(bsz, 1, 1, src_len)
        mask = kpm if mask is None else mask + kpm
    p = dropout_p if training else 0.0
    seed = torch.randint(0, 2**62, (), dtype=torch.int64) if p > 0 else None
    # fully masked rows: 0, as eager
    out = ops.attention_sdpa(q, k, v, mask, seed, dropout_p=p, causal=causal, tiles=tiles)
    out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias)
    return (out.squeeze(1) if unbatched else out), None


def _native_keep(mask: torch.Tensor | None, mask_type: int | None, bsz: int, seq_len: int) -> torch.Tensor | None:
    """The fast path's mask as the op's bool keep mask, broadcast to (B, H, L, L)."""
    if mask is None:
        return None
    keep = ~mask.to(torch.bool)  # the native op's own conversion: any nonzero entry hides the key
    if mask_type == 0:
        return keep.view(1, 1, seq_len, seq_len)
    if mask_type == 1:
        return keep.view(bsz, 1, 1, seq_len)
    return keep


def encoder_layer(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu, norm_first,
                  layer_norm_eps, norm_weight_1, norm_bias_1, norm_weight_2, norm_bias_2, ffn_weight_1, ffn_bias_1,
                  ffn_weight_2, ffn_bias_2, mask=None, mask_type=None, *, tiles=""):
    """``torch._transformer_encoder_layer_fwd`` on a (B, L, E) tensor; see the module docstring."""
    if src.numel() == 0:
        return src.clone()
    shape = (embed_dim,)
    x = F.layer_norm(src, shape, norm_weight_1, norm_bias_1, layer_norm_eps) if norm_first else src
    bsz, seq_len, _ = x.shape
    head_dim = embed_dim // num_heads
    q, k, v = (t.view(bsz, seq_len, num_heads, head_dim).transpose(1, 2)
               for t in F.linear(x, qkv_weight, qkv_bias).chunk(3, dim=-1))
    out = ops.attend(q, k, v, _native_keep(mask, mask_type, bsz, seq_len), None, tiles=tiles)  # dead rows: NaN
    x = F.linear(out.transpose(1, 2).reshape(bsz, seq_len, embed_dim), proj_weight, proj_bias) + src
    if not norm_first:
        x = F.layer_norm(x, shape, norm_weight_1, norm_bias_1, layer_norm_eps)
    y = F.layer_norm(x, shape, norm_weight_2, norm_bias_2, layer_norm_eps) if norm_first else x
    y = F.linear(y, ffn_weight_1, ffn_bias_1)
    y = F.linear(F.gelu(y) if use_gelu else F.relu(y), ffn_weight_2, ffn_bias_2) + x
    return F.layer_norm(y, shape, norm_weight_2, norm_bias_2, layer_norm_eps) if not norm_first else y
