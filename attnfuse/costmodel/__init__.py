"""The cost model, in one folder: `tiles` (the leaf: launch configurations, shared-memory and register fit,
per-launch estimates, `pick`), `estimates` (each kernel family's estimate of one site, over `tiles`), `plan`
(every candidate of one site, and the choice; the families come from the registry, `attnfuse.families`), and
`cpu` (which CPU path the op runs for a site's static facts: the op's dispatch and the report both ask it).

Dependencies point one way: `attnfuse.device` -> `tiles` -> {the kernel launchers, `estimates` ->
`attnfuse.families` -> `plan`}; `cpu` imports nothing of attnfuse.  This package imports nothing itself, so a
launcher that imports `tiles` loads neither the planner nor anything above it.
"""
