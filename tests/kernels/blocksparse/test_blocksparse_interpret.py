"""Block-sparse attention under constant masks (`attnfuse.kernels.blocksparse`), run by Triton's interpreter.

Masks are drawn tile by tile (16x16 tiles, as the kernels run here) so that each case has empty tiles (skipped),
full tiles (computed without the mask) and partial ones (masked), with ragged last tiles; forward and backward
are checked against a float64 textbook with the 2x rule (`tests.kernels._helpers.compare`).  The textbook applies
the masked entries with ``masked_fill(-inf)``, the kernels' block-sparse semantics, and adds an additive mask's live
entries.  Skipping is checked by poisoning K/V where every tile is empty.
"""

from __future__ import annotations

import pytest
import torch

from attnfuse.kernels import blocksparse, flash
from tests._util import band
from tests.kernels._helpers import DTYPES, T16, alibi_bias, compare, leaf, qkv, recover_keep, seed_case

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on NaN rows: 0/0, log2(0)


def tiled_mask(pattern: list[str], lq: int, lk: int, lead: tuple[int, ...] = ()) -> torch.Tensor:
    """A bool mask of shape (*lead, lq, lk) whose 16x16 tiles are empty ("e"), full ("f") or random ("p",
    kept with probability 0.6) per ``pattern`` (a string of key tiles per query tile)."""
    mask = torch.rand(*lead, lq, lk) < 0.6
    for r, tiles in enumerate(pattern):
        for c, kind in enumerate(tiles):
            if kind != "p":
                mask[..., 16 * r:16 * r + 16, 16 * c:16 * c + 16] = kind == "f"
    return mask


def additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive mask from ``keep``: masked entries -inf or finfo.min (alternating), kept ones 0 in the full
    tiles' rows and random biases elsewhere."""
    bias = torch.randn(keep.shape).to(dtype)
    bias[..., :16, :] = 0  # the first query tile's kept entries are exactly 0: full tiles stay full
    masked = torch.where(torch.rand(keep.shape) < 0.5, float("-inf"), torch.finfo(dtype).min).to(dtype)
    return torch.where(keep, bias, masked)


