"""A tiny T6-style decoder (Tensor Product Attention, arXiv 2501.06425), written from the paper, and its MHA twin.

Pure torch, random seeded weights, no downloads; `benchmarks/bench_tpa.py` and the tests import it.

`T6(vocab, dim, layers, heads, head_dim, q_rank, rank, spelling="bmm")`: token embedding, ``layers`` pre-norm
blocks (RMSNorm -> TPA attention -> residual, RMSNorm -> SwiGLU MLP -> residual), a final RMSNorm and a linear head.
The TPA block, from the hidden state ``x`` (B, T, dim), as the paper's reference code writes it:

* six bias-free linear projections give the per-token factors ``A_q`` (B, T, H, R_q), ``A_k``, ``A_v``
  (B, T, H, R) and ``B_q`` (B, T, R_q, D), ``B_k``, ``B_v`` (B, T, R, D);
* RoPE (rotate-half, over D, base 10000) is applied to ``B_q`` and ``B_k`` at the absolute token positions
  (offset by the cache length in decode);
* ``q = A_q B_q / R_q`` per token, ``k = A_k B_k / R``, ``v = A_v B_v / R`` (B, T, H, D), written as ``spelling``
  (`SPELLINGS`, all the same values): ``"bmm"`` views to (B*T, H, R) and (B*T, R, D), ``torch.bmm``, ``.div_(R)``
  and views back (the reference code); ``"matmul"`` a 4-D ``torch.matmul`` then ``/ R``; ``"einsum"``
  ``"bthr,btrd->bthd"`` then ``/ R``;
* ``F.scaled_dot_product_attention`` over (B, H, T, D) (default scale 1/sqrt(D)): ``is_causal=True`` without a
  cache, no mask for a single decode token over a cache, a bottom-right causal bool mask for several new tokens
  over a cache; then the output projection (H*D -> dim).

Cache (`Cache`, grown with ``torch.cat`` every step as HF's dynamic cache does, nothing preallocated): per layer
the FACTORS ``(A_k, B_k, A_v, B_v)``, ``A`` (B, L, H, R) and ``B`` (B, L, R, D) concatenated along L, ``B_k``
after RoPE -- ``R * (H + D)`` numbers per token for K and as many for V.  Each decode step re-forms K and V of the
whole cache from the cached factors and calls SDPA: "the model as written", which never benefits from the factors.

`MHA(vocab, dim, layers, heads, head_dim)`: the same decoder with plain multi-head attention (q/k/v linear to
H*D, RoPE on q and k) and a plain K/V cache ``(k, v)``, each (B, H, L, D): ``H * D`` numbers per token for K and
as many for V.

Calling a model: ``model(tokens)`` -> logits (B, T, vocab); ``model(tokens, past, use_cache=True)`` -> (logits,
present), ``past``/``present`` a tuple per layer of the cache tensors (what ``torch.compile`` sees as inputs and
outputs).  ``model.generate_step(tokens, cache, fn=None)`` runs one step through ``fn`` (default the model itself;
pass its compiled form), updates ``cache`` and returns the last position's logits (B, vocab).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

SPELLINGS = ("bmm", "matmul", "einsum")


def product(a: torch.Tensor, b: torch.Tensor, spelling: str) -> torch.Tensor:
    """The per-token product ``a @ b / R``: a (B, T, H, R), b (B, T, R, D) -> (B, T, H, D), spelled ``spelling``."""
    bsz, t, h, r = a.shape
    d = b.shape[-1]
    if spelling == "bmm":
        return torch.bmm(a.view(bsz * t, h, r), b.view(bsz * t, r, d)).div_(r).view(bsz, t, h, d)
    if spelling == "matmul":
        return torch.matmul(a, b) / r
    if spelling == "einsum":
        return torch.einsum("bthr,btrd->bthd", a, b) / r
    raise ValueError(f"t6_model: spelling {spelling!r}; choose from {', '.join(SPELLINGS)}")


def rope(x: torch.Tensor, offset: Any, base: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE over the last dim of ``x`` (B, T, N, D) at positions ``offset .. offset + T - 1``."""
    d = x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    pos = torch.arange(offset, offset + x.shape[1], device=x.device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)[None, :, None, :]
    cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cached: bool) -> torch.Tensor:
    """Causal SDPA of (B, H, T, D) queries over (B, H, S, D) keys, the T queries being the last T positions."""
    t, s = q.shape[2], k.shape[2]
    if not cached:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if t == 1:
        return F.scaled_dot_product_attention(q, k, v)
    mask = torch.arange(s, device=q.device)[None, :] <= torch.arange(s - t, s, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class TPAttention(nn.Module):
    """Tensor Product Attention (module docstring); its cache entry is ``(A_k, B_k, A_v, B_v)``."""

    cache_seq_dim = 1  # the token axis of the cache tensors

    def __init__(self, dim: int, heads: int, head_dim: int, q_rank: int, rank: int, spelling: str = "bmm") -> None:
        super().__init__()
        if spelling not in SPELLINGS:
            raise ValueError(f"t6_model: spelling {spelling!r}; choose from {', '.join(SPELLINGS)}")
        self.heads, self.head_dim, self.q_rank, self.rank, self.spelling = heads, head_dim, q_rank, rank, spelling
        self.a_q = nn.Linear(dim, heads * q_rank, bias=False)
        self.a_k = nn.Linear(dim, heads * rank, bias=False)
        self.a_v = nn.Linear(dim, heads * rank, bias=False)
        self.b_q = nn.Linear(dim, q_rank * head_dim, bias=False)
        self.b_k = nn.Linear(dim, rank * head_dim, bias=False)
        self.b_v = nn.Linear(dim, rank * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, dim, bias=False)

    def factors(self, x: torch.Tensor, offset: Any) -> tuple[torch.Tensor, ...]:
        """(A_q, B_q, A_k, B_k, A_v, B_v) of ``x`` (B, T, dim), RoPE at positions from ``offset`` on B_q, B_k."""
        b, t, _ = x.shape
        h, d, rq, r = self.heads, self.head_dim, self.q_rank, self.rank
        a_q, a_k, a_v = self.a_q(x).view(b, t, h, rq), self.a_k(x).view(b, t, h, r), self.a_v(x).view(b, t, h, r)
        b_q = rope(self.b_q(x).view(b, t, rq, d), offset)
        b_k = rope(self.b_k(x).view(b, t, r, d), offset)
        b_v = self.b_v(x).view(b, t, r, d)
        return a_q, b_q, a_k, b_k, a_v, b_v

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, ...] | None = None):
        b, t, _ = x.shape
        a_q, b_q, a_k, b_k, a_v, b_v = self.factors(x, 0 if past is None else past[0].shape[1])
        if past is not None:
            a_k, b_k, a_v, b_v = (torch.cat((p, n), dim=1) for p, n in zip(past, (a_k, b_k, a_v, b_v)))
        q = product(a_q, b_q, self.spelling).transpose(1, 2)
        k = product(a_k, b_k, self.spelling).transpose(1, 2)
        v = product(a_v, b_v, self.spelling).transpose(1, 2)
        out = attend(q, k, v, past is not None)
        return self.o(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)), (a_k, b_k, a_v, b_v)

    def cache_shapes(self, batch: int, length: int) -> list[tuple[int, ...]]:
        h, d, r = self.heads, self.head_dim, self.rank
        return [(batch, length, h, r), (batch, length, r, d)] * 2


