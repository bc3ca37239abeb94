"""LSH attention (Reformer, Kitaev et al. 2020) for separate queries and keys: O(N log N) memory, O(N*C*R) work.

Each query attends a subset of the keys chosen by hashing, in ``n_hashes`` rounds R, and the rounds are merged
into the exact softmax over the union of the keys they chose:

1. Asymmetric transform (Neyshabur & Srebro's MIPS reduction): per (batch, K/V head) ``M = max_j |k_j|``,
   ``k' = [k / M, sqrt(1 - |k|^2 / M^2)]``, ``q' = [q / |q|, 0]`` (dim D+1; zero norms give zero vectors), so
   that the angle between q' and k' orders keys by inner product with q.
2. Random rotations: ``n_buckets = max(2, 2 * round(L / (2 * bucket_size)))``; ``R`` (n_hashes, D+1,
   n_buckets/2) from ``torch.Generator().manual_seed(seed)`` on the CPU (every device hashes alike), shared by
   all heads; ``bucket(x) = argmax([x'R, -x'R])`` per round (`buckets`).
3. Per round and query head, the L queries and the L keys (of its K/V head) are sorted jointly: one sequence
   of 2L items ordered by (bucket, position, kind), a key before the query at the same (bucket, position).  It
   is cut into joint chunks of 2 * min(bucket_size, L) items, so a chunk holds about bucket_size queries and
   bucket_size keys when the buckets are balanced (n_buckets ~ L / bucket_size; with the asymmetric transform
   they are not: keys crowd a few buckets).  A query in joint chunk c attends the keys in joint chunks c and
   c-1, where c-1 wraps to the last chunk for c = 0 (as Reformer; with one chunk it is attended once).  A
   query and a key that share a bucket are thus attended when few items of that bucket lie between their
   positions.  With bucket_size >= L there is one chunk: every key is attended.  Causal: key
   position <= query position.  A query's own key is excluded inside the chunks and added once as an extra
   "self" term, so every row has a key.
4. Duplicates across rounds count once (Reformer's correction): with n_ij the number of rounds in which key j
   lies in one of query i's attended chunks, every round subtracts log(n_ij) from the pair's score.  The
   rounds and the self term merge by log-sum-exp, ``LSE_i = logsumexp(lse_1..R, s_ii)``,
   ``out_i = sum_r exp(lse_r - LSE) o_r + exp(s_ii - LSE) v_i``: exactly the softmax over the union of the
   attended keys.  With bucket_size >= L (one joint chunk) it is exact attention.

Paths.  Hashing, sorting and merging are torch ops on every path: `make_plan` sorts queries and keys separately
by (bucket, position) (the joint order restricted to each kind) and merges the two orders with searchsorted
into joint ranks, giving each token its joint chunk and each chunk its first query and key rank; a chunk's
queries (keys) are consecutive in the query (key) order.  On CUDA tensors (CPU ones under
``TRITON_INTERPRET=1``) the chunk attention is Triton: `_fwd_kernel` (per tile of consecutive sorted queries
and (batch, head, round): the keys of the chunks c_lo - 1..c_hi adjacent to the tile's chunks c_lo..c_hi, one
contiguous, possibly wrapping range of key ranks, masked to the pairs of the round; -log2 n_ij computed in the
kernel from every round's chunk ids, O(R) per pair) writes each round's normalized output and log2-sum-exp
at the queries' original positions; the backward kernels (`_bwd_dq_kernel` per query tile, `_bwd_dkdv_kernel`
per key tile over the group's query heads and the queries of the chunks c_lo..c_hi + 1 that attend it) need
no per-round output: with the merged LSE the round's probabilities are ``exp(s - log n - LSE)`` and
``dS = P (dP - Delta)``, ``Delta = rowsum(dO * O)`` (the gradient through lse_r folds into Delta).  The kernels
gather q/k/v/dO rows by the sort permutation (no sorted copies); per-round dQ/dK/dV (fp32, original
positions) are summed over the rounds in torch.  Plain CPU tensors take `_cpu.forward` (each chunk's queries
and keys cut into blocks of 32 ranks, every query block paired with the key blocks of its chunk and the one
before: batched block products with no padding of chunks to their fullest; memory bounded by groups of
pairs); its backward recomputes the forward under autograd.

The hash and the transform's M are discrete / treated as constants: no gradient flows through them.

Limitations: q_len must equal kv_len; no mask, softcap, dropout or ALiBi; head dims up to 256.  Quality
depends on the bucket balance: the asymmetric transform puts most keys in a few buckets, so a query in a
query-heavy bucket attends few keys in that round (on inputs with planted strong keys, as
benchmarks/bench_longcontext.py makes, a query attends about 40 keys per round at bucket_size 64, not 2 * 64),
and many queries aimed at one key, all in its bucket, push it out of the later ones' chunks.  n_buckets grows
with L (as Reformer's), so hashing costs O(N * D * L / C) multiply-adds (a matmul done in blocks of bounded
memory); capping n_buckets would make buckets, and the items between a query and its key, grow with L.

Layout: `attention`, `forward`, `backward` and the checks here; `_hashing` the hashing, sorting and merging
every path runs; `_triton` the Triton kernels and their launchers; `_cpu` the plain-CPU path.
"""

