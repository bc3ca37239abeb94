"""LSH attention's Triton kernels (`attnfuse.kernels.lsh`), run by Triton's interpreter (or compiled on a GPU).

The checks of test_lsh_cpu.py (whose float64 union reference and 2x-rule comparison these reuse) on the
kernel path: one chunk equals exact attention; several chunks equal softmax over the union of the attended
keys, forward and backward (dQ per query tile, dK/dV per key tile over the group's heads); a planted key wins.
Sizes keep each launch to about 16 programs: odd lengths, a chunk of 97 rows split over two 64-row tiles, a
chunk size (24) that is not a power of two, GQA, both 16-bit and 32-bit floats.
"""

from __future__ import annotations

import pytest
import torch

from attnfuse.kernels import lsh
from tests.kernels.lsh._lsh_helpers import check_one_chunk, compare, qkv, union_mask

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on rows without keys: log2(0)

EXACT = [  # (B, H, Hkv, L, D, causal, n_hashes, dtype)
    (1, 2, 1, 97, 40, True, 2, torch.float32),
    (1, 2, 2, 101, 16, False, 1, torch.float16),
]


@pytest.mark.parametrize("b,h,hk,n,d,causal,rounds,dtype", EXACT)
def test_one_chunk_is_exact_attention(b, h, hk, n, d, causal, rounds, dtype):
    check_one_chunk(dtype, b, h, hk, n, d, causal=causal, n_hashes=rounds, bucket_size=128, seed=7)


UNION = [  # (B, H, Hkv, L, D, Dv, causal, n_hashes, bucket_size, dtype)
    (1, 2, 1, 97, 16, 24, True, 2, 32, torch.float32),
    (1, 2, 1, 131, 40, 40, False, 2, 32, torch.float16),
    (1, 1, 1, 113, 16, 16, True, 3, 24, torch.float16),
    (1, 2, 2, 200, 16, 16, False, 1, 32, torch.float32),
]


@pytest.mark.parametrize("b,h,hk,n,d,dv,causal,rounds,c,dtype", UNION)
def test_equals_softmax_over_the_union_of_attended_keys(b, h, hk, n, d, dv, causal, rounds, c, dtype):
    q, k, v = qkv(dtype, b, h, hk, n, d, dv)
    if dtype == torch.float16:  # (B, L, H, D) memory, as a transformer's projections leave it: strided loads
        q, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, v))
    kw = dict(n_hashes=rounds, bucket_size=c, seed=13)
    visible = union_mask(q, k, causal=causal, **kw)
    assert visible.float().mean().item() < (0.75 if causal else 0.9), "the union covers nearly everything"
    compare(dtype, q, k, v, visible, causal=causal, scale=0.35, **kw)
    _, stats = lsh.forward(q, k, v, causal=causal, scale=0.35, **kw)
    assert stats.shape == (b, h, n, 2) and stats.dtype == torch.float32
    assert torch.isfinite(stats).all() and (stats[..., 1] == 0).all()


def test_planted_key_dominates():
    b, h, n, d = 1, 2, 120, 16
    q, k, v = qkv(torch.float32, b, h, 1, n, d)
    i, j = 100, 20
    u = torch.nn.functional.normalize(torch.randn(d), dim=0)
    q[0, 1, i] = 12 * u
    k[0, 0, j] = 12 * u
    kw = dict(n_hashes=2, bucket_size=32, seed=5)
    qb, kb = lsh.buckets(q, k, **kw)
    assert (qb[0, 1, :, i] == kb[0, 1, :, j]).all()
    out = lsh.attention(q, k, v, causal=True, **kw)
    torch.testing.assert_close(out[0, 1, i], v[0, 0, j], atol=2e-2, rtol=0)
