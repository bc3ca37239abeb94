"""The cost model, in one folder: `tiles` (the leaf: launch configurations, shared-memory and register fit,
per-launch estimates, `pick`) and `plan` (every candidate of one site, and the choice).

Dependencies point one way: `attnfuse.device` -> `tiles` -> {the kernel launchers, `plan`}.  This package
imports nothing itself, so a launcher that imports `tiles` loads neither the planner nor anything above it.
"""
