"""Backward tile sweep of the flash kernels on a GPU: dQ by fp32 atomics vs its own pass, per tile config.

    python benchmarks/bwd_sweep.py [--out DIR]                 # GPU: measure, write JSON + PNG
    python benchmarks/bwd_sweep.py --from-json FILE [--out DIR]  # re-plot (no GPU)

Shapes: bf16, batch 4, 4096 tokens, model dim 2048 (d128: 16 heads, d64: 32), causal and not.  Each row times
`attnfuse.kernels.flash.backward` (median of `common.time_call`: CUDA events, 100 ms of calls) for one
(deterministic, config); the config marked ``*`` is the launcher's own pick.  SDPA's flash backward on the same
inputs is the yardstick.  This sweep is where the launcher's backward defaults come from: dQ in its own pass
(``deterministic=True``) and the backward register budget in `tiles._REGS_PER_THREAD`.
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # _common, also when loaded by path (tests)
import _common as common  # noqa: E402

from attnfuse.costmodel import tiles  # noqa: E402
from attnfuse.kernels import _launch  # noqa: E402

SHAPES = [(128, False), (128, True), (64, False)]
CONFIGS = [(32, 128, 4, 2), (32, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2),
           (128, 32, 8, 2)]


def measure() -> dict:
    import torch

    from attnfuse.kernels import flash

    def median_ms(fn) -> float:
        return common.time_call(fn, "cuda", rep_ms=100.0).median_s * 1e3

    torch.manual_seed(0)
    rows, sdpa = [], {}
    for d, causal in SHAPES:
        b, h, n = 4, 2048 // d, 4096
        q, k, v, g = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        out, stats = flash.forward(q, k, v, causal=causal)
        qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
        sdpa[f"d{d} causal={causal}"] = median_ms(lambda: torch.autograd.grad(o, (qs, ks, vs), g, retain_graph=True))
        default = tiles.pick("bwd", n, n, b * h, d, d, 2, _launch.spec_for(q))
        for det, cfg in itertools.product((False, True), [None] + [tiles.TileConfig(*c) for c in CONFIGS]):
            def run():
                return flash.backward(g, q, k, v, out, stats, causal=causal, deterministic=det, config=cfg)

            run()
            name = str(cfg or default) + ("*" if cfg is None else "")
            rows.append({"d": d, "causal": causal, "det": det, "cfg": name, "ms": median_ms(run)})
            print(rows[-1], flush=True)
    return {"device": torch.cuda.get_device_name(), "date": common.today(), **common.versions(), "rows": rows,
            "sdpa_ms": sdpa}


def plot(doc: dict, path: pathlib.Path) -> None:
    rows = doc["rows"] if isinstance(doc, dict) else doc
    shapes = list(dict.fromkeys((r["d"], r["causal"]) for r in rows))
    fig, axes = common.figure(1, len(shapes), (6 * len(shapes), 5))
    for ax, (d, causal) in zip(axes[0], shapes):
        sel = [r for r in rows if (r["d"], r["causal"]) == (d, causal) and "ms" in r]
        cfgs = list(dict.fromkeys(r["cfg"].replace("TileConfig", "").replace("block_", "") for r in sel))
        for i, det in enumerate((False, True)):
            ms = {r["cfg"].replace("TileConfig", "").replace("block_", ""): r["ms"] for r in sel if r["det"] == det}
            ax.barh([j + 0.4 * i for j in range(len(cfgs))], [ms.get(c, 0) for c in cfgs], height=0.4,
                    label="dQ in its own pass" if det else "dQ by fp32 atomics")
        ref = (doc.get("sdpa_ms") or {}).get(f"d{d} causal={causal}") if isinstance(doc, dict) else None
        if ref:
            ax.axvline(ref, color="k", ls="--", label="SDPA flash backward")
        ax.set_yticks([j + 0.2 for j in range(len(cfgs))], cfgs, fontsize=7)
        ax.set_xlabel("ms (median)")
        ax.set_title(f"d={d}, {'causal' if causal else 'non-causal'}")
        ax.legend(fontsize=8)
    device = doc.get("device", "GPU") if isinstance(doc, dict) else "GPU"
    common.save(fig, path, f"flash backward tile sweep, {device}, bf16")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(common.RESULTS))
    p.add_argument("--from-json", metavar="FILE")
    args = p.parse_args(argv)
    if args.from_json:
        return common.replot(args, plot)
    import torch

    if not torch.cuda.is_available():
        print("bwd_sweep.py needs a CUDA GPU")
        return 0
    doc = measure()
    json_path = common.json_path(args.out, f"bwd-sweep-{common.device_tag('cuda', doc['date'])}.json")
    common.write_json(json_path, doc, indent=1)
    png = json_path.with_suffix(".png")
    plot(doc, png)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
