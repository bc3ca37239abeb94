"""The torch ops every LSH path runs: hashing (`buckets`), sorting queries and keys into joint chunks
(`make_plan`: a `Plan`), and merging the rounds with the self term (`merge`), with the parameter checks they share."""

from __future__ import annotations

import dataclasses
import functools

import torch

from .._launch import LOG2E

__all__ = ["Plan", "buckets", "check_params", "expand_kv", "make_plan", "merge", "self_scores"]

_HASH_ELEMS = 2**20  # elements of one hashing projection block


@dataclasses.dataclass(frozen=True)
class Plan:
    """One hashing of (q, k): per round the sorted orders (positions, int64), each token's joint chunk and each
    joint chunk's first query / key rank (module docstring, step 3)."""

    qidx: torch.Tensor  # (B, H, R, L) query positions in (bucket, position) order
    kidx: torch.Tensor  # (B, Hkv, R, L) key positions in (bucket, position) order
    qch: torch.Tensor  # (B, H, R, L) joint chunk of each query position
    kch: torch.Tensor  # (B, H, R, L) joint chunk of each key position, in query head h's joint sequence
    qstart: torch.Tensor  # (B, H, R, n_chunks + 1) first query rank of each joint chunk (last entry L)
    kstart: torch.Tensor  # (B, H, R, n_chunks + 1) first key rank of each joint chunk (last entry L)
    chunk: int  # joint items per chunk: 2 * min(bucket_size, L)
    n_chunks: int


def check_params(n_hashes, bucket_size, seed) -> None:
    for name, val, low in (("n_hashes", n_hashes, 1), ("bucket_size", bucket_size, 1), ("seed", seed, None)):
        if not isinstance(val, int) or isinstance(val, bool) or (low is not None and val < low):
            allowed = "an int" if low is None else f"an int >= {low}"
            raise ValueError(f"attnfuse.kernels.lsh: {name} must be {allowed}; got {val!r}")


