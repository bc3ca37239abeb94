"""The cost model, in one folder: `tiles` (the leaf: launch configurations, shared-memory and register fit,
per-launch estimates, `pick`), `estimates` (each kernel family's estimate of one site, over `tiles`), `plan`
(every candidate of one site, and the choice; the families come from the registry, `attnfuse.families`),
`cpu` (which CPU path the op runs for a site's static facts: the op's dispatch and the report both ask it), and
`lshknobs` (LSH's settings and the ladder of knobs its calibration tries; a leaf the LSH kernel imports too).

Dependencies point one way: `attnfuse.device` -> `tiles` -> {the kernel launchers, `estimates` ->
`attnfuse.families` -> `plan`}; `cpu` and `lshknobs` import nothing of attnfuse.  This package imports nothing
itself, so a launcher that imports `tiles` loads neither the planner nor anything above it.
"""
