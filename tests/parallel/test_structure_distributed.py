"""Mask structure survives distributed training's graph splits (`attnfuse._crossgraph`): DDP with buckets small
enough that DDPOptimizer splits the graph, and FSDP2 with each decoder layer compiled on its own, train a tiny
left-padded LLaMA for two steps with losses equal to eager's, and the attention sites after the split report
their padded causal structure (not dense).  2 gloo ranks on 127.0.0.1."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from _dist import run

if importlib.util.find_spec("transformers") is None:  # not imported here: the spawned ranks import this module
    pytest.skip("transformers is not installed", allow_module_level=True)

LENGTH, VOCAB = 29, 96


def _model(impl: str):
    import sys

    # tests/conftest.py's .venv/corpus-libs (a torchvision that loads only after conftest's fix) reaches the spawned
    # processes through sys.path; transformers must not find it there
    sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("corpus-libs")]
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=2048, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                   attention_dropout=0.0, pad_token_id=0, attn_implementation=impl)
    return transformers.LlamaForCausalLM(cfg)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, LENGTH), generator=g)
    am = torch.ones(2, LENGTH, dtype=torch.long)
    am[1, :7] = 0  # left padding
    return ids, am


def _losses(model, steps: int = 2) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids, am = _batch()
    out = []
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=am, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(float(loss))
    return out


def _collect_reports() -> list:
    """Every report attnfuse publishes in this process (dense graphs and structured variants)."""
    import attnfuse._publish as publish

    reports, original = [], publish.publish

    def keep(report, config):
        reports.append(report)
        original(report, config)

    publish.publish = keep
    return reports


def _check(reports, eager: list[float], got: list[float], what: str, source: str) -> None:
    assert all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(got, eager)), (what, got, eager)
    from attnfuse import _crossgraph

    structured = [s for r in reports for s in r.sites if s.mask.get("source") == getattr(_crossgraph, source)]
    assert structured, f"{what}: no site got structure across the split: " + "\n".join(map(str, reports))
    assert all("causal" in s.mask["kind"] and "padding" in s.mask["kind"] for s in structured), structured


def _ddp(rank: int, ranks: int, impl: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    reports = _collect_reports()
    model = _model(impl)
    eager = _losses(copy.deepcopy(model))
    ddp = DDP(model, bucket_cap_mb=1)  # a layer (1.6 MB) per bucket: DDPOptimizer splits the graph between them
    compiled = torch.compile(ddp, backend="attnfuse", options={"inner": "eager"})
    # the mask is built in an earlier submodule of the split graph: a run-time certificate
    _check(reports, eager, _losses(compiled), f"DDP {impl}", "EARLIER")


def _fsdp(rank: int, ranks: int, impl: str) -> None:
    from torch.distributed.fsdp import fully_shard

    reports = _collect_reports()
    model = _model(impl)
    eager = _losses(copy.deepcopy(model))
    for layer in model.model.layers:
        layer.compile(backend="attnfuse", options={"inner": "eager"})
        fully_shard(layer)
    fully_shard(model)
    # each compiled layer reads the mask HF built in eager code: its values are verified once per step
    _check(reports, eager, _losses(model), f"FSDP2 {impl}", "VERIFIED")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_ddp_split_graph_keeps_structure(impl):
    run(_ddp, 2, impl, timeout=600)


def test_fsdp2_per_layer_compile_keeps_structure():
    run(_fsdp, 2, "sdpa", timeout=600)
