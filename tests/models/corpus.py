"""The third-party model corpus: tiny random models from the libraries users bring to ``torch.compile``.

Each `Entry` names a model built from a tiny config with random weights (CPU, float32; width <= 64, 1-2
layers per stage, sequences <= 64), the number of attention sites a user expects attnfuse to fuse (counted by reading
the library's attention code: every exact matmul-softmax-matmul, SDPA call or ``nn.MultiheadAttention``),
and the softmax sites that must stay unfused, each with the reason.  ``known_miss`` marks entries attnfuse
does not fully fuse yet; ``tests/models/test_corpus.py`` runs them as strict xfails.

    python tests/models/corpus.py --table          # the README table (compiles every model: a few minutes)
    python tests/models/corpus.py --misses         # every site not fused yet, with the report's reason
    python tests/models/corpus.py --report ID ...  # one model's report
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib
import pathlib
import re
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

BATCH, VOCAB = 2, 128


@dataclasses.dataclass(frozen=True)
class Negative:
    """A softmax that must stay unfused: ``count`` skipped sites whose module matches the regex ``module``
    and whose skip reason contains ``reason_has``."""

    what: str  # which softmax, for people
    module: str  # a regex searched in Site.module
    why: str  # why fusing it would be wrong
    reason_has: str  # a phrase of the report's skip reason (Site.reason)
    count: int = 1


@dataclasses.dataclass(frozen=True)
class Entry:
    id: str
    library: str
    build: Callable[[], tuple[nn.Module, tuple, dict]]  # -> (model, args, kwargs), seeded
    sites: int  # attention sites a user expects fused
    negatives: tuple[Negative, ...] = ()
    known_miss: str | None = None  # attnfuse does not fully fuse this yet (a strict xfail)
    fullgraph: bool = True
    reference: str = "float64"  # or "eager": why, in `tight`
    tight: str = ""  # the reason a float64 copy is not a float64 computation
    slow: bool = False


ENTRIES: list[Entry] = []


def entry(library: str, sites: int, **kw) -> Callable:
    """Register a builder as an `Entry` named after it (``_`` -> ``-``)."""

    def register(build: Callable) -> Callable:
        ENTRIES.append(Entry(id=build.__name__.strip("_").replace("_", "-"), library=library, build=build,
                             sites=sites, **kw))
        return build

    return register


def _ids(length: int, batch: int = BATCH) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length))


def _padding(length: int, batch: int = BATCH, pad: int = 4) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - pad:] = 0  # the last sequence is right-padded
    return mask


def _image(size: int = 32, channels: int = 3, batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, channels, size, size)


# --- Hugging Face transformers ------------------------------------------------------------------------------

def _hf(config: str, model: str, attn: str = "eager", **kw) -> nn.Module:
    """``transformers.<model>(<config>(**kw))`` with HF's ``attn`` implementation, no dropout, tiny vocabulary."""
    import transformers

    cfg = getattr(transformers, config)(attn_implementation=attn, **kw)
    return getattr(transformers, model)(cfg)


