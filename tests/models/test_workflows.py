"""Real workflows through the ``attnfuse`` backend, as users run them (issue 13, "Real workflows as tests").

* Static-cache generation: ``LlamaForCausalLM.generate(..., cache_implementation="static")`` with the
  forward compiled by attnfuse, for HF's ``eager`` and ``sdpa`` attention: the generated tokens are eager's
  and every step's logits match.  The cache is written with ``index_copy_`` whose result nobody reads.
* DeepSeek-V3 multi-head latent attention (q/k head dim 24 != v head dim 12; the keys are built with
  ``new_empty`` and two ``copy_`` into slices): equal to eager over three calls with fresh inputs, dense
  (one graph) and with MoE layers (graph breaks).  Plus the minimal in-place case of the issue and an
  unrelated in-place op in a graph that also holds a fused site.
* Training through a graph break: GPT-2 with ``labels=`` (HF's loss breaks the graph), ``loss.backward()``:
  loss and gradients equal eager's, and the report of the call (``last_report()``, ``options["report"]``,
  ``$ATTNFUSE_REPORT``) covers every graph: one site per layer, ids in source order.

Tiny random configs, float32 on CPU, odd lengths.  Every check compares against eager (or a float64 copy
with the 2x rule), so a dropped side effect, a wrong layout or a partial report fails here.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from _util import assert_2x
from torch._dynamo.utils import counters

import attnfuse

transformers = pytest.importorskip("transformers")

VOCAB = 128


def _ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length))


def _no_silent_skip(report) -> None:
    """Every site is either fused or skipped with a reason."""
    assert all(s.status == "fused" or s.reason for s in report.sites), str(report)


# --- 1. static-cache generation ------------------------------------------------------------------

PROMPT, NEW_TOKENS = 11, 6


def _llama(attn: str):
    # initializer_range 0.2 (not 0.02): the logits of the random model are spread, so greedy decoding
    # picks varying tokens and a wrong cache changes them
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation=attn,
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, attention_dropout=0.0, initializer_range=0.2)
    return transformers.LlamaForCausalLM(cfg).eval()


def _generate(model, ids):
    # disable_compile: generate must not wrap the forward in its own torch.compile (it would on CUDA)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             cache_implementation="static", return_dict_in_generate=True, output_logits=True,
                             disable_compile=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits)  # (B, new), (new, B, V)


def _compile_forward(model, options: dict) -> list:
    """Replace ``model.forward`` by its attnfuse-compiled version; returns the list that collects the report
    of every graph the compiled forward produced (one per distinct ``last_report()`` seen after a call)."""
    compiled = torch.compile(model.forward, backend="attnfuse", fullgraph=True, options=options)
    reports: list = []

    @functools.wraps(model.forward)
    def forward(*args, **kwargs):
        out = compiled(*args, **kwargs)
        report = attnfuse.last_report()
        if report is not None and all(report is not r for r in reports):
            reports.append(report)
        return out

    model.forward = forward
    return reports


@pytest.mark.parametrize("inner", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_static_cache_generation(attn, inner):
    model = _llama(attn)
    ids = _ids(2, PROMPT)
    want_tokens, want_logits = _generate(model, ids)
    assert len(set(want_tokens.flatten().tolist())) >= 4, f"degenerate random model: {want_tokens}"

    reports = _compile_forward(model, {"inner": inner})
    tokens, logits = _generate(model, ids)

    step_err = [f"{(a - b).abs().max().item():.2g}" for a, b in zip(logits, want_logits)]
    assert torch.equal(tokens, want_tokens), f"tokens {tokens.tolist()} != eager {want_tokens.tolist()}; " \
                                             f"max |logits - eager| per step: {step_err}"
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4, msg=lambda m: f"{m}\nper step: {step_err}")

    # prefill (Lq = 11) and decode (Lq = 1) are separate graphs; each holds one site per layer
    assert len(reports) >= 2, [str(r) for r in reports]
    text = "\n".join(map(str, reports))
    assert all(len(r.sites) == model.config.num_hidden_layers for r in reports), text
    for r in reports:
        _no_silent_skip(r)
    assert any(r.fused for r in reports), text


def test_static_cache_prefill_keys_are_not_weights():
    """The prefill graph creates the static cache (``torch.zeros``) and fills it with ``index_copy_`` of the
    computed keys: the keys depend on the inputs through that in-place write, so the site is attention, not
    a classifier over learned weights (fusing it is optional; a skip must give a true reason)."""
    model = _llama("eager")
    reports = _compile_forward(model, {"inner": "eager"})
    with torch.no_grad():
        model.generate(_ids(2, PROMPT), max_new_tokens=1, do_sample=False, cache_implementation="static",
                       disable_compile=True)
    assert len(reports) == 1 and len(reports[0].sites) == model.config.num_hidden_layers, [str(r) for r in reports]
    _no_silent_skip(reports[0])
    assert not [s for s in reports[0].skipped if "learned weights" in s.reason], str(reports[0])


# --- 2. DeepSeek-V3 multi-head latent attention, and in-place ops beside a fused site ----------------

def _deepseek(moe: bool):
    layers = 2
    cfg = transformers.DeepseekV3Config(
        vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=32, intermediate_size=64,
        moe_intermediate_size=16, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1 if moe else layers, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=64, num_mtp_layers=0,
        attn_implementation="eager", experts_implementation="eager")
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    assert cfg.qk_nope_head_dim + cfg.qk_rope_head_dim != cfg.v_head_dim
    return model


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_deepseek_v3_mla(moe):
    """The keys are ``new_empty`` + ``copy_`` into two slices: dropping the copies leaves garbage or NaN.

    Dense: one graph (``fullgraph=True``).  MoE: the eager experts loop breaks the graph (12 graphs on the
    first call, each attention module its own frame), and the report of that call must still hold one site
    per layer.  (HF's softmax runs in float32 even in a float64 copy,
    so the reference is eager float32 with a tight tolerance.)"""
    model = _deepseek(moe)
    layers = model.config.num_hidden_layers
    compiled = torch.compile(model, backend="attnfuse", fullgraph=not moe, options={"inner": "eager"})
    for call in range(3):  # fresh inputs each call: the wrong rewrite read uninitialized memory, varying per call
        ids = _ids(2, 13)
        with torch.no_grad():
            ours = compiled(ids, use_cache=False).logits
            eager = model(ids, use_cache=False).logits
        assert not ours.isnan().any(), f"call {call}: NaN in the compiled logits"
        torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5, msg=lambda m: f"call {call}: {m}")
        if call == 0:  # the call that compiled every graph (a later one may recompile only a piece of it)
            report = attnfuse.last_report()
            assert len(report.sites) == layers, str(report)
            _no_silent_skip(report)
            assert report.fused, str(report)
            for s in report.fused:  # MLA: q/k head dim 24, v head dim 12
                assert s.shapes["q"][-1] == s.shapes["k"][-1] == 24 and s.shapes["v"][-1] == 12, str(report)


def _inplace_attention(q, k, v, cache, idx):
    """The issue's minimal case: both in-place results are unused, both effects are read."""
    q = q.clone()
    q.mul_(q.shape[-1] ** -0.5)
    cache.index_copy_(2, idx, k)
    return torch.softmax(q @ cache.mT, dim=-1) @ v


