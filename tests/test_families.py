"""The kernel family registry (`attnfuse.families`): every family config allows is registered with a kernel
module that imports and runs it, and config, the planner, ops, the approximation policy and export read their
family lists, defaults, estimates and export support from it."""

from __future__ import annotations

import ast
import pathlib

import pytest

from attnfuse import Config, config, families
from attnfuse.costmodel import estimates
from attnfuse.costmodel import plan as planner
from attnfuse.device import PRESETS
from attnfuse.export import _lower
from attnfuse.report import Site

SHAPE = {"batch": 2, "heads": 8, "kv_heads": 2, "q_len": 300, "kv_len": 1000, "head_dim": 64, "v_head_dim": 64,
         "elem": 2}
STRUCTURE = {"window": (128, 0), "causal": True, "block_sparse": True, "density": 0.4, "tpa": {"ranks": (0, 2, 2)}}


@pytest.mark.parametrize("name", config.KERNEL_FAMILIES)
def test_every_allowed_kernel_is_registered_with_a_module_that_runs_it(name):
    family = families.FAMILIES[name]
    assert family.name == name and family.fused
    module = families.kernel_module(name)
    assert module.__name__ == family.module and callable(module.attention)
    if not family.exact:  # ops and the approximation policy call these
        assert all(callable(getattr(module, f)) for f in ("forward", "backward", "unsupported"))


def test_config_and_planner_lists_are_the_registrys():
    assert Config().kernels == config.KERNEL_FAMILIES == families.KERNELS == ("flash", "window", "blocksparse",
                                                                            "sdpa", "flex", "tpa", "topk", "lsh")
    assert families.PYTORCH_KERNELS == ("sdpa", "flex")
    assert config.EXACT_FAMILIES == planner.EXACT == tuple(n for n in families.KERNELS if families.FAMILIES[n].exact)
    assert config.APPROXIMATE_FAMILIES == planner.APPROXIMATE == tuple(
        n for n in families.KERNELS if not families.FAMILIES[n].exact) == ("topk", "lsh")
    assert set(families.FAMILIES) == {*families.KERNELS, "eager"} and not families.FAMILIES["eager"].fused
    with pytest.raises(ValueError, match="unfused graph"):
        families.kernel_module("eager")
    with pytest.raises(ValueError, match="allowed: \"auto\" or a list of 'flash', 'window'"):
        Config.from_options({"kernels": ["eager"]})


def test_approximate_settings_default_to_the_registrys():
    policy = Config.from_options({"approximate": {"max_rel_error": 0.05}}).approximate
    assert policy["families"] == families.APPROXIMATE
    for name in families.APPROXIMATE:
        assert policy[name] == dict(families.FAMILIES[name].defaults) and policy[name]
    assert not any(families.FAMILIES[name].defaults for name in families.EXACT)


def test_the_registrys_lsh_defaults_are_the_kernels():
    """The registry writes `attnfuse.kernels.lsh.DEFAULTS` out (`lshknobs`: no kernel import): they agree, in order."""
    from attnfuse.kernels import lsh

    assert list(families.FAMILIES["lsh"].defaults.items()) == list(lsh.DEFAULTS.items())


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_the_planner_estimates_with_the_registrys_function_and_defaults(name):
    family = families.FAMILIES[name]
    assert family.estimate is getattr(estimates, name)
    spec = PRESETS["h100"]
    got = planner.estimate_family(name, SHAPE, spec, structure=STRUCTURE, causal=True)
    want = family.estimate(SHAPE, spec, structure=STRUCTURE, params=dict(family.defaults), causal=True)
    assert got == want and got[1].time_s > 0
    if family.defaults:  # a setting overrides its default, the others stay
        key = next(iter(family.defaults))
        changed = {key: family.defaults[key] * 2}
        assert planner.estimate_family(name, SHAPE, spec, params=changed, causal=True) == family.estimate(
            SHAPE, spec, structure={}, params={**family.defaults, **changed}, causal=True)


def test_unknown_family_names_the_registry():
    with pytest.raises(ValueError, match="unknown kernel family 'dense'; allowed: flash, window, blocksparse, "
                                         "sdpa, flex, tpa, topk, lsh, eager"):
        planner.estimate_family("dense", SHAPE, PRESETS["h100"])


@pytest.mark.parametrize("fmt", ["onnx", "mlir"])
@pytest.mark.parametrize("name", config.KERNEL_FAMILIES)
def test_export_support_is_recorded_and_used(fmt, name):
    family = families.FAMILIES[name]
    # FlexAttention has no standard-attention form with its doc tensor (export plans without PyTorch's kernels)
    assert family.export == ("attention" if family.exact and name not in ("flex", "tpa") else "original")
    assert (name in families.EXPORT_ORIGINAL) == (family.export == "original")
    match = type("M", (), {"dropout_p": 0.0, "softcap": 0.0})()
    site = Site(id=0, module="m", source="", status="fused", kernel=name)
    why = _lower.unsupported(fmt, match, site)
    if family.export == "attention":
        assert why is None
    else:
        assert f"no {name} attention" in why and "original (exact) ops" in why
    site.kernel, site.table = "flash", [{"kv_len": [0, 4096], "kernel": "flash"},
                                        {"kv_len": [4096, None], "kernel": name}]
    assert (_lower.unsupported(fmt, match, site) is None) == (family.export == "attention")


def test_the_registry_imports_no_kernel():
    """It names kernel modules by path; `kernel_module` imports one when asked."""
    tree = ast.parse(pathlib.Path(families.__file__).read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [m for m in imported if "kernels" in m], imported
