"""Backward tile sweep of the flash kernels on a GPU: dQ by fp32 atomics vs its own pass, per tile config.

    python benchmarks/bwd_sweep.py [--out DIR]                 # GPU: measure, write JSON + PNG
    python benchmarks/bwd_sweep.py --from-json FILE [--out DIR]  # re-plot (no GPU)

Shapes: bf16, batch 4, 4096 tokens, model dim 2048 (d128: 16 heads, d64: 32), causal and not.  Each row times
`attnfuse.kernels.flash.backward` (median of `triton.testing.do_bench`) for one (deterministic, config); the
config marked ``*`` is the launcher's own pick.  SDPA's flash backward on the same inputs is the yardstick.
This sweep is where the launcher's backward defaults come from: dQ in its own pass (``deterministic=True``)
and the backward register budget in `tiles._REGS_PER_THREAD`.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import pathlib

from attnfuse.costmodel import tiles
from attnfuse.kernels import _launch

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHAPES = [(128, False), (128, True), (64, False)]
CONFIGS = [(32, 128, 4, 2), (32, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2),
           (128, 32, 8, 2)]


def measure() -> dict:
    import torch
    from triton.testing import do_bench

    from attnfuse.kernels import flash

    torch.manual_seed(0)
    rows, sdpa = [], {}
    for d, causal in SHAPES:
        b, h, n = 4, 2048 // d, 4096
        q, k, v, g = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        out, stats = flash.forward(q, k, v, causal=causal)
        qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
        sdpa[f"d{d} causal={causal}"] = do_bench(lambda: torch.autograd.grad(o, (qs, ks, vs), g, retain_graph=True),
                                                 return_mode="median")
        default = tiles.pick("bwd", n, n, b * h, d, d, 2, _launch.spec_for(q))
        for det, cfg in itertools.product((False, True), [None] + [tiles.TileConfig(*c) for c in CONFIGS]):
            def run():
                return flash.backward(g, q, k, v, out, stats, causal=causal, deterministic=det, config=cfg)

            run()
            name = str(cfg or default) + ("*" if cfg is None else "")
            rows.append({"d": d, "causal": causal, "det": det, "cfg": name, "ms": do_bench(run, return_mode="median")})
            print(rows[-1], flush=True)
    return {"device": torch.cuda.get_device_name(), "date": str(datetime.date.today()), "rows": rows,
            "sdpa_ms": sdpa}


def plot(doc: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"] if isinstance(doc, dict) else doc
    shapes = list(dict.fromkeys((r["d"], r["causal"]) for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 5), squeeze=False)
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
    fig.suptitle(f"flash backward tile sweep, {doc.get('device', 'GPU') if isinstance(doc, dict) else 'GPU'}, bf16")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--from-json", metavar="FILE")
    args = p.parse_args()
    out = pathlib.Path(args.out)
    if args.from_json:
        doc = json.loads(pathlib.Path(args.from_json).read_text())
        png = out / (pathlib.Path(args.from_json).stem + ".png")
    else:
        import torch

        if not torch.cuda.is_available():
            print("bwd_sweep.py needs a CUDA GPU")
            return 0
        doc = measure()
        tag = "h200" if "H200" in doc["device"] else "h100" if "H100" in doc["device"] else "gpu"
        stem = f"bwd-sweep-{tag}-{doc['date']}"
        (out / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
        png = out / f"{stem}.png"
    plot(doc, png)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
