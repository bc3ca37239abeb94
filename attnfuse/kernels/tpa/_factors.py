"""`Factors`, one side of a Tensor Product Attention site, and `form`, the tensor it stands for
(`attnfuse.kernels.tpa`'s docstring has the definitions)."""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["Factors", "Side", "form"]


@dataclasses.dataclass(frozen=True)
class Factors:
    """One side of a TPA site: ``a`` (B, L, H, R), ``b`` (B, L, R, D), and the constant ``scale``."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        a, b = self.a, self.b
        if a.dim() != 4 or b.dim() != 4 or a.shape[:2] != b.shape[:2] or a.shape[-1] != b.shape[-2]:
            raise ValueError(f"attnfuse tpa: factors must be a (B, L, H, R) and b (B, L, R, D) with the same B, L and "
                             f"R; got a {tuple(a.shape)}, b {tuple(b.shape)}")

    @property
    def heads(self) -> int:
        return self.a.shape[2]

    @property
    def rank(self) -> int:
        return self.a.shape[3]

    @property
    def length(self) -> int:
        return self.a.shape[1]

    @property
    def head_dim(self) -> int:
        return self.b.shape[3]

    def rows(self, start: int, stop: int) -> Factors:
        """The factors of positions [start, stop)."""
        return Factors(self.a[:, start:stop], self.b[:, start:stop], self.scale)


Side = torch.Tensor | Factors


def form(x: Side, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (B, H, L, D) tensor a side stands for (``dtype``: the compute dtype; default the factors')."""
    if isinstance(x, torch.Tensor):
        return x if dtype is None else x.to(dtype)
    a, b = (x.a, x.b) if dtype is None else (x.a.to(dtype), x.b.to(dtype))
    return torch.matmul(a, b).transpose(1, 2) * x.scale  # (B, L, H, R) @ (B, L, R, D) -> (B, L, H, D)