_TOKENS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LLAMA = dict(_TOKENS, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0, use_cache=False)
_BERT = dict(_TOKENS, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _bert(attn: str):
    return _hf("BertConfig", "BertModel", attn, **_BERT), (_ids(13),), {"attention_mask": _padding(13)}


@entry("transformers", 2)
def hf_bert_eager():
    return _bert("eager")


@entry("transformers", 2)
def hf_bert_sdpa():
    return _bert("sdpa")


# HF's output capturing (a lock) breaks the graph
@entry("transformers", 0, fullgraph=False, negatives=(Negative(
    "each layer's softmax", r"attention\.self$", "output_attentions=True returns the probabilities to the user",
    "also used by", 2),))
def hf_bert_output_attentions():
    model, args, kwargs = _bert("eager")
    return model, args, dict(kwargs, output_attentions=True)


@entry("transformers", 2)
def hf_roberta_eager():
    return _hf("RobertaConfig", "RobertaModel", **_BERT), (_ids(13),), {"attention_mask": _padding(13)}


@entry("transformers", 2)
def hf_deberta_v2_eager():
    cfg = dict(_BERT, relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=16,
               position_buckets=8, position_biased_input=False)
    return _hf("DebertaV2Config", "DebertaV2Model", **cfg), (_ids(13),), {"attention_mask": _padding(13)}


def _gpt2(attn: str):
    cfg = dict(_TOKENS, n_positions=64, n_embd=32, n_layer=2, n_head=4, attn_pdrop=0.0, resid_pdrop=0.0,
               embd_pdrop=0.0, use_cache=False)
    return _hf("GPT2Config", "GPT2LMHeadModel", attn, **cfg), (_ids(13),), {}


@entry("transformers", 2)
def hf_gpt2_eager():
    return _gpt2("eager")


@entry("transformers", 2)
def hf_gpt2_sdpa():
    return _gpt2("sdpa")


@entry("transformers", 2)
def hf_gptj_eager():
    cfg = dict(_TOKENS, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, attn_pdrop=0.0,
               resid_pdrop=0.0, embd_pdrop=0.0, use_cache=False)
    return _hf("GPTJConfig", "GPTJForCausalLM", **cfg), (_ids(13),), {}


@entry("transformers", 2)
def hf_gpt_neox_eager():
    cfg = dict(_TOKENS, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64, rotary_pct=0.5, attention_dropout=0.0, hidden_dropout=0.0,
               use_cache=False)
    return _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", **cfg), (_ids(13),), {}


_FP32_SOFTMAX = "the float64 copy still runs HF's softmax in float32 (softmax(..., dtype=float32))"


def _llama(attn: str):
    return _hf("LlamaConfig", "LlamaForCausalLM", attn, **_LLAMA), (_ids(13),), {}


@entry("transformers", 2, reference="eager", tight=_FP32_SOFTMAX)
def hf_llama_eager():
    return _llama("eager")


@entry("transformers", 2)
def hf_llama_sdpa():
    return _llama("sdpa")


@entry("transformers", 2, reference="eager", tight=_FP32_SOFTMAX)
def hf_llama_left_padded_eager():
    mask = torch.ones(BATCH, 13, dtype=torch.long)
    mask[-1, :5] = 0
    return _hf("LlamaConfig", "LlamaForCausalLM", **_LLAMA), (_ids(13),), {"attention_mask": mask}


@entry("transformers", 2, reference="eager", tight=_FP32_SOFTMAX)
def hf_mistral_eager():
    return _hf("MistralConfig", "MistralForCausalLM", sliding_window=8, **_LLAMA), (_ids(13),), {}


@entry("transformers", 2, reference="eager", tight=_FP32_SOFTMAX)
def hf_qwen2_eager():
    return _hf("Qwen2Config", "Qwen2ForCausalLM", **_LLAMA), (_ids(13),), {}


@entry("transformers", 2, reference="eager", tight=_FP32_SOFTMAX)
def hf_gemma_eager():
    return _hf("GemmaConfig", "GemmaForCausalLM", head_dim=8, **_LLAMA), (_ids(13),), {}


@entry("transformers", 2, reference="eager", tight=_FP32_SOFTMAX)
def hf_gemma2_softcap_eager():
    cfg = dict(_LLAMA, head_dim=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=8,
               query_pre_attn_scalar=8)
    return _hf("Gemma2Config", "Gemma2ForCausalLM", **cfg), (_ids(13),), {}


@entry("transformers", 2, reference="eager", tight=_FP32_SOFTMAX)
def hf_phi_eager():
    cfg = dict(_LLAMA, partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0)
    return _hf("PhiConfig", "PhiForCausalLM", **cfg), (_ids(13),), {}


@entry("transformers", 2, reference="eager", tight=_FP32_SOFTMAX)
def hf_bloom_eager():
    cfg = dict(_TOKENS, hidden_size=32, n_layer=2, n_head=4, attention_dropout=0.0, hidden_dropout=0.0,
               use_cache=False)
    return _hf("BloomConfig", "BloomForCausalLM", **cfg), (_ids(13),), {"attention_mask": _padding(13)}


@entry("transformers", 2, reference="eager", tight=_FP32_SOFTMAX)
def hf_falcon_eager():
    cfg = dict(_TOKENS, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
               new_decoder_architecture=True, attention_dropout=0.0, hidden_dropout=0.0, use_cache=False)
    return _hf("FalconConfig", "FalconForCausalLM", **cfg), (_ids(13),), {}


@entry("transformers", 2, reference="eager", tight=_FP32_SOFTMAX)
def hf_opt_eager():
    cfg = dict(_TOKENS, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
               max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
               use_cache=False)
    return _hf("OPTConfig", "OPTForCausalLM", **cfg), (_ids(13),), {"attention_mask": _padding(13)}


@entry("transformers", 2, reference="eager", tight=_FP32_SOFTMAX,
       negatives=(Negative("the MoE router of each layer", r"mlp\.gate$", "a softmax over experts, not attention",
                           "not a probabilities @ values", 2),))
def hf_mixtral_router_eager():
    cfg = dict(_LLAMA, num_local_experts=4, num_experts_per_tok=2)
    return _hf("MixtralConfig", "MixtralForCausalLM", **cfg), (_ids(13),), {}


@entry("transformers", 2, reference="eager", tight=_FP32_SOFTMAX)
def hf_deepseek_v3_mla_eager():
    cfg = dict(_LLAMA, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
               qk_nope_head_dim=16, v_head_dim=12, first_k_dense_replace=2, n_routed_experts=4,
               num_experts_per_tok=2, moe_intermediate_size=16, rope_interleave=True)
    return _hf("DeepseekV3Config", "DeepseekV3ForCausalLM", **cfg), (_ids(13),), {}


_T5 = dict(_TOKENS, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
           relative_attention_max_distance=16, dropout_rate=0.0, decoder_start_token_id=0, use_cache=False)


@entry("transformers", 3)  # encoder self, decoder causal self, cross
def hf_t5_eager():
    return _hf("T5Config", "T5Model", **_T5), (), {"input_ids": _ids(13), "decoder_input_ids": _ids(7),
                                                    "attention_mask": _padding(13)}


def _bart(attn: str):
    cfg = dict(_TOKENS, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
               dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, decoder_start_token_id=2,
               use_cache=False)
    kwargs = {"input_ids": _ids(13), "attention_mask": _padding(13), "decoder_input_ids": _ids(7)}
    return _hf("BartConfig", "BartModel", attn, **cfg), (), kwargs


@entry("transformers", 3)
def hf_bart_eager():
    return _bart("eager")


@entry("transformers", 3)
def hf_bart_sdpa():
    return _bart("sdpa")


def _whisper(attn: str):
    cfg = dict(_TOKENS, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
               max_target_positions=32, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
               decoder_start_token_id=2, use_cache=False)
    kwargs = {"input_features": torch.randn(BATCH, 8, 32), "decoder_input_ids": _ids(7)}
    return _hf("WhisperConfig", "WhisperModel", attn, **cfg), (), kwargs


@entry("transformers", 3)
def hf_whisper_eager():
    return _whisper("eager")


@entry("transformers", 3)
def hf_whisper_sdpa():
    return _whisper("sdpa")


_VIT = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _vit(attn: str):
    import transformers

    cfg = transformers.ViTConfig(attn_implementation=attn, **_VIT)
    return transformers.ViTModel(cfg, add_pooling_layer=False), (_image(),), {}


@entry("transformers", 2)
def hf_vit_eager():
    return _vit("eager")


@entry("transformers", 2)
def hf_vit_sdpa():
    return _vit("sdpa")


@entry("transformers", 2, reference="eager", tight=_FP32_SOFTMAX)
def hf_swin_eager():
    cfg = dict(image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[2], num_heads=[2], window_size=4,
               mlp_ratio=2.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    return _hf("SwinConfig", "SwinModel", **cfg), (_image(),), {}


@entry("transformers", 2)  # text (causal + padding) and vision, one layer each
def hf_clip_eager():
    import transformers

    text = dict(_TOKENS, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=32, attention_dropout=0.0)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, attention_dropout=0.0)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16,
                                  attn_implementation="eager")
    kwargs = {"input_ids": _ids(11), "attention_mask": _padding(11, pad=3), "pixel_values": _image()}
    return transformers.CLIPModel(cfg), (), kwargs


