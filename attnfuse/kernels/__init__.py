"""Attention kernels: one module per family (see DESIGN.md, 'Kernel files')."""
