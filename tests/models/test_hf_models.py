"""Whole models through the ``attnfuse`` backend: every attention site fused, same numbers as eager.

Hugging Face ``transformers`` models are built from small configs with random
weights and ``attn_implementation="eager"`` (the matmul-softmax-matmul
spelling attnfuse looks for), on CPU in float32: GPT-2, BERT (with a padding
mask), LLaMA with GQA (also left-padded), Mistral (sliding window), T5 (self,
causal self, cross attention with a relative position bias and no scale), ViT;
plus the project's nanoGPT (``examples/nanogpt.py``) and ``nn.MultiheadAttention``.

Each test compiles with ``fullgraph=True`` so that ``attnfuse.last_report()``
covers the whole model, asserts that the number of fused sites equals the
number of attention layers and that nothing was skipped, and checks the output
against eager with the 2x rule (the float64 copy of the model is the
reference).  GPT-2 and LLaMA also take a training step whose parameter
gradients must match eager's.  The last tests show that stock
``torch.compile`` (Inductor) leaves the same sites unfused on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _util import assert_2x, site_count
from nanogpt import GPT, GPTConfig
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass

import attnfuse
from attnfuse.backend import attnfuse_backend

transformers = pytest.importorskip("transformers")

BATCH, VOCAB = 2, 128


def _config(cls, **kw):
    """A small HF config: eager attention, no dropout, token ids inside the tiny vocabulary."""
    return cls(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager", **kw)


_LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64)


def gpt2():
    cfg = _config(transformers.GPT2Config, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def bert():
    cfg = _config(transformers.BertConfig, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg, add_pooling_layer=False)


def llama():
    cfg = _config(transformers.LlamaConfig, attention_dropout=0.0, **_LLAMA_LIKE)
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    return transformers.LlamaForCausalLM(cfg)


def mistral():
    cfg = _config(transformers.MistralConfig, attention_dropout=0.0, sliding_window=8, **_LLAMA_LIKE)
    return transformers.MistralForCausalLM(cfg)


def t5():
    cfg = _config(transformers.T5Config, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                  decoder_start_token_id=0)
    return transformers.T5Model(cfg)


def vit():
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return transformers.ViTModel(cfg, add_pooling_layer=False)


def nanogpt():
    return GPT(GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32))


class TwoMHA(nn.Module):
    """Self-attention with a key padding mask, then cross-attention, both through ``nn.MultiheadAttention``."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x, memory, key_padding_mask):
        x = x + self.self_attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return x + self.cross_attn(x, memory, memory, need_weights=False)[0]


def _ids(length: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (BATCH, length))


def _padding_mask(length: int) -> torch.Tensor:
    mask = torch.ones(BATCH, length, dtype=torch.long)
    mask[1, length - 4:] = 0  # the second sequence is right-padded by 4 tokens
    return mask