# vision encoder 2 (windowed, global; decomposed relative positions) + mask decoder 2 x 3 + the final token->image
@entry("transformers", 9, reference="eager", tight=_FP32_SOFTMAX, slow=True)
def hf_sam_eager():
    import transformers

    vision = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                  patch_size=8, mlp_dim=64, window_size=4, global_attn_indexes=[1], use_rel_pos=True,
                  num_pos_feats=8)
    prompt = dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4)
    decoder = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                   iou_head_hidden_dim=16)
    cfg = transformers.SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder,
                                 attn_implementation="eager")
    kwargs = {"pixel_values": torch.randn(1, 3, 64, 64), "input_points": torch.rand(1, 1, 2, 2) * 64}
    return transformers.SamModel(cfg), (), kwargs


@entry("transformers", 2)
def hf_distilbert_eager():
    cfg = dict(_TOKENS, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64, dropout=0.0,
               attention_dropout=0.0)
    return _hf("DistilBertConfig", "DistilBertModel", **cfg), (_ids(13),), {"attention_mask": _padding(13)}


@entry("transformers", 2)  # a global and a local (window 4) layer; GPT-Neo does not scale the scores
def hf_gpt_neo_local_eager():
    cfg = dict(_TOKENS, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position_embeddings=64,
               attention_types=[[["global", "local"], 1]], window_size=4, attention_dropout=0.0, embed_dropout=0.0,
               resid_dropout=0.0, use_cache=False)
    return _hf("GPTNeoConfig", "GPTNeoForCausalLM", **cfg), (_ids(13),), {}


@entry("transformers", 2)  # multi-query attention: the query heads folded into the query length
def hf_gpt_bigcode_mqa_eager():
    cfg = dict(_TOKENS, n_positions=64, n_embd=32, n_layer=2, n_head=4, multi_query=True, attn_pdrop=0.0,
               resid_pdrop=0.0, embd_pdrop=0.0, use_cache=False)
    return _hf("GPTBigCodeConfig", "GPTBigCodeForCausalLM", **cfg), (_ids(13),), {}


@entry("transformers", 2)  # ALiBi
def hf_mpt_eager():
    cfg = dict(_TOKENS, d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64,
               attn_config={"alibi": True, "attn_pdrop": 0}, resid_pdrop=0.0, emb_pdrop=0.0, use_cache=False)
    return _hf("MptConfig", "MptForCausalLM", **cfg), (_ids(13),), {}


@entry("transformers", 2, reference="eager", tight=_FP32_SOFTMAX,
       negatives=(Negative("the MoE router of each layer", r"mlp\.router$",
                           "a softmax over the top-k experts' logits, not attention", "not a probabilities @ values",
                           2),))
def hf_gpt_oss_sinks_eager():
    cfg = dict(_LLAMA, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
               layer_types=["sliding_attention", "full_attention"])
    return _hf("GptOssConfig", "GptOssForCausalLM", **cfg), (_ids(13),), {}


@entry("transformers", 2, reference="eager", tight=_FP32_SOFTMAX)
def hf_swinv2_eager():  # cosine attention with a per-head learned logit scale, continuous position bias
    cfg = dict(image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[2], num_heads=[2], window_size=4,
               mlp_ratio=2.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    return _hf("Swinv2Config", "Swinv2Model", **cfg), (_image(),), {}


@entry("transformers", 2, negatives=(Negative(
    "the span-based dynamic convolution of each layer", r"attention\.self$", "a softmax over a convolution "
    "kernel predicted by a linear layer, applied to unfolded values: not attention", "not over the key", 2),))
def hf_convbert_eager():
    cfg = dict(_BERT, embedding_size=32, head_ratio=2, conv_kernel_size=3, num_groups=1)
    return _hf("ConvBertConfig", "ConvBertModel", **cfg), (_ids(13),), {"attention_mask": _padding(13)}


@entry("transformers", 3)  # encoder: local attention (blocks of 4 with their neighbours), decoder self + cross
def hf_longt5_local_eager():
    cfg = dict(_T5, encoder_attention_type="local", local_radius=4)
    kwargs = {"input_ids": _ids(13), "decoder_input_ids": _ids(7), "attention_mask": _padding(13)}
    return _hf("LongT5Config", "LongT5Model", **cfg), (), kwargs


@entry("transformers", 2)
def hf_codegen_eager():
    cfg = dict(_TOKENS, n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, attn_pdrop=0.0,
               resid_pdrop=0.0, embd_pdrop=0.0, use_cache=False)
    return _hf("CodeGenConfig", "CodeGenForCausalLM", **cfg), (_ids(13),), {}


@entry("transformers", 2, reference="eager", tight=_FP32_SOFTMAX)  # a global and a local (window 8) layer
def hf_modernbert_eager():
    cfg = dict(_TOKENS, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, global_attn_every_n_layers=2, local_attention=8, attention_dropout=0.0,
               mlp_dropout=0.0, embedding_dropout=0.0)
    return _hf("ModernBertConfig", "ModernBertModel", **cfg), (_ids(13),), {"attention_mask": _padding(13)}


# relative attention: content + position (rel_shift) + segment terms, einsum 'ibnd,jbnd->bnij'
@entry("transformers", 2)
def hf_xlnet_eager():
    cfg = dict(_TOKENS, d_model=32, n_layer=2, n_head=4, d_inner=64, dropout=0.0, use_mems_eval=False)
    return _hf("XLNetConfig", "XLNetModel", **cfg), (_ids(13),), {"attention_mask": _padding(13)}


# --- timm ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _timm_fused(on: bool):
    """timm reads ``use_fused_attn()`` when a block is built: F.sdpa (``on``) or its own matmul-softmax-matmul.
    ``experimental`` also turns it on where timm has not yet made SDPA the default (Swin)."""
    from timm.layers import config

    old = config._USE_FUSED_ATTN
    config.set_fused_attn(on, experimental=on)
    try:
        yield
    finally:
        config._USE_FUSED_ATTN = old


def _timm(fused: bool, factory: Callable[[], nn.Module], size: int = 32):
    with _timm_fused(fused):
        return factory(), (_image(size),), {}


def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10)