def _unrelated_inplace(q, k, v, cache, idx):
    """A fused-looking site plus in-place code elsewhere in the graph that has nothing to do with it."""
    out = torch.softmax(q @ k.mT * q.shape[-1] ** -0.5, dim=-1) @ v
    cache.index_copy_(2, idx, q[:, :, : idx.numel()] * 2)
    cache[:, :, 0].fill_(-1.0)
    return out


@pytest.mark.parametrize("fn", [_inplace_attention, _unrelated_inplace], ids=["minimal", "unrelated"])
def test_inplace_ops_beside_attention(fn):
    compiled = torch.compile(fn, backend="attnfuse", fullgraph=True, options={"inner": "eager"})
    b, h, lq, lk, d = 2, 3, 7, 13, 8
    idx = torch.tensor([1, 4, 6, 9, 12])
    for call in range(2):
        q, v = torch.randn(b, h, lq, d), torch.randn(b, h, lk, d)
        k = torch.randn(b, h, idx.numel(), d) if fn is _inplace_attention else torch.randn(b, h, lk, d)
        cache = torch.randn(b, h, lk, d)
        ours_cache, eager_cache, ref_cache = cache.clone(), cache.clone(), cache.double()
        ours = compiled(q, k, v, ours_cache, idx)
        eager = fn(q, k, v, eager_cache, idx)
        ref = fn(q.double(), k.double(), v.double(), ref_cache, idx)
        assert torch.equal(ours_cache, eager_cache), f"call {call}: the cache was not written as eager writes it " \
            f"(rows equal to the old cache: {(ours_cache == cache).all(-1).sum().item()} of {b * h * lk})"
        assert_2x(ours, eager, ref, f"call {call}")
        report = attnfuse.last_report()
        assert len(report.sites) == 1, str(report)
        _no_silent_skip(report)


