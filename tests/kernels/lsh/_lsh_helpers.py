"""The LSH tests' references, shared by its plain-CPU path (test_lsh_cpu.py) and its Triton kernels
(test_lsh_interpret.py), so both are held to one semantics (`attnfuse.kernels.lsh`'s docstring):

* `ref_select`: the block selection by brute force in float64, written from the docstring alone -- only the
  hyperplanes (`_index._planes`) and the parameters (`auto_bits`, `spill`) come from the module: centering,
  sign bits, probes, bucket membership, the spill rule, per-row votes, max-then-sum block scores, the kept
  blocks and the cap are dense tensors and loops here.  It asserts its inputs are unambiguous: no projection
  (nor, with probes, the gap between the last probed and the first unprobed |projection|) within fp32 rounding
  of zero, so the module's fp32 projections must give the same codes;
* `check_masked`: `lsh.attention` == the float64 textbook restricted to `lsh.select`'s blocks (and the causal
  mask), forward and q/k/v gradients under the 2x rule (`tests.kernels._helpers.compare`);
* `check_exact`: with one bucket (``bits=0``) and ``cap >= Lk`` every block is attended: exact attention.
"""

from __future__ import annotations

import math
import types

import torch

from attnfuse.kernels import lsh
from attnfuse.kernels.lsh import _index
from tests.kernels._helpers import compare, leaf, qkv, seed_case, textbook
from tests.kernels.topk._topk_helpers import visible

_EPS32 = torch.finfo(torch.float32).eps
_CPU = torch.device("cpu")  # the references run on the CPU (the kernel tests may default to CUDA)


class Ambiguous(AssertionError):
    """The inputs leave a code to fp32 rounding: `unambiguous` draws others."""


def settings(**params) -> dict:
    """`lsh.DEFAULTS` with ``params`` on top (`lsh.select` takes every setting by keyword)."""
    return {**lsh.DEFAULTS, **params}


def _project(x: torch.Tensor, spread: torch.Tensor, seed: int, tables: int, bits: int, what: str):
    """float64 projections (..., tables, bits) of ``x`` (float64) on the hyperplanes, checked against fp32
    rounding: ``spread`` (..., D) bounds the magnitude of every term the module's fp32 dot rounds."""
    planes = _index._planes(seed, x.shape[-1], tables * bits).double().cpu()
    proj = (x @ planes).unflatten(-1, (tables, bits))
    tol = (x.shape[-1] + 4) * _EPS32 * (spread @ planes.abs()).unflatten(-1, (tables, bits))
    near = proj.abs() <= tol
    if near.any():
        raise Ambiguous(f"{what}: {int(near.sum())} projections within fp32 rounding of 0")
    return proj, tol


def _codes(proj: torch.Tensor) -> torch.Tensor:
    """int64 codes (..., tables): bit i set where projection i is > 0."""
    bits = proj.shape[-1]
    return ((proj > 0).long() << torch.arange(bits, device=proj.device)).sum(-1)


def ref_codes(q, k, *, tables, bits, probes, seed):
    """(key codes (B, Hkv, Lk, tables), query lookups (B, H, Lq, tables, 1 + probes)): keys centered by their
    (batch, K/V head) mean key; each query's own bucket, then its codes with one of its ``probes`` least
    confident bits (smallest |projection|) flipped."""
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    if bits == 0:
        zeros = dict(dtype=torch.long, device=_CPU)
        return torch.zeros(b, k.shape[1], lk, tables, **zeros), torch.zeros(b, h, lq, tables, 1 + probes, **zeros)
    kd = k.detach().cpu().double()
    mean = kd.mean(2, keepdim=True)
    kproj, _ = _project(kd - mean, kd.abs() + mean.abs(), seed, tables, bits, "keys")
    qd = q.detach().cpu().double()
    qproj, qtol = _project(qd, qd.abs(), seed, tables, bits, "queries")
    lookups = [_codes(qproj)]
    if probes:
        mag, order = qproj.abs().sort(dim=-1, stable=True)
        if probes < bits and not (mag[..., probes] - mag[..., probes - 1] > 2 * qtol.amax(-1)).all():
            raise Ambiguous("queries: which bits are probed is within fp32 rounding")
        for i in range(probes):
            lookups.append(lookups[0] ^ (1 << order[..., i]))
    return _codes(kproj), torch.stack(lookups, -1)


