"""Tensor parallelism (issue 18, part 3): attention heads sharded with DTensor, compiled through attnfuse.

Each test starts 2 gloo processes (`_dist.run`).  Every rank builds the same model from the same seed, keeps an
unsharded float32 copy (eager, the baseline) and a float64 copy (the reference), and shards the original with
``parallelize_module`` on a 1-D DeviceMesh: q/k/v ``ColwiseParallel`` (each rank computes half of the heads),
output projection ``RowwiseParallel`` (partial products all-reduced).  With ``use_local_output=True`` attention
sees plain tensors holding the rank's LOCAL heads: the sites must be fused there, with the local head count in the
report, and the outputs (and, for training, the gradients) must equal the single-process run's.

With ``use_local_output=False`` attention itself runs on DTensors; attnfuse's ops have no DTensor sharding rule,
so such a site must stay unfused with the reason (and the model must still run as eager).

Tolerance: DESIGN.md's 2x rule against the float64 copy (``assert_2x``).  Tensor parallelism adds roundings eager
does not have: the row-wise projection adds the ranks' partial products after the all-reduce (and backward sums
the column-wise input gradients the same way), a different summation order than one matmul.  Re-associating a sum
of two partial sums costs one extra rounding of at most ``eps`` times their magnitudes, which (these projections'
terms do not cancel) is of the order of the result's own magnitude; ``assert_2x``'s floor, ``4 eps`` times the
result's largest magnitude, covers it and nothing more (measured: the TP errors stay below 2x eager's anyway).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from _dist import run

HEADS, KV_HEADS, HIDDEN, RANKS = 4, 2, 64, 2


def _tp_plan(local: bool = True) -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {"q": ColwiseParallel(use_local_output=local), "k": ColwiseParallel(use_local_output=local),
            "v": ColwiseParallel(use_local_output=local), "o": RowwiseParallel()}


def _shard(module: nn.Module, names: dict[str, str], local: bool = True) -> None:
    """``parallelize_module`` with q/k/v column-wise and the output projection row-wise (``names`` maps the plan's
    q/k/v/o to the module's attribute names)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (RANKS,))
    parallelize_module(module, mesh, {names[k]: style for k, style in _tp_plan(local).items()})


def _check(ours: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    from _util import assert_2x

    assert_2x(ours.detach(), eager.detach(), ref.detach(), what)  # its floor covers the all-reduce (docstring)


def _local_heads(report, what: str, heads: int, kv_heads: int) -> None:
    """Every site of ``report`` fused, on the rank's local heads."""
    assert report is not None and report.sites and not report.skipped, f"{what}: {report}"
    for site in report.sites:
        assert site.shapes["q"][1] == heads and site.shapes["k"][1] == kv_heads, f"{what}: {report}"


# --- 1. a tiny HF LLaMA (eager and SDPA attention), its q/k/v/o projections sharded ----------------------------

def _llama(impl: str):
    import transformers  # (tests/parallel/_dist.py keeps .venv/corpus-libs' torchvision off a rank's path)

    cfg = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=128,
                                   attention_dropout=0.0, attn_implementation=impl)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    base = copy.deepcopy(model)
    for layer in model.model.layers:
        _shard(layer.self_attn, {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"})
    return model, base


def _llama_forward(rank: int, ranks: int) -> None:
    import attnfuse

    for impl in ("eager", "sdpa"):  # Inductor compiles the training step's graphs (test 3)
        model, base = _llama(impl)
        torch.manual_seed(1)
        ids = torch.randint(3, 128, (2, 19))
        compiled = torch.compile(model.eval(), backend="attnfuse", fullgraph=True, options={"inner": "eager"})
        with torch.no_grad():
            ours = compiled(ids).logits
            report = attnfuse.last_report()
            eager, ref = base.eval()(ids).logits, copy.deepcopy(base).double()(ids).logits
        assert len(report.fused) == 2, f"{impl}: {report}"
        _local_heads(report, impl, HEADS // ranks, KV_HEADS // ranks)
        assert all(s.mask["kind"] == "causal" and s.kv_groups == HEADS // KV_HEADS for s in report.sites), str(report)
        _check(ours, eager, ref, f"rank {rank} {impl} logits")


def test_llama_heads_sharded_forward():
    run(_llama_forward, RANKS, timeout=600)


# --- 2. hand-written attention: SDPA and matmul-softmax-matmul spellings ------------------------------------------

class _Attention(nn.Module):
    """Self-attention (causal unless ``causal=False``); ``-1`` heads in the view, so a rank's local projection
    gives its local heads."""

    def __init__(self, spelling: str, causal: bool = True) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
        self.spelling, self.causal, self.head_dim = spelling, causal, HIDDEN // HEADS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.spelling == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if self.causal:
                s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=x.device).tril(), float("-inf"))
            y = torch.softmax(s, dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


def _handwritten(rank: int, ranks: int) -> None:
    import attnfuse

    names = {c: c for c in "qkvo"}
    for spelling in ("sdpa", "matmul"):
        torch.manual_seed(0)
        model = _Attention(spelling)
        base = copy.deepcopy(model)
        _shard(model, names)
        x = torch.randn(2, 97, HIDDEN)
        compiled = torch.compile(model, backend="attnfuse", fullgraph=True, options={"inner": "eager"})
        with torch.no_grad():
            ours, report = compiled(x), attnfuse.last_report()
            eager, ref = base(x), copy.deepcopy(base).double()(x.double())
        assert len(report.fused) == 1, f"{spelling}: {report}"
        _local_heads(report, spelling, HEADS // ranks, HEADS // ranks)
        assert report.sites[0].mask["kind"] == "causal", str(report)
        _check(ours, eager, ref, f"rank {rank} {spelling}")
    # attention on DTensors (use_local_output=False; SDPA's CPU kernel has no DTensor rule, and a plain mask tensor
    # cannot meet a DTensor, so the unmasked matmul spelling): attnfuse's op would have no sharding rule either, so
    # the site stays unfused, with why, and runs as eager
    torch.manual_seed(0)
    model = _Attention("matmul", causal=False)
    base = copy.deepcopy(model)
    _shard(model, names, local=False)
    x = torch.randn(2, 97, HIDDEN)
    compiled = torch.compile(model, backend="attnfuse", fullgraph=True, options={"inner": "eager"})
    with torch.no_grad():
        ours, report = compiled(x), attnfuse.last_report()
        eager, ref = base(x), copy.deepcopy(base).double()(x.double())
    assert len(report.sites) == 1 and not report.fused, str(report)
    assert "DTensor" in report.sites[0].reason and "tensor subclass" in report.sites[0].reason, str(report)
    _check(ours, eager, ref, f"rank {rank} DTensor attention")


def test_handwritten_heads_sharded():
    run(_handwritten, RANKS, timeout=600)


# --- 3. one training step: gradients of the sharded weights are the unsharded run's shards ----------------------

def _training(rank: int, ranks: int) -> None:
    import attnfuse

    model, base = _llama("eager")
    ref = copy.deepcopy(base).double()
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (2, 19))
    compiled = torch.compile(model.train(), backend="attnfuse", fullgraph=True)
    compiled(ids, labels=ids).loss.backward()
    report = attnfuse.last_report()
    assert len(report.fused) == 2, str(report)
    _local_heads(report, "training", HEADS // ranks, KV_HEADS // ranks)
    base.train()(ids, labels=ids).loss.backward()
    ref.train()(ids, labels=ids).loss.backward()
    params = dict(model.named_parameters())
    for name, want in base.named_parameters():
        got, full = params[name].grad, dict(ref.named_parameters())[name].grad
        assert got is not None and want.grad is not None, name
        if hasattr(got, "full_tensor"):  # a DTensor gradient: this rank's shard is the unsharded grad's chunk
            placement = got.placements[0]
            local, chunk = got.to_local(), want.grad.chunk(ranks, placement.dim)[rank]
            assert placement.is_shard() and local.shape == chunk.shape, (name, got.placements, local.shape)
            _check(local, chunk, full.chunk(ranks, placement.dim)[rank], f"rank {rank} grad {name}")
            got = got.full_tensor()
        _check(got, want.grad, full, f"rank {rank} grad {name}")
    assert any(hasattr(p.grad, "full_tensor") for p in model.parameters())


def test_llama_heads_sharded_training_step():
    run(_training, RANKS, timeout=600)