def _textbook_mask(mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(additive part, keep): the kernels' semantics as textbook arguments (masked entries by masked_fill)."""
    if mask.dtype == torch.bool:
        return None, mask
    keep = mask > torch.finfo(mask.dtype).min
    return torch.where(keep, mask, torch.zeros((), dtype=mask.dtype)), keep


def _sparse_compare(dtype, q, k, v, g, mask, *, causal=False, left=-1, right=-1, slopes=None, **kw):
    lq, lk = q.shape[2], k.shape[2]
    part, keep = _textbook_mask(mask)
    visible = keep & band(lq, lk, left, right, causal)
    bias = None if slopes is None else alibi_bias(slopes, lq, lk)
    if part is not None:
        bias = part.double() if bias is None else bias + part.double()

    sparse_mask = mask

    def attend(q, k, v, mask, **kw):  # compare's mask is None: the textbook gets ours as bias + visible
        return blocksparse.attention(q, k, v, sparse_mask, **kw)

    return compare(dtype, q, k, v, g, attend=attend, causal=causal, window_size=(left, right), alibi=slopes,
                    bias=bias, visible=visible, **kw)


# --------------------------------------------------------------------------------------------- the grid

# query tiles x key tiles of 47 x 41 scores: every query tile keeps a full tile (no row without keys)
PATTERN = ["fep", "pfe", "epf"]
# name: (B, H, Hkv, mask lead dims, additive?, extra kwargs)
CASES = {
    "bool_2d": (1, 2, 2, (), False, {}),
    "bool_per_head_gqa": (1, 4, 2, (1, 4), False, {}),
    "bool_per_batch_gqa": (2, 4, 2, (2, 1), False, {}),
    "additive": (1, 2, 2, (), True, {}),
    "additive_per_head_mqa3": (1, 3, 1, (3,), True, {}),
    "causal_softcap": (1, 2, 2, (), False, dict(causal=True, softcap=3.0)),
    "window": (1, 4, 2, (), False, dict(left=9, right=4)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward(name, dtype):
    b, h, hk, lead, add, kw = CASES[name]
    seed_case("blocksparse", name, dtype)
    q, k, v = qkv(dtype, b, h, hk, 47, 41, 40, 40)
    keep = tiled_mask(PATTERN, 47, 41, lead)
    mask = additive(keep, dtype) if add else keep
    g = torch.randn(b, h, 47, 40).to(dtype)
    _sparse_compare(dtype, q, k, v, g, mask, config=T16, deterministic=len(name) % 2 == 0, what=name, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_padding(dtype):
    """A (B, 1, 1, Lk) key-padding mask: per batch, the padded key tiles are empty for every query tile."""
    seed_case("padding", dtype)
    q, k, v = qkv(dtype, 2, 2, 2, 33, 41, 40, 40)
    lengths = torch.tensor([30, 13])
    mask = (torch.arange(41) < lengths[:, None])[:, None, None, :]
    maps = blocksparse.tile_map(mask, batch=2, heads=2, kv_heads=2, q_len=33, kv_len=41, block_m=16, block_n=16)
    assert maps.rows[1, 0, :, :2].tolist() == [[0, 1]] * 3  # batch 1: tile 0 partial (keys 0..12), 1 and 2 empty
    _sparse_compare(dtype, q, k, v, torch.randn(2, 2, 33, 40).to(dtype), mask, config=T16, what="padding")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_alibi(dtype):
    seed_case("blocksparse-alibi", dtype)
    q, k, v = qkv(dtype, 1, 4, 2, 47, 41, 40, 40)
    mask = tiled_mask(PATTERN, 47, 41)
    _sparse_compare(dtype, q, k, v, torch.randn(1, 4, 47, 40).to(dtype), mask, slopes=torch.rand(4) + 0.05,
                    config=T16, what="alibi")


@pytest.mark.parametrize("det", [False, True])
def test_dropout(det):
    """The keep mask (keyed by position) read off the dense kernel explains the block-sparse forward and backward."""
    seed_case("blocksparse-dropout", det)
    p, seed = 0.3, 77
    q, k, v = qkv(torch.float32, 1, 2, 2, 47, 41, 24, 24)
    keep = recover_keep(q, k, causal=False, p=p, seed=seed, config=T16)
    mask = tiled_mask(PATTERN, 47, 41)
    _sparse_compare(torch.float32, q, k, v, torch.randn(1, 2, 47, 24), mask, keep=keep, dropout_p=p, seed=seed,
                    config=T16, deterministic=det, what="dropout")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("add", [False, True])
def test_rows_without_keys_are_nan(dtype, add):
    """A fully masked row (False, or -inf/finfo.min everywhere) is NaN with eager's masked_fill gradients: its
    dQ is 0, and all of dV of its K/V head is NaN."""
    seed_case("blocksparse-dead", dtype, add)
    q, k, v = qkv(dtype, 1, 4, 2, 47, 41, 40, 40)
    keep = tiled_mask(PATTERN, 47, 41, (1, 4))
    keep[0, 2, 20] = False
    mask = additive(keep, dtype) if add else keep
    out = _sparse_compare(dtype, q, k, v, torch.randn(1, 4, 47, 40).to(dtype), mask, config=T16, what="dead")
    assert out.isnan().all(-1).nonzero().tolist() == [[0, 2, 20]]


def test_empty_tiles_are_never_read():
    """NaN in K and Inf in V in a key tile that is empty for every query tile reach nothing (eager's 0 * nan
    would poison every row: a documented difference)."""
    seed_case("blocksparse-poison")
    q, k, v = qkv(torch.float32, 1, 2, 2, 47, 41, 40, 40)
    mask = tiled_mask(["fpe", "pfe", "ffe"], 47, 41)
    k, v = k.clone(), v.clone()
    k[:, :, 35], v[:, :, 36] = float("nan"), float("inf")
    clean = _sparse_compare(torch.float32, q, k[:, :, :32], v[:, :, :32], torch.randn(1, 2, 47, 40),
                            mask[:, :32], config=T16, what="clean")
    ins = [leaf(x) for x in (q, k, v)]
    out = blocksparse.attention(*ins, mask, config=T16)
    out.sum().backward()
    torch.testing.assert_close(out, clean, rtol=1e-6, atol=1e-6)
    assert all(torch.isfinite(x.grad).all() for x in ins)


# --------------------------------------------------------------------------------------------- the map


def test_tile_map_is_cached_per_mask_version_and_shape():
    mask = tiled_mask(PATTERN, 47, 41)
    shape = dict(batch=1, heads=2, kv_heads=2, q_len=47, kv_len=41, block_m=16, block_n=16)
    first = blocksparse.tile_map(mask, **shape)
    assert blocksparse.tile_map(mask, **shape) is first
    assert blocksparse.tile_map(mask.clone(), **shape) is not first
    other = blocksparse.tile_map(mask, **dict(shape, block_n=32))
    assert other is not first and other.rows.shape[-1] == 2 + 2
    mask[:16, 16:32] = True  # in place: the version changes, the map is rebuilt
    rebuilt = blocksparse.tile_map(mask, **shape)
    assert rebuilt is not first and rebuilt.rows[0, 0, 0, :2].tolist() == [2, 1]  # tiles 0, 1 full; 2 partial


def test_validation():
    q, k, v = qkv(torch.float32, 1, 2, 2, 8, 8, 16, 16)
    with pytest.raises(ValueError, match="constant"):
        blocksparse.attention(q, k, v, torch.randn(8, 8, requires_grad=True))
    with pytest.raises(ValueError, match="needs the constant mask"):
        flash.forward(q, k, v, block_sparse=True)
