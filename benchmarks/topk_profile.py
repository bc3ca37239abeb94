"""Stage-by-stage CUDA timing of the top-k attention forward (`attnfuse.kernels.topk`) next to dense causal flash.

Run on a GPU machine (about a minute on an H100):

    PYTHONPATH=$PWD python benchmarks/topk_profile.py --out $OUT/topk_profile.json

Shapes: B=1, H=Hkv=16, D=128, bf16, causal, topk=2048, block=64, sink=64, local=256 (the defaults), at the
``--seqs`` lengths.  Stages, each timed alone with ``common.time_call`` (CUDA events, median of ``--reps`` after
a warm-up):

* ``bounds``   -- per-key-block min/max of k (`topk._select._block_bounds_native`);
* ``indexer``  -- the Quest score kernel (`topk._select._scores_triton`, minus ``bounds``);
* ``select``   -- all of `topk.select` (bounds + indexer + topk/scatter into the block mask);
* ``pick``     -- ``select`` minus bounds and indexer (the mask, ``torch.topk``, gather/scatter);
* ``map_rows`` -- `topk.tile_map` rows listing only (what the forward builds);
* ``map_cols`` -- the extra key-tile listing the backward builds;
* ``attend``   -- `flash.forward` in block-sparse mode on the precomputed map;
* ``topk_fwd`` -- `topk.forward` end to end; ``flash_fwd`` -- dense causal `flash.forward`;
* ``host_ms``  -- host time per `topk.forward` call when queued back to back (launch overhead bound).

Prints a table and, with ``--out``, writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # _common, also when loaded by path (tests)
import _common as common  # noqa: E402


def _parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the JSON results here (default: stdout only)")
    ap.add_argument("--seqs", type=common.csv(int), default=[16384, 65536, 131072],
                    help="comma-separated sequence lengths")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per stage (median reported)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--no-flash", action="store_true", help="skip the dense flash baseline (slow at 128k)")
    return ap.parse_args(argv)


def _time_ms(fn, reps: int) -> float:
    return common.time_call(fn, "cuda", reps=reps).median_s * 1e3


def _host_ms(fn, reps: int) -> float:
    """Host time per call with the calls queued back to back (no sync inside)."""
    return common.per_call_s(fn, reps, drain=False) * 1e3


def profile(seq: int, args) -> dict:
    import torch

    from attnfuse.kernels import flash, topk
    from attnfuse.kernels.topk import _select, _tilemap

    h, d, block = args.heads, args.head_dim, args.block
    kw = dict(causal=True, topk=args.topk, block=block, sink=64, local=256)
    gen = torch.Generator(device="cuda").manual_seed(seq)
    q, k, v = (torch.randn(1, h, seq, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    reps = args.reps
    r = {"seq": seq}
    r["bounds"] = _time_ms(lambda: _select._block_bounds_native(k, block), reps)
    r["scores"] = _time_ms(lambda: _select._scores_triton(q, k, causal=True, block=block, sink=64, local=256), reps)
    r["indexer"] = r["scores"] - r["bounds"]
    r["select"] = _time_ms(lambda: topk.select(q, k, **kw), reps)
    r["pick"] = r["select"] - r["scores"]
    chosen = topk.select(q, k, **kw)
    r["blocks_per_row"] = float(chosen.sum(-1).float().mean())
    cfg = _tilemap.tile_config("fwd", q, k, v, block)
    r["fwd_tile"] = f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
    mk = dict(q_len=seq, kv_len=seq, kv_groups=1, block=block, causal=True)
    r["map_rows"] = _time_ms(lambda: topk.tile_map(chosen, cfg, cols=False, **mk), reps)
    r["map_cols"] = _time_ms(lambda: topk.tile_map(chosen, cfg, cols=True, **mk), reps) - r["map_rows"]
    tmap = topk.tile_map(chosen, cfg, cols=False, **mk)
    r["attend"] = _time_ms(lambda: flash.forward(q, k, v, causal=True, config=cfg, tile_map=tmap), reps)
    r["topk_fwd"] = _time_ms(lambda: topk.forward(q, k, v, **kw), reps)
    r["host_ms"] = _host_ms(lambda: topk.forward(q, k, v, **kw), reps)
    if not args.no_flash:
        r["flash_fwd"] = _time_ms(lambda: flash.forward(q, k, v, causal=True), max(1, min(reps, 3)))
        r["speedup"] = r["flash_fwd"] / r["topk_fwd"]
    return r


def main(argv=None) -> int:
    args = _parse(argv)
    try:
        import torch
    except ImportError:
        sys.exit("topk_profile: needs PyTorch")
    if not torch.cuda.is_available():
        sys.exit("topk_profile: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was timed")
    results = {"device": torch.cuda.get_device_name(), "date": common.today(), **common.versions(),
               "heads": args.heads, "head_dim": args.head_dim,
               "topk": args.topk, "block": args.block, "dtype": "bf16", "causal": True, "rows": []}
    cols = ["seq", "bounds", "indexer", "pick", "select", "map_rows", "map_cols", "attend", "topk_fwd", "host_ms",
            "flash_fwd", "speedup"]
    print(f"# {results['device']}  B=1 H={args.heads} D={args.head_dim} bf16 causal topk={args.topk} "
          f"block={args.block}  (ms)")
    print(" ".join(f"{c:>9}" for c in cols))
    for seq in args.seqs:
        r = profile(seq, args)
        torch.cuda.empty_cache()  # the previous length's tensors died with profile()'s frame
        results["rows"].append(r)
        print(" ".join(f"{r[c]:>9.3f}" if isinstance(r.get(c), float) else f"{r.get(c, '-')!s:>9}" for c in cols),
              f"  tile {r['fwd_tile']}, {r['blocks_per_row']:.1f} blocks/row", flush=True)
    print(json.dumps(results, indent=1))
    if args.out:
        common.write_json(args.out, results, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
