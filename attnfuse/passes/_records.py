"""The records the matcher produces: a match is one frozen `AttentionMatch` (DESIGN.md, house style 3), a
failed check one `Miss` (4).  The cost model, the mask analysis and the rewriter read records, never raw
graph walks; `attnfuse.passes.match` re-exports them.

Also here, because every reader of a record needs them: `operand_shape` (an operand's shape as the
attention reads it) and `absorbs` (whether a mask fill swallows every score).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from ._graph import val


class Miss:
    """A failed check: falsy, with a lazily formatted one-sentence reason."""

    def __init__(self, anchor: fx.Node | None, fmt: str, *args: Any) -> None:
        self.anchor, self._fmt, self._args = anchor, fmt, args

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return self._fmt.format(*self._args)

    __repr__ = __str__


@dataclasses.dataclass(frozen=True)
class Operand:
    """A tensor read as ``node.permute(perm)`` (perm None = as is)."""

    node: fx.Node
    perm: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class MaskTerm:
    """``add``: scores + node.  ``keep``: where(node (negated if ``negate``), scores, fill)."""

    kind: str
    node: fx.Node
    negate: bool = False
    fill: float = 0.0


@dataclasses.dataclass(frozen=True)
class AttentionMatch:
    """One attention site: where it is in the graph, how it reads q, k, v, and what it computes."""

    form: str  # "graph" (matmul-softmax-matmul) | "sdpa" | "mha"
    anchor: fx.Node
    output: fx.Node
    q: Operand
    k: Operand
    v: Operand
    scale: float | None  # constant part; None = default 1/sqrt(head_dim)
    scale_nodes: tuple[tuple[fx.Node, bool], ...] = ()  # runtime factors (node, divide) applied to q
    softcap: float = 0.0
    masks: tuple[MaskTerm, ...] = ()
    causal: bool = False
    kv_groups: int = 1
    kv_layout: str = "interleave"  # "interleave": head h reads kv h // g; "tile": kv h % n_kv
    kv_expand: str = ""  # "k" / "v": that one has a single head, broadcast to the other's heads
    dropout_p: float = 0.0
    pattern: str = ""
    region: frozenset = frozenset()
    # structure proven by `attnfuse.passes.masks` (see `attnfuse.ops` for the semantics)
    window_left: int = -1
    window_right: int = -1
    alibi: fx.Node | None = None  # fp32 (heads,) slopes
    block_sparse: bool = False
    # the window's positions outside the sequence are zero keys (`_unfold`: F.pad + unfold windows)
    window_pad: bool = False
    # q/k/v are the sequences a bucketed local attention gathered from (`_local`); the output is reshaped back
    bucketed: bool = False
    # the plan's per-call kernel table for approximate kernels (`Plan.op_table`; "" = exact)
    approx: str = ""
    # the plan's Triton tiles for the op (`attnfuse.costmodel.tiles.encode`; "" = none: the CPU paths)
    tiles: str = ""
    # PyTorch's kernels instead of attnfuse's (the op's ``impl``: "sdpa:<backend>" | "flex"; "" = attnfuse's own)
    impl: str = ""
    # packed documents / prefix-LM for FlexAttention: the int64 (B, 2, L) node the mask analysis emitted
    # (`attnfuse.passes.masks.FlexMask`; the op's ``doc``)
    doc: fx.Node | None = None
    # attention sinks: the (B, H, Lq, 1) column concatenated to the scores before the softmax and dropped after
    # it (GPT-OSS, x-transformers), proven constant along the queries (`_chain.sink_form`); the op reads [:, :, 0, 0]
    sinks: fx.Node | None = None
    # context parallelism (`attnfuse.parallel`): the group's encoded spec and the strategy ("ulysses" | "ring") the
    # plan chose; "" = one device
    cp: str = ""
    cp_strategy: str = ""
    # Tensor Product Attention: per side (q, k, v) its `attnfuse.passes._tpa.TpaSide` or None, when some side is
    # a per-token product of factors; () otherwise, and once the plan chose another kernel (the rewriter emits
    # ``attnfuse::tpa_attention`` exactly when this is set)
    tpa: tuple = ()


def operand_shape(op: Operand) -> list:
    """``op``'s shape as the attention reads it (its permutation applied)."""
    shape = list(val(op.node).shape)
    return shape if op.perm is None else [shape[p] for p in op.perm]


def absorbs(fill: float, dtype: torch.dtype) -> bool:
    """Whether ``s + fill == fill`` for every score ``s`` of magnitude below 1e29 in ``dtype``."""
    return fill == float("-inf") or (fill <= -1e38 and dtype in (torch.float32, torch.bfloat16, torch.float64))