@entry("timm", 2)
def timm_vit_sdpa():
    return _timm(True, _timm_vit)


@entry("timm", 2)
def timm_vit_eager():
    return _timm(False, _timm_vit)


def _timm_swin():
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2,), num_heads=(2,),
                           num_classes=10)


@entry("timm", 2)  # a window block and a shifted-window block (relative position bias + shift mask)
def timm_swin_sdpa():
    return _timm(True, _timm_swin)


@entry("timm", 2)
def timm_swin_eager():
    return _timm(False, _timm_swin)


def _timm_eva():
    from timm.models.eva import Eva

    return Eva(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10, use_rot_pos_emb=True,
               ref_feat_shape=(4, 4))


@entry("timm", 2)
def timm_eva_rope_sdpa():
    return _timm(True, _timm_eva)


@entry("timm", 2)
def timm_eva_rope_eager():
    return _timm(False, _timm_eva)


def _timm_beit():
    from timm.models.beit import Beit

    return Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10,
                use_rel_pos_bias=True)


@entry("timm", 2)
def timm_beit_relpos_sdpa():
    return _timm(True, _timm_beit)


@entry("timm", 2)
def timm_beit_relpos_eager():
    return _timm(False, _timm_beit)


def _timm_cait():
    from timm.models.cait import Cait

    return Cait(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, depth_token_only=1, num_classes=10)


_TALKING_HEADS = Negative("the talking-heads softmax of each block", r"^blocks\.\d+\.attn$", "heads are mixed "
                          "(proj_l, proj_w) around the softmax: not one attention per head",
                          "not a probabilities @ values")


@entry("timm", 1, negatives=(_TALKING_HEADS,))  # the class-attention block is plain attention
def timm_cait_sdpa():
    return _timm(True, _timm_cait)


@entry("timm", 1, negatives=(_TALKING_HEADS,))
def timm_cait_eager():
    return _timm(False, _timm_cait)


def _timm_maxvit(nchw: bool = False):
    from timm.models.maxxvit import MaxxVit, MaxxVitCfg, MaxxVitTransformerCfg

    cfg = MaxxVitCfg(embed_dim=(16, 32), depths=(1, 1), block_type=("M", "M"), stem_width=8,
                     transformer_cfg=MaxxVitTransformerCfg(dim_head=8, window_size=(2, 2), use_nchw_attn=nchw))
    return MaxxVit(cfg, img_size=32, num_classes=10)


@entry("timm", 4, slow=True)  # block (window) and grid attention in each of two stages, relative position bias
def timm_maxvit_sdpa():
    return _timm(True, _timm_maxvit)


@entry("timm", 4, slow=True)
def timm_maxvit_eager():
    return _timm(False, _timm_maxvit)


@entry("timm", 4, slow=True)
def timm_maxvit_nchw_eager():  # Attention2d: (q^T k).softmax, then v @ p^T on NCHW tensors
    return _timm(False, lambda: _timm_maxvit(nchw=True))


def _timm_levit():
    from timm.models.levit import Levit

    return Levit(img_size=64, num_classes=10, embed_dim=(32, 48), key_dim=8, depth=(1, 1), num_heads=(2, 3),
                 attn_ratio=2.0, mlp_ratio=2.0)


@entry("timm", 3)  # stage attention, the subsampling attention between stages, stage attention
def timm_levit_eager():
    return _timm(False, _timm_levit, size=64)


def _timm_pvt_v2():
    from timm.models.pvt_v2 import PyramidVisionTransformerV2

    return PyramidVisionTransformerV2(depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 2), sr_ratios=(2, 1),
                                      mlp_ratios=(2, 2), num_classes=10)


@entry("timm", 2)  # spatial-reduction attention: keys/values from a strided conv of the tokens
def timm_pvt_v2_sdpa():
    return _timm(True, _timm_pvt_v2)


@entry("timm", 2)
def timm_pvt_v2_eager():
    return _timm(False, _timm_pvt_v2)


def _timm_xcit():
    from timm.models.xcit import Xcit

    return Xcit(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, cls_attn_layers=1, num_classes=10)


# cross-covariance attention (channels as tokens, a per-head learned temperature) + a class-attention layer
@entry("timm", 2)
def timm_xcit_sdpa():
    return _timm(True, _timm_xcit)


@entry("timm", 2)
def timm_xcit_eager():
    return _timm(False, _timm_xcit)


@entry("timm", 0, negatives=(Negative("the factorized attention of each serial block", r"factoratt_crpe",
                                      "softmax(k) over the tokens then k^T @ v (linear attention): no q k^T scores",
                                      "not over the key", 4),))
def timm_coat_factorized():
    from timm.models.coat import CoaT

    # 8 heads: the convolutional position encoding splits them 2/3/3 over its windows
    return _timm(False, lambda: CoaT(img_size=32, patch_size=4, embed_dims=(16, 16, 16, 16), serial_depths=(1, 1, 1, 1),
                                     parallel_depth=0, num_heads=8, mlp_ratios=(2, 2, 2, 2), num_classes=10))


# outlooker: softmax over weights a linear layer predicts (negative); a transformer block, a class-attention block
@entry("timm", 2, negatives=(Negative("the outlook attention", r"network\.0\.0\.attn$", "the weights come from a "
                                      "linear layer of the pooled tokens, applied to unfolded values: no q k^T",
                                      "not part of the attention pattern", 1),))
def timm_volo():
    from timm.models.volo import VOLO

    return _timm(False, lambda: VOLO(layers=(1, 1), img_size=32, patch_size=8, stem_hidden_dim=16,
                                     embed_dims=(32, 32), num_heads=(2, 2), mlp_ratio=2.0, post_layers=("ca",),
                                     num_classes=10))


