"""Attention kernels: one module or package per family (`flash`, `window`, `blocksparse`, `topk`, `lsh`, `tiled`),
the op's CPU implementation (`cpu`), the shared launch helpers (`_launch`) and q/k/v checks (`validate`)."""
