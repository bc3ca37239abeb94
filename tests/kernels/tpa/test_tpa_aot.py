"""Ahead-of-time compiles of the ``tpa`` Triton kernels for Hopper (sm_90) and Ampere (sm_80), no GPU needed.

The tiles `attnfuse.kernels.tpa._triton.configs` launches on a GPU (a long query side, and the decode tile of a
one-row query side) must compile for each architecture and fit its shared memory: the device preset's budget
and the hardware's opt-in limit per block.  Each (device, dtype, head dim) compiles the forward, dK/dV and dQ
kernels with every side factorized at rank 2 and no features, and again with every feature on (q plain, a key
mask, a band, softcap, GQA, ragged lengths, ``sdpa_form``), and the split-K decode forward (its fp32 partial
output; flash's combine kernel is compiled by flash's AOT test); on sm_90 the tiles of 64 rows or more must use
wgmma.  As in tests/kernels/_aot.py, the signatures mirror a launch: pointers 16-byte aligned, contiguous
last-dim strides the constant 1, the other strides of b (multiples of D) and the launch sizes without hints.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("under TRITON_INTERPRET @triton.jit gives interpreted functions; nothing to compile",
                allow_module_level=True)

from attnfuse.device import PRESETS  # noqa: E402
from attnfuse.kernels.tpa import _triton, _triton_bwd, _triton_fwd  # noqa: E402
from tests.kernels._aot import _compile as _aot_compile  # noqa: E402

TARGETS = {"h100": (90, 232448), "a100": (80, 166912)}  # compute capability, opt-in shared memory per block
RANK = 2
_FLOATS = {"q_scale", "k_scale", "v_scale", "sm_scale", "qk_scale", "cap_scale", "softcap2", "fill2"}
_UNIT = {"sqa_r", "ska_r", "sva_r", "sqb_d", "skb_d", "svb_d", "stride_od", "stride_dod", "stride_mn"}
_DIV16 = {"sqb_b", "sqb_h", "sqb_l", "sqb_r", "skb_b", "skb_l", "skb_r", "svb_b", "svb_l", "svb_r", "stride_ob",
          "stride_oh", "stride_om", "stride_dob", "stride_doh", "stride_dom"}


def _compile(kernel, cc: int, ptrs: dict[str, str], consts: dict, cfg):
    return _aot_compile(kernel, cc, ptrs, consts, cfg.num_warps, cfg.num_stages, unit=_UNIT, floats=_FLOATS,
                        div16=_DIV16)


def _meta(cfg, hd: int, heavy: bool, dt: str) -> dict:
    mask_kind = (3 if dt == "fp16" else 1) if heavy else 0  # bool with a finite fill / additive bias
    return dict(GROUPS=2 if heavy else 1, HEAD_DIM=hd, HEAD_DIM_V=hd, BLOCK_D=hd, BLOCK_DV=hd, BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n, RQ=1 if heavy else RANK, RK=RANK, RV=RANK, Q_FACT=not heavy, K_FACT=True,
                V_FACT=True, MASK_KIND=mask_kind, HAS_SOFTCAP=heavy, EVEN_M=not heavy, EVEN_N=not heavy,
                PRECISION="tf32")


def _ptrs(kernel, dt: str, heavy: bool, split: bool = False) -> dict[str, str]:
    mask = ("i1" if dt == "fp16" else "fp32") if heavy else dt
    every = dict(QA=f"*{dt}", QB=f"*{dt}", KA=f"*{dt}", KB=f"*{dt}", VA=f"*{dt}", VB=f"*{dt}", M=f"*{mask}",
                 Out="*fp32" if split else f"*{dt}", DO=f"*{dt}", Stats="*fp32", Delta="*fp32", DK="*fp32",
                 DV="*fp32", DQ="*fp32")
    return {n: t for n, t in every.items() if n in kernel.arg_names}


GROUPS = [pytest.param(s, dt, hd, id=f"{s}-{dt}-d{hd}") for s in TARGETS for dt in ("fp16", "bf16") for hd in (64, 128)]


@pytest.mark.parametrize("spec_name,dt,hd", GROUPS)
def test_kernels_compile_and_fit(spec_name, dt, hd):
    spec = PRESETS[spec_name]
    cc, hw_limit = TARGETS[spec_name]
    fwd, bwd = _triton.configs(4096, hd, hd, 2)
    decode, _ = _triton.configs(1, hd, hd, 2)
    assert decode.block_m == 16 and fwd.block_m >= 64 and bwd.block_m >= 64
    runs = [("fwd", _triton_fwd.fwd_kernel, cfg, heavy, dict(SDPA_FORM=heavy, SPLIT=False, EVEN_D=True))
            for cfg, heavy in ((fwd, False), (fwd, True), (decode, True))]
    runs += [("fwd-split", _triton_fwd.fwd_kernel, decode, heavy, dict(SDPA_FORM=False, SPLIT=True, EVEN_D=True))
             for heavy in (False, True)]
    runs += [(name, kernel, bwd, heavy, {}) for name, kernel in (("dkdv", _triton_bwd.dkdv_kernel),
                                                                  ("dq", _triton_bwd.dq_kernel))
             for heavy in (False, True)]
    problems = []
    for name, kernel, cfg, heavy, extra in runs:
        what = f"{spec_name}/sm_{cc} {dt} d={hd} {name} {cfg.block_m}x{cfg.block_n} {'all features' if heavy else ''}"
        try:
            compiled = _compile(kernel, cc, _ptrs(kernel, dt, heavy, extra.get("SPLIT", False)),
                                dict(_meta(cfg, hd, heavy, dt), **extra), cfg)
        except Exception as e:  # a compile failure of any kind is a finding
            problems.append(f"{what}: does not compile: {type(e).__name__}: {e}")
            continue
        shared = compiled.metadata.shared
        if shared > min(spec.smem_per_block, hw_limit):
            problems.append(f"{what}: {shared} B shared > {min(spec.smem_per_block, hw_limit)}")
        if cc == 90 and cfg.block_m >= 64 and "wgmma" not in compiled.asm["ptx"]:
            problems.append(f"{what}: no wgmma in the PTX")
    assert not problems, "\n".join(problems)