class MHAttention(nn.Module):
    """Plain multi-head attention (q/k/v linear to H*D, RoPE on q and k); its cache entry is ``(k, v)`` (B, H, L, D)."""

    cache_seq_dim = 2

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q, self.k, self.v = (nn.Linear(dim, heads * head_dim, bias=False) for _ in range(3))
        self.o = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, ...] | None = None):
        b, t, _ = x.shape
        h, d = self.heads, self.head_dim
        offset = 0 if past is None else past[0].shape[2]
        q = rope(self.q(x).view(b, t, h, d), offset).transpose(1, 2)
        k = rope(self.k(x).view(b, t, h, d), offset).transpose(1, 2)
        v = self.v(x).view(b, t, h, d).transpose(1, 2)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        out = attend(q, k, v, past is not None)
        return self.o(out.transpose(1, 2).reshape(b, t, h * d)), (k, v)

    def cache_shapes(self, batch: int, length: int) -> list[tuple[int, ...]]:
        return [(batch, self.heads, length, self.head_dim)] * 2


class MLP(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, dim: int, attn: nn.Module, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.RMSNorm(dim, eps=1e-6), attn
        self.norm2, self.mlp = nn.RMSNorm(dim, eps=1e-6), MLP(dim, hidden)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, ...] | None = None):
        a, present = self.attn(self.norm1(x), past)
        x = x + a
        return x + self.mlp(self.norm2(x)), present