from __future__ import annotations

import math
import sys

import torch

from .. import _family, validate
from . import _cpu
from ._hashing import buckets, check_params, expand_kv, make_plan, merge, self_scores
from ._triton import triton_grads, triton_rounds

__all__ = ["attention", "backward", "buckets", "forward", "unsupported"]


def unsupported(q_shape, k_shape, *, causal: bool = False) -> str | None:
    """None when LSH attention takes these (B, H, L, D) shapes, else why not (one sentence, for the policy)."""
    if len(q_shape) != 4 or len(k_shape) != 4:
        return "LSH attention takes 4-D (batch, heads, seqlen, head_dim) tensors"
    if q_shape[2] != k_shape[2]:
        return f"LSH attention hashes queries and keys into one set of chunks: it needs q_len == kv_len, " \
               f"not {q_shape[2]} != {k_shape[2]}"
    if q_shape[2] < 1:
        return "LSH attention needs at least one token"
    return None


def _triton_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Triton path runs (`attnfuse.kernels._family.triton_runs`); the CPU path takes CPU tensors."""
    return _family.triton_runs(q, k, v, "attnfuse.kernels.lsh")


def _validate(q, k, v, causal, n_hashes, bucket_size, seed, mask=None, softcap=0.0, dropout_p=0.0,
              alibi=None) -> None:
    """Raise ValueError (prefixed ``attnfuse.kernels.lsh``) for a setting LSH attention does not take, bad
    params, q/k/v that are not one attention (`attnfuse.kernels.validate.qkv`, floating), `unsupported` shapes,
    or tensors neither path runs."""
    who = "attnfuse.kernels.lsh"
    validate.unsupported(who, "LSH attention",
                         "attnfuse.kernels.flash.attention for masked, soft-capped, dropout or ALiBi attention",
                         mask=(mask, None), alibi=(alibi, None), softcap=(softcap, 0.0), dropout_p=(dropout_p, 0.0))
    check_params(n_hashes, bucket_size, seed)
    validate.qkv(who, q, k, v, floating=True)
    why = unsupported(tuple(q.shape), tuple(k.shape), causal=causal)
    if why:
        raise ValueError(f"{who}: {why}")
    _triton_path(q, k, v)  # raises for tensors neither path takes


def _scale(q, scale) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def forward(q, k, v, *, scale=None, causal=False, n_hashes=4, bucket_size=64, seed=0, mask=None, softcap=0.0,
            dropout_p=0.0, alibi=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, L, Dv) in q's dtype, stats (B, H, L, 2) fp32): stats holds the merged log-sum-exp of each row
    in log2 units and 0 (flash's (max, log2 sum) convention), which `backward` needs on the Triton path."""
    _validate(q, k, v, causal, n_hashes, bucket_size, seed, mask, softcap, dropout_p, alibi)
    sc = _scale(q, scale)
    with torch.no_grad():
        plan = make_plan(q, k, n_hashes, bucket_size, seed)
        if _triton_path(q, k, v):
            out, lse2 = merge(q, k, v, *triton_rounds(q, k, v, plan, sc, causal), sc)
        else:
            out, lse2 = _cpu.forward(q, k, v, plan, sc, causal)
    stats = torch.stack([lse2.float(), torch.zeros_like(lse2, dtype=torch.float32)], dim=-1)
    return out.to(q.dtype), stats


