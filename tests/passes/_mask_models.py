"""Models for the mask-analysis tests: tiny Hugging Face models (random weights, from configs)
and small hand-written attentions for the mask structures HF does not build.

Every HF model is wrapped so that it returns one tensor (its logits or last hidden state)
and takes ``(input_ids, attention_mask)`` positionally, which is what `_harness.check` runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

transformers = __import__("pytest").importorskip("transformers")

VOCAB, DIM, HEADS = 128, 32, 4


class HF(nn.Module):
    """``model(input_ids, attention_mask=mask)`` -> its logits or last hidden state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None, decoder_ids: torch.Tensor | None = None):
        kw = {"attention_mask": mask} if mask is not None else {}
        if decoder_ids is not None:
            kw["decoder_input_ids"] = decoder_ids
        out = self.model(ids, **kw)
        return out.logits if "logits" in out else out.last_hidden_state


def _config(cls, impl: str = "eager", **kw):
    return cls(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation=impl, **kw)


_LLAMA_LIKE = dict(hidden_size=DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
                   num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0)


def gpt2(impl: str = "eager") -> HF:
    return HF(transformers.GPT2LMHeadModel(_config(
        transformers.GPT2Config, impl, n_positions=64, n_embd=DIM, n_layer=2, n_head=HEADS, attn_pdrop=0.0,
        resid_pdrop=0.0, embd_pdrop=0.0)))


def llama(impl: str = "eager") -> HF:
    return HF(transformers.LlamaForCausalLM(_config(transformers.LlamaConfig, impl, **_LLAMA_LIKE)))


def mistral(window: int, impl: str = "eager") -> HF:
    return HF(transformers.MistralForCausalLM(_config(transformers.MistralConfig, impl, sliding_window=window,
                                                      **_LLAMA_LIKE)))


def gemma2(window: int, softcap: float) -> HF:
    """Gemma 2: local (sliding window) and global layers alternate, scores are soft-capped."""
    cfg = _config(transformers.Gemma2Config, "eager", sliding_window=window, attn_logit_softcapping=softcap,
                  head_dim=8, query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"],
                  **_LLAMA_LIKE)
    return HF(transformers.Gemma2ForCausalLM(cfg))


def bert(impl: str = "eager") -> HF:
    return HF(transformers.BertModel(_config(
        transformers.BertConfig, impl, hidden_size=DIM, num_hidden_layers=2, num_attention_heads=HEADS,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0), add_pooling_layer=False))


def modernbert(local: int) -> HF:
    """ModernBERT: global attention every 2nd layer, the others a bidirectional band of half-width local // 2."""
    cfg = _config(transformers.ModernBertConfig, "eager", hidden_size=DIM, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=HEADS, local_attention=local,
                  layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64,
                  attention_dropout=0.0, embedding_dropout=0.0, mlp_dropout=0.0)
    return HF(transformers.ModernBertModel(cfg))


def t5() -> HF:
    cfg = _config(transformers.T5Config, d_model=DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=HEADS,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                  decoder_start_token_id=0)
    return HF(transformers.T5Model(cfg))


# --- hand-written attentions ---------------------------------------------------------------------

class Attention(nn.Module):
    """Self-attention written out (scores, mask, softmax, @ v) with a pluggable mask.

    ``mask(x)`` returns a bool keep mask (True = attend) for the input ``x`` (B, T, DIM), applied
    with ``masked_fill(-inf)``; ``bias(x)`` an additive one; ``softcap`` caps the scores first.
    """

    def __init__(self, mask=None, bias=None, softcap: float = 0.0, heads: int = HEADS) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.mask, self.bias, self.softcap, self.heads = mask, bias, softcap, heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (y.view(b, t, self.heads, -1).transpose(1, 2) for y in self.qkv(x).split(DIM, -1))
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        if self.softcap:
            s = self.softcap * torch.tanh(s / self.softcap)
        if self.bias is not None:
            s = s + self.bias(x)
        if self.mask is not None:
            s = s.masked_fill(~self.mask(x), float("-inf"))
        y = s.softmax(-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, DIM))


class Stack(nn.Module):
    """Residual layers of `Attention`, e.g. alternating local and global ones."""

    def __init__(self, *layers: Attention) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def band_keep(left: int | None, right: int | None):
    """Keep kv in [q - left, q + right] (None: unbounded), written with aranges like HF's mask functions."""
    def mask(x):
        q, kv = _positions(x)
        keep = torch.ones(q.shape[0], kv.shape[1], dtype=torch.bool, device=x.device)
        if left is not None:
            keep = keep & (kv >= q - left)
        return keep & (kv <= q + right) if right is not None else keep
    return mask


def abs_band_keep(w: int):
    """A bidirectional band spelled as a distance: |q - kv| <= w."""
    def mask(x):
        q, kv = _positions(x)
        return (q - kv).abs() <= w
    return mask


def _positions(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Query positions as a column, key positions as a row."""
    pos = torch.arange(x.shape[1], device=x.device)
    return pos[:, None], pos[None, :]


def alibi_slopes(heads: int) -> torch.Tensor:
    """The ALiBi paper's geometric slopes 2^(-8 i / H)."""
    return torch.tensor([2 ** (-8 * (i + 1) / heads) for i in range(heads)])


class ALiBi(nn.Module):
    """Causal self-attention with an ALiBi bias ``slopes[h] * (kv - q)`` (or BLOOM's ``slopes[h] * kv``)."""

    def __init__(self, bloom: bool = False, symmetric: bool = False) -> None:
        super().__init__()
        self.attn = Attention(mask=band_keep(None, 0), bias=self._bias)
        self.register_buffer("slopes", alibi_slopes(HEADS), persistent=False)
        self.bloom, self.symmetric = bloom, symmetric

    def _bias(self, x):
        q, kv = _positions(x)
        dist = kv.expand(q.shape[0], -1) if self.bloom else (kv - q).abs().neg() if self.symmetric else kv - q
        return self.slopes[:, None, None] * dist

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


class ConstantMask(nn.Module):
    """Attention with a constant (buffer) keep mask of a static size, e.g. a block-sparse pattern."""

    def __init__(self, keep: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("keep", keep, persistent=False)
        self.attn = Attention(mask=self._keep)

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        return self.keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


def block_pattern(n: int, block: int = 64) -> torch.Tensor:
    """Local blocks on the diagonal plus a global first block row and column (BigBird's skeleton)."""
    blocks = torch.zeros(-(-n // block), -(-n // block), dtype=torch.bool)
    blocks.fill_diagonal_(True)
    blocks[0, :] = blocks[:, 0] = True
    return blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :n]
