"""What ``verify`` adds to ``attnfuse.audit``: a 4-layer GPT-2 (12 heads, dim 768), batch 2 x 512 tokens, in eval
(forward check) and train (forward + gradients) mode, median of ``--repeat`` audits each way.

    python benchmarks/verify_overhead.py [--device cpu|cuda] [--repeat 3]
"""

import argparse
import statistics
import time

import torch
import transformers

import attnfuse

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cpu")
parser.add_argument("--repeat", type=int, default=3)
args = parser.parse_args()

torch.manual_seed(0)
cfg = transformers.GPT2Config(n_layer=4, n_head=12, n_embd=768, n_positions=1024, vocab_size=1000, bos_token_id=1,
                              eos_token_id=2, attn_implementation="eager", attn_pdrop=0.0, resid_pdrop=0.0,
                              embd_pdrop=0.0)
model = transformers.GPT2LMHeadModel(cfg).to(args.device)
ids = torch.randint(0, 1000, (2, 512), device=args.device)
print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
for mode in ("eval", "train"):
    getattr(model, mode)()
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeat):
        for verify in (False, True):
            torch._dynamo.reset()
            start = time.perf_counter()
            with torch.set_grad_enabled(mode == "train"):
                report = attnfuse.audit(model, ids, options={"verify": verify})
            times[verify].append(time.perf_counter() - start)
    note = next(n for n in report.notes if n.startswith("verify:"))
    plain, checked = statistics.median(times[False]), statistics.median(times[True])
    print(f"{mode}: audit {plain:.2f} s, with verify {checked:.2f} s (+{checked - plain:.2f} s); {note}; "
          f"sampled {report.fused[0].verify['sampled']}, grads {sorted(report.fused[0].verify.get('grads', {}))}")