def backward(grad_out, q, k, v, out, stats, *, scale=None, causal=False, n_hashes=4, bucket_size=64,
             seed=0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `forward`'s output.  Recomputes the hashing; the Triton path reads the merged LSE from
    ``stats`` and ``Delta = rowsum(grad_out * out)``, the CPU path recomputes its forward under autograd."""
    sc = _scale(q, scale)
    if not _triton_path(q, k, v):
        with torch.enable_grad():
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
            o, _ = _cpu.forward(qq, kk, vv, make_plan(qq, kk, n_hashes, bucket_size, seed), sc, causal)
            grads = torch.autograd.grad(o, (qq, kk, vv), grad_out.to(o.dtype))
        return tuple(g.to(x.dtype) for g, x in zip(grads, (q, k, v)))
    b, h, n, d = q.shape
    hkv = k.shape[1]
    with torch.no_grad():
        plan = make_plan(q, k, n_hashes, bucket_size, seed)
        go = grad_out.to(q.dtype)
        stats = stats.float().contiguous()
        delta = (go.float() * out.float()).sum(-1).contiguous()
        dq_r, dk_r, dv_r = triton_grads(go, q, k, v, stats, delta, plan, sc, causal)
        # the self term: p_ii = exp2(s_ii - LSE2), dS_ii = p_ii (dO_i . v_i - Delta_i)
        p_self = torch.exp2(self_scores(q, k, sc) - stats[..., 0])
        gof = go.float()
        ds = p_self * ((gof * expand_kv(v, h).float()).sum(-1) - delta)
        dq = dq_r.sum(2) + (ds * sc)[..., None] * expand_kv(k, h).float()
        dk = dk_r.sum(2) + ((ds * sc)[..., None] * q.float()).view(b, hkv, h // hkv, n, d).sum(2)
        dv = dv_r.sum(2) + (p_self[..., None] * gof).view(b, hkv, h // hkv, n, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, causal: bool = False,
              n_hashes: int = 4, bucket_size: int = 64, seed: int = 0, mask=None, softcap: float = 0.0,
              dropout_p: float = 0.0, alibi=None) -> torch.Tensor:
    """LSH attention on ``(batch, heads, seqlen, head_dim)`` tensors, with autograd (module docstring).

    K/V may have fewer heads (GQA).  ``n_hashes`` rounds, chunks of ``bucket_size`` sorted tokens, rotations
    from ``seed``.  ``mask``/``softcap``/``dropout_p``/``alibi`` exist only to raise a clear ValueError.  Runs the
    Triton kernels on CUDA tensors (CPU ones under ``TRITON_INTERPRET=1``), torch ops (what
    ``torch.ops.attnfuse.attention`` runs for LSH) on other CPU tensors, float64 included
    (`attnfuse.kernels._family.triton_runs`).
    """
    _validate(q, k, v, causal, n_hashes, bucket_size, seed, mask, softcap, dropout_p, alibi)
    kwargs = dict(scale=scale, causal=causal, n_hashes=n_hashes, bucket_size=bucket_size, seed=seed)
    return _family.attention(sys.modules[__name__], q, k, v, kwargs)