@functools.lru_cache(maxsize=16)
def _rotations(seed: int, n_hashes: int, dim: int, half: int) -> torch.Tensor:
    """(n_hashes, dim, half) float32 standard normal rotations, drawn on the CPU from ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(n_hashes, dim, half, generator=gen, dtype=torch.float32, device="cpu")


def _n_buckets(n: int, bucket_size: int) -> int:
    return max(2, 2 * round(n / (2 * bucket_size)))


def _hash(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """argmax([x R_r, -x R_r]) for every round r of ``rot``: (B, Hx, L, D+1) -> (B, Hx, R, L) int64, in row blocks
    whose projection holds at most `_HASH_ELEMS` elements.  The argmax of the concatenation is the argmax of
    x R_r when its max is at least minus its min (first index wins ties, as argmax), else half + its argmin."""
    b, hx, n, _ = x.shape
    rounds, _, half = rot.shape
    out = torch.empty(b, hx, rounds, n, dtype=torch.int64, device=x.device)
    step = max(1, _HASH_ELEMS // max(1, b * hx * half))
    for r in range(rounds):
        for lo in range(0, n, step):
            proj = x[:, :, lo:lo + step] @ rot[r]
            hi_val, hi_idx = proj.max(-1)
            lo_val, lo_idx = proj.min(-1)
            out[:, :, r, lo:lo + step] = torch.where(hi_val >= -lo_val, hi_idx, lo_idx + half)
    return out


def _bucket_ids(q, k, n_hashes: int, bucket_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query buckets (B, H, R, L) and key buckets (B, Hkv, R, L) of the asymmetric transform (module docstring)."""
    d, n = q.shape[-1], k.shape[2]
    rot = _rotations(seed, n_hashes, d + 1, _n_buckets(n, bucket_size) // 2).to(q.device)
    with torch.no_grad():
        qf, kf = q.detach().float(), k.detach().float()
        tiny = torch.finfo(torch.float32).tiny
        qn = qf / torch.linalg.vector_norm(qf, dim=-1, keepdim=True).clamp_min(tiny)
        kn2 = (kf * kf).sum(-1, keepdim=True)
        m2 = kn2.amax(dim=2, keepdim=True).clamp_min(tiny)
        kx = torch.cat([kf / m2.sqrt(), (1 - kn2 / m2).clamp_min(0).sqrt()], dim=-1)
        qx = torch.cat([qn, torch.zeros_like(qn[..., :1])], dim=-1)
        return _hash(qx, rot), _hash(kx, rot)


def buckets(q: torch.Tensor, k: torch.Tensor, *, n_hashes: int, bucket_size: int,
            seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bucket of every query and key per round: two int64 (B, H, R, L) tensors (the keys' expanded from their
    K/V heads to the query heads, a view).  Deterministic in ``seed`` on every device (up to float ties)."""
    check_params(n_hashes, bucket_size, seed)
    qb, kb = _bucket_ids(q, k, n_hashes, bucket_size, seed)
    b, h, r, n = qb.shape
    groups = h // kb.shape[1]
    return qb, kb[:, :, None].expand(b, kb.shape[1], groups, r, n).reshape(b, h, r, n)


def make_plan(q, k, n_hashes: int, bucket_size: int, seed: int) -> Plan:
    """Hash, sort and chunk (module docstring, steps 2-3).  The joint order is the merge of the query order and
    the key order, so a query's joint rank is its query rank plus the number of keys that sort before it
    (``searchsorted``; keys first at equal (bucket, position)), and a key's likewise."""
    qb, kb = _bucket_ids(q, k, n_hashes, bucket_size, seed)
    b, h, rounds, n = qb.shape
    chunk = 2 * min(bucket_size, n)
    n_chunks = -(-2 * n // chunk)
    pos = torch.arange(n, device=qb.device)
    qkey, qidx = torch.sort(qb * n + pos, dim=-1)  # distinct sort keys: (bucket, position) order
    kkey, kidx = torch.sort(kb * n + pos, dim=-1)
    kkey, kidx_h = expand_kv(kkey, h).contiguous(), expand_kv(kidx, h)
    jq = torch.searchsorted(kkey, qkey, right=True).add_(pos)  # joint rank of each query rank
    jk = torch.searchsorted(qkey, kkey).add_(pos)  # joint rank of each key rank
    qch = torch.empty_like(qidx).scatter_(-1, qidx, torch.div(jq, chunk, rounding_mode="floor"))
    kch = torch.empty_like(qidx).scatter_(-1, kidx_h, torch.div(jk, chunk, rounding_mode="floor"))
    bounds = (torch.arange(n_chunks + 1, device=qb.device) * chunk).expand(b, h, rounds, n_chunks + 1).contiguous()
    return Plan(qidx, kidx, qch, kch, torch.searchsorted(jq, bounds), torch.searchsorted(jk, bounds), chunk,
                 n_chunks)


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv, L, X) -> (B, H, L, X): each K/V head repeated for its query heads (expand + reshape)."""
    b, hkv, n, e = x.shape
    return x[:, :, None].expand(b, hkv, heads // hkv, n, e).reshape(b, heads, n, e)


def self_scores(q, k, scale: float) -> torch.Tensor:
    """s_ii in log2 units, fp32 (fp64 for fp64 inputs) (B, H, L)."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.to(ct) * expand_kv(k, q.shape[1]).to(ct)).sum(-1) * (scale * LOG2E)


def merge(q, k, v, o_r, lse_r, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the rounds (o_r (B, H, R, L, Dv), lse_r log2 (B, H, R, L)) and the self term by log-sum-exp:
    (out fp32 (fp64 for fp64 inputs) (B, H, L, Dv), LSE2 (B, H, L)).  Differentiable (the CPU path's backward
    runs through it)."""
    s2 = self_scores(q, k, scale)
    m = torch.maximum(lse_r.amax(dim=2), s2).detach()
    w_r = torch.exp2(lse_r - m[:, :, None])
    w_s = torch.exp2(s2 - m)
    total = w_r.sum(2) + w_s
    vs = expand_kv(v, q.shape[1]).to(w_s.dtype)
    out = ((w_r[..., None] * o_r).sum(2) + w_s[..., None] * vs) / total[..., None]
    return out, m + torch.log2(total)