def _double(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _out(out):
    """The tensors to compare from a model output."""
    if isinstance(out, torch.Tensor):
        return [out]
    keys = ("logits", "last_hidden_state", "encoder_last_hidden_state")
    return [out[k] for k in keys if k in out and out[k] is not None]


class _Capture(CustomGraphPass):
    """An Inductor post-grad pass that only records the ops of the graphs Inductor compiles."""

    def __init__(self) -> None:
        self.targets: list[str] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.targets += [str(n.target) for n in graph.nodes if n.op == "call_function"]

    def uuid(self) -> None:
        return None

    def count(self, op: str) -> int:
        return self.targets.count(op)


@contextlib.contextmanager
def _inductor_capture():
    """Record Inductor's post-grad graphs; caches are off so that every graph really goes through the passes."""
    capture = _Capture()
    with torch._inductor.config.patch(post_grad_custom_post_pass=capture, force_disable_caches=True):
        yield capture
    assert capture.targets, "the capture pass did not run"


_FWD, _BWD = "attnfuse.attention.default", "attnfuse.attention_backward.default"


def _compile_check(model, args, kwargs, sites: int, inner: str = "inductor", reference: str = "float64"):
    """Compile ``model`` with attnfuse; assert all ``sites`` fused and the outputs equal eager's.

    ``reference="float64"``: the 2x rule against a float64 copy of the model.
    ``reference="eager"``: a tight `assert_close` to eager float32, for models whose
    float64 copy is not a float64 computation (HF LLaMA's softmax and RMSNorm run in float32).
    With ``inner="inductor"`` the graph Inductor compiles must hold ``sites`` fused ops.
    """
    model.eval()
    ref = copy.deepcopy(model).double() if reference == "float64" else None
    compiled = torch.compile(model, backend="attnfuse", fullgraph=True, options={"inner": inner})
    capture = _inductor_capture() if inner == "inductor" else contextlib.nullcontext()
    with torch.no_grad():
        with capture as graphs:
            ours = _out(compiled(*args, **kwargs))
        report = attnfuse.last_report()
        eager = _out(model(*args, **kwargs))
        want = _out(ref(*map(_double, args), **{k: _double(v) for k, v in kwargs.items()})) if ref else eager
    assert not report.skipped, str(report)
    assert site_count(report) == (sites, sites), str(report)
    if graphs is not None:
        assert graphs.count(_FWD) == sites, graphs.targets
    assert len(ours) == len(eager) == len(want) > 0
    for o, e, r in zip(ours, eager, want, strict=True):
        if ref is None:
            torch.testing.assert_close(o, e)
        else:
            assert_2x(o, e, r)
    return report


# --- every site fused, output equals eager -------------------------------------------------------

@pytest.mark.slow
def test_gpt2_inductor():
    report = _compile_check(gpt2(), (_ids(13),), {}, sites=2)
    assert all(s.mask["kind"] == "causal" for s in report.sites), str(report)


def test_bert_padding_mask():
    report = _compile_check(bert(), (_ids(13),), {"attention_mask": _padding_mask(13)}, sites=2, inner="eager")
    assert all(s.mask["kind"] == "padding" for s in report.sites), str(report)  # a (B, 1, 1, Lk) key vector


@pytest.mark.slow
def test_llama_gqa_inductor():
    report = _compile_check(llama(), (_ids(17),), {}, sites=2)
    assert all(s.kv_groups == 2 and s.mask["kind"] == "causal" for s in report.sites), str(report)


def test_llama_left_padding():
    # the padded rows of the second sequence mask every key with finfo.min: softmax is uniform, not NaN
    mask = torch.ones(BATCH, 13, dtype=torch.long)
    mask[1, :5] = 0
    _compile_check(llama(), (_ids(13),), {"attention_mask": mask}, sites=2, inner="eager", reference="eager")


def test_llama_new_lengths_stay_fused():
    """A second length recompiles with a symbolic length; the causal mask and GQA are still recognized."""
    model = llama().eval()
    compiled = torch.compile(model, backend="attnfuse", fullgraph=True, options={"inner": "eager"})
    for length in (13, 17, 9):  # 17 compiles the dynamic graph, 9 reuses it
        ids = _ids(length)
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits)
        report = attnfuse.last_report()
        assert site_count(report) == (2, 2), str(report)
        assert all(s.kv_groups == 2 and s.mask["kind"] == "causal" for s in report.sites), str(report)


def test_mistral_sliding_window():
    report = _compile_check(mistral(), (_ids(13),), {}, sites=2, inner="eager")
    # a window of 8 over 13 tokens is not the plain causal mask, so it must not be folded into causal=True
    assert all(s.kv_groups == 2 and s.mask["kind"] != "causal" for s in report.sites), str(report)


def test_t5_self_cross_and_position_bias():
    kwargs = {"input_ids": _ids(13), "decoder_input_ids": _ids(7)}
    report = _compile_check(t5(), (), kwargs, sites=6, inner="eager")  # 2 x (enc self) + 2 x (dec self + cross)
    assert all(s.scale == 1.0 for s in report.sites), str(report)  # T5 does not scale the scores
    cross = [s for s in report.sites if "EncDecAttention" in s.module]
    # self attention adds the relative position bias; cross attention's is torch.zeros, proven and dropped
    assert all("bias" in s.mask["kind"] for s in report.sites if s not in cross), str(report)
    assert all(s.mask["kind"] == "none" for s in cross), str(report)
    assert len(cross) == 2 and all(s.shapes["q"][2] == 7 and s.shapes["k"][2] == 13 for s in cross), str(report)


def test_vit():
    _compile_check(vit(), (torch.randn(BATCH, 3, 32, 32),), {}, sites=2, inner="eager")  # 16 patches + CLS = 17