def ref_votes(kcode, lookups, *, bits, block, limit):
    """int64 (B, H, Lq, nkb): per query row and key block, the keys of that block in the row's buckets (every
    table and probe; a bucket holding more than ``limit`` keys gives none), and the number of lookups skipped."""
    b, hkv, lk, tables = kcode.shape
    h, lq = lookups.shape[1], lookups.shape[2]
    g, nkb = h // hkv, -(-lk // block)
    owner = torch.zeros(lk, nkb, dtype=torch.long, device=_CPU)
    owner[torch.arange(lk, device=_CPU), torch.arange(lk, device=_CPU) // block] = 1  # key -> its block
    out = torch.zeros(b, h, lq, nkb, dtype=torch.long, device=_CPU)
    skipped = 0
    for bb in range(b):
        for hh in range(h):
            for t in range(tables):
                keys = kcode[bb, hh // g, :, t]  # (Lk,)
                size = torch.bincount(keys, minlength=1 << bits)
                look = lookups[bb, hh, :, t]  # (Lq, width)
                ok = size[look] <= limit
                skipped += int((~ok & (size[look] > 0)).sum())
                member = (look[..., None] == keys) & ok[..., None]  # (Lq, width, Lk)
                out[bb, hh] += member.long().sum(1) @ owner
    return out, skipped


def ref_blocks(lq, lk, *, causal, block, sink, local):
    """(kept, candidate) bool (nqb, nkb) by loops: candidates (causal: a key <= the block's last query), kept
    the candidates meeting the sink keys [0, sink) or the local keys [first - local, last (+ local)]."""
    nqb, nkb = -(-lq // block), -(-lk // block)
    kept = torch.zeros(nqb, nkb, dtype=torch.bool, device=_CPU)
    cand = torch.zeros(nqb, nkb, dtype=torch.bool, device=_CPU)
    for qb in range(nqb):
        first, last = qb * block, min((qb + 1) * block, lq) - 1
        hi = last if causal else last + local
        for kb in range(nkb):
            lo_k, hi_k = kb * block, min((kb + 1) * block, lk) - 1
            cand[qb, kb] = not causal or lo_k <= last
            kept[qb, kb] = cand[qb, kb] and (lo_k < sink or (hi_k >= first - local and lo_k <= hi))
    return kept, cand


def ref_select(q, k, *, causal, tables, bits, probes, cap, block, sink, local, seed, limit=None):
    """Namespace(chosen (B, Hkv, nqb, nkb) bool, votes (B, H, Lq, nkb), most, total (B, Hkv, nqb, nkb), skipped,
    codes, lookups, bits, limit): the selection of the module docstring by brute force.  ``limit`` overrides
    `spill` (to show the spill rule matters)."""
    b, h, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g, nqb, nkb = h // hkv, -(-lq // block), -(-lk // block)
    bits = _index.auto_bits(bits, lk)
    limit = _index.spill(lk, bits) if limit is None else limit
    kcode, lookups = ref_codes(q, k, tables=tables, bits=bits, probes=probes, seed=seed)
    votes, skipped = ref_votes(kcode, lookups, bits=bits, block=block, limit=limit)
    kept, cand = ref_blocks(lq, lk, causal=causal, block=block, sink=sink, local=local)
    n_pick = -(-cap // block)
    most = torch.zeros(b, hkv, nqb, nkb, dtype=torch.long, device=_CPU)
    total = torch.zeros_like(most)
    chosen = kept.expand(b, hkv, nqb, nkb).clone()
    for bb in range(b):
        for hk in range(hkv):
            for qb in range(nqb):
                rows = votes[bb, hk * g:(hk + 1) * g, qb * block:(qb + 1) * block]  # (G, rows, nkb)
                most[bb, hk, qb] = rows.amax((0, 1))
                total[bb, hk, qb] = rows.sum((0, 1))
                live = [kb for kb in range(nkb) if cand[qb, kb] and not kept[qb, kb] and most[bb, hk, qb, kb] > 0]
                live.sort(key=lambda kb: (-int(most[bb, hk, qb, kb]), -int(total[bb, hk, qb, kb]), kb))
                chosen[bb, hk, qb, live[:n_pick]] = True
    return types.SimpleNamespace(chosen=chosen, votes=votes, most=most, total=total, skipped=skipped, codes=kcode,
                                 lookups=lookups, bits=bits, limit=limit, kept=kept, cand=cand)


def unambiguous(make, key, *, causal, **params):
    """(inputs, `ref_select` of them): the first of ``make()``'s draws (seeded by ``key`` and the attempt) whose
    codes and probes no fp32 rounding can change -- a few in 10**5 projections fall that close to a boundary."""
    for attempt in range(8):
        seed_case(*key, attempt)
        inputs = make()
        try:
            return inputs, ref_select(inputs[0], inputs[1], causal=causal, **params)
        except Ambiguous:
            continue
    raise AssertionError(f"{key}: eight ambiguous draws")


def assert_same_selection(got: torch.Tensor, ref, what: str = "") -> None:
    """``got`` == the reference's selection; on CUDA (``torch.topk``: exact score ties may break otherwise) the
    same kept blocks and as many picks, none ranked below a block left out."""
    on_cuda, got = got.is_cuda, got.cpu()
    assert got.shape == ref.chosen.shape and got.dtype == torch.bool, (what, got.shape, ref.chosen.shape)
    if not on_cuda or torch.equal(got, ref.chosen):
        assert torch.equal(got, ref.chosen), f"{what}: {int((got != ref.chosen).sum())} blocks differ"
        return
    rank = (ref.most << 32) + ref.total
    assert (got.sum(-1) == ref.chosen.sum(-1)).all() and (got >= ref.kept).all(), what
    picked = got & ~ref.kept
    left = ref.cand & ~ref.kept & ~got & (ref.most > 0)
    low = torch.where(picked, rank, torch.iinfo(torch.long).max).amin(-1)
    high = torch.where(left, rank, -1).amax(-1)
    assert (low >= high).all(), what


def clustered(dtype, b, h, hkv, lq, lk, d, dv, *, repeats: int, directions: int):
    """q, k, v where the first ``repeats`` keys of every (batch, K/V head) are ``directions`` repeated vectors:
    after centering they fill a few buckets past the spill limit."""
    q, k, v = qkv(torch.float32, b, h, hkv, lq, lk, d, dv)
    dirs = 3 * torch.randn(b, hkv, directions, d)
    k[:, :, :repeats] = dirs.repeat_interleave(-(-repeats // directions), 2)[:, :, :repeats]
    perm = torch.randperm(lk)  # spread them over the key blocks
    return q.to(dtype), k[:, :, perm].to(dtype), v.to(dtype)


def attend(**params):
    """`compare`'s ``attend``: LSH attention with ``params`` (``compare`` passes mask=None)."""
    def run(q, k, v, mask=None, **kw):
        assert mask is None
        return lsh.attention(q, k, v, **params, **kw)
    return run


def compare64(q, k, v, grad_out, *, attend, causal, visible=None, scale=None, what=""):
    """`compare` for float64 inputs, where eager in the dtype *is* the float64 textbook, so the 2x rule has no
    eager error to scale: each result is held to the worst-case rounding of any summation order instead,
    ``(n + 8) * eps`` of the sum of its terms' absolute values (n the reduction length; magnitudes P @ |v|,
    |dS| @ |k|, |dS|^T @ |q|, P^T @ |dO|) -- ~1e-13 here, where a mis-selected key costs ~1e-2."""
    extra = {} if scale is None else dict(scale=scale)
    ins = [leaf(x) for x in (q, k, v)]
    out = attend(*ins, causal=causal, **extra)
    out.backward(grad_out)
    ref_in = [leaf(x) for x in (q, k, v)]
    ref = textbook(*ref_in, causal=causal, visible=visible, **extra)
    ref.backward(grad_out)
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    sc = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ kk.transpose(-1, -2) * sc
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), -math.inf)
    if visible is not None:
        s = s.masked_fill(~visible, -math.inf)
    p = torch.softmax(s, -1)
    dp = (grad_out @ vv.transpose(-1, -2)).abs()
    ds = p * (dp + (p * dp).sum(-1, keepdim=True))
    group = lambda x: x.unflatten(1, (k.shape[1], g)).sum(2)  # noqa: E731
    lq, lk = q.shape[2], k.shape[2]
    mags = dict(out=(p @ vv.abs(), lk), dq=(sc * ds @ kk.abs(), lk), dk=(group(sc * ds.transpose(-1, -2) @ q.abs()),
                                                                         lq * g),
                dv=(group(p.transpose(-1, -2) @ grad_out.abs()), lq * g))
    eps = torch.finfo(torch.float64).eps
    results = zip(mags.items(), (out, *(x.grad for x in ins)), (ref, *(x.grad for x in ref_in)))
    for (name, (mag, n)), ours, want in results:
        assert ours.dtype == torch.float64 and ours.shape == want.shape, name
        assert torch.isfinite(want).all() and torch.isfinite(ours).all(), name
        err, bound = (ours - want).abs().max().item(), (n + 8) * eps * mag.max().item()
        assert err <= bound, f"{what} {name}: error {err:.3g} > rounding bound {bound:.3g}"
    return out


def check_masked(dtype, shape, *, what, inputs=None, scale=None, **params) -> torch.Tensor:
    """LSH attention == the float64 textbook restricted to `lsh.select`'s blocks expanded to keys (and the causal
    mask): forward and dq/dk/dv under the 2x rule.  Returns the selection (checked really sparse and voted)."""
    b, h, hkv, lq, lk, d, dv, causal = shape
    seed_case(what, dtype)
    q, k, v = inputs if inputs is not None else qkv(dtype, b, h, hkv, lq, lk, d, dv)
    full = settings(**params)
    chosen = lsh.select(q, k, causal=causal, **full)
    kept, cand = ref_blocks(lq, lk, causal=causal, block=full["block"], sink=full["sink"], local=full["local"])
    assert not torch.equal(chosen.cpu(), cand.expand_as(chosen)), f"{what}: every candidate block selected"
    assert not torch.equal(chosen.cpu(), kept.expand_as(chosen)), f"{what}: no block picked by votes"
    vis = visible(chosen, lq, lk, h // hkv, full["block"])
    extra = {} if scale is None else dict(scale=scale)
    grad = torch.randn(b, h, lq, dv).to(dtype)
    run = compare64 if dtype == torch.float64 else lambda *a, **kw: compare(dtype, *a, **kw)
    run(q, k, v, grad, attend=attend(**params), visible=vis, causal=causal, what=what, **extra)
    return chosen


def check_exact(dtype, shape, *, what, **params) -> torch.Tensor:
    """``bits=0`` (one bucket: every key votes) and ``cap >= Lk``: every candidate block is attended, so LSH
    attention is exact (causal) attention, forward and dq/dk/dv under the 2x rule."""
    b, h, hkv, lq, lk, d, dv, causal = shape
    seed_case(what, dtype)
    q, k, v = qkv(dtype, b, h, hkv, lq, lk, d, dv)
    params = dict(dict(bits=0, cap=lk, sink=0, local=0, block=32), **params)
    chosen = lsh.select(q, k, causal=causal, **settings(**params))
    _, cand = ref_blocks(lq, lk, causal=causal, block=params["block"], sink=0, local=0)
    assert torch.equal(chosen.cpu(), cand.expand_as(chosen)), what
    grad = torch.randn(b, h, lq, dv).to(dtype)
    run = compare64 if dtype == torch.float64 else lambda *a, **kw: compare(dtype, *a, **kw)
    run(q, k, v, grad, attend=attend(**params), causal=causal, what=what)
    return chosen
