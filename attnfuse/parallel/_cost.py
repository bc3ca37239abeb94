"""Which context-parallel strategy a site runs: a deliberately simple estimate of each one's forward time.

Per device (``P`` ranks, ``Lc`` rows each, ``L = P * Lc``; ``e`` bytes per element):

* compute ``C = 4 * B * H * L^2 * D / P`` FLOPs (two matmuls of ``2 * B * H * L^2 * D``, split over the ranks;
  halved under a causal mask) at `RATES` ``[device_type][0]`` FLOP/s;
* Ulysses: ``C`` plus four all-to-alls that are not overlapped with it (q, k, v in, the output back), each moving
  ``(P - 1) / P`` of the rank's ``B * heads * Lc * D * e`` bytes (K/V with their heads after `kv_repeat`), at the
  link's ``RATES[device_type][1]`` bytes/s;
* ring: ``P`` steps, each the larger of its share of the compute (``C / P``) and sending one K/V chunk,
  ``B * Hk * Lc * (D + Dv) * e`` bytes (the send overlaps the step's compute).

So short sequences (communication-bound) favour Ulysses, whose all-to-alls move less than the ring's ``P``
chunks, and long ones favour the ring, which hides its communication behind the quadratic compute.  Ulysses
needs the heads to split over the ranks.  The rates are round numbers (gloo over loopback on the CPU; NVLink-class
links on CUDA), not measurements: the estimate only has to order the two strategies.
"""

from __future__ import annotations

from ._spec import ContextParallel
from ._ulysses import kv_repeat

__all__ = ["RATES", "choose", "estimate"]

RATES = {  # device type -> (FLOP/s of one device, bytes/s of its link to the others)
    "cpu": (5e10, 1e9),
    "cuda": (4e14, 1e11),
}


def estimate(*, ranks: int, batch: int, heads: int, kv_heads: int, local_len: int, head_dim: int,
             v_head_dim: int, elem: int, causal: bool, device_type: str) -> dict[str, float]:
    """Estimated seconds per forward of each strategy: ``{"ulysses": ..., "ring": ...}`` (`RATES`; the module
    docstring has the formula)."""
    flops, link = RATES.get(device_type, RATES["cuda"])
    p, length = ranks, ranks * local_len
    compute = 4 * batch * heads * length * length * max(head_dim, v_head_dim) / p / flops
    if causal:
        compute /= 2
    kv = kv_heads * kv_repeat(kv_heads, p)
    moved = batch * local_len * elem * (p - 1) / p * (heads * head_dim + kv * head_dim + kv * v_head_dim
                                                      + heads * v_head_dim)
    chunk = batch * kv_heads * local_len * (head_dim + v_head_dim) * elem
    return {"ulysses": compute + moved / link, "ring": p * max(compute / p, chunk / link)}


def choose(cp: ContextParallel, *, batch: int, heads: int, kv_heads: int, local_len: int, head_dim: int,
           v_head_dim: int, elem: int, causal: bool, device_type: str) -> tuple[str, str]:
    """(strategy, one sentence why) for one site: ``cp.strategy`` where forced (``"ring"`` instead of a forced
    ``"ulysses"`` whose heads do not split over the ranks), else the cheaper by `estimate`."""
    p = cp.ranks
    if heads % p:
        why = f"{heads} heads do not split over {p} ranks, which Ulysses needs"
        if cp.strategy == "ulysses":
            return "ring", f"ring: strategy 'ulysses' was asked for, but {why}"
        return "ring", f"ring: {why}"
    if cp.strategy != "auto":
        return cp.strategy, f"{cp.strategy}: the context_parallel option asks for it"
    t = estimate(ranks=p, batch=batch, heads=heads, kv_heads=kv_heads, local_len=local_len, head_dim=head_dim,
                 v_head_dim=v_head_dim, elem=elem, causal=causal, device_type=device_type)
    best = min(("ulysses", "ring"), key=lambda s: t[s])
    other = "ring" if best == "ulysses" else "ulysses"
    return best, (f"{best}: {heads} heads over {p} ranks; estimated {t[best] * 1e3:.3g} ms vs {other} "
                  f"{t[other] * 1e3:.3g} ms ({device_type})")
