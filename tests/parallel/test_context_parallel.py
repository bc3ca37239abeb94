"""``options={"context_parallel": group}`` end to end: a model compiled through attnfuse on every rank's rows gives the
unsharded model's output rows and gradients (inputs per chunk; parameters summed over the ranks), for the eager and
SDPA spellings, causal / window / key-padding masks, Ulysses and ring, contiguous and zigzag layouts, 2 and 4 ranks;
the report says how each site spans the group, and a site whose mask has no global form stays as it was."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tests._util import assert_2x
from tests.parallel._dist import run


class Attention(nn.Module):
    """One attention block over (B, L, E) in one of several spellings; ``pad`` is a (B, L) key keep vector."""

    def __init__(self, spelling: str, heads: int = 4, kv_heads: int = 2, dim: int = 40, window: int = 5):
        super().__init__()
        self.spelling, self.heads, self.kv_heads, self.window = spelling, heads, kv_heads, window
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.o = nn.Linear(dim, dim)
        self.register_buffer("bias", torch.tril(torch.ones(64, 64, dtype=torch.bool)), persistent=False)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        groups = self.heads // self.kv_heads
        if self.spelling == "sdpa_causal":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif self.spelling == "sdpa_padding":  # HF's sdpa spelling: a bool keep mask over the keys
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=pad[:, None, None, :], enable_gqa=True)
        else:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            s = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
            if self.spelling == "eager_causal":  # nanoGPT: a tril buffer sliced to the (local) length
                s = s.masked_fill(~self.bias[:n, :n], float("-inf"))
            elif self.spelling == "eager_window":  # a band written with local positions
                i = torch.arange(n, device=x.device)
                band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.window)
                s = s.masked_fill(~band, float("-inf"))
            elif self.spelling in ("eager_causal_padding", "eager_causal_padding_min"):  # causal and padding
                i = torch.arange(n, device=x.device)
                keep = (i[None, :] <= i[:, None])[None, None] & pad[:, None, None, :]
                if self.spelling == "eager_causal_padding":
                    s = s.masked_fill(~keep, float("-inf"))
                else:  # HF's eager spelling: a finfo.min bias, whose rows without a visible key are uniform
                    s = s + torch.zeros(keep.shape, dtype=s.dtype).masked_fill(~keep, torch.finfo(s.dtype).min)
            elif self.spelling == "eager_dense":  # a mask that varies along the queries: no global form
                s = s + torch.sin(torch.arange(n, dtype=s.dtype, device=x.device))[:, None]
            out = torch.softmax(s, dim=-1) @ v
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


DECLINED = {"eager_dense": "varies along the queries", "eager_causal_padding_min": "finite fill"}


def _case(rank: int, ranks: int, spelling: str, strategy: str, layout: str, dtype: torch.dtype,
          inner: str = "eager", verify: bool = False) -> None:
    import attnfuse
    from attnfuse import parallel

    torch._dynamo.reset()  # each case compiles a new model: no recompile limit across cases
    torch.manual_seed(0)  # the same weights and inputs on every rank
    model = Attention(spelling).to(dtype)
    seq = 4 * ranks * 3  # zigzag needs an even local length
    x = torch.randn(2, seq, 40).to(dtype)
    pad = torch.ones(2, seq, dtype=torch.bool)
    pad[1, -5:] = False  # right padding in one batch row: every row still sees a key under causal
    grad = torch.randn(2, seq, 40).to(dtype)

    # the unsharded run, in the dtype and in float64
    runs = {}
    for name, dt in (("eager", dtype), ("ref", torch.float64)):
        ref_model = Attention(spelling).to(dt)
        ref_model.load_state_dict(model.state_dict())
        xi = x.detach().to(dt).requires_grad_(True)
        out = ref_model(xi, pad)
        out.backward(grad.to(dt))
        runs[name] = (out.detach(), xi.grad, ref_model.q.weight.grad, ref_model.kv.weight.grad)

    spec = {"group": dist.group.WORLD, "strategy": strategy, "layout": layout}
    cp = parallel.from_option(spec)
    # "eager": the rewritten graph as is (fast to build); "inductor": AOTAutograd traces the collectives
    compiled = torch.compile(model, backend="attnfuse", options={"context_parallel": spec, "inner": inner,
                                                                 "verify": verify}, fullgraph=True)
    x_local = parallel.shard(x, 1, cp).detach().requires_grad_(True)
    out = compiled(x_local, parallel.shard(pad, 1, cp))
    out.backward(parallel.shard(grad, 1, cp))
    report = attnfuse.last_report()
    if spelling in DECLINED:  # the site stays as written: attention over this rank's rows, as eager computes it
        assert [s.status for s in report.sites] == ["skipped"], str(report)
        reason = report.sites[0].reason
        assert "context parallelism" in reason and DECLINED[spelling] in reason, reason
        local = Attention(spelling).to(dtype)
        local.load_state_dict(model.state_dict())
        expected = local(parallel.shard(x, 1, cp), parallel.shard(pad, 1, cp))
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        return
    assert [s.status for s in report.sites] == ["fused"], str(report)
    entry = report.sites[0].context_parallel
    assert entry["ranks"] == ranks and entry["layout"] == layout and entry["reason"], entry
    assert entry["strategy"] == strategy, entry
    if verify:  # the original region sees one rank's rows: a context-parallel site is not compared with it
        assert report.sites[0].verify["passed"] is None and "context-parallel" in report.sites[0].verify["skipped"]

    def gathered(t: torch.Tensor) -> torch.Tensor:
        chunks = [torch.empty_like(t) for _ in range(ranks)]
        dist.all_gather(chunks, t.contiguous())
        return parallel.unshard(chunks, 1, cp)

    def summed(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    ours = (gathered(out.detach()), gathered(x_local.grad), summed(model.q.weight.grad), summed(model.kv.weight.grad))
    for i, what in enumerate(("out", "dx", "dWq", "dWkv")):
        # the parameters' gradients are sums over the ranks' rows: one more summation order than eager's
        assert_2x(ours[i], runs["eager"][i], runs["ref"][i], f"{spelling}/{strategy}/{layout}/{what}")


def _cases(rank: int, ranks: int, cases: list) -> None:
    for case in cases:
        _case(rank, ranks, *case)


F32 = torch.float32


def test_two_ranks():
    run(_cases, 2, [
        ("eager_causal", "ring", "zigzag", F32, "inductor"),
        ("sdpa_causal", "ulysses", "zigzag", F32, "inductor"),
        ("eager_causal", "ulysses", "contiguous", F32),
        ("sdpa_causal", "ring", "contiguous", F32, "eager", True),
        ("eager_window", "ring", "contiguous", F32),
        ("eager_window", "ulysses", "zigzag", F32),
        ("eager_causal_padding", "ring", "zigzag", F32),
        ("eager_causal_padding", "ulysses", "contiguous", F32),
        ("sdpa_padding", "ring", "contiguous", F32),
        ("sdpa_causal", "ring", "zigzag", torch.bfloat16),
        ("eager_dense", "ring", "contiguous", F32),
        ("eager_causal_padding_min", "ulysses", "contiguous", F32),
    ], timeout=600)


def test_four_ranks():
    run(_cases, 4, [
        ("eager_causal", "ring", "zigzag", F32),
        ("sdpa_causal", "ulysses", "contiguous", F32),
        ("eager_causal_padding", "ring", "contiguous", F32),
        ("sdpa_padding", "ulysses", "zigzag", F32),
    ], timeout=600)