@pytest.mark.slow
def test_nanogpt_inductor():
    report = _compile_check(nanogpt(), (_ids(13),), {}, sites=2)
    assert all(s.mask["kind"] == "causal" for s in report.sites), str(report)


def test_multihead_attention():
    x, memory = torch.randn(BATCH, 13, 32), torch.randn(BATCH, 17, 32)
    padding = torch.zeros(BATCH, 13, dtype=torch.bool)
    padding[1, 9:] = True
    report = _compile_check(TwoMHA(), (x, memory, padding), {}, sites=2, inner="eager")
    assert all(s.pattern == "multi_head_attention_forward" for s in report.sites), str(report)


# --- training: gradients equal eager's -------------------------------------------------------------

def _train_check(model, length: int, sites: int) -> None:
    model.train()  # the configs set every dropout probability to 0
    ref = copy.deepcopy(model).double()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="attnfuse", fullgraph=True)
    ids, target = _ids(length), _ids(length)

    def step(m):
        logits = m(ids).logits
        F.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
        return logits.detach()

    with _inductor_capture() as graphs:
        ours = step(compiled)
    report = attnfuse.last_report()
    assert not report.skipped, str(report)
    assert site_count(report) == (sites, sites), str(report)
    assert graphs.count(_FWD) == sites and graphs.count(_BWD) == sites, graphs.targets
    assert_2x(ours, step(eager), step(ref), "logits")
    params = list(zip(model.named_parameters(), eager.parameters(), ref.parameters(), strict=True))
    assert len(params) == len(list(eager.parameters())) > 0
    for (name, p), e, r in params:
        assert p.grad is not None and e.grad is not None, name
        assert_2x(p.grad, e.grad, r.grad, f"grad of {name}")


@pytest.mark.slow
def test_gpt2_training_step():
    _train_check(gpt2(), 13, sites=2)


@pytest.mark.slow
def test_llama_training_step():
    _train_check(llama(), 17, sites=2)


# --- stock torch.compile leaves these sites unfused on CPU ---------------------------------------

def _stock_attention_ops(model, *args, **kwargs) -> tuple[int, list[str]]:
    """(Inductor's fuse_attention count, attention ops in its post-grad graph) under stock torch.compile."""
    counters.clear()
    with _inductor_capture() as graphs, torch.no_grad():
        torch.compile(model.eval(), backend="inductor", fullgraph=True)(*args, **kwargs)
    return counters["inductor"]["fuse_attention"], [t for t in graphs.targets if "attention" in t]


def _attnfuse_graph_ops(model, *args, **kwargs) -> list[str]:
    """The ops of the graph the attnfuse backend hands to its inner compiler (here: eager)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(attnfuse_backend(gm, example_inputs, {"inner": "eager"}))
        return graphs[-1]

    with torch.no_grad():
        torch.compile(model.eval(), backend=backend, fullgraph=True)(*args, **kwargs)
    return [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]


class _InductorPattern1(nn.Module):
    """Inductor's own ``_sfdp_pattern_1`` spelling: shows the stock detector below can fire."""

    def forward(self, q, k, v):
        return torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(q.shape[-1])).softmax(dim=-1).matmul(v)


def test_stock_inductor_detector_fires_on_its_own_pattern():
    fused, ops = _stock_attention_ops(_InductorPattern1(), *(torch.randn(BATCH, 4, 13, 8) for _ in range(3)))
    assert fused == 1 and ops == ["aten._scaled_dot_product_flash_attention_for_cpu.default"], (fused, ops)


@pytest.mark.slow
@pytest.mark.parametrize("build, kwargs", [
    (gpt2, {}),
    (bert, {"attention_mask": _padding_mask(13)}),  # (without a mask, Inductor's sfdp patterns do fuse BERT)
    (llama, {}),
    (nanogpt, {}),
], ids=["gpt2", "bert", "llama", "nanogpt"])
def test_stock_inductor_leaves_attention_unfused(build, kwargs):
    model, ids = build(), _ids(13)
    fused, ops = _stock_attention_ops(model, ids, **kwargs)
    assert fused == 0 and ops == [], f"stock Inductor fused {fused} site(s): {ops}"
    torch._dynamo.reset()
    ours = _attnfuse_graph_ops(model, ids, **kwargs)
    assert ours.count(_FWD) == 2, ours
    assert not [t for t in ours if "softmax" in t], ours  # no unfused softmax is left