@entry("timm", 2, known_miss="the decomposed rel-pos term is written into a slice of the scores (attn[...] = ...)")
def timm_mvitv2():  # pooling attention with decomposed relative positions, written into the scores in place
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    cfg = MultiScaleVitCfg(depths=(1, 1), embed_dim=(16, 32), num_heads=(1, 2), mlp_ratio=2.0,
                           stride_q=((1, 1), (2, 2)), stride_kv_adaptive=(2, 2))
    return _timm(False, lambda: MultiScaleVit(cfg, img_size=(32, 32), num_classes=10))


# --- diffusers -----------------------------------------------------------------------------------------------

def _processor(model: nn.Module, classic: bool) -> nn.Module:
    """AttnProcessor: baddbmm + softmax + bmm (``Attention.get_attention_scores``); AttnProcessor2_0: F.sdpa."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    for m in model.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor() if classic else AttnProcessor2_0())
    return model


def _unet(classic: bool):
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)
    args = (torch.randn(BATCH, 4, 8, 8), torch.tensor([3, 517]), torch.randn(BATCH, 7, 16))
    return _processor(model, classic), args, {}


# 4 transformer blocks (down 1, mid 1, up 2), each self- and cross-attention
@entry("diffusers", 8, slow=True)
def diffusers_unet2d_condition_classic():
    return _unet(True)


@entry("diffusers", 8, slow=True)
def diffusers_unet2d_condition_sdpa():
    return _unet(False)


def _autoencoder(classic: bool):
    from diffusers import AutoencoderKL

    model = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=16)
    return _processor(model, classic), (_image(16),), {}


@entry("diffusers", 2, slow=True)  # the mid-block attention of the encoder and of the decoder
def diffusers_autoencoder_kl_classic():
    return _autoencoder(True)


@entry("diffusers", 2, slow=True)
def diffusers_autoencoder_kl_sdpa():
    return _autoencoder(False)


def _transformer2d(classic: bool):
    from diffusers import Transformer2DModel

    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, num_layers=1,
                               cross_attention_dim=24, norm_num_groups=8)
    kwargs = {"encoder_hidden_states": torch.randn(BATCH, 7, 24), "encoder_attention_mask": _padding(7, pad=2),
              "return_dict": False}  # its output class warns (deprecated), which breaks the graph
    return _processor(model, classic), (torch.randn(BATCH, 16, 6, 6),), kwargs


@entry("diffusers", 2)  # self-attention and cross-attention with an encoder padding mask
def diffusers_transformer2d_classic():
    return _transformer2d(True)


@entry("diffusers", 2)
def diffusers_transformer2d_sdpa():
    return _transformer2d(False)


# SlicedAttnProcessor(2): self- and cross-attention each run on two slices of the batch x heads axis (4), written
# into a preallocated buffer
@entry("diffusers", 4)
def diffusers_transformer2d_sliced():
    from diffusers.models.attention_processor import Attention, SlicedAttnProcessor

    model, args, kwargs = _transformer2d(True)
    for m in model.modules():
        if isinstance(m, Attention):
            m.set_processor(SlicedAttnProcessor(2))
    return model, args, kwargs


@entry("diffusers", 1)  # MM-DiT joint attention over image and text tokens (JointAttnProcessor2_0)
def diffusers_sd3_transformer():
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8)
    kwargs = {"hidden_states": torch.randn(BATCH, 4, 8, 8), "encoder_hidden_states": torch.randn(BATCH, 7, 16),
              "pooled_projections": torch.randn(BATCH, 16), "timestep": torch.tensor([3, 517])}
    return model, (), kwargs


@entry("diffusers", 2)  # one double-stream and one single-stream block, rotary embeddings
def diffusers_flux_transformer():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    kwargs = {"hidden_states": torch.randn(BATCH, 16, 8), "encoder_hidden_states": torch.randn(BATCH, 7, 16),
              "pooled_projections": torch.randn(BATCH, 16), "timestep": torch.tensor([0.25, 0.75]),
              "img_ids": torch.rand(16, 3) * 4, "txt_ids": torch.zeros(7, 3)}
    return model, (), kwargs


# --- torchvision ---------------------------------------------------------------------------------------------

@entry("torchvision", 2)  # nn.MultiheadAttention(need_weights=False) in each encoder block
def torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
    return model, (_image(),), {}


def _tv_swin(v2: bool):
    from torchvision.models import swin_transformer as swin

    block = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) if v2 else {}
    model = swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[2], window_size=[4, 4],
                                 num_classes=10, **block)
    return model, (_image(),), {}


@entry("torchvision", 2)  # shifted_window_attention: relative position bias, shift mask on the second block
def torchvision_swin():
    return _tv_swin(False)


# cosine attention: normalize(q) @ normalize(k)^T * clamp(logit_scale).exp() (per head), 16 * sigmoid(cpb) bias
@entry("torchvision", 2)
def torchvision_swin_v2():
    return _tv_swin(True)


# block and grid attention, relative position bias
@entry("torchvision", 2, slow=True)
def torchvision_maxvit():
    from torchvision.models.maxvit import MaxVit

    model = MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16], block_layers=[1],
                   head_dim=8, stochastic_depth_prob=0.0, num_classes=10)
    return model, (_image(),), {}


# --- torch.nn ------------------------------------------------------------------------------------------------

class _SelfCrossMHA(nn.Module):
    """Self-attention with a key padding mask, then cross-attention, through ``nn.MultiheadAttention``."""

    def __init__(self, dim: int = 32, heads: int = 4, weights: str = "none") -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.weights = weights

    def forward(self, x, memory, key_padding_mask):
        if self.weights == "returned":  # the averaged attention weights go to the user
            y, w = self.self_attn(x, x, x, key_padding_mask=key_padding_mask)
            return y + self.cross_attn(y, memory, memory, need_weights=False)[0], w
        need = self.weights == "discarded"  # need_weights=True (the default), the weights thrown away
        x = x + self.self_attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=need)[0]
        return x + self.cross_attn(x, memory, memory, need_weights=need)[0]


def _mha(weights: str):
    padding = torch.zeros(BATCH, 13, dtype=torch.bool)
    padding[-1, 9:] = True
    return _SelfCrossMHA(weights=weights), (torch.randn(BATCH, 13, 32), torch.randn(BATCH, 17, 32), padding), {}


@entry("torch.nn", 2)
def nn_mha_self_cross():
    return _mha("none")


@entry("torch.nn", 2)
def nn_mha_default_weights_discarded():
    return _mha("discarded")


@entry("torch.nn", 1, negatives=(Negative("the self-attention", "^self_attn$",
                                          "its averaged weights are returned to the user", "need_weights"),))
def nn_mha_weights_returned():
    return _mha("returned")


def _layer(cls, **kw):
    return cls(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True, **kw)


@entry("torch.nn", 2)  # eval + no_grad: the fast path, one torch._transformer_encoder_layer_fwd per layer
def nn_transformer_encoder():
    model = nn.TransformerEncoder(_layer(nn.TransformerEncoderLayer), 2, enable_nested_tensor=False)
    padding = torch.zeros(BATCH, 13, dtype=torch.bool)
    padding[-1, 10:] = True
    return model, (torch.randn(BATCH, 13, 32),), {"src_key_padding_mask": padding}


@entry("torch.nn", 4)  # causal self-attention and cross-attention in each of two layers
def nn_transformer_decoder():
    model = nn.TransformerDecoder(_layer(nn.TransformerDecoderLayer, norm_first=True), 2)
    mask = nn.Transformer.generate_square_subsequent_mask(11)
    return model, (torch.randn(BATCH, 11, 32), torch.randn(BATCH, 13, 32)), {"tgt_mask": mask, "tgt_is_causal": True}


@entry("torch.nn", 3)  # the encoder layer runs its inference fast path (torch._transformer_encoder_layer_fwd)
def nn_transformer():
    model = nn.Transformer(32, 4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64, dropout=0.0,
                           batch_first=True)
    mask = nn.Transformer.generate_square_subsequent_mask(11)
    kwargs = {"tgt_mask": mask, "tgt_is_causal": True}  # without the flag, its causal-mask check breaks fullgraph
    return model, (torch.randn(BATCH, 13, 32), torch.randn(BATCH, 11, 32)), kwargs


class _MhaVariants(nn.Module):
    """Sequence-first MHA with a bool attention mask and kdim/vdim != embed_dim; MHA with bias_k/v and a zero
    key/value slot."""

    def __init__(self) -> None:
        super().__init__()
        self.cross = nn.MultiheadAttention(32, 4, kdim=24, vdim=20)
        self.extra = nn.MultiheadAttention(32, 4, add_bias_kv=True, add_zero_attn=True)

    def forward(self, x, memory_k, memory_v, mask):
        x = x + self.cross(x, memory_k, memory_v, attn_mask=mask, need_weights=False)[0]
        return x + self.extra(x, x, x, need_weights=False)[0]


@entry("torch.nn", 2)
def nn_mha_variants():
    mask = torch.rand(11, 13) > 0.3
    mask[:, 0] = False  # every query keeps a key (True = masked out)
    return _MhaVariants(), (torch.randn(11, BATCH, 32), torch.randn(13, BATCH, 24), torch.randn(13, BATCH, 20),
                            mask), {}


# --- open_clip -----------------------------------------------------------------------------------------------

def _open_clip(custom: bool):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    extra = dict(block_type="custom", qk_norm=True, attentional_pool=True, attn_pooler_queries=4,
                 attn_pooler_heads=2) if custom else {}
    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, mlp_ratio=2.0, patch_size=8, image_size=32, **extra)
    text = CLIPTextCfg(context_length=16, vocab_size=VOCAB, width=32, heads=2, layers=1, mlp_ratio=2.0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text)
    return model, (_image(), _ids(16)), {}


@entry("open_clip", 2)  # nn.MultiheadAttention: the vision tower, the text tower (causal mask)
def open_clip_clip():
    return _open_clip(False)


# vision: open_clip's own Attention with qk-norm (F.sdpa) + the attentional pooler (nn.MultiheadAttention); text
@entry("open_clip", 3)
def open_clip_custom_attn_pool():
    return _open_clip(True)


# --- x-transformers ------------------------------------------------------------------------------------------

def _xt(layers: str = "Decoder", mask: bool = False, **attn):
    from x_transformers import Decoder, Encoder, TransformerWrapper

    stack = dict(Decoder=Decoder, Encoder=Encoder)[layers](dim=32, depth=2, heads=4, attn_dim_head=8, **attn)
    model = TransformerWrapper(num_tokens=VOCAB, max_seq_len=64, attn_layers=stack)
    return model, (_ids(13),), ({"mask": _padding(13).bool()} if mask else {})


@entry("x-transformers", 2)
def xt_decoder():
    return _xt()


@entry("x-transformers", 2)
def xt_decoder_flash():
    return _xt(attn_flash=True)


@entry("x-transformers", 2)  # key padding mask
def xt_encoder():
    return _xt("Encoder", mask=True)


@entry("x-transformers", 2)
def xt_decoder_alibi():
    return _xt(alibi_pos_bias=True, alibi_num_heads=2)


@entry("x-transformers", 2)
def xt_decoder_gqa():
    return _xt(attn_kv_heads=2, rotary_pos_emb=True)


@entry("x-transformers", 2)
def xt_decoder_multi_query():
    return _xt(attn_kv_heads=1)


@entry("x-transformers", 2)  # cosine-sim attention: l2-normalized q and k, a fixed scale
def xt_encoder_qk_norm():
    return _xt("Encoder", mask=True, attn_qk_norm=True)


@entry("x-transformers", 0, negatives=(Negative("each layer's softmax", r"\.attend$", "heads are mixed before "
                                                "and after the "
                                                "softmax (talking heads): not one attention per head",
                                                "not a probabilities @ values", 2),))
def xt_decoder_talking_heads():
    return _xt(attn_pre_talking_heads=True, attn_post_talking_heads=True)


@entry("x-transformers", 2)
def xt_decoder_attn_sink():  # a learned attention sink per head: concatenated before the softmax, then dropped
    return _xt(attn_head_learned_sink=True)


@entry("x-transformers", 0, negatives=(Negative("each layer's softmax", r"\.attend$", "only each row's top-k scores "
                                                "are kept: the mask is computed from the scores",
                                                "depends on the scores", 2),))
def xt_decoder_sparse_topk():
    return _xt(attn_sparse_topk=4)


@entry("x-transformers", 2)  # logits soft-clamped: value * tanh(sim / value)
def xt_decoder_softclamp():
    return _xt(attn_softclamp_logits=True, attn_logit_softclamp_value=30.0)


@entry("x-transformers", 2)  # T5 relative position bias, learned memory key/values prepended
def xt_decoder_rel_pos_mem_kv():
    return _xt(rel_pos_bias=True, attn_num_mem_kv=2)


@entry("x-transformers", 1, negatives=(Negative("the first layer's softmax", r"layers\.0\.1\.attend$",
                                                "its pre-softmax scores are added to the next layer's "
                                                "(residual attention)", "also used by", 1),))
def xt_encoder_residual_attn():
    return _xt("Encoder", mask=True, residual_attn=True)


@entry("x-transformers", 4, slow=True)  # encoder self (2) + decoder causal self and cross (1 layer each)
def xt_encoder_decoder():
    from x_transformers import XTransformer

    model = XTransformer(dim=32, enc_num_tokens=VOCAB, enc_depth=2, enc_heads=4, enc_max_seq_len=64,
                         dec_num_tokens=VOCAB, dec_depth=1, dec_heads=4, dec_max_seq_len=64, enc_attn_dim_head=8,
                         dec_attn_dim_head=8)
    return model, (_ids(13), _ids(9)), {"mask": _padding(13).bool()}


# --- local-attention -----------------------------------------------------------------------------------------

class _Local(nn.Module):
    """``LocalAttention`` on (batch, heads, seq, head_dim) q, k, v."""

    def __init__(self, **kw) -> None:
        super().__init__()
        from local_attention import LocalAttention

        self.attn = LocalAttention(window_size=8, dim=8, **kw)

    def forward(self, q, k, v, mask=None):
        return self.attn(q, k, v, mask=mask)


def _local(mask: bool = False, **kw):
    qkv = tuple(torch.randn(BATCH, 2, 32, 8) for _ in range(3))
    return _Local(**kw), qkv, ({"mask": _padding(32, pad=5).bool()} if mask else {})


@entry("local-attention", 1)  # windows of 8 with the previous window, causal (rotary)
def local_attention_causal():
    return _local(causal=True)


@entry("local-attention", 1)  # the previous and next window, a key padding mask
def local_attention_bidirectional():
    return _local(mask=True, causal=False, look_forward=1)


@entry("local-attention", 1)  # exactly window_size keys back
def local_attention_causal_exact():
    return _local(causal=True, exact_windowsize=True, use_rotary_pos_emb=False)


@entry("local-attention", 2, slow=True)
def local_attention_transformer():
    from local_attention import LocalTransformer

    model = LocalTransformer(num_tokens=VOCAB, max_seq_len=64, dim=32, depth=2, heads=4, dim_head=8,
                             local_attn_window_size=8, causal=True)
    return model, (_ids(32),), {}


# --- vit-pytorch ---------------------------------------------------------------------------------------------

_VP = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=4, mlp_dim=64, dim_head=8)


@entry("vit-pytorch", 2)
def vit_pytorch_vit():
    from vit_pytorch import ViT

    return ViT(**_VP), (_image(),), {}


@entry("vit-pytorch", 2)
def vit_pytorch_simple_vit():
    from vit_pytorch import SimpleViT

    return SimpleViT(**_VP), (_image(),), {}


@entry("vit-pytorch", 2)  # locality self-attention: the diagonal masked, a learned temperature
def vit_pytorch_small_dataset_lsa():
    from vit_pytorch.vit_for_small_dataset import ViT

    return ViT(**_VP), (_image(),), {}


@entry("vit-pytorch", 0, negatives=(Negative("each layer's softmax", r"^transformer\.layers\.\d+\.0$",
                                             "re-attention mixes the heads' "
                                             "probabilities (einsum with a learned h x h matrix)",
                                             "not a probabilities @ values", 2),))
def vit_pytorch_deepvit():
    from vit_pytorch.deepvit import DeepViT

    return DeepViT(**_VP), (_image(),), {}


@entry("vit-pytorch", 0, negatives=(Negative("every softmax (patch and class layers)", r"\.attend$",
                                             "talking heads mix the "
                                             "heads before and after the softmax",
                                             "not a probabilities @ values", 2),))
def vit_pytorch_cait():
    from vit_pytorch.cait import CaiT

    return CaiT(**dict(_VP, depth=1), cls_depth=1), (_image(),), {}


@entry("vit-pytorch", 2, slow=True)  # block and grid attention, relative position bias, einsum spelling
def vit_pytorch_maxvit():
    from vit_pytorch.max_vit import MaxViT

    model = MaxViT(num_classes=10, dim=16, depth=(1,), dim_head=8, dim_conv_stem=8, window_size=2, dropout=0.0)
    return model, (_image(),), {}


@entry("vit-pytorch", 4, slow=True)  # small/large branch self-attention + cross-attention between the CLS tokens
def vit_pytorch_cross_vit():
    from vit_pytorch.cross_vit import CrossViT

    model = CrossViT(image_size=32, num_classes=10, depth=1, sm_dim=32, sm_patch_size=8, sm_enc_depth=1,
                     sm_enc_heads=2, sm_enc_mlp_dim=64, sm_enc_dim_head=16, lg_dim=32, lg_patch_size=16,
                     lg_enc_depth=1, lg_enc_heads=2, lg_enc_mlp_dim=64, lg_enc_dim_head=16, cross_attn_depth=1,
                     cross_attn_heads=2, cross_attn_dim_head=16, dropout=0.0, emb_dropout=0.0)
    return model, (_image(),), {}


# --- others: perceiver-pytorch, segment-anything -------------------------------------------------------------

@entry("perceiver-pytorch", 2)  # latents cross-attend to the image, then latent self-attention
def perceiver():
    from perceiver_pytorch import Perceiver

    model = Perceiver(input_channels=3, input_axis=2, num_freq_bands=4, max_freq=10.0, depth=1, num_latents=8,
                      latent_dim=32, cross_heads=1, latent_heads=4, cross_dim_head=16, latent_dim_head=8,
                      num_classes=10, attn_dropout=0.0, ff_dropout=0.0, self_per_cross_attn=1)
    return model, (torch.randn(BATCH, 8, 8, 3),), {}


@entry("segment-anything", 2)  # a windowed and a global block, decomposed relative positions
def segment_anything_image_encoder():
    from segment_anything.modeling import ImageEncoderViT

    model = ImageEncoderViT(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                            out_chans=16, use_rel_pos=True, window_size=3, global_attn_indexes=(1,))
    return model, (torch.randn(1, 3, 64, 64),), {}


@entry("segment-anything", 7)  # 2 x (token self, token->image, image->token) + the final token->image
def segment_anything_two_way_transformer():
    from segment_anything.modeling import TwoWayTransformer

    model = TwoWayTransformer(depth=2, embedding_dim=32, num_heads=2, mlp_dim=64)
    args = (torch.randn(BATCH, 32, 4, 4), torch.randn(BATCH, 32, 4, 4), torch.randn(BATCH, 5, 32))
    return model, args, {}


# --- running an entry ----------------------------------------------------------------------------------------

def tensors(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (tensors, tuples, lists, dicts, HF/diffusers outputs)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for x in out for t in tensors(x)]
    return []


def _double(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_double(v) for v in x)
    if isinstance(x, dict):
        return {k: _double(v) for k, v in x.items()}
    return x


@dataclasses.dataclass
class Result:
    report: Any  # attnfuse.Report of the compile (None if attnfuse never ran)
    ours: list[torch.Tensor]
    eager: list[torch.Tensor]
    ref: list[torch.Tensor] | None  # float64 copy's outputs (None for reference="eager")


def run(e: Entry) -> Result:
    """Build ``e`` (seeded), compile it with ``backend="attnfuse"`` (inner eager), run it and eager (and a
    float64 copy), under ``no_grad`` in eval mode."""
    import attnfuse
    from attnfuse import report as _report

    torch._dynamo.reset()
    torch.manual_seed(0)
    model, args, kwargs = e.build()
    model.eval()
    ref = copy.deepcopy(model).double() if e.reference == "float64" else None
    _report.set_last(None)
    compiled = torch.compile(model, backend="attnfuse", fullgraph=e.fullgraph, options={"inner": "eager"})
    with torch.no_grad():
        ours = tensors(compiled(*args, **kwargs))
        report = attnfuse.last_report()
        eager = tensors(model(*args, **kwargs))
        want = tensors(ref(*_double(args), **_double(kwargs))) if ref is not None else None
    torch._dynamo.reset()
    return Result(report, ours, eager, want)


def problems(e: Entry, report) -> list[str]:
    """What differs from the entry's expectations in ``report``: one line per missed site (with the report's
    reason), per negative not skipped as expected, per unexpected site."""
    if report is None:
        return ["attnfuse never ran (no graph reached the backend)"]
    out = []
    skipped = list(report.skipped)
    for neg in e.negatives:
        hits = [s for s in skipped if re.search(neg.module, s.module) and neg.reason_has in (s.reason or "")]
        if len(hits) != neg.count:
            out.append(f"negative '{neg.what}': {len(hits)} of {neg.count} skipped with '{neg.reason_has}'")
        skipped = [s for s in skipped if s not in hits]
    for s in skipped:
        out.append(f"skipped {s.module or '?'} ({s.source}): {s.reason}")
    fused = len(report.fused)
    if fused + len(skipped) < e.sites:
        out.append(f"{e.sites - fused - len(skipped)} expected site(s) not in the report at all "
                   "(attnfuse found no softmax/SDPA/MHA node for them)")
    elif fused > e.sites:
        out.append(f"{fused} sites fused, {e.sites} expected")
    return out


def fused_ok(e: Entry, report) -> bool:
    return report is not None and len(report.fused) == e.sites and not problems(e, report)


# --- command line --------------------------------------------------------------------------------------------

def _table(results: dict[str, Any]) -> str:
    """The README table: one row per entry; "fused now" is what this checkout's attnfuse did."""
    rows = ["| model | library | sites to fuse | negatives (stay unfused) | fused now |", "|---|---|---|---|---|"]
    for e in ENTRIES:
        neg = "; ".join(f"{n.count} x {n.what}: {n.why}" for n in e.negatives) or "-"
        r = results.get(e.id)
        if isinstance(r, Exception) or r is None:
            now = "error" if r is not None else "-"
        else:
            now = f"{len(r.fused)}/{e.sites}"
            if problems(e, r):
                now += f" ({e.known_miss})" if e.known_miss else " (unexpected: see --misses)"
        rows.append(f"| `{e.id}` | {e.library} | {e.sites} | {neg} | {now} |".replace("\n", " "))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true", help="print the README table (runs every entry)")
    parser.add_argument("--misses", action="store_true", help="print every entry not fully fused, with reasons")
    parser.add_argument("--report", nargs="*", metavar="ID", help="print these entries' reports")
    opts = parser.parse_args(argv)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    importlib.import_module("conftest")  # registers the backend and torchvision's schemas
    chosen = [e for e in ENTRIES if not opts.report or e.id in opts.report]
    results: dict[str, Any] = {}
    for e in chosen:
        try:
            results[e.id] = run(e).report
        except Exception as exc:  # a model that does not build or trace is itself a finding
            results[e.id] = exc
        if opts.report is not None:
            print(f"== {e.id}: {e.sites} expected\n{results[e.id]}\n")
    if opts.table:
        print(_table(results))
    if opts.misses:
        for e in chosen:
            r = results[e.id]
            lines = [f"error: {type(r).__name__}: {r}"] if isinstance(r, Exception) else problems(e, r)
            if lines:
                fused = "-" if isinstance(r, Exception) else len(r.fused)
                note = f" [known miss: {e.known_miss}]" if e.known_miss else " [not marked known_miss]"
                print(f"{e.id} ({e.library}): {fused}/{e.sites} fused{note}")
                print("".join(f"  - {line}\n" for line in lines), end="")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