@dataclasses.dataclass
class Cache:
    """A model's decode cache: ``layers`` (one tuple of cache tensors per layer; None before the first step) and
    ``length`` (tokens cached).  Grown with ``torch.cat`` by `Decoder.generate_step` (a new tuple each step; the
    old tensors are never written, so two caches may share them)."""

    layers: tuple[tuple[torch.Tensor, ...], ...] | None = None
    length: int = 0

    def numel(self) -> int:
        return sum(t.numel() for layer in self.layers or () for t in layer)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers or () for t in layer)


class Decoder(nn.Module):
    """Embedding, pre-norm blocks around ``attention()`` modules, final RMSNorm, linear head (module docstring)."""

    def __init__(self, vocab: int, dim: int, layers: int, attention, *, mlp_ratio: int = 2, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(vocab, dim)
            self.blocks = nn.ModuleList(Block(dim, attention(), mlp_ratio * dim) for _ in range(layers))
            self.norm = nn.RMSNorm(dim, eps=1e-6)
            self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, past: tuple | None = None, use_cache: bool = False):
        """Logits (B, T, vocab) of ``tokens`` (B, T) after ``past``; with ``use_cache`` (implied by ``past``) also
        the new cache tuple."""
        x = self.embed(tokens)
        present = []
        for i, block in enumerate(self.blocks):
            x, p = block(x, None if past is None else past[i])
            present.append(p)
        logits = self.head(self.norm(x))
        return (logits, tuple(present)) if use_cache or past is not None else logits

    def generate_step(self, tokens: torch.Tensor, cache: Cache, fn=None) -> torch.Tensor:
        """One step of ``tokens`` (B, T) after ``cache`` through ``fn`` (default: this model; pass its compiled
        form); ``cache`` updated; the last position's logits (B, vocab)."""
        logits, cache.layers = (self if fn is None else fn)(tokens, cache.layers, use_cache=True)
        cache.length += tokens.shape[1]
        return logits[:, -1]

    @property
    def cache_seq_dim(self) -> int:
        """The token axis of every cache tensor."""
        return self.blocks[0].attn.cache_seq_dim

    def cache_numel_per_token(self) -> int:
        """Numbers one token adds to the cache of one layer, K and V together."""
        return sum(torch.Size(s).numel() for s in self.blocks[0].attn.cache_shapes(1, 1))

    def random_cache(self, batch: int, length: int, generator: torch.Generator | None = None) -> Cache:
        """A cache of ``length`` tokens filled with N(0, 1) numbers of the right shapes, dtype and device (instead of
        a prefill: the decode cost does not depend on the values)."""
        p = self.head.weight
        layers = tuple(tuple(torch.randn(s, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
                             for s in block.attn.cache_shapes(batch, length)) for block in self.blocks)
        return Cache(layers, length)


class T6(Decoder):
    """The T6-style decoder with TPA attention (module docstring)."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, head_dim: int, q_rank: int, rank: int,
                 spelling: str = "bmm", *, mlp_ratio: int = 2, seed: int = 0) -> None:
        if spelling not in SPELLINGS:
            raise ValueError(f"t6_model: spelling {spelling!r}; choose from {', '.join(SPELLINGS)}")
        super().__init__(vocab, dim, layers, lambda: TPAttention(dim, heads, head_dim, q_rank, rank, spelling),
                         mlp_ratio=mlp_ratio, seed=seed)


class MHA(Decoder):
    """The same decoder with plain multi-head attention and a plain K/V cache (module docstring)."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, head_dim: int, *, mlp_ratio: int = 2,
                 seed: int = 0) -> None:
        super().__init__(vocab, dim, layers, lambda: MHAttention(dim, heads, head_dim), mlp_ratio=mlp_ratio,
                         seed=seed)
