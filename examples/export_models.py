"""Export five models with attnfuse (pt2, ONNX, MLIR) and check each export.

    .venv/bin/python examples/export_models.py [--out DIR] [--json FILE]

GPT-2, BERT (padding mask), LLaMA (GQA), T5 (relative-position bias, no scale; encoder,
decoder and cross attention) from ``transformers`` with random weights, and the project's
nanoGPT.  For each: the sites fused, the pt2 program reloaded and run against eager, the ONNX
model's ``Attention`` / ``Softmax`` node counts and onnxruntime's max error against eager, and
the attention ops in the MLIR of both output types.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import tempfile

import torch
import torch.nn as nn
from nanogpt import GPT, GPTConfig

import attnfuse

VOCAB, BATCH, SEQ = 128, 2, 13


class LastHidden(nn.Module):
    """An HF model as ``model(ids, mask[, decoder_ids]) -> one tensor`` (its logits or last hidden state)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, ids, mask, decoder_ids=None):
        kw = {} if decoder_ids is None else {"decoder_input_ids": decoder_ids}
        out = self.model(ids, attention_mask=mask, use_cache=False, **kw)
        return out.logits if "logits" in out else out.last_hidden_state


def _hf(name: str, **kw) -> nn.Module:
    import transformers

    cfg = getattr(transformers, f"{name}Config")(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                    attn_implementation="eager", **kw)
    cls = {"GPT2": "GPT2LMHeadModel", "Bert": "BertModel", "Llama": "LlamaForCausalLM", "T5": "T5Model"}[name]
    return LastHidden(getattr(transformers, cls)(cfg))


_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64)
BUILDERS = {
    "gpt2": lambda: _hf("GPT2", n_positions=64, n_embd=32, n_layer=2, n_head=4, attn_pdrop=0.0, resid_pdrop=0.0,
                        embd_pdrop=0.0),
    "bert": lambda: _hf("Bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **_SMALL),
    "llama": lambda: _hf("Llama", num_key_value_heads=2, attention_dropout=0.0, **_SMALL),  # GQA: 4 q / 2 kv heads
    "t5": lambda: _hf("T5", d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0),
    "nanogpt": lambda: GPT(GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32)).eval(),
}


def example(name: str) -> tuple[nn.Module, tuple]:
    """``(model, args)``: random weights, a batch whose second row is right-padded by 4 tokens."""
    torch.manual_seed(0)
    model = BUILDERS[name]()
    ids = torch.randint(3, VOCAB, (BATCH, SEQ))
    if name == "nanogpt":
        return model, (ids,)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -4:] = 0
    return model, ((ids, mask, torch.randint(3, VOCAB, (BATCH, 7))) if name == "t5" else (ids, mask))


# CLI targets, e.g. `python -m attnfuse audit examples/export_models.py:gpt2`
gpt2, bert, llama, t5, nanogpt = (functools.partial(example, name) for name in BUILDERS)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def check(name: str, out_dir: pathlib.Path) -> dict:
    """Export ``name`` in every format and measure each export against eager."""
    import numpy as np
    import onnx
    import onnxruntime

    model, args = example(name)
    with torch.no_grad():
        eager = _first(model(*args))
    row = {"model": name}
    path = attnfuse.export(model, args, out_dir / f"{name}.pt2", format="pt2")
    row["sites"], row["fused"] = len(attnfuse.last_report().sites), len(attnfuse.last_report().fused)
    with torch.no_grad():
        row["pt2_max_err"] = (_first(torch.export.load(path).module()(*args)) - eager).abs().max().item()
    path = attnfuse.export(model, args, out_dir / f"{name}.onnx", format="onnx")
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    row["onnx_attention"], row["onnx_softmax"] = ops.count("Attention"), ops.count("Softmax")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    row["onnx_max_err"] = float(np.abs(session.run(None, feeds)[0] - eager.numpy()).max())
    mlir_ops = {"torch": "torch.aten.scaled_dot_product_attention", "linalg-on-tensors": "tm_tensor.attention"}
    for output, op in mlir_ops.items():
        path = attnfuse.export(model, args, out_dir / f"{name}.{output}.mlir", format="mlir", mlir_output=output)
        row[f"mlir_{output}_attention"] = path.read_text().count(op)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="keep the exported files here (default: a temporary directory)")
    parser.add_argument("--json", help="write the table as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        rows = [check(name, out) for name in BUILDERS]
    cols = list(rows[0])
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(f"{row[c]:.2e}" if isinstance(row[c], float) else str(row[c]) for c in cols))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