# --- 3. training through a graph break ----------------------------------------------------------

def _gpt2(layers: int):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                  attn_implementation="eager", n_positions=64, n_embd=32, n_layer=layers, n_head=4,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).train()  # every dropout probability is 0


def _check_covers_all(report, layers: int) -> None:
    text = str(report)
    assert len(report.sites) == layers, f"the report covers {len(report.sites)} of {layers} sites:\n{text}"
    assert [s.id for s in report.sites] == list(range(layers)), text
    assert [s.module.rsplit("transformer.", 1)[-1] for s in report.sites] == \
        [f"h.{i}.attn" for i in range(layers)], text  # source order
    assert len(report.fused) == layers, text
    assert report.graphs >= 2, f"the report counts {report.graphs} graph(s), the call compiled more:\n{text}"


@pytest.mark.parametrize("inner", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("dest", ["option", "env"])
def test_training_through_graph_break(dest, inner, tmp_path, monkeypatch):
    layers = 3
    model = _gpt2(layers)
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    path = tmp_path / "report.json"
    options = {"inner": inner}
    if dest == "option":
        options["report"] = str(path)
    else:
        monkeypatch.setenv("ATTNFUSE_REPORT", str(path))
    counters.clear()
    compiled = torch.compile(model, backend="attnfuse", options=options)
    ids = _ids(2, 13)

    def step(m):
        out = m(ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), out.logits.detach()

    loss, logits = step(compiled)
    graphs = counters["stats"]["unique_graphs"]
    report = attnfuse.last_report()
    assert graphs >= 2, f"HF's loss no longer breaks the graph ({graphs} graph): the test needs a break"

    (e_loss, e_logits), (r_loss, r_logits) = step(eager), step(ref)
    assert_2x(logits, e_logits, r_logits, "logits")
    assert_2x(loss, e_loss, r_loss, "loss")
    params = list(zip(model.named_parameters(), eager.parameters(), ref.parameters()))
    assert len(params) == len(list(model.parameters())) > 0
    for (name, p), e, r in params:
        assert p.grad is not None, name
        assert_2x(p.grad, e.grad, r.grad, f"grad of {name}")

    _check_covers_all(report, layers)
    assert path.exists(), "no JSON report was written"
    saved = attnfuse.Report.load(path)
    _check_covers_all(saved, layers)
    assert [(s.id, s.module, s.status) for s in saved.sites] == [(s.id, s.module, s.status) for s in report.sites]


def test_cross_entropy_spelled_out_is_not_a_site():
    """Negative twin for the break test: a graph with softmax (log_softmax in the loss) but no attention has
    no site, so the loss graph adds nothing to the merged report."""
    logits, target = torch.randn(13, VOCAB), torch.randint(0, VOCAB, (13,))
    compiled = torch.compile(F.cross_entropy, backend="attnfuse", fullgraph=True, options={"inner": "eager"})
    torch.testing.assert_close(compiled(logits, target), F.cross_entropy(logits, target))
    assert attnfuse.last_report().sites == []
