"""Helpers of test_flash_aot_fwd/bwd: ahead-of-time compiles of the flash kernels for Hopper (sm_90)
and Ampere (sm_80), no GPU needed.

Every tile config the launcher can pick on a device (`tiles.kept_configs`, a superset of the configs
`tiles.reachable_configs` finds over a grid of shapes) must compile for that device's architecture,
fit its shared memory (the spec's budget and the hardware's opt-in limit per block), and the
launcher's estimate `tiles.smem_bytes` must not under-count what Triton allocates.  Each
(spec, dtype, head dim) compiles every config without features, plus the config nearest the limit
with every feature on (causal, softcap, dropout, ragged lengths and a mask: a bool mask for fp16, a
float32 bias with its gradient for bf16; shared memory depends on the element size, not on which
16-bit type).  test_window_aot.py adds the band and block-sparse ``variant``s of the same kernels.

The signatures mirror a launch through `torch.library.wrap_triton`: pointers 16-byte aligned,
last-dim strides 1 (Triton turns an int argument equal to 1 into a constant), other ints multiples
of 16.  That is the most vectorized specialization, with the deepest cp.async pipelining and so
the most shared memory: without the hints Triton pipelines less.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("under TRITON_INTERPRET @triton.jit gives interpreted functions; nothing to compile",
                allow_module_level=True)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attnfuse.costmodel import tiles  # noqa: E402
from attnfuse.device import PRESETS  # noqa: E402
from attnfuse.kernels import flash  # noqa: E402
from attnfuse.kernels.flash import TileConfig  # noqa: E402

# spec -> (compute capability, shared memory a block may opt in to on that architecture)
TARGETS = {"h100": (90, 232448), "a100": (80, 166912)}
DTYPES = ("fp16", "bf16")
HEAD_DIMS = (64, 128, 256)
ELEM = 2

_FLOATS = {"qk_scale", "cap_scale", "softcap2", "fill2", "dropout_p", "sm_scale"}
# strides of contiguous last dims: 1 at launch, so Triton compiles them as the constant 1
_UNIT = {"stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_dd", "stride_dod", "stride_dqd", "stride_dkd",
         "stride_dvd"}
_MASK_UNIT = {"stride_mn"}  # a contiguous (q_len, kv_len) mask broadcast to (B, H, q_len, kv_len)


def _compile(kernel, cc: int, ptrs: dict[str, str], consts: dict, num_warps: int, num_stages: int, unit=_UNIT,
             floats=_FLOATS, div16=None):
    """Compile ``kernel`` as the launcher would launch it; ``ptrs`` maps each pointer argument to its type, the
    ``floats`` arguments are fp32, the ``unit`` ones the constant 1, and the other ints i32, hinted divisible by
    16 when in ``div16`` (None: every one)."""
    names = kernel.arg_names
    missing = [p.name for p in kernel.params if p.is_constexpr and p.name not in consts]
    assert not missing and set(ptrs) <= set(names), f"{kernel.__name__}: unset constexprs {missing} or stale {ptrs}"
    signature, constexprs, attrs = {}, dict(consts), {}
    for i, name in enumerate(names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in ptrs:
            signature[name] = ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            signature[name] = "fp32"
        elif name in unit:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if div16 is None or name in div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def _meta(cfg: TileConfig, hd: int, mask: str | None, variant: str | None = None) -> dict:
    """The constexprs `flash.forward`/`flash.backward` pass.  ``mask`` None: no features, lengths that divide
    the tiles; else softcap, dropout, ragged lengths, a mask of that dtype ("i1": bool with a fill) and a band:
    causal, or with ``variant`` "window" a sliding window and ALiBi, with "sparse" a block-sparse map (its
    mask bool, or additive with the finfo.min floor), a window and ALiBi."""
    heavy = mask is not None
    if variant == "sparse":
        kind = flash.MASK_BOOL if mask == "i1" else flash.MASK_BIAS_FLOOR
    else:
        kind = flash.MASK_NONE if not heavy else flash.MASK_BOOL_FILL if mask == "i1" else flash.MASK_BIAS
    return dict(GROUPS=1, HEAD_DIM=hd, HEAD_DIM_V=hd, BLOCK_D=hd, BLOCK_DV=hd, BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n, IS_CAUSAL=heavy and variant is None, HAS_WINDOW=variant is not None,
                BLOCK_SPARSE=variant == "sparse", MASK_KIND=kind, HAS_SOFTCAP=heavy, HAS_ALIBI=variant is not None,
                HAS_DROPOUT=heavy, EVEN_M=not heavy, EVEN_N=not heavy, PRECISION="tf32")


def _inputs(dt: str, mask: str | None, variant: str | None = None, **ptrs) -> dict:
    """Pointer types: q/k/v-like ones ``dt``; the mask, seed, slopes and tile map are q itself when unused."""
    return dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", M=f"*{mask or dt}", Seed="*i64" if mask else f"*{dt}",
                Alibi="*fp32" if variant else f"*{dt}", TileMap="*i32" if variant == "sparse" else f"*{dt}", **ptrs)


def compile_fwd(cfg: TileConfig, cc: int, dt: str, hd: int, mask: str | None = None, variant: str | None = None):
    ptrs = _inputs(dt, mask, variant, VBad="*i1" if mask else f"*{dt}", Sinks="*fp32" if mask else f"*{dt}",
                   Out=f"*{dt}", Stats="*fp32")
    meta = dict(_meta(cfg, hd, mask, variant), EVEN_D=True, HAS_SINKS=mask is not None)  # heavy: with sinks
    return _compile(flash.fwd_kernel, cc, ptrs, meta, cfg.num_warps,
                    cfg.num_stages, _UNIT | _MASK_UNIT if mask else _UNIT)


def compile_combine(cc: int, dt: str, hd: int, block_s: int):
    ptrs = dict(Part="*fp32", PartStats="*fp32", Out=f"*{dt}", Stats="*fp32")
    return _compile(flash.combine_kernel, cc, ptrs, dict(HEAD_DIM_V=hd, BLOCK_DV=hd, BLOCK_S=block_s), 4, 3)


def compile_preprocess(cc: int, dt: str, hd: int):
    ptrs = dict(Out=f"*{dt}", DO=f"*{dt}", Delta="*fp32")
    return _compile(flash.bwd_preprocess, cc, ptrs, dict(HEAD_DIM_V=hd, BLOCK_DV=hd, BLOCK_M=64), 4, 3)


def compile_dkdv(cfg: TileConfig, cc: int, dt: str, hd: int, mask: str | None = None, variant: str | None = None):
    ptrs = _inputs(dt, mask, variant, DO=f"*{dt}", Stats="*fp32", Delta="*fp32", DQ="*fp32", DK=f"*{dt}",
                   DV=f"*{dt}")
    return _compile(flash.bwd_dkdv_kernel, cc, ptrs, dict(_meta(cfg, hd, mask, variant), ATOMIC_DQ=True),
                    cfg.num_warps, cfg.num_stages, _UNIT | _MASK_UNIT if mask else _UNIT)


def compile_dq(cfg: TileConfig, cc: int, dt: str, hd: int, mask: str | None = None, variant: str | None = None):
    # a bias that wants its gradient: dS stored into DM (a block-sparse mask is a constant)
    grad = mask is not None and mask != "i1" and variant != "sparse"
    ptrs = _inputs(dt, mask, variant, DO=f"*{dt}", Stats="*fp32", Delta="*fp32", DQ=f"*{dt}",
                   DM="*fp32" if grad else f"*{dt}")
    return _compile(flash.bwd_dq_kernel, cc, ptrs, dict(_meta(cfg, hd, mask, variant), MASK_GRAD=grad),
                    cfg.num_warps, cfg.num_stages, _UNIT | _MASK_UNIT if mask else _UNIT)


# --------------------------------------------------------------------------------------------- checks


class _Report:
    """Collects every problem of one test, so one failure lists all of them."""

    def __init__(self, spec_name: str, dt: str, hd: int):
        self.spec = PRESETS[spec_name]
        self.cc, self.hw_limit = TARGETS[spec_name]
        self.where = f"{spec_name}/sm_{self.cc} {dt} d={hd}"
        self.problems: list[str] = []

    def compile(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # a compile failure of any kind is a finding
            self.problems.append(f"{self.where} {what}: does not compile: {type(e).__name__}: {e}")
            return None

    def shared(self, what: str, compiled, estimate: int | None = None) -> None:
        if compiled is None:
            return
        shared = compiled.metadata.shared
        if shared > self.spec.smem_per_block:
            self.problems.append(f"{self.where} {what}: {shared} B shared > the spec's {self.spec.smem_per_block}")
        if shared > self.hw_limit:
            self.problems.append(f"{self.where} {what}: {shared} B shared > sm_{self.cc}'s limit {self.hw_limit}")
        if estimate is not None and estimate < shared:
            self.problems.append(f"{self.where} {what}: smem_bytes() = {estimate} < {shared} B Triton allocates")

    def check(self) -> None:
        assert not self.problems, "\n".join(self.problems)


def _name(cfg: TileConfig) -> str:
    return f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"


def _heavy_mask(dt: str) -> tuple[str, int]:
    """The mask of the all-features compile and its element size: bool for fp16, a float32 bias for bf16."""
    return ("i1", 1) if dt == "fp16" else ("fp32", 4)


def _kept(rep: _Report, kind: str, hd: int, mask_elem: int = 0) -> list[TileConfig]:
    kept = tiles.kept_configs(kind, hd, hd, ELEM, rep.spec, mask_elem)
    if not kept:
        rep.problems.append(f"{rep.where}: no {kind} config fits (mask element size {mask_elem}): pick() raises")
    return kept


def _nearest_limit(kept: list[TileConfig], kind: str, hd: int, mask_elem: int) -> TileConfig:
    return max(kept, key=lambda c: tiles.smem_bytes(c, kind, hd, hd, ELEM, mask_elem))


GROUPS = [pytest.param(s, dt, hd, id=f"{s}-{dt}-d{hd}") for s in TARGETS for dt in DTYPES for hd in HEAD_DIMS]
