"""The nodes a near miss (`match.Miss`) is about, for the report's "before" subgraph of a skipped site.

`region(anchor)` is what the matcher looked at from a softmax it could not match: the scores chain up to
the ``q @ k`` matmul, each chain node's computed operands (a mask built from the scores shows how), and
the consumers down to the ``p @ v`` matmul (or every consumer where the probabilities branch).  It walks
a bounded number of steps and reads the graph only; an SDPA / MHA node that missed is its own region.
"""

from __future__ import annotations

import torch.fx as fx

from ._canon import canon, reaches_matmul

_STEPS = 16  # the most chain nodes walked in each direction


def _up(node: fx.Node, out: set) -> None:
    """The chain from ``node`` up to the scores matmul: the operand that is the scores (else the first
    computed one) is followed; the other computed operands are added once."""
    for _ in range(_STEPS):
        computed = [a for a in node.all_input_nodes if a.op in ("call_function", "call_method")]
        scores = next((a for a in computed if reaches_matmul(a)), computed[0] if computed else None)
        out.update(computed)
        if scores is None or canon(scores).kind == "matmul":
            return
        node = scores


def _down(node: fx.Node, out: set) -> None:
    """The consumers of ``node`` down to a matmul; every consumer where there is more than one."""
    for _ in range(_STEPS):
        users = [u for u in node.users if u.op != "output"]
        out.update(users)
        if len(users) != 1 or canon(users[0]).kind == "matmul":
            return
        node = users[0]


def region(anchor: fx.Node | None) -> set:
    """The nodes around ``anchor`` (a near miss's node) that the report shows; empty for None."""
    if anchor is None or getattr(anchor, "_erased", False):
        return set()
    out = {anchor}
    if canon(anchor).kind in ("sdpa", "mha"):
        return out
    _up(anchor, out)
    _down(anchor, out)
    return out
